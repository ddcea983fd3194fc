// Forced failures for tests (like CRIU_FAULT): WPSNAP_FAULT=<point> makes this
// process SIGKILL itself when it reaches that point, so tests can check that a
// dying controller leaves the target running and the store intact.
export const FAULT_POINTS = [
  'before-freeze',
  'after-freeze',
  // Reached in the addon (ptrace_client.c): right after the tracer helper is
  // asked to inject a syscall, while it holds injected registers in the target.
  'mid-inject',
  'after-inject',
  // The target runs with its bulk write-protected and its writes tracked, before the pause.
  'mid-pre-protect',
  'after-protect',
  'after-resume',
  'mid-sweep',
  // Reached in the addon (engine_stage.c): a batch was just written to the spill file.
  'mid-spill',
  // The target is unprotected and running; the store is compressing staged batches.
  'mid-compress',
  'before-commit',
] as const;
export type FaultPoint = (typeof FAULT_POINTS)[number];

/**
 * Points of a rollback (mid-inject above is one too): with the layout
 * repaired and no content written yet, and with the rewritten pages written
 * and nothing else. A rollback killed there leaves the target partly rolled
 * back (documented), but running, untraced and unprotected.
 */
export const ROLLBACK_FAULT_POINTS = ['rollback-after-layout', 'rollback-mid-content'] as const;
export type RollbackFaultPoint = (typeof ROLLBACK_FAULT_POINTS)[number];

/**
 * Points of a restore (mid-inject above is one too): the restorer frozen,
 * half its memory written, every thread created, and (lazy) while pages are
 * being served. A restore killed at any of them leaves no process behind:
 * the tracer kills the half-built one, the guardian the one whose pages are
 * missing.
 */
export const RESTORE_FAULT_POINTS = ['restore-after-freeze', 'restore-mid-memory', 'restore-after-threads', 'restore-lazy-serving'] as const;
export type RestoreFaultPoint = (typeof RESTORE_FAULT_POINTS)[number];

/**
 * WPSNAP_FAULT=<point> values that make an operation fail instead of killing
 * wpsnap. engine-alloc (checked in engine.c): once two batches are posted, the
 * batch a write fault needs cannot be allocated (ENOMEM, as under memory
 * pressure); the fault thread must report it and the target, whose thread
 * waits on that fault, must be released. engine-vanish (engine_sweep.c): the
 * sweep's first anonymous chunk reads its first page as gone from the page
 * tables with no event (what no kernel path should do); the page must be
 * listed lost vanished-before-saved, never stored as zero.
 */
export const FAILURE_POINTS = ['engine-alloc', 'engine-vanish'] as const;

export function faultPoint(point: FaultPoint | RollbackFaultPoint | RestoreFaultPoint): void {
  if (process.env['WPSNAP_FAULT'] === point) process.kill(process.pid, 'SIGKILL');
}
