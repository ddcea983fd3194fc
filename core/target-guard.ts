// Targets wpsnap must refuse before it freezes anything: those whose freeze
// would stop wpsnap itself (its own process or threads, the debugger tracing
// it) or the tracer helper doing the freezing. Each would hang every thread
// in a tracing stop, deaf to SIGINT/SIGTERM.
import { readFileSync, readlinkSync, readdirSync } from 'node:fs';
import { basename } from 'node:path';
import { WpsnapError } from '../common/errors.js';

const TRACER_HELPER = 'wpsnap_tracer';

function statusField(path: string, field: string): number | undefined {
  try {
    const value = new RegExp(`^${field}:\\s+(\\d+)`, 'm').exec(readFileSync(path, 'utf8'))?.[1];
    return value === undefined ? undefined : Number(value);
  } catch {
    return undefined;
  }
}

function exeName(pid: number): string | undefined {
  try {
    return basename(readlinkSync(`/proc/${pid}/exe`).replace(/ \(deleted\)$/, ''));
  } catch {
    try {
      return readFileSync(`/proc/${pid}/comm`, 'utf8').trimEnd();
    } catch {
      return undefined;
    }
  }
}

/** The pids tracing any thread of this process (a debugger or strace). */
function ownTracers(self: number): Set<number> {
  const tracers = new Set<number>();
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${self}/task`);
  } catch {
    // no /proc: nothing to compare
  }
  for (const tid of tids) {
    const tracer = statusField(`/proc/${self}/task/${tid}/status`, 'TracerPid');
    if (tracer) tracers.add(tracer);
  }
  return tracers;
}

function refuse(message: string): WpsnapError {
  return new WpsnapError('TARGET_IS_WPSNAP', message);
}

/**
 * Throws (exit 2) when snapshotting `pid` would freeze wpsnap itself. `pid`
 * may be a thread id: /proc/TID exists for every thread, and its Tgid names
 * its process. A pid that does not exist passes: the caller reports it.
 */
export function refuseSelfFreeze(pid: number, self: number = process.pid): void {
  const tgid = statusField(`/proc/${pid}/status`, 'Tgid') ?? pid;
  if (tgid === self) {
    throw refuse(
      pid === self
        ? `pid ${pid} is this wpsnap process: it cannot snapshot itself (the freeze would stop the threads doing it)`
        : `tid ${pid} is a thread of this wpsnap process (pid ${self}): it cannot snapshot itself`,
    );
  }
  if (exeName(tgid) === TRACER_HELPER) {
    throw refuse(`pid ${tgid} is a wpsnap tracer helper (${TRACER_HELPER}): freezing it would stop the wpsnap it works for`);
  }
  if (ownTracers(self).has(tgid)) {
    throw refuse(`pid ${tgid} is tracing this wpsnap process (a debugger or strace): freezing it would stop wpsnap too`);
  }
}
