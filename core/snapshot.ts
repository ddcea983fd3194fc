// Snapshot one running process, stage by stage: plan before the pause
// (core/regions.ts, core/sparse.ts, core/paused-copy.ts), the pause through
// an attacher (core/pause.ts, core/ptrace-attacher.ts), then the engine run
// (core/engine-session.ts) into the store, ending in its final commit.
import { closeSync } from 'node:fs';
import type { LostRange, ProcessState, RegionRecord } from '../snapshot-format/model.js';
import type { UffdMethod } from './attach.js';
import type { Attacher } from './attacher.js';
import { EngineSession, type EngineProgress } from './engine-session.js';
import { WpsnapError, fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import { requireFeatures } from './features.js';
import type { EngineFinalStats, NativeBinding } from './native/binding.js';
import { closeQuietly, pause, type PauseBreakdown, type PauseOutcome } from './pause.js';
import { privateCopyBuffer } from './paused-copy.js';
import { scanPinSources } from './pinned.js';
import type { SnapshotSink, SnapshotTarget } from './sink.js';
import { assertProcessExists, cpuClock, readProcessRecord } from './procfs.js';
import { readProcessState, withSocketOptions } from './process-state.js';
import { setStorePriority, type StorePriority } from '../store/priority.js';
import { ptraceAttacher } from './ptrace-attacher.js';
import { RegionPlanner, sharedToPreProtect } from './regions.js';
import { openStaging, residentBytes, type Staging, type StagingOptions } from './staging.js';
import { preProtect, type PreProtection, type TrackLog } from './preprotect.js';
import { encodeTracking, keeperStatus, logIntervals, startKeeper, takeOverTracking, type TakenTracking, type TrackingState } from './keeper.js';
import { adoptTracking, trackedRanges, unwrittenAtInstant } from './tracking-handover.js';
import { normalize, subtract, type Intervals } from './intervals.js';
import { findSparse } from './sparse.js';
import { refuseSelfFreeze } from './target-guard.js';

export type { PauseBreakdown } from './pause.js';

export type SnapshotProgress = EngineProgress;

export interface SnapshotOptions {
  name?: string;
  /** A snapshot of this same process (id or name): this one is its next generation, storing only what changed. */
  parent?: string;
  /** Background sweep limit in bytes per second; 0 or undefined = unlimited. */
  rateBytesPerSec?: number;
  onProgress?: (progress: SnapshotProgress) => void;
  /** Aborting stops the snapshot: it is recorded as incomplete. */
  signal?: AbortSignal;
  /** Shared memory that uffd-wp cannot protect (SysV segments) is copied whole
   * during the pause, up to this many bytes in all; beyond that it is listed as lost. */
  maxSharedCopyBytes?: number;
  /** Pages the kernel writes through a long-term pin (io_uring registered buffers) are copied during the
   * pause, up to this many bytes (default PINNED_COPY_MAX_BYTES); beyond that they are listed lost. */
  maxPinnedCopyBytes?: number;
  /** How the target is stopped and its userfaultfd obtained; default: ptrace injection. */
  attacher?: (binding: NativeBinding, pid: number, pidfd: number) => Attacher;
  /** Where copied pages wait for the store (default: memory, then a spill file next to the store). */
  staging?: StagingOptions;
  /**
   * Write-protect the target's bulk while it runs, so that the pause protects only what it
   * wrote since (default true). False: everything is protected in the pause.
   */
  preProtect?: boolean;
  /** Tests: keep the target pre-protected at least this long before the pause. */
  preProtectHoldMillis?: number;
  /** The store's CPU priority once the target runs again (store/priority.ts). Default normal: a
   * library leaves its caller's thread alone unless asked (the CLI asks for idle). */
  priority?: StorePriority;
  /**
   * Keep the target tracked after the snapshot (a keeper process holds its
   * context, core/keeper.ts): the next snapshot with this one as --parent
   * reads only the pages written since.
   */
  track?: boolean;
}

export const DEFAULT_MAX_SHARED_COPY = 512 * 1024 * 1024;

export interface LostPagesEntry {
  address: string;
  pages: number;
  reason: string;
}

export interface SnapshotResult {
  id: number;
  name: string | null;
  pid: number;
  pauseMicros: number;
  durationMillis: number;
  /** From the end of the pause until every page was saved or lost and none protected: the target's writes could wait on wpsnap meanwhile. */
  protectWindowMillis: number;
  /** From the end of the pause until the final commit: the snapshot is durable from then on. */
  durableMillis: number;
  /** Bytes of copied pages that waited for the store at most (memory pool and spill file). */
  stagingBytesPeak: number;
  staging: {
    /** The memory pool's size (touched only as it fills). */
    poolBytes: number;
    /** Of stagingBytesPeak, at most in the spill file. */
    spillBytesPeak: number;
    /** Where the spill file was (unlinked), or null without one. */
    spillDir: string | null;
    spillMaxBytes: number;
    /** Why spilling stopped (the directory filled up), or null. */
    fallback: string | null;
  };
  pagesSaved: number;
  zeroPages: number;
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  lostPages: LostPagesEntry[];
  /** Pages that may be wrong where wpsnap cannot tell which (pins it could not place); empty when none. */
  warnings: string[];
  threads: number;
  /** sparse: of the protected regions, those protected only where populated (their other pages were zero at T). */
  regions: { protected: number; sparse: number; copied: number; filePrivate: number; fileReference: number; skipped: number };
  uffdMethod: UffdMethod;
  /** The pause at T, where it went. pauseMicros is the longest stop: this one or the attach's. */
  pauseBreakdownMicros: PauseBreakdown;
  /** The CPUs the target used (1 = one CPU all along): while wpsnap prepared (to the pause), while
   * protected (the resume to the window's end), while the store compressed (to the final commit). */
  targetCpu: { before: number; window: number; compressing: number };
  /** The store's CPU priority after the pause. */
  priority: StorePriority;
  /** Staging filled up during the window: the store ran at normal priority until the window ended. */
  priorityRaised: boolean;
  /** The target's stops, µs: the attach (with pre-protection, a stop of its own) and the instant T. */
  stops: { attach: number | null; instant: number };
  /** Pre-protection: ranges protected again per round while the target ran, write faults let
   * through meanwhile, and written ranges protected in the pause (-1: all; null: not used). */
  preProtection: {
    attachBreakdownMicros: PreProtection['attachBreakdownMicros'];
    rounds: number[];
    faults: number;
    writtenAtInstant: number | null;
  } | null;
  engine: Omit<EngineFinalStats, 'lost' | 'error'>;
  /** A generation (--parent): its parent's id and what changed since (GenerationStats). */
  parent?: number;
  incremental?: 'compared' | 'tracked';
  dirtyPages?: number;
  changedPages?: number;
  writtenUnchangedPages?: number | null;
  pagesStored?: number;
  /** With track: the keeper that tracks the target from this snapshot's instant on (null: the target exited). */
  tracking?: { keeperPid: number; since: string } | null;
  /** The target was tracked: its keeper's context was taken over (and its log used) by this snapshot. */
  tookOverFrom?: { keeperPid: number; base: number; since: string };
}

/**
 * Before anything else: the process's record, the state a restore will need (fds, cwd, limits, …;
 * read now, before the pause, never in it: readProcessState says why), and a pidfd. What cannot be
 * read (an fd on a filesystem that fails a stat…) costs the state, with a warning, never the snapshot.
 */
export function openTarget(
  binding: NativeBinding,
  pid: number,
): { processRecord: ReturnType<typeof readProcessRecord> & { state?: ProcessState }; state: ProcessState | undefined; stateWarning: string | undefined; pidfd: number } {
  let stateWarning: string | undefined;
  let state: ProcessState | undefined;
  try {
    state = readProcessState(pid);
  } catch (error) {
    if (error instanceof WpsnapError && error.code === 'TARGET_NOT_FOUND') throw error;
    stateWarning = `the process state (fds, cwd, limits…) was not recorded: ${(error as Error).message}`;
  }
  const processRecord = { ...readProcessRecord(pid), ...(state === undefined ? {} : { state }) };
  let pidfd: number;
  try {
    pidfd = binding.pidfdOpen(pid);
  } catch (error) {
    throw fromNative(error, `pidfd_open(${pid})`);
  }
  // Socket options (a restore sets them again): through a copy of each socket's fd, before the pause.
  if (state !== undefined) state = { ...state, fds: withSocketOptions(state.fds, (fd) => binding.socketOptions(pidfd, fd)) };
  return { processRecord, state, stateWarning, pidfd };
}

export async function snapshotProcess(
  binding: NativeBinding,
  store: SnapshotTarget,
  pid: number,
  options: SnapshotOptions = {},
): Promise<SnapshotResult> {
  assertProcessExists(pid);
  refuseSelfFreeze(pid);
  requireFeatures(binding);
  const startedAt = Date.now();
  const opened = openTarget(binding, pid);
  const { processRecord, stateWarning, pidfd } = opened;
  let state = opened.state;
  const targetClock = cpuClock(pid);
  const targetCpu = { before: 0, window: 0, compressing: 0 };
  const priority = options.priority ?? 'normal';
  let storeRaised = false;
  const attacher: Attacher = (options.attacher ?? ptraceAttacher)(binding, pid, pidfd);
  let writer: SnapshotSink | undefined;
  let paused: PauseOutcome | undefined;
  let staging: Staging | undefined;
  let session: EngineSession | undefined;
  let pre: PreProtection | undefined;
  let preFaults = 0;
  const stopEngine = new AbortController();
  const planner = new RegionPlanner(pid);
  let taken: TakenTracking | undefined;
  let keepUffd = false;
  try {
    attacher.prepare();
    // Tracked since the parent, in this store: a tracked generation reads only what was written since.
    const keeper = await keeperStatus(pid); // a peek: the keeper goes on
    const parentRef = options.parent === undefined ? undefined : { ref: options.parent, pid, startTimeTicks: processRecord.startTimeTicks };
    let parentKnown: Intervals | undefined;
    if (parentRef !== undefined && keeper?.state === 'tracking' && keeper.store === store.path && store.parentContent !== undefined) {
      const content = store.parentContent(parentRef);
      if (content.id === keeper.base) parentKnown = subtract(normalize(content.protectedRanges), normalize(content.lost));
    }
    writer = store.beginSnapshot({
      ...(options.name === undefined ? {} : { name: options.name }),
      ...(parentRef === undefined ? {} : { parent: { ...parentRef, incremental: parentKnown === undefined ? 'compared' : 'tracked' } }),
    });
    const processId = writer.addProcess(processRecord);
    const mapsBefore = planner.readMaps();
    planner.prepare(mapsBefore);
    const sparse = findSparse(binding, pid, mapsBefore);
    const copyBuffer = privateCopyBuffer(binding, pid, planner.prepared());
    const pinSources = scanPinSources(pid);
    // Before the pause: nothing between the resume and the engine's start may
    // wait on a filesystem or on fresh memory (the target's first writes wait
    // for the engine).
    // A tracked generation copies about what was written since its parent: a pool
    // the target's size would only cost its touching (~0.3 s a GiB here).
    const expectedBytes = parentKnown !== undefined && keeper !== undefined ? 2 * (keeper.writtenPages + 4096) * 4096 : Infinity;
    staging = openStaging(store.stagingDir, options.staging ?? {}, Math.min(residentBytes(pid), expectedBytes));
    session = new EngineSession(binding, writer, {
      pid,
      pidfd,
      rateBytesPerSec: options.rateBytesPerSec ?? 0,
      processId,
      startedAt,
      onProgress: options.onProgress,
      signals: [options.signal, stopEngine.signal],
      staging: { ...staging, warmBatches: staging.poolBatches },
      onWindowClosed: () => {
        targetCpu.window = targetClock.lap();
        if (priority !== 'normal' && storeRaised) setStorePriority(priority);
      },
      // The target waits on the sweep, the sweep on the store: no idle priority
      // for the store until the window ends (what priority inheritance would do).
      onStagingFull: () => {
        if (priority !== 'normal') {
          storeRaised = true;
          setStorePriority('normal');
        }
      },
      keep: options.track === true,
    });
    const started = session;
    // A keeper's context (tracked target) stands in for pre-protection: no attach stop at all.
    if (keeper !== undefined) taken = await takeOverTracking(binding, pid, processRecord.startTimeTicks);
    let unwrittenSoFar: Intervals = [];
    if (taken !== undefined) {
      const adopted = adoptTracking(binding, taken, session, parentKnown);
      pre = adopted.protection;
      unwrittenSoFar = adopted.unwrittenSoFar;
    } else if (options.preProtect ?? true) {
      pre = await preProtect(binding, {
        pid,
        attacher,
        sparse,
        session,
        holdMillis: options.preProtectHoldMillis,
        forRestore: state !== undefined,
        shared: sharedToPreProtect(planner.prepared()),
      });
    }
    let atInstant: TrackLog | undefined;
    // Ready before the pause: in it, only the final log's few ranges are taken away (natively).
    const unwrittenPairs = BigUint64Array.from(unwrittenSoFar.flat());
    faultPoint('before-freeze');
    const maxSharedCopyBytes = options.maxSharedCopyBytes ?? DEFAULT_MAX_SHARED_COPY;
    // Read now, so that the pause only injects for the signals that have a disposition of their own.
    const forRestore = state === undefined ? undefined : { fds: state.fds, pidfd, ...(pre?.forRestore === undefined ? {} : { early: pre.forRestore }) };
    paused = pause(binding, {
      pid,
      attacher,
      forRestore,
      planner,
      maxSharedCopyBytes,
      sparse,
      copyBuffer,
      pinSources,
      maxPinnedCopyBytes: options.maxPinnedCopyBytes,
      beforeResume: (uffd, plans) => {
        const regions = plans.flatMap((p) => (p.engine ? [p.engine] : []));
        const last = atInstant;
        const parentPages =
          unwrittenPairs.length === 0 || last === undefined || last.overflowed
            ? undefined
            : { unwritten: unwrittenPairs, writtenAtInstant: BigUint64Array.from([...last.written, ...last.invalid]) };
        started.prepareRun(uffd, regions, parentPages);
      },
      afterResume: () => started.go(),
      pre:
        pre === undefined
          ? undefined
          : {
              protection: pre,
              finalLog: () => {
                const log = started.trackTake(true);
                preFaults = log.faults;
                atInstant = log;
                return log;
              },
            },
    });
    if (stateWarning !== undefined) paused.warnings.push(stateWarning);
    if (state !== undefined && paused.forRestore !== undefined) {
      const read = paused.forRestore;
      const completed = { ...state, fds: read.fds, ...(read.signals === undefined ? {} : { signals: read.signals }) };
      writer.setProcessState(processId, completed);
      if (read.warning !== undefined) paused.warnings.push(read.warning);
    }
    const longestStop = Math.max(paused.pauseMicros, pre?.attachStopMicros ?? 0);
    const resumedAt = performance.now();
    const instantAt = new Date().toISOString();
    // What the engine took from the parent unread (as it did, natively, in the pause), and what a keeper will track.
    const unwritten = atInstant === undefined ? [] : unwrittenAtInstant(unwrittenSoFar, atInstant);
    const keptRanges = trackedRanges(paused.plans.flatMap((p) => (p.engine ? [p.engine] : [])));
    // Written since the parent: everything but what is taken from it unread.
    if (parentKnown !== undefined) writer.setDirty(processId, subtract(normalize(paused.plans.map((p): [bigint, bigint] => [p.record.start, p.record.end])), unwritten));
    targetCpu.before = targetClock.lap();
    // From now on the store's work waits for CPUs the target leaves.
    if (priority !== 'normal') setStorePriority(priority);
    writer.recordPause(longestStop, paused.breakdown);
    attacher.release();
    faultPoint('after-resume');
    keepUffd = options.track === true;
    const { stats, lost } = await saveInBackground(binding, writer, processId, paused, session, stopEngine, pid, keepUffd);
    staging.close();
    // The engine's window counts from its run(), in the pause: the protection
    // window as the target sees it starts at the resume.
    const protectWindowMillis = Math.max(0, Math.round(session.ranAt + stats.windowMicros / 1000 - resumedAt));
    faultPoint('before-commit');
    writer.countZeroPages(stats.pagesZero);
    const durationMillis = Date.now() - startedAt;
    const final = await writer.complete({
      pauseMicros: Math.round(longestStop),
      durationMillis,
      protectWindowMillis,
      faults: stats.faults,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
      ...(paused.warnings.length > 0 ? { warnings: paused.warnings } : {}),
    });
    targetCpu.compressing = targetClock.lap();
    // The tracking: to a keeper with this instant as its base (--track), or ended.
    let tracking: SnapshotResult['tracking'];
    if (options.track === true) {
      try {
        tracking = await handTrackingOn(session, paused.uffd, paused.method, taken, {
          pid,
          startTimeTicks: processRecord.startTimeTicks,
          base: writer.id,
          store: store.path ?? '',
          since: instantAt,
          ranges: keptRanges,
        });
        if (tracking === null) paused.warnings.push(`pid ${pid} exited: it is not tracked`);
      } catch (error) {
        // The snapshot is complete; only the tracking is lost (closing our fd releases the target).
        tracking = null;
        paused.warnings.push(`pid ${pid} is not tracked: ${(error as Error).message}`);
      }
    } else if (taken !== undefined) {
      await taken.link.request({ op: 'release' }).catch(() => undefined);
    }
    taken?.link.close();
    closeQuietly(binding, paused.uffd);
    keepUffd = false;
    const { lost: _lost, error: _error, ...engine } = stats;
    const count = (capture: RegionRecord['capture']): number => paused!.plans.filter((p) => p.record.capture === capture).length;
    return {
      id: writer.id,
      name: options.name ?? null,
      pid,
      pauseMicros: Math.round(longestStop),
      durationMillis,
      protectWindowMillis,
      durableMillis: Math.round(performance.now() - resumedAt),
      stagingBytesPeak: stats.stagingBytesPeak,
      staging: {
        poolBytes: stats.poolBytes,
        spillBytesPeak: stats.spillBytesPeak,
        spillDir: staging.dir ?? null,
        spillMaxBytes: staging.spillMaxBytes,
        fallback: stats.stagingFallback ?? null,
      },
      pagesSaved: final.pagesSaved,
      zeroPages: final.zeroPages,
      pagesNew: final.pagesNew,
      bytesRaw: final.bytesRaw,
      bytesStored: final.bytesStored,
      faults: stats.faults,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
      lostPages: lost.map((l) => ({ address: `0x${l.address.toString(16)}`, pages: l.pages, reason: l.reason })),
      warnings: paused.warnings,
      threads: paused.threads.length,
      regions: {
        protected: count('protected'),
        sparse: paused.sparseRegions,
        copied: count('copied'),
        filePrivate: count('file-private'),
        fileReference: count('file-reference'),
        skipped: count('skipped'),
      },
      uffdMethod: paused.method,
      pauseBreakdownMicros: paused.breakdown,
      targetCpu,
      priority,
      priorityRaised: storeRaised,
      stops: { attach: pre === undefined ? null : Math.round(pre.attachStopMicros), instant: Math.round(paused.pauseMicros) },
      preProtection:
        pre === undefined
          ? null
          : { attachBreakdownMicros: pre.attachBreakdownMicros, rounds: pre.rounds, faults: preFaults, writtenAtInstant: paused.writtenAtInstant },
      ...(final.generation === undefined
        ? {}
        : {
            parent: final.generation.parent,
            incremental: final.generation.incremental,
            dirtyPages: final.generation.dirtyPages,
            changedPages: final.generation.changedPages,
            writtenUnchangedPages: final.generation.writtenUnchangedPages,
            pagesStored: final.generation.pagesStored,
          }),
      engine,
      ...(tracking === undefined ? {} : { tracking }),
      ...(taken === undefined ? {} : { tookOverFrom: { keeperPid: taken.keeperPid, base: taken.tracking.base, since: taken.tracking.since } }),
    };
  } catch (error) {
    // The engine first: while it tracks, it reads the userfaultfd closed next.
    session?.close();
    // A kept engine serves the target's faults after its run: stop it once its run is over.
    if (keepUffd && session !== undefined) {
      session.stop();
      await session.done.catch(() => undefined);
      try {
        session.endKeep();
      } catch {
        // ended already
      }
    }
    // The keeper closes its copy of the context once we are gone: the target is released.
    taken?.link.close();
    if (paused) closeQuietly(binding, paused.uffd);
    else if (pre) closeQuietly(binding, pre.uffd);
    if (writer) await writer.abort(error instanceof Error ? error.message : String(error)).catch(() => undefined);
    throw error;
  } finally {
    if (priority !== 'normal') setStorePriority('normal'); // for whoever calls next; a CLI exits anyway
    session?.close();
    staging?.close();
    planner.release();
    attacher.release();
    closeQuietly(binding, pidfd);
    for (const plan of paused?.plans ?? []) if (plan.openedFd !== undefined) closeSync(plan.openedFd);
  }
}

/**
 * After the pause: run the engine while the metadata and the pages copied in
 * the pause are stored, release the target, and record what was lost. Throws
 * (after recording the snapshot as incomplete) if the engine failed or was
 * interrupted; with memberOfGroup, a target that exited or called exec is not
 * a failure (its unsaved pages are lost with that reason, `exited` says so):
 * the group's other members go on.
 */
export async function saveInBackground(
  binding: NativeBinding,
  writer: SnapshotSink,
  processId: number,
  paused: PauseOutcome,
  session: EngineSession,
  stopEngine: AbortController,
  pid: number,
  keepUffd: boolean,
  memberOfGroup = false,
): Promise<{ stats: EngineFinalStats; lost: LostRange[]; exited: boolean }> {
  // The engine runs since the pause: the target's first writes to protected
  // pages wait for it. The metadata and the pages copied in the pause are
  // stored meanwhile (the first batch also starts the store's workers).
  const engineDone = session.done;
  let pausedStored: Promise<unknown>;
  const initialLost = [...paused.plans.flatMap((p): LostRange[] => (p.lost ? [p.lost] : [])), ...paused.pinnedLost];
  try {
    writer.addThreads(processId, paused.threads);
    writer.addRegions(processId, paused.plans.map((p): RegionRecord => p.record));
    if (initialLost.length > 0) writer.addLost(processId, initialLost);
    pausedStored = Promise.all(paused.pausedPages.map((batch) => writer.addPages(processId, batch)));
  } catch (error) {
    stopEngine.abort();
    await engineDone.catch(() => undefined);
    throw error;
  }
  pausedStored.catch(() => undefined); // surfaced below, once the engine has stopped
  const stats = await engineDone;
  await pausedStored;
  // Every page is saved: closing the only reference drops the registrations
  // (kept for tracking: the engine goes on serving it until it is handed on).
  if (!keepUffd) closeQuietly(binding, paused.uffd);
  const engineLost: LostRange[] = stats.lost.map((l) => ({ address: l.address, pages: l.pages, reason: l.reason as LostRange['reason'] }));
  if (engineLost.length > 0) writer.addLost(processId, engineLost);
  // ESRCH is the engine's "the target exited or called exec" (engine_segments.c target_gone).
  const exited = stats.error !== undefined && stats.error.errno === 3;
  if (stats.error && !(memberOfGroup && exited && !stats.stopped)) {
    const error = fromNative(stats.error, `snapshot of pid ${pid}`);
    await writer.abort(error.message);
    throw error;
  }
  if (stats.stopped) {
    await writer.abort('interrupted');
    throw new WpsnapError('INTERRUPTED', `snapshot of pid ${pid} interrupted; recorded as incomplete`);
  }
  return { stats, lost: [...initialLost, ...engineLost], exited };
}

/**
 * --track, once the snapshot is complete: stop the engine serving the
 * context, and hand it with every write since T to a keeper: the one it was
 * taken over from, or a new one. Null if the target exited.
 */
async function handTrackingOn(
  session: EngineSession,
  uffd: number,
  method: UffdMethod,
  taken: TakenTracking | undefined,
  base: { pid: number; startTimeTicks: number; base: number; store: string; since: string; ranges: BigUint64Array },
): Promise<{ keeperPid: number; since: string } | null> {
  const kept = session.endKeep();
  if (kept === null || kept.exited) {
    if (taken !== undefined) await taken.link.request({ op: 'release' }).catch(() => undefined);
    return null;
  }
  const tracking: TrackingState = {
    base: base.base,
    store: base.store,
    since: base.since,
    method,
    ranges: base.ranges,
    written: logIntervals(kept.written),
    invalid: logIntervals(kept.invalid),
    overflowed: kept.overflowed || kept.forks > 0, // a child may write shared memory without a fault here
  };
  if (taken !== undefined) {
    await taken.link.request({ op: 'adopt', ...encodeTracking(tracking) });
    return { keeperPid: taken.keeperPid, since: base.since };
  }
  const { keeperPid } = await startKeeper(base.pid, base.startTimeTicks, uffd, tracking);
  return { keeperPid, since: base.since };
}
