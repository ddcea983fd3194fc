// Everything that happens while the target is stopped: obtain its
// userfaultfd, plan its mappings again, register and write-protect them, copy
// what uffd-wp cannot protect, resume. T is this whole pause.
import { fstatSync } from 'node:fs';
import { REGION_KIND } from './constants.js';
import type { FdRecord, LostRange, PageBatch, SignalAction, ThreadRecord } from '../snapshot-format/model.js';
import { nonDefaultSignalSets, refreshFds, selfPipeReadEnds } from './process-state.js';
import type { UffdMethod } from './attach.js';
import type { Attacher, StoppedTarget } from './attacher.js';
import { fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import { UFFD_FEATURES_FOR_SNAPSHOT } from './features.js';
import type { NativeBinding } from './native/binding.js';
import { copyInPause } from './paused-copy.js';
import { findPinned, savePinned, type PinSources } from './pinned.js';
import { listThreads, threadName } from './procfs.js';
import { registerRegions, writeProtectAll } from './protect.js';
import type { RegionPlan, RegionPlanner } from './regions.js';
import { protectionRanges, type SparseIntervals } from './sparse.js';
import { rangesAtInstant, type EarlyRestoreState, type PreProtection, type TrackLog } from './preprotect.js';

/** Where the pause went, in microseconds. */
export interface PauseBreakdown {
  freeze: number;
  inject: number;
  /** What a restore needs that changes under a running program: signal dispositions, the fd table, self-pipes' bytes. */
  restoreState: number;
  plan: number;
  protect: number;
  copy: number;
  /** Starting the engine thread, last before the resume. */
  engine: number;
  thaw: number;
}

export interface PauseInputs {
  pid: number;
  attacher: Attacher;
  planner: RegionPlanner;
  /** Shared memory copied whole in the pause, at most this many bytes in all. */
  maxSharedCopyBytes: number;
  /** Mappings found sparse before the freeze (core/sparse.ts). */
  sparse: SparseIntervals;
  /** Memory touched before the freeze for the private pages copied in the pause. */
  copyBuffer: Buffer | undefined;
  /** fds through which the kernel may pin the target's memory (read before the freeze). */
  pinSources: PinSources;
  /** Pinned pages copied in the pause, at most this many bytes (beyond: listed lost). */
  maxPinnedCopyBytes: number | undefined;
  /**
   * A group's shared files already copied in this pause by another member ("dev inode" as in maps):
   * a SysV segment every member maps is copied once (the store indexes it for the others); this
   * member adds the ones it copies.
   */
  copiedFiles?: Set<string> | undefined;
  /** Called last before the resume, once every page is protected or settled: give the engine its regions. */
  beforeResume?: ((uffd: number, plans: RegionPlan[]) => void) | undefined;
  /** Called first after the resume: start the engine (the target's first writes wait for it). */
  afterResume?: (() => void) | undefined;
  /** The target's bulk was protected while it ran (core/preprotect.ts): its userfaultfd, and the
   * final log of what it wrote since, taken once it is stopped. */
  pre?: { protection: PreProtection; finalLog: () => TrackLog } | undefined;
  /** What a restore needs that changes under a running program, read in the pause (after the protection). */
  /** early: what the attach stop read (core/preprotect.ts); only what changed since is read in the pause. */
  forRestore?: { fds: FdRecord[]; pidfd: number; early?: EarlyRestoreState } | undefined;
}

/** What the pause read for a restore; `warning` says what could not be read. */
export interface ReadForRestore {
  signals?: SignalAction[];
  /** clear_child_tid of the threads the attach stop read it for, and of those created since (read now). */
  tidAddresses?: Map<number, bigint>;
  /** The fd table at T (core/process-state.ts refreshFds), self-pipes' bytes in their read ends' records. */
  fds: FdRecord[];
  warning?: string;
}

export interface PauseOutcome {
  breakdown: PauseBreakdown;
  pauseMicros: number;
  uffd: number;
  method: UffdMethod;
  plans: RegionPlan[];
  threads: ThreadRecord[];
  pausedPages: PageBatch[];
  /** Pinned pages listed lost, and warnings about pins that could not be placed. */
  pinnedLost: LostRange[];
  warnings: string[];
  /** Regions protected only where populated. */
  sparseRegions: number;
  /** With pre-protection: written ranges protected again in the pause (-1: everything, the log overflowed). */
  writtenAtInstant: number | null;
  forRestore?: ReadForRestore;
}

/** close(2), ignoring an fd already closed. */
export function closeQuietly(binding: NativeBinding, fd: number): void {
  try {
    binding.closeFd(fd);
  } catch {
    // already closed
  }
}

/** Microseconds since the last lap (or the start), and since the start: a stop's phases. */
export function stopwatch(): { lap: () => number; total: () => number } {
  const started = process.hrtime.bigint();
  let mark = started;
  return {
    lap(): number {
      const now = process.hrtime.bigint();
      const us = Number(now - mark) / 1000;
      mark = now;
      return us;
    },
    total: () => Number(process.hrtime.bigint() - started) / 1000,
  };
}

export function pause(binding: NativeBinding, inputs: PauseInputs): PauseOutcome {
  const target = new TargetPause(binding, inputs);
  target.stop();
  try {
    target.protect();
    target.startEngine();
  } catch (error) {
    target.abandon();
    throw error;
  }
  return target.resume();
}

/**
 * One target's pause in three steps, so that a group (core/group.ts) can stop
 * every member before it protects any, and resume them only once all are
 * protected: stop() freezes it, protect() obtains its userfaultfd, plans,
 * registers, protects and copies, startEngine() calls beforeResume (a group
 * first learns every member's shared objects), resume() lets it run and
 * starts the engine. On a failure between stop() and resume(), abandon()
 * releases it.
 */
export class TargetPause {
  private readonly clock = stopwatch();
  private stopped: StoppedTarget | undefined;
  readonly breakdown: PauseBreakdown = { freeze: 0, inject: 0, restoreState: 0, plan: 0, protect: 0, copy: 0, engine: 0, thaw: 0 };
  /** The userfaultfd obtained in the pause is this pause's to close on failure; a pre-protection's is its owner's. */
  uffd: number;
  method: UffdMethod;
  private protectedState:
    | { plans: RegionPlan[]; forRestore: ReadForRestore | undefined; pausedPages: PageBatch[]; pinned: ReturnType<typeof savePinned>; sparseRegions: number; writtenAtInstant: number | null }
    | undefined;

  constructor(
    private readonly binding: NativeBinding,
    private readonly inputs: PauseInputs,
  ) {
    this.uffd = inputs.pre?.protection.uffd ?? -1;
    this.method = inputs.pre?.protection.method ?? 'syscall';
  }

  /** Freeze every thread: the pause starts. */
  stop(): void {
    const inputs = this.inputs;
    this.clock.lap(); // in a group, the members stopped before this one are not its freeze
    // Each thread's clear_child_tid costs a call run in every thread: in the pause only when the attach stop did not read it.
    this.stopped = inputs.attacher.stop({ tidAddresses: inputs.forRestore !== undefined && inputs.forRestore.early === undefined });
    this.breakdown.freeze = this.clock.lap();
    faultPoint('after-freeze');
  }

  /** Everything up to the resume; the target stays stopped. */
  protect(): void {
    const { binding, inputs, breakdown } = this;
    const { pid, planner } = inputs;
    const stopped = this.stopped!;
    const { lap } = this.clock;
    lap(); // in a group, the time other members took is not this one's
    const pre = inputs.pre;
    if (pre === undefined) {
      const obtained = stopped.obtainUffd();
      this.uffd = obtained.fd;
      this.method = obtained.method;
      faultPoint('after-inject');
      try {
        binding.uffdApi(this.uffd, UFFD_FEATURES_FOR_SNAPSHOT);
      } catch (error) {
        throw fromNative(error, 'ioctl(UFFDIO_API) on the target userfaultfd');
      }
    }
    breakdown.inject = lap();
    // Before any protection: the injected rt_sigaction writes its answer into the target's memory.
    const forRestore = inputs.forRestore === undefined ? undefined : readForRestore(binding, pid, stopped, inputs.forRestore);
    breakdown.restoreState = lap();
    const plans = planner.plan(planner.readMaps());
    fileTimesAtInstant(plans);
    breakdown.plan = lap();
    const registered = registerRegions(binding, this.uffd, plans, inputs.maxSharedCopyBytes);
    const copiedFiles = inputs.copiedFiles;
    for (const plan of copiedFiles === undefined ? [] : plans) {
      if (plan.pausedCopy !== 'file') continue;
      const key = `${plan.record.dev} ${plan.record.inode}`;
      if (copiedFiles!.has(key)) plan.pausedCopy = 'none';
      else copiedFiles!.add(key);
    }
    const protection = protectionRanges(binding, pid, registered, inputs.sparse);
    let writtenAtInstant: number | null = null;
    if (pre !== undefined) {
      // Only what the target wrote since its pre-protection, and what that did not cover.
      const atInstant = rangesAtInstant(pre.protection, pre.finalLog(), protection.ranges);
      protection.ranges = atInstant.ranges;
      writtenAtInstant = atInstant.written;
    }
    writeProtectAll(binding, this.uffd, protection.ranges);
    breakdown.protect = lap();
    faultPoint('after-protect');
    const pausedPages = copyInPause(binding, pid, plans, inputs.copyBuffer);
    // Pages the kernel writes through a long-term pin never fault: copy them now.
    const pinned = savePinned(binding, pid, registered, findPinned(pid, inputs.pinSources), inputs.maxPinnedCopyBytes);
    if (pinned.pages) pausedPages.push(pinned.pages);
    breakdown.copy = lap();
    this.protectedState = { plans, forRestore, pausedPages, pinned, sparseRegions: protection.sparseRegions, writtenAtInstant };
  }

  /** The plans made in the pause (after protect()). */
  get plans(): RegionPlan[] {
    return this.protectedState!.plans;
  }

  /** Give the engine its regions (beforeResume): last before the resume. */
  startEngine(): void {
    this.clock.lap();
    this.inputs.beforeResume?.(this.uffd, this.protectedState!.plans);
    this.breakdown.engine = this.clock.lap();
  }

  /** Let the target run and start its engine; what the pause found. */
  resume(): PauseOutcome {
    this.thaw();
    return this.outcome();
  }

  /** Let the target run and start its engine (a group thaws every member before it reads any outcome). */
  thaw(): void {
    this.clock.lap();
    this.stopped!.resume();
    this.breakdown.thaw = this.clock.lap();
    this.pauseMicros = this.clock.total();
    // Woken after the resume, not before: woken in the pause, the engine
    // thread preempted the pause's own thread for milliseconds.
    this.inputs.afterResume?.();
  }

  private pauseMicros = 0;

  /** What the pause found, once thawed. */
  outcome(): PauseOutcome {
    const { inputs, breakdown, pauseMicros } = this;
    const stopped = this.stopped!;
    const done = this.protectedState!;
    // Thread names are read after the resume: they are for recognising the
    // snapshot, and reading /proc per thread would lengthen the pause.
    const known = done.forRestore?.tidAddresses;
    const threads: ThreadRecord[] = stopped.threads.map((t) => ({
      ...t,
      name: threadName(inputs.pid, t.tid),
      ...(t.clearChildTid === undefined && known?.has(t.tid) === true ? { clearChildTid: known.get(t.tid)! } : {}),
    }));
    return {
      breakdown,
      pauseMicros,
      uffd: this.uffd,
      method: this.method,
      plans: done.plans,
      threads,
      pausedPages: done.pausedPages,
      pinnedLost: done.pinned.lost,
      warnings: done.pinned.warnings,
      sparseRegions: done.sparseRegions,
      writtenAtInstant: done.writtenAtInstant,
      ...(done.forRestore === undefined ? {} : { forRestore: done.forRestore }),
    };
  }

  /** After a failure between stop() and resume(): drop what this pause obtained and let the target run. */
  abandon(): void {
    // Closing the only reference releases every registration and protection.
    if (this.uffd >= 0 && this.inputs.pre === undefined) closeQuietly(this.binding, this.uffd);
    this.stopped?.resume();
  }
}

/**
 * A shared file's times are what every copy of it is proven against: they must
 * be T's. A plan made ahead read them while the target (and, in a group, every
 * member) still wrote the file through its mappings, each such write setting
 * them: read again now, everyone stopped (an fstat per shared mapping).
 */
function fileTimesAtInstant(plans: RegionPlan[]): void {
  for (const plan of plans) {
    const engine = plan.engine;
    if (engine?.kind !== REGION_KIND.file || engine.fd === undefined) continue;
    const { ctimeNs, mtimeNs } = fstatSync(engine.fd, { bigint: true });
    engine.ctimeNs = ctimeNs;
    engine.mtimeNs = mtimeNs;
  }
}

/**
 * Signal dispositions (by the attacher, in the target, unless the attach stop read them and they hold),
 * clear_child_tid of threads created since the attach stop, the fd table at T and self-pipes' bytes (tee of a
 * copy of their read end); failures are a warning.
 */
function readForRestore(binding: NativeBinding, pid: number, stopped: StoppedTarget, what: { fds: FdRecord[]; pidfd: number; early?: EarlyRestoreState }): ReadForRestore {
  const out: ReadForRestore = { fds: what.fds };
  const problems: string[] = [];
  const early = what.early;
  try {
    // The dispositions the attach stop read hold at T unless the sets of ignored and caught signals changed since.
    const { sets, signals } = nonDefaultSignalSets(pid);
    if (early?.signals !== undefined && early.signalSets === sets) out.signals = early.signals;
    else if (stopped.readSignalActions !== undefined) out.signals = stopped.readSignalActions(signals);
  } catch (error) {
    problems.push(`signal dispositions: ${(error as Error).message}`);
  }
  if (early !== undefined) {
    try {
      const created = listThreads(pid).filter((tid) => !early.tidAddresses.has(tid));
      out.tidAddresses = new Map([...early.tidAddresses, ...(created.length > 0 ? (stopped.readTidAddresses?.(created) ?? []) : [])]);
    } catch (error) {
      problems.push(`the threads' clear_child_tid: ${(error as Error).message}`);
    }
  }
  try {
    out.fds = refreshFds(pid, what.fds);
  } catch (error) {
    problems.push(`the fd table at T: ${(error as Error).message}`);
  }
  const pipes = new Set(selfPipeReadEnds(out.fds));
  out.fds = out.fds.map((f) => {
    if (!pipes.has(f.fd)) return f;
    try {
      return { ...f, pipeBytes: binding.peekPipe(what.pidfd, f.fd).toString('hex') };
    } catch (error) {
      problems.push(`the bytes of the pipe at fd ${f.fd}: ${(error as Error).message}`);
      return f;
    }
  });
  if (problems.length > 0) out.warning = `not recorded for a restore: ${problems.join('; ')}`;
  return out;
}
