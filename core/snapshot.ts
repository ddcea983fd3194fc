// Snapshot one running process, stage by stage: plan before the pause
// (core/regions.ts, core/sparse.ts, core/paused-copy.ts), the pause through
// an attacher (core/pause.ts, core/ptrace-attacher.ts), then the engine run
// (core/engine-session.ts) into the store, ending in its final commit.
import { closeSync } from 'node:fs';
import type { LostRange, RegionRecord } from '../snapshot-format/model.js';
import type { UffdMethod } from './attach.js';
import type { Attacher } from './attacher.js';
import { runEngine, type EngineProgress } from './engine-session.js';
import { WpsnapError, fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import { requireFeatures } from './features.js';
import type { EngineFinalStats, NativeBinding } from './native/binding.js';
import { closeQuietly, pause, type PauseBreakdown, type PauseOutcome } from './pause.js';
import { privateCopyBuffer } from './paused-copy.js';
import { scanPinSources } from './pinned.js';
import type { SnapshotSink, SnapshotTarget } from './sink.js';
import { assertProcessExists, readProcessRecord } from './procfs.js';
import { ptraceAttacher } from './ptrace-attacher.js';
import { RegionPlanner } from './regions.js';
import { findSparse } from './sparse.js';
import { refuseSelfFreeze } from './target-guard.js';

export type { PauseBreakdown } from './pause.js';

export type SnapshotProgress = EngineProgress;

export interface SnapshotOptions {
  name?: string;
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
  pauseBreakdownMicros: PauseBreakdown;
  engine: Omit<EngineFinalStats, 'lost' | 'error'>;
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
  const processRecord = readProcessRecord(pid);
  let pidfd: number;
  try {
    pidfd = binding.pidfdOpen(pid);
  } catch (error) {
    throw fromNative(error, `pidfd_open(${pid})`);
  }
  const attacher: Attacher = (options.attacher ?? ptraceAttacher)(binding, pid, pidfd);
  let writer: SnapshotSink | undefined;
  let paused: PauseOutcome | undefined;
  const planner = new RegionPlanner(pid);
  try {
    attacher.prepare();
    writer = store.beginSnapshot(options.name === undefined ? {} : { name: options.name });
    const processId = writer.addProcess(processRecord);
    const mapsBefore = planner.readMaps();
    planner.prepare(mapsBefore);
    const sparse = findSparse(binding, pid, mapsBefore);
    const copyBuffer = privateCopyBuffer(binding, pid, planner.prepared());
    const pinSources = scanPinSources(pid);
    faultPoint('before-freeze');
    const maxSharedCopyBytes = options.maxSharedCopyBytes ?? DEFAULT_MAX_SHARED_COPY;
    paused = pause(binding, {
      pid,
      attacher,
      planner,
      maxSharedCopyBytes,
      sparse,
      copyBuffer,
      pinSources,
      maxPinnedCopyBytes: options.maxPinnedCopyBytes,
    });
    const resumedAt = performance.now();
    writer.recordPause(paused.pauseMicros, paused.breakdown);
    attacher.release();
    faultPoint('after-resume');
    const { stats, lost, engineStartedAt } = await saveInBackground(binding, writer, processId, paused, { pid, pidfd, startedAt, options });
    const protectWindowMillis = Math.round(engineStartedAt - resumedAt + stats.windowMicros / 1000);
    faultPoint('before-commit');
    writer.countZeroPages(stats.pagesZero);
    const durationMillis = Date.now() - startedAt;
    const final = await writer.complete({
      pauseMicros: Math.round(paused.pauseMicros),
      durationMillis,
      protectWindowMillis,
      faults: stats.faults,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
      ...(paused.warnings.length > 0 ? { warnings: paused.warnings } : {}),
    });
    const { lost: _lost, error: _error, ...engine } = stats;
    const count = (capture: RegionRecord['capture']): number => paused!.plans.filter((p) => p.record.capture === capture).length;
    return {
      id: writer.id,
      name: options.name ?? null,
      pid,
      pauseMicros: Math.round(paused.pauseMicros),
      durationMillis,
      protectWindowMillis,
      durableMillis: Math.round(performance.now() - resumedAt),
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
      engine,
    };
  } catch (error) {
    if (paused) closeQuietly(binding, paused.uffd);
    if (writer) await writer.abort(error instanceof Error ? error.message : String(error)).catch(() => undefined);
    throw error;
  } finally {
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
 * interrupted.
 */
async function saveInBackground(
  binding: NativeBinding,
  writer: SnapshotSink,
  processId: number,
  paused: PauseOutcome,
  context: { pid: number; pidfd: number; startedAt: number; options: SnapshotOptions },
): Promise<{ stats: EngineFinalStats; lost: LostRange[]; engineStartedAt: number }> {
  const { pid, options } = context;
  // The engine starts first: the target is running and its first writes to
  // protected pages wait for it. The metadata and the pages copied in the
  // pause are stored meanwhile (the first batch also starts the store's workers).
  const stopEngine = new AbortController();
  const engineStartedAt = performance.now();
  const engineDone = runEngine(binding, writer, {
    pid,
    uffd: paused.uffd,
    pidfd: context.pidfd,
    plans: paused.plans,
    rateBytesPerSec: options.rateBytesPerSec ?? 0,
    processId,
    startedAt: context.startedAt,
    onProgress: options.onProgress,
    signals: [options.signal, stopEngine.signal],
  });
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
  // Every page is saved: closing the only reference drops the registrations.
  closeQuietly(binding, paused.uffd);
  const engineLost: LostRange[] = stats.lost.map((l) => ({ address: l.address, pages: l.pages, reason: l.reason as LostRange['reason'] }));
  if (engineLost.length > 0) writer.addLost(processId, engineLost);
  if (stats.error) {
    const error = fromNative(stats.error, `snapshot of pid ${pid}`);
    await writer.abort(error.message);
    throw error;
  }
  if (stats.stopped) {
    await writer.abort('interrupted');
    throw new WpsnapError('INTERRUPTED', `snapshot of pid ${pid} interrupted; recorded as incomplete`);
  }
  return { stats, lost: [...initialLost, ...engineLost], engineStartedAt };
}
