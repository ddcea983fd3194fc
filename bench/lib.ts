// Helpers shared by the benchmark scenarios: locating the repository, timing
// child commands, driving a faultlat target, statistics and machine facts.
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { cpus, freemem, loadavg, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';

export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) dir = dirname(dir);
  return dir;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export function log(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

// ---- statistics -----------------------------------------------------------

export function median(values: Array<number | null | undefined>): number | null {
  const v = values.filter((x): x is number => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 === 1 ? (v[mid] as number) : ((v[mid - 1] as number) + (v[mid] as number)) / 2;
}

export function minMax(values: Array<number | null | undefined>): [number, number] | null {
  const v = values.filter((x): x is number => typeof x === 'number' && Number.isFinite(x));
  if (v.length === 0) return null;
  return [Math.min(...v), Math.max(...v)];
}

export function ratio(a: number | null, b: number | null): number | null {
  if (a === null || b === null || b === 0) return null;
  return a / b;
}

export function round(x: number | null, digits = 2): number | null {
  if (x === null) return null;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

// ---- child commands -------------------------------------------------------

export interface CommandResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  wallMillis: number;
  /** CPU time of the command and its threads (user, system), from this process's cutime/cstime; 10 ms ticks. */
  cpuUserMillis: number;
  cpuSysMillis: number;
  /** Minor page faults of the command (cminflt): touches of fresh memory, slow on this VM. */
  minorFaults: number;
  /** With options.sampleThreads: CPU and run-queue wait per thread name. */
  threads?: Record<string, ThreadTimes>;
  /** With options.sampleMemory: the command's peak resident set (VmHWM, polled every 50 ms; the last read before it exited), KiB. */
  vmHwmKiB?: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** The JSON document of a `wpsnap snapshot --json` run, or an error naming why there is none. */
export function snapshotDocument(r: CommandResult): Record<string, unknown> {
  let doc: Record<string, unknown> | undefined;
  try {
    doc = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    doc = undefined;
  }
  if (r.code !== 0 || doc === undefined || typeof doc['pauseMicros'] !== 'number') {
    const why = doc && typeof doc['error'] === 'object' ? JSON.stringify(doc['error']) : (r.stderr || r.stdout).trim().slice(-400);
    throw new Error(`wpsnap snapshot exited ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${why}`);
  }
  return doc;
}

/**
 * Run a command to completion and time it from spawn to exit. On timeout it
 * gets SIGINT, then SIGKILL 10 s later, by its own pid (it is our child).
 */
export function runCommand(
  cmd: string,
  args: string[],
  options: { timeoutMs?: number; cwd?: string; sampleThreads?: boolean; sampleMemory?: boolean } = {},
): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const cpu0 = childrenCpuMillis();
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { cwd: options.cwd ?? repoRoot(), stdio: ['ignore', 'pipe', 'pipe'] });
    const sampler = options.sampleThreads && child.pid !== undefined ? new ThreadSampler(child.pid) : undefined;
    const memory = options.sampleMemory && child.pid !== undefined ? new PeakRssSampler(child.pid) : undefined;
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    let killTimer: NodeJS.Timeout | undefined;
    const timer =
      options.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            if (child.pid !== undefined) {
              try {
                process.kill(child.pid, 'SIGINT');
              } catch {
                // gone
              }
              killTimer = setTimeout(() => {
                try {
                  if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
                } catch {
                  // gone
                }
              }, 10_000);
            }
          }, options.timeoutMs);
    child.on('error', (error) => {
      if (timer) clearTimeout(timer);
      sampler?.stop();
      memory?.stop();
      reject(error);
    });
    child.on('close', (code, signal) => {
      const wallMillis = Number(process.hrtime.bigint() - started) / 1e6;
      if (timer) clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      // libuv has reaped the child by now: its times are in our cutime/cstime.
      const cpu1 = childrenCpuMillis();
      const threads = sampler?.stop();
      const vmHwmKiB = memory?.stop();
      resolve({
        code,
        signal,
        wallMillis,
        cpuUserMillis: cpu1.user - cpu0.user,
        cpuSysMillis: cpu1.sys - cpu0.sys,
        minorFaults: cpu1.minflt - cpu0.minflt,
        ...(threads === undefined ? {} : { threads }),
        ...(vmHwmKiB === undefined ? {} : { vmHwmKiB }),
        stdout,
        stderr,
        timedOut,
      });
    });
  });
}

const TICK_MILLIS = 10; // USER_HZ = 100 on Linux/x86_64

/** Fields of /proc/PID/stat after the command name (field 3 is index 0). */
function statFields(pid: number | 'self'): string[] {
  const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return text.slice(text.lastIndexOf(')') + 2).split(' ');
}

/** CPU time of this process's waited-for children (cutime, cstime). */
export function childrenCpuMillis(): { user: number; sys: number; minflt: number } {
  const f = statFields('self');
  return { user: Number(f[13]) * TICK_MILLIS, sys: Number(f[14]) * TICK_MILLIS, minflt: Number(f[8]) };
}

/** CPU time a process has used (utime + stime), or null if it is gone. */
export function processCpuMillis(pid: number): number | null {
  try {
    const f = statFields(pid);
    return (Number(f[11]) + Number(f[12])) * TICK_MILLIS;
  } catch {
    return null;
  }
}

export interface Schedstat {
  runNs: number;
  waitNs: number;
}

/** /proc/PID[/task/TID]/schedstat: time on a CPU, time runnable but waiting for one. */
export function schedstat(pid: number, tid?: number): Schedstat | null {
  try {
    const f = readFileSync(tid === undefined ? `/proc/${pid}/schedstat` : `/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ');
    return { runNs: Number(f[0]), waitNs: Number(f[1]) };
  } catch {
    return null;
  }
}

export interface ThreadTimes {
  threads: number;
  runMillis: number;
  waitMillis: number;
}

/**
 * Samples every thread of a process (comm and schedstat) until stopped and
 * returns the last values summed per thread name: where a command's CPU went,
 * and how long each kind of thread waited for a CPU. Threads that end between
 * two samples lose up to one interval.
 */
export class ThreadSampler {
  private readonly last = new Map<number, { comm: string; s: Schedstat }>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly pid: number,
    intervalMs = 50,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs);
  }

  private sample(): void {
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${this.pid}/task`);
    } catch {
      return;
    }
    for (const t of tids) {
      const tid = Number(t);
      const s = schedstat(this.pid, tid);
      if (s === null) continue;
      let comm = this.last.get(tid)?.comm;
      if (comm === undefined) {
        try {
          comm = readFileSync(`/proc/${this.pid}/task/${tid}/comm`, 'utf8').trim();
        } catch {
          continue;
        }
        // Node names none of its threads: tell the main (JS) thread from the others.
        if (tid === this.pid) comm = `${comm} (main)`;
      }
      this.last.set(tid, { comm, s });
    }
  }

  stop(): Record<string, ThreadTimes> {
    clearInterval(this.timer);
    const out: Record<string, ThreadTimes> = {};
    for (const { comm, s } of this.last.values()) {
      const o = (out[comm] ??= { threads: 0, runMillis: 0, waitMillis: 0 });
      o.threads++;
      o.runMillis += s.runNs / 1e6;
      o.waitMillis += s.waitNs / 1e6;
    }
    for (const o of Object.values(out)) {
      o.runMillis = Math.round(o.runMillis);
      o.waitMillis = Math.round(o.waitMillis);
    }
    return out;
  }
}

/** A `Key:   N kB` line of a /proc status-like file, in KiB, or null. */
export function procKiB(file: string, key: string): number | null {
  try {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(readFileSync(file, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** Polls a process's VmHWM (its peak RSS so far) until stopped; returns the last value read. */
export class PeakRssSampler {
  private last: number | null = null;
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly pid: number,
    intervalMs = 50,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs).unref();
  }

  private sample(): void {
    const v = procKiB(`/proc/${this.pid}/status`, 'VmHWM');
    if (v !== null && (this.last === null || v > this.last)) this.last = v;
  }

  stop(): number | null {
    clearInterval(this.timer);
    return this.last;
  }
}

export interface TaskSample {
  /** performance.now() */
  at: number;
  /** The state letter of /proc/PID/task/TID/stat: R running or runnable, S sleeping, D uninterruptible, t traced-stopped, T stopped. */
  state: string;
  runNs: number;
  waitNs: number;
}

/** What a thread did in an interval: ms on a CPU, ms runnable but waiting for one, and the states it was sampled in. */
export interface TaskInterval {
  runMs: number;
  waitMs: number;
  states: Record<string, number>;
}

/**
 * Samples every thread of a process (its state and schedstat) every
 * intervalMs against performance.now(), so that what a thread did in any
 * interval can be told after the fact: CPU and run-queue wait linear between
 * two samples, states as sampled.
 */
export class TaskSampler {
  readonly tasks = new Map<number, TaskSample[]>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    readonly pid: number,
    intervalMs = 10,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs).unref();
  }

  sample(): void {
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${this.pid}/task`);
    } catch {
      return;
    }
    const at = performance.now();
    for (const t of tids) {
      const tid = Number(t);
      const s = schedstat(this.pid, tid);
      let state = '?';
      try {
        const stat = readFileSync(`/proc/${this.pid}/task/${tid}/stat`, 'utf8');
        state = stat.charAt(stat.lastIndexOf(')') + 2);
      } catch {
        continue;
      }
      if (s === null) continue;
      let list = this.tasks.get(tid);
      if (!list) this.tasks.set(tid, (list = []));
      list.push({ at, state, ...s });
    }
  }

  stop(): void {
    this.sample();
    clearInterval(this.timer);
  }

  /** The process's threads other than its main one. */
  others(): number[] {
    return [...this.tasks.keys()].filter((tid) => tid !== this.pid);
  }

  private value(list: TaskSample[], t: number, key: 'runNs' | 'waitNs'): number | null {
    if (list.length === 0 || t < list[0]!.at || t > list[list.length - 1]!.at) return null;
    let i = 1;
    while (i < list.length - 1 && list[i]!.at < t) i++;
    const a = list[i - 1]!;
    const b = list[i]!;
    return b.at === a.at ? a[key] : a[key] + ((b[key] - a[key]) * (t - a.at)) / (b.at - a.at);
  }

  /** What thread `tid` (default the main one) did in [from, to] (performance.now() ms); null outside the samples. */
  during(from: number, to: number, tid = this.pid): TaskInterval | null {
    const list = this.tasks.get(tid) ?? [];
    const r0 = this.value(list, from, 'runNs');
    const r1 = this.value(list, to, 'runNs');
    const w0 = this.value(list, from, 'waitNs');
    const w1 = this.value(list, to, 'waitNs');
    if (r0 === null || r1 === null || w0 === null || w1 === null) return null;
    const states: Record<string, number> = {};
    for (const s of list) if (s.at >= from && s.at <= to) states[s.state] = (states[s.state] ?? 0) + 1;
    return { runMs: (r1 - r0) / 1e6, waitMs: (w1 - w0) / 1e6, states };
  }

  /**
   * The last sample in [from, to] in which some thread was in `state`, and
   * that thread's next sample: the state ended between the two.
   */
  lastInState(state: string, from: number, to: number): { at: number; nextAt: number } | null {
    let best: { at: number; nextAt: number } | null = null;
    for (const list of this.tasks.values()) {
      for (let i = 0; i < list.length - 1; i++) {
        const s = list[i]!;
        if (s.state !== state || s.at < from || s.at > to) continue;
        if (best === null || s.at > best.at) best = { at: s.at, nextAt: list[i + 1]!.at };
      }
    }
    return best;
  }

  /** Fractions of [from, to] thread `tid` ran, and waited runnable for a CPU. */
  shares(from: number, to: number, tid = this.pid): { cpu: number; runqueue: number } | null {
    if (!(to > from)) return null;
    const d = this.during(from, to, tid);
    return d === null ? null : { cpu: d.runMs / (to - from), runqueue: d.waitMs / (to - from) };
  }
}

/** CPU ticks (USER_HZ) in use at one moment: the whole machine, a process tree, and one process of it. */
export interface CpuTicks {
  at: number;
  /** /proc/stat: user + nice + system + irq + softirq + steal, all CPUs. */
  system: number;
  /** The root and its live descendants, each with its reaped children (utime + stime + cutime + cstime). */
  tree: number;
  /** The threads of process `own` alone (utime + stime; its children not counted). */
  own: number;
}

/**
 * Samples, every intervalMs, the CPU the whole machine used and the CPU a
 * process tree used (by default this process: the bench, the targets it
 * launched and every command it runs), so that the CPU used by unrelated
 * processes in an interval is system - tree. Reads /proc/PID/stat of every
 * process each time (about 100 here): keep the interval at 100 ms or more.
 */
export class CpuAccountSampler {
  readonly samples: CpuTicks[] = [];
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly own: number | null,
    private readonly root = process.pid,
    intervalMs = 100,
  ) {
    this.sample();
    this.timer = setInterval(() => this.sample(), intervalMs).unref();
  }

  sample(): void {
    let system = 0;
    try {
      const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
      // user nice system idle iowait irq softirq steal
      system = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + (f[7] ?? 0);
    } catch {
      return;
    }
    const parent = new Map<number, number>();
    const ticks = new Map<number, number>();
    for (const e of readdirSync('/proc')) {
      const pid = Number(e);
      if (!(pid > 0)) continue;
      try {
        const f = statFields(pid);
        parent.set(pid, Number(f[1]));
        ticks.set(pid, Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]));
      } catch {
        // gone
      }
    }
    const within = (pid: number, top: number): boolean => {
      for (let p = pid, hops = 0; p > 1 && hops < 64; p = parent.get(p) ?? 0, hops++) if (p === top) return true;
      return false;
    };
    let tree = 0;
    for (const [pid, t] of ticks) if (within(pid, this.root)) tree += t;
    this.samples.push({ at: performance.now(), system, tree, own: this.own === null ? 0 : (processCpuMillis(this.own) ?? 0) / TICK_MILLIS });
  }

  stop(): void {
    this.sample();
    clearInterval(this.timer);
  }

  /** CPUs (1 = one whole CPU) used in [from, to] by unrelated processes, by the tree, and by process `own`; null outside the samples. */
  during(from: number, to: number): { others: number; tree: number; own: number } | null {
    const s = this.samples;
    if (s.length < 2 || !(to > from)) return null;
    // The last sample at or before `from` and the first at or after `to` (the interval grows to whole samples).
    let a = s[0]!;
    for (const x of s) if (x.at <= from) a = x;
    const b = s.find((x) => x.at >= to) ?? s[s.length - 1]!;
    const ms = b.at - a.at;
    if (!(ms > 0)) return null;
    const cpus = (ticks: number): number => (ticks * TICK_MILLIS) / ms;
    return { others: Math.max(0, cpus(b.system - a.system - (b.tree - a.tree))), tree: cpus(b.tree - a.tree), own: cpus(b.own - a.own) };
  }
}

/** Bytes `zstd -1 -T1 -c FILE` writes (single-threaded, counted here, not stored). */
export function zstdSize(file: string, level = 1): Promise<{ bytes: number; wallMillis: number }> {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn('zstd', [`-${level}`, '-T1', '-q', '-c', file], { stdio: ['ignore', 'pipe', 'pipe'] });
    let bytes = 0;
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (bytes += d.length));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) reject(new Error(`zstd -${level} ${file} exited ${code}: ${stderr.trim()}`));
      else resolve({ bytes, wallMillis: Number(process.hrtime.bigint() - started) / 1e6 });
    });
  });
}

// ---- faultlat target ------------------------------------------------------

export interface LatencyHist {
  count: number;
  p50Nanos: number;
  p90Nanos: number;
  p99Nanos: number;
  maxNanos: number;
}

export interface FaultlatReport {
  report: true;
  writes: number;
  windowMillis: number;
  writesPerSec: number;
  faulted: LatencyHist;
  firstWrite: LatencyHist;
  all: { p50Nanos: number; p99Nanos: number; maxNanos: number };
  maxGapNanos: number;
  maxGapAtMillis: number;
  /** The 8 longest gaps of 1 ms or more, unordered. */
  gaps: Array<{ nanos: number; atMillis: number }>;
  perWindow: { millis: number; min: number; max: number; counts: number[] };
  /** Writes since the last complete slice (absent from reports of older builds). */
  tail?: { writes: number; millis: number };
  /** --workload cache: the schedule (writes/s), the writes due in the window and those skipped as too late. */
  cache?: { writeRate: number; scheduled: number; missed: number; maxLagMillis: number };
  /** --heartbeat: the heartbeat thread's gaps (null: it did not answer). */
  heartbeat?: HeartbeatReport | null;
  /** Added here, from /proc/PID/schedstat: CPU time the target got in the window… */
  cpuMillis: number | null;
  /** …and the time it was runnable but waiting for a CPU. The rest it was blocked (faults) or stopped. */
  runqueueWaitMillis: number | null;
}

export interface HeartbeatReport {
  beats: number;
  maxGapNanos: number;
  atMillis: number;
  p50GapNanos: number;
  p99GapNanos: number;
  gaps: Array<{ nanos: number; atMillis: number }>;
}

export interface ForkLine {
  fork: boolean;
  forkMicros: number;
  childPid: number;
  atMillis: number;
  /** 'hold' or 'zstd' (--fork-child); absent from older builds. */
  child?: string;
  error?: string;
}

export interface ForkExitLine {
  forkChildExit: true;
  childPid: number;
  status: number;
  livedMillis: number;
}

type Line = Record<string, unknown>;

/**
 * A faultlat process that is not a child of this process (fixtures/launch.ts:
 * so that neither gcore nor wpsnap freezes a child of a process that reaps
 * children), with its JSON lines
 * routed to whoever waits for them.
 */
export class Faultlat {
  private readonly lines: Line[] = [];
  private readonly waiters: Array<{ match: (l: Line) => boolean; resolve: (l: Line) => void }> = [];
  private ended = false;
  private windowSched: Schedstat | null = null;

  private constructor(
    private readonly fixture: LaunchedFixture,
    readonly ready: Line,
  ) {
    void this.pump();
  }

  static async launch(args: string[]): Promise<Faultlat> {
    // Filling 1 GiB of fresh memory on this VM takes seconds.
    const fixture = await launchFixture('faultlat', args, 120_000);
    return new Faultlat(fixture, JSON.parse(fixture.readyLine) as Line);
  }

  get pid(): number {
    return this.fixture.pid;
  }

  private async pump(): Promise<void> {
    for (;;) {
      const text = await this.fixture.nextLine();
      if (text === null) break;
      let line: Line;
      try {
        line = JSON.parse(text) as Line;
      } catch {
        continue;
      }
      const i = this.waiters.findIndex((w) => w.match(line));
      if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(line);
      else this.lines.push(line);
    }
    this.ended = true;
  }

  /** The next line (already received or to come) that `match` accepts. */
  waitFor(match: (l: Line) => boolean, timeoutMs: number, what: string): Promise<Line> {
    const i = this.lines.findIndex(match);
    if (i >= 0) return Promise.resolve(this.lines.splice(i, 1)[0]!);
    if (this.ended) return Promise.reject(new Error(`faultlat ${this.pid} ended before ${what}`));
    return new Promise((resolve, reject) => {
      const waiter = {
        match,
        resolve: (l: Line) => {
          clearTimeout(timer);
          resolve(l);
        },
      };
      const timer = setTimeout(() => {
        const k = this.waiters.indexOf(waiter);
        if (k >= 0) this.waiters.splice(k, 1);
        reject(new Error(`faultlat ${this.pid}: no ${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  private signal(sig: NodeJS.Signals): void {
    process.kill(this.pid, sig);
  }

  /** Start a measurement window (SIGUSR1). */
  async startWindow(): Promise<void> {
    this.windowSched = schedstat(this.pid);
    this.signal('SIGUSR1');
    // Wait until the target has opened the window: a signal still pending when
    // wpsnap or gcore stops the target would only be handled after the stop.
    await this.waitFor((l) => l['window'] === true, 10_000, 'window line');
  }

  /** The window so far (SIGUSR2). */
  async report(): Promise<FaultlatReport> {
    const sched = schedstat(this.pid);
    this.signal('SIGUSR2');
    const r = (await this.waitFor((l) => l['report'] === true, 30_000, 'report line')) as unknown as FaultlatReport;
    const s0 = this.windowSched;
    r.cpuMillis = sched !== null && s0 !== null ? (sched.runNs - s0.runNs) / 1e6 : null;
    r.runqueueWaitMillis = sched !== null && s0 !== null ? (sched.waitNs - s0.waitNs) / 1e6 : null;
    return r;
  }

  /** Make the target fork (SIGURG); resolves with its fork line. */
  async fork(): Promise<ForkLine> {
    this.signal('SIGURG');
    return (await this.waitFor((l) => 'fork' in l, 30_000, 'fork line')) as unknown as ForkLine;
  }

  async forkChildExit(childPid: number, timeoutMs: number): Promise<ForkExitLine> {
    return (await this.waitFor(
      (l) => l['forkChildExit'] === true && l['childPid'] === childPid,
      timeoutMs,
      `exit of fork child ${childPid}`,
    )) as unknown as ForkExitLine;
  }

  /** SIGTERM, then SIGKILL if it is still there after 2 s. */
  async stop(): Promise<void> {
    this.fixture.kill('SIGTERM');
    for (let i = 0; i < 20; i++) {
      if (!isAlive(this.pid)) return;
      await sleep(100);
    }
    this.fixture.kill('SIGKILL');
  }
}

export function isAlive(pid: number): boolean {
  try {
    // A zombie still "exists": look at its state.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) Z /.test(stat);
  } catch {
    return false;
  }
}

/** The code measured: HEAD and the files of core/, store/, cli/, the format and the addon build that differ from it. */
export async function treeState(): Promise<{ head: string | null; modified: string[] }> {
  try {
    const head = await runCommand('git', ['rev-parse', 'HEAD']);
    const status = await runCommand('git', ['status', '--porcelain', '--', 'core', 'store', 'cli', 'snapshot-format', 'binding.gyp']);
    return {
      head: head.code === 0 ? head.stdout.trim() : null,
      modified: status.stdout.split('\n').filter((l) => l.trim() !== '').map((l) => l.trim()),
    };
  } catch {
    return { head: null, modified: [] };
  }
}

// ---- machine --------------------------------------------------------------

export interface MachineInfo {
  cpuModel: string;
  nproc: number;
  memTotalGiB: number;
  memFreeGiB: number;
  kernel: string;
  node: string;
  loadavg: number[];
  clocksource: string | null;
}

export function machineInfo(): MachineInfo {
  const read = (p: string): string | null => {
    try {
      return readFileSync(p, 'utf8').trim();
    } catch {
      return null;
    }
  };
  return {
    cpuModel: cpus()[0]?.model ?? 'unknown',
    nproc: cpus().length,
    memTotalGiB: round(totalmem() / 2 ** 30, 1) as number,
    memFreeGiB: round(freemem() / 2 ** 30, 1) as number,
    kernel: read('/proc/sys/kernel/osrelease') ?? 'unknown',
    node: process.version,
    loadavg: loadavg().map((x) => round(x, 2) as number),
    clocksource: read('/sys/devices/system/clocksource/clocksource0/current_clocksource'),
  };
}
