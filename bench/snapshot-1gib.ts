// Scenario "snapshot-1gib": one faultlat target (1 GiB of heap-like 4 KiB
// pages, every page written once per pass, continuously) snapshotted by each
// peer in turn, in one run: nothing (baseline), fork() (the target forks a
// child that holds the copy-on-write image for 3 s, like Redis BGSAVE),
// gcore, wpsnap, wpsnap --rate, and a diagnostic: wpsnap's engine with no
// store (engine-only). wpsnap's pause, step by step, is its own
// pauseBreakdownMicros (wpsnap.pause.*).
// Every measurement is repeated `runs` times, the order of peers rotating
// from run to run, after one unmeasured warm-up of each. Before the target
// starts: the kernel's minimal uffd-wp round trip (uffd_roundtrip) and the
// single-core cost of each store stage (pipeline.ts).
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { snapshotEngineOnly, type EngineOnlyResult } from './engine-only.js';
import { runPipeline, type PipelineResult } from './pipeline.js';
import {
  Faultlat,
  isAlive,
  log,
  machineInfo,
  median,
  minMax,
  ratio,
  repoRoot,
  round,
  runCommand,
  sleep,
  zstdSize,
  type FaultlatReport,
  type MachineInfo,
  type ThreadTimes,
} from './lib.js';

export interface Snapshot1GiBOptions {
  runs: number;
  mib: number;
  /** --rate for the rate-limited wpsnap peer, MB/s. */
  rateMBps: number;
  /** How long the fork child holds the copy-on-write image. */
  forkHoldMs: number;
  /** Length of the baseline window. */
  baselineMs: number;
  /** Pause between two measurements, so the target is back to its steady state. */
  settleMs: number;
  /** Peers to run (default all). */
  peers: PeerName[];
  /** Per-command limit. */
  timeoutMs: number;
  /** The wpsnap CLI to run (default: this tree's dist/cli/main.js). */
  cli: string;
  /** MiB of content for the offline pipeline-stage measurement (0: skip it). */
  pipelineMib: number;
}

export const PEERS = ['baseline', 'fork', 'gcore', 'wpsnap', 'wpsnap-rate', 'engine-only'] as const;
export type PeerName = (typeof PEERS)[number];

export const DEFAULTS: Snapshot1GiBOptions = {
  runs: 3,
  mib: 1024,
  rateMBps: 200,
  forkHoldMs: 3000,
  baselineMs: 3000,
  settleMs: 2000,
  peers: [...PEERS],
  timeoutMs: 300_000,
  cli: 'dist/cli/main.js',
  pipelineMib: 256,
};

/** What the target saw during one measurement window (from faultlat's report). */
export interface TargetWindow {
  windowMillis: number;
  writesPerSec: number;
  /** Slowest complete 100 ms slice, as writes/s. */
  minSliceWritesPerSec: number | null;
  /** Writes slower than faultlat's threshold (2 µs): write-protect or copy-on-write faults, plus noise. */
  faultedCount: number;
  faultedP50Micros: number;
  faultedP90Micros: number;
  faultedP99Micros: number;
  faultedMaxMicros: number;
  /** Longest gap between two consecutive writes: a stop of the target, wherever it landed. */
  maxGapMillis: number;
  maxGapAtMillis: number;
  /** CPU the target got in the window, as a fraction of one CPU (it spins: 1.0 when unhindered). */
  cpuShare: number | null;
  /** Fraction of the window the target was runnable but waiting for a CPU (the rest: blocked in faults, or stopped). */
  runqueueShare: number | null;
  /** Gaps of 1 ms or more (the 8 longest), in time order: [millis, ended at millis]. */
  gaps: Array<[number, number]>;
}

/**
 * The stall the target saw when a snapshot started: the earliest gap of at
 * least 80% of the reported pause that ends after the snapshot could have
 * started (`notBefore`, ms into the window). The pause itself is inside it;
 * so is any time the target spent blocked on its first protected page
 * before the engine ran.
 */
function startStall(w: TargetWindow, pauseMicros: number, notBefore: number): number | null {
  const g = w.gaps.find(([ms, at]) => ms * 1e3 >= 0.8 * pauseMicros && at >= notBefore);
  return g ? g[0] : null;
}

function toWindow(r: FaultlatReport): TargetWindow {
  const slices = r.perWindow.counts;
  return {
    windowMillis: round(r.windowMillis, 1) as number,
    writesPerSec: r.writesPerSec,
    minSliceWritesPerSec: slices.length > 0 ? Math.min(...slices) * (1000 / r.perWindow.millis) : null,
    faultedCount: r.faulted.count,
    faultedP50Micros: round(r.faulted.p50Nanos / 1e3, 1) as number,
    faultedP90Micros: round(r.faulted.p90Nanos / 1e3, 1) as number,
    faultedP99Micros: round(r.faulted.p99Nanos / 1e3, 1) as number,
    faultedMaxMicros: round(r.faulted.maxNanos / 1e3, 1) as number,
    maxGapMillis: round(r.maxGapNanos / 1e6, 2) as number,
    maxGapAtMillis: round(r.maxGapAtMillis, 1) as number,
    cpuShare: r.cpuMillis === null || r.windowMillis <= 0 ? null : round(r.cpuMillis / r.windowMillis, 2),
    runqueueShare: r.runqueueWaitMillis === null || r.windowMillis <= 0 ? null : round(r.runqueueWaitMillis / r.windowMillis, 2),
    gaps: r.gaps
      .slice()
      .sort((a, b) => a.atMillis - b.atMillis)
      .map((g): [number, number] => [round(g.nanos / 1e6, 2) as number, round(g.atMillis, 1) as number]),
  };
}

export interface BaselineResult {
  window: TargetWindow;
}
export interface ForkResult {
  forkMicros: number;
  childLivedMillis: number;
  window: TargetWindow;
}
export interface GcoreResult {
  wallMillis: number;
  cpuUserMillis: number;
  cpuSysMillis: number;
  minorFaults: number;
  coreBytes: number;
  zstd1Bytes: number;
  zstd1Millis: number;
  window: TargetWindow;
}
export interface WpsnapResult {
  rateMBps: number | null;
  wallMillis: number;
  cpuUserMillis: number;
  cpuSysMillis: number;
  minorFaults: number;
  /** CPU and run-queue wait per thread name of the wpsnap process. */
  threads: Record<string, ThreadTimes> | null;
  /** The target's stall at the start of the snapshot (see startStall). */
  startStallMillis: number | null;
  /** wpsnap's own split of its pause (freeze, inject, plan, protect, copy, thaw), µs, if it reports one. */
  pauseBreakdownMicros: Record<string, number> | null;
  pauseMicros: number;
  durationMillis: number;
  pagesSaved: number;
  zeroPages: number;
  bytesRaw: number;
  bytesStored: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  lostPages: number;
  engine: Record<string, unknown>;
  window: TargetWindow;
}
export interface Failed {
  error: string;
}
type Outcome<T> = T | Failed;

/**
 * One run. Result files written by older versions may also hold peers no
 * longer run (e.g. 'pause-breakdown'); summarize() reads only the keys below.
 */
export interface RunResult {
  index: number;
  order: PeerName[];
  baseline?: Outcome<BaselineResult>;
  fork?: Outcome<ForkResult>;
  gcore?: Outcome<GcoreResult>;
  wpsnap?: Outcome<WpsnapResult>;
  'wpsnap-rate'?: Outcome<WpsnapResult>;
  'engine-only'?: Outcome<EngineOnlyPeerResult>;
}

export interface EngineOnlyPeerResult extends EngineOnlyResult {
  wallMillis: number;
  startStallMillis: number | null;
  cpuUserMillis: number;
  cpuSysMillis: number;
  window: TargetWindow;
}

export interface RoundtripResult {
  copy: boolean;
  /** The monitor busy-polls instead of sleeping in poll(): no wake-up cost. */
  spin: boolean;
  sameCpuP50Micros: number;
  sameCpuP99Micros: number;
  crossCpuP50Micros: number | null;
  crossCpuP99Micros: number | null;
}

export interface RatioLine {
  name: string;
  /** From the medians of the peers' figures. */
  value: number | null;
  /** The same ratio run by run: its median and range. */
  perRunMedian: number | null;
  perRunRange: [number, number] | null;
  target: string;
  /** Judged on `value`; null for information lines. */
  pass: boolean | null;
}

export interface Snapshot1GiBResult {
  scenario: 'snapshot-1gib';
  startedAt: string;
  finishedAt: string;
  machine: { atStart: MachineInfo; loadavgAtEnd: number[] };
  /** The code measured: HEAD and the files of core/, store/, cli/ that differ from it. */
  tree: { head: string | null; modified: string[] };
  options: Snapshot1GiBOptions;
  target: { args: string[]; fillMillis: number | null };
  roundtrip: RoundtripResult[];
  pipeline: PipelineResult | { error: string } | null;
  runs: RunResult[];
  medians: Record<string, number | null>;
  ranges: Record<string, [number, number] | null>;
  ratios: RatioLine[];
}

const ok = <T>(o: Outcome<T> | undefined): T | undefined => (o !== undefined && !('error' in (o as object)) ? (o as T) : undefined);

// ---- the measurements -----------------------------------------------------

async function measureBaseline(t: Faultlat, o: Snapshot1GiBOptions): Promise<BaselineResult> {
  await t.startWindow();
  await sleep(o.baselineMs);
  return { window: toWindow(await t.report()) };
}

async function measureFork(t: Faultlat, o: Snapshot1GiBOptions): Promise<ForkResult> {
  await t.startWindow();
  const f = await t.fork();
  if (!f.fork) throw new Error(`the target's fork() failed: ${f.error ?? '?'}`);
  const exit = await t.forkChildExit(f.childPid, o.forkHoldMs + 30_000);
  // The window covers the child's life (and the few ms the reap took).
  const report = await t.report();
  return { forkMicros: f.forkMicros, childLivedMillis: round(exit.livedMillis, 1) as number, window: toWindow(report) };
}

async function measureGcore(t: Faultlat, o: Snapshot1GiBOptions, dir: string): Promise<GcoreResult> {
  const prefix = join(dir, 'core');
  const file = `${prefix}.${t.pid}`;
  try {
    await t.startWindow();
    const r = await runCommand('gcore', ['-o', prefix, String(t.pid)], { timeoutMs: o.timeoutMs });
    const report = await t.report();
    if (r.code !== 0 || !existsSync(file)) {
      throw new Error(`gcore exited ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${r.stderr.trim().slice(-400)}`);
    }
    const coreBytes = statSync(file).size;
    // Compressed size of the same memory with the reference compressor, measured outside the window.
    const z = await zstdSize(file, 1);
    return {
      wallMillis: round(r.wallMillis, 1) as number,
      cpuUserMillis: r.cpuUserMillis,
      cpuSysMillis: r.cpuSysMillis,
      minorFaults: r.minorFaults,
      coreBytes,
      zstd1Bytes: z.bytes,
      zstd1Millis: round(z.wallMillis, 1) as number,
      window: toWindow(report),
    };
  } finally {
    rmSync(file, { force: true });
  }
}

async function measureWpsnap(t: Faultlat, o: Snapshot1GiBOptions, dir: string, rateMBps: number | null, tag: string): Promise<WpsnapResult> {
  const store = join(dir, `${tag}.db`);
  const args = [o.cli, 'snapshot', String(t.pid), '--json', '--store', store];
  if (rateMBps !== null) args.push('--rate', String(rateMBps));
  try {
    await t.startWindow();
    const r = await runCommand(process.execPath, args, { timeoutMs: o.timeoutMs, sampleThreads: true });
    const report = await t.report();
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
    const lost = (doc['lostPages'] as Array<{ pages: number }>).reduce((n, l) => n + l.pages, 0);
    const window = toWindow(report);
    return {
      rateMBps,
      wallMillis: round(r.wallMillis, 1) as number,
      cpuUserMillis: r.cpuUserMillis,
      cpuSysMillis: r.cpuSysMillis,
      minorFaults: r.minorFaults,
      threads: r.threads ?? null,
      pauseMicros: doc['pauseMicros'] as number,
      durationMillis: doc['durationMillis'] as number,
      pagesSaved: doc['pagesSaved'] as number,
      zeroPages: doc['zeroPages'] as number,
      bytesRaw: doc['bytesRaw'] as number,
      bytesStored: doc['bytesStored'] as number,
      faults: doc['faults'] as number,
      faultP50Micros: doc['faultP50Micros'] as number,
      faultP99Micros: doc['faultP99Micros'] as number,
      lostPages: lost,
      engine: doc['engine'] as Record<string, unknown>,
      window,
      // durationMillis starts shortly before the freeze; the command's startup precedes it.
      pauseBreakdownMicros: (doc['pauseBreakdownMicros'] as Record<string, number> | undefined) ?? null,
      startStallMillis: startStall(window, doc['pauseMicros'] as number, r.wallMillis - (doc['durationMillis'] as number) - 500),
    };
  } finally {
    for (const suffix of ['', '-wal', '-shm', '-journal']) rmSync(store + suffix, { force: true });
  }
}

async function measureEngineOnly(t: Faultlat): Promise<EngineOnlyPeerResult> {
  await t.startWindow();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const r = await snapshotEngineOnly(t.pid);
  const wallMillis = Number(process.hrtime.bigint() - t0) / 1e6;
  const cpu = process.cpuUsage(cpu0);
  const report = await t.report();
  const window = toWindow(report);
  return {
    ...r,
    wallMillis: round(wallMillis, 1) as number,
    startStallMillis: startStall(window, r.pauseMicros, 0),
    cpuUserMillis: Math.round(cpu.user / 1e3),
    cpuSysMillis: Math.round(cpu.system / 1e3),
    window,
  };
}

async function measureRoundtrip(copy: boolean, spin: boolean): Promise<RoundtripResult> {
  const bin = join(repoRoot(), 'fixtures', 'build', 'uffd_roundtrip');
  const args = ['--pages', '4096', '--rounds', '5', ...(copy ? ['--copy'] : []), ...(spin ? ['--spin'] : [])];
  const r = await runCommand(bin, args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`uffd_roundtrip exited ${r.code}: ${r.stderr.trim()}`);
  const doc = JSON.parse(r.stdout) as {
    sameCpu: { p50Nanos: number; p99Nanos: number };
    crossCpu: { p50Nanos: number; p99Nanos: number } | null;
  };
  const us = (n: number | undefined): number | null => (n === undefined ? null : (round(n / 1e3, 2) as number));
  return {
    copy,
    spin,
    sameCpuP50Micros: us(doc.sameCpu.p50Nanos) as number,
    sameCpuP99Micros: us(doc.sameCpu.p99Nanos) as number,
    crossCpuP50Micros: us(doc.crossCpu?.p50Nanos),
    crossCpuP99Micros: us(doc.crossCpu?.p99Nanos),
  };
}

async function measure(
  peer: PeerName,
  t: Faultlat,
  o: Snapshot1GiBOptions,
  dir: string,
  tag: string,
): Promise<Outcome<BaselineResult | ForkResult | GcoreResult | WpsnapResult | EngineOnlyPeerResult>> {
  try {
    switch (peer) {
      case 'baseline':
        return await measureBaseline(t, o);
      case 'fork':
        return await measureFork(t, o);
      case 'gcore':
        return await measureGcore(t, o, dir);
      case 'wpsnap':
        return await measureWpsnap(t, o, dir, null, tag);
      case 'wpsnap-rate':
        return await measureWpsnap(t, o, dir, o.rateMBps, tag);
      case 'engine-only':
        return await measureEngineOnly(t);
    }
  } catch (error) {
    if (!isAlive(t.pid)) throw new Error(`the target ${t.pid} died during ${peer}: ${String(error)}`);
    return { error: (error instanceof Error ? error.message : String(error)).replace(/\s+/g, ' ') };
  }
}

function describe(peer: PeerName, r: Outcome<unknown>): string {
  if ('error' in (r as object)) return `${peer}: FAILED ${(r as Failed).error}`;
  const w = (r as { window: TargetWindow }).window;
  const target = `target ${(w.writesPerSec / 1e6).toFixed(2)} Mw/s, cpu ${w.cpuShare ?? '?'} runq ${w.runqueueShare ?? '?'}, faulted ${w.faultedCount} p50 ${w.faultedP50Micros} µs p99 ${w.faultedP99Micros} µs, max gap ${w.maxGapMillis} ms`;
  switch (peer) {
    case 'baseline':
      return `baseline: ${target}`;
    case 'fork': {
      const f = r as ForkResult;
      return `fork: fork() ${(f.forkMicros / 1e3).toFixed(1)} ms; ${target}`;
    }
    case 'gcore': {
      const g = r as GcoreResult;
      return `gcore: wall ${(g.wallMillis / 1e3).toFixed(2)} s (cpu ${g.cpuUserMillis}+${g.cpuSysMillis} ms), core ${(g.coreBytes / 2 ** 20).toFixed(0)} MiB, zstd -1 ${(g.zstd1Bytes / 2 ** 20).toFixed(0)} MiB; ${target}`;
    }
    case 'engine-only': {
      const s = r as EngineOnlyPeerResult;
      return `engine-only: pause ${(s.pauseMicros / 1e3).toFixed(1)} ms (target stalled ${s.startStallMillis ?? '?'} ms), duration ${s.durationMillis} ms, faults ${s.faults} (service p50 ${s.faultP50Micros} µs p99 ${s.faultP99Micros} µs), overflow ${String(s.engine.overflowBatches)}; ${target}`;
    }
    default: {
      const s = r as WpsnapResult;
      return `${peer}: pause ${(s.pauseMicros / 1e3).toFixed(1)} ms (target stalled ${s.startStallMillis ?? '?'} ms), duration ${s.durationMillis} ms, wall ${(s.wallMillis / 1e3).toFixed(2)} s (cpu ${s.cpuUserMillis}+${s.cpuSysMillis} ms), stored ${(s.bytesStored / 2 ** 20).toFixed(0)} MiB, faults ${s.faults} (service p50 ${s.faultP50Micros} µs p99 ${s.faultP99Micros} µs), lost ${s.lostPages}; ${target}`;
    }
  }
}

// ---- summary --------------------------------------------------------------

type Getter = (r: RunResult) => number | null | undefined;

function metrics(): Array<[string, Getter]> {
  const base = (r: RunResult) => ok(r.baseline);
  const fork = (r: RunResult) => ok(r.fork);
  const gc = (r: RunResult) => ok(r.gcore);
  const ws = (r: RunResult) => ok(r.wpsnap);
  const wr = (r: RunResult) => ok(r['wpsnap-rate']);
  const list: Array<[string, Getter]> = [
    ['baseline.writesPerSec', (r) => base(r)?.window.writesPerSec],
    ['baseline.maxGapMillis', (r) => base(r)?.window.maxGapMillis],
    ['baseline.faultedCount', (r) => base(r)?.window.faultedCount],
    ['fork.forkMicros', (r) => fork(r)?.forkMicros],
    ['fork.target.maxGapMillis', (r) => fork(r)?.window.maxGapMillis],
    ['fork.target.faultedCount', (r) => fork(r)?.window.faultedCount],
    ['fork.target.faultedP50Micros', (r) => fork(r)?.window.faultedP50Micros],
    ['fork.target.faultedP99Micros', (r) => fork(r)?.window.faultedP99Micros],
    ['fork.target.writesPerSec', (r) => fork(r)?.window.writesPerSec],
    ['baseline.cpuShare', (r) => base(r)?.window.cpuShare],
    ['baseline.runqueueShare', (r) => base(r)?.window.runqueueShare],
    ['fork.target.cpuShare', (r) => fork(r)?.window.cpuShare],
    ['gcore.minorFaults', (r) => gc(r)?.minorFaults],
    ['gcore.wallMillis', (r) => gc(r)?.wallMillis],
    ['gcore.cpuMillis', (r) => (gc(r) ? gc(r)!.cpuUserMillis + gc(r)!.cpuSysMillis : undefined)],
    ['gcore.zstd1Millis', (r) => gc(r)?.zstd1Millis],
    ['gcore.target.maxGapMillis', (r) => gc(r)?.window.maxGapMillis],
    ['gcore.target.writesPerSec', (r) => gc(r)?.window.writesPerSec],
    ['gcore.coreBytes', (r) => gc(r)?.coreBytes],
    ['gcore.zstd1Bytes', (r) => gc(r)?.zstd1Bytes],
  ];
  for (const [name, get] of [
    ['wpsnap', ws],
    ['wpsnap-rate', wr],
  ] as const) {
    list.push(
      [`${name}.pauseMicros`, (r) => get(r)?.pauseMicros],
      [`${name}.durationMillis`, (r) => get(r)?.durationMillis],
      [`${name}.wallMillis`, (r) => get(r)?.wallMillis],
      [`${name}.cpuUserMillis`, (r) => get(r)?.cpuUserMillis],
      [`${name}.cpuSysMillis`, (r) => get(r)?.cpuSysMillis],
      [`${name}.minorFaults`, (r) => get(r)?.minorFaults],
      [`${name}.threads.main.runMillis`, (r) => get(r)?.threads?.['node (main)']?.runMillis],
      [`${name}.threads.main.waitMillis`, (r) => get(r)?.threads?.['node (main)']?.waitMillis],
      [`${name}.threads.engine.runMillis`, (r) => get(r)?.threads?.['wpsnap-engine']?.runMillis],
      [`${name}.threads.engine.waitMillis`, (r) => get(r)?.threads?.['wpsnap-engine']?.waitMillis],
      [`${name}.threads.other.runMillis`, (r) => get(r)?.threads?.['node']?.runMillis],
      [`${name}.threads.other.waitMillis`, (r) => get(r)?.threads?.['node']?.waitMillis],
      [`${name}.bytesRaw`, (r) => get(r)?.bytesRaw],
      [`${name}.bytesStored`, (r) => get(r)?.bytesStored],
      [`${name}.faults`, (r) => get(r)?.faults],
      [`${name}.pagesFromFaults`, (r) => get(r)?.engine['pagesFromFaults'] as number | undefined],
      [`${name}.pagesFromSweep`, (r) => get(r)?.engine['pagesFromSweep'] as number | undefined],
      [`${name}.overflowBatches`, (r) => get(r)?.engine['overflowBatches'] as number | undefined],
      [`${name}.faultServiceP50Micros`, (r) => get(r)?.faultP50Micros],
      [`${name}.faultServiceP99Micros`, (r) => get(r)?.faultP99Micros],
      [`${name}.lostPages`, (r) => get(r)?.lostPages],
      [`${name}.pause.freezeMicros`, (r) => get(r)?.pauseBreakdownMicros?.['freeze']],
      [`${name}.pause.injectMicros`, (r) => get(r)?.pauseBreakdownMicros?.['inject']],
      [`${name}.pause.planMicros`, (r) => get(r)?.pauseBreakdownMicros?.['plan']],
      [`${name}.pause.protectMicros`, (r) => get(r)?.pauseBreakdownMicros?.['protect']],
      [`${name}.pause.copyMicros`, (r) => get(r)?.pauseBreakdownMicros?.['copy']],
      [`${name}.pause.thawMicros`, (r) => get(r)?.pauseBreakdownMicros?.['thaw']],
      [`${name}.target.startStallMillis`, (r) => get(r)?.startStallMillis],
      [`${name}.target.maxGapMillis`, (r) => get(r)?.window.maxGapMillis],
      [`${name}.target.faultedCount`, (r) => get(r)?.window.faultedCount],
      [`${name}.target.faultedP50Micros`, (r) => get(r)?.window.faultedP50Micros],
      [`${name}.target.faultedP99Micros`, (r) => get(r)?.window.faultedP99Micros],
      [`${name}.target.writesPerSec`, (r) => get(r)?.window.writesPerSec],
      [`${name}.target.minSliceWritesPerSec`, (r) => get(r)?.window.minSliceWritesPerSec],
      [`${name}.target.cpuShare`, (r) => get(r)?.window.cpuShare],
      [`${name}.target.runqueueShare`, (r) => get(r)?.window.runqueueShare],
    );
  }
  const eo = (r: RunResult) => ok(r['engine-only']);
  list.push(
    ['engine-only.pauseMicros', (r) => eo(r)?.pauseMicros],
    ['engine-only.durationMillis', (r) => eo(r)?.durationMillis],
    ['engine-only.cpuMillis', (r) => (eo(r) ? eo(r)!.cpuUserMillis + eo(r)!.cpuSysMillis : undefined)],
    ['engine-only.faults', (r) => eo(r)?.faults],
    ['engine-only.overflowBatches', (r) => eo(r)?.engine.overflowBatches],
    ['engine-only.faultServiceP50Micros', (r) => eo(r)?.faultP50Micros],
    ['engine-only.faultServiceP99Micros', (r) => eo(r)?.faultP99Micros],
    ['engine-only.target.faultedP50Micros', (r) => eo(r)?.window.faultedP50Micros],
    ['engine-only.target.faultedP99Micros', (r) => eo(r)?.window.faultedP99Micros],
    ['engine-only.target.writesPerSec', (r) => eo(r)?.window.writesPerSec],
    ['engine-only.target.cpuShare', (r) => eo(r)?.window.cpuShare],
    ['engine-only.target.runqueueShare', (r) => eo(r)?.window.runqueueShare],
    ['engine-only.target.maxGapMillis', (r) => eo(r)?.window.maxGapMillis],
    ['engine-only.target.startStallMillis', (r) => eo(r)?.startStallMillis],
  );
  return list;
}

type Metrics = Record<string, number | null>;

interface RatioDef {
  name: string;
  target: string;
  pass?: (v: number) => boolean;
  of: (m: Metrics) => number | null;
}

const g = (m: Metrics, k: string): number | null => m[k] ?? null;
const sum = (a: number | null, b: number | null): number | null => (a === null || b === null ? null : a + b);

function ratioDefs(rtCross: number | null): RatioDef[] {
  return [
    { name: 'wpsnap pause / fork() pause', target: '<= 1.2', pass: (v) => v <= 1.2, of: (m) => ratio(g(m, 'wpsnap.pauseMicros'), g(m, 'fork.forkMicros')) },
    {
      name: 'wpsnap start stall / fork() stall, both as the target saw them',
      target: '(info)',
      of: (m) => ratio(g(m, 'wpsnap.target.startStallMillis'), g(m, 'fork.target.maxGapMillis')),
    },
    {
      name: 'gcore stall (target max gap) / wpsnap pause',
      target: '>= 50',
      pass: (v) => v >= 50,
      of: (m) => ratio(g(m, 'gcore.target.maxGapMillis'), (g(m, 'wpsnap.pauseMicros') ?? NaN) / 1e3),
    },
    {
      name: 'gcore stall / wpsnap start stall, both as the target saw them',
      target: '(info)',
      of: (m) => ratio(g(m, 'gcore.target.maxGapMillis'), g(m, 'wpsnap.target.startStallMillis')),
    },
    { name: 'wpsnap wall / gcore wall (whole commands)', target: '<= 1.5', pass: (v) => v <= 1.5, of: (m) => ratio(g(m, 'wpsnap.wallMillis'), g(m, 'gcore.wallMillis')) },
    {
      name: 'wpsnap wall / (gcore wall + zstd -1 of its core)',
      target: '(info)',
      of: (m) => ratio(g(m, 'wpsnap.wallMillis'), sum(g(m, 'gcore.wallMillis'), g(m, 'gcore.zstd1Millis'))),
    },
    { name: 'engine-only duration / wpsnap duration', target: '(info)', of: (m) => ratio(g(m, 'engine-only.durationMillis'), g(m, 'wpsnap.durationMillis')) },
    { name: 'wpsnap bytesStored / zstd -1 of the core', target: '<= 1.1', pass: (v) => v <= 1.1, of: (m) => ratio(g(m, 'wpsnap.bytesStored'), g(m, 'gcore.zstd1Bytes')) },
    { name: 'target-side write-fault p50 under wpsnap (µs)', target: '<= 30', pass: (v) => v <= 30, of: (m) => g(m, 'wpsnap.target.faultedP50Micros') },
    { name: 'target-side write-fault p99 under wpsnap (µs)', target: '<= 500', pass: (v) => v <= 500, of: (m) => g(m, 'wpsnap.target.faultedP99Micros') },
    { name: 'target-side write-fault p99, engine-only (µs)', target: '(info)', of: (m) => g(m, 'engine-only.target.faultedP99Micros') },
    { name: 'target writes/s under wpsnap / baseline', target: '(info)', of: (m) => ratio(g(m, 'wpsnap.target.writesPerSec'), g(m, 'baseline.writesPerSec')) },
    { name: 'target writes/s under wpsnap --rate / baseline', target: '(info)', of: (m) => ratio(g(m, 'wpsnap-rate.target.writesPerSec'), g(m, 'baseline.writesPerSec')) },
    { name: 'target writes/s under fork / baseline', target: '(info)', of: (m) => ratio(g(m, 'fork.target.writesPerSec'), g(m, 'baseline.writesPerSec')) },
    { name: 'target writes/s under gcore / baseline', target: '(info)', of: (m) => ratio(g(m, 'gcore.target.writesPerSec'), g(m, 'baseline.writesPerSec')) },
    {
      name: 'wpsnap fault service p50 / kernel round trip p50 (copy, cross CPU)',
      target: '(info)',
      of: (m) => ratio(g(m, 'wpsnap.faultServiceP50Micros'), rtCross),
    },
  ];
}

/** Each ratio from the medians, and its median and range over the runs (each run pairs peers measured minutes apart). */
function ratios(medians: Metrics, perRun: Metrics[], roundtrip: RoundtripResult[]): RatioLine[] {
  const rtCross = median(roundtrip.filter((r) => r.copy && !r.spin).map((r) => r.crossCpuP50Micros));
  return ratioDefs(rtCross).map((d) => {
    const value = d.of(medians);
    const runs = perRun.map((m) => d.of(m));
    const range = minMax(runs);
    return {
      name: d.name,
      value: round(value, 3),
      perRunMedian: round(median(runs), 3),
      perRunRange: range ? [round(range[0], 3) as number, round(range[1], 3) as number] : null,
      target: d.target,
      pass: value === null || d.pass === undefined ? null : d.pass(value),
    };
  });
}

/** Medians, ranges and ratios of a scenario's runs (also to re-summarise a saved result file). */
export function summarize(result: Pick<Snapshot1GiBResult, 'runs' | 'roundtrip'>): Pick<Snapshot1GiBResult, 'medians' | 'ranges' | 'ratios'> {
  const medians: Metrics = {};
  const ranges: Record<string, [number, number] | null> = {};
  const perRun: Metrics[] = result.runs.map(() => ({}));
  for (const [name, get] of metrics()) {
    const values = result.runs.map(get);
    medians[name] = median(values);
    ranges[name] = minMax(values);
    values.forEach((v, i) => ((perRun[i] as Metrics)[name] = typeof v === 'number' ? v : null));
  }
  return { medians, ranges, ratios: ratios(medians, perRun, result.roundtrip) };
}

function rtName(rt: { copy: boolean; spin: boolean }): string {
  return `uffd_roundtrip${rt.copy ? ' --copy' : ''}${rt.spin ? ' --spin' : ''}`;
}

function fmt(name: string, v: number | null): string {
  if (v === null) return '—';
  if (/Bytes$|bytesRaw$|bytesStored$/.test(name)) return `${(v / 2 ** 20).toFixed(1)} MiB`;
  if (/PerSec$/.test(name)) return `${(v / 1e6).toFixed(2)} M/s`;
  if (/Micros$/.test(name)) return v >= 10_000 ? `${(v / 1e3).toFixed(1)} ms` : `${round(v, 1)} µs`;
  if (/Millis$/.test(name)) return v >= 10_000 ? `${(v / 1e3).toFixed(2)} s` : `${round(v, 1)} ms`;
  return String(round(v, 2));
}

export function printTable(result: Snapshot1GiBResult, out: NodeJS.WritableStream = process.stdout): void {
  const rows: string[][] = [['metric', 'median', 'min', 'max']];
  for (const [name, v] of Object.entries(result.medians)) {
    if (v === null) continue;
    const r = result.ranges[name] ?? null;
    rows.push([name, fmt(name, v), r ? fmt(name, r[0]) : '', r ? fmt(name, r[1]) : '']);
  }
  for (const [copy, spin] of [
    [false, false],
    [true, false],
    [true, true],
  ] as const) {
    const rts = result.roundtrip.filter((r) => r.copy === copy && r.spin === spin);
    if (rts.length === 0) continue;
    const m = (f: (r: RoundtripResult) => number | null): string => String(round(median(rts.map(f)), 1) ?? '—');
    rows.push([
      `${rtName({ copy, spin })} p50 same / cross CPU`,
      `${m((r) => r.sameCpuP50Micros)} / ${m((r) => r.crossCpuP50Micros)} µs`,
      `p99 ${m((r) => r.sameCpuP99Micros)} / ${m((r) => r.crossCpuP99Micros)} µs`,
      '',
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const text = rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')).join('\n');
  if (result.pipeline && 'stages' in result.pipeline) {
    out.write(`\npipeline stages on one core (${result.pipeline.mib} MiB of the target's content, zstd -1 ratio ${result.pipeline.zstd1Ratio}):\n`);
    for (const st of result.pipeline.stages) out.write(`  ${st.stage.padEnd(62)} ${String(st.MBps).padStart(6)} MB/s  ${st.secondsPerGiB} s/GiB\n`);
  }
  out.write(`\n${text}\n\nratios (medians of ${result.options.runs} runs):\n`);
  out.write(`  ${''.padEnd(68)} ${'of medians'.padStart(10)}  ${'per run: median [min–max]'.padEnd(30)} target\n`);
  for (const l of result.ratios) {
    const verdict = l.pass === null ? '' : l.pass ? 'PASS' : 'MISS';
    const perRun = l.perRunRange ? `${l.perRunMedian} [${l.perRunRange[0]}–${l.perRunRange[1]}]` : '—';
    out.write(`  ${l.name.padEnd(68)} ${String(l.value ?? '—').padStart(10)}  ${perRun.padEnd(30)} ${l.target.padEnd(7)} ${verdict}\n`);
  }
}

// ---- the scenario -----------------------------------------------------------

async function treeState(): Promise<{ head: string | null; modified: string[] }> {
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

function preflight(): void {
  const root = repoRoot();
  for (const f of ['fixtures/build/faultlat', 'fixtures/build/uffd_roundtrip', 'dist/fixtures/launch.js']) {
    if (!existsSync(join(root, f))) {
      throw new Error(`${f} is missing: build first (npm run build:native && make -C fixtures && npx tsc -p tsconfig.json)`);
    }
  }
  if (process.getuid?.() !== 0) throw new Error('run as root: wpsnap and gcore attach to the target with ptrace');
}

export async function runSnapshot1GiB(partial: Partial<Snapshot1GiBOptions> = {}): Promise<Snapshot1GiBResult> {
  const o: Snapshot1GiBOptions = { ...DEFAULTS, ...partial };
  preflight();
  if (!existsSync(resolve(repoRoot(), o.cli))) throw new Error(`${o.cli} is missing: build first (npx tsc -p tsconfig.json)`);
  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-'));
  log(`tree ${tree.head ?? '?'}${tree.modified.length > 0 ? ` + modified: ${tree.modified.join(', ')}` : ''}`);
  log(`snapshot-1gib: ${o.runs} runs, ${o.mib} MiB target, peers ${o.peers.join(', ')}; scratch ${dir}`);

  // The floor, measured while the machine does not also run the target.
  const roundtrip: RoundtripResult[] = [];
  for (let i = 0; i < o.runs; i++) {
    for (const [copy, spin] of [
      [false, false],
      [true, false],
      [true, true],
    ] as const) {
      try {
        const rt = await measureRoundtrip(copy, spin);
        roundtrip.push(rt);
        log(`${rtName(rt)}: same CPU p50 ${rt.sameCpuP50Micros} µs, cross CPU p50 ${rt.crossCpuP50Micros} µs`);
      } catch (error) {
        log(`uffd_roundtrip failed: ${String(error)}`);
      }
    }
  }

  let pipeline: PipelineResult | { error: string } | null = null;
  if (o.pipelineMib > 0) {
    try {
      pipeline = await runPipeline(o.pipelineMib);
      for (const st of pipeline.stages) log(`pipeline ${st.stage}: ${st.MBps} MB/s (${st.secondsPerGiB} s/GiB on one core)`);
    } catch (error) {
      pipeline = { error: String(error) };
      log(`pipeline measurement failed: ${String(error)}`);
    }
  }

  const targetArgs = ['--mib', String(o.mib), '--fork-hold-ms', String(o.forkHoldMs)];
  let target: Faultlat | undefined;
  const runs: RunResult[] = [];
  try {
    log(`launching faultlat ${targetArgs.join(' ')}`);
    target = await Faultlat.launch(targetArgs);
    log(`target pid ${target.pid}, filled in ${String(target.ready['fillMillis'])} ms`);
    await sleep(o.settleMs);

    // Warm-up: one unmeasured pass of each peer (the first copy-on-write, the
    // first core file, the first store are each slower than the steady state).
    for (const peer of o.peers) {
      const r = await measure(peer, target, o, dir, `warmup-${peer}`);
      log(`warm-up ${describe(peer, r)}`);
      await sleep(o.settleMs);
    }

    for (let i = 0; i < o.runs; i++) {
      // Rotate the order each run, and reverse it every other run.
      const rotated = o.peers.map((_, k) => o.peers[(k + i) % o.peers.length] as PeerName);
      const order = i % 2 === 1 ? rotated.reverse() : rotated;
      const run: RunResult = { index: i, order };
      for (const peer of order) {
        const r = await measure(peer, target, o, dir, `run${i}-${peer}`);
        (run as unknown as Record<string, unknown>)[peer] = r;
        log(`run ${i + 1}/${o.runs} ${describe(peer, r)}`);
        await sleep(o.settleMs);
      }
      runs.push(run);
    }
  } finally {
    if (target) await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }

  return {
    scenario: 'snapshot-1gib',
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
    tree,
    options: o,
    target: { args: targetArgs, fillMillis: typeof target?.ready['fillMillis'] === 'number' ? target.ready['fillMillis'] : null },
    roundtrip,
    pipeline,
    runs,
    ...summarize({ runs, roundtrip }),
  };
}
