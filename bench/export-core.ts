// Scenario "export-core" (issue 11's performance list): a core file of a
// 1 GiB process, by `wpsnap export --format core` from a snapshot taken once,
// against `gcore` of the same running process, in the same run.
// `node dist/bench/export-core.js [options]`.
//
// The target is fixtures/build/faultlat --mib M --workload cache --heartbeat:
// M MiB of heap-like pages, 1% of them written per second in 1 ms steps, and a
// heartbeat thread that stores the time every ~100 µs; it is launched so that
// it is not the bench's child (fixtures/launch.ts). It is snapshotted once
// (wpsnap snapshot, outside the measurements), then each peer runs `runs`
// times, alternating which goes first, after one unmeasured warm-up of each:
//
//   wpsnap   node dist/cli/main.js export <snap> --format core --out F --json
//   gcore    gcore -o F <pid>
//
// For each: wall time from spawn to exit, the core's size, and what the target
// went through meanwhile: faultlat's window (longest gap between two beats
// of the heartbeat, writes missed by the 1% schedule) and every thread's state
// sampled every 10 ms (a 't' is a ptrace stop). gcore stops the target for
// its whole dump; the export reads only the store and never touches it.
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { Faultlat, log, machineInfo, median, minMax, ratio, repoRoot, round, runCommand, sleep, snapshotDocument, TaskSampler, treeState, type FaultlatReport, type MachineInfo } from './lib.js';

export const EXPORT_CORE_DEFAULTS = { mib: 1024, runs: 3, settleMs: 2000, cli: 'dist/cli/main.js' } as const;

export type CorePeer = 'wpsnap' | 'gcore';

export interface CoreRun {
  peer: CorePeer;
  index: number;
  wallMillis: number;
  coreBytes: number;
  /** Blocks the core file takes on disk (holes excluded), bytes. */
  coreDiskBytes: number;
  cpuUserMillis: number;
  cpuSysMillis: number;
  /** The command's peak resident set (VmHWM), KiB: the export streams, it does not hold the core. */
  peakRssKiB: number | null;
  /** The longest gap between two heartbeats of the target in the window, ms (null: no heartbeat answer). */
  heartbeatMaxGapMillis: number | null;
  /** The longest gap between two writes of the target's workload loop, ms. */
  maxGapMillis: number;
  /** Writes the 1% schedule had to skip (more than 10 ms late). */
  missedWrites: number | null;
  /** Samples (every 10 ms, per thread) in which a thread of the target was in a ptrace stop ('t'). */
  tracedSamples: number;
  samples: number;
}

export interface ExportCoreResult {
  scenario: 'export-core';
  startedAt: string;
  finishedAt: string;
  command: string;
  machine: { atStart: MachineInfo; loadavgAtEnd: number[] };
  tree: { head: string | null; modified: string[] };
  options: { mib: number; runs: number; settleMs: number; cli: string };
  target: { pid: number; args: string[]; fillMillis: number | null };
  snapshot: { id: number; durationMillis: number; pauseMicros: number; bytesStored: number };
  warmup: CoreRun[];
  runs: CoreRun[];
  summary: Record<
    CorePeer,
    { wallMillis: number | null; wallRange: [number, number] | null; heartbeatMaxGapMillis: number | null; tracedSamples: number; coreBytes: number | null; peakRssKiB: number | null }
  > & {
    /** gcore's median wall time / wpsnap's: above 1, the export is faster. */
    gcoreOverWpsnap: number | null;
  };
}

function windowFigures(r: FaultlatReport): Pick<CoreRun, 'heartbeatMaxGapMillis' | 'maxGapMillis' | 'missedWrites'> {
  return {
    heartbeatMaxGapMillis: r.heartbeat ? (round(r.heartbeat.maxGapNanos / 1e6, 2) as number) : null,
    maxGapMillis: round(r.maxGapNanos / 1e6, 2) as number,
    missedWrites: r.cache?.missed ?? null,
  };
}

async function measure(peer: CorePeer, index: number, t: Faultlat, snapshotId: number, store: string, dir: string, cli: string): Promise<CoreRun> {
  const file = join(dir, `${peer}.core`);
  const prefix = join(dir, 'gcore');
  const gcoreFile = `${prefix}.${t.pid}`;
  rmSync(file, { force: true });
  rmSync(gcoreFile, { force: true });
  await t.startWindow();
  const sampler = new TaskSampler(t.pid, 10);
  const from = performance.now();
  const r =
    peer === 'wpsnap'
      ? await runCommand(process.execPath, [cli, 'export', String(snapshotId), '--format', 'core', '--out', file, '--json', '--store', store], { timeoutMs: 600_000, sampleMemory: true })
      : await runCommand('gcore', ['-o', prefix, String(t.pid)], { timeoutMs: 600_000, sampleMemory: true });
  const to = performance.now();
  sampler.stop();
  const report = await t.report();
  const out = peer === 'wpsnap' ? file : gcoreFile;
  if (r.code !== 0 || !existsSync(out)) throw new Error(`${peer} exited ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${(r.stderr || r.stdout).trim().slice(-400)}`);
  if (peer === 'wpsnap') {
    const doc = JSON.parse(r.stdout) as { bytes: number };
    if (doc.bytes !== statSync(out).size) throw new Error(`wpsnap export reported ${doc.bytes} bytes, the file has ${statSync(out).size}`);
  }
  let traced = 0;
  let samples = 0;
  for (const list of sampler.tasks.values()) {
    for (const s of list) {
      if (s.at < from || s.at > to) continue;
      samples++;
      if (s.state === 't') traced++;
    }
  }
  const st = statSync(out);
  const run: CoreRun = {
    peer,
    index,
    wallMillis: round(r.wallMillis, 1) as number,
    coreBytes: st.size,
    coreDiskBytes: st.blocks * 512,
    cpuUserMillis: r.cpuUserMillis,
    cpuSysMillis: r.cpuSysMillis,
    peakRssKiB: r.vmHwmKiB ?? null,
    ...windowFigures(report),
    tracedSamples: traced,
    samples,
  };
  rmSync(out, { force: true });
  return run;
}

function describe(r: CoreRun): string {
  return `${r.peer}: ${r.wallMillis.toFixed(0)} ms, peak RSS ${r.peakRssKiB === null ? '?' : (r.peakRssKiB / 1024).toFixed(0)} MiB, core ${(r.coreBytes / 2 ** 20).toFixed(0)} MiB (${(r.coreDiskBytes / 2 ** 20).toFixed(0)} MiB on disk); target: heartbeat max gap ${r.heartbeatMaxGapMillis ?? '?'} ms, ${r.missedWrites ?? '?'} writes missed, ptrace-stopped in ${r.tracedSamples}/${r.samples} samples`;
}

export async function runExportCore(options: { mib: number; runs: number; settleMs: number; cli: string }, command: string): Promise<ExportCoreResult> {
  const root = repoRoot();
  const cli = resolve(root, options.cli);
  for (const f of [join(root, 'fixtures/build/faultlat'), cli]) {
    if (!existsSync(f)) throw new Error(`${f} is missing: build first (make -C fixtures && npx tsc -p tsconfig.json)`);
  }
  if (process.getuid?.() !== 0) throw new Error('run as root: wpsnap and gcore attach to the target with ptrace');
  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-core-'));
  const store = join(dir, 'store.db');
  const args = ['--mib', String(options.mib), '--workload', 'cache', '--write-pct', '1', '--heartbeat'];
  let target: Faultlat | undefined;
  const warmup: CoreRun[] = [];
  const runs: CoreRun[] = [];
  try {
    log(`launching faultlat ${args.join(' ')}; scratch ${dir}`);
    target = await Faultlat.launch(args);
    log(`target pid ${target.pid}, filled in ${String(target.ready['fillMillis'])} ms`);
    await sleep(options.settleMs);
    // The store at the CLI's normal priority: the snapshot is set-up here, not a measurement.
    process.env['WPSNAP_PRIORITY'] = 'normal';
    const snap = snapshotDocument(await runCommand(process.execPath, [cli, 'snapshot', String(target.pid), '--json', '--store', store], { timeoutMs: 600_000 }));
    const snapshot = {
      id: snap['id'] as number,
      durationMillis: snap['durationMillis'] as number,
      pauseMicros: snap['pauseMicros'] as number,
      bytesStored: snap['bytesStored'] as number,
    };
    log(`snapshot ${snapshot.id}: ${snapshot.durationMillis} ms, ${(snapshot.bytesStored / 2 ** 20).toFixed(0)} MiB stored`);
    await sleep(options.settleMs);

    for (const peer of ['wpsnap', 'gcore'] as const) {
      const r = await measure(peer, -1, target, snapshot.id, store, dir, cli);
      warmup.push(r);
      log(`warm-up ${describe(r)}`);
      await sleep(options.settleMs);
    }
    for (let i = 0; i < options.runs; i++) {
      const order: CorePeer[] = i % 2 === 0 ? ['wpsnap', 'gcore'] : ['gcore', 'wpsnap'];
      for (const peer of order) {
        const r = await measure(peer, i, target, snapshot.id, store, dir, cli);
        runs.push(r);
        log(`run ${i + 1}/${options.runs} ${describe(r)}`);
        await sleep(options.settleMs);
      }
    }
    const of = (peer: CorePeer) => {
      const mine = runs.filter((r) => r.peer === peer);
      return {
        wallMillis: median(mine.map((r) => r.wallMillis)),
        wallRange: minMax(mine.map((r) => r.wallMillis)),
        heartbeatMaxGapMillis: median(mine.map((r) => r.heartbeatMaxGapMillis)),
        tracedSamples: mine.reduce((n, r) => n + r.tracedSamples, 0),
        coreBytes: median(mine.map((r) => r.coreBytes)),
        peakRssKiB: median(mine.map((r) => r.peakRssKiB)),
      };
    };
    const wpsnap = of('wpsnap');
    const gcore = of('gcore');
    return {
      scenario: 'export-core',
      startedAt,
      finishedAt: new Date().toISOString(),
      command,
      machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
      tree,
      options: { ...EXPORT_CORE_DEFAULTS, ...options },
      target: { pid: target.pid, args, fillMillis: typeof target.ready['fillMillis'] === 'number' ? target.ready['fillMillis'] : null },
      snapshot,
      warmup,
      runs,
      summary: { wpsnap, gcore, gcoreOverWpsnap: round(ratio(gcore.wallMillis, wpsnap.wallMillis), 2) },
    };
  } finally {
    if (target) await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

export function printExportCoreTable(r: ExportCoreResult): void {
  const w = (line: string): void => {
    process.stdout.write(`${line}\n`);
  };
  const m = r.machine.atStart;
  w(`\nexport-core: a core file of a ${r.options.mib} MiB process (${m.nproc} CPUs, ${m.cpuModel}, kernel ${m.kernel})`);
  w(`snapshot ${r.snapshot.id} taken once: ${r.snapshot.durationMillis} ms, pause ${r.snapshot.pauseMicros} µs, ${(r.snapshot.bytesStored / 2 ** 20).toFixed(0)} MiB stored`);
  w(`${'peer'.padEnd(8)}${'wall median'.padStart(14)}${'range'.padStart(20)}${'core'.padStart(12)}${'peak RSS'.padStart(10)}${'target heartbeat max gap'.padStart(28)}${'ptrace-stopped samples'.padStart(26)}`);
  for (const peer of ['wpsnap', 'gcore'] as const) {
    const s = r.summary[peer];
    const range = s.wallRange === null ? '' : `${s.wallRange[0].toFixed(0)}–${s.wallRange[1].toFixed(0)} ms`;
    w(
      `${peer.padEnd(8)}${`${s.wallMillis?.toFixed(0) ?? '?'} ms`.padStart(14)}${range.padStart(20)}${`${((s.coreBytes ?? 0) / 2 ** 20).toFixed(0)} MiB`.padStart(12)}${`${s.peakRssKiB === null ? '?' : (s.peakRssKiB / 1024).toFixed(0)} MiB`.padStart(10)}${`${s.heartbeatMaxGapMillis ?? '?'} ms`.padStart(28)}${String(s.tracedSamples).padStart(26)}`,
    );
  }
  w(`gcore / wpsnap export (wall, medians): ${r.summary.gcoreOverWpsnap ?? '?'}×`);
}

const USAGE = `usage: node dist/bench/export-core.js [options]
  --mib M          target size in MiB (default ${EXPORT_CORE_DEFAULTS.mib})
  --runs N         measured runs of each peer (default ${EXPORT_CORE_DEFAULTS.runs})
  --settle-ms MS   pause between measurements (default ${EXPORT_CORE_DEFAULTS.settleMs})
  --cli PATH       the wpsnap CLI (default ${EXPORT_CORE_DEFAULTS.cli})
  --out FILE       result JSON (default bench/results/export-core-<UTC timestamp>.json)
  --no-write       do not write a result file`;

export async function exportCoreMain(argv: string[]): Promise<number> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      options: {
        mib: { type: 'string' },
        runs: { type: 'string' },
        'settle-ms': { type: 'string' },
        cli: { type: 'string' },
        out: { type: 'string' },
        'no-write': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (error) {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const number = (name: string, v: string | undefined, fallback: number): number => {
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new RangeError(`--${name} must be a positive integer`);
    return n;
  };
  let options;
  try {
    options = {
      mib: number('mib', values.mib, EXPORT_CORE_DEFAULTS.mib),
      runs: number('runs', values.runs, EXPORT_CORE_DEFAULTS.runs),
      settleMs: number('settle-ms', values['settle-ms'], EXPORT_CORE_DEFAULTS.settleMs),
      cli: values.cli ?? EXPORT_CORE_DEFAULTS.cli,
    };
  } catch (error) {
    process.stderr.write(`${(error as Error).message}\n${USAGE}\n`);
    return 2;
  }
  try {
    const result = await runExportCore(options, `node dist/bench/export-core.js ${argv.join(' ')}`.trim());
    printExportCoreTable(result);
    if (!values['no-write']) {
      const stamp = result.startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
      const out = values.out ?? join(repoRoot(), 'bench', 'results', `export-core-${stamp}.json`);
      mkdirSync(join(out, '..'), { recursive: true });
      writeFileSync(out, `${JSON.stringify(result)}\n`);
      log(`wrote ${out}`);
    }
    return 0;
  } catch (error) {
    process.stderr.write(`export-core: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    return 1;
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  exportCoreMain(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error: unknown) => {
      process.stderr.write(`export-core: ${String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
