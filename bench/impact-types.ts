// The options and result shapes of the impact scenario (bench/impact.ts): what
// a snapshot costs the target, wpsnap against fork() + zstd, gcore and gcore +
// zstd, on a target that rewrites all its memory and on one that writes 1% of
// its pages a second, at several sizes.
import type { MachineInfo, ThreadTimes } from './lib.js';

export const WORKLOADS = ['rewrite', 'cache'] as const;
export type Workload = (typeof WORKLOADS)[number];

export const PRIORITIES = ['idle', 'nice', 'normal'] as const;
export type Priority = (typeof PRIORITIES)[number];

/** wpsnap-<priority> are added when the CLI accepts --priority. */
export const BASE_PEERS = ['baseline', 'fork-zstd', 'gcore-zstd', 'wpsnap'] as const;
export type BasePeer = (typeof BASE_PEERS)[number];
export type PeerName = BasePeer | `wpsnap-${Priority}`;

export interface ImpactOptions {
  /** Target sizes, MiB, run smallest first. */
  sizes: number[];
  workloads: Workload[];
  runs: number;
  /** cache: % of the pages written per second. */
  writePct: number;
  /** cache: a write later than this after its due time is skipped (missed). */
  maxLagMs: number;
  baselineMs: number;
  settleMs: number;
  /** Per-command limit: fixed part plus a part per GiB of target. */
  timeoutMs: number;
  timeoutMsPerGiB: number;
  /** The wpsnap CLI (default this tree's dist/cli/main.js). */
  cli: string;
  /** --priority values to run as wpsnap-<p> when the CLI has the option (default: every one it lists but its default). */
  priorities: Priority[] | null;
  /** Subset of the base peers (default all). */
  peers: BasePeer[];
}

export const DEFAULTS: ImpactOptions = {
  sizes: [1024, 8192],
  workloads: [...WORKLOADS],
  runs: 3,
  writePct: 1,
  maxLagMs: 10,
  baselineMs: 3000,
  settleMs: 2000,
  timeoutMs: 120_000,
  timeoutMsPerGiB: 60_000,
  cli: 'dist/cli/main.js',
  priorities: null,
  peers: [...BASE_PEERS],
};

/** What `snapshot --help` says about --priority. */
export interface PriorityProbe {
  available: boolean;
  choices: Priority[];
  default: string | null;
  /** What the bench did about it, for the record. */
  note: string;
}

/** A phase of a window, in ms from the window's start, with the target's (main thread's) CPU in it. */
export interface Phase {
  name: string;
  fromMs: number;
  toMs: number;
  /** Fraction of one CPU the target's writer thread got; null when too short or not sampled. */
  cpuShare: number | null;
  /** Fraction of the phase it was runnable but waiting for a CPU. */
  runqueueShare: number | null;
  /** CPUs (of the machine's 2) used meanwhile by the peer (wpsnap, gcore, zstd, a fork child and its zstd; the bench's own share is in it), and by processes unrelated to the measurement. */
  peerCpus: number | null;
  othersCpus: number | null;
}

/** One gap between two heartbeats, and what the heartbeat thread was doing meanwhile (sampled every 10 ms). */
export interface HeartbeatGap {
  ms: number;
  /** Where it ended, window ms. */
  at: number;
  /** Of the gap: ms the thread was runnable but waiting for a CPU, and ms it ran (null: not sampled). */
  waitMs: number | null;
  runMs: number | null;
  /** The states it was sampled in during the gap (R runnable, S sleeping or waiting on a fault, D uninterruptible, t ptrace-stopped). */
  states: Record<string, number>;
  /** CPUs used during the gap (widened to the 100 ms samples around it) by the target's own threads, the peer (with the bench), and unrelated processes. */
  targetCpus: number | null;
  peerCpus: number | null;
  othersCpus: number | null;
}

export interface HeartbeatWindow {
  beats: number;
  maxGapMillis: number;
  atMillis: number;
  p50GapMicros: number;
  p99GapMicros: number;
  /** The 8 longest gaps of 1 ms or more, in time order. */
  gaps: HeartbeatGap[];
  /** The longest of those gaps less the time the thread waited for a CPU in it: a stop, not a scheduling delay. */
  maxStopMillis: number | null;
}

/** What the target saw in one window (its report), with the raw slices kept for the work-lost integral. */
export interface ImpactWindow {
  windowMillis: number;
  writes: number;
  writesPerSec: number;
  /** Writes in each complete 100 ms slice, then the incomplete tail. */
  sliceMillis: number;
  slices: number[];
  tail: { writes: number; millis: number };
  maxGapMillis: number;
  maxGapAtMillis: number;
  faultedCount: number;
  faultedP50Micros: number;
  faultedP99Micros: number;
  /** Distinct pages the writer wrote in the window. */
  firstWriteCount: number;
  heartbeat: HeartbeatWindow | null;
  cache: { writeRate: number; scheduled: number; missed: number } | null;
  /** The whole window first; then the peer's phases. */
  phases: Phase[];
}

export interface BaselineResult {
  kind: 'baseline';
  window: ImpactWindow;
}

export interface ForkZstdResult {
  kind: 'fork-zstd';
  forkMicros: number;
  childLivedMillis: number;
  childStatus: number;
  /** fork() plus the child's life: until its output was written and fsync()ed. */
  wallMillis: number;
  storedBytes: number;
  /** The child's Private_Dirty (pages the parent copied away from it), sampled about once a second: the largest. */
  childPrivateDirtyKiB: number | null;
  childSamples: number;
  window: ImpactWindow;
}

export interface GcoreZstdResult {
  kind: 'gcore-zstd';
  gcoreWallMillis: number;
  gcoreCpuMillis: number;
  coreBytes: number;
  zstdWallMillis: number;
  /** zstd -1 -T1 of the core, written and fsync()ed: the reference size. */
  zstdBytes: number;
  /** gcore + zstd + fsync. */
  wallMillis: number;
  /** The window up to gcore's exit (the "gcore" peer). */
  gcoreWindow: ImpactWindow;
  /** The whole window, gcore then zstd (the "gcore + zstd" peer). */
  window: ImpactWindow;
}

export interface WpsnapResult {
  kind: 'wpsnap';
  /** The --priority given (null: the CLI's default). */
  priority: Priority | null;
  wallMillis: number;
  cpuUserMillis: number;
  cpuSysMillis: number;
  /** Peak RSS of the CLI process. */
  vmHwmKiB: number | null;
  threads: Record<string, ThreadTimes> | null;
  pauseMicros: number;
  durationMillis: number;
  protectWindowMillis: number | null;
  durableMillis: number | null;
  bytesRaw: number;
  bytesStored: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  lostPages: number;
  pauseBreakdownMicros: Record<string, number> | null;
  /** JSON fields that may not exist yet: null when absent. */
  stagingBytesPeak: number | null;
  stops: unknown;
  targetCpuShare: unknown;
  /** Window ms: the command's spawn and exit, and the end of the pause (see resumeFrom). */
  cliStartMs: number;
  cliEndMs: number;
  resumeAtMs: number;
  /** The command's own figures' estimate of it: exit - durableMillis (includes the command's exit). */
  resumeEstimateMs: number;
  /**
   * ptrace: between the last sample (every 10 ms) that saw a target thread
   * ptrace-stopped and that thread's next sample (the midpoint; the pause is
   * usually caught once it is over ~10 ms); heartbeat / writer: the end of
   * that thread's gap of >= 0.8 x the pause nearest to resumeEstimateMs
   * (within 300 ms; late by any wait for a CPU after the thaw); durable:
   * resumeEstimateMs (late by the command's exit).
   */
  resumeFrom: 'ptrace' | 'heartbeat' | 'writer' | 'durable';
  window: ImpactWindow;
}

export type PeerResult = BaselineResult | ForkZstdResult | GcoreZstdResult | WpsnapResult;
export interface Failed {
  error: string;
}
export type Outcome<T> = T | Failed;

export interface ImpactRun {
  index: number;
  order: PeerName[];
  peers: Partial<Record<PeerName, Outcome<PeerResult>>>;
}

/** One target: a workload at a size, and every run on it. */
export interface TargetResult {
  workload: Workload;
  mib: number;
  args: string[];
  fillMillis: number | null;
  /** cache: the schedule, writes/s. */
  writeRate: number | null;
  runs: ImpactRun[];
  /** Set when the target could not be run (not enough memory, a failure). */
  error?: string;
}

/** A figure's median over runs, and its range. */
export interface Figure {
  median: number | null;
  range: [number, number] | null;
}

/** Figures per column ("fork+zstd", "gcore", "gcore+zstd", "wpsnap", …) of one target. */
export interface TargetSummary {
  workload: Workload;
  mib: number;
  columns: Record<string, Record<string, Figure>>;
}

export interface TargetCheck {
  name: string;
  workload: Workload | null;
  mib: number | null;
  value: number | null;
  target: string;
  /** null: information, or no figure. */
  pass: boolean | null;
  note?: string;
}

export interface GrowthLine {
  workload: Workload;
  column: string;
  figure: string;
  small: number | null;
  large: number | null;
  /** large / small. */
  factor: number | null;
}

export interface ImpactSummary {
  targets: TargetSummary[];
  checks: TargetCheck[];
  growth: GrowthLine[];
  smallMib: number | null;
  largeMib: number | null;
}

export interface ImpactResult {
  scenario: 'impact';
  startedAt: string;
  finishedAt: string;
  machine: { atStart: MachineInfo; loadavgAtEnd: number[] };
  tree: { head: string | null; modified: string[] };
  options: ImpactOptions;
  priority: PriorityProbe;
  /** Wall time per target, ms. */
  targetMillis: Record<string, number>;
  targets: TargetResult[];
  summary: ImpactSummary;
  /** Set by --summarize of several files: the files merged. */
  mergedFrom?: string[];
}
