// Core export: one process of a snapshot as an ELF core file gdb opens
// (`gdb <exe> <core>`), made from the snapshot alone: the target is never
// touched. Layout and notes: elf-core.ts; which regions carry content:
// dumpPlan() below, after the kernel's default coredump_filter.
//
// The file is written region by region, a window of pages at a time (a
// region's stored pages come from the reader in address order), through
// core-file.ts: 0600 whatever the umask, under a temporary name renamed into
// place only once complete, so a failed or interrupted export leaves nothing.
import { closeSync, openSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { CoreFile, type FileWriter } from './core-file.js';
import {
  coreLayout,
  encodeHeaders,
  encodeNotes,
  fileNote,
  FPREGS_BYTES,
  NT_AUXV,
  NT_FILE,
  NT_PRFPREG,
  NT_PRPSINFO,
  NT_PRSTATUS,
  NT_SIGINFO,
  NT_X86_XSTATE,
  prPsInfo,
  prStatus,
  segmentFlags,
  sigInfo,
  type ElfNote,
  type FileMapping,
  type LoadSegment,
  xstateForCore,
} from './elf-core.js';
import { ioError, readAll } from './export-dir.js';
import { fileUnchanged } from './export-raw.js';
import { PAGE_SIZE, type LostRange, type ProcessRecord, type RegionRecord, type SnapshotState, type ThreadRecord } from './model.js';
import type { SnapshotReader } from './reader.js';
import { USER_REGS_BYTES } from './regs-x86_64.js';

export interface CoreExportOptions {
  /** The process to export; required when the snapshot holds more than one. */
  pid?: number;
  /** Every region's content, not only what the default coredump_filter (0x33) keeps. */
  all?: boolean;
  /** Replace an existing file at the destination. */
  force?: boolean;
  /** Export a snapshot that is not complete; its unsaved pages read as zeros. */
  allowIncomplete?: boolean;
  /** Checked between regions and every 256 pages: once aborted, the export removes what it wrote and throws INTERRUPTED. */
  signal?: AbortSignal;
}

export interface CoreExportResult {
  /** The snapshot's id. */
  id: number;
  pid: number;
  /** Where the core file is (absolute). */
  path: string;
  /** Its size. */
  bytes: number;
  /** PT_LOAD segments: one per region of the process. */
  segments: number;
  /** Threads (one NT_PRSTATUS each). */
  threads: number;
  /** The process's executable at T: `gdb <exe> <path>` opens the core. */
  exe: string;
  /** Segments whose content the file holds (the others have p_filesz 0). */
  segmentsWithContent: number;
  /** Pages inside segments with content that read as zero because their content at T is unknown. */
  lostPages: number;
  /** What the core holds differently from the process at T, one line each. */
  warnings: string[];
  state: SnapshotState;
}

const CHUNK_PAGES = 256;
const PAGE = BigInt(PAGE_SIZE);
const ELF_MAGIC = Buffer.from('\x7fELF', 'latin1');

type Checkpoint = () => Promise<void>;

/** What of a region the core holds, the way the kernel's vma_dump_size() decides with coredump_filter 0x33. */
export type DumpPlan =
  /** Its whole content (zero pages as holes); without --all, one with no stored page and no file behind it gets p_filesz 0 (all zero at T). */
  | 'whole'
  /** Whole if it was written (it has stored copy-on-write pages), else only its first page if it maps offset 0 of an executable or ELF file. */
  | 'written-or-header'
  /** Nothing (p_filesz 0): gdb reads such addresses from the mapped file, or as zeros. */
  | 'none';

export function isFileBacked(region: RegionRecord): boolean {
  return region.inode !== 0;
}

/**
 * Per region, after the kernel's vma_dump_size() with the default
 * coredump_filter 0x33 (anonymous private and shared, ELF headers, hugetlb
 * private): special mappings ([vdso]) always; hugetlb private yes, shared no;
 * shared mappings only of a file with no name left (memfd, SysV, MAP_SHARED
 * anonymous: "(deleted)"); anonymous private yes; a private file mapping if
 * it was written (the kernel's anon_vma: here, it has stored copy-on-write
 * pages), else its first page if it maps offset 0 of an executable or ELF
 * file (the kernel's ELF_HEADERS bit). --all takes
 * every region. A region not captured ('skipped') has no content to give.
 */
export function dumpPlan(region: RegionRecord, all: boolean): DumpPlan {
  if (region.capture === 'skipped') return 'none';
  if (all) return 'whole';
  if (region.path === '[vdso]' || region.path === '[vsyscall]') return 'whole';
  const shared = region.perms[3] === 's';
  if (region.pageSize > PAGE_SIZE) return shared ? 'none' : 'whole';
  if (shared) return !isFileBacked(region) || region.path.endsWith(' (deleted)') ? 'whole' : 'none';
  if (!isFileBacked(region)) return 'whole';
  if (region.capture === 'copied') return 'whole'; // no file to read it from: what was copied is all there is
  return 'written-or-header';
}

export async function exportCore(store: SnapshotReader, snapshotRef: string, outPath: string, options: CoreExportOptions = {}): Promise<CoreExportResult> {
  const summary = store.find(snapshotRef);
  if (summary.state !== 'complete' && options.allowIncomplete !== true) {
    throw new WpsnapError('SNAPSHOT_INCOMPLETE', `snapshot ${summary.id} is ${summary.state}, not complete; allow incomplete snapshots to export it anyway`);
  }
  const target = pickProcess(store.processes(summary.id), summary.id, options.pid);
  const interrupted = (): WpsnapError => new WpsnapError('INTERRUPTED', `export of snapshot ${summary.id} to ${outPath} interrupted; nothing of it was left`);
  if (options.signal?.aborted === true) throw interrupted();
  const checkpoint: Checkpoint = async () => {
    if (options.signal === undefined) return;
    await new Promise<void>((done) => setImmediate(done));
    if (options.signal.aborted) throw interrupted();
  };

  const file = CoreFile.create(resolve(outPath), options.force === true, CHUNK_PAGES * PAGE_SIZE);
  try {
    const written = await writeCore(store, target, options.all === true, file, checkpoint);
    await file.commit();
    return {
      id: summary.id,
      pid: target.pid,
      path: file.path,
      bytes: written.bytes,
      segments: written.segments,
      threads: written.threads,
      exe: target.exe,
      segmentsWithContent: written.segmentsWithContent,
      lostPages: written.lostPages,
      warnings: written.warnings,
      state: summary.state,
    };
  } catch (error) {
    await file.discard();
    throw error;
  }
}

function pickProcess<P extends ProcessRecord>(processes: P[], id: number, pid: number | undefined): P {
  const pids = processes.map((p) => p.pid).join(', ');
  if (pid !== undefined) {
    const found = processes.find((p) => p.pid === pid);
    if (found === undefined) {
      throw new WpsnapError('PROCESS_NOT_IN_SNAPSHOT', `snapshot ${id} holds no pid ${pid}: its ${processes.length === 1 ? 'process is' : 'processes are'} ${pids || 'none'}`);
    }
    return found;
  }
  if (processes.length === 1) return processes[0]!;
  if (processes.length === 0) throw new WpsnapError('PROCESS_NOT_IN_SNAPSHOT', `snapshot ${id} holds no process`);
  throw new WpsnapError('PROCESS_AMBIGUOUS', `snapshot ${id} holds ${processes.length} processes (pids ${pids}): name one with --pid`);
}

interface Written {
  bytes: number;
  segments: number;
  segmentsWithContent: number;
  threads: number;
  lostPages: number;
  warnings: string[];
}

async function writeCore(
  store: SnapshotReader,
  target: ProcessRecord & { processId: number },
  all: boolean,
  file: CoreFile,
  checkpoint: Checkpoint,
): Promise<Written> {
  const out = file.writer;
  const regions = store.regions(target.processId);
  const lost = store.lost(target.processId);
  const threads = orderThreads(store.threads(target.processId), target.pid);
  const warnings: string[] = [];
  const notes = encodeNotes(processNotes(target, threads, regions, warnings));
  const layout = coreLayout(regions.length, notes.length);

  const segments: LoadSegment[] = [];
  let offset = layout.dataOffset;
  let lostPages = 0;
  const lostReasons = new Set<string>();
  const changedFiles = new Set<string>();
  for (const region of regions) {
    await checkpoint();
    const regionLost = lostMask(lost, region);
    const content = await writeRegion(store, target.processId, region, dumpPlan(region, all), all, regionLost, out, offset, checkpoint);
    if (content.filesz > 0) {
      for (const l of lost) if (overlaps(l, region)) lostReasons.add(l.reason);
      lostPages += countLost(regionLost, content.filesz / PAGE_SIZE) + content.fileChangedPages;
      if (content.fileChangedPages > 0) changedFiles.add(region.path);
    }
    segments.push({ vaddr: region.start, memsz: region.end - region.start, filesz: content.filesz, offset, flags: segmentFlags(region.perms) });
    offset += content.filesz;
  }
  if (lostPages > 0) {
    const why = [...lostReasons].join(', ');
    warnings.push(`${lostPages} pages read as zero in the core: their content at T is not in the snapshot${why ? ` (${why})` : ''}${changedFiles.size > 0 ? `; changed since T: ${[...changedFiles].join(', ')}` : ''}`);
  }
  await out.drain();
  await checkpoint();

  const { headers, sectionHeader } = encodeHeaders(layout, segments, offset);
  let end = offset;
  if (sectionHeader !== null) {
    file.writeAt(sectionHeader, offset);
    end += sectionHeader.length;
  }
  file.truncate(end); // trailing zero pages are holes: the file must still reach them
  file.writeAt(headers, 0);
  file.writeAt(notes, layout.notesOffset);
  return {
    bytes: end,
    segments: segments.length,
    segmentsWithContent: segments.filter((s) => s.filesz > 0).length,
    threads: threads.length,
    lostPages,
    warnings,
  };
}

/** The kernel's order: the main thread (tid = pid) first, then the others as the snapshot lists them. */
function orderThreads(threads: ThreadRecord[], pid: number): ThreadRecord[] {
  const main = threads.filter((t) => t.tid === pid);
  return [...main, ...threads.filter((t) => t.tid !== pid)];
}

function processNotes(target: ProcessRecord, threads: ThreadRecord[], regions: RegionRecord[], warnings: string[]): ElfNote[] {
  const mappings: FileMapping[] = regions.filter(isFileBacked).map((r) => ({ start: r.start, end: r.end, offset: r.offset, path: r.path }));
  const processWide: ElfNote[] = [
    {
      name: 'CORE',
      type: NT_PRPSINFO,
      desc: prPsInfo({
        // The state at T is not recorded: it was running (a snapshot is no crash).
        state: 'R',
        nice: 0,
        uid: target.uid,
        gid: target.gid,
        pid: target.pid,
        ppid: target.ppid,
        pgrp: 0,
        sid: 0,
        fname: target.comm,
        psargs: target.cmdline.join(' '),
      }),
    },
    { name: 'CORE', type: NT_SIGINFO, desc: sigInfo(0) },
    { name: 'CORE', type: NT_AUXV, desc: target.auxv },
    { name: 'CORE', type: NT_FILE, desc: fileNote(mappings) },
  ];
  const notes: ElfNote[] = [];
  let missingRegs = 0;
  const shortXstate = new Map<string, number[]>();
  const badXstate: number[] = [];
  threads.forEach((t, i) => {
    let regs = t.regs;
    if (regs.length !== USER_REGS_BYTES) {
      missingRegs++;
      regs = Buffer.alloc(USER_REGS_BYTES);
    }
    const fpValid = t.fpregs.length === FPREGS_BYTES;
    // No signal made this core: pr_cursig and si_signo are 0 (gdb says no "terminated with signal").
    notes.push({ name: 'CORE', type: NT_PRSTATUS, desc: prStatus({ signal: 0, tid: t.tid, ppid: target.ppid, pgrp: 0, sid: 0, sigHold: t.sigmask, regs, fpValid }) });
    if (i === 0) notes.push(...processWide);
    else notes.push({ name: 'CORE', type: NT_SIGINFO, desc: sigInfo(0) });
    if (fpValid) notes.push({ name: 'CORE', type: NT_PRFPREG, desc: t.fpregs });
    if (t.xstate.length > 0) {
      const xstate = xstateForCore(t.xstate);
      if (xstate === null) {
        badXstate.push(t.tid);
        return;
      }
      if (xstate.cut.length > 0) {
        const key = `${t.xstate.length} of ${xstate.desc.length} bytes; ${xstate.cut.join(', ')}`;
        shortXstate.set(key, [...(shortXstate.get(key) ?? []), t.tid]);
      }
      notes.push({ name: 'LINUX', type: NT_X86_XSTATE, desc: xstate.desc });
    }
  });
  if (badXstate.length > 0) {
    warnings.push(`the XSAVE state of thread${badXstate.length > 1 ? 's' : ''} ${badXstate.join(', ')} is not one gdb can lay out (its XCR0): left out, the FXSAVE registers stand`);
  }
  for (const [what, tids] of shortXstate) {
    warnings.push(`the snapshot kept the XSAVE state of thread${tids.length > 1 ? 's' : ''} ${tids.join(', ')} short (${what}): what is missing reads as zero in the core`);
  }
  if (threads.length === 0) {
    notes.push(...processWide);
    warnings.push('the snapshot holds no thread of this process: the core has no registers');
  }
  if (missingRegs > 0) warnings.push(`${missingRegs} threads have no registers in the snapshot: they read as zero`);
  return notes;
}

/** Where a segment's pages come from when not stored: the mapped file, read from `fd`, for its first `pages` pages. */
interface FileSource {
  fd: number;
  pages: number;
}

/**
 * Write one region's segment at `base`: returns p_filesz (0 when it has no
 * content to give) and the pages of a referenced file that changed since T
 * (they stay zero). The segment is built CHUNK_PAGES pages at a time in a
 * buffer of the writer's: the file's content (when it backs the region),
 * overlaid with the stored pages, lost pages zeroed; a window with nothing in
 * it is skipped (a hole), and only the part of a window from its first to its
 * last page with content is written.
 */
async function writeRegion(
  store: SnapshotReader,
  processId: number,
  region: RegionRecord,
  plan: DumpPlan,
  all: boolean,
  isLost: Uint8Array,
  out: FileWriter,
  base: number,
  checkpoint: Checkpoint,
): Promise<{ filesz: number; fileChangedPages: number }> {
  if (plan === 'none') return { filesz: 0, fileChangedPages: 0 };
  const pageCount = isLost.length;
  const pages = store.pageViewsInRange(processId, region.start, region.end)[Symbol.iterator](); // each copied before the next step
  let next = pages.next();
  const fileBacked = region.capture === 'file-private' || region.capture === 'file-reference';
  // The segment's pages: the whole region, its ELF header page, or none.
  let length: number;
  if (!next.done) length = pageCount;
  else if (plan === 'whole') length = fileBacked || all ? pageCount : 0; // nothing stored: the file's content, holes (--all), or nothing
  else {
    // A private file mapping never written since it was mapped: the kernel keeps only an ELF header page.
    const header = region.offset === 0n && region.perms[0] === 'r' && fileBacked && fileUnchanged(region) && startsElfOrExecutable(region);
    length = header ? 1 : 0;
  }
  if (length === 0) return { filesz: 0, fileChangedPages: 0 };

  // Pages of the file inside the segment (past its end the mapping reads zeros).
  const fileSize = BigInt(region.file?.size ?? 0);
  const backed = !fileBacked ? 0 : Math.min(length, fileSize > region.offset ? Number((fileSize - region.offset + PAGE - 1n) / PAGE) : 0);
  let source: FileSource | null = null;
  let fileChangedPages = 0;
  if (backed > 0) {
    if (fileUnchanged(region)) {
      try {
        source = { fd: openSync((region.file as { path: string }).path, 'r'), pages: backed };
      } catch (error) {
        throw ioError(error, `open ${region.path}`);
      }
    } else {
      for (let i = 0; i < backed; i++) fileChangedPages += isLost[i] === 1 ? 0 : 1; // minus the stored ones, below
    }
  }
  const anyLost = isLost.includes(1);
  try {
    for (let window = 0; window < length; ) {
      if (source === null || window >= source.pages) {
        // No file content here: go to the window of the next stored page.
        if (next.done) break;
        const index = Number((next.value.address - region.start) / PAGE);
        if (index >= length) break;
        window = index - (index % CHUNK_PAGES);
      }
      const count = Math.min(CHUNK_PAGES, length - window);
      const buf = out.take();
      let lo = count;
      let hi = -1;
      if (source !== null && window < source.pages) {
        const fromFile = Math.min(count, source.pages - window) * PAGE_SIZE;
        const got = readAll(source.fd, buf.subarray(0, fromFile), region.offset + BigInt(window) * PAGE);
        buf.fill(0, got, count * PAGE_SIZE);
        lo = 0;
        hi = Math.ceil(got / PAGE_SIZE) - 1;
      } else {
        buf.fill(0, 0, count * PAGE_SIZE);
      }
      for (; !next.done; next = pages.next()) {
        const index = Number((next.value.address - region.start) / PAGE);
        if (index >= window + count) break;
        const k = index - window;
        next.value.data.copy(buf, k * PAGE_SIZE);
        if (k < lo) lo = k;
        if (k > hi) hi = k;
        if (index < backed && source === null && isLost[index] !== 1) fileChangedPages--;
      }
      if (anyLost) {
        // Lost pages read as zero, whatever was kept of them.
        for (let k = 0; k < count; k++) if (isLost[window + k] === 1) buf.fill(0, k * PAGE_SIZE, (k + 1) * PAGE_SIZE);
      }
      if (hi >= lo) out.write(buf, lo * PAGE_SIZE, (hi + 1) * PAGE_SIZE, base + (window + lo) * PAGE_SIZE);
      else out.give(buf);
      window += count;
      if (out.busy) await out.pace();
      await checkpoint();
    }
  } finally {
    if (source !== null) closeSync(source.fd);
  }
  return { filesz: length * PAGE_SIZE, fileChangedPages };
}

/** Is the mapped file executable, or does it start with the ELF magic? (The kernel's test for dumping a first page.) */
function startsElfOrExecutable(region: RegionRecord): boolean {
  const file = region.file as { path: string };
  try {
    if ((statSync(file.path).mode & 0o111) !== 0) return true;
    const fd = openSync(file.path, 'r');
    try {
      const magic = Buffer.alloc(4);
      return readAll(fd, magic, 0n) === 4 && magic.equals(ELF_MAGIC);
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

function overlaps(l: LostRange, region: RegionRecord): boolean {
  return l.address < region.end && l.address + BigInt(l.pages) * PAGE > region.start;
}

/** 1 for each page of the region the snapshot lists as lost. */
function lostMask(lost: LostRange[], region: RegionRecord): Uint8Array {
  const pageCount = Number((region.end - region.start) / PAGE);
  const mask = new Uint8Array(pageCount);
  for (const l of lost) {
    if (!overlaps(l, region)) continue;
    const first = l.address >= region.start ? Number((l.address - region.start) / PAGE) : -Number((region.start - l.address) / PAGE);
    mask.fill(1, Math.max(0, first), Math.min(pageCount, first + l.pages));
  }
  return mask;
}

function countLost(mask: Uint8Array, pages: number): number {
  let n = 0;
  for (let i = 0; i < pages; i++) n += mask[i] as number;
  return n;
}

