// Scenario "impact" (issue 9): what a snapshot costs the target, for wpsnap
// and for the ways people snapshot a process today, on two workloads at
// several sizes. `node dist/bench/run.js impact [options]`.
//
// For each size (smallest first) and workload, one faultlat target
// (--heartbeat --fork-child zstd; rewrite: every page, continuously; cache:
// 1% of its pages a second at random) is measured by each peer in turn, the
// order rotating from run to run (no warm-up run: at 8 GiB each costs
// minutes):
//   baseline     a window with nothing attached (the rewrite target's writes/s
//                without a snapshot: the rate work lost is counted against)
//   fork-zstd    the target forks; the child streams its copy into zstd -1 -T1,
//                fsyncs the file and exits (Redis BGSAVE); the window is the
//                child's life
//   gcore-zstd   gcore, then zstd -1 -T1 of the core, fsynced; the target
//                reports once when gcore exits ("gcore") and once at the end
//                ("gcore + zstd"); the zstd output is the reference size
//   wpsnap       node dist/cli/main.js snapshot PID --json into a fresh store
//   wpsnap-P     the same with --priority P, for each P the CLI offers (found
//                in `snapshot --help`; skipped, and said so, when it has none)
import { existsSync, mkdtempSync, readFileSync, rmSync, statfsSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { Faultlat, log, machineInfo, procKiB, repoRoot, runCommand, sleep, treeState } from './lib.js';
import { measure } from './impact-peers.js';
import { printTables, summarize, wpsnapColumn, workLost } from './impact-report.js';
import {
  BASE_PEERS,
  DEFAULTS,
  PRIORITIES,
  WORKLOADS,
  type BasePeer,
  type ImpactOptions,
  type ImpactResult,
  type ImpactRun,
  type Outcome,
  type PeerName,
  type PeerResult,
  type Priority,
  type PriorityProbe,
  type TargetResult,
  type Workload,
} from './impact-types.js';

// ---- preconditions ------------------------------------------------------------

async function onPath(cmd: string): Promise<boolean> {
  try {
    return (await runCommand('sh', ['-c', `command -v ${cmd}`])).code === 0;
  } catch {
    return false;
  }
}

async function preflight(o: ImpactOptions): Promise<void> {
  const root = repoRoot();
  for (const f of ['fixtures/build/faultlat', 'dist/fixtures/launch.js']) {
    if (!existsSync(join(root, f))) throw new Error(`${f} is missing: build first (make -C fixtures && npx tsc -p tsconfig.json)`);
  }
  if (!existsSync(resolve(root, o.cli))) throw new Error(`${o.cli} is missing: build first (npx tsc -p tsconfig.json)`);
  if (process.getuid?.() !== 0) throw new Error('run as root: wpsnap and gcore attach to the target with ptrace');
  for (const cmd of ['gcore', 'zstd']) if (!(await onPath(cmd))) throw new Error(`${cmd} is not on the PATH (Debian: apt-get install gdb zstd)`);
}

const GiB = 1024; // MiB

/** MiB the target, its fork child's copies and wpsnap need in memory, and the core file and its zstd output on disk. */
function needs(mib: number): { memMib: number; diskMib: number } {
  return { memMib: 2 * mib + 2 * GiB, diskMib: Math.ceil(1.6 * mib) + GiB };
}

/** Why a target of `mib` cannot run now, or null. */
function lacking(mib: number, dir: string): string | null {
  const { memMib, diskMib } = needs(mib);
  const availMib = (procKiB('/proc/meminfo', 'MemAvailable') ?? 0) / 1024;
  if (availMib < memMib) {
    return `not enough memory for a ${mib} MiB target: MemAvailable ${Math.floor(availMib)} MiB, needs ${memMib} MiB (the target, its fork child's copy-on-write copies, wpsnap and zstd)`;
  }
  const fs = statfsSync(dir);
  const freeMib = (fs.bavail * fs.bsize) / 2 ** 20;
  if (freeMib < diskMib) return `not enough disk in ${dir} for a ${mib} MiB target: ${Math.floor(freeMib)} MiB free, needs ${diskMib} MiB (gcore's core and its zstd output)`;
  return null;
}

/** Whether `snapshot --help` offers --priority, its choices and default. */
async function probePriority(cli: string): Promise<Omit<PriorityProbe, 'note'>> {
  const r = await runCommand(process.execPath, [cli, 'snapshot', '--help'], { timeoutMs: 60_000 });
  const text = `${r.stdout}\n${r.stderr}`;
  const start = text.indexOf('--priority');
  if (start < 0) return { available: false, choices: [], default: null };
  const rest = text.slice(start);
  const next = rest.slice(1).search(/\n\s{1,4}--/);
  const block = next < 0 ? rest : rest.slice(0, next + 1);
  const choices = [...(/choices:([^\]]*)/.exec(block)?.[1] ?? '').matchAll(/"([a-z]+)"/g)].map((m) => m[1] as string);
  const known = choices.filter((c): c is Priority => (PRIORITIES as readonly string[]).includes(c));
  // "Default: $WPSNAP_PRIORITY, else idle", or yargs' [default: "idle"].
  const env = process.env['WPSNAP_PRIORITY'];
  const stated = /default:[^\n\]]*?\b(idle|nice|normal)\b/i.exec(block.replace(/\s+/g, ' '))?.[1] ?? null;
  const def = /WPSNAP_PRIORITY/.test(block) && env !== undefined && (PRIORITIES as readonly string[]).includes(env) ? env : stated;
  return { available: true, choices: known.length > 0 ? known : [...PRIORITIES], default: def };
}

// ---- the scenario ---------------------------------------------------------------

export async function runImpact(partial: Partial<ImpactOptions> = {}): Promise<ImpactResult> {
  const o: ImpactOptions = { ...DEFAULTS, ...partial };
  await preflight(o);
  const sizes = [...o.sizes].sort((a, b) => a - b);
  const base = tmpdir();
  const largest = sizes[sizes.length - 1]!;
  const lack = lacking(largest, base);
  if (lack !== null) throw new Error(`${lack}; run fewer --sizes`);

  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const probe = await probePriority(o.cli);
  let variants: Priority[] = [];
  let note: string;
  if (!probe.available) {
    note = `${o.cli} snapshot has no --priority option: the wpsnap-<priority> variants were skipped`;
  } else {
    variants = (o.priorities ?? probe.choices.filter((c) => c !== probe.default)).filter((p) => probe.choices.includes(p));
    note = `--priority offers ${probe.choices.join(', ')} (default ${probe.default ?? 'not stated'}); measured: default as 'wpsnap'${variants.length ? `, ${variants.map((v) => `wpsnap-${v}`).join(', ')}` : ''}`;
  }
  log(note);
  const peers: PeerName[] = [...o.peers, ...(o.peers.includes('wpsnap') ? variants.map((v): PeerName => `wpsnap-${v}`) : [])];

  const dir = mkdtempSync(join(base, 'wpsnap-impact-'));
  const forkOut = join(dir, 'fork.zst');
  log(`tree ${tree.head ?? '?'}${tree.modified.length > 0 ? ` + modified: ${tree.modified.join(', ')}` : ''}`);
  log(`impact: sizes ${sizes.join(', ')} MiB, workloads ${o.workloads.join(', ')}, ${o.runs} run(s), peers ${peers.join(', ')}; scratch ${dir}`);
  const targets: TargetResult[] = [];
  const targetMillis: Record<string, number> = {};
  try {
    for (const mib of sizes) {
      for (const workload of o.workloads) {
        const t0 = performance.now();
        targets.push(await runTarget(o, workload, mib, peers, dir, forkOut));
        targetMillis[`${workload}@${mib}`] = Math.round(performance.now() - t0);
        log(`${workload} ${mib} MiB took ${((performance.now() - t0) / 60_000).toFixed(1)} min`);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return {
    scenario: 'impact',
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
    tree,
    options: o,
    priority: { ...probe, note },
    targetMillis,
    targets,
    summary: summarize(targets),
  };
}

async function runTarget(o: ImpactOptions, workload: Workload, mib: number, peers: PeerName[], dir: string, forkOut: string): Promise<TargetResult> {
  const args = ['--mib', String(mib), '--workload', workload, '--heartbeat', '--fork-child', 'zstd', '--fork-out', forkOut];
  if (workload === 'cache') args.push('--write-pct', String(o.writePct), '--max-lag-ms', String(o.maxLagMs));
  const result: TargetResult = { workload, mib, args, fillMillis: null, writeRate: null, runs: [] };
  // Memory freed a moment ago (the previous target's exit, another process) may take a while to show.
  let lack = lacking(mib, dir);
  for (let waited = 0; lack !== null && waited < 120_000; waited += 5000) {
    if (waited === 0) log(`waiting up to 2 min: ${lack}`);
    await sleep(5000);
    lack = lacking(mib, dir);
  }
  if (lack !== null) {
    log(`SKIPPED ${workload} ${mib} MiB: ${lack}`);
    return { ...result, error: lack };
  }
  let target: Faultlat | undefined;
  try {
    log(`launching faultlat ${args.join(' ')}`);
    target = await Faultlat.launch(args);
    result.fillMillis = typeof target.ready['fillMillis'] === 'number' ? target.ready['fillMillis'] : null;
    result.writeRate = typeof target.ready['writeRate'] === 'number' ? target.ready['writeRate'] : null;
    log(`target pid ${target.pid}, filled in ${String(result.fillMillis)} ms${result.writeRate === null ? '' : `, ${result.writeRate} writes/s scheduled`}`);
    await sleep(o.settleMs);
    for (let i = 0; i < o.runs; i++) {
      const rotated = peers.map((_, k) => peers[(k + i) % peers.length] as PeerName);
      const order = i % 2 === 1 ? rotated.reverse() : rotated;
      const run: ImpactRun = { index: i, order, peers: {} };
      for (const peer of order) {
        const r = await measure(peer, target, o, dir, forkOut, mib);
        run.peers[peer] = r;
        log(`${workload} ${mib} MiB run ${i + 1}/${o.runs} ${describe(peer, r, result, run)}`);
        await sleep(o.settleMs);
      }
      result.runs.push(run);
    }
  } catch (error) {
    result.error = error instanceof Error ? error.message : String(error);
    log(`${workload} ${mib} MiB FAILED: ${result.error}`);
  } finally {
    if (target) await target.stop();
  }
  return result;
}

const f1 = (v: number | null | undefined, d = 1): string => (v === null || v === undefined ? '?' : v.toFixed(d));

/** One log line per measurement. */
function describe(peer: PeerName, r: Outcome<PeerResult>, t: TargetResult, run: ImpactRun): string {
  if ('error' in r) return `${peer}: FAILED ${r.error}`;
  const rate = t.workload === 'cache' ? t.writeRate : (run.peers.baseline && !('error' in run.peers.baseline) ? run.peers.baseline.window.writesPerSec : null);
  const w = r.window;
  const hb = w.heartbeat;
  const longest = hb?.gaps.find((g) => g.ms === hb.maxGapMillis);
  const why = longest
    ? ` (${longest.waitMs ?? '?'} ms waiting for a CPU; sampled ${Object.entries(longest.states).map(([k, n]) => `${k}×${n}`).join(' ') || 'never'}; CPUs: target ${longest.targetCpus ?? '?'}, peer ${longest.peerCpus ?? '?'}, others ${longest.othersCpus ?? '?'})`
    : '';
  const target = `target ${f1(w.writesPerSec / 1e3)} kw/s, lost ${f1(workLost(w, rate), 2)} s, cpu ${w.phases[0]?.cpuShare ?? '?'}, unrelated processes ${w.phases[0]?.othersCpus ?? '?'} CPUs, hb max gap ${hb?.maxGapMillis ?? '?'} ms at ${hb?.atMillis ?? '?'}${why}, hb max stop ${hb?.maxStopMillis ?? '?'} ms, writer max gap ${w.maxGapMillis} ms${w.cache ? `, missed ${w.cache.missed}` : ''}`;
  switch (r.kind) {
    case 'baseline':
      return `baseline: ${target}`;
    case 'fork-zstd':
      return `fork-zstd: fork() ${f1(r.forkMicros / 1e3)} ms, child ${f1(r.childLivedMillis / 1e3, 2)} s, ${f1(r.storedBytes / 2 ** 20)} MiB, child Private_Dirty ${r.childPrivateDirtyKiB === null ? '?' : f1(r.childPrivateDirtyKiB / 1024, 0)} MiB; ${target}`;
    case 'gcore-zstd':
      return `gcore-zstd: gcore ${f1(r.gcoreWallMillis / 1e3, 2)} s (stall ${r.gcoreWindow.heartbeat?.maxGapMillis ?? r.gcoreWindow.maxGapMillis} ms), zstd ${f1(r.zstdWallMillis / 1e3, 2)} s, core ${f1(r.coreBytes / 2 ** 20, 0)} MiB -> ${f1(r.zstdBytes / 2 ** 20)} MiB; ${target}`;
    case 'wpsnap':
      return `${wpsnapColumn(peer)}: pause ${f1(r.pauseMicros / 1e3, 2)} ms (resume at ${r.resumeAtMs} ms from ${r.resumeFrom}), protected ${r.protectWindowMillis ?? '?'} ms, durable ${r.durableMillis ?? '?'} ms, wall ${f1(r.wallMillis / 1e3, 2)} s, stored ${f1(r.bytesStored / 2 ** 20)} MiB, faults ${r.faults}, peak RSS ${r.vmHwmKiB === null ? '?' : f1(r.vmHwmKiB / 1024, 0)} MiB, staging ${r.stagingBytesPeak ?? 'n/a'}; ${target}`;
  }
}

// ---- command line ---------------------------------------------------------------

const USAGE = `usage: node dist/bench/run.js impact [options]
  --sizes LIST        target sizes in MiB (default ${DEFAULTS.sizes.join(',')})
  --workloads LIST    subset of ${WORKLOADS.join(',')} (default both)
  --runs N            measured repetitions of every peer (default ${DEFAULTS.runs})
  --write-pct P       cache: % of pages written per second (default ${DEFAULTS.writePct})
  --max-lag-ms MS     cache: a write this late is skipped as missed (default ${DEFAULTS.maxLagMs})
  --peers LIST        subset of ${BASE_PEERS.join(',')}
  --priorities LIST   --priority values to run as wpsnap-<p> (default: every one the CLI offers but its default)
  --baseline-ms MS    baseline window (default ${DEFAULTS.baselineMs})
  --settle-ms MS      pause between measurements (default ${DEFAULTS.settleMs})
  --cli PATH          the wpsnap CLI (default ${DEFAULTS.cli})
  --out FILE          result JSON (default bench/results/impact-<UTC timestamp>.json)
  --no-write          do not write a result file
  --summarize FILES   recompute the summary of saved results (comma-separated: merged), print it, and rewrite
                      FILE (one file) or write --out (several), unless --no-write`;

function usage(message: string): never {
  process.stderr.write(`${message}\n${USAGE}\n`);
  process.exit(2);
}

function positive(name: string, v: string | undefined, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) usage(`--${name} must be a positive number`);
  return n;
}

function list<T extends string>(name: string, v: string | undefined, allowed: readonly T[], fallback: T[]): T[] {
  if (v === undefined) return fallback;
  const items = v.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const i of items) if (!(allowed as readonly string[]).includes(i)) usage(`--${name}: unknown ${i} (one of ${allowed.join(', ')})`);
  return items as T[];
}

export async function impactMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      sizes: { type: 'string' },
      workloads: { type: 'string' },
      runs: { type: 'string' },
      'write-pct': { type: 'string' },
      'max-lag-ms': { type: 'string' },
      peers: { type: 'string' },
      priorities: { type: 'string' },
      'baseline-ms': { type: 'string' },
      'settle-ms': { type: 'string' },
      cli: { type: 'string' },
      out: { type: 'string' },
      'no-write': { type: 'boolean' },
      summarize: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (values.summarize !== undefined) {
    // Several files: their targets together (a target measured in a later file replaces the same workload and size).
    const files = values.summarize.split(',').map((f) => f.trim()).filter((f) => f !== '');
    const saved = files.map((f) => JSON.parse(readFileSync(f, 'utf8')) as ImpactResult);
    const targets = new Map<string, TargetResult>();
    for (const r of saved) for (const t of r.targets) if (t.runs.length > 0 || !targets.has(`${t.workload}@${t.mib}`)) targets.set(`${t.workload}@${t.mib}`, t);
    const first = saved[0]!;
    const merged = [...targets.values()].sort((a, b) => a.mib - b.mib || WORKLOADS.indexOf(a.workload) - WORKLOADS.indexOf(b.workload));
    const result: ImpactResult = {
      ...first,
      ...(files.length > 1 ? { mergedFrom: files, targetMillis: Object.assign({}, ...saved.map((r) => r.targetMillis)) as Record<string, number> } : {}),
      targets: merged,
      summary: summarize(merged),
    };
    printTables(result.summary, Math.max(...saved.map((r) => r.options.runs)), process.stdout, failures(result));
    const out = values.out ?? (files.length === 1 ? files[0] : undefined);
    if (!values['no-write'] && out !== undefined) writeFileSync(out, `${JSON.stringify(result)}\n`);
    return 0;
  }
  const sizes = values.sizes === undefined ? DEFAULTS.sizes : values.sizes.split(',').map((s) => Math.floor(positive('sizes', s.trim(), 0)));
  const result = await runImpact({
    sizes,
    workloads: list('workloads', values.workloads, WORKLOADS, [...WORKLOADS]),
    runs: Math.floor(positive('runs', values.runs, DEFAULTS.runs)),
    writePct: positive('write-pct', values['write-pct'], DEFAULTS.writePct),
    maxLagMs: Math.floor(positive('max-lag-ms', values['max-lag-ms'], DEFAULTS.maxLagMs)),
    peers: list<BasePeer>('peers', values.peers, BASE_PEERS, [...BASE_PEERS]),
    priorities: values.priorities === undefined ? null : list('priorities', values.priorities, PRIORITIES, []),
    baselineMs: positive('baseline-ms', values['baseline-ms'], DEFAULTS.baselineMs),
    settleMs: positive('settle-ms', values['settle-ms'], DEFAULTS.settleMs),
    ...(values.cli === undefined ? {} : { cli: values.cli }),
  });
  printTables(result.summary, result.options.runs, process.stdout, failures(result));
  process.stdout.write(`\n${result.priority.note}\n`);
  for (const [k, ms] of Object.entries(result.targetMillis)) process.stdout.write(`${k}: ${(ms / 60_000).toFixed(1)} min\n`);
  if (!values['no-write']) {
    const stamp = result.startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    const out = values.out ?? join(repoRoot(), 'bench', 'results', `impact-${stamp}.json`);
    mkdirSync(join(out, '..'), { recursive: true });
    writeFileSync(out, `${JSON.stringify(result)}\n`);
    log(`wrote ${out}`);
  }
  return failures(result).length > 0 ? 1 : 0;
}

function failures(r: ImpactResult): Array<{ workload: Workload; mib: number; error: string }> {
  return r.targets.filter((t) => t.error !== undefined).map((t) => ({ workload: t.workload, mib: t.mib, error: t.error as string }));
}
