// Reading what /proc says about a process: maps, identity, threads.
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import type { ProcessRecord } from '../snapshot-format/model.js';
import { WpsnapError, externalCode } from '../common/errors.js';

export interface MapsEntry {
  start: bigint;
  end: bigint;
  perms: string;
  offset: bigint;
  dev: string;
  inode: number;
  path: string;
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)\s*(.*)$/;

function parseMapsLine(line: string): MapsEntry {
  const m = MAPS_LINE.exec(line);
  if (!m) throw new Error(`unparsable /proc/PID/maps line: ${JSON.stringify(line)}`);
  return {
    start: BigInt('0x' + m[1]),
    end: BigInt('0x' + m[2]),
    perms: m[3]!,
    offset: BigInt('0x' + m[4]),
    dev: m[5]!,
    inode: Number(m[6]),
    path: m[7] ?? '',
  };
}

function mapsLines(text: string): string[] {
  return text.split('\n').filter((line) => line !== '');
}

export function parseMaps(text: string): MapsEntry[] {
  return mapsLines(text).map(parseMapsLine);
}

export function readMaps(pid: number): MapsEntry[] {
  return parseMaps(readProc(pid, 'maps').toString('utf8'));
}

/**
 * Reads /proc/PID/maps again and again, returning the same MapsEntry object
 * for a line that has not changed since the previous read: inside the pause
 * only the changed lines are parsed (a few hundred mappings otherwise cost
 * milliseconds of BigInt parsing), and callers can tell unchanged mappings by
 * identity.
 */
export class MapsReader {
  private known = new Map<string, MapsEntry>();

  constructor(private readonly pid: number) {}

  read(): MapsEntry[] {
    const known = new Map<string, MapsEntry>();
    for (const line of mapsLines(readProc(this.pid, 'maps').toString('utf8'))) {
      known.set(line, this.known.get(line) ?? parseMapsLine(line));
    }
    this.known = known;
    return [...known.values()];
  }
}

/** Throws TARGET_NOT_FOUND (exit 4) when the process does not exist. */
export function readProc(pid: number, file: string): Buffer {
  try {
    return readFileSync(`/proc/${pid}/${file}`);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ESRCH') {
      throw new WpsnapError('TARGET_NOT_FOUND', `no process with pid ${pid}`);
    }
    throw new WpsnapError(externalCode(code, 'EIO'), `read /proc/${pid}/${file}: ${(error as Error).message}`);
  }
}

export function assertProcessExists(pid: number): void {
  if (!Number.isInteger(pid) || pid <= 0) {
    throw new WpsnapError('USAGE', `not a pid: ${pid}`);
  }
  readProc(pid, 'stat');
}

export function listThreads(pid: number): number[] {
  try {
    return readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => a - b);
  } catch {
    throw new WpsnapError('TARGET_NOT_FOUND', `no process with pid ${pid}`);
  }
}

export function threadName(pid: number, tid: number): string {
  try {
    return readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trimEnd();
  } catch {
    return '';
  }
}

/** Uid/Gid lines of /proc/PID/status: [real, effective, saved, filesystem]. */
export function readIds(pid: number): { uid: number[]; gid: number[] } {
  const status = readProc(pid, 'status').toString('utf8');
  const ids = (key: string): number[] => {
    const m = new RegExp(`^${key}:\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)`, 'm').exec(status);
    return m ? m.slice(1, 5).map(Number) : [0, 0, 0, 0];
  };
  return { uid: ids('Uid'), gid: ids('Gid') };
}

function bootTimeSeconds(): number {
  const m = /^btime (\d+)/m.exec(readFileSync('/proc/stat', 'utf8'));
  return m ? Number(m[1]) : 0;
}

/** Clock ticks per second for /proc/PID/stat times (USER_HZ, 100 on Linux x86_64). */
const USER_HZ = 100;

/** Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot (with the pid, its identity). */
export function readStartTimeTicks(pid: number): number {
  const stat = readProc(pid, 'stat').toString('utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
}

export function readProcessRecord(pid: number): ProcessRecord {
  const stat = readProc(pid, 'stat').toString('utf8');
  // comm may contain spaces and parentheses: fields start after the last ')'.
  const close = stat.lastIndexOf(')');
  const comm = stat.slice(stat.indexOf('(') + 1, close);
  const fields = stat.slice(close + 2).split(' ');
  const ppid = Number(fields[1]);
  const startTimeTicks = Number(fields[19]);
  const { uid, gid } = readIds(pid);
  let exe = '';
  try {
    exe = readlinkSync(`/proc/${pid}/exe`);
  } catch {
    exe = '';
  }
  const cmdline = readProc(pid, 'cmdline').toString('utf8').split('\0');
  if (cmdline.at(-1) === '') cmdline.pop();
  const startedAt = new Date((bootTimeSeconds() + startTimeTicks / USER_HZ) * 1000).toISOString();
  const nsPids = readNsPids(pid);
  return {
    pid,
    ppid,
    uid: uid[0]!,
    gid: gid[0]!,
    exe,
    cmdline,
    comm,
    startTimeTicks,
    startedAt,
    auxv: readProc(pid, 'auxv'),
    ...(nsPids === undefined ? {} : { nsPids }),
  };
}

/**
 * NSpid of /proc/PID/status: the pid in each PID namespace the process is in,
 * from ours (the namespace of the /proc we read) inwards; undefined on a
 * kernel without the line (before 4.1).
 */
export function readNsPids(pid: number): number[] | undefined {
  const m = /^NSpid:[ \t]+([\d \t]+?)[ \t]*$/m.exec(readProc(pid, 'status').toString('utf8'));
  return m ? m[1]!.split(/[ \t]+/).map(Number) : undefined;
}

/** CPU time the process's threads have had, in ns (the first field of each task's schedstat); 0 once it is gone. */
export function processCpuNanos(pid: number): number {
  let total = 0;
  let tids: number[];
  try {
    tids = listThreads(pid);
  } catch {
    return 0;
  }
  for (const tid of tids) {
    try {
      total += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread exited meanwhile
    }
  }
  return total;
}

/** A clock on a process's CPU use: lap() gives the CPUs it used since the last lap (1 = one CPU all along). */
export function cpuClock(pid: number): { lap: () => number } {
  let cpu = processCpuNanos(pid);
  let wall = process.hrtime.bigint();
  return {
    lap(): number {
      const nowCpu = processCpuNanos(pid);
      const nowWall = process.hrtime.bigint();
      const used = nowWall > wall ? (nowCpu - cpu) / Number(nowWall - wall) : 0;
      cpu = nowCpu;
      wall = nowWall;
      return Math.round(used * 1000) / 1000;
    },
  };
}
