// The options and result shapes of the snapshot-1gib scenario (bench/snapshot-1gib.ts).
import type { EngineOnlyResult } from './engine-only.js';
import type { PipelineResult } from './pipeline.js';
import type { MachineInfo, ThreadTimes } from './lib.js';

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
export type Outcome<T> = T | Failed;

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

