// Pre-copy (CRIU's pre-dump, with uffd-wp instead of soft-dirty): copy the
// target's memory while it runs, then, round after round, only what it wrote
// since the previous round, until what is left fits the pause budget; then
// stop every thread, copy that rest and the registers, and let it go. Each
// round is a generation of the previous one (store: 'tracked'), so the result
// is an ordinary chain whose last generation is exact at its instant: every
// page not written since its last copy still holds what was copied, and the
// tracker (core/tracker.ts) misses no write.
//
// Rounds before the last are copied while the target runs: each holds pages
// from different moments and is marked so (stats.warnings); only the last is
// a snapshot at one instant.
import { WpsnapError, usageError } from '../common/errors.js';
import type { PageBatch, RegionRecord, ThreadRecord } from '../snapshot-format/model.js';
import type { Attacher } from './attacher.js';
import { normalize, type Intervals } from './intervals.js';
import type { NativeBinding } from './native/binding.js';
import { closeQuietly, stopwatch } from './pause.js';
import { assertProcessExists, readMaps, readProcessRecord, threadName } from './procfs.js';
import { ptraceAttacher } from './ptrace-attacher.js';
import { planRegionWithoutFile, type RegionPlan } from './regions.js';
import type { SnapshotSink, SnapshotTarget } from './sink.js';
import { refuseSelfFreeze } from './target-guard.js';
import { DirtyTracker, type DirtyRound, type TrackerKind } from './tracker.js';

/** Pages handed to the store per batch. */
const BATCH_PAGES = 512;
/** What a stop costs besides the copy (freeze, scan, thaw), µs: measured on the first stop, this until then. */
const STOP_OVERHEAD_MICROS = 3000;
export const DEFAULT_MAX_ROUNDS = 30;

export interface PrecopyRound {
  round: number;
  /** The generation this round stored. */
  generation: number;
  pages: number;
  bytes: number;
  millis: number;
  /** Pages written per second while the previous round was copied (0 for round 0). */
  dirtyPagesPerSec: number;
}

export interface PrecopyOptions {
  /** The final stop must fit this (µs, > 0). */
  maxPauseMicros: number;
  maxRounds?: number;
  tracker?: Exclude<TrackerKind, 'soft-dirty'>;
  /** Name of the last generation. */
  name?: string;
  onRound?: (round: PrecopyRound) => void;
  onWarning?: (line: string) => void;
  signal?: AbortSignal;
  attacher?: (binding: NativeBinding, pid: number, pidfd: number) => Attacher;
}

export interface PrecopyResult {
  /** The last generation: exact at the final stop. */
  id: number;
  rounds: PrecopyRound[];
  finalPauseMicros: number;
  generations: number[];
  /** The remaining dirty set fitted the budget before the last round (false: --max-rounds, or it could not converge). */
  converged: boolean;
  warnings: string[];
}

const FUZZY = 'a pre-copy round: its pages were copied while the target ran, not at one instant (the last generation of the chain is exact)';

/** The first `pages` pages of a copy, as store batches (each its own memory: the copy's buffer is not kept). */
function* asBatches(addresses: BigUint64Array, data: Buffer, pages: number): Generator<PageBatch> {
  for (let at = 0; at < pages; at += BATCH_PAGES) {
    const end = Math.min(pages, at + BATCH_PAGES);
    yield { addresses: addresses.slice(at, end), data: Buffer.from(data.subarray(at * 4096, end * 4096)) };
  }
}

/** Bytes of address space examined per copy call: bounds the pagemap array and the copied data held at once. */
const CHUNK_BYTES = 64n << 20n;

/**
 * Ranges of `width` numbers ([start, end, …rest]) cut into pieces of at most
 * CHUNK_BYTES and read in groups of about that much, as store batches: the
 * copy held at once stays bounded.
 */
function* inChunks(ranges: bigint[], width: number, read: (group: BigUint64Array) => { addresses: BigUint64Array; data: Buffer; pages: number }): Generator<PageBatch> {
  let group: bigint[] = [];
  let bytes = 0n;
  const flush = function* (): Generator<PageBatch> {
    if (group.length === 0) return;
    const copy = read(BigUint64Array.from(group));
    group = [];
    bytes = 0n;
    yield* asBatches(copy.addresses, copy.data, copy.pages);
  };
  for (let i = 0; i < ranges.length; i += width) {
    const end = ranges[i + 1]!;
    for (let s = ranges[i]!; s < end; s += CHUNK_BYTES) {
      const e = s + CHUNK_BYTES < end ? s + CHUNK_BYTES : end;
      group.push(s, e, ...ranges.slice(i + 2, i + width));
      bytes += e - s;
      if (bytes >= CHUNK_BYTES) yield* flush();
    }
  }
  yield* flush();
}

/** The pages with data of `triples` ([start, end, allPresent]), chosen from pagemap, as store batches. */
function copyRanges(binding: NativeBinding, pid: number, triples: bigint[]): Generator<PageBatch> {
  return inChunks(triples, 3, (group) => {
    const copy = binding.copyPrivatePages(pid, group);
    return { ...copy, pages: copy.addresses.length };
  });
}

/** Plans of the mappings now; opened files closed (not needed: shared memory is read through the mapping). */
function planNow(pid: number): RegionPlan[] {
  const fsCache = new Map<string, { type: number; bsize: number }>();
  return readMaps(pid).map((m) => planRegionWithoutFile(pid, m, fsCache));
}

/**
 * What a round copies: `tracked`, [start, end) pairs of tracked mappings
 * (everything in round 0, the dirty pages after), read range by range; and
 * `triples`, [start, end, allPresent] for the mappings no tracker sees
 * (copied-on-write pages of private file mappings, [vdso]), chosen page by
 * page from pagemap and copied whole every round.
 */
function rangesToCopy(plans: RegionPlan[], dirty: Intervals | 'all'): { tracked: bigint[]; triples: bigint[]; fileCow: Intervals } {
  const tracked: bigint[] = [];
  const triples: bigint[] = [];
  const fileCow: Intervals = [];
  for (const plan of plans) {
    const { start, end } = plan.record;
    if (plan.engine !== undefined) {
      if (dirty === 'all') triples.push(start, end, 1n); // present pages only: a mapping may be mostly never touched
      else for (const [s, e] of dirty) if (s < end && start < e) tracked.push(s > start ? s : start, e < end ? e : end);
    } else if (plan.pausedCopy === 'cow' || plan.pausedCopy === 'all-present') {
      triples.push(start, end, plan.pausedCopy === 'all-present' ? 1n : 0n);
      fileCow.push([start, end]);
    }
  }
  return { tracked, triples, fileCow };
}

/** The dirty ranges ([start, end] pairs), read whole (a page never populated reads as zeros, which the store elides), as store batches. */
function readTracked(binding: NativeBinding, pid: number, pairs: bigint[]): Generator<PageBatch> {
  return inChunks(pairs, 2, (group) => binding.readRanges(pid, group));
}

/** Both kinds of a round's copy. */
function* copyRound(binding: NativeBinding, pid: number, what: { tracked: bigint[]; triples: bigint[] }): Generator<PageBatch> {
  yield* readTracked(binding, pid, what.tracked);
  yield* copyRanges(binding, pid, what.triples);
}

async function storeRound(
  sink: SnapshotSink,
  pid: number,
  plans: RegionPlan[],
  batches: Iterable<PageBatch>,
  threads: ThreadRecord[],
  dirty: Intervals | undefined,
  stats: { pauseMicros: number; durationMillis: number; warnings?: string[] },
): Promise<number> {
  const processId = sink.addProcess(readProcessRecord(pid));
  sink.addThreads(processId, threads);
  const regions: RegionRecord[] = plans.map((p) => p.record);
  sink.addRegions(processId, regions);
  const lost = plans.flatMap((p) => (p.lost === undefined ? [] : [p.lost]));
  if (lost.length > 0) sink.addLost(processId, lost);
  if (dirty !== undefined) sink.setDirty(processId, dirty);
  let pages = 0;
  for (const batch of batches) {
    pages += batch.addresses.length;
    await sink.addPages(processId, batch);
  }
  await sink.complete({ ...stats, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });
  return pages;
}

export async function precopy(binding: NativeBinding, store: SnapshotTarget, pid: number, options: PrecopyOptions): Promise<PrecopyResult> {
  if (!(options.maxPauseMicros > 0)) throw usageError('--max-pause must be a positive duration');
  const maxRounds = options.maxRounds ?? DEFAULT_MAX_ROUNDS;
  assertProcessExists(pid);
  refuseSelfFreeze(pid);
  const warnings: string[] = [];
  const warn = (line: string): void => {
    warnings.push(line);
    options.onWarning?.(line);
  };
  const startTicks = readProcessRecord(pid).startTimeTicks;
  const tracker = DirtyTracker.start(binding, pid, { tracker: options.tracker ?? 'async', ...(options.attacher ? { attacher: options.attacher } : {}) });
  const rounds: PrecopyRound[] = [];
  const generations: number[] = [];
  let sink: SnapshotSink | undefined;
  try {
    tracker.take(); // from here on, every write is in a round
    let parent: number | undefined;
    let lastRound = tracker.take();
    let copyMicrosPerPage = 0;
    const recentCosts: number[] = [];
    let previousDirty = Infinity;
    let growing = 0;
    let converged = false;
    const begin = (name?: string): SnapshotSink =>
      store.beginSnapshot({
        ...(name === undefined ? {} : { name }),
        ...(parent === undefined ? {} : { parent: { ref: String(parent), pid, startTimeTicks: startTicks, incremental: 'tracked' } }),
      });
    for (let round = 0; ; round++) {
      if (options.signal?.aborted) throw new WpsnapError('INTERRUPTED', 'precopy interrupted');
      const plans = planNow(pid);
      const dirty: Intervals | 'all' = round === 0 ? 'all' : lastRound.dirty;
      const what = rangesToCopy(plans, dirty);
      const fileCow = what.fileCow;
      const { lap } = stopwatch();
      // Copied as the store takes them: the copy's own cost is timed (what the final stop's will be).
      let copyMicros = 0;
      const timed = function* (): Generator<PageBatch> {
        for (const batch of copyRound(binding, pid, what)) {
          copyMicros += lap();
          yield batch;
          lap(); // the store's time is not the copy's
        }
        copyMicros += lap();
      };
      sink = begin();
      const pages = await storeRound(sink, pid, plans, timed(), [], round === 0 ? undefined : normalize([...(dirty as Intervals), ...fileCow]), {
        pauseMicros: 0,
        durationMillis: 0,
        warnings: [FUZZY],
      });
      // The cost of a page, from the best of the last rounds: one round slowed by the machine must not
      // decide. Round 0 reads whole mappings, far cheaper a page than scattered dirty pages: not counted.
      if (pages > 0 && round > 0) recentCosts.push(copyMicros / pages);
      if (recentCosts.length > 3) recentCosts.shift();
      copyMicrosPerPage = recentCosts.length > 0 ? Math.min(...recentCosts) : pages > 0 ? copyMicros / pages : 0;
      parent = sink.id;
      generations.push(sink.id);
      sink = undefined;
      const report: PrecopyRound = {
        round,
        generation: parent,
        pages,
        bytes: pages * 4096,
        millis: Math.round(copyMicros / 100) / 10,
        dirtyPagesPerSec: round === 0 ? 0 : Math.round((lastRound.dirtyPages * 1000) / Math.max(1, lastRound.intervalMillis)),
      };
      rounds.push(report);
      options.onRound?.(report);
      lastRound = tracker.take();
      if (lastRound.exited) throw new WpsnapError('TARGET_NOT_FOUND', `pid ${pid} exited during the pre-copy`);
      // The end copies this round's pages while the target runs, then stops it at once: the stop
      // copies only what was written during that copy.
      const dirtyRate = (lastRound.dirtyPages * 1000) / Math.max(1, lastRound.intervalMillis);
      const preCopyMicros = lastRound.dirtyPages * copyMicrosPerPage;
      const estimate = STOP_OVERHEAD_MICROS + ((dirtyRate * preCopyMicros) / 1e6) * copyMicrosPerPage;
      if (estimate <= options.maxPauseMicros) {
        converged = true;
        break;
      }
      growing = round >= 1 && lastRound.dirtyPages >= previousDirty ? growing + 1 : 0;
      previousDirty = lastRound.dirtyPages;
      const copyRate = copyMicrosPerPage > 0 ? 1e6 / copyMicrosPerPage : Infinity;
      if (growing >= 3 || (round >= 2 && dirtyRate >= copyRate)) {
        warn(`it writes ${Math.round(dirtyRate)} pages/s and ${lastRound.dirtyPages} pages were left after round ${round}, no fewer than before (copy rate ${Math.round(copyRate)} pages/s): pre-copy cannot converge; the final stop will take about ${(estimate / 1000).toFixed(1)} ms`);
        break;
      }
      if (round + 1 >= maxRounds) {
        warn(`${maxRounds} rounds did not bring the rest under ${(options.maxPauseMicros / 1000).toFixed(1)} ms: the final stop will take about ${(estimate / 1000).toFixed(1)} ms`);
        break;
      }
    }
    // The last round. First, while the target runs, what the last take found; then at once every
    // thread is stopped and what was written during that copy is copied, with the registers.
    const pidfd = binding.pidfdOpen(pid);
    const attacher = (options.attacher ?? ptraceAttacher)(binding, pid, pidfd);
    let finalPauseMicros = 0;
    try {
      const plansBefore = planNow(pid); // planned while it runs: statfs and stat cost milliseconds
      attacher.prepare();
      const before = rangesToCopy(plansBefore, lastRound.dirty);
      const running = [...copyRound(binding, pid, before)];
      const { total } = stopwatch();
      const stopped = attacher.stop();
      let inStop: PageBatch[] = [];
      let last: DirtyRound | undefined;
      let plans: RegionPlan[] = plansBefore;
      let inStopWhat: ReturnType<typeof rangesToCopy> | undefined;
      try {
        last = tracker.take({ last: true });
        plans = samePlans(plansBefore, pid);
        inStopWhat = rangesToCopy(plans, last.dirty);
        inStop = [...copyRound(binding, pid, inStopWhat)];
      } finally {
        stopped.resume();
      }
      finalPauseMicros = Math.round(total());
      // The rest needs the target no more.
      const batches = overlay(running, inStop);
      const finalDirty = normalize([...lastRound.dirty, ...last.dirty, ...before.fileCow, ...inStopWhat.fileCow]);
      const threads: ThreadRecord[] = stopped.threads.map((t) => ({ ...t, name: threadName(pid, t.tid) }));
      sink = begin(options.name);
      await storeRound(sink, pid, plans, batches, threads, finalDirty, { pauseMicros: finalPauseMicros, durationMillis: Math.round(finalPauseMicros / 1000) });
      generations.push(sink.id);
      rounds.push({
        round: rounds.length,
        generation: sink.id,
        pages: batches.reduce((n, b) => n + b.addresses.length, 0),
        bytes: batches.reduce((n, b) => n + b.addresses.length * 4096, 0),
        millis: Math.round(finalPauseMicros / 100) / 10,
        dirtyPagesPerSec: Math.round((lastRound.dirtyPages * 1000) / Math.max(1, lastRound.intervalMillis)),
      });
      options.onRound?.(rounds[rounds.length - 1]!);
    } finally {
      attacher.release();
      closeQuietly(binding, pidfd);
    }
    if (finalPauseMicros > options.maxPauseMicros) warn(`the final stop took ${(finalPauseMicros / 1000).toFixed(1)} ms, over the ${(options.maxPauseMicros / 1000).toFixed(1)} ms budget`);
    return { id: generations[generations.length - 1]!, rounds, finalPauseMicros, generations, converged, warnings };
  } catch (error) {
    if (sink !== undefined) await sink.abort(error instanceof Error ? error.message : String(error)).catch(() => undefined);
    throw error;
  } finally {
    tracker.stop();
  }
}

/** The pages of `first` not copied again in `then`, and all of `then`: the later copy of a page wins. */
function overlay(first: PageBatch[], then: PageBatch[]): PageBatch[] {
  const again = new Set<bigint>();
  for (const b of then) for (const a of b.addresses) again.add(a);
  const kept: PageBatch[] = [];
  for (const b of first) {
    const keep: number[] = [];
    for (let i = 0; i < b.addresses.length; i++) if (!again.has(b.addresses[i]!)) keep.push(i);
    if (keep.length === b.addresses.length) kept.push(b);
    else if (keep.length > 0) {
      kept.push({
        addresses: BigUint64Array.from(keep.map((i) => b.addresses[i]!)),
        data: Buffer.concat(keep.map((i) => b.data.subarray(i * 4096, (i + 1) * 4096))),
      });
    }
  }
  return [...kept, ...then];
}

/** The plans made before the stop, re-planned where the maps changed since (in the stop: a few mappings at most). */
function samePlans(before: RegionPlan[], pid: number): RegionPlan[] {
  const byKey = new Map(before.map((p) => [`${p.record.start}-${p.record.end} ${p.record.perms} ${p.record.inode} ${p.record.path}`, p]));
  const fsCache = new Map<string, { type: number; bsize: number }>();
  return readMaps(pid).map((m) => {
    const known = byKey.get(`${m.start}-${m.end} ${m.perms} ${m.inode} ${m.path}`);
    return known ?? planRegionWithoutFile(pid, m, fsCache);
  });
}

