// The library API (`import { trackDirty } from 'wpsnap'`, package.json
// "exports"): what other tools can drive without the CLI. Documented in
// docs/api.md.
import { loadBinding } from './binding.js';
import { DirtyTracker, type DirtyTrackerOptions } from './tracker.js';
import { rollback as rollbackProcess, type RollbackOptions, type RollbackResult } from './rollback.js';
import { Store } from '../store/store.js';

export { DirtyTracker, TRACKER_KINDS } from './tracker.js';
export type { DirtyRound, DirtyTrackerOptions, TrackedMapping, TrackerKind, UntrackedMapping } from './tracker.js';
export type { Intervals } from './intervals.js';
export { WpsnapError } from '../common/errors.js';
export type { RollbackOptions, RollbackResult } from './rollback.js';

/**
 * Start tracking the writes of process `pid` (root; a stop of a few
 * milliseconds to obtain its userfaultfd). Then `take()` returns the page
 * ranges written since the previous take and starts the next round, and
 * `stop()` ends the tracking and unprotects the process; if this process
 * exits first, the kernel does that.
 */
export function trackDirty(pid: number, options: Omit<DirtyTrackerOptions, 'attacher'> = {}): DirtyTracker {
  return DirtyTracker.start(loadBinding(), pid, options);
}

/**
 * Roll the live process of snapshot `ref` (id or name) in the store at
 * `storePath` back to the snapshot's instant, in place (root): layout,
 * memory, every thread's registers; threads created since exit. Refuses,
 * changing nothing, when it cannot be done whole.
 */
export async function rollback(storePath: string, ref: string, options: RollbackOptions = {}): Promise<RollbackResult> {
  const store = Store.open(storePath, { readonly: true });
  try {
    return await rollbackProcess(loadBinding(), store, ref, options);
  } finally {
    await store.close();
  }
}

/** Rollbacks to one snapshot again and again (a fuzzing loop): the store stays open between them. */
export interface RollbackSession {
  /** Roll the process back to the snapshot's instant (as `rollback`). */
  rollback(): Promise<RollbackResult>;
  close(): Promise<void>;
}

/**
 * A session of rollbacks to snapshot `ref`: the store is opened once and its
 * decompressed pages of T stay cached between rollbacks (a page of T is read
 * from a compressed batch of 512: the first rollback that needs it pays for
 * the batch, the next ones do not).
 */
export function rollbackSession(storePath: string, ref: string, options: RollbackOptions = {}): RollbackSession {
  const store = Store.open(storePath, { readonly: true });
  const binding = loadBinding();
  return {
    rollback: () => rollbackProcess(binding, store, ref, options),
    close: () => store.close(),
  };
}
