// The library API (`import { trackDirty } from 'wpsnap'`, package.json
// "exports"): what other tools can drive without the CLI. Documented in
// docs/api.md.
import { loadBinding } from './binding.js';
import { DirtyTracker, type DirtyTrackerOptions } from './tracker.js';

export { DirtyTracker, TRACKER_KINDS } from './tracker.js';
export type { DirtyRound, DirtyTrackerOptions, TrackedMapping, TrackerKind, UntrackedMapping } from './tracker.js';
export type { Intervals } from './intervals.js';
export { WpsnapError } from '../common/errors.js';

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
