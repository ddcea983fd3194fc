// Raw export: one file per captured region holding what a read of each address
// would have returned at T, plus manifest.json. Layout in FORMAT.md.
import { closeSync, ftruncateSync, openSync, readFileSync, renameSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { ExportDir, ioError, readAll } from './export-dir.js';
import type { SnapshotReader } from './reader.js';
import {
  formatAddress,
  formatSigmask,
  PAGE_SIZE,
  type LostRange,
  type LostReason,
  type ProcessState,
  type RegionCapture,
  type RegionRecord,
  type SnapshotState,
} from './model.js';

export const RAW_EXPORT_FORMAT = 'wpsnap-raw-export';
export const RAW_EXPORT_VERSION = 1;

export interface RawExportOptions {
  /** Export a snapshot that is not complete (running or incomplete); its unsaved pages read as zeros. */
  allowIncomplete?: boolean;
  /**
   * Checked between regions and between chunks of 256 pages: once aborted, the
   * export removes what it wrote and throws INTERRUPTED (exit 130).
   */
  signal?: AbortSignal;
}

export interface RawManifestLost {
  address: string;
  pages: number;
  reason: LostReason;
}

export interface RawManifestRegion {
  start: string;
  end: string;
  perms: string;
  offset: number;
  path: string;
  /** Relative path of the region's file in the export, or null for a skipped region. */
  file: string | null;
  capture: RegionCapture;
  skipReason?: string;
  lost: RawManifestLost[];
}

export interface RawManifestThread {
  tid: number;
  name: string;
  /** Blocked signals at T as 0x and 16 hex digits (bit n-1: signal n), null when not recorded. */
  sigmask: string | null;
}

export interface RawManifest {
  format: typeof RAW_EXPORT_FORMAT;
  version: number;
  snapshot: number;
  name: string | null;
  state: SnapshotState;
  processes: Array<{
    pid: number;
    threads: RawManifestThread[];
    regions: RawManifestRegion[];
    /** The process state a restore will need (FORMAT.md, "The process state"), null when not recorded. */
    state: ProcessState | null;
  }>;
}

export interface RawExportResult {
  snapshot: number;
  outDir: string;
  manifestPath: string;
  /** Region files written. */
  files: number;
  /** Sum of the region files' sizes (their apparent size: they are sparse). */
  bytes: number;
  /** Stored pages written. */
  pagesStored: number;
  /** Pages listed as lost in the manifest. */
  lostPages: number;
  manifest: RawManifest;
}

const CHUNK_PAGES = 256;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
const PAGE = BigInt(PAGE_SIZE);

/** Between chunks of work: let signal handlers run (they abort `signal`), then stop if aborted. */
type Checkpoint = () => Promise<void>;

export async function exportRaw(
  store: SnapshotReader,
  snapshotRef: string,
  outDir: string,
  options: RawExportOptions = {},
): Promise<RawExportResult> {
  const summary = store.find(snapshotRef);
  if (summary.state !== 'complete' && options.allowIncomplete !== true) {
    throw new WpsnapError(
      'SNAPSHOT_INCOMPLETE',
      `snapshot ${summary.id} is ${summary.state}, not complete; allow incomplete snapshots to export it anyway`,
    );
  }
  const interrupted = (): WpsnapError =>
    new WpsnapError('INTERRUPTED', `export of snapshot ${summary.id} to ${outDir} interrupted; nothing of it was left`);
  if (options.signal?.aborted === true) throw interrupted();
  const dir = ExportDir.prepare(outDir);
  const checkpoint: Checkpoint = async () => {
    if (options.signal === undefined) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
    if (options.signal.aborted) throw interrupted();
  };
  try {
    return await writeExport(store, summary, dir, checkpoint);
  } catch (error) {
    dir.discard();
    throw error;
  }
}

async function writeExport(
  store: SnapshotReader,
  summary: { id: number; name: string | null; state: SnapshotState },
  dir: ExportDir,
  checkpoint: Checkpoint,
): Promise<RawExportResult> {
  const outDir = dir.path;
  const manifest: RawManifest = {
    format: RAW_EXPORT_FORMAT,
    version: RAW_EXPORT_VERSION,
    snapshot: summary.id,
    name: summary.name,
    state: summary.state,
    processes: [],
  };
  const result: RawExportResult = {
    snapshot: summary.id,
    outDir,
    manifestPath: join(outDir, 'manifest.json'),
    files: 0,
    bytes: 0,
    pagesStored: 0,
    lostPages: 0,
    manifest,
  };
  for (const process of store.processes(summary.id)) {
    const lost = store.lost(process.processId);
    const regions: RawManifestRegion[] = [];
    let madeDir = false;
    for (const region of store.regions(process.processId)) {
      await checkpoint();
      const entry: RawManifestRegion = {
        start: formatAddress(region.start),
        end: formatAddress(region.end),
        perms: region.perms,
        offset: Number(region.offset),
        path: region.path,
        file: null,
        capture: region.capture,
        lost: [],
      };
      if (region.skipReason !== undefined) entry.skipReason = region.skipReason;
      const regionLost = clipLost(lost, region);
      if (region.capture !== 'skipped') {
        const relative = `${process.pid}/${region.start.toString(16)}-${region.end.toString(16)}.bin`;
        if (!madeDir) dir.makeDir(String(process.pid));
        madeDir = true;
        const fd = dir.openFile(relative);
        const written = await writeRegion(store, process.processId, region, regionLost, fd, checkpoint).finally(() => closeSync(fd));
        entry.file = relative;
        result.files++;
        result.bytes += Number(region.end - region.start);
        result.pagesStored += written.pagesStored;
        regionLost.push(...written.lost);
      }
      regionLost.sort((a, b) => (a.address < b.address ? -1 : a.address > b.address ? 1 : 0));
      entry.lost = regionLost.map((l) => ({ address: formatAddress(l.address), pages: l.pages, reason: l.reason }));
      for (const l of regionLost) result.lostPages += l.pages;
      regions.push(entry);
    }
    const threads = store.threads(process.processId).map((t) => ({ tid: t.tid, name: t.name, sigmask: formatSigmask(t.sigmask) }));
    manifest.processes.push({ pid: process.pid, threads, regions, state: store.processState?.(process.processId) ?? null });
  }
  await checkpoint();
  // Written last, via rename: a directory without manifest.json is not an export.
  const fd = dir.openFile('manifest.json.tmp');
  try {
    writeAll(fd, Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`), 0);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(join(outDir, 'manifest.json.tmp'), result.manifestPath);
  } catch (error) {
    throw ioError(error, `rename ${result.manifestPath}`);
  }
  return result;
}

/** The store's lost ranges that overlap the region, clipped to it. */
function clipLost(lost: LostRange[], region: RegionRecord): LostRange[] {
  const clipped: LostRange[] = [];
  for (const l of lost) {
    const start = l.address > region.start ? l.address : region.start;
    const lostEnd = l.address + BigInt(l.pages) * PAGE;
    const end = lostEnd < region.end ? lostEnd : region.end;
    if (start < end) clipped.push({ address: start, pages: Number((end - start) / PAGE), reason: l.reason });
  }
  return clipped;
}

/** Does the file still have the identity recorded at T? */
export function fileUnchanged(region: RegionRecord): boolean {
  const file = region.file;
  if (file === undefined) return false;
  try {
    const now = statSync(file.path, { bigint: true });
    return (
      now.isFile() &&
      now.dev === BigInt(file.dev) &&
      now.ino === BigInt(file.ino) &&
      now.size === BigInt(file.size) &&
      now.mtimeNs.toString() === file.mtimeNs
    );
  } catch {
    return false;
  }
}

/**
 * Write one region file (`fd`): sparse, `end - start` bytes. Returns the
 * stored pages written and any extra lost ranges ('file-changed').
 */
async function writeRegion(
  store: SnapshotReader,
  processId: number,
  region: RegionRecord,
  lost: LostRange[],
  fd: number,
  checkpoint: Checkpoint,
): Promise<{ pagesStored: number; lost: LostRange[] }> {
  const size = region.end - region.start;
  const pageCount = Number(size / PAGE);
  ftruncateSync(fd, Number(size));
  const isLost = lostMask(lost, region, pageCount);
  let pagesStored = 0;
  const fileBacked = region.capture === 'file-private' || region.capture === 'file-reference';
  const fileOk = fileBacked && fileUnchanged(region);
  const stored = new Set<number>();
  for (const page of store.pagesInRange(processId, region.start, region.end)) {
    const index = Number((page.address - region.start) / PAGE);
    // Stored, then listed lost (a shared file found changed after the copy): lost pages read as zeros.
    if (isLost[index] === 1) continue;
    writeAll(fd, page.data, index * PAGE_SIZE);
    stored.add(index);
    if (++pagesStored % CHUNK_PAGES === 0) await checkpoint();
  }
  const extraLost: LostRange[] = [];
  if (!fileBacked) return { pagesStored, lost: extraLost };

  // Pages of the file that lie inside the region (beyond the end of the file: zeros).
  const fileSize = BigInt(region.file?.size ?? 0);
  const filePages = fileSize > region.offset ? Number((fileSize - region.offset + PAGE - 1n) / PAGE) : 0;
  const backed = Math.min(pageCount, filePages);
  if (!fileOk) {
    let runStart = -1;
    for (let i = 0; i <= backed; i++) {
      const missing = i < backed && !stored.has(i) && isLost[i] !== 1;
      if (missing && runStart < 0) runStart = i;
      if (!missing && runStart >= 0) {
        extraLost.push({ address: region.start + BigInt(runStart) * PAGE, pages: i - runStart, reason: 'file-changed' });
        runStart = -1;
      }
    }
    return { pagesStored, lost: extraLost };
  }
  const source = openSync((region.file as { path: string }).path, 'r');
  try {
    const chunk = Buffer.alloc(CHUNK_PAGES * PAGE_SIZE);
    for (let first = 0; first < backed; first += CHUNK_PAGES) {
      if (first > 0) await checkpoint();
      const count = Math.min(CHUNK_PAGES, backed - first);
      const want = count * PAGE_SIZE;
      const got = readAll(source, chunk.subarray(0, want), region.offset + BigInt(first) * PAGE);
      chunk.fill(0, got, want);
      for (let k = 0; k < count; k++) {
        const i = first + k;
        if (stored.has(i) || isLost[i] === 1) continue; // the saved copy-on-write page wins; lost pages read as zeros
        const page = chunk.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
        if (!page.equals(ZERO_PAGE)) writeAll(fd, page, i * PAGE_SIZE);
      }
    }
  } finally {
    closeSync(source);
  }
  return { pagesStored, lost: extraLost };
}

function lostMask(lost: LostRange[], region: RegionRecord, pageCount: number): Uint8Array {
  const mask = new Uint8Array(pageCount);
  for (const l of lost) {
    const first = Number((l.address - region.start) / PAGE);
    mask.fill(1, Math.max(0, first), Math.min(pageCount, first + l.pages));
  }
  return mask;
}

function writeAll(fd: number, data: Buffer, position: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fd, data, done, data.length - done, position + done);
}

/** Read a raw export's manifest (for tools and tests). */
export function readRawManifest(outDir: string): RawManifest {
  const manifest = JSON.parse(readFileSync(join(outDir, 'manifest.json'), 'utf8')) as RawManifest;
  if (manifest.format !== RAW_EXPORT_FORMAT || manifest.version > RAW_EXPORT_VERSION) {
    throw new WpsnapError('NOT_A_RAW_EXPORT', `${outDir}/manifest.json is not a raw export this wpsnap can read`);
  }
  return manifest;
}
