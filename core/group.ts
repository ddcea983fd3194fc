// Snapshot several processes at one instant T (issue 12): every member is
// prepared as a single snapshot is (core/snapshot.ts: its state, its plan,
// its pre-protection, its engine), then the pause stops every thread of every
// member before it protects any, and resumes them only once all are protected
// (core/pause.ts TargetPause, step by step). Each member has its own engine on
// its own userfaultfd; the files several members map share their page states
// (core/native/engine_group.c), so each of their pages is copied once, before
// any member's write to it lands, and the store indexes it for every member
// that maps it (store/shared-pages.ts).
import { closeSync, fstatSync } from 'node:fs';
import type { LostRange, ProcessState } from '../snapshot-format/model.js';
import type { UffdMethod } from './attach.js';
import type { Attacher } from './attacher.js';
import { REGION_KIND } from './constants.js';
import { EngineSession, type EngineProgress } from './engine-session.js';
import { WpsnapError, fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import { requireFeatures } from './features.js';
import type { EngineFinalStats, NativeBinding, NativeHandle } from './native/binding.js';
import { closeQuietly, stopwatch, TargetPause, type PauseBreakdown, type PauseOutcome } from './pause.js';
import { privateCopyBuffer } from './paused-copy.js';
import { scanPinSources } from './pinned.js';
import { preProtect, protectAgainInRounds, type PreProtection } from './preprotect.js';
import { assertProcessExists } from './procfs.js';
import { ptraceAttacher } from './ptrace-attacher.js';
import { RegionPlanner, sharedToPreProtect, type RegionPlan } from './regions.js';
import type { SnapshotSink, SnapshotTarget } from './sink.js';
import { DEFAULT_MAX_SHARED_COPY, openTarget, saveInBackground, type LostPagesEntry } from './snapshot.js';
import { findSparse, type SparseIntervals } from './sparse.js';
import { openStaging, residentBytes, type Staging, type StagingOptions } from './staging.js';
import { refuseSelfFreeze } from './target-guard.js';
import { setStorePriority, type StorePriority } from '../store/priority.js';

export interface GroupMember {
  pid: number;
  /** How it is stopped and its userfaultfd obtained (default ptrace injection; a cooperative agent: core/agent-attacher.ts). */
  attacher?: (binding: NativeBinding, pid: number, pidfd: number) => Attacher;
}

export interface GroupProgress extends EngineProgress {
  /** Members whose engine still runs. */
  running: number;
}

export interface GroupSnapshotOptions {
  name?: string;
  /** Background sweep limit in bytes per second, shared by the members' engines; 0 or undefined = unlimited. */
  rateBytesPerSec?: number;
  onProgress?: (progress: GroupProgress) => void;
  /** Aborting stops every member's engine: the snapshot is recorded as incomplete. */
  signal?: AbortSignal;
  maxSharedCopyBytes?: number;
  maxPinnedCopyBytes?: number;
  staging?: StagingOptions;
  /** Write-protect each member's bulk while it runs, before the group's pause (default true). */
  preProtect?: boolean;
  preProtectHoldMillis?: number;
  priority?: StorePriority;
}

export interface GroupProcessResult {
  pid: number;
  threads: number;
  /** Pages this member's engine saved (a shared page counts for the member that saved it). */
  pagesSaved: number;
  zeroPages: number;
  faults: number;
  faultP99Micros: number;
  lostPages: LostPagesEntry[];
  /** It exited (or called exec) during the snapshot: its unsaved private pages are lost with that reason. */
  exited: boolean;
  uffdMethod: UffdMethod;
  /** This member's share of the pause, by phase. */
  pauseBreakdownMicros: PauseBreakdown;
  /** Its attach stop with pre-protection (µs), before the group's pause; null without. */
  attachStopMicros: number | null;
  /** The engine's statistics (EAGAIN retries, events, …). */
  engine: Omit<EngineFinalStats, 'lost' | 'error'>;
}

export interface GroupSnapshotResult {
  id: number;
  name: string | null;
  /** From the first member's freeze to the last one's resume: every member is stopped at most this long at T. */
  pauseMicros: number;
  /** The pause's phases summed over the members (freeze: stopping every member). */
  pauseBreakdownMicros: PauseBreakdown;
  durationMillis: number;
  protectWindowMillis: number;
  pagesSaved: number;
  zeroPages: number;
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  /** Files mapped by more than one member, and the index entries that give their pages to the members that did not save them. */
  shared: { objects: number; pagesAliased: number };
  lostPages: Array<LostPagesEntry & { pid: number }>;
  warnings: string[];
  processes: GroupProcessResult[];
}

/** One member, prepared before the pause. */
interface Prepared {
  pid: number;
  pidfd: number;
  attacher: Attacher;
  planner: RegionPlanner;
  sparse: SparseIntervals;
  copyBuffer: Buffer | undefined;
  pinSources: ReturnType<typeof scanPinSources>;
  staging: Staging;
  session: EngineSession;
  processId: number;
  state: ProcessState | undefined;
  /** Why the state was not recorded (a warning of the snapshot), if it was not. */
  stateWarning: string | undefined;
  pre: PreProtection | undefined;
  progress: EngineProgress | undefined;
  done: boolean;
}

/** Each member's file mappings, keyed by the file ("dev inode" as in maps). */
type SharedFiles = Map<string, Array<{ member: number; plan: RegionPlan }>>;

function sharedFilesOf(plansByMember: RegionPlan[][]): SharedFiles {
  const files: SharedFiles = new Map();
  plansByMember.forEach((plans, member) => {
    for (const plan of plans) {
      const r = plan.record;
      if (r.perms[3] !== 's' || r.inode === 0 || (r.capture !== 'protected' && r.capture !== 'copied')) continue;
      const key = `${r.dev} ${r.inode}`;
      files.set(key, [...(files.get(key) ?? []), { member, plan }]);
    }
  });
  for (const [key, mappings] of files) if (new Set(mappings.map((m) => m.member)).size < 2) files.delete(key);
  return files;
}

/** The native page states of the shared files the engines save (each member's plan marked groupShared). */
function createGroupState(binding: NativeBinding, files: SharedFiles): NativeHandle {
  const objects = new Map<string, { dev: bigint; ino: bigint; pages: number }>();
  for (const mappings of files.values()) {
    for (const { plan } of mappings) {
      const engine = plan.engine;
      if (engine?.kind !== REGION_KIND.file || engine.fd === undefined) continue;
      const st = fstatSync(engine.fd, { bigint: true });
      const key = `${st.dev}:${st.ino}`;
      const pages = Number((engine.fileOffset ?? 0n) / 4096n + (engine.end - engine.start) / 4096n);
      const known = objects.get(key);
      objects.set(key, { dev: st.dev, ino: st.ino, pages: Math.max(pages, known?.pages ?? 0) });
      engine.groupShared = true;
    }
  }
  try {
    return binding.groupCreate([...objects.values()]);
  } catch (error) {
    throw fromNative(error, 'the group\'s shared memory state');
  }
}

async function prepareMember(
  binding: NativeBinding,
  writer: SnapshotSink,
  store: SnapshotTarget,
  member: GroupMember,
  group: ReadonlySet<number>,
  options: GroupSnapshotOptions,
  signals: AbortSignal[],
  startedAt: number,
  onProgress: (p: Prepared, progress: EngineProgress) => void,
  opened: Prepared[],
): Promise<Prepared> {
  const { pid } = member;
  const { processRecord: record, state, stateWarning, pidfd } = openTarget(binding, pid);
  const attacher = (member.attacher ?? ptraceAttacher)(binding, pid, pidfd);
  const planner = new RegionPlanner(pid, group);
  // Registered as soon as it holds anything to release: the caller's finally releases what was opened.
  const partial = { pid, pidfd, attacher, planner } as Prepared;
  opened.push(partial);
  attacher.prepare();
  const processId = writer.addProcess(record);
  const maps = planner.readMaps();
  planner.prepare(maps);
  const sparse = findSparse(binding, pid, maps);
  const copyBuffer = privateCopyBuffer(binding, pid, planner.prepared());
  const pinSources = scanPinSources(pid);
  partial.staging = openStaging(store.stagingDir, options.staging ?? {}, residentBytes(pid));
  const rate = options.rateBytesPerSec === undefined || options.rateBytesPerSec <= 0 ? 0 : Math.max(1, Math.floor(options.rateBytesPerSec / group.size));
  partial.session = new EngineSession(binding, writer, {
    pid,
    pidfd,
    rateBytesPerSec: rate,
    processId,
    startedAt,
    onProgress: (progress) => onProgress(partial, progress),
    signals,
    staging: { ...partial.staging, warmBatches: partial.staging.poolBatches },
  });
  Object.assign(partial, { sparse, copyBuffer, pinSources, processId, state, stateWarning, progress: undefined, done: false });
  if (options.preProtect ?? true) {
    const shared = sharedToPreProtect(planner.prepared());
    partial.pre = await preProtect(binding, { pid, attacher, sparse, session: partial.session, holdMillis: options.preProtectHoldMillis, forRestore: state !== undefined, shared });
  }
  return partial;
}

function sumBreakdowns(breakdowns: PauseBreakdown[]): PauseBreakdown {
  const sum: PauseBreakdown = { freeze: 0, inject: 0, restoreState: 0, plan: 0, protect: 0, copy: 0, engine: 0, thaw: 0 };
  for (const b of breakdowns) for (const k of Object.keys(sum) as Array<keyof PauseBreakdown>) sum[k] += b[k];
  for (const k of Object.keys(sum) as Array<keyof PauseBreakdown>) sum[k] = Math.round(sum[k]);
  return sum;
}

/** The pages of shared files no engine saved nor lost (every member that maps them exited first): lost for each member. */
function unsavedSharedPages(binding: NativeBinding, group: NativeHandle, files: SharedFiles, prepared: Prepared[]): Map<number, LostRange[]> {
  const lost = new Map<number, LostRange[]>();
  for (const object of binding.groupUnsaved(group)) {
    for (const mappings of files.values()) {
      for (const { member, plan } of mappings) {
        const engine = plan.engine;
        if (engine?.fd === undefined || !engine.groupShared) continue;
        const st = fstatSync(engine.fd, { bigint: true });
        if (st.dev !== object.dev || st.ino !== object.ino) continue;
        const first = (engine.fileOffset ?? 0n) / 4096n;
        const pages = (engine.end - engine.start) / 4096n;
        for (let i = 0; i < object.pages.length; i += 2) {
          const from = object.pages[i]! > first ? object.pages[i]! : first;
          const to = object.pages[i + 1]! < first + pages ? object.pages[i + 1]! : first + pages;
          if (from >= to) continue;
          const processId = prepared[member]!.processId;
          lost.set(processId, [...(lost.get(processId) ?? []), { address: engine.start + (from - first) * 4096n, pages: Number(to - from), reason: 'target-exited' }]);
        }
      }
    }
  }
  return lost;
}

const lostEntry = (l: LostRange): LostPagesEntry => ({ address: `0x${l.address.toString(16)}`, pages: l.pages, reason: l.reason });

export async function snapshotGroup(binding: NativeBinding, store: SnapshotTarget, members: GroupMember[], options: GroupSnapshotOptions = {}): Promise<GroupSnapshotResult> {
  const pids = members.map((m) => m.pid);
  if (pids.length === 0) throw new WpsnapError('USAGE', 'a group snapshot needs at least one process');
  if (new Set(pids).size !== pids.length) throw new WpsnapError('USAGE', `a process is named twice: ${pids.join(', ')}`);
  for (const pid of pids) {
    assertProcessExists(pid);
    refuseSelfFreeze(pid);
  }
  requireFeatures(binding);
  const startedAt = Date.now();
  const priority = options.priority ?? 'normal';
  const stopEngines = new AbortController();
  const signals = [options.signal, stopEngines.signal].filter((s): s is AbortSignal => s !== undefined);
  const opened: Prepared[] = [];
  let writer: SnapshotSink | undefined;
  let outcomes: PauseOutcome[] = [];
  const reportProgress = (): void => {
    const known = opened.filter((p) => p.progress !== undefined).map((p) => p.progress!);
    if (known.length === 0 || options.onProgress === undefined) return;
    const sum = (k: 'batchesPending' | 'stagingBytes' | 'pagesDone' | 'zeroPages' | 'totalPages' | 'bytesCopied' | 'faults'): number => known.reduce((a, p) => a + p[k], 0);
    options.onProgress({
      phase: known.every((p) => p.phase === 'compressing') ? 'compressing' : 'saving',
      batchesPending: sum('batchesPending'),
      stagingBytes: sum('stagingBytes'),
      pagesDone: sum('pagesDone'),
      zeroPages: sum('zeroPages'),
      totalPages: sum('totalPages'),
      bytesCopied: sum('bytesCopied'),
      faults: sum('faults'),
      elapsedMillis: Date.now() - startedAt,
      running: opened.filter((p) => !p.done).length,
    });
  };
  try {
    writer = store.beginSnapshot(options.name === undefined ? {} : { name: options.name });
    const group = new Set(pids);
    // One tracer helper waiting per member, started now: none starts in the pause, nor just before it.
    binding.prepareFreeze(members.length);
    const prepared: Prepared[] = [];
    for (const member of members) {
      prepared.push(await prepareMember(binding, writer, store, member, group, options, signals, startedAt, (p, progress) => {
        p.progress = progress;
        reportProgress();
      }, opened));
    }
    binding.prepareFreeze(members.length);
    // The first members were pre-protected while the others attached: what they wrote since would all be
    // protected in the pause. A last round for every member, right before it, leaves only what each
    // writes in the milliseconds between.
    for (const p of prepared) {
      if (p.pre === undefined) continue;
      const again = protectAgainInRounds(binding, p.pre.uffd, p.session, p.pre.covered);
      p.pre = { ...p.pre, covered: again.covered, rounds: [...p.pre.rounds, ...again.rounds] };
    }
    faultPoint('before-freeze');
    let groupState: NativeHandle | undefined;
    const copiedFiles = new Set<string>();
    const pauses = prepared.map(
      (p) =>
        new TargetPause(binding, {
        pid: p.pid,
        attacher: p.attacher,
        planner: p.planner,
        maxSharedCopyBytes: options.maxSharedCopyBytes ?? DEFAULT_MAX_SHARED_COPY,
        copiedFiles,
        sparse: p.sparse,
        copyBuffer: p.copyBuffer,
        pinSources: p.pinSources,
        maxPinnedCopyBytes: options.maxPinnedCopyBytes,
        beforeResume: (uffd, plans) => p.session.prepareRun(uffd, plans.flatMap((plan) => (plan.engine ? [plan.engine] : [])), undefined, groupState),
        pre: p.pre === undefined ? undefined : { protection: p.pre, finalLog: () => p.session.trackTake(true) },
      }),
    );
    // The pause: every member stopped before any is protected, resumed once all are.
    const clock = stopwatch();
    const stopped: TargetPause[] = [];
    let files: SharedFiles;
    try {
      for (const target of pauses) {
        target.stop();
        stopped.push(target);
      }
      for (const target of pauses) target.protect();
      files = sharedFilesOf(pauses.map((t) => t.plans));
      groupState = createGroupState(binding, files);
      for (const target of pauses) target.startEngine();
    } catch (error) {
      for (const target of stopped) target.abandon();
      throw error;
    }
    for (const target of pauses) target.thaw();
    const pauseMicros = Math.round(clock.total());
    // Every engine starts once every member runs (started earlier, an engine thread took the CPU the next
    // thaws needed), and before anything else: the members' first writes wait for them.
    for (const p of prepared) p.session.go();
    outcomes = pauses.map((t) => t.outcome());
    const resumedAt = performance.now();
    const breakdown = sumBreakdowns(outcomes.map((o) => o.breakdown));
    writer.recordPause(pauseMicros, breakdown);
    if (priority !== 'normal') setStorePriority(priority);
    for (const p of prepared) p.attacher.release();
    faultPoint('after-resume');
    const sink = writer;
    const saved = await Promise.allSettled(
      prepared.map((p, i) => {
        const outcome = outcomes[i]!;
        if (p.state !== undefined && outcome.forRestore !== undefined) {
          const read = outcome.forRestore;
          sink.setProcessState(p.processId, { ...p.state, fds: read.fds, ...(read.signals === undefined ? {} : { signals: read.signals }) });
        }
        return saveInBackground(binding, sink, p.processId, outcome, p.session, stopEngines, p.pid, false, true).finally(() => {
          p.done = true;
          p.staging.close();
        });
      }),
    );
    const failed = saved.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    const results = saved.map((s) => (s as PromiseFulfilledResult<Awaited<ReturnType<typeof saveInBackground>>>).value);
    faultPoint('before-commit');
    const unsaved = unsavedSharedPages(binding, groupState, files, prepared);
    for (const [processId, lost] of unsaved) writer.addLost(processId, lost);
    const fileMappings = [...files.values()].map((mappings) =>
      mappings.map(({ member, plan }) => ({ processId: prepared[member]!.processId, start: plan.record.start, end: plan.record.end, firstPage: Number(plan.record.offset / 4096n) })),
    );
    const pagesAliased = fileMappings.length > 0 && writer.shareAcross !== undefined ? await writer.shareAcross(fileMappings) : 0;
    const stats = results.map((r) => r.stats);
    writer.countZeroPages(stats.reduce((a, s) => a + s.pagesZero, 0));
    const protectWindowMillis = Math.max(0, ...prepared.map((p, i) => Math.round(p.session.ranAt + stats[i]!.windowMicros / 1000 - resumedAt)));
    const warnings = [
      ...outcomes.flatMap((o) => o.warnings),
      ...prepared.flatMap((p) => (p.stateWarning === undefined ? [] : [`pid ${p.pid}: ${p.stateWarning}`])),
      ...outcomes.flatMap((o, i) => (o.forRestore?.warning === undefined ? [] : [`pid ${prepared[i]!.pid}: ${o.forRestore.warning}`])),
      ...prepared.filter((_, i) => results[i]!.exited).map((p) => `pid ${p.pid} exited during the snapshot: its unsaved private pages are listed lost`)];
    const durationMillis = Date.now() - startedAt;
    const faults = stats.reduce((a, s) => a + s.faults, 0);
    const final = await writer.complete({
      pauseMicros,
      durationMillis,
      protectWindowMillis,
      faults,
      faultP50Micros: Math.max(0, ...stats.map((s) => s.faultServiceP50Micros)),
      faultP99Micros: Math.max(0, ...stats.map((s) => s.faultServiceP99Micros)),
      ...(warnings.length > 0 ? { warnings } : {}),
    });
    const processes: GroupProcessResult[] = prepared.map((p, i) => {
      const r = results[i]!;
      const { lost: _lost, error: _error, ...engine } = r.stats;
      const lostPages = [...r.lost, ...(unsaved.get(p.processId) ?? [])].map(lostEntry);
      return {
        pid: p.pid,
        threads: outcomes[i]!.threads.length,
        pagesSaved: r.stats.pagesFromFaults + r.stats.pagesFromSweep,
        zeroPages: r.stats.pagesZero,
        faults: r.stats.faults,
        faultP99Micros: r.stats.faultServiceP99Micros,
        lostPages,
        exited: r.exited,
        uffdMethod: outcomes[i]!.method,
        pauseBreakdownMicros: sumBreakdowns([outcomes[i]!.breakdown]),
        attachStopMicros: p.pre === undefined ? null : Math.round(p.pre.attachStopMicros),
        engine,
      };
    });
    return {
      id: writer.id,
      name: options.name ?? null,
      pauseMicros,
      pauseBreakdownMicros: breakdown,
      durationMillis,
      protectWindowMillis,
      pagesSaved: final.pagesSaved,
      zeroPages: final.zeroPages,
      pagesNew: final.pagesNew,
      bytesRaw: final.bytesRaw,
      bytesStored: final.bytesStored,
      shared: { objects: files.size, pagesAliased },
      lostPages: processes.flatMap((p) => p.lostPages.map((l) => ({ pid: p.pid, ...l }))),
      warnings,
      processes,
    };
  } catch (error) {
    // Every engine stops; closing each userfaultfd (the only reference) releases every member.
    stopEngines.abort();
    for (const p of opened) p.session?.close();
    await Promise.all(opened.map((p) => (p.session?.ranAt ? p.session.done.catch(() => undefined) : undefined)));
    // A member whose save ended closed its own (saveInBackground).
    outcomes.forEach((o, i) => {
      if (opened[i]?.done !== true) closeQuietly(binding, o.uffd);
    });
    if (outcomes.length === 0) for (const p of opened) if (p.pre !== undefined) closeQuietly(binding, p.pre.uffd);
    if (writer) await writer.abort(error instanceof Error ? error.message : String(error)).catch(() => undefined);
    throw error;
  } finally {
    if (priority !== 'normal') setStorePriority('normal');
    for (const p of opened) {
      p.session?.close();
      p.staging?.close();
      p.planner.release();
      p.attacher.release();
      closeQuietly(binding, p.pidfd);
    }
    for (const o of outcomes) for (const plan of o.plans) if (plan.openedFd !== undefined) closeSync(plan.openedFd);
  }
}
