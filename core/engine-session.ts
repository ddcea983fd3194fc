// One run of the native engine over a protected target: batches go to the
// store as they come, progress is polled for the caller, and the run ends in
// the engine's final statistics once every batch is stored.
import type { SnapshotSink } from './sink.js';
import { fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import type { EngineFinalStats, EngineLiveStats, EngineMessage, NativeBinding, NativeHandle } from './native/binding.js';
import type { RegionPlan } from './regions.js';

export interface EngineProgress {
  /**
   * saving: the engine runs, the target's unsaved pages are write-protected
   * (its writes to them wait for a copy). compressing: every page is saved and
   * unprotected; the store is still hashing, compressing and committing
   * batchesPending batches (the target no longer waits on wpsnap).
   */
  phase: 'saving' | 'compressing';
  batchesPending: number;
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
  uffd: number;
  pidfd: number;
  plans: RegionPlan[];
  /** Sweep limit in bytes per second; 0 = unlimited. */
  rateBytesPerSec: number;
  /** The snapshot's process in the store. */
  processId: number;
  /** When the snapshot started (Date.now()), for elapsedMillis. */
  startedAt: number;
  onProgress?: ((progress: EngineProgress) => void) | undefined;
  /** Any of these aborting stops the engine: its unsaved pages are then lost as interrupted. */
  signals: Array<AbortSignal | undefined>;
}

export function runEngine(binding: NativeBinding, writer: SnapshotSink, options: EngineSessionOptions): Promise<EngineFinalStats> {
  return new Promise((resolve, reject) => {
    const regions = options.plans.flatMap((p) => (p.engine ? [p.engine] : []));
    const signals = options.signals.filter((s): s is AbortSignal => s !== undefined);
    const pending = new Set<Promise<void>>();
    let storeError: unknown;
    let batches = 0;
    let handle: NativeHandle | undefined;
    const progress = (phase: EngineProgress['phase'], s: EngineLiveStats): EngineProgress => ({
      phase,
      batchesPending: pending.size,
      pagesDone: s.pagesFromFaults + s.pagesFromSweep + s.pagesZero + s.pagesLost,
      zeroPages: s.pagesZero,
      totalPages: s.totalPages,
      bytesCopied: s.bytesCopied,
      faults: s.faults,
      elapsedMillis: Date.now() - options.startedAt,
    });
    const onMessage = (message: EngineMessage): void => {
      if (message.type === 'batch') {
        batches++;
        if (batches === 3) faultPoint('mid-sweep');
        const slot = message.slot;
        const stored = writer
          .addPages(options.processId, { addresses: message.addresses, data: message.data })
          .catch((error: unknown) => {
            storeError ??= error;
            if (handle) binding.engineStop(handle);
          })
          .finally(() => {
            pending.delete(stored);
            if (handle) binding.engineRelease(handle, slot);
          });
        pending.add(stored);
        return;
      }
      clearInterval(timer);
      for (const signal of signals) signal.removeEventListener('abort', onAbort);
      const compressing = (): void => options.onProgress?.(progress('compressing', message.stats));
      if (pending.size > 0) compressing();
      const storing = pending.size > 0 && options.onProgress ? setInterval(compressing, 100) : undefined;
      const finish = async (): Promise<void> => {
        try {
          while (pending.size > 0) await Promise.all([...pending]);
        } finally {
          clearInterval(storing);
        }
        if (handle) binding.engineJoin(handle);
        if (storeError !== undefined) throw storeError;
        resolve(message.stats);
      };
      finish().catch(reject);
    };
    const onAbort = (): void => {
      if (handle) binding.engineStop(handle);
    };
    try {
      handle = binding.engineStart(
        { pid: options.pid, uffd: options.uffd, pidfd: options.pidfd, regions, rateBytesPerSec: options.rateBytesPerSec },
        onMessage,
      );
    } catch (error) {
      reject(fromNative(error, 'start the snapshot engine'));
      return;
    }
    for (const signal of signals) signal.addEventListener('abort', onAbort);
    if (signals.some((s) => s.aborted)) onAbort();
    const timer = setInterval(() => {
      if (!handle || !options.onProgress) return;
      options.onProgress(progress('saving', binding.engineStats(handle)));
    }, 100);
  });
}
