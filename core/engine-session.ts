// One run of the native engine over a protected target. The engine is
// created before the pause (its staging pool touched, its stager started),
// run from inside the pause right before the resume (the target's first write
// faults find it ready), and its batches go to the store as the store takes
// them; progress is polled for the caller, and the run ends in the engine's
// final statistics once every batch is stored.
import type { SnapshotSink } from './sink.js';
import { WpsnapError, fromNative } from '../common/errors.js';
import type { TrackLog } from './preprotect.js';
import { faultPoint } from './fault.js';
import type { EngineFinalStats, EngineLiveStats, EngineMessage, EngineRegion, NativeBinding, NativeHandle } from './native/binding.js';

export interface EngineProgress {
  /**
   * saving: the engine runs, the target's unsaved pages are write-protected
   * (its writes to them wait for a copy). compressing: every page is saved and
   * unprotected; the store is still hashing, compressing and committing
   * batchesPending batches, from staging (the target no longer waits on wpsnap).
   */
  phase: 'saving' | 'compressing';
  /** Batches copied and not yet stored: waiting in staging or in the store. */
  batchesPending: number;
  /** Bytes of copied pages waiting in staging (memory and spill file). */
  stagingBytes: number;
  pagesDone: number;
  /** Of pagesDone, those found zero (never read, nothing to save). */
  zeroPages: number;
  totalPages: number;
  bytesCopied: number;
  faults: number;
  elapsedMillis: number;
}

export interface EngineSessionOptions {
  pid: number;
  pidfd: number;
  /** Sweep limit in bytes per second; 0 = unlimited. */
  rateBytesPerSec: number;
  /** The snapshot's process in the store. */
  processId: number;
  /** When the snapshot started (Date.now()), for elapsedMillis. */
  startedAt: number;
  onProgress?: ((progress: EngineProgress) => void) | undefined;
  /** Any of these aborting stops the engine: its unsaved pages are then lost as interrupted. */
  signals: Array<AbortSignal | undefined>;
  /** Where copied pages wait for the store (core/staging.ts). */
  staging: { poolBatches: number; warmBatches: number; spillFd: number; spillMaxBytes: number };
  /** Called once when the protection ends (every page saved or lost, the target unprotected). */
  onWindowClosed?: (() => void) | undefined;
  /** Called (at most once) when staging is full: the sweep, and the target's protected pages, wait for the store. */
  onStagingFull?: (() => void) | undefined;
  /**
   * Keep the target tracked after the window (snapshot --track): saved pages
   * stay protected and every write since T is logged, until endKeep() hands
   * the log over (core/native/engine_keep.c).
   */
  keep?: boolean | undefined;
}

/** Batches the store holds at a time: enough to keep its workers busy; the rest wait in staging. */
const STORE_BATCHES = 8;

/** At most half the pool goes to the store: the rest is staging, for the sweep to go on. */
function storeBatches(poolBatches: number): number {
  return Math.max(1, Math.min(STORE_BATCHES, Math.floor(poolBatches / 2)));
}

export class EngineSession {
  private readonly handle: NativeHandle;
  private readonly pending = new Set<Promise<void>>();
  private readonly signals: AbortSignal[];
  private storeError: unknown;
  private batches = 0;
  private phase: EngineProgress['phase'] = 'saving';
  private timer: ReturnType<typeof setInterval> | undefined;
  private ran = false;
  private kept = false;
  private resolveDone!: (stats: EngineFinalStats) => void;
  private rejectDone!: (error: unknown) => void;
  /** Settles once the engine is done and every batch is stored (never before go()). */
  readonly done: Promise<EngineFinalStats>;
  /** performance.now() when go() was called: the engine's windowMicros counts from it. */
  ranAt = 0;

  /** Create the engine (before the pause): its pool, its stager, its fds on the target. */
  constructor(
    private readonly binding: NativeBinding,
    private readonly writer: SnapshotSink,
    private readonly options: EngineSessionOptions,
  ) {
    this.signals = options.signals.filter((s): s is AbortSignal => s !== undefined);
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => undefined); // surfaced to whoever awaits it
    try {
      this.handle = binding.engineCreate(
        {
          pid: options.pid,
          pidfd: options.pidfd,
          rateBytesPerSec: options.rateBytesPerSec,
          poolBatches: options.staging.poolBatches,
          warmBatches: options.staging.warmBatches,
          storeBatches: storeBatches(options.staging.poolBatches),
          spillFd: options.staging.spillFd,
          spillMaxBytes: options.staging.spillMaxBytes,
        },
        (message) => this.onMessage(message),
      );
    } catch (error) {
      throw fromNative(error, 'create the snapshot engine');
    }
    // Set up now, not in go(): it is called right after the pause, and the first use of
    // these costs milliseconds. A stop before the run makes the run end at once.
    for (const signal of this.signals) signal.addEventListener('abort', this.onAbort);
    if (this.signals.some((s) => s.aborted)) this.onAbort();
    this.timer = setInterval(() => {
      if (this.ran) this.options.onProgress?.(this.progress(this.binding.engineStats(this.handle)));
    }, 100);
  }

  /**
   * Give the engine the protected regions: called in the pause, right before
   * the resume. A tracked generation's pages identical to its parent's:
   * parentPages (core/tracking-handover.ts).
   */
  prepareRun(
    uffd: number,
    regions: EngineRegion[],
    parentPages?: { unwritten: BigUint64Array; writtenAtInstant: BigUint64Array },
    group?: NativeHandle,
  ): void {
    try {
      this.binding.engineRun(this.handle, { uffd, regions, keep: this.options.keep === true, ...(parentPages ?? {}), ...(group === undefined ? {} : { group }) });
    } catch (error) {
      throw fromNative(error, 'start the snapshot engine');
    }
  }

  /** Start the engine: called right after the resume. */
  go(): void {
    this.ranAt = performance.now();
    this.binding.engineGo(this.handle);
    this.ran = true;
  }

  /** Stop early: unsaved pages are then lost as interrupted. */
  stop(): void {
    this.binding.engineStop(this.handle);
  }

  /** Before the pause: let the target's writes to these protected ranges through and record them. */
  track(uffd: number, ranges: Array<[bigint, bigint]> | BigUint64Array): void {
    // Intervals of 4 KiB pages, or [start, end, unit] triples (a keeper's, hugetlb included).
    let triples: BigUint64Array;
    if (ranges instanceof BigUint64Array) {
      triples = ranges;
    } else {
      triples = new BigUint64Array(ranges.length * 3);
      ranges.forEach(([start, end], i) => triples.set([start, end, 4096n], 3 * i));
    }
    this.binding.engineTrack(this.handle, { uffd, ranges: triples });
  }

  /** What was written (and unmapped) since the last take; with stop, tracking ends first (in the pause). */
  trackTake(stop: boolean): TrackLog {
    const taken = this.binding.engineTrackTake(this.handle, stop);
    if (taken.error !== undefined) throw new WpsnapError('TARGET_NOT_FOUND', `pid ${this.options.pid}: ${taken.error}`);
    return { written: taken.written, invalid: taken.invalid, overflowed: taken.overflowed, faults: taken.faults };
  }

  /**
   * With keep, once done: stop serving the userfaultfd (the target's faults
   * queue in it until its next reader) and take every write since T. Null if
   * already ended or not kept. The userfaultfd stays open: the caller's to
   * hand over or close.
   */
  endKeep(): (TrackLog & { exited: boolean; forks: number }) | null {
    if (!this.options.keep || !this.ran || this.kept) return null;
    this.kept = true;
    const taken = this.binding.engineTrackTake(this.handle, true);
    this.binding.engineJoin(this.handle);
    if (taken.error !== undefined) throw new WpsnapError('INTERNAL', `pid ${this.options.pid}: tracking after the snapshot failed: ${taken.error}`);
    return { written: taken.written, invalid: taken.invalid, overflowed: taken.overflowed, faults: taken.faults, forks: taken.forks, exited: taken.exited === true };
  }

  /** End an engine that never ran (the snapshot failed before the resume). */
  close(): void {
    if (this.ran) return;
    clearInterval(this.timer);
    for (const signal of this.signals) signal.removeEventListener('abort', this.onAbort);
    this.binding.engineClose(this.handle);
  }

  private readonly onAbort = (): void => this.stop();

  private progress(s: EngineLiveStats): EngineProgress {
    return {
      phase: this.phase,
      batchesPending: s.stagedBatches + this.pending.size,
      stagingBytes: s.stagingBytes,
      pagesDone: s.pagesFromFaults + s.pagesFromSweep + s.pagesZero + s.pagesLost,
      zeroPages: s.pagesZero,
      totalPages: s.totalPages,
      bytesCopied: s.bytesCopied,
      faults: s.faults,
      elapsedMillis: Date.now() - this.options.startedAt,
    };
  }

  private onMessage(message: EngineMessage): void {
    if (message.type === 'batch') {
      this.batches++;
      if (this.batches === 3) faultPoint('mid-sweep');
      const slot = message.slot;
      const stored = this.writer
        .addPages(this.options.processId, { addresses: message.addresses, data: message.data })
        .catch((error: unknown) => {
          this.storeError ??= error;
          this.stop();
        })
        .finally(() => {
          this.pending.delete(stored);
          this.binding.engineRelease(this.handle, slot);
        });
      this.pending.add(stored);
      return;
    }
    if (message.type === 'staging-full') {
      this.options.onStagingFull?.();
      return;
    }
    if (message.type === 'window') {
      this.phase = 'compressing';
      this.options.onWindowClosed?.();
      faultPoint('mid-compress');
      return;
    }
    clearInterval(this.timer);
    for (const signal of this.signals) signal.removeEventListener('abort', this.onAbort);
    const stats = message.stats;
    const compressing = (): void => this.options.onProgress?.(this.progress({ ...stats, stagedBatches: 0 }));
    if (this.pending.size > 0) compressing();
    const storing = this.pending.size > 0 && this.options.onProgress ? setInterval(compressing, 100) : undefined;
    const finish = async (): Promise<void> => {
      try {
        while (this.pending.size > 0) await Promise.all([...this.pending]);
      } finally {
        clearInterval(storing);
      }
      // Kept: the thread goes on serving the target's faults until endKeep().
      if (!this.options.keep) this.binding.engineJoin(this.handle);
      if (this.storeError !== undefined) throw this.storeError;
      this.resolveDone(stats);
    };
    finish().catch(this.rejectDone);
  }
}
