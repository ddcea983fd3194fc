// Medians, ratios against the peers and the printed table of a snapshot-1gib run.
import { median, minMax, ratio, round } from './lib.js';
import type {
  EngineOnlyPeerResult,
  Failed,
  ForkResult,
  GcoreResult,
  Outcome,
  PeerName,
  RatioLine,
  RoundtripResult,
  RunResult,
  Snapshot1GiBResult,
  TargetWindow,
  WpsnapResult,
} from './snapshot-1gib-types.js';
import { ok } from './snapshot-1gib-peers.js';

export function describe(peer: PeerName, r: Outcome<unknown>): string {
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
      [`${name}.pause.restoreStateMicros`, (r) => get(r)?.pauseBreakdownMicros?.['restoreState']],
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

export function rtName(rt: { copy: boolean; spin: boolean }): string {
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

