// Who a group snapshot is of: pids named, a process and its descendants
// (--tree), or every process of a cgroup v2 (--cgroup). Read once, before the
// pause: a process that starts later is not a member.
import { readFileSync, readdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { assertProcessExists } from './procfs.js';

const CGROUP2_SUPER_MAGIC = 0x63677270;

export interface GroupSelection {
  pids?: number[];
  /** These processes and every descendant of each. */
  tree?: number[];
  /** A cgroup v2 directory (/sys/fs/cgroup/...): every process in it (not in its children). */
  cgroup?: string;
}

/** A process's children, from every thread's children list (a thread's fork is its process's child). */
function childrenOf(pid: number): number[] {
  const children = new Set<number>();
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return []; // exited meanwhile
  }
  for (const tid of tids) {
    try {
      for (const child of readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').split(/\s+/)) if (child !== '') children.add(Number(child));
    } catch {
      // the thread exited meanwhile
    }
  }
  return [...children];
}

/** pid and its descendants, parents first. */
export function processTree(pid: number): number[] {
  assertProcessExists(pid);
  const found: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const next = queue.shift()!;
    if (found.includes(next)) continue;
    found.push(next);
    queue.push(...childrenOf(next));
  }
  return found;
}

/** The processes of a cgroup v2 directory. */
export function cgroupProcesses(dir: string): number[] {
  let magic: number;
  try {
    magic = Number(statfsSync(dir).type);
  } catch (error) {
    throw new WpsnapError('USAGE', `--cgroup ${dir}: ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such cgroup' : (error as Error).message}`);
  }
  if (magic !== CGROUP2_SUPER_MAGIC) throw new WpsnapError('USAGE', `--cgroup ${dir}: not a cgroup v2 directory (mounted at /sys/fs/cgroup)`);
  const pids = readFileSync(join(dir, 'cgroup.procs'), 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map(Number);
  if (pids.length === 0) throw new WpsnapError('USAGE', `--cgroup ${dir}: the cgroup has no process`);
  return pids;
}

/** Every member, each once, in the order named (a tree's parents first). */
export function resolveGroup(selection: GroupSelection): number[] {
  const pids = [...(selection.pids ?? [])];
  for (const root of selection.tree ?? []) pids.push(...processTree(root));
  if (selection.cgroup !== undefined) pids.push(...cgroupProcesses(selection.cgroup));
  const members = [...new Set(pids)];
  if (members.length === 0) throw new WpsnapError('USAGE', 'name the processes to snapshot: pids, --tree PID or --cgroup DIR');
  for (const pid of members) assertProcessExists(pid);
  return members;
}
