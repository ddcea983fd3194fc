// The library API (`import { trackDirty } from 'wpsnap'`, package.json
// "exports"): what other tools can drive without the CLI. Documented in
// docs/api.md.
import { loadBinding } from './binding.js';
import { DirtyTracker, type DirtyTrackerOptions } from './tracker.js';
import { restore as restoreProcess, type RestoreOptions, type RestoreResult } from './restore.js';
import { restoreLazy as restoreLazyProcess, type LazyOptions, type LazyRestoreResult } from './restore-lazy.js';
import { InPlaceRollback, rollback as rollbackProcess, type RollbackOptions, type RollbackResult } from './rollback.js';
import { Store } from '../store/store.js';
import { snapshotGroup, type GroupSnapshotOptions, type GroupSnapshotResult } from './group.js';
import { resolveGroup, type GroupSelection } from './group-members.js';

export { DirtyTracker, TRACKER_KINDS } from './tracker.js';
export type { DirtyRound, DirtyTrackerOptions, TrackedMapping, TrackerKind, UntrackedMapping } from './tracker.js';
export type { Intervals } from './intervals.js';
export { WpsnapError } from '../common/errors.js';
export type { RollbackOptions, RollbackResult } from './rollback.js';
export type { RestoreOptions, RestoreResult, FdFate, StdioChoice } from './restore.js';
export type { LazyOptions, LazyRestoreResult, LazyFigures } from './restore-lazy.js';
export type { GroupSnapshotOptions, GroupSnapshotResult, GroupProcessResult, GroupProgress } from './group.js';
export type { GroupSelection } from './group-members.js';

/**
 * Snapshot several processes at one instant (root) into the store at
 * `storePath`: pids, a process tree, a cgroup. Every member is stopped before
 * any is protected; memory they share is saved once and indexed for each.
 */
export async function snapshotProcesses(storePath: string, selection: GroupSelection, options: GroupSnapshotOptions = {}): Promise<GroupSnapshotResult> {
  const members = resolveGroup(selection).map((pid) => ({ pid }));
  const store = Store.open(storePath);
  try {
    return await snapshotGroup(loadBinding(), store, members, options);
  } finally {
    await store.close();
  }
}

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

/** Rollbacks to one snapshot again and again (a fuzzing loop): what does not change between them is done once. */
export interface RollbackSession {
  /** Roll the process back to the snapshot's instant (as `rollback`). */
  rollback(): Promise<RollbackResult>;
  /** End the session; with `incremental`, the tracking goes back to its keeper. */
  close(): Promise<void>;
}

/**
 * A session of rollbacks to snapshot `ref`. Opened at the first rollback and
 * kept until close(): the store, its checks, T's threads and the content of
 * T read so far, the target's memory file and the tracer helper; with
 * `incremental`, the tracking itself, taken from its keeper once (it serves
 * the target's faults meanwhile) and handed back at close(). A page the
 * target wrote since T stays writable and is written back at every rollback
 * (up to 8192 such pages; past that they are protected again), so a loop
 * that touches the same pages costs no fault and no re-protection per run.
 * If this process dies while the session is open, the keeper ends and the
 * target runs on untracked.
 */
export function rollbackSession(storePath: string, ref: string, options: RollbackOptions = {}): RollbackSession {
  const store = Store.open(storePath, { readonly: true });
  const binding = loadBinding();
  let opened: Promise<InPlaceRollback> | undefined;
  return {
    rollback: async () => {
      opened ??= InPlaceRollback.open(binding, store, ref, options);
      let session: InPlaceRollback;
      try {
        session = await opened;
      } catch (error) {
        opened = undefined; // refused: the next call checks again
        throw error;
      }
      return session.rollback();
    },
    close: async () => {
      try {
        if (opened !== undefined) await (await opened.catch(() => undefined))?.close();
      } finally {
        await store.close();
      }
    },
  };
}

/** Run snapshot `ref` of the store at storePath again as a new process (as `wpsnap restore`); resolves once it runs. */
export async function restore(storePath: string, ref: string, options: RestoreOptions = {}): Promise<RestoreResult> {
  const store = Store.open(storePath, { readonly: true });
  try {
    return await restoreProcess(loadBinding(), store, ref, options);
  } finally {
    await store.close();
  }
}

/** restore --lazy: resolves once every page is in (or, with detach, once a background process serves them). */
export async function restoreLazy(storePath: string, ref: string, options: LazyOptions = {}): Promise<LazyRestoreResult> {
  const store = Store.open(storePath, { readonly: true });
  try {
    return await restoreLazyProcess(loadBinding(), store, ref, options);
  } finally {
    await store.close();
  }
}
