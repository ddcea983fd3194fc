// What changed between two snapshots of one store, by content: two pages are
// the same when they have the same content id (the store keeps one copy of
// each content) or the same content hash. Only stored pages are visited, so a
// region of terabytes of reserved address space costs nothing; only pages
// that differ are decompressed (to count the bytes that differ).
import { readSync, openSync, closeSync } from 'node:fs';
import { WpsnapError } from '../common/errors.js';
import type { DiffRegion, SnapshotDiff } from '../snapshot-format/diff.js';
import { fileUnchanged } from '../snapshot-format/export-raw.js';
import { PAGE_SIZE, type LostRange, type RegionRecord, type SnapshotSummary } from '../snapshot-format/model.js';
import { lowerBound, type DecodedIndex } from './codec.js';
import type { Store } from './store.js';

const PAGE = BigInt(PAGE_SIZE);
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

export interface DiffOptions {
  /** List each changed page's address in its region. */
  pages?: boolean;
}

/** One snapshot's side of the comparison. */
interface Side {
  summary: SnapshotSummary;
  pid: number;
  regions: RegionRecord[];
  lost: LostRange[];
  index: DecodedIndex;
}

function side(store: Store, ref: string): Side {
  const summary = store.find(ref);
  const process = store.processes(summary.id)[0];
  if (process === undefined) throw new WpsnapError('USAGE', `snapshot ${summary.id} holds no process (it was interrupted before its pause)`);
  return { summary, pid: process.pid, regions: store.regions(process.processId), lost: store.lost(process.processId), index: store.pageIndex(process.processId) };
}

function differingBytes(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let i = 0; i < PAGE_SIZE; i++) if (a[i] !== b[i]) n++;
  return n;
}

function isFileBacked(r: RegionRecord): boolean {
  return r.capture === 'file-private' || r.capture === 'file-reference';
}

function sameFile(a: RegionRecord, b: RegionRecord): boolean {
  return (
    a.file !== undefined &&
    b.file !== undefined &&
    a.file.dev === b.file.dev &&
    a.file.ino === b.file.ino &&
    a.file.size === b.file.size &&
    a.file.mtimeNs === b.file.mtimeNs &&
    a.offset - a.start === b.offset - b.start
  );
}

/** Reads pages of a mapped file (only while it still has the identity recorded at T). */
class FilePages {
  private fd: number | undefined;
  constructor(private readonly region: RegionRecord) {}

  /** The file's content behind `address`, or undefined if the file changed since. */
  page(address: bigint): Buffer | undefined {
    if (this.fd === undefined) {
      if (!fileUnchanged(this.region)) return undefined;
      this.fd = openSync(this.region.file!.path, 'r');
    }
    const out = Buffer.alloc(PAGE_SIZE);
    readSync(this.fd, out, 0, PAGE_SIZE, Number(this.region.offset + (address - this.region.start)));
    return out;
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
  }
}

/** Pages of [start, end) inside the lost ranges, as sorted disjoint page intervals. */
function lostIn(lost: LostRange[], start: bigint, end: bigint): Array<[bigint, bigint]> {
  const out: Array<[bigint, bigint]> = [];
  for (const l of lost) {
    const s = l.address > start ? l.address : start;
    const e0 = l.address + BigInt(l.pages) * PAGE;
    const e = e0 < end ? e0 : end;
    if (s < e) out.push([s, e]);
  }
  return out;
}

function inIntervals(intervals: Array<[bigint, bigint]>, address: bigint): boolean {
  for (const [s, e] of intervals) if (s <= address && address < e) return true;
  return false;
}

function pagesOfIntervals(intervals: Array<[bigint, bigint]>): number {
  const sorted = [...intervals].sort((x, y) => (x[0] < y[0] ? -1 : 1));
  let pages = 0n;
  let reach = 0n;
  for (const [s, e] of sorted) {
    const from = s > reach ? s : reach;
    if (e > from) pages += (e - from) / PAGE;
    if (e > reach) reach = e;
  }
  return Number(pages);
}

/**
 * When B descends from A (same process): every page written between them,
 * from the dirty sets of the generations after A up to B; undefined otherwise.
 */
function chainDirtySet(store: Store, a: Side, b: Side): BigUint64Array | undefined {
  const pages: bigint[] = [];
  let at: SnapshotSummary = b.summary;
  for (let steps = 0; at.id !== a.summary.id; steps++) {
    if (at.parentId === null || steps > 100_000) return undefined;
    const process = store.processes(at.id).find((p) => p.pid === b.pid);
    if (process === undefined || at.pids.length !== 1) return undefined;
    pages.push(...store.dirtyPages(process.processId));
    at = store.find(String(at.parentId));
  }
  if (a.pid !== b.pid) return undefined;
  return BigUint64Array.from(new Set(pages)).sort();
}

export function diffSnapshots(store: Store, refA: string, refB: string, options: DiffOptions = {}): SnapshotDiff {
  const a = side(store, refA);
  const b = side(store, refB);
  const candidates = chainDirtySet(store, a, b);
  const regions: DiffRegion[] = [];
  const byStartA = new Map(a.regions.map((r) => [r.start, r]));
  const matched = new Set<RegionRecord>();

  const entry = (r: RegionRecord, status: DiffRegion['status']): DiffRegion => ({
    start: r.start,
    end: r.end,
    path: r.path,
    perms: r.perms,
    status,
    changedPages: 0,
    changedBytes: 0,
    unknownPages: 0,
    ...(options.pages ? { pages: [] } : {}),
  });

  // An added or removed region: every page with data is a change, all its bytes.
  const wholeSide = (s: Side, r: RegionRecord, status: 'added' | 'removed'): DiffRegion => {
    const d = entry(r, status);
    const lost = lostIn(s.lost, r.start, r.end);
    d.unknownPages = r.capture === 'skipped' ? Number((r.end - r.start) / PAGE) : pagesOfIntervals(lost);
    if (r.capture === 'skipped') return d;
    const stored = new Set<bigint>();
    for (let i = lowerBound(s.index.addresses, r.start); i < s.index.addresses.length && (s.index.addresses[i] as bigint) < r.end; i++) {
      stored.add(s.index.addresses[i] as bigint);
    }
    let last = r.end;
    if (isFileBacked(r) && r.file !== undefined) {
      const fileEnd = r.start + (BigInt(r.file.size) - r.offset + PAGE - 1n) / PAGE * PAGE;
      last = fileEnd < r.end ? fileEnd : r.end;
      for (let p = r.start; p < last; p += PAGE) if (!inIntervals(lost, p)) stored.add(p);
    }
    const pages = [...stored].filter((p) => !inIntervals(lost, p)).sort((x, y) => (x < y ? -1 : 1));
    d.changedPages = pages.length;
    d.changedBytes = pages.length * PAGE_SIZE;
    if (d.pages) d.pages = pages;
    return d;
  };

  const compare = (ra: RegionRecord, rb: RegionRecord, status: 'changed' | 'resized'): DiffRegion => {
    const d = entry(rb, status);
    if (status === 'resized') d.endInA = ra.end;
    const start = rb.start;
    const end = ra.end > rb.end ? ra.end : rb.end;
    const unknown = [...lostIn(a.lost, start, end), ...lostIn(b.lost, start, end)];
    if (ra.capture === 'skipped') unknown.push([ra.start, ra.end]);
    if (rb.capture === 'skipped') unknown.push([rb.start, rb.end]);
    // Pages stored on neither side are the same only if both read the same way (zero, or one unchanged file).
    const baseA = isFileBacked(ra) ? 'file' : 'zero';
    const baseB = isFileBacked(rb) ? 'file' : 'zero';
    if (baseA !== baseB || (baseA === 'file' && !sameFile(ra, rb))) unknown.push([start, end]);
    const filesA = new FilePages(ra);
    const filesB = new FilePages(rb);
    /** A page not stored on side s: what it read at T, or undefined if not known now. */
    const unstored = (r: RegionRecord, files: FilePages, address: bigint): Buffer | undefined => {
      if (address >= r.end) return ZERO_PAGE; // beyond the region on this side: nothing there
      if (!isFileBacked(r)) return ZERO_PAGE;
      return files.page(address);
    };
    /** One address stored on either side (cid undefined: not stored there). */
    const visit = (address: bigint, cidA: number | undefined, cidB: number | undefined): void => {
      if (inIntervals(unknown, address)) return;
      let bytes: number;
      if (cidA !== undefined && cidB !== undefined) {
        if (store.sameContent(cidA, cidB)) return;
        bytes = differingBytes(Buffer.from(store.content(cidA)), store.content(cidB));
      } else {
        const stored = Buffer.from(store.content((cidA ?? cidB)!));
        const other = cidA === undefined ? unstored(ra, filesA, address) : unstored(rb, filesB, address);
        if (other === undefined) {
          unknown.push([address, address + PAGE]);
          return;
        }
        bytes = differingBytes(stored, other);
        if (bytes === 0) return;
      }
      d.changedPages++;
      d.changedBytes += bytes;
      d.pages?.push(address);
    };
    const cidAt = (index: DecodedIndex, address: bigint): number | undefined => {
      const k = lowerBound(index.addresses, address);
      return index.addresses[k] === address ? (index.cids[k] as number) : undefined;
    };
    try {
      if (candidates !== undefined) {
        // Generations of one chain: only pages some generation between them recorded as written can differ.
        for (let k = lowerBound(candidates, start); k < candidates.length && (candidates[k] as bigint) < end; k++) {
          const address = candidates[k] as bigint;
          const cidA = cidAt(a.index, address);
          const cidB = cidAt(b.index, address);
          if (cidA !== undefined || cidB !== undefined) visit(address, cidA, cidB);
        }
      } else {
        let i = lowerBound(a.index.addresses, start);
        let j = lowerBound(b.index.addresses, start);
        const nA = a.index.addresses.length;
        const nB = b.index.addresses.length;
        for (;;) {
          const addrA = i < nA && (a.index.addresses[i] as bigint) < end ? (a.index.addresses[i] as bigint) : undefined;
          const addrB = j < nB && (b.index.addresses[j] as bigint) < end ? (b.index.addresses[j] as bigint) : undefined;
          if (addrA === undefined && addrB === undefined) break;
          const address = addrA === undefined ? addrB! : addrB === undefined ? addrA : addrA < addrB ? addrA : addrB;
          visit(address, addrA === address ? (a.index.cids[i++] as number) : undefined, addrB === address ? (b.index.cids[j++] as number) : undefined);
        }
      }
    } finally {
      filesA.close();
      filesB.close();
    }
    d.unknownPages = pagesOfIntervals(unknown);
    if (status === 'changed' && d.changedPages === 0 && d.unknownPages === 0) d.status = 'same';
    return d;
  };

  for (const rb of b.regions) {
    const ra = byStartA.get(rb.start);
    if (ra === undefined) {
      regions.push(wholeSide(b, rb, 'added'));
      continue;
    }
    matched.add(ra);
    regions.push(compare(ra, rb, ra.end === rb.end ? 'changed' : 'resized'));
  }
  for (const ra of a.regions) if (!matched.has(ra)) regions.push(wholeSide(a, ra, 'removed'));
  regions.sort((x, y) => (x.start < y.start ? -1 : x.start > y.start ? 1 : 0));
  const totals = { changedPages: 0, changedBytes: 0, unknownPages: 0 };
  for (const r of regions) {
    totals.changedPages += r.changedPages;
    totals.changedBytes += r.changedBytes;
    totals.unknownPages += r.unknownPages;
  }
  const sideOf = (s: Side): SnapshotDiff['a'] => ({ id: s.summary.id, name: s.summary.name, pid: s.pid, createdAt: s.summary.createdAt });
  return { a: sideOf(a), b: sideOf(b), regions, totals, method: candidates === undefined ? 'hashes' : 'dirty-sets' };
}

/** Both pages of `address`, for a byte-level look (`diff --bytes`). */
export function pagesAt(store: Store, refA: string, refB: string, address: bigint): { a: Buffer; b: Buffer } {
  if (address % PAGE !== 0n) throw new WpsnapError('INVALID_ADDRESS', `0x${address.toString(16)} is not page-aligned`);
  const read = (ref: string): Buffer => {
    const s = store.find(ref);
    const process = store.processes(s.id)[0];
    if (process === undefined) throw new WpsnapError('USAGE', `snapshot ${s.id} holds no process`);
    const region = store.regions(process.processId).find((r) => r.start <= address && address < r.end);
    if (region === undefined) return ZERO_PAGE;
    const index = store.pageIndex(process.processId);
    const i = lowerBound(index.addresses, address);
    if (index.addresses[i] === address) return Buffer.from(store.content(index.cids[i] as number));
    if (!isFileBacked(region)) return ZERO_PAGE;
    const files = new FilePages(region);
    try {
      const page = files.page(address);
      if (page === undefined) throw new WpsnapError('USAGE', `the file behind 0x${address.toString(16)} in snapshot ${s.id} changed since: its page is not known`);
      return page;
    } finally {
      files.close();
    }
  };
  return { a: read(refA), b: read(refB) };
}
