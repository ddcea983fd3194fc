// Is the process that wrote a 'running' snapshot still alive? A pid alone can
// be reused, so the writer's start time (field 22 of /proc/PID/stat) is kept too.
import { readFileSync } from 'node:fs';

/** Fields 3.. of /proc/PID/stat (after the command name), or undefined if the process is gone. */
function procStat(pid: number): string[] | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return text.slice(text.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** Start time of a process in clock ticks after boot, or null if unreadable. */
export function processStartTicks(pid: number): number | null {
  const value = Number(procStat(pid)?.[19]);
  return Number.isSafeInteger(value) ? value : null;
}

/** Alive, not a zombie, and (when known) started when the writer did. */
export function writerAlive(pid: number, startTicks: number | null): boolean {
  const fields = procStat(pid);
  if (fields === undefined || fields[0] === 'Z' || fields[0] === 'X') return false;
  return startTicks === null || Number(fields[19]) === startTicks;
}
