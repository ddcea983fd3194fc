// Observing a target from the outside.
import { readdirSync, readFileSync } from 'node:fs';
import { loadBinding } from '../../core/binding.js';

export function procStatus(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

export function rssKiB(pid: number): number {
  return Number.parseInt(procStatus(pid)['VmRSS'] ?? '0', 10);
}

export function isAlive(pid: number): boolean {
  try {
    const state = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]![0];
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function taskTids(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => a - b);
}

/** TracerPid of each thread (0: not traced). */
export function tracerPids(pid: number): Record<number, number> {
  const out: Record<number, number> = {};
  for (const tid of taskTids(pid)) {
    const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    out[tid] = Number(/^TracerPid:\s+(\d+)/m.exec(status)![1]);
  }
  return out;
}

/**
 * A killed controller's tracer helper (wpsnap-tracer) lets the target go on
 * its own, moments later: wait until no thread is traced (at most 5 s).
 */
export async function untraced(pid: number): Promise<void> {
  for (let waited = 0; waited < 5000 && Object.values(tracerPids(pid)).some((t) => t !== 0); waited += 10) await sleep(10);
}

/** How many of the `pages` pages from `start` carry the uffd-wp bit (57) in /proc/PID/pagemap: still write-protected. */
export function uffdWpPages(pid: number, start: bigint, pages: number): number {
  return [...loadBinding().readPagemap(pid, start, pages)].filter((e) => ((e >> 57n) & 1n) !== 0n).length;
}
