// Figures, medians, checks against issue 9's targets, growth from the
// smallest to the largest size, and the printed tables of an impact run.
import { median, minMax, ratio, round } from './lib.js';
import type {
  Figure,
  GrowthLine,
  HeartbeatGap,
  ImpactRun,
  ImpactSummary,
  ImpactWindow,
  Outcome,
  PeerResult,
  TargetCheck,
  TargetResult,
  TargetSummary,
  Workload,
  WpsnapResult,
} from './impact-types.js';

const ok = <T extends PeerResult>(o: Outcome<PeerResult> | undefined): T | undefined =>
  o !== undefined && !('error' in o) ? (o as T) : undefined;

// ---- work lost ----------------------------------------------------------------

/**
 * Seconds of the target's work lost in [fromMs, toMs] of a window: the
 * integral of (1 - rate / baselineRate) over the 100 ms slices (a slice
 * partly inside counts in proportion), unclipped, so a slice that catches up
 * pays back. Over the whole window it is windowSeconds - writes / baselineRate.
 */
export function workLost(w: ImpactWindow, baselineRate: number | null, fromMs = 0, toMs = Infinity): number | null {
  if (baselineRate === null || !(baselineRate > 0)) return null;
  const parts: Array<[number, number, number]> = w.slices.map((n, k) => [k * w.sliceMillis, (k + 1) * w.sliceMillis, n]);
  const tailFrom = w.slices.length * w.sliceMillis;
  parts.push([tailFrom, tailFrom + w.tail.millis, w.tail.writes]);
  let lost = 0;
  for (const [a, b, n] of parts) {
    const overlap = Math.min(b, toMs) - Math.max(a, fromMs);
    if (overlap <= 0 || b <= a) continue;
    lost += (overlap / (b - a)) * ((b - a) / 1000 - n / baselineRate);
  }
  return lost;
}

// ---- figures of one run ---------------------------------------------------------

type Row = Record<string, number | null | undefined>;

const MiB = 2 ** 20;

/** The heartbeat's longest gap with what its thread did meanwhile. */
function longestGap(w: ImpactWindow): HeartbeatGap | undefined {
  const gaps = w.heartbeat?.gaps ?? [];
  return gaps.reduce<HeartbeatGap | undefined>((best, g) => (best === undefined || g.ms > best.ms ? g : best), undefined);
}
const phaseOf = (w: ImpactWindow, name: string) => w.phases.find((p) => p.name === name);

function windowFigures(w: ImpactWindow, rate: number | null, prefix = ''): Row {
  const whole = phaseOf(w, 'window');
  return {
    [`${prefix}workLostSeconds`]: workLost(w, rate),
    [`${prefix}cpuShare`]: whole?.cpuShare,
    [`${prefix}peerCpus`]: whole?.peerCpus,
    [`${prefix}othersCpus`]: whole?.othersCpus,
    [`${prefix}heartbeatMaxGapOthersCpus`]: longestGap(w)?.othersCpus,
    [`${prefix}heartbeatMaxGapPeerCpus`]: longestGap(w)?.peerCpus,
    [`${prefix}runqueueShare`]: whole?.runqueueShare,
    [`${prefix}writesPerSec`]: w.writesPerSec,
    [`${prefix}writerMaxGapMillis`]: w.maxGapMillis,
    [`${prefix}heartbeatMaxGapMillis`]: w.heartbeat?.maxGapMillis,
    [`${prefix}heartbeatMaxGapWaitMillis`]: longestGap(w)?.waitMs,
    [`${prefix}heartbeatMaxStopMillis`]: w.heartbeat?.maxStopMillis,
    [`${prefix}faultedCount`]: w.faultedCount,
    [`${prefix}faultedP99Micros`]: w.faultedP99Micros,
    [`${prefix}cacheMissed`]: w.cache?.missed,
  };
}

function phaseFigures(w: ImpactWindow, rate: number | null, name: string, label: string): Row {
  const p = phaseOf(w, name);
  if (!p) return {};
  return {
    [`workLost${label}Seconds`]: workLost(w, rate, p.fromMs, p.toMs),
    [`cpuShare${label}`]: p.cpuShare,
    [`runqueueShare${label}`]: p.runqueueShare,
    [`othersCpus${label}`]: p.othersCpus,
  };
}

function wpsnapFigures(s: WpsnapResult, rate: number | null, mib: number, zstdBytes: number | null, forkMicros: number | null): Row {
  const w = s.window;
  const hb = w.heartbeat;
  return {
    pauseMillis: s.pauseMicros / 1e3,
    pauseOverFork: ratio(s.pauseMicros, forkMicros),
    heartbeatOverPause: hb ? ratio(hb.maxGapMillis * 1e3, s.pauseMicros) : null,
    heartbeatStopOverPause: hb?.maxStopMillis == null ? null : ratio(hb.maxStopMillis * 1e3, s.pauseMicros),
    heartbeatMaxGapAfterResumeMillis: hb ? hb.atMillis - s.resumeAtMs : null,
    protectWindowMillis: s.protectWindowMillis,
    protectWindowSecPerGiB: s.protectWindowMillis === null ? null : s.protectWindowMillis / 1000 / (mib / 1024),
    durableMillis: s.durableMillis,
    wallMillis: s.wallMillis,
    storedMiB: s.bytesStored / MiB,
    storedOverZstd1: ratio(s.bytesStored, zstdBytes),
    ...windowFigures(w, rate),
    ...phaseFigures(w, rate, 'startup', 'Startup'),
    ...phaseFigures(w, rate, 'protected', 'Protected'),
    ...phaseFigures(w, rate, 'after', 'After'),
    peakRssMiB: s.vmHwmKiB === null ? null : s.vmHwmKiB / 1024,
    stagingPeakMiB: s.stagingBytesPeak === null ? null : s.stagingBytesPeak / MiB,
    cpuSeconds: (s.cpuUserMillis + s.cpuSysMillis) / 1000,
    faults: s.faults,
    faultServiceP99Micros: s.faultP99Micros,
    lostPages: s.lostPages,
  };
}

/** Figures per column of one run. */
function runFigures(run: ImpactRun, t: TargetResult, rate: number | null): Record<string, Row> {
  const out: Record<string, Row> = {};
  const base = ok<Extract<PeerResult, { kind: 'baseline' }>>(run.peers.baseline);
  const fork = ok<Extract<PeerResult, { kind: 'fork-zstd' }>>(run.peers['fork-zstd']);
  const gz = ok<Extract<PeerResult, { kind: 'gcore-zstd' }>>(run.peers['gcore-zstd']);
  const zstdBytes = gz?.zstdBytes ?? null;
  if (base) out['baseline'] = windowFigures(base.window, rate);
  if (fork) {
    const hb = fork.window.heartbeat;
    out['fork+zstd'] = {
      pauseMillis: fork.forkMicros / 1e3,
      heartbeatOverPause: hb ? ratio(hb.maxGapMillis * 1e3, fork.forkMicros) : null,
      heartbeatStopOverPause: hb?.maxStopMillis == null ? null : ratio(hb.maxStopMillis * 1e3, fork.forkMicros),
      protectWindowMillis: fork.childLivedMillis,
      protectWindowSecPerGiB: fork.childLivedMillis / 1000 / (t.mib / 1024),
      durableMillis: fork.wallMillis,
      wallMillis: fork.wallMillis,
      storedMiB: fork.storedBytes / MiB,
      storedOverZstd1: ratio(fork.storedBytes, zstdBytes),
      ...windowFigures(fork.window, rate),
      cowMiB: (fork.window.firstWriteCount * 4096) / MiB,
      childPrivateDirtyMiB: fork.childPrivateDirtyKiB === null ? null : fork.childPrivateDirtyKiB / 1024,
    };
  }
  if (gz) {
    const stall = gz.gcoreWindow.heartbeat?.maxGapMillis ?? gz.gcoreWindow.maxGapMillis;
    out['gcore'] = {
      pauseMillis: stall,
      protectWindowMillis: gz.gcoreWallMillis,
      protectWindowSecPerGiB: gz.gcoreWallMillis / 1000 / (t.mib / 1024),
      wallMillis: gz.gcoreWallMillis,
      storedMiB: gz.coreBytes / MiB,
      storedOverZstd1: ratio(gz.coreBytes, zstdBytes),
      cpuSeconds: gz.gcoreCpuMillis / 1000,
      ...windowFigures(gz.gcoreWindow, rate),
    };
    out['gcore+zstd'] = {
      pauseMillis: stall,
      protectWindowMillis: gz.gcoreWallMillis,
      protectWindowSecPerGiB: gz.gcoreWallMillis / 1000 / (t.mib / 1024),
      durableMillis: gz.wallMillis,
      wallMillis: gz.wallMillis,
      storedMiB: gz.zstdBytes / MiB,
      storedOverZstd1: 1,
      ...windowFigures(gz.window, rate),
      ...phaseFigures(gz.window, rate, 'zstd', 'Zstd'),
    };
  }
  for (const [peer, outcome] of Object.entries(run.peers)) {
    const s = ok<WpsnapResult>(outcome);
    if (s?.kind !== 'wpsnap') continue;
    out[wpsnapColumn(peer)] = wpsnapFigures(s, rate, t.mib, zstdBytes, fork?.forkMicros ?? null);
  }
  return out;
}

export function wpsnapColumn(peer: string): string {
  return peer === 'wpsnap' ? 'wpsnap' : `wpsnap --priority ${peer.slice('wpsnap-'.length)}`;
}

/** The writes/s the target does when nothing is attached: the schedule (cache), or the same run's baseline (rewrite; else the median baseline). */
function baselineRate(t: TargetResult, run: ImpactRun): number | null {
  if (t.workload === 'cache') return t.writeRate;
  const own = ok<Extract<PeerResult, { kind: 'baseline' }>>(run.peers.baseline);
  if (own) return own.window.writesPerSec;
  return median(t.runs.map((r) => ok<Extract<PeerResult, { kind: 'baseline' }>>(r.peers.baseline)?.window.writesPerSec));
}

function summarizeTarget(t: TargetResult): TargetSummary {
  const perRun = t.runs.map((run) => runFigures(run, t, baselineRate(t, run)));
  const columns: Record<string, Record<string, Figure>> = {};
  for (const figs of perRun) {
    for (const [col, row] of Object.entries(figs)) {
      const c = (columns[col] ??= {});
      for (const key of Object.keys(row)) c[key] ??= { median: null, range: null };
    }
  }
  for (const [col, c] of Object.entries(columns)) {
    for (const key of Object.keys(c)) {
      const values = perRun.map((f) => f[col]?.[key]);
      const range = minMax(values);
      c[key] = { median: median(values), range };
    }
  }
  return { workload: t.workload, mib: t.mib, columns };
}

// ---- checks against issue 9's targets -------------------------------------------------

const fig = (s: TargetSummary | undefined, col: string, key: string): number | null => s?.columns[col]?.[key]?.median ?? null;

function checks(targets: TargetSummary[], largeMib: number | null): TargetCheck[] {
  const out: TargetCheck[] = [];
  const add = (c: TargetCheck): void => {
    out.push({ ...c, value: round(c.value, 3) });
  };
  for (const s of targets) {
    const w = s.workload;
    const at = { workload: w, mib: s.mib };
    const atLargeCache = w === 'cache' && s.mib === largeMib;
    const judged = (applies: boolean, v: number | null, pass: (v: number) => boolean): boolean | null => (applies && v !== null ? pass(v) : null);
    const pause = fig(s, 'wpsnap', 'pauseMillis');
    add({ name: 'wpsnap pause (ms)', ...at, value: pause, target: atLargeCache ? '<= 5' : '(info; <= 5 at the largest cache)', pass: judged(atLargeCache, pause, (v) => v <= 5) });
    const pf = ratio(pause, fig(s, 'fork+zstd', 'pauseMillis'));
    if (w === 'cache') {
      add({ name: 'wpsnap pause / fork()', ...at, value: pf, target: atLargeCache ? '<= 0.05' : '(info; <= 0.05 at the largest cache)', pass: judged(atLargeCache, pf, (v) => v <= 0.05) });
    } else {
      const at1 = s.mib === 1024;
      add({ name: 'wpsnap pause / fork()', ...at, value: pf, target: at1 ? "<= 1.02 (today's 0.66-1.02)" : '(info)', pass: judged(at1, pf, (v) => v <= 1.02) });
      const pw = fig(s, 'wpsnap', 'protectWindowSecPerGiB');
      add({ name: 'wpsnap protection window per GiB (s)', ...at, value: pw, target: '<= 0.5', pass: judged(true, pw, (v) => v <= 0.5) });
    }
    const lw = fig(s, 'wpsnap', 'workLostSeconds');
    const lf = fig(s, 'fork+zstd', 'workLostSeconds');
    add({
      name: 'target work lost: wpsnap - fork+zstd (s)',
      ...at,
      value: lw === null || lf === null ? null : lw - lf,
      target: '<= 0',
      pass: judged(true, lw === null || lf === null ? null : lw - lf, (v) => v <= 0),
      note: `wpsnap ${round(lw, 2) ?? '—'} s, fork+zstd ${round(lf, 2) ?? '—'} s`,
    });
    const wall = ratio(fig(s, 'wpsnap', 'wallMillis'), fig(s, 'fork+zstd', 'wallMillis'));
    add({ name: 'wpsnap wall (command) / fork+zstd wall', ...at, value: wall, target: '<= 1', pass: judged(true, wall, (v) => v <= 1) });
    const dur = ratio(fig(s, 'wpsnap', 'durableMillis'), fig(s, 'fork+zstd', 'wallMillis'));
    add({ name: 'wpsnap durableMillis / fork+zstd wall', ...at, value: dur, target: '(info)', pass: null });
    const st = fig(s, 'wpsnap', 'storedOverZstd1');
    add({ name: 'wpsnap stored / zstd -1 of the core', ...at, value: st, target: '<= 1.0', pass: judged(true, st, (v) => v <= 1.0) });
    const hb = fig(s, 'wpsnap', 'heartbeatOverPause');
    add({
      name: "heartbeat's longest gap / wpsnap pauseMicros",
      ...at,
      value: hb,
      target: '0.9-1.1',
      pass: judged(true, hb, (v) => v >= 0.9 && v <= 1.1),
      note: hbNote(s),
    });
    const stop = fig(s, 'wpsnap', 'heartbeatStopOverPause');
    add({
      name: "… its longest gap less run-queue wait / pauseMicros",
      ...at,
      value: stop,
      target: '(info) 0.9-1.1',
      pass: null,
      note: `${round(fig(s, 'wpsnap', 'heartbeatMaxStopMillis'), 1) ?? '—'} ms`,
    });
    const rss = fig(s, 'wpsnap', 'peakRssMiB');
    const cow = fig(s, 'fork+zstd', 'cowMiB');
    add({ name: "wpsnap peak RSS / fork child's copy-on-write copies", ...at, value: ratio(rss, cow), target: '(info)', pass: null, note: `${round(rss, 0) ?? '—'} MiB vs ${round(cow, 0) ?? '—'} MiB` });
    const staging = fig(s, 'wpsnap', 'stagingPeakMiB');
    add({ name: "wpsnap staging peak / fork child's copy-on-write copies", ...at, value: ratio(staging, cow), target: '(info)', pass: null, note: staging === null ? 'stagingBytesPeak not in the JSON' : `${round(staging, 0)} MiB` });
  }
  return out;
}

/** Where the heartbeat's longest gap was, against the pause, and how much of it was a wait for a CPU. */
function hbNote(s: TargetSummary): string {
  const after = fig(s, 'wpsnap', 'heartbeatMaxGapAfterResumeMillis');
  const wait = fig(s, 'wpsnap', 'heartbeatMaxGapWaitMillis');
  const gap = fig(s, 'wpsnap', 'heartbeatMaxGapMillis');
  const where =
    after === null
      ? 'no heartbeat'
      : Math.abs(after) < 0.5
        ? `the longest gap is the pause's own (${round(gap, 1)} ms around the pause)`
        : `the longest gap ended ${round(after, 1)} ms ${after > 0 ? 'after' : 'before'} the pause's end`;
  const others = fig(s, 'wpsnap', 'heartbeatMaxGapOthersCpus');
  const peer = fig(s, 'wpsnap', 'heartbeatMaxGapPeerCpus');
  return `${where}; ${round(wait, 1) ?? '?'} ms of it runnable, waiting for a CPU, while wpsnap used ${round(peer, 2) ?? '?'} and unrelated processes ${round(others, 2) ?? '?'} CPUs`;
}

// ---- growth -----------------------------------------------------------------------

const GROWTH: Array<[string, string[]]> = [
  ['pauseMillis', ['fork+zstd', 'gcore', 'wpsnap']],
  ['heartbeatMaxGapMillis', ['fork+zstd', 'gcore', 'wpsnap']],
  ['heartbeatMaxStopMillis', ['fork+zstd', 'gcore', 'wpsnap']],
  ['protectWindowMillis', ['fork+zstd', 'gcore', 'wpsnap']],
  ['wallMillis', ['fork+zstd', 'gcore', 'gcore+zstd', 'wpsnap']],
  ['durableMillis', ['wpsnap']],
  ['storedMiB', ['fork+zstd', 'gcore+zstd', 'wpsnap']],
  ['workLostSeconds', ['fork+zstd', 'gcore', 'gcore+zstd', 'wpsnap']],
  ['cpuShare', ['fork+zstd', 'gcore+zstd', 'wpsnap']],
  ['peakRssMiB', ['wpsnap']],
  ['stagingPeakMiB', ['wpsnap']],
  ['cowMiB', ['fork+zstd']],
  ['childPrivateDirtyMiB', ['fork+zstd']],
];

function growth(targets: TargetSummary[], small: number | null, large: number | null): GrowthLine[] {
  if (small === null || large === null || small === large) return [];
  const out: GrowthLine[] = [];
  const workloads = [...new Set(targets.map((t) => t.workload))];
  for (const w of workloads) {
    const s = targets.find((t) => t.workload === w && t.mib === small);
    const l = targets.find((t) => t.workload === w && t.mib === large);
    for (const [figure, cols] of GROWTH) {
      for (const column of [...cols, ...(figure === 'pauseMillis' ? extraWpsnapColumns(targets) : [])]) {
        const a = fig(s, column, figure);
        const b = fig(l, column, figure);
        if (a === null && b === null) continue;
        out.push({ workload: w, column, figure, small: round(a, 3), large: round(b, 3), factor: round(ratio(b, a), 2) });
      }
    }
  }
  return out;
}

const extraWpsnapColumns = (targets: TargetSummary[]): string[] =>
  [...new Set(targets.flatMap((t) => Object.keys(t.columns)))].filter((c) => c.startsWith('wpsnap --priority'));

export function summarize(targets: TargetResult[]): ImpactSummary {
  const done = targets.filter((t) => t.runs.length > 0);
  const sizes = done.map((t) => t.mib);
  const smallMib = sizes.length ? Math.min(...sizes) : null;
  const largeMib = sizes.length ? Math.max(...sizes) : null;
  const summaries = done.map(summarizeTarget);
  return { targets: summaries, checks: checks(summaries, largeMib), growth: growth(summaries, smallMib, largeMib), smallMib, largeMib };
}

// ---- printing -----------------------------------------------------------------------

const LABELS: Array<[string, string]> = [
  ['pauseMillis', 'pause / stop: wpsnap pauseMicros, fork(), gcore stall (ms)'],
  ['heartbeatMaxGapMillis', "heartbeat's longest gap (ms)"],
  ['heartbeatOverPause', "heartbeat's longest gap / pause"],
  ['heartbeatMaxGapAfterResumeMillis', '… ended this long after the pause (ms)'],
  ['heartbeatMaxGapWaitMillis', '… of it runnable, waiting for a CPU (ms)'],
  ['heartbeatMaxGapPeerCpus', '… CPUs the peer used meanwhile'],
  ['heartbeatMaxGapOthersCpus', '… CPUs unrelated processes used meanwhile'],
  ['heartbeatMaxStopMillis', "heartbeat's longest gap less its CPU wait (ms)"],
  ['heartbeatStopOverPause', '… / pause'],
  ['writerMaxGapMillis', "writer's longest gap (ms)"],
  ['protectWindowMillis', 'window: protected / child alive / gcore (ms)'],
  ['protectWindowSecPerGiB', '… per GiB (s)'],
  ['durableMillis', 'durable after (ms)'],
  ['wallMillis', 'wall (ms)'],
  ['storedMiB', 'stored (MiB)'],
  ['storedOverZstd1', 'stored / zstd -1 of the core'],
  ['workLostSeconds', 'target work lost (s)'],
  ['workLostStartupSeconds', '… from the spawn to the pause (s)'],
  ['workLostProtectedSeconds', '… while protected (s)'],
  ['workLostAfterSeconds', '… after, until durable (s)'],
  ['workLostZstdSeconds', '… during zstd (s)'],
  ['cpuShare', 'target CPU share, window'],
  ['cpuShareStartup', '… from the spawn to the pause'],
  ['cpuShareProtected', '… while protected'],
  ['cpuShareAfter', '… after, until durable'],
  ['cpuShareZstd', '… during zstd'],
  ['runqueueShare', 'target run-queue share, window'],
  ['runqueueShareStartup', '… from the spawn to the pause'],
  ['runqueueShareProtected', '… while protected'],
  ['runqueueShareAfter', '… after'],
  ['runqueueShareZstd', '… during zstd'],
  ['peerCpus', 'CPUs the peer used, window (with the bench)'],
  ['othersCpus', 'CPUs unrelated processes used, window (of 2)'],
  ['othersCpusStartup', '… from the spawn to the pause'],
  ['othersCpusProtected', '… while protected'],
  ['othersCpusAfter', '… after'],
  ['writesPerSec', 'target writes/s'],
  ['cacheMissed', 'cache writes missed (late > max lag)'],
  ['faultedCount', 'target writes > 2 µs'],
  ['faultedP99Micros', '… p99 (µs)'],
  ['peakRssMiB', 'wpsnap peak RSS (MiB)'],
  ['stagingPeakMiB', 'wpsnap staging peak (MiB)'],
  ['cowMiB', "fork: pages the parent wrote (CoW copies, MiB)"],
  ['childPrivateDirtyMiB', "fork: child's Private_Dirty, last sample (MiB)"],
  ['cpuSeconds', 'CPU of the command (s)'],
  ['faults', 'wpsnap write faults'],
  ['faultServiceP99Micros', 'wpsnap fault service p99 (µs)'],
  ['lostPages', 'wpsnap lost pages'],
  ['pauseOverFork', 'wpsnap pause / fork()'],
];

function fmt(v: number | null | undefined): string {
  if (v === null || v === undefined) return '—';
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(2)}M`;
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')).join('\n');
}

const COLUMN_ORDER = ['baseline', 'fork+zstd', 'gcore', 'gcore+zstd', 'wpsnap'];

export function printTables(
  summary: ImpactSummary,
  runs: number,
  out: NodeJS.WritableStream = process.stdout,
  errors: Array<{ workload: Workload; mib: number; error: string }> = [],
): void {
  for (const s of summary.targets) {
    const rank = (c: string): number => (COLUMN_ORDER.includes(c) ? COLUMN_ORDER.indexOf(c) : COLUMN_ORDER.length);
    const cols = Object.keys(s.columns).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
    const rows: string[][] = [['figure (median' + (runs > 1 ? ' [min–max]' : '') + ')', ...cols]];
    for (const [key, label] of LABELS) {
      if (!cols.some((c) => s.columns[c]?.[key]?.median != null)) continue;
      rows.push([
        label,
        ...cols.map((c) => {
          const f = s.columns[c]?.[key];
          if (!f || f.median === null) return '—';
          return runs > 1 && f.range && f.range[0] !== f.range[1] ? `${fmt(f.median)} [${fmt(f.range[0])}–${fmt(f.range[1])}]` : fmt(f.median);
        }),
      ]);
    }
    out.write(`\n== ${s.workload}, ${s.mib} MiB ==\n${table(rows)}\n`);
  }
  for (const e of errors) out.write(`\n== ${e.workload}, ${e.mib} MiB: NOT RUN: ${e.error}\n`);
  if (summary.checks.length > 0) {
    const rows: string[][] = [['check (issue 9)', 'workload', 'MiB', 'value', 'target', '', 'note']];
    for (const c of summary.checks) {
      rows.push([c.name, c.workload ?? '', c.mib === null ? '' : String(c.mib), fmt(c.value), c.target, c.pass === null ? '' : c.pass ? 'PASS' : 'MISS', c.note ?? '']);
    }
    out.write(`\n${table(rows)}\n`);
  }
  if (summary.growth.length > 0) {
    const rows: string[][] = [['growth', 'workload', 'peer', `${summary.smallMib} MiB`, `${summary.largeMib} MiB`, 'x']];
    for (const g of summary.growth) rows.push([g.figure, g.workload, g.column, fmt(g.small), fmt(g.large), fmt(g.factor)]);
    out.write(`\n${table(rows)}\n(size grew x${round(ratio(summary.largeMib, summary.smallMib), 2)})\n`);
  }
}
