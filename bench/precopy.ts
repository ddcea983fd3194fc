// Scenario "precopy" (issue 10's performance figures): pre-copy and
// incremental generations, measured on faultlat targets that write at a
// steady rate. `node dist/bench/run.js precopy [options]`.
//
//   pre-copy     faultlat --workload cache --write-pct 2 (2% of its pages a
//                second): `wpsnap precopy --max-pause 20ms --json` into a
//                fresh store (rounds, final stop, convergence, wall), against
//                `gcore` (a stop-and-copy of everything, CRIU dump without
//                pre-dump) and a plain `wpsnap snapshot`, and a window with
//                nothing attached (the target's own floor), in one run on the
//                same target, the order rotating; the target reports what it
//                saw of each
//   generation   faultlat --workload cache --write-pct 1: `snapshot --name
//                base` into a fresh store, 1 s, `snapshot --parent base`, then
//                a plain `snapshot` into the same store (the same content
//                dedup, no parent); walls from outside, where the time went;
//                then the same with tracking kept between the two commands
//                (`snapshot --name base --track`, 1 s, `snapshot --parent
//                base`: incremental "tracked"), and the keeper's own memory
//                and CPU over that second
//
// The bench builds nothing; it prints the tables and writes
// bench/results/precopy-<UTC timestamp>.json.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statfsSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  CpuAccountSampler,
  Faultlat,
  isAlive,
  log,
  machineInfo,
  median,
  minMax,
  procKiB,
  processCpuMillis,
  ratio,
  repoRoot,
  round,
  runCommand,
  sleep,
  snapshotDocument,
  TaskSampler,
  treeState,
  type CommandResult,
  type FaultlatReport,
  type MachineInfo,
  type ThreadTimes,
} from './lib.js';

export const PRECOPY_DEFAULTS = { runs: 3, mib: 1024, cli: 'dist/cli/main.js', precopyWritePct: 2, generationWritePct: 1 } as const;
const SETTLE_MS = 2000;
const BASELINE_MS = 3000;
/** Between the end of `snapshot --name base` and the start of `snapshot --parent base`. */
const GENERATION_WAIT_MS = 1000;
const MAX_PAUSE = '20ms';
/** Issue 10's targets. */
export const GOALS = { finalPauseMillis: 20, generationWallMillis: 100 } as const;
const PAGE = 4096;

// ---- what is recorded -------------------------------------------------------------

/** One heartbeat gap of the target (its second thread stores the time every ~100 µs), with what that thread did meanwhile. */
export interface Gap {
  ms: number;
  /** Where it ended, ms from the window's start. */
  atMs: number;
  /** Of the gap, time the heartbeat thread was runnable but waited for a CPU (a scheduling delay, not a stop). */
  waitMs: number | null;
  /** Of the gap, time the heartbeat thread ran (on a CPU: user code, or the kernel, a write fault included). */
  runMs: number | null;
  /** States the heartbeat thread was sampled in (every 10 ms): t ptrace-stopped, R runnable, S/D asleep or blocked. */
  states: Record<string, number>;
}

/** What the target saw in one window. */
export interface TargetView {
  windowMillis: number;
  writesPerSec: number;
  scheduled: number | null;
  missed: number | null;
  writerMaxGapMillis: number;
  heartbeatMaxGapMillis: number | null;
  /** The longest heartbeat gap less its CPU wait: the longest stop that was not a scheduling delay. */
  maxStopMillis: number | null;
  gaps: Gap[];
  /** CPUs (1 = one whole CPU) in the window: the target, the peer (with the bench), unrelated processes. */
  cpus: { target: number; peer: number; others: number } | null;
}

interface Command {
  wallMillis: number;
  cpuMillis: number;
  /** Command start and end, ms from the window's start. */
  startMs: number;
  endMs: number;
}

export interface PrecopyRoundLine {
  round: number;
  pages: number;
  bytes: number;
  millis: number;
  dirtyPagesPerSec: number;
}

export type PeerResult =
  | { kind: 'baseline'; target: TargetView }
  | (Command & {
      kind: 'precopy';
      rounds: PrecopyRoundLine[];
      finalPauseMicros: number;
      converged: boolean;
      warnings: string[];
      generations: number;
      storeBytes: number;
      target: TargetView;
    })
  | (Command & { kind: 'gcore'; coreBytes: number; target: TargetView })
  | (Command & {
      kind: 'snapshot';
      pauseMicros: number;
      stops: unknown;
      protectWindowMillis: number | null;
      durableMillis: number | null;
      bytesStored: number;
      target: TargetView;
    });
export const PEERS = ['baseline', 'precopy', 'gcore', 'snapshot'] as const;
export type PeerName = (typeof PEERS)[number];
type Outcome<T> = T | { error: string };

export interface GenStep {
  wallMillis: number;
  cpuUserMillis: number;
  cpuSysMillis: number;
  threads: Record<string, ThreadTimes> | null;
  pauseMicros: number;
  durationMillis: number;
  protectWindowMillis: number | null;
  durableMillis: number | null;
  pagesSaved: number;
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  /** Growth of the store's files (database + WAL) over the command. */
  storeGrowthBytes: number;
  /** With --parent. */
  incremental: string | null;
  dirtyPages: number | null;
  changedPages: number | null;
  writtenUnchangedPages: number | null;
  pagesStored: number | null;
  /** The snapshot's instant (the end of its pause) estimated from outside: command end − durableMillis, ms from the run's start. */
  instantMs: number;
  /** With --track: the keeper left tracking the target. */
  keeperPid: number | null;
}

/** The keeper between `snapshot --track` and the next `--parent`: it serves the target's first writes and waits. */
export interface KeeperCost {
  rssKiB: number | null;
  /** Its CPU (user + sys) over the wait, and the wait. */
  cpuMillis: number | null;
  overMillis: number;
}

export interface GenerationRun {
  index: number;
  /** `node CLI --version`: node's start and the CLI's modules, nothing else. */
  startupMillis: number;
  base: Outcome<GenStep>;
  generation: Outcome<GenStep>;
  /** A plain snapshot (no --parent) into the same store afterwards: content dedup alone. */
  fullSameStore: Outcome<GenStep>;
  /** From the base's instant to the generation's. */
  sinceParentMillis: number | null;
  /** In a fresh store: `snapshot --track`, then `--parent` of it (tracked), and the keeper meanwhile. */
  trackedBase: Outcome<GenStep>;
  tracked: Outcome<GenStep>;
  keeper: KeeperCost | null;
}

interface TargetInfo {
  args: string[];
  pid: number | null;
  fillMillis: number | null;
  /** faultlat's schedule, writes/s (one word each, to a random page). */
  writeRate: number | null;
  error?: string;
}

export interface RatioLine {
  name: string;
  fromMedians: number | null;
  byRun: { median: number | null; range: [number, number] | null };
}

export interface PrecopyResult {
  scenario: 'precopy';
  startedAt: string;
  wallMillis: number;
  command: string;
  options: { runs: number; mib: number; cli: string; precopyWritePct: number; generationWritePct: number; maxPause: string; only?: 'precopy' | 'generation' };
  machine: { atStart: MachineInfo; loadavgAtEnd: number[] };
  tree: { head: string | null; modified: string[] };
  cliAddon: string;
  precopy: TargetInfo & { runs: Array<{ index: number; order: PeerName[]; peers: Partial<Record<PeerName, Outcome<PeerResult>>> }> };
  generation: TargetInfo & { runs: GenerationRun[] };
  ratios: RatioLine[];
  goals: {
    finalPauseMillis: { median: number | null; target: number; met: boolean };
    /** Compared (no tracking kept), and tracked (snapshot --track before it). */
    generationWallMillis: { median: number | null; target: number; met: boolean };
    trackedGenerationWallMillis: { median: number | null; target: number; met: boolean };
  };
}

// ---- the target's view ------------------------------------------------------------

interface Window {
  t0: number;
  sched: TaskSampler;
  cpu: CpuAccountSampler;
}

async function openWindow(t: Faultlat): Promise<Window> {
  const w = { sched: new TaskSampler(t.pid, 10), cpu: new CpuAccountSampler(t.pid), t0: performance.now() };
  await t.startWindow();
  return w;
}

function closeWindow(w: Window): void {
  w.sched.stop();
  w.cpu.stop();
}

function view(w: Window, r: FaultlatReport): TargetView {
  const hb = r.heartbeat ?? null;
  const tid = w.sched.others()[0];
  const gaps: Gap[] = (hb?.gaps ?? [])
    .slice()
    .sort((a, b) => b.nanos - a.nanos)
    .map((g) => {
      const ms = g.nanos / 1e6;
      const d = tid === undefined ? null : w.sched.during(w.t0 + g.atMillis - ms, w.t0 + g.atMillis, tid);
      return { ms: round(ms, 2) as number, atMs: round(g.atMillis, 1) as number, waitMs: d === null ? null : round(Math.min(d.waitMs, ms), 2), runMs: d === null ? null : round(d.runMs, 2), states: d?.states ?? {} };
    });
  const stops = gaps.filter((g) => g.waitMs !== null).map((g) => g.ms - (g.waitMs as number));
  const c = w.cpu.during(w.t0, w.t0 + r.windowMillis);
  return {
    windowMillis: round(r.windowMillis, 1) as number,
    writesPerSec: r.writesPerSec,
    scheduled: r.cache?.scheduled ?? null,
    missed: r.cache?.missed ?? null,
    writerMaxGapMillis: round(r.maxGapNanos / 1e6, 2) as number,
    heartbeatMaxGapMillis: hb === null ? null : round(hb.maxGapNanos / 1e6, 2),
    maxStopMillis: stops.length > 0 ? round(Math.max(...stops), 2) : null,
    gaps,
    cpus: c === null ? null : { target: round(c.own, 2) as number, peer: round(c.tree - c.own, 2) as number, others: round(c.others, 2) as number },
  };
}

/** Runs `fn` inside a window of the target; the target reports when it is done. */
async function inWindow<T>(t: Faultlat, fn: (w: Window) => Promise<T>): Promise<{ value: T; target: TargetView }> {
  const w = await openWindow(t);
  try {
    const value = await fn(w);
    const report = await t.report();
    closeWindow(w);
    return { value, target: view(w, report) };
  } finally {
    closeWindow(w);
  }
}

// ---- the peers of the pre-copy target --------------------------------------------------

const TIMEOUT_MS = 15 * 60_000;

function storeBytes(db: string): number {
  let n = 0;
  for (const f of [db, `${db}-wal`]) if (existsSync(f)) n += statSync(f).size;
  return n;
}

function failed(what: string, r: CommandResult): Error {
  return new Error(`${what} exited ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${(r.stderr || r.stdout).trim().slice(-400)}`);
}

async function timed(w: Window, cmd: string, args: string[], sample = false): Promise<{ r: CommandResult; c: Command }> {
  const startMs = performance.now() - w.t0;
  const r = await runCommand(cmd, args, { timeoutMs: TIMEOUT_MS, sampleThreads: sample });
  const endMs = performance.now() - w.t0;
  const c = { wallMillis: round(r.wallMillis, 1) as number, cpuMillis: r.cpuUserMillis + r.cpuSysMillis, startMs: round(startMs, 1) as number, endMs: round(endMs, 1) as number };
  return { r, c };
}

async function measurePeer(peer: PeerName, t: Faultlat, cli: string, dir: string): Promise<PeerResult> {
  if (peer === 'baseline') {
    const { target } = await inWindow(t, () => sleep(BASELINE_MS));
    return { kind: 'baseline', target };
  }
  const scratch = mkdtempSync(join(dir, `${peer}-`));
  try {
    if (peer === 'gcore') {
      const prefix = join(scratch, 'core');
      const { value, target } = await inWindow(t, (w) => timed(w, 'gcore', ['-o', prefix, String(t.pid)]));
      const core = `${prefix}.${t.pid}`;
      if (value.r.code !== 0 || !existsSync(core)) throw failed('gcore', value.r);
      return { kind: 'gcore', ...value.c, coreBytes: statSync(core).size, target };
    }
    const db = join(scratch, 'store.db');
    if (peer === 'precopy') {
      const args = [cli, 'precopy', String(t.pid), '--max-pause', MAX_PAUSE, '--json', '--store', db];
      const { value, target } = await inWindow(t, (w) => timed(w, process.execPath, args));
      let doc: Record<string, unknown> | undefined;
      try {
        doc = JSON.parse(value.r.stdout) as Record<string, unknown>;
      } catch {
        doc = undefined;
      }
      if (value.r.code !== 0 || doc === undefined || !Array.isArray(doc['rounds'])) throw failed('wpsnap precopy', value.r);
      return {
        kind: 'precopy',
        ...value.c,
        rounds: doc['rounds'] as PrecopyRoundLine[],
        finalPauseMicros: doc['finalPauseMicros'] as number,
        converged: doc['converged'] === true,
        warnings: (doc['warnings'] as string[] | undefined) ?? [],
        generations: (doc['generations'] as unknown[] | undefined)?.length ?? 0,
        storeBytes: storeBytes(db),
        target,
      };
    }
    const { value, target } = await inWindow(t, (w) => timed(w, process.execPath, [cli, 'snapshot', String(t.pid), '--json', '--store', db]));
    const doc = snapshotDocument(value.r);
    return {
      kind: 'snapshot',
      ...value.c,
      pauseMicros: doc['pauseMicros'] as number,
      stops: doc['stops'] ?? null,
      protectWindowMillis: num(doc['protectWindowMillis']),
      durableMillis: num(doc['durableMillis']),
      bytesStored: doc['bytesStored'] as number,
      target,
    };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const errorText = (e: unknown): string => (e instanceof Error ? e.message : String(e)).replace(/\s+/g, ' ');

// ---- the generation target -----------------------------------------------------------

async function snapshotStep(cli: string, pid: number, db: string, extra: string[], t0: number): Promise<GenStep> {
  const before = storeBytes(db);
  const r = await runCommand(process.execPath, [cli, 'snapshot', String(pid), '--json', '--store', db, ...extra], { timeoutMs: TIMEOUT_MS, sampleThreads: true });
  const end = performance.now() - t0;
  const doc = snapshotDocument(r);
  const durable = num(doc['durableMillis']);
  return {
    wallMillis: round(r.wallMillis, 1) as number,
    cpuUserMillis: r.cpuUserMillis,
    cpuSysMillis: r.cpuSysMillis,
    threads: r.threads ?? null,
    pauseMicros: doc['pauseMicros'] as number,
    durationMillis: doc['durationMillis'] as number,
    protectWindowMillis: num(doc['protectWindowMillis']),
    durableMillis: durable,
    pagesSaved: doc['pagesSaved'] as number,
    pagesNew: doc['pagesNew'] as number,
    bytesRaw: doc['bytesRaw'] as number,
    bytesStored: doc['bytesStored'] as number,
    storeGrowthBytes: storeBytes(db) - before,
    incremental: typeof doc['incremental'] === 'string' ? doc['incremental'] : null,
    dirtyPages: num(doc['dirtyPages']),
    changedPages: num(doc['changedPages']),
    writtenUnchangedPages: num(doc['writtenUnchangedPages']),
    pagesStored: num(doc['pagesStored']),
    instantMs: round(end - (durable ?? 0), 1) as number,
    keeperPid: num((doc['tracking'] as { keeperPid?: unknown } | undefined)?.keeperPid),
  };
}


async function generationRun(index: number, cli: string, t: Faultlat, dir: string): Promise<GenerationRun> {
  const scratch = mkdtempSync(join(dir, 'generation-'));
  const db = join(scratch, 'store.db');
  const t0 = performance.now();
  const attempt = async (fn: () => Promise<GenStep>): Promise<Outcome<GenStep>> => {
    try {
      return await fn();
    } catch (error) {
      if (!isAlive(t.pid)) throw new Error(`the target ${t.pid} died: ${errorText(error)}`);
      return { error: errorText(error) };
    }
  };
  try {
    const v = await runCommand(process.execPath, [cli, '--version'], { timeoutMs: 60_000 });
    const base = await attempt(() => snapshotStep(cli, t.pid, db, ['--name', 'base'], t0));
    await sleep(GENERATION_WAIT_MS);
    const generation = 'error' in base ? { error: 'no base' } : await attempt(() => snapshotStep(cli, t.pid, db, ['--parent', 'base'], t0));
    await sleep(SETTLE_MS);
    const fullSameStore = 'error' in base ? { error: 'no base' } : await attempt(() => snapshotStep(cli, t.pid, db, [], t0));
    const since = 'error' in base || 'error' in generation ? null : round(generation.instantMs - base.instantMs, 1);
    await sleep(SETTLE_MS);
    // Tracking kept between the commands: the generation reads only what was written since.
    const trackedDb = join(scratch, 'tracked.db');
    const trackedBase = await attempt(() => snapshotStep(cli, t.pid, trackedDb, ['--name', 'base', '--track'], t0));
    let keeper: KeeperCost | null = null;
    const keeperPid = 'error' in trackedBase ? null : trackedBase.keeperPid;
    if (keeperPid !== null) {
      const before = processCpuMillis(keeperPid);
      const waitStart = performance.now();
      await sleep(GENERATION_WAIT_MS);
      const after = processCpuMillis(keeperPid);
      keeper = {
        rssKiB: procKiB(`/proc/${keeperPid}/status`, 'VmRSS'),
        cpuMillis: before === null || after === null ? null : after - before,
        overMillis: round(performance.now() - waitStart, 1) as number,
      };
    } else {
      await sleep(GENERATION_WAIT_MS);
    }
    // Without --track the generation releases the keeper, which ends.
    const tracked = 'error' in trackedBase ? { error: 'no base' } : await attempt(() => snapshotStep(cli, t.pid, trackedDb, ['--parent', 'base'], t0));
    if (keeperPid !== null && isAlive(keeperPid)) {
      await runCommand(process.execPath, [cli, 'untrack', String(t.pid)], { timeoutMs: 60_000 });
    }
    return { index, startupMillis: round(v.wallMillis, 1) as number, base, generation, fullSameStore, sinceParentMillis: since, trackedBase, tracked, keeper };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

// ---- running it ---------------------------------------------------------------------

class UnsupportedHere extends Error {}

async function preflight(mib: number, cli: string, dir: string): Promise<string> {
  const root = repoRoot();
  if (!existsSync(join(root, 'fixtures/build/faultlat'))) throw new UnsupportedHere('fixtures/build/faultlat is missing: build first (make -C fixtures)');
  if (!existsSync(cli)) throw new UnsupportedHere(`${cli} is missing: build first (npx tsc -p tsconfig.json)`);
  if (process.getuid?.() !== 0) throw new UnsupportedHere('run as root: wpsnap and gcore attach to the target with ptrace');
  if ((await runCommand('sh', ['-c', 'command -v gcore'])).code !== 0) throw new UnsupportedHere('gcore is not on the PATH (Debian: apt-get install gdb)');
  // The addon the CLI loads must have the dirty tracker (precopy needs it): a stale build fails only after the 1 GiB fill otherwise.
  let pkg = dirname(cli);
  while (!existsSync(join(pkg, 'package.json')) && dirname(pkg) !== pkg) pkg = dirname(pkg);
  const addon = join(pkg, 'build', 'Release', 'wpsnap_native.node');
  const probe = await runCommand(process.execPath, ['-e', `process.exit(typeof require(${JSON.stringify(addon)}).trackerStart === 'function' ? 0 : 5)`], { timeoutMs: 60_000 });
  if (probe.code !== 0) {
    throw new UnsupportedHere(`${addon} ${probe.code === 5 ? 'has no trackerStart: it predates the dirty tracker (rebuild it: npm run build:native)' : `cannot be loaded: ${probe.stderr.trim().slice(-200)}`}`);
  }
  // The target, wpsnap's staging (up to the target's size) and node; gcore's core on disk.
  const needMib = 2 * mib + 1024;
  const availMib = (procKiB('/proc/meminfo', 'MemAvailable') ?? 0) / 1024;
  if (availMib < needMib) throw new UnsupportedHere(`not enough memory: MemAvailable ${Math.floor(availMib)} MiB, needs ${needMib} MiB`);
  const fs = statfsSync(dir);
  const freeMib = (fs.bavail * fs.bsize) / 2 ** 20;
  if (freeMib < 2 * mib + 1024) throw new UnsupportedHere(`not enough disk in ${dir}: ${Math.floor(freeMib)} MiB free, needs ${2 * mib + 1024} MiB (gcore's core, the stores)`);
  return `${addon} (has trackerStart; sha256 ${createHash('sha256').update(readFileSync(addon)).digest('hex').slice(0, 16)}, built ${statSync(addon).mtime.toISOString()})`;
}

async function withTarget(args: string[], info: TargetInfo, fn: (t: Faultlat) => Promise<void>): Promise<void> {
  let t: Faultlat | undefined;
  try {
    log(`launching faultlat ${args.join(' ')}`);
    t = await Faultlat.launch(args);
    info.pid = t.pid;
    info.fillMillis = num(t.ready['fillMillis']);
    info.writeRate = num(t.ready['writeRate']);
    log(`target pid ${t.pid}, filled in ${String(info.fillMillis)} ms, ${String(info.writeRate)} writes/s scheduled (${((info.writeRate ?? 0) * PAGE / 1e6).toFixed(1)} MB/s of pages)`);
    await sleep(SETTLE_MS);
    await fn(t);
  } catch (error) {
    info.error = errorText(error);
    log(`FAILED: ${info.error}`);
  } finally {
    if (t) await t.stop();
  }
}

const f = (v: number | null | undefined, d = 1): string => (v === null || v === undefined ? '?' : v.toFixed(d));

function describe(p: PeerResult): string {
  const t = p.target;
  const seen = `target: hb max gap ${f(t.heartbeatMaxGapMillis, 1)} ms (max stop ${f(t.maxStopMillis, 1)} ms), writer max gap ${f(t.writerMaxGapMillis, 1)} ms, missed ${t.missed ?? '?'}, others ${f(t.cpus?.others, 2)} CPUs`;
  switch (p.kind) {
    case 'baseline':
      return `baseline: ${seen}`;
    case 'precopy':
      return `precopy: ${p.rounds.length} rounds (${p.rounds.map((r) => `${r.pages}p/${r.millis}ms`).join(', ')}), final pause ${f(p.finalPauseMicros / 1e3, 2)} ms, converged ${p.converged}, wall ${f(p.wallMillis / 1e3, 2)} s; ${seen}`;
    case 'gcore':
      return `gcore: wall ${f(p.wallMillis / 1e3, 2)} s, core ${f(p.coreBytes / 2 ** 20, 0)} MiB; ${seen}`;
    case 'snapshot':
      return `snapshot: pause ${f(p.pauseMicros / 1e3, 2)} ms, wall ${f(p.wallMillis / 1e3, 2)} s; ${seen}`;
  }
}

export async function runPrecopy(o: PrecopyResult['options'], command: string): Promise<PrecopyResult> {
  const base = tmpdir();
  const cliAddon = await preflight(o.mib, o.cli, base);
  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const t0 = performance.now();
  const dir = mkdtempSync(join(base, 'wpsnap-precopy-'));
  const common = ['--mib', String(o.mib), '--workload', 'cache', '--heartbeat'];
  const pc: PrecopyResult['precopy'] = { args: [...common, '--write-pct', String(o.precopyWritePct)], pid: null, fillMillis: null, writeRate: null, runs: [] };
  const gen: PrecopyResult['generation'] = { args: [...common, '--write-pct', String(o.generationWritePct)], pid: null, fillMillis: null, writeRate: null, runs: [] };
  log(`tree ${tree.head ?? '?'}${tree.modified.length > 0 ? ` + modified: ${tree.modified.join(', ')}` : ''}; CLI ${o.cli}; scratch ${dir}`);
  try {
    if (o.only !== 'generation') await withTarget(pc.args, pc, async (t) => {
      for (let i = 0; i < o.runs; i++) {
        const rotated = PEERS.map((_, k) => PEERS[(k + i) % PEERS.length] as PeerName);
        const order = i % 2 === 1 ? rotated.reverse() : rotated;
        const run: PrecopyResult['precopy']['runs'][number] = { index: i, order, peers: {} };
        pc.runs.push(run);
        for (const peer of order) {
          try {
            const r = await measurePeer(peer, t, o.cli, dir);
            run.peers[peer] = r;
            log(`pre-copy run ${i + 1}/${o.runs} ${describe(r)}`);
          } catch (error) {
            if (!isAlive(t.pid)) throw new Error(`the target ${t.pid} died during ${peer}: ${errorText(error)}`);
            run.peers[peer] = { error: errorText(error) };
            log(`pre-copy run ${i + 1}/${o.runs} ${peer}: FAILED ${errorText(error)}`);
          }
          await sleep(SETTLE_MS);
        }
      }
    });
    if (o.only !== 'precopy') await withTarget(gen.args, gen, async (t) => {
      for (let i = 0; i < o.runs; i++) {
        const r = await generationRun(i, o.cli, t, dir);
        gen.runs.push(r);
        const s = (x: Outcome<GenStep>): string => ('error' in x ? `FAILED ${x.error}` : `wall ${f(x.wallMillis / 1e3, 2)} s, pause ${f(x.pauseMicros / 1e3, 2)} ms, stored ${f(x.bytesStored / 2 ** 20)} MiB`);
        log(`generation run ${i + 1}/${o.runs}: base ${s(r.base)}; --parent ${s(r.generation)}${'error' in r.generation ? '' : `, dirty ${r.generation.dirtyPages} changed ${r.generation.changedPages}`}, ${f((r.sinceParentMillis ?? NaN) / 1e3, 2)} s after its parent's instant; full into the same store ${s(r.fullSameStore)}`);
        await sleep(SETTLE_MS);
      }
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const partial = { precopy: pc, generation: gen };
  const finalPause = median(peerRuns(pc, 'precopy').map((p) => p.finalPauseMicros / 1e3));
  const genWall = median(genSteps(gen, 'generation').map((s) => s.wallMillis));
  const trackedWall = median(genSteps(gen, 'tracked').map((s) => s.wallMillis));
  return {
    scenario: 'precopy',
    startedAt,
    wallMillis: Math.round(performance.now() - t0),
    command,
    options: o,
    machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
    tree,
    cliAddon,
    ...partial,
    ratios: ratios(pc, gen),
    goals: {
      finalPauseMillis: { median: finalPause, target: GOALS.finalPauseMillis, met: finalPause !== null && finalPause <= GOALS.finalPauseMillis },
      generationWallMillis: { median: genWall, target: GOALS.generationWallMillis, met: genWall !== null && genWall <= GOALS.generationWallMillis },
      trackedGenerationWallMillis: { median: trackedWall, target: GOALS.generationWallMillis, met: trackedWall !== null && trackedWall <= GOALS.generationWallMillis },
    },
  };
}

// ---- medians and ratios -------------------------------------------------------------

type PeerOf<K extends PeerName> = Extract<PeerResult, { kind: K }>;

/** Run i's result of `peer`, or null (failed or not run), for every run. */
function peerByRun<K extends PeerName>(pc: PrecopyResult['precopy'], peer: K): Array<PeerOf<K> | null> {
  return pc.runs.map((r) => {
    const p = r.peers[peer];
    return p === undefined || 'error' in p ? null : (p as PeerOf<K>);
  });
}
const peerRuns = <K extends PeerName>(pc: PrecopyResult['precopy'], peer: K): Array<PeerOf<K>> => peerByRun(pc, peer).filter((p): p is PeerOf<K> => p !== null);

type GenStepName = 'base' | 'generation' | 'fullSameStore' | 'trackedBase' | 'tracked';

function genByRun(gen: PrecopyResult['generation'], step: GenStepName): Array<GenStep | null> {
  return gen.runs.map((r) => ('error' in r[step] ? null : (r[step] as GenStep)));
}
const genSteps = (gen: PrecopyResult['generation'], step: GenStepName): GenStep[] => genByRun(gen, step).filter((s): s is GenStep => s !== null);

function ratioLine<A, B>(name: string, a: Array<A | null>, num: (x: A) => number | null, b: Array<B | null>, den: (x: B) => number | null): RatioLine {
  const va = a.map((x) => (x === null ? null : num(x)));
  const vb = b.map((x) => (x === null ? null : den(x)));
  const byRun = va.map((x, i) => ratio(x ?? null, vb[i] ?? null));
  return { name, fromMedians: ratio(median(va), median(vb)), byRun: { median: median(byRun), range: minMax(byRun) } };
}

function ratios(pc: PrecopyResult['precopy'], gen: PrecopyResult['generation']): RatioLine[] {
  const p = peerByRun(pc, 'precopy');
  const g = peerByRun(pc, 'gcore');
  const s = peerByRun(pc, 'snapshot');
  const goal = p.map(() => ({}));
  const fin = (x: PeerOf<'precopy'>): number => x.finalPauseMicros / 1e3;
  const base = genByRun(gen, 'base');
  const child = genByRun(gen, 'generation');
  const same = genByRun(gen, 'fullSameStore');
  const tracked = genByRun(gen, 'tracked');
  const wall = (x: GenStep): number => x.wallMillis;
  return [
    ratioLine('pre-copy final pause / 20 ms target', p, fin, goal, () => GOALS.finalPauseMillis),
    ratioLine("gcore's stall (heartbeat) / pre-copy final pause", g, (x) => x.target.heartbeatMaxGapMillis, p, fin),
    ratioLine('gcore wall / pre-copy final pause', g, (x) => x.wallMillis, p, fin),
    ratioLine('snapshot pauseMicros / pre-copy final pause', s, (x) => x.pauseMicros / 1e3, p, fin),
    ratioLine("pre-copy: target's longest heartbeat gap / final pause", p, (x) => x.target.heartbeatMaxGapMillis, p, fin),
    ratioLine('pre-copy wall / snapshot wall', p, (x) => x.wallMillis, s, (x) => x.wallMillis),
    ratioLine('pre-copy wall / gcore wall', p, (x) => x.wallMillis, g, (x) => x.wallMillis),
    ratioLine('--parent wall / 100 ms target', child, wall, goal, () => GOALS.generationWallMillis),
    ratioLine('--parent wall / full (base) wall', child, wall, base, wall),
    ratioLine('--parent wall / full into the same store wall', child, wall, same, wall),
    ratioLine('--parent bytes stored / full (base) bytes stored', child, (x) => x.bytesStored, base, (x) => x.bytesStored),
    ratioLine('--parent pause / full (base) pause', child, (x) => x.pauseMicros, base, (x) => x.pauseMicros),
    ratioLine('tracked --parent wall / 100 ms target', tracked, wall, goal, () => GOALS.generationWallMillis),
    ratioLine('tracked --parent wall / compared --parent wall', tracked, wall, child, wall),
    ratioLine('tracked --parent pause / compared --parent pause', tracked, (x) => x.pauseMicros, child, (x) => x.pauseMicros),
    ratioLine('tracked --parent pages captured / compared', tracked, (x) => x.pagesSaved, child, (x) => x.pagesSaved),
  ];
}

// ---- the tables ---------------------------------------------------------------------

function cell(values: Array<number | null | undefined>, fmt: (v: number) => string): string {
  const m = median(values);
  const r = minMax(values);
  if (m === null) return '–';
  return r === null || values.filter((v) => typeof v === 'number').length < 2 ? fmt(m) : `${fmt(m)} [${fmt(r[0])}–${fmt(r[1])}]`;
}
const ms = (v: number): string => (v < 10 ? `${v.toFixed(2)} ms` : v < 100 ? `${v.toFixed(1)} ms` : v < 10_000 ? `${v.toFixed(0)} ms` : `${(v / 1000).toFixed(1)} s`);
const mib = (v: number): string => `${(v / 2 ** 20).toFixed(v < 10 * 2 ** 20 ? 2 : 1)} MiB`;
const int = (v: number): string => v.toFixed(0);
const x = (v: number | null): string => (v === null ? '–' : `${v.toFixed(v < 10 ? 2 : 1)}×`);

export function printPrecopyTables(r: PrecopyResult, out: NodeJS.WritableStream = process.stdout): void {
  const w = (line: string): void => void out.write(`${line}\n`);
  const pc = r.precopy;
  const pages = r.options.mib * 256;
  const rateLine = (info: TargetInfo, pct: number): string =>
    `faultlat ${info.args.join(' ')}: scheduled ${f(info.writeRate, 1)} writes/s (${pct}% of ${pages} pages: ${f(((info.writeRate ?? 0) * PAGE) / 1e6, 1)} MB/s of pages)`;
  w(`\nPre-copy and incremental generations, ${r.options.mib} MiB, ${r.options.runs} runs: medians [min–max over the runs]`);

  w(`\n1. Pre-copy (--max-pause ${r.options.maxPause}) against stop-and-copy`);
  w(`   ${pc.error ? `FAILED: ${pc.error}` : rateLine(pc, r.options.precopyWritePct)}`);
  const baseline = peerRuns(pc, 'baseline');
  const pre = peerRuns(pc, 'precopy');
  const dirtyRates = pre.flatMap((p) => p.rounds.slice(1).map((x) => x.dirtyPagesPerSec));
  w(`   measured: ${cell(baseline.map((b) => b.target.writesPerSec), int)} writes/s in the baseline windows; the tracker saw ${cell(dirtyRates, int)} pages/s written (rounds ≥ 1, all runs)`);
  const cols = ['baseline', 'precopy', 'gcore', 'snapshot'] as const;
  const colName: Record<PeerName, string> = { baseline: 'nothing (3 s)', precopy: 'wpsnap precopy', gcore: 'gcore', snapshot: 'wpsnap snapshot' };
  w(`   ${''.padEnd(40)}${cols.map((c) => colName[c].padEnd(36)).join('')}`);
  const row = (label: string, get: (p: PeerResult) => number | null | undefined, fmt: (v: number) => string): void =>
    w(`   ${label.padEnd(40)}${cols.map((c) => cell(peerRuns(pc, c).map((p) => get(p)), fmt).padEnd(36)).join('')}`);
  row('stop reported by the tool', (p) => (p.kind === 'precopy' ? p.finalPauseMicros / 1e3 : p.kind === 'snapshot' ? p.pauseMicros / 1e3 : null), ms);
  row('wall of the command', (p) => (p.kind === 'baseline' ? null : p.wallMillis), ms);
  row('CPU of the command', (p) => (p.kind === 'baseline' ? null : p.cpuMillis), ms);
  row("target: longest heartbeat gap", (p) => p.target.heartbeatMaxGapMillis, ms);
  row('  less its CPU wait (longest stop)', (p) => p.target.maxStopMillis, ms);
  row("target: writer's longest gap", (p) => p.target.writerMaxGapMillis, ms);
  row('target: writes missed (> 10 ms late)', (p) => p.target.missed, int);
  row('unrelated processes, CPUs', (p) => p.target.cpus?.others, (v) => v.toFixed(2));
  row('stored / core file', (p) => (p.kind === 'precopy' ? p.storeBytes : p.kind === 'gcore' ? p.coreBytes : p.kind === 'snapshot' ? p.bytesStored : null), mib);
  w(`   pre-copy, run by run (round: pages / copy ms; the last round is the stop):`);
  for (const run of pc.runs) {
    const p = run.peers.precopy;
    if (p === undefined) continue;
    if ('error' in p) {
      w(`     run ${run.index + 1}: FAILED ${p.error}`);
      continue;
    }
    if (p.kind !== 'precopy') continue;
    w(`     run ${run.index + 1}: ${p.rounds.map((x) => `r${x.round} ${x.pages}/${x.millis}`).join(', ')}; converged ${p.converged}; wall ${ms(p.wallMillis)}`);
    const gap = (what: string, g: Gap | undefined): void => {
      if (g === undefined) return;
      const states = Object.entries(g.states).map(([k, n]) => `${k}×${n}`).join(' ') || 'never';
      w(`       ${what}: ${g.ms} ms, ending ${f(g.atMs - p.startMs, 0)} ms after the command started (it ran ${f(p.endMs - p.startMs, 0)} ms), ${g.waitMs ?? '?'} ms of it waiting for a CPU and ${g.runMs ?? '?'} ms on one, sampled ${states}`);
    };
    const longest = p.target.gaps[0];
    const stop = p.target.gaps.filter((g) => g.waitMs !== null).sort((a, b) => b.ms - (b.waitMs as number) - (a.ms - (a.waitMs as number)))[0];
    gap('target: longest heartbeat gap', longest);
    if (stop !== undefined && stop !== longest) gap('        longest less its CPU wait', stop);
    for (const warning of p.warnings) w(`       warning: ${warning}`);
  }

  const gen = r.generation;
  w(`\n2. An incremental generation (--parent base, ${GENERATION_WAIT_MS / 1000} s after the base command ended) against a full snapshot`);
  w(`   ${gen.error ? `FAILED: ${gen.error}` : rateLine(gen, r.options.generationWritePct)}`);
  const steps = {
    base: genSteps(gen, 'base'),
    generation: genSteps(gen, 'generation'),
    fullSameStore: genSteps(gen, 'fullSameStore'),
    trackedBase: genSteps(gen, 'trackedBase'),
    tracked: genSteps(gen, 'tracked'),
  };
  const gcols = ['base', 'generation', 'fullSameStore', 'trackedBase', 'tracked'] as const;
  const gName = { base: 'full (fresh store)', generation: '--parent base', fullSameStore: 'full, same store', trackedBase: 'full --track', tracked: '--parent base (tracked)' };
  w(`   ${''.padEnd(44)}${gcols.map((c) => gName[c].padEnd(36)).join('')}`);
  const grow = (label: string, get: (s: GenStep) => number | null, fmt: (v: number) => string): void =>
    w(`   ${label.padEnd(44)}${gcols.map((c) => cell(steps[c].map(get), fmt).padEnd(36)).join('')}`);
  grow('wall of the command (from outside)', (s) => s.wallMillis, ms);
  // wall = (wall − duration) + (duration − durable) + protected + (durable − protected): durationMillis runs from the
  // snapshot's start to just before its final commit, durableMillis from the resume to just after it.
  grow('  node, CLI, store open, exit (+ commit)', (s) => s.wallMillis - s.durationMillis, ms);
  grow('  snapshot start → resume (staging, attach)', (s) => (s.durableMillis === null ? null : s.durationMillis - s.durableMillis), ms);
  grow('  protected: every page captured', (s) => s.protectWindowMillis, ms);
  grow('  after the capture until durable', (s) => (s.durableMillis === null || s.protectWindowMillis === null ? null : s.durableMillis - s.protectWindowMillis), ms);
  grow('pauseMicros', (s) => s.pauseMicros / 1e3, ms);
  grow('CPU user + sys', (s) => s.cpuUserMillis + s.cpuSysMillis, ms);
  grow('pages captured (pagesSaved)', (s) => s.pagesSaved, int);
  grow('dirtyPages', (s) => s.dirtyPages, int);
  grow('changedPages', (s) => s.changedPages, int);
  grow('pagesStored / pagesNew', (s) => s.pagesStored ?? s.pagesNew, int);
  grow('bytes stored (bytesStored)', (s) => s.bytesStored, mib);
  grow('store files grew by', (s) => s.storeGrowthBytes, mib);
  w(`   node ${r.options.cli} --version alone: ${cell(gen.runs.map((g) => g.startupMillis), ms)}`);
  const since = gen.runs.map((g) => g.sinceParentMillis);
  const dirty = steps.generation.map((s) => (s.dirtyPages === null ? null : (100 * s.dirtyPages) / pages));
  w(`   the generation's instant came ${cell(since, ms)} after its parent's; pages written since the parent: ${cell(dirty, (v) => `${v.toFixed(1)}%`)} of ${pages}`);
  const threads = (s: GenStep[]): string => {
    const names = new Set(s.flatMap((y) => Object.keys(y.threads ?? {})));
    return [...names].map((n) => `${n} ${ms(median(s.map((y) => y.threads?.[n]?.runMillis ?? null)) ?? 0)}`).join(', ');
  };
  w(`   CPU by thread of --parent (median): ${threads(steps.generation)}`);
  w(`   CPU by thread of tracked --parent (median): ${threads(steps.tracked)}`);
  const keepers = gen.runs.map((g) => g.keeper);
  w(`   the keeper over the ${GENERATION_WAIT_MS / 1000} s between: RSS ${cell(keepers.map((k) => (k?.rssKiB == null ? null : k.rssKiB * 1024)), mib)}, CPU ${cell(keepers.map((k) => k?.cpuMillis ?? null), ms)} (10 ms ticks)`);
  for (const g of gen.runs) for (const k of gcols) if ('error' in g[k]) w(`     run ${g.index + 1} ${gName[k]}: FAILED ${(g[k] as { error: string }).error}`);

  w(`\nRatios: of the medians; run by run, median [min–max]`);
  for (const l of r.ratios) {
    const range = l.byRun.range === null ? '' : ` [${x(l.byRun.range[0])}–${x(l.byRun.range[1])}]`;
    w(`  ${l.name.padEnd(56)}${x(l.fromMedians).padStart(9)}   run by run ${x(l.byRun.median)}${range}`);
  }
  const gl = r.goals;
  w(`\nGoals (issue 10): pre-copy final pause ≤ ${gl.finalPauseMillis.target} ms: ${gl.finalPauseMillis.median === null ? '–' : ms(gl.finalPauseMillis.median)}, ${gl.finalPauseMillis.met ? 'met' : 'NOT met'}`);
  w(`                  incremental generation ≤ ${gl.generationWallMillis.target} ms wall: ${gl.generationWallMillis.median === null ? '–' : ms(gl.generationWallMillis.median)}, ${gl.generationWallMillis.met ? 'met' : 'NOT met'}`);
  const tg = gl.trackedGenerationWallMillis;
  w(`                  tracked incremental generation ≤ ${tg.target} ms wall: ${tg.median === null ? '–' : ms(tg.median)}, ${tg.met ? 'met' : 'NOT met'}`);
  w(`Run took ${(r.wallMillis / 60_000).toFixed(1)} min; CLI addon: ${r.cliAddon}`);
}

// ---- command line ---------------------------------------------------------------------

const USAGE = `usage: node dist/bench/run.js precopy [options]
  --runs N      repetitions of every measurement (default ${PRECOPY_DEFAULTS.runs}; fresh store each time)
  --mib M       target size in MiB (default ${PRECOPY_DEFAULTS.mib}; needs about 2×M + 1024 MiB of memory and of disk)
  --cli PATH    the wpsnap CLI (default ${PRECOPY_DEFAULTS.cli}; its addon must have the dirty tracker)
  --out FILE    result JSON (default bench/results/precopy-<UTC timestamp>.json)
  --no-write    do not write a result file
  --only WHAT   precopy or generation: run only that half
Exit: 0 done (failed measurements are in the table), 1 failure, 2 usage, 3 unsupported here (not root, no gcore, a fixture, memory or disk missing, a stale addon).`;

export async function precopyMain(argv: string[]): Promise<number> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      options: {
        runs: { type: 'string' },
        mib: { type: 'string' },
        cli: { type: 'string' },
        out: { type: 'string' },
        'no-write': { type: 'boolean' },
        only: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (error) {
    process.stderr.write(`${errorText(error)}\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const int = (v: string | undefined, fallback: number): number | null => {
    if (v === undefined) return fallback;
    const n = Number(v);
    return Number.isInteger(n) && n > 0 ? n : null;
  };
  const runs = int(values.runs, PRECOPY_DEFAULTS.runs);
  const size = int(values.mib, PRECOPY_DEFAULTS.mib);
  if (runs === null || size === null) {
    process.stderr.write(`--${runs === null ? 'runs' : 'mib'} must be a positive integer\n${USAGE}\n`);
    return 2;
  }
  const cli = values.cli === undefined ? join(repoRoot(), PRECOPY_DEFAULTS.cli) : resolve(values.cli);
  if (values.only !== undefined && values.only !== 'precopy' && values.only !== 'generation') {
    process.stderr.write(`--only must be precopy or generation\n${USAGE}\n`);
    return 2;
  }
  try {
    const result = await runPrecopy(
      {
        runs,
        mib: size,
        cli,
        precopyWritePct: PRECOPY_DEFAULTS.precopyWritePct,
        generationWritePct: PRECOPY_DEFAULTS.generationWritePct,
        maxPause: MAX_PAUSE,
        ...(values.only === undefined ? {} : { only: values.only }),
      },
      `node dist/bench/run.js precopy ${argv.join(' ')}`.trim(),
    );
    printPrecopyTables(result);
    if (!values['no-write']) {
      const stamp = result.startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
      const out = values.out ?? join(repoRoot(), 'bench', 'results', `precopy-${stamp}.json`);
      mkdirSync(dirname(out), { recursive: true });
      writeFileSync(out, `${JSON.stringify(result)}\n`);
      log(`wrote ${out}`);
    }
    return result.precopy.error !== undefined || result.generation.error !== undefined ? 1 : 0;
  } catch (error) {
    process.stderr.write(`precopy: ${errorText(error)}\n`);
    return error instanceof UnsupportedHere ? 3 : 1;
  }
}
