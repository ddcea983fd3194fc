// Scenario "track" (issue 10's performance list): what dirty tracking costs,
// measured by fixtures/build/trackcost in its own process on its own memory.
// `node dist/bench/run.js track [options]`.
//
//   first write   the writer's view of its first store to each page after a
//                 round: region unprotected, uffd-wp async (the kernel
//                 resolves the fault), uffd-wp sync (a thread of the program
//                 serves each fault)
//   round         1% and 100% of the pages written at random, then
//                 PAGEMAP_SCAN (report + re-protect the written pages) against
//                 a read of /proc/self/pagemap (a soft-dirty tracker's read)
//                 and a memcpy of the whole region (no tracking at all)
//
// The bench builds nothing (make -C fixtures does); it runs the program,
// prints the table and writes bench/results/track-<UTC timestamp>.json.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { CpuAccountSampler, log, machineInfo, median, minMax, procKiB, ratio, repoRoot, treeState, type MachineInfo } from './lib.js';

export const TRACK_DEFAULTS = { mib: 1024, runs: 5 } as const;

/** The goal of issue 10: at 1% dirty, PAGEMAP_SCAN at least this many times faster than reading pagemap. */
export const GOAL_PAGEMAP_OVER_SCAN_AT_1PCT = 5;

// ---- what trackcost prints ----------------------------------------------------

/** One pass of one store per page; null where it does not apply (no protection, no fault server). */
export interface PassFigures {
  p50Nanos: number;
  p99Nanos: number;
  meanNanos: number;
  passMillis: number;
  protectMillis: number | null;
  faultsServed: number | null;
}

export interface RoundFigures {
  /** PAGEMAP_SCAN with WP_MATCHING: report the written ranges and protect them again. */
  scanMillis: number;
  /** The same scan without WP_MATCHING (diagnostic: the walk alone). */
  scanNoWpMillis: number;
  pagemapReadMillis: number;
  copyMillis: number;
  /** The random writes that dirtied the round (each an async write-protect fault). */
  writeMillis: number;
  scanRanges: number;
  scanCalls: number;
  pagemapPresent: number;
  softDirtySeen: number;
}

export const PASS_CASES = ['unprotected', 'async', 'sync'] as const;
export type PassCase = (typeof PASS_CASES)[number];

export interface TrackcostDocument {
  mib: number;
  pages: number;
  runs: number;
  seed: number;
  populateMillis: number;
  scanVecLen: number;
  pagemapChunkBytes: number;
  /** Medians over the runs, and every run. */
  firstWrite: Record<PassCase, PassFigures & { runs: PassFigures[] }>;
  rounds: Array<{ dirtyPct: number; dirtyPages: number; stats: RoundFigures & { runs: RoundFigures[] } }>;
}

// ---- the result file ------------------------------------------------------------

export interface RatioLine {
  name: string;
  /** From the two medians. */
  fromMedians: number | null;
  /** Run by run (both figures from the same run): median, min, max. */
  byRun: { median: number | null; range: [number, number] | null };
}

export interface TrackResult {
  scenario: 'track';
  startedAt: string;
  wallMillis: number;
  command: string;
  options: { mib: number; runs: number };
  machine: { atStart: MachineInfo; loadavgAtEnd: number[] };
  tree: { head: string | null; modified: string[] };
  /** CPUs (1 = one whole CPU) used during the run by unrelated processes and by trackcost. */
  cpus: { others: number; trackcost: number } | null;
  program: TrackcostDocument;
  ratios: RatioLine[];
  goal: { pagemapOverScanAt1Pct: number | null; target: number; met: boolean };
  softDirty: string;
}

function roundAt(doc: TrackcostDocument, pct: number): TrackcostDocument['rounds'][number] {
  const r = doc.rounds.find((x) => x.dirtyPct === pct);
  if (r === undefined) throw new Error(`trackcost printed no ${pct}% round`);
  return r;
}

/** num(a) / den(b), from the medians and run by run (run i of a with run i of b). */
function ratioLine<T>(name: string, a: T & { runs: T[] }, num: (x: T) => number | null, b: T & { runs: T[] }, den: (x: T) => number | null): RatioLine {
  const byRun = a.runs.map((x, i) => ratio(num(x), b.runs[i] === undefined ? null : den(b.runs[i] as T)));
  return { name, fromMedians: ratio(num(a), den(b)), byRun: { median: median(byRun), range: minMax(byRun) } };
}

export function ratios(doc: TrackcostDocument): RatioLine[] {
  const lines: RatioLine[] = [];
  const scan = (f: RoundFigures): number => f.scanMillis;
  for (const pct of [1, 100]) {
    const s = roundAt(doc, pct).stats;
    lines.push(ratioLine(`(ii) pagemap read / (i) PAGEMAP_SCAN at ${pct}%`, s, (f) => f.pagemapReadMillis, s, scan));
    lines.push(ratioLine(`(iii) memcpy / (i) PAGEMAP_SCAN at ${pct}%`, s, (f) => f.copyMillis, s, scan));
    lines.push(ratioLine(`(i) PAGEMAP_SCAN / its walk without WP at ${pct}%`, s, scan, s, (f) => f.scanNoWpMillis));
  }
  const f = doc.firstWrite;
  const p50 = (x: PassFigures): number => x.p50Nanos;
  const pass = (x: PassFigures): number => x.passMillis;
  lines.push(ratioLine('first write p50: (b) async / (a) unprotected', f.async, p50, f.unprotected, p50));
  lines.push(ratioLine('first write p50: (c) sync / (b) async', f.sync, p50, f.async, p50));
  lines.push(ratioLine('pass over the region: (c) sync / (b) async', f.sync, pass, f.async, pass));
  return lines;
}

// ---- running it -----------------------------------------------------------------

class TrackError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

/** Runs trackcost, its progress on our stderr; resolves with its JSON document. */
function runTrackcost(binary: string, args: string[]): Promise<TrackcostDocument> {
  return new Promise((resolve, reject) => {
    const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code !== 0) {
        // trackcost: 3 = no userfaultfd / WP_ASYNC / PAGEMAP_SCAN here; 1 = a failed call or a wrong scan.
        reject(new TrackError(`trackcost exited ${code ?? signal} (its stderr above says why)`, code === 3 ? 3 : 1));
        return;
      }
      try {
        resolve(JSON.parse(stdout) as TrackcostDocument);
      } catch {
        reject(new TrackError(`trackcost printed no JSON document: ${stdout.slice(0, 200)}`, 1));
      }
    });
  });
}

export async function runTrack(o: { mib: number; runs: number }, command: string): Promise<TrackResult> {
  const binary = join(repoRoot(), 'fixtures', 'build', 'trackcost');
  if (!existsSync(binary)) throw new TrackError(`${binary} is missing: build first (make -C fixtures)`, 3);
  // The region, the copy buffer, and about 32 bytes a page of bookkeeping.
  const needMib = 2 * o.mib + Math.ceil(o.mib / 128) + 64;
  const availMib = (procKiB('/proc/meminfo', 'MemAvailable') ?? 0) / 1024;
  if (availMib < needMib) throw new TrackError(`not enough memory: MemAvailable ${Math.floor(availMib)} MiB, needs ${needMib} MiB`, 3);

  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const cpu = new CpuAccountSampler(null, process.pid, 250);
  const t0 = performance.now();
  log(`trackcost --mib ${o.mib} --runs ${o.runs}`);
  let doc: TrackcostDocument;
  try {
    doc = await runTrackcost(binary, ['--mib', String(o.mib), '--runs', String(o.runs)]);
  } finally {
    cpu.stop();
  }
  const t1 = performance.now();
  const used = cpu.during(t0, t1);
  const list = ratios(doc);
  const goalRatio = list[0]?.fromMedians ?? null;
  const sd = Math.max(...doc.rounds.map((r) => r.stats.softDirtySeen));
  log(`trackcost done in ${((t1 - t0) / 1000).toFixed(1)} s`);
  return {
    scenario: 'track',
    startedAt,
    wallMillis: Math.round(t1 - t0),
    command,
    options: o,
    machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
    tree,
    cpus: used === null ? null : { others: used.others, trackcost: used.tree },
    program: doc,
    ratios: list,
    goal: { pagemapOverScanAt1Pct: goalRatio, target: GOAL_PAGEMAP_OVER_SCAN_AT_1PCT, met: goalRatio !== null && goalRatio >= GOAL_PAGEMAP_OVER_SCAN_AT_1PCT },
    softDirty:
      sd === 0
        ? 'no pagemap entry had bit 55 (soft-dirty) set, written pages included: this kernel has no soft-dirty tracking, so the clear_refs write ("4") that would re-arm it cannot be measured; a soft-dirty round costs the pagemap read plus that write'
        : `pagemap entries with bit 55 (soft-dirty) set: up to ${sd}; this kernel tracks soft-dirty, but the clear_refs write ("4") is not measured here`,
  };
}

// ---- the table ------------------------------------------------------------------

const ns = (v: number | null): string => (v === null ? '–' : v < 1000 ? `${v.toFixed(0)} ns` : `${(v / 1000).toFixed(1)} µs`);
const ms = (v: number | null): string => (v === null ? '–' : v < 10 ? `${v.toFixed(2)} ms` : `${v.toFixed(1)} ms`);
const x = (v: number | null): string => (v === null ? '–' : `${v.toFixed(v < 10 ? 2 : 1)}×`);

function spread<T>(s: { runs: T[] }, get: (r: T) => number | null, fmt: (v: number | null) => string): string {
  const r = minMax(s.runs.map(get));
  return r === null || s.runs.length < 2 ? '' : ` [${fmt(r[0])}–${fmt(r[1])}]`;
}

export function printTrackTable(r: TrackResult, out: NodeJS.WritableStream = process.stdout): void {
  const d = r.program;
  const w = (line: string): void => void out.write(`${line}\n`);
  w(`\nDirty tracking, ${d.mib} MiB (${d.pages} pages of 4 KiB, no THP), ${d.runs} runs: medians [min–max over the runs]`);
  w(`\nFirst write to each page after a round, timed in the writer (one store per page, in order)`);
  w(`  ${'region'.padEnd(36)}${'p50'.padStart(10)}${'p99'.padStart(10)}${'mean'.padStart(10)}   ${'pass over the region'.padEnd(34)}protect (UFFDIO_WRITEPROTECT)`);
  const names: Record<PassCase, string> = {
    unprotected: '(a) unprotected',
    async: '(b) uffd-wp async (kernel resolves)',
    sync: '(c) uffd-wp sync (a thread serves)',
  };
  for (const c of PASS_CASES) {
    const s = d.firstWrite[c];
    w(
      `  ${names[c].padEnd(36)}${ns(s.p50Nanos).padStart(10)}${ns(s.p99Nanos).padStart(10)}${ns(s.meanNanos).padStart(10)}   ${(ms(s.passMillis) + spread(s, (p) => p.passMillis, ms)).padEnd(34)}${ms(s.protectMillis)}`,
    );
  }
  const r1 = roundAt(d, 1);
  const r100 = roundAt(d, 100);
  w(`\nOne round over the region`);
  w(`  ${''.padEnd(48)}${`1% dirty (${r1.dirtyPages} pages)`.padEnd(32)}100% dirty (${r100.dirtyPages} pages)`);
  const row = (label: string, get: (f: RoundFigures) => number): void =>
    w(`  ${label.padEnd(48)}${(ms(get(r1.stats)) + spread(r1.stats, get, ms)).padEnd(32)}${ms(get(r100.stats)) + spread(r100.stats, get, ms)}`);
  row('(i)   PAGEMAP_SCAN, written pages re-protected', (f) => f.scanMillis);
  row('      the same walk without WP_MATCHING', (f) => f.scanNoWpMillis);
  row('(ii)  pread /proc/self/pagemap + test bit 55', (f) => f.pagemapReadMillis);
  row('(iii) memcpy of the region (no tracking)', (f) => f.copyMillis);
  row('      (the writes that dirtied the round)', (f) => f.writeMillis);
  w(`  ranges PAGEMAP_SCAN returned (median): ${r1.stats.scanRanges} and ${r100.stats.scanRanges}, in ${r1.stats.scanCalls} and ${r100.stats.scanCalls} ioctl calls (vector of ${d.scanVecLen}); every scan checked against the pages written`);
  w(`\nRatios: of the medians; run by run, median [min–max]`);
  for (const l of r.ratios) {
    const range = l.byRun.range === null ? '' : ` [${x(l.byRun.range[0])}–${x(l.byRun.range[1])}]`;
    w(`  ${l.name.padEnd(52)}${x(l.fromMedians).padStart(8)}   run by run ${x(l.byRun.median)}${range}`);
  }
  w(`\nGoal (issue 10): pagemap read / PAGEMAP_SCAN at 1% ≥ ${r.goal.target}×: ${x(r.goal.pagemapOverScanAt1Pct)}, ${r.goal.met ? 'met' : 'NOT met'}`);
  w(`Soft-dirty: ${r.softDirty}`);
  if (r.cpus !== null) w(`CPU during the run: trackcost ${r.cpus.trackcost.toFixed(2)}, unrelated processes ${r.cpus.others.toFixed(2)} (of ${r.machine.atStart.nproc})`);
}

// ---- command line ---------------------------------------------------------------

const USAGE = `usage: node dist/bench/run.js track [options]
  --mib M       region size in MiB (default ${TRACK_DEFAULTS.mib}; needs about 2×M MiB of memory)
  --runs N      repetitions of every measurement (default ${TRACK_DEFAULTS.runs})
  --out FILE    result JSON (default bench/results/track-<UTC timestamp>.json)
  --no-write    do not write a result file
Exit: 0 done, 1 failure (a wrong PAGEMAP_SCAN result included), 2 usage, 3 unsupported here (no fixture, memory, userfaultfd WP_ASYNC or PAGEMAP_SCAN).`;

function positiveInt(name: string, v: string | undefined, fallback: number): number | string {
  if (v === undefined) return fallback;
  const n = Number(v);
  return Number.isInteger(n) && n > 0 ? n : `--${name} must be a positive integer`;
}

function parse(argv: string[]): ReturnType<typeof parseTrackArgs> | string {
  try {
    return parseTrackArgs(argv);
  } catch (error) {
    return error instanceof Error ? error.message : String(error);
  }
}

function parseTrackArgs(argv: string[]) {
  return parseArgs({
    args: argv,
    options: { mib: { type: 'string' }, runs: { type: 'string' }, out: { type: 'string' }, 'no-write': { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  }).values;
}

export async function trackMain(argv: string[]): Promise<number> {
  const values = parse(argv);
  if (typeof values === 'string') {
    process.stderr.write(`${values}\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const mib = positiveInt('mib', values.mib, TRACK_DEFAULTS.mib);
  const runs = positiveInt('runs', values.runs, TRACK_DEFAULTS.runs);
  for (const v of [mib, runs]) {
    if (typeof v === 'string') {
      process.stderr.write(`${v}\n${USAGE}\n`);
      return 2;
    }
  }
  try {
    const result = await runTrack({ mib: mib as number, runs: runs as number }, `node dist/bench/run.js track ${argv.join(' ')}`.trim());
    printTrackTable(result);
    if (!values['no-write']) {
      const stamp = result.startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
      const out = values.out ?? join(repoRoot(), 'bench', 'results', `track-${stamp}.json`);
      mkdirSync(join(out, '..'), { recursive: true });
      writeFileSync(out, `${JSON.stringify(result)}\n`);
      log(`wrote ${out}`);
    }
    return 0;
  } catch (error) {
    process.stderr.write(`track: ${error instanceof Error ? error.message : String(error)}\n`);
    return error instanceof TrackError ? error.exitCode : 1;
  }
}
