// Roll a live process back to a snapshot, in place: every thread stopped; the
// layout compared with the snapshot's and repaired with syscalls injected into
// the target (mappings created since T unmapped, anonymous ones removed since
// re-created, brk and protections restored); every page whose content differs
// from T's written back through /proc/PID/mem (which writes read-only pages
// too); every thread's registers and FP/vector state put back; threads
// created since T made to exit; then every thread resumes, at T.
//
// Everything that could make it refuse is checked before anything changes:
// a thread of T that is gone, a mapping of T that cannot be re-created, pages
// the snapshot lost, a file a private mapping reads that changed since T.
// What a rollback cannot undo (file descriptors, file offsets, children,
// data sent) is listed in its warnings.
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { WpsnapError, fromNative } from '../common/errors.js';
import { fileUnchanged } from '../snapshot-format/export-raw.js';
import { formatAddress, PAGE_SIZE, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';
import { readAll } from '../snapshot-format/export-dir.js';
import type { Store } from '../store/store.js';
import { findSyscallInstruction, freeze, inject, type Frozen } from './attach.js';
import { fromStartLenPairs, intersect, normalize, subtract, type Intervals } from './intervals.js';
import { encodeTracking, takeOverTracking, type TakenTracking, type TrackingState } from './keeper.js';
import { UFFDIO_REGISTER_MODE_WP } from './features.js';
import { closeQuietly } from './pause.js';
import { protectWhileRunning } from './preprotect.js';
import { tripleIntervals } from './tracking-handover.js';
import type { NativeBinding, NativeHandle } from './native/binding.js';
import { assertProcessExists, listThreads, readMaps, readProcessRecord, type MapsEntry } from './procfs.js';
import { refuseSelfFreeze } from './target-guard.js';

const SYS_MPROTECT = 10;
const SYS_MMAP = 9;
const SYS_MUNMAP = 11;
const SYS_BRK = 12;
const SYS_EXIT = 60;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
/** Offsets in struct user_regs_struct (x86_64). */
const REG = { rax: 80, rip: 128, origRax: 120, rdi: 112 } as const;
/** Mappings the kernel makes and no program changes. */
const SPECIAL = new Set(['[vvar]', '[vvar_vclock]', '[vdso]', '[vsyscall]']);
/** Bytes of the target read (and compared) at a time. */
const CHUNK = 1 << 20;

/** What a rollback cannot undo, always said. */
const CANNOT_UNDO = [
  'file descriptors opened or closed since T, and file offsets, are as they are now',
  'child processes started since T, and data sent or received on pipes and sockets, are not undone',
  'signal masks and pending signals are as they are now (snapshots do not record them yet)',
];

export interface RollbackOptions {
  /** Roll this live process back instead (the same program, started apart): default the snapshot's own process. */
  pid?: number;
  /**
   * Rewrite only the pages written since T (or since the last rollback), as
   * logged by the tracking `snapshot --track` left (core/keeper.ts), and keep
   * the tracking; its cost grows with the pages written, not the size.
   */
  incremental?: boolean;
}

export interface RollbackResult {
  id: number;
  pid: number;
  incremental: boolean;
  /** Pages whose content differed from T's, written back. */
  pagesWritten: number;
  /** Pages compared with T's. */
  pagesCompared: number;
  /** Mappings unmapped, re-created, resized (brk) or re-protected. */
  mappingsRepaired: number;
  threadsRestored: number;
  /** Threads created since T, made to exit. */
  threadsExited: number;
  /** How long the target was stopped for the rollback proper, µs (ending the threads started since T stops it briefly before). */
  micros: number;
  warnings: string[];
}

/** The protection bits of a maps/regions perms string. */
function protOf(perms: string): number {
  return (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);
}


interface Plan {
  brk: { from: bigint; to: bigint } | null;
  unmap: Intervals;
  create: RegionRecord[];
  reprotect: RegionRecord[];
}

/** The layout repairs, or a refusal naming what cannot be repaired. */
function planLayout(regions: RegionRecord[], maps: MapsEntry[], pid: number, sameProcess: boolean): Plan {
  const atT = normalize(regions.map((r): [bigint, bigint] => [r.start, r.end]));
  const now = normalize(maps.map((m): [bigint, bigint] => [m.start, m.end]));
  const heapT = regions.find((r) => r.path === '[heap]');
  const heapNow = maps.find((m) => m.path === '[heap]');
  let brk: Plan['brk'] = null;
  if (heapT !== undefined && heapNow !== undefined && heapT.start === heapNow.start && heapT.end !== heapNow.end) {
    brk = { from: heapNow.end, to: heapT.end };
  } else if ((heapT === undefined) !== (heapNow === undefined) || (heapT && heapNow && heapT.start !== heapNow.start)) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: its heap is not where it was at T (a different program, or brk was reset): nothing changed`);
  }
  const heapRange: Intervals = heapT && heapNow ? normalize([[heapT.start, heapT.end > heapNow.end ? heapT.end : heapNow.end]]) : [];
  const unmap = subtract(subtract(now, atT), heapRange);
  const missing = subtract(subtract(atT, now), heapRange);
  // Parts of T's mappings missing now: re-created where they were private anonymous memory.
  const create: RegionRecord[] = [];
  for (const r of regions) {
    const parts = intersect([[r.start, r.end]], missing);
    if (parts.length === 0) continue;
    const anonymousPrivate = r.inode === 0 && r.perms[3] === 'p' && !SPECIAL.has(r.path) && r.capture !== 'skipped';
    if (!anonymousPrivate) {
      throw new WpsnapError(
        'ROLLBACK_REFUSED',
        `pid ${pid}: ${formatAddress(parts[0]![0])}-${formatAddress(parts[0]![1])} of ${r.path || 'a mapping'} (${r.perms}) was mapped at T and is not now, and only private anonymous memory can be re-created: nothing changed`,
      );
    }
    for (const [start, end] of parts) create.push({ ...r, start, end });
  }
  const reprotect: RegionRecord[] = [];
  for (const r of regions) {
    if (SPECIAL.has(r.path)) continue;
    const differs = maps.some((m) => m.start < r.end && r.start < m.end && m.perms.slice(0, 3) !== r.perms.slice(0, 3));
    // Another process of the program (--pid) has its own shared memory objects, under the same names.
    const sameObject = (m: MapsEntry): boolean => m.inode === r.inode || (!sameProcess && r.perms[3] === 's' && m.path === r.path);
    const kindChanged = maps.some((m) => m.start < r.end && r.start < m.end && (!sameObject(m) || m.perms[3] !== r.perms[3]));
    if (kindChanged) {
      throw new WpsnapError(
        'ROLLBACK_REFUSED',
        `pid ${pid}: ${formatAddress(r.start)}-${formatAddress(r.end)} holds another mapping than at T (${r.path || 'anonymous'}, ${r.perms}): nothing changed`,
      );
    }
    if (differs) reprotect.push(r);
  }
  return { brk, unmap, create, reprotect };
}

/** A region's content at T, a chunk at a time: its stored pages, the file's (file-private), or zero. */
class ContentAtT {
  private fileFd: number | undefined;

  constructor(
    private readonly store: Store,
    private readonly processId: number,
    private readonly region: RegionRecord,
  ) {
    if (region.capture === 'file-private' && region.file !== undefined) this.fileFd = openSync(region.file.path, 'r');
  }

  /** T's content of [start, start + into.length) into `into`. */
  fill(start: bigint, into: Buffer): void {
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
    for (const page of this.store.pagesInRange(this.processId, start, start + BigInt(into.length))) page.data.copy(into, Number(page.address - start));
  }

  close(): void {
    if (this.fileFd !== undefined) closeSync(this.fileFd);
  }
}

/**
 * T's threads as the target's: its own, or (--pid, another process of the
 * program) the target's threads in the same order, main thread first; the
 * target's threads beyond T's count are ended like threads started since T.
 */
function asThreadsOf(threads: ThreadRecord[], snapshotPid: number, pid: number): ThreadRecord[] {
  if (pid === snapshotPid) return threads;
  const order = (main: number) => (a: number, b: number) => (a === main ? -1 : b === main ? 1 : a - b);
  const atT = [...threads].sort((a, b) => order(snapshotPid)(a.tid, b.tid));
  const live = [...taskTids(pid)].sort(order(pid));
  if (live.length < atT.length) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} has ${live.length} thread${live.length === 1 ? '' : 's'}, and the process of the snapshot had ${atT.length} at T: nothing changed`);
  }
  return atT.map((t, i) => ({ ...t, tid: live[i]! }));
}

/** Threads created since T resume at a syscall instruction calling exit(0). */
function exitRegisters(regs: Buffer, insn: bigint): Buffer {
  const out = Buffer.from(regs);
  out.writeBigUInt64LE(insn, REG.rip);
  out.writeBigUInt64LE(BigInt(SYS_EXIT), REG.rax);
  out.writeBigUInt64LE(0xffffffffffffffffn, REG.origRax); // no syscall restart
  out.writeBigUInt64LE(0n, REG.rdi);
  return out;
}

const taskTids = (pid: number): Set<number> => new Set(listThreads(pid));

/**
 * Make the threads created since T exit, before the rollback proper: each
 * must exit with its own stack still mapped (the kernel writes its rseq area
 * and clear_child_tid there on the way out, and a thread whose rseq area is
 * gone takes the whole process down with SIGSEGV), and that stack is a
 * mapping made since T, which the rollback unmaps. The other threads run for
 * the moment it takes; the rollback puts them back at T anyway.
 */
async function endThreadsSinceT(binding: NativeBinding, pid: number, insn: bigint, atT: Set<number>): Promise<number> {
  const tids = [...taskTids(pid)].filter((t) => !atT.has(t));
  if (tids.length === 0) return 0;
  binding.prepareFreeze();
  const frozen = freeze(binding, pid);
  let ending: number[];
  try {
    const gone = [...atT].filter((t) => !frozen.threads.some((f) => f.tid === t));
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.join(', ')} of T exited since; nothing changed`);
    }
    const fresh = frozen.threads.filter((t) => !atT.has(t.tid));
    for (const t of fresh) binding.setThreadState(frozen.handle, t.tid, { regs: exitRegisters(t.regs, insn), fpregs: t.fpregs, xstate: t.xstate });
    ending = fresh.map((t) => t.tid);
  } finally {
    binding.thaw(frozen.handle);
  }
  const until = Date.now() + 5000;
  while (ending.some((t) => taskTids(pid).has(t))) {
    if (Date.now() > until) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: threads ${ending.join(', ')}, started since T, did not exit`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return ending.length;
}

/** Which regions' content is compared and written back. */
function hasContent(r: RegionRecord): boolean {
  return (r.capture === 'protected' || r.capture === 'copied' || r.capture === 'file-private') && r.perms[0] === 'r';
}

export async function rollback(binding: NativeBinding, store: Store, ref: string, options: RollbackOptions = {}): Promise<RollbackResult> {
  const snap = store.find(ref);
  if (snap.state !== 'complete') {
    throw new WpsnapError('SNAPSHOT_INCOMPLETE', `snapshot ${snap.id} is ${snap.state}: only a complete snapshot can be rolled back to`);
  }
  const processes = store.processes(snap.id);
  if (processes.length !== 1) {
    throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} holds ${processes.length} processes: rollback takes a snapshot of one`);
  }
  const proc = processes[0]!;
  const pid = options.pid ?? proc.pid;
  assertProcessExists(pid);
  refuseSelfFreeze(pid);
  const live = readProcessRecord(pid);
  if (options.pid === undefined && live.startTimeTicks !== proc.startTimeTicks) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} is not the process of snapshot ${snap.id} (the pid was reused): give --pid of a live process of ${proc.exe}`);
  }
  if (live.exe !== proc.exe) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} runs ${live.exe}, not ${proc.exe} as in snapshot ${snap.id}: nothing changed`);
  }
  const lost = store.lost(proc.processId);
  if (lost.length > 0) {
    const pages = lost.reduce((n, l) => n + l.pages, 0);
    throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} lost ${pages} pages (wpsnap show ${snap.id}): a rollback would leave them as they are now; nothing changed`);
  }
  const regions = store.regions(proc.processId);
  for (const r of regions) {
    if (r.capture === 'file-private' && !fileUnchanged(r)) {
      throw new WpsnapError('ROLLBACK_REFUSED', `${r.file?.path ?? r.path} changed since snapshot ${snap.id}: its pages at T are not known; nothing changed`);
    }
  }
  const threadsAtT: ThreadRecord[] = asThreadsOf(store.threads(proc.processId), proc.pid, pid);
  const insn = findSyscallInstruction(binding, pid);
  const warnings = [...CANNOT_UNDO];
  const tracked = options.incremental === true ? await takeTracking(binding, store, snap.id, pid, live.startTimeTicks) : undefined;
  try {
    return await rollbackStopped(binding, store, { snapId: snap.id, sameProcess: pid === proc.pid && live.startTimeTicks === proc.startTimeTicks, processId: proc.processId, pid, regions, threadsAtT, insn, warnings, tracked });
  } catch (error) {
    // Refused before anything changed: the tracking goes back to the keeper, with what we logged meanwhile.
    if (tracked !== undefined && (error as WpsnapError).code === 'ROLLBACK_REFUSED') {
      binding.trackerStop(tracked.reader);
      const log = binding.trackerTake(tracked.reader);
      const t = tracked.taken.tracking;
      const back: TrackingState = {
        ...t,
        written: normalize([...t.written, ...fromStartLenPairs(log.written)]),
        invalid: normalize([...t.invalid, ...fromStartLenPairs(log.invalid)]),
        overflowed: t.overflowed || log.overflowed || log.forks > 0,
      };
      await tracked.taken.link.request({ op: 'adopt', ...encodeTracking(back) }).catch(() => undefined);
    }
    throw error;
  } finally {
    if (tracked !== undefined) {
      binding.trackerStop(tracked.reader);
      closeQuietly(binding, tracked.pidfd);
      closeQuietly(binding, tracked.taken.uffd);
      tracked.taken.link.close(); // handed back already, or the keeper ends and releases the target
    }
  }
}

/** The tracking taken over from the keeper, and our reader of the target's faults meanwhile. */
interface Tracked {
  taken: TakenTracking;
  reader: NativeHandle;
  pidfd: number;
}

/**
 * --incremental: the keeper's context and its log since T, and a thread of
 * ours serving (and logging) the target's faults until the freeze. Refused,
 * the tracking handed back as it was, unless it runs since this very
 * snapshot, in this store, and missed nothing.
 */
async function takeTracking(binding: NativeBinding, store: Store, snapId: number, pid: number, startTimeTicks: number): Promise<Tracked> {
  const how = `take the snapshot with --track (wpsnap snapshot ${pid} --name base --track), then roll back to it`;
  const taken = await takeOverTracking(binding, pid, startTimeTicks);
  if (taken === undefined) throw new WpsnapError('NOT_TRACKED', `rollback --incremental needs the writes since T tracked, and pid ${pid} is not tracked: ${how}`);
  const t = taken.tracking;
  const refusal =
    t.store !== store.path || t.base !== snapId
      ? `pid ${pid} is tracked since snapshot ${t.base} of ${t.store}, not since snapshot ${snapId} of ${store.path}: ${how}`
      : t.overflowed
        ? `the tracking of pid ${pid} missed writes (a fork, or no memory for its log): roll back without --incremental`
        : undefined;
  if (refusal !== undefined) {
    await taken.link.request({ op: 'adopt', ...encodeTracking(t) }).catch(() => undefined);
    taken.link.close();
    closeQuietly(binding, taken.uffd);
    throw new WpsnapError('NOT_TRACKED', refusal);
  }
  let pidfd = -1;
  try {
    pidfd = binding.pidfdOpen(pid);
    const reader = binding.trackerStart({ uffd: taken.uffd, pid, pidfd, ranges: t.ranges });
    return { taken, reader, pidfd };
  } catch (error) {
    if (pidfd >= 0) closeQuietly(binding, pidfd);
    closeQuietly(binding, taken.uffd);
    taken.link.close();
    throw fromNative(error, `serve the faults of pid ${pid}`);
  }
}

interface StoppedInputs {
  snapId: number;
  /** The snapshot's own process (not --pid of another). */
  sameProcess: boolean;
  processId: number;
  pid: number;
  regions: RegionRecord[];
  threadsAtT: ThreadRecord[];
  insn: bigint;
  warnings: string[];
  tracked: Tracked | undefined;
}

async function rollbackStopped(binding: NativeBinding, store: Store, inputs: StoppedInputs): Promise<RollbackResult> {
  const { snapId, processId, pid, regions, threadsAtT, insn, warnings, tracked } = inputs;
  const tidsAtT = new Set(threadsAtT.map((t) => t.tid));
  let threadsExited = 0;
  let frozen: Frozen | undefined;
  // Threads keep starting (a thread pool)? A few tries, then the rollback proper with none left.
  for (let attempt = 0; frozen === undefined; attempt++) {
    try {
      threadsExited += await endThreadsSinceT(binding, pid, insn, tidsAtT);
      binding.prepareFreeze();
    } catch (error) {
      throw error instanceof WpsnapError ? error : fromNative(error, `end the threads of pid ${pid} started since T`);
    }
    const candidate = freeze(binding, pid);
    if (candidate.threads.every((t) => tidsAtT.has(t.tid)) || attempt >= 3) frozen = candidate;
    else binding.thaw(candidate.handle);
  }
  const stopped = frozen;
  let pagesWritten = 0;
  let pagesCompared = 0;
  let mappingsRepaired = 0;
  let changedSinceT: Intervals | undefined;
  let created: Intervals = [];
  try {
    // Every check first: a refusal changes nothing.
    const frozenTids = new Set(stopped.threads.map((t) => t.tid));
    const gone = threadsAtT.filter((t) => !frozenTids.has(t.tid));
    const fresh = stopped.threads.filter((t) => !tidsAtT.has(t.tid));
    if (fresh.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} keeps starting threads (${fresh.map((t) => t.tid).join(', ')}): they could not all be ended before the rollback; nothing else changed`);
    }
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.map((t) => t.tid).join(', ')} of T exited since; nothing changed`);
    }
    const plan = planLayout(regions, readMaps(pid), pid, inputs.sameProcess);
    // Incremental: what was written (or zapped, moved, unmapped) since T, as logged up to the freeze.
    if (tracked !== undefined) changedSinceT = loggedSinceT(binding, tracked);
    const call = (nr: number, args: Array<number | bigint>, what: string): void => {
      const result = inject(binding, stopped, insn, nr, args, what);
      if (result < 0 && nr !== SYS_BRK) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: ${what} failed in the target (errno ${-result}); it is partly rolled back`);
    };
    if (plan.brk !== null) {
      call(SYS_BRK, [plan.brk.to], `brk(${formatAddress(plan.brk.to)})`);
      mappingsRepaired++;
    }
    for (const [s, e] of plan.unmap) {
      call(SYS_MUNMAP, [s, e - s], `munmap(${formatAddress(s)}, ${e - s})`);
      mappingsRepaired++;
    }
    for (const r of plan.create) {
      const at = inject(binding, stopped, insn, SYS_MMAP, [r.start, r.end - r.start, protOf(r.perms) | 2, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0], `mmap(${formatAddress(r.start)})`);
      if (BigInt.asUintN(64, BigInt(at)) !== r.start) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: mmap at ${formatAddress(r.start)} failed in the target (${at}); it is partly rolled back`);
      mappingsRepaired++;
    }
    created = normalize(plan.create.map((r): [bigint, bigint] => [r.start, r.end]));
    const mem = openSync(`/proc/${pid}/mem`, 'r+');
    try {
      const withContent = regions.filter(hasContent);
      if (changedSinceT !== undefined) {
        // Only what changed since T (and what was re-created), written whole: its cost is what the target touched.
        pagesWritten = pagesCompared = rewrite(mem, store, processId, withContent, normalize([...changedSinceT, ...created]));
        // What the tracking does not see (shared memory, private file mappings' copies…) is compared whole.
        const covered = tripleIntervals(tracked!.taken.tracking.ranges);
        const untracked = withContent.flatMap((r) => subtract([[r.start, r.end]], normalize([...covered, ...created])).map(([start, end]) => ({ ...r, start, end, offset: r.offset + (start - r.start) })));
        const compared = compareAndRewrite(binding, pid, mem, store, processId, untracked);
        pagesWritten += compared.pagesWritten;
        pagesCompared += compared.pagesCompared;
      } else {
        ({ pagesWritten, pagesCompared } = compareAndRewrite(binding, pid, mem, store, processId, withContent));
      }
    } finally {
      closeSync(mem);
    }
    for (const r of plan.create.filter((c) => c.perms[1] !== 'w')) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${formatAddress(r.start)})`);
    }
    for (const r of plan.reprotect) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${formatAddress(r.start)}, ${r.perms})`);
      mappingsRepaired++;
    }
    // Registers last: injections run in one of these threads and put its registers back after each.
    for (const t of threadsAtT) binding.setThreadState(stopped.handle, t.tid, { regs: t.regs, fpregs: t.fpregs, xstate: t.xstate });
    // The tracking goes on from T again: what was rewritten is protected again, memory re-created is
    // registered. Our reader stops first (it served the faults our own writes caused, a zapped page's
    // marker): from here to the keeper's adopt, the target's faults wait in the context, unread.
    if (tracked !== undefined) {
      binding.trackerStop(tracked.reader);
      rearm(binding, tracked, regions, created, changedSinceT);
    }
  } finally {
    binding.thaw(stopped.handle);
  }
  const micros = Number(process.hrtime.bigint() - stopped.frozenAt) / 1000;
  if (tracked !== undefined) {
    const t = tracked.taken.tracking;
    const again: TrackingState = { ...t, ranges: rearmedRanges(t.ranges, regions, created), written: [], invalid: [], overflowed: false };
    await tracked.taken.link.request({ op: 'adopt', ...encodeTracking(again) });
  }
  if (regions.some((r) => r.perms[3] === 's' && hasContent(r))) warnings.push('shared memory was written back: other processes that map it see its content at T too');
  if (tracked !== undefined && changedSinceT === undefined) warnings.push('the tracking missed writes (a fork?): every page was compared instead');
  return {
    id: snapId,
    pid,
    incremental: changedSinceT !== undefined,
    pagesWritten,
    pagesCompared,
    mappingsRepaired,
    threadsRestored: threadsAtT.length,
    threadsExited,
    micros: Math.round(micros),
    warnings,
  };
}

/** The keeper's log since T and ours since the take-over, as one; undefined if either missed something. */
function loggedSinceT(binding: NativeBinding, tracked: Tracked): Intervals | undefined {
  const log = binding.trackerTake(tracked.reader);
  const t = tracked.taken.tracking;
  if (log.overflowed || log.forks > 0 || log.error !== undefined) return undefined;
  return normalize([...t.written, ...t.invalid, ...fromStartLenPairs(log.written), ...fromStartLenPairs(log.invalid)]);
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
 */
function fileContentPages(binding: NativeBinding, pid: number, store: Store, processId: number, r: RegionRecord, at: bigint, len: number): Uint8Array {
  const same = new Uint8Array(len / PAGE_SIZE);
  if (r.capture !== 'file-private') return same;
  const entries = binding.readPagemap(pid, at, len / PAGE_SIZE);
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i]!;
    same[i] = (e & PM_PRESENT) !== 0n ? ((e & PM_FILE) !== 0n ? 1 : 0) : (e & PM_SWAP) === 0n ? 1 : 0;
  }
  for (const page of store.pagesInRange(processId, at, at + BigInt(len))) same[Number((page.address - at) / BigInt(PAGE_SIZE))] = 0;
  return same;
}

/** Full rollback: every page of `regions` compared with T's, written back where it differs. */
function compareAndRewrite(binding: NativeBinding, pid: number, mem: number, store: Store, processId: number, regions: RegionRecord[]): { pagesWritten: number; pagesCompared: number } {
  let pagesWritten = 0;
  let pagesCompared = 0;
  const now = Buffer.alloc(CHUNK);
  const then = Buffer.alloc(CHUNK);
  for (const r of regions) {
    const content = new ContentAtT(store, processId, r);
    try {
      for (let at = r.start; at < r.end; at += BigInt(CHUNK)) {
        const len = Number(r.end - at < BigInt(CHUNK) ? r.end - at : BigInt(CHUNK));
        const fromFile = fileContentPages(binding, pid, store, processId, r, at, len);
        if (fromFile.every((x) => x === 1)) continue;
        const current = now.subarray(0, len);
        const wanted = then.subarray(0, len);
        readSync(mem, current, 0, len, at);
        content.fill(at, wanted);
        for (let off = 0; off < len; off += PAGE_SIZE) {
          if (fromFile[off / PAGE_SIZE] === 1) continue;
          pagesCompared++;
          const b = wanted.subarray(off, off + PAGE_SIZE);
          if (current.subarray(off, off + PAGE_SIZE).equals(b)) continue;
          writeSync(mem, b, 0, PAGE_SIZE, Number(at) + off); // user addresses are below 2^47: exact as numbers
          pagesWritten++;
        }
      }
    } finally {
      content.close();
    }
  }
  return { pagesWritten, pagesCompared };
}

/** Incremental rollback: T's content of `ranges` (inside `regions`) written back; returns the pages written. */
function rewrite(mem: number, store: Store, processId: number, regions: RegionRecord[], ranges: Intervals): number {
  let pages = 0;
  const then = Buffer.alloc(CHUNK);
  for (const r of regions) {
    const inside = intersect(ranges, [[r.start, r.end]]);
    if (inside.length === 0) continue; // most regions: no file to open, no query
    const content = new ContentAtT(store, processId, r);
    try {
      for (const [s, e] of inside) {
        for (let at = s; at < e; at += BigInt(CHUNK)) {
          const len = Number(e - at < BigInt(CHUNK) ? e - at : BigInt(CHUNK));
          const wanted = then.subarray(0, len);
          content.fill(at, wanted);
          writeSync(mem, wanted, 0, len, Number(at));
          pages += len / PAGE_SIZE;
        }
      }
    } finally {
      content.close();
    }
  }
  return pages;
}

/** What the context covers after the rollback: its ranges still mapped as at T, and the memory re-created. */
function rearmedRanges(triples: BigUint64Array, regions: RegionRecord[], created: Intervals): BigUint64Array {
  const atT = normalize(regions.map((r): [bigint, bigint] => [r.start, r.end]));
  const out: bigint[] = [];
  for (let i = 0; i + 2 < triples.length; i += 3) {
    for (const [s, e] of intersect(subtract([[triples[i]!, triples[i + 1]!]], created), atT)) out.push(s, e, triples[i + 2]!);
  }
  for (const [s, e] of created) out.push(s, e, 4096n);
  const sorted: Array<[bigint, bigint, bigint]> = [];
  for (let i = 0; i < out.length; i += 3) sorted.push([out[i]!, out[i + 1]!, out[i + 2]!]);
  sorted.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return BigUint64Array.from(sorted.flat());
}

/**
 * Protect again what the rollback rewrote (the target's next write to it is
 * logged again), and register and protect the memory re-created (a new
 * mapping is registered with no context). Past a few thousand ranges, the
 * covered ranges are protected whole (one call instead of a TLB flush each).
 */
function rearm(binding: NativeBinding, tracked: Tracked, regions: RegionRecord[], created: Intervals, changedSinceT: Intervals | undefined): void {
  const uffd = tracked.taken.uffd;
  for (const [s, e] of created) binding.uffdRegister(uffd, s, e - s, UFFDIO_REGISTER_MODE_WP);
  const covered = tripleIntervals(rearmedRanges(tracked.taken.tracking.ranges, regions, created));
  const again = changedSinceT === undefined ? covered : intersect(normalize([...changedSinceT, ...created]), covered);
  protectWhileRunning(binding, uffd, again.length > 2048 ? covered : again, covered);
}
