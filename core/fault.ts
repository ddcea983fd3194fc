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
  'after-protect',
  'after-resume',
  'mid-sweep',
  'before-commit',
] as const;
export type FaultPoint = (typeof FAULT_POINTS)[number];

export function faultPoint(point: FaultPoint): void {
  if (process.env['WPSNAP_FAULT'] === point) process.kill(process.pid, 'SIGKILL');
}
