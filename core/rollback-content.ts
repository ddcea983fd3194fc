// A rollback's memory: T's content of the target's regions (stored pages,
// the file's for private file mappings never copied, zeros), compared with
// the target's and written back in batches (process_vm_writev, and
// /proc/PID/mem for pages that are not writable).
import { closeSync, openSync } from 'node:fs';
import { PAGE_SIZE, type RegionRecord } from '../snapshot-format/model.js';
import { readAll } from '../snapshot-format/export-dir.js';
import type { Store } from '../store/store.js';
import { intersect, type Intervals } from './intervals.js';
import type { NativeBinding } from './native/binding.js';

/** Bytes of the target read (and compared) at a time. */
const CHUNK = 4 << 20;
const PAGE = BigInt(PAGE_SIZE);

/** Runs of one page each, [address, 4096, offset] triples, the k-th page at offset k × 4096 of its buffer. */
function pageRuns(addresses: bigint[]): BigUint64Array {
  const runs = new BigUint64Array(addresses.length * 3);
  addresses.forEach((address, k) => {
    runs[3 * k] = address;
    runs[3 * k + 1] = PAGE;
    runs[3 * k + 2] = BigInt(k * PAGE_SIZE);
  });
  return runs;
}

/** Which regions' content is compared and written back. */
export function hasContent(r: RegionRecord): boolean {
  return (r.capture === 'protected' || r.capture === 'copied' || r.capture === 'file-private') && r.perms[0] === 'r';
}

/** A region's content at T, a chunk at a time: its stored pages, the file's (file-private), or zero. */
export class ContentAtT {
  private fileFd: number | undefined;

  constructor(
    private readonly store: Store,
    private readonly processId: number,
    readonly region: RegionRecord,
  ) {
    if (region.capture === 'file-private' && region.file !== undefined) this.fileFd = openSync(region.file.path, 'r');
  }

  /** T's content of [start, start + into.length) into `into`; `stored[i]` set for each page T stored. */
  fill(start: bigint, into: Buffer, stored?: Uint8Array): void {
    into.fill(0);
    const r = this.region;
    if (this.fileFd !== undefined && r.file !== undefined) {
      const fileOffset = r.offset + (start - r.start);
      const fileEnd = BigInt(r.file.size);
      if (fileOffset < fileEnd) {
        const want = Number(fileEnd - fileOffset < BigInt(into.length) ? fileEnd - fileOffset : BigInt(into.length));
        readAll(this.fileFd, into.subarray(0, want), fileOffset);
      }
    }
    this.store.readRangeInto(this.processId, start, into, stored);
  }

  close(): void {
    if (this.fileFd !== undefined) closeSync(this.fileFd);
  }
}

/** pagemap: the page is in the page cache (a private file page never copied on write), or swapped. */
const PM_FILE = 1n << 61n;
const PM_SWAP = 1n << 62n;
const PM_PRESENT = 1n << 63n;

/**
 * Pages of a private file mapping that read the file's content now and at T,
 * which need no comparing: no copy stored at T (it was the file's, the file
 * unchanged since), and now still the page cache's page, or not there and
 * not swapped (a read brings the file's in). Only copied-on-write pages are
 * compared: a library's text and data are most of a small program's pages.
 * `storedAtT` lists, per page of [at, at + len), whether T has a copy.
 */
function sameAsFile(binding: NativeBinding, pid: number, r: RegionRecord, at: bigint, len: number, storedAtT: (page: bigint) => boolean): Uint8Array {
  const same = new Uint8Array(len / PAGE_SIZE);
  if (r.capture !== 'file-private') return same;
  const entries = binding.readPagemap(pid, at, len / PAGE_SIZE);
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i]!;
    same[i] = (e & PM_PRESENT) !== 0n ? ((e & PM_FILE) !== 0n ? 1 : 0) : (e & PM_SWAP) === 0n ? 1 : 0;
    if (same[i] === 1 && storedAtT(at + BigInt(i) * PAGE)) same[i] = 0;
  }
  return same;
}

export interface Rewritten {
  pagesWritten: number;
  pagesCompared: number;
}

/**
 * Full rollback: every page of `regions` compared with T's, written back
 * where it differs. A chunk at a time: the target's pages read in one call
 * (on another thread, while T's content of the chunk is filled from the
 * store without a Buffer per page), compared natively, and those that
 * differ written in one call.
 */
export async function compareAndRewrite(binding: NativeBinding, pid: number, mem: number, store: Store, processId: number, regions: RegionRecord[]): Promise<Rewritten> {
  const chunks: Array<{ region: RegionRecord; at: bigint; len: number }> = [];
  for (const region of regions) {
    for (let at = region.start; at < region.end; at += BigInt(CHUNK)) chunks.push({ region, at, len: Number(region.end - at < BigInt(CHUNK) ? region.end - at : BigInt(CHUNK)) });
  }
  // Private file mappings are read only where a page differs from the file (pagemap first): never ahead.
  const readAhead = (k: number): Promise<void> | undefined => {
    const c = chunks[k];
    if (c === undefined || c.region.capture === 'file-private') return undefined;
    return binding.readRunsAsync(pid, mem, BigUint64Array.of(c.at, BigInt(c.len), 0n), nowBuffers[k % 2]!.subarray(0, c.len));
  };
  const nowBuffers = [Buffer.allocUnsafe(CHUNK), Buffer.allocUnsafe(CHUNK)];
  const then = Buffer.allocUnsafe(CHUNK);
  const stored = new Uint8Array(CHUNK / PAGE_SIZE);
  let content: ContentAtT | undefined; // of one region at a time
  let pagesWritten = 0;
  let pagesCompared = 0;
  let reading = readAhead(0);
  try {
    for (let k = 0; k < chunks.length; k++) {
      const { region: r, at, len } = chunks[k]!;
      if (content?.region !== r) {
        content?.close();
        content = new ContentAtT(store, processId, r);
      }
      const wanted = then.subarray(0, len);
      stored.fill(0);
      content.fill(at, wanted, stored);
      const skip = sameAsFile(binding, pid, r, at, len, (page) => stored[Number((page - at) / PAGE)] === 1);
      let toCompare = len / PAGE_SIZE;
      for (let i = 0; i < len / PAGE_SIZE; i++) toCompare -= skip[i]!;
      const current = nowBuffers[k % 2]!.subarray(0, len);
      if (reading !== undefined) await reading;
      else if (toCompare > 0) binding.readRuns(pid, mem, BigUint64Array.of(at, BigInt(len), 0n), current);
      reading = readAhead(k + 1);
      if (toCompare === 0) continue;
      pagesCompared += toCompare;
      const differing = binding.differingPages(current, wanted, skip);
      if (differing.length === 0) continue;
      const runs = new BigUint64Array(differing.length * 3);
      differing.forEach((i, n) => runs.set([at + BigInt(i) * PAGE, PAGE, BigInt(i * PAGE_SIZE)], 3 * n)); // from `wanted` at the page's own offset
      binding.writeRuns(pid, mem, runs, wanted);
      pagesWritten += differing.length;
    }
  } finally {
    await reading?.catch(() => undefined); // never leave a read into our buffers running
    content?.close();
  }
  return { pagesWritten, pagesCompared };
}

/** T's content of some page runs, written back whole at every rollback. */
export class Rewrite {
  constructor(
    /** [address, length, offset into data] triples. */
    private readonly runs: BigUint64Array,
    private readonly data: Buffer,
  ) {}

  get pages(): number {
    return this.data.length / PAGE_SIZE;
  }

  /** Write it into the target's memory (`mem`: its /proc/PID/mem, for read-only pages); returns the pages written. */
  write(binding: NativeBinding, pid: number, mem: number): number {
    if (this.runs.length > 0) binding.writeRuns(pid, mem, this.runs, this.data);
    return this.pages;
  }
}

/** A region part's content at T, kept: the whole part, and the pages T stored a copy of. */
interface CachedPart {
  region: RegionRecord;
  content: Buffer;
  stored: Set<bigint>;
}

/** T's content of the page at `address`, in one of `parts`. */
function contentAt(parts: CachedPart[], address: bigint): Buffer {
  const p = parts.find((c) => c.region.start <= address && address < c.region.end)!;
  const off = Number(address - p.region.start);
  return p.content.subarray(off, off + PAGE_SIZE);
}

/** Past this many bytes, a session keeps no copy of T's content of what no fault tells about (it is read from the store each time). */
const UNTRACKED_CACHE_BYTES = 256 << 20;

/**
 * T's content, kept in memory for rollbacks again and again to one instant:
 * the pages rewritten each time (read from the store once), and the whole of
 * the small regions compared each time (what no fault tells about: private
 * file mappings' copies, shared memory).
 */
export class ContentCache {
  /** Page number → T's content of the page. */
  private readonly pages = new Map<number, Buffer>();
  /** "start-end" of a region part → T's content of the part, and the pages T stored. */
  private readonly parts = new Map<string, CachedPart | null>();
  private partBytes = 0;

  constructor(
    private readonly store: Store,
    private readonly processId: number,
  ) {}

  /**
   * T's content of `ranges` (inside `regions`), ready to be written back
   * whole, again and again: a page is read from the store the first time only.
   */
  prepareRewrite(regions: RegionRecord[], ranges: Intervals): Rewrite {
    const runs: bigint[] = [];
    const chunks: Buffer[] = [];
    let offset = 0;
    for (const r of regions) {
      const inside = intersect(ranges, [[r.start, r.end]]);
      if (inside.length === 0) continue; // most regions
      let content: ContentAtT | undefined;
      try {
        for (const [s, e] of inside) {
          // A run with a page not read yet is read whole, in one fill; its pages are kept.
          const first = Number(s / PAGE);
          const count = Number((e - s) / PAGE);
          let missing = false;
          for (let i = 0; i < count && !missing; i++) missing = !this.pages.has(first + i);
          if (missing) {
            content ??= new ContentAtT(this.store, this.processId, r);
            const run = Buffer.allocUnsafe(count * PAGE_SIZE);
            content.fill(s, run);
            for (let i = 0; i < count; i++) if (!this.pages.has(first + i)) this.pages.set(first + i, run.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
          }
          for (let i = 0; i < count; i++) chunks.push(this.pages.get(first + i)!);
          runs.push(s, e - s, BigInt(offset));
          offset += Number(e - s);
        }
      } finally {
        content?.close();
      }
    }
    return new Rewrite(BigUint64Array.from(runs), Buffer.concat(chunks, offset));
  }

  /**
   * Compare `parts` (regions or parts of regions, offsets adjusted) with T's
   * and write back the pages that differ. Parts up to a quarter GiB in all
   * are kept in memory after the first time. Of a private file mapping only
   * the pages copied on write (or swapped) now, and those T had a copy of,
   * are compared: the others read the file, unchanged since T.
   */
  async compare(binding: NativeBinding, pid: number, mem: number, parts: RegionRecord[]): Promise<Rewritten> {
    const large: RegionRecord[] = [];
    const cached: CachedPart[] = [];
    for (const r of parts) {
      const part = this.part(r);
      if (part === null) large.push(r);
      else cached.push(part);
    }
    // Every page to compare: its address, T's content, and (when already read) the target's now.
    const pages: Array<{ address: bigint; wanted: Buffer; now: Buffer | undefined }> = [];
    const filePrivate = cached.filter((p) => p.region.capture === 'file-private');
    if (filePrivate.length > 0) {
      const cow = binding.copyPrivatePages(pid, BigUint64Array.from(filePrivate.flatMap((p) => [p.region.start, p.region.end, 0n])));
      const seen = new Set<bigint>();
      cow.addresses.forEach((address, k) => {
        seen.add(address);
        pages.push({ address, wanted: contentAt(filePrivate, address), now: cow.data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE) });
      });
      for (const p of filePrivate) for (const address of p.stored) if (!seen.has(address)) pages.push({ address, wanted: contentAt([p], address), now: undefined });
    }
    for (const p of cached) {
      if (p.region.capture === 'file-private') continue;
      for (let at = p.region.start; at < p.region.end; at += PAGE) pages.push({ address: at, wanted: contentAt([p], at), now: undefined });
    }
    // The pages not read yet, read in one call.
    const unread = pages.filter((p) => p.now === undefined);
    if (unread.length > 0) {
      const into = Buffer.allocUnsafe(unread.length * PAGE_SIZE);
      binding.readRuns(pid, mem, pageRuns(unread.map((p) => p.address)), into);
      unread.forEach((p, k) => (p.now = into.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)));
    }
    const differing = pages.filter((p) => !p.now!.equals(p.wanted));
    if (differing.length > 0) {
      binding.writeRuns(pid, mem, pageRuns(differing.map((p) => p.address)), Buffer.concat(differing.map((p) => p.wanted)));
    }
    let pagesWritten = differing.length;
    let pagesCompared = pages.length;
    if (large.length > 0) {
      const rest = await compareAndRewrite(binding, pid, mem, this.store, this.processId, large);
      pagesWritten += rest.pagesWritten;
      pagesCompared += rest.pagesCompared;
    }
    return { pagesWritten, pagesCompared };
  }

  /** A part's content at T, read once; null past the budget. */
  private part(r: RegionRecord): CachedPart | null {
    const key = `${r.start}-${r.end}`;
    const known = this.parts.get(key);
    if (known !== undefined) return known;
    const len = Number(r.end - r.start);
    if (this.partBytes + len > UNTRACKED_CACHE_BYTES) {
      this.parts.set(key, null);
      return null;
    }
    const content = Buffer.alloc(len);
    const storedMask = new Uint8Array(len / PAGE_SIZE);
    const reader = new ContentAtT(this.store, this.processId, r);
    try {
      reader.fill(r.start, content, storedMask);
    } finally {
      reader.close();
    }
    const stored = new Set<bigint>();
    storedMask.forEach((isStored, i) => isStored === 1 && stored.add(r.start + BigInt(i) * PAGE));
    this.partBytes += len;
    const entry = { region: r, content, stored };
    this.parts.set(key, entry);
    return entry;
  }
}
