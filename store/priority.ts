// The store's CPU priority. Hashing, compression and SQLite are the bulk of a
// snapshot's CPU, and none of it is urgent once the pages are copied: they
// run at idle priority by default, so that a target that wants every CPU
// keeps them (the snapshot is then durable later). The engine's threads, which
// the target's write faults wait on, set their own high priority whatever
// thread created them (core/native/engine_state.c).
//   idle    SCHED_IDLE: runs only on a CPU no normal thread wants.
//   nice    nice 19: a small share (~1.5% of a CPU per busy normal thread).
//   normal  like any thread: the snapshot is done sooner, the target slower.
import { createRequire } from 'node:module';
import { pagehashAddonPath, type PagehashAddon } from './pagehash.js';

export type StorePriority = 'idle' | 'nice' | 'normal';
export const STORE_PRIORITIES: readonly StorePriority[] = ['idle', 'nice', 'normal'];

let current: StorePriority = 'normal';

/** What the store's workers start with (set before the first batch). */
export function storePriority(): StorePriority {
  return current;
}

/**
 * Run the store's work at `mode`: the calling thread (the one that runs
 * SQLite) now, and the workers as they start or at their next batch.
 * Returns the errno if the thread could not be changed, else 0.
 */
export function setStorePriority(mode: StorePriority): number {
  current = mode;
  const addon = createRequire(import.meta.url)(pagehashAddonPath()) as PagehashAddon;
  return addon.setThreadPriority(mode);
}
