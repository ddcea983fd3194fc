// Scenario "group" (issue 12, process groups):
// `node dist/bench/run.js group [--runs N] [--mib M]`.
//
// The workload: fixtures/groupbench, 4 processes (a parent and the 3 children
// it forked), each with M MiB (default 256) of private memory plus one memfd
// of the same size shared by all 4, each written by a timed writer thread at
// a steady rate (the content and the writes are described at the top of
// fixtures/groupbench.c). Every run measures, on the same live workload, in
// alternating order:
//
//   wpsnap  snapshotGroup (library API, in this process) of the 4 members into
//           a fresh store: the pause (all threads of all members stopped) and
//           its breakdown, the protection window, the duration, bytesStored
//   fork    the peer: each member in turn fork()s itself (SIGURG) and times
//           the call, the stop a fork-based (BGSAVE-style) snapshot imposes
//           on it; the children hold their copy-on-write image --fork-hold-ms
//
// and the writers' stalls in both windows (longest write, longest gap between
// two writes, writes slower than 2 µs). The store size is compared with a
// reference: the same pages of T (read back through the raw export) with the
// shared region counted once, zero pages left out, compressed the way the
// store compresses (zstd level ZSTD_LEVEL, blobs of BLOB_PAGES pages).
// Prints a table and writes bench/results/group-<UTC timestamp>.json.
import { createHash } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import { loadBinding } from '../core/binding.js';
import { snapshotGroup, type GroupSnapshotResult } from '../core/group.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { exportRaw } from '../snapshot-format/export-raw.js';
import { BLOB_PAGES, ZSTD_LEVEL } from '../store/worker-pool.js';
import { Store } from '../store/store.js';
import { log, machineInfo, median, minMax, repoRoot, round, sleep, treeState } from './lib.js';

const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as typeof ZstdBinding;
const PAGE = 4096;
const ZERO_PAGE = Buffer.alloc(PAGE);

export const GROUP_DEFAULTS = { runs: 5, mib: 256, members: 4, ratePagesPerSec: 20000, forkHoldMs: 1000, settleMs: 1500, warmup: 1 };

const USAGE = `usage: node dist/bench/run.js group [options]
  --runs N            measured runs, each wpsnap and fork (default ${GROUP_DEFAULTS.runs})
  --mib M             private MiB per member, and MiB of the shared memfd (default ${GROUP_DEFAULTS.mib})
  --shared-mib S      MiB of the shared memfd (default: M)
  --members N         processes in the group (default ${GROUP_DEFAULTS.members})
  --rate PAGES        page writes per second of each member's writer (default ${GROUP_DEFAULTS.ratePagesPerSec})
  --fork-hold-ms MS   how long each fork child holds its image (default ${GROUP_DEFAULTS.forkHoldMs})
  --settle-ms MS      pause between two measurements (default ${GROUP_DEFAULTS.settleMs})
  --warmup N          unmeasured group snapshots first (default ${GROUP_DEFAULTS.warmup})
  --no-pre-protect    snapshotGroup's preProtect: false (every member's memory protected in the pause)
  --no-reference      skip the store-size reference (the raw export and its compression)
  --out FILE          result JSON (default bench/results/group-<UTC timestamp>.json)
  --no-write          write no result file`;

/** A member's window report (fixtures/groupbench.c, SIGUSR2). */
export interface WriterReport {
  member: number;
  pid: number;
  writes: number;
  windowMillis: number;
  slowWrites: number;
  slowP50Micros: number;
  slowP99Micros: number;
  maxWriteMicros: number;
  maxGapMicros: number;
  maxLagMillis: number;
  missed: number;
}

/** The writers of all members in one window, summed or at their worst. */
export interface WritersSummary {
  writes: number;
  slowWrites: number;
  worstSlowP99Micros: number;
  maxWriteMicros: number;
  maxGapMicros: number;
  maxLagMillis: number;
  missed: number;
  perMember: WriterReport[];
}

export interface StoreSize {
  /** bytesStored of the snapshot. */
  bytesStored: number;
  /** The store file and its -wal on disk after the snapshot (SQLite pages, the index, the records). */
  fileBytes: number;
  /** The non-zero pages of the protected and copied regions, the shared one once, compressed like the store. */
  referenceBytes: number;
  referencePages: number;
  /** The same, with pages of equal content (e.g. libc's data in forked members) compressed once, as the store's dedup does. */
  referenceDedupBytes: number;
  /** The shared region's share of referenceBytes: what saving it once per member would add per extra copy. */
  sharedBytes: number;
  /** bytesStored / referenceBytes: goal ≤ 1.05. */
  ratio: number;
  /** Regions seen as the shared memfd, over all members (each member should list it). */
  sharedRegions: number;
  lostPages: number;
}

export interface GroupRun {
  index: number;
  /** The machine's load average when the run began (the machine is shared). */
  loadavg: number[];
  order: Array<'wpsnap' | 'fork'>;
  wpsnap: {
    wallMillis: number;
    result: GroupSnapshotResult;
    writers: WritersSummary;
    size: StoreSize | null;
  };
  fork: {
    perMember: Array<{ pid: number; forkMicros: number }>;
    sumMicros: number;
    maxMicros: number;
    writers: WritersSummary;
  };
}

type Line = Record<string, unknown>;

/** The groupbench group: its members' lines routed to whoever waits for them. */
class GroupTarget {
  private readonly lines: Line[] = [];
  private readonly waiters: Array<{ match: (l: Line) => boolean; resolve: (l: Line) => void }> = [];
  readonly pids: number[];

  constructor(
    private readonly fixture: LaunchedFixture,
    readonly ready: Line,
  ) {
    this.pids = ready['pids'] as number[];
    void this.pump();
  }

  private async pump(): Promise<void> {
    for (let text = await this.fixture.nextLine(); text !== null; text = await this.fixture.nextLine()) {
      const line = JSON.parse(text) as Line;
      const i = this.waiters.findIndex((w) => w.match(line));
      if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(line);
      else this.lines.push(line);
    }
  }

  waitFor(match: (l: Line) => boolean, what: string, timeoutMs = 30_000): Promise<Line> {
    const i = this.lines.findIndex(match);
    if (i >= 0) return Promise.resolve(this.lines.splice(i, 1)[0]!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`groupbench: no ${what} within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.push({
        match,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
      });
    });
  }

  /** Every member opens a window (its writer's statistics start afresh). */
  async openWindows(): Promise<void> {
    for (const pid of this.pids) process.kill(pid, 'SIGUSR1');
    await Promise.all(this.pids.map((pid) => this.waitFor((l) => l['window'] === true && l['pid'] === pid, `window line of ${pid}`)));
  }

  async reports(): Promise<WritersSummary> {
    for (const pid of this.pids) process.kill(pid, 'SIGUSR2');
    const perMember = (await Promise.all(
      this.pids.map((pid) => this.waitFor((l) => l['report'] === true && l['pid'] === pid, `report of ${pid}`)),
    )) as unknown as WriterReport[];
    const max = (f: (r: WriterReport) => number): number => Math.max(...perMember.map(f));
    const sum = (f: (r: WriterReport) => number): number => perMember.reduce((n, r) => n + f(r), 0);
    return {
      writes: sum((r) => r.writes),
      slowWrites: sum((r) => r.slowWrites),
      worstSlowP99Micros: max((r) => r.slowP99Micros),
      maxWriteMicros: max((r) => r.maxWriteMicros),
      maxGapMicros: max((r) => r.maxGapMicros),
      maxLagMillis: max((r) => r.maxLagMillis),
      missed: sum((r) => r.missed),
      perMember,
    };
  }

  /** Each member in turn forks (timed inside it); resolves once every fork child has exited. */
  async forkEach(holdMs: number): Promise<Array<{ pid: number; forkMicros: number; childPid: number }>> {
    const forks: Array<{ pid: number; forkMicros: number; childPid: number }> = [];
    for (const pid of this.pids) {
      process.kill(pid, 'SIGURG');
      const line = await this.waitFor((l) => 'fork' in l && l['pid'] === pid, `fork line of ${pid}`);
      if (line['fork'] !== true) throw new Error(`member ${pid} could not fork: ${String(line['error'])}`);
      forks.push({ pid, forkMicros: line['forkMicros'] as number, childPid: line['childPid'] as number });
    }
    await Promise.all(
      forks.map((f) => this.waitFor((l) => l['forkChildExit'] === true && l['childPid'] === f.childPid, `exit of fork child ${f.childPid}`, holdMs + 30_000)),
    );
    return forks;
  }

  stop(): void {
    this.fixture.kill('SIGTERM');
  }
}

/** Compresses pages the way the store does: BLOB_PAGES at a time, zstd ZSTD_LEVEL, raw when that is not smaller. */
class BlobCompressor {
  private readonly cctx = new zstd.CCtx();
  private readonly blob = Buffer.alloc(BLOB_PAGES * PAGE);
  private readonly out = Buffer.alloc(zstd.compressBound(BLOB_PAGES * PAGE));
  private filled = 0;
  bytes = 0;
  pages = 0;

  add(page: Buffer): void {
    page.copy(this.blob, this.filled * PAGE);
    this.pages++;
    if (++this.filled === BLOB_PAGES) this.flush();
  }

  flush(): void {
    if (this.filled === 0) return;
    const raw = this.blob.subarray(0, this.filled * PAGE);
    this.bytes += Math.min(this.cctx.compress(this.out, raw, ZSTD_LEVEL), raw.length);
    this.filled = 0;
  }
}

const isShared = (path: string): boolean => path.includes('memfd:groupbench-shared');

/** The reference size of snapshot `name`: see StoreSize. */
async function referenceSize(store: Store, name: string, dir: string): Promise<Omit<StoreSize, 'bytesStored' | 'fileBytes' | 'ratio'>> {
  const out = join(dir, 'export');
  const { manifest } = await exportRaw(store, name, out);
  const all = new BlobCompressor();
  const deduped = new BlobCompressor();
  const shared = new BlobCompressor();
  const seen = new Set<string>();
  const page = Buffer.alloc(PAGE);
  let sharedRegions = 0;
  let lostPages = 0;
  let sharedCounted = false;
  for (const proc of manifest.processes) {
    for (const region of proc.regions) {
      lostPages += region.lost.reduce((n, l) => n + l.pages, 0);
      if (region.file === null || (region.capture !== 'protected' && region.capture !== 'copied')) continue;
      const sharedRegion = isShared(region.path);
      if (sharedRegion) sharedRegions++;
      if (sharedRegion && sharedCounted) continue;
      sharedCounted ||= sharedRegion;
      const fd = openSync(join(out, region.file), 'r');
      try {
        for (let at = 0; readSync(fd, page, 0, PAGE, at) === PAGE; at += PAGE) {
          if (page.equals(ZERO_PAGE)) continue; // the store keeps no zero page
          all.add(page);
          if (sharedRegion) shared.add(page);
          const hash = createHash('sha1').update(page).digest('base64');
          if (!seen.has(hash)) {
            seen.add(hash);
            deduped.add(page);
          }
        }
      } finally {
        closeSync(fd);
      }
    }
  }
  for (const c of [all, deduped, shared]) c.flush();
  rmSync(out, { recursive: true, force: true });
  return { referenceBytes: all.bytes, referencePages: all.pages, referenceDedupBytes: deduped.bytes, sharedBytes: shared.bytes, sharedRegions, lostPages };
}

const fileSize = (path: string): number => {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
};

async function measureWpsnap(target: GroupTarget, name: string, withReference: boolean, preProtect: boolean): Promise<GroupRun['wpsnap']> {
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-group-'));
  const storePath = join(dir, 'store.db');
  const store = Store.open(storePath);
  try {
    await target.openWindows();
    const t0 = performance.now();
    const result = await snapshotGroup(loadBinding(), store, target.pids.map((pid) => ({ pid })), { name, preProtect });
    const wallMillis = performance.now() - t0;
    const writers = await target.reports();
    if (!withReference) return { wallMillis, result, writers, size: null };
    const ref = await referenceSize(store, name, dir);
    await store.close(); // checkpoints the WAL into the file
    const fileBytes = fileSize(storePath) + fileSize(`${storePath}-wal`);
    return { wallMillis, result, writers, size: { bytesStored: result.bytesStored, fileBytes, ...ref, ratio: result.bytesStored / ref.referenceBytes } };
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function measureFork(target: GroupTarget, holdMs: number): Promise<GroupRun['fork']> {
  await target.openWindows();
  const forks = await target.forkEach(holdMs);
  const writers = await target.reports();
  const micros = forks.map((f) => f.forkMicros);
  return {
    perMember: forks.map(({ pid, forkMicros }) => ({ pid, forkMicros })),
    sumMicros: micros.reduce((a, b) => a + b, 0),
    maxMicros: Math.max(...micros),
    writers,
  };
}

const stat = (xs: number[]): { median: number | null; range: [number, number] | null } => ({ median: round(median(xs), 3), range: minMax(xs) });

/** Medians and ranges over the runs, and the ratios both from the medians and run by run. */
export function summarizeGroup(runs: GroupRun[]) {
  const w = runs.map((r) => r.wpsnap);
  const f = runs.map((r) => r.fork);
  const phases = [...new Set(w.flatMap((x) => Object.keys(x.result.pauseBreakdownMicros)))];
  const breakdown = Object.fromEntries(phases.map((p) => [p, stat(w.map((x) => (x.result.pauseBreakdownMicros as unknown as Record<string, number>)[p] ?? NaN))]));
  const pause = stat(w.map((x) => x.result.pauseMicros));
  const forkSum = stat(f.map((x) => x.sumMicros));
  const forkMax = stat(f.map((x) => x.maxMicros));
  const ratioOf = (a: { median: number | null }, b: { median: number | null }): number | null =>
    a.median === null || b.median === null || b.median === 0 ? null : round(a.median / b.median, 3);
  const sizes = w.map((x) => x.size).filter((s): s is StoreSize => s !== null);
  return {
    pauseMicros: pause,
    pauseBreakdownMicros: breakdown,
    attachStopMaxMicros: stat(w.map((x) => Math.max(...x.result.processes.map((p) => p.attachStopMicros ?? 0)))),
    attachStopSumMicros: stat(w.map((x) => x.result.processes.reduce((n, p) => n + (p.attachStopMicros ?? 0), 0))),
    faults: stat(w.map((x) => x.result.processes.reduce((n, p) => n + p.faults, 0))),
    loadavg1: stat(runs.map((r) => r.loadavg[0] ?? NaN)),
    protectWindowMillis: stat(w.map((x) => x.result.protectWindowMillis)),
    durationMillis: stat(w.map((x) => x.result.durationMillis)),
    wallMillis: stat(w.map((x) => x.wallMillis)),
    pagesSaved: stat(w.map((x) => x.result.pagesSaved)),
    sharedPagesAliased: stat(w.map((x) => x.result.shared.pagesAliased)),
    lostPages: w.map((x) => x.result.lostPages.reduce((n, l) => n + l.pages, 0)),
    forkSumMicros: forkSum,
    forkMaxMicros: forkMax,
    forkPerMemberMicros: stat(f.flatMap((x) => x.perMember.map((m) => m.forkMicros))),
    pauseOverForkSum: { ofMedians: ratioOf(pause, forkSum), runByRun: stat(runs.map((r) => r.wpsnap.result.pauseMicros / r.fork.sumMicros)) },
    pauseOverForkMax: { ofMedians: ratioOf(pause, forkMax), runByRun: stat(runs.map((r) => r.wpsnap.result.pauseMicros / r.fork.maxMicros)) },
    store:
      sizes.length === 0
        ? null
        : {
            bytesStored: stat(sizes.map((s) => s.bytesStored)),
            fileBytes: stat(sizes.map((s) => s.fileBytes)),
            referenceBytes: stat(sizes.map((s) => s.referenceBytes)),
            referenceDedupBytes: stat(sizes.map((s) => s.referenceDedupBytes)),
            sharedBytes: stat(sizes.map((s) => s.sharedBytes)),
            ratio: stat(sizes.map((s) => s.ratio)),
            ratioToDedup: stat(sizes.map((s) => s.bytesStored / s.referenceDedupBytes)),
            sharedRegions: sizes.map((s) => s.sharedRegions),
          },
    writers: {
      wpsnap: {
        maxGapMicros: stat(w.map((x) => x.writers.maxGapMicros)),
        maxWriteMicros: stat(w.map((x) => x.writers.maxWriteMicros)),
        slowWrites: stat(w.map((x) => x.writers.slowWrites)),
        worstSlowP99Micros: stat(w.map((x) => x.writers.worstSlowP99Micros)),
        maxLagMillis: stat(w.map((x) => x.writers.maxLagMillis)),
      },
      fork: {
        maxGapMicros: stat(f.map((x) => x.writers.maxGapMicros)),
        maxWriteMicros: stat(f.map((x) => x.writers.maxWriteMicros)),
        slowWrites: stat(f.map((x) => x.writers.slowWrites)),
        worstSlowP99Micros: stat(f.map((x) => x.writers.worstSlowP99Micros)),
        maxLagMillis: stat(f.map((x) => x.writers.maxLagMillis)),
      },
    },
  };
}

type Stat = ReturnType<typeof stat>;

function printSummary(g: ReturnType<typeof summarizeGroup>, runs: number, file: string | null): void {
  const fmt = (v: Stat, scale = 1, digits = 1): string => {
    if (v.median === null) return '-';
    const r = v.range === null ? '' : ` [${(v.range[0] / scale).toFixed(digits)}–${(v.range[1] / scale).toFixed(digits)}]`;
    return `${(v.median / scale).toFixed(digits)}${r}`;
  };
  const lines = [
    `process group, ${runs} runs: medians [ranges]`,
    `  group pause (wpsnap)               ${fmt(g.pauseMicros, 1000, 2)} ms   (goal ≤ 15 ms)`,
    `    breakdown, summed over members   ${Object.entries(g.pauseBreakdownMicros).map(([k, v]) => `${k} ${fmt(v, 1000, 2)}`).join(', ')}`,
    `  fork() of each member: sum         ${fmt(g.forkSumMicros, 1000, 2)} ms`,
    `                         max         ${fmt(g.forkMaxMicros, 1000, 2)} ms`,
    `  pause / fork sum                   ${g.pauseOverForkSum.ofMedians ?? '-'} of medians, ${fmt(g.pauseOverForkSum.runByRun, 1, 3)} run by run`,
    `  pause / fork max                   ${g.pauseOverForkMax.ofMedians ?? '-'} of medians, ${fmt(g.pauseOverForkMax.runByRun, 1, 3)} run by run`,
    `  members' attach stops before it    max ${fmt(g.attachStopMaxMicros, 1000, 2)} ms, sum ${fmt(g.attachStopSumMicros, 1000, 2)} ms (pre-protection)`,
    `  protection window                  ${fmt(g.protectWindowMillis, 1, 0)} ms, ${fmt(g.faults, 1, 0)} write faults`,
    `  snapshot duration                  ${fmt(g.durationMillis, 1, 0)} ms`,
    `  lost pages per run                 ${g.lostPages.join(', ')}`,
    `  load average (1 min) at run start  ${fmt(g.loadavg1, 1, 2)}`,
  ];
  if (g.store !== null) {
    lines.push(
      `  bytesStored                        ${fmt(g.store.bytesStored, 2 ** 20, 1)} MiB`,
      `  reference (shared once)            ${fmt(g.store.referenceBytes, 2 ** 20, 1)} MiB, shared region ${fmt(g.store.sharedBytes, 2 ** 20, 1)} MiB of it`,
      `  bytesStored / reference            ${fmt(g.store.ratio, 1, 4)}   (goal ≤ 1.05)`,
      `  bytesStored / deduped reference    ${fmt(g.store.ratioToDedup, 1, 4)}`,
      `  store file on disk                 ${fmt(g.store.fileBytes, 2 ** 20, 1)} MiB`,
    );
  }
  for (const who of ['wpsnap', 'fork'] as const) {
    const x = g.writers[who];
    lines.push(
      `  writers during ${who.padEnd(6)} max gap ${fmt(x.maxGapMicros, 1000, 1)} ms, max write ${fmt(x.maxWriteMicros, 1000, 1)} ms, writes ≥ 2 µs ${fmt(x.slowWrites, 1, 0)} (worst p99 ${fmt(x.worstSlowP99Micros, 1, 0)} µs)`,
    );
  }
  if (file !== null) lines.push(`  ${file}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export async function groupMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string' },
      mib: { type: 'string' },
      'shared-mib': { type: 'string' },
      members: { type: 'string' },
      rate: { type: 'string' },
      'fork-hold-ms': { type: 'string' },
      'settle-ms': { type: 'string' },
      warmup: { type: 'string' },
      'no-reference': { type: 'boolean' },
      'no-pre-protect': { type: 'boolean' },
      out: { type: 'string' },
      'no-write': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const int = (v: string | undefined, fallback: number, min = 1): number => {
    const n = v === undefined ? fallback : Number(v);
    if (!Number.isInteger(n) || n < min) throw new RangeError(`bad option value ${v}`);
    return n;
  };
  let o: typeof GROUP_DEFAULTS & { sharedMib: number };
  try {
    const mib = int(values.mib, GROUP_DEFAULTS.mib);
    o = {
      runs: int(values.runs, GROUP_DEFAULTS.runs),
      mib,
      sharedMib: int(values['shared-mib'], mib),
      members: int(values.members, GROUP_DEFAULTS.members),
      ratePagesPerSec: int(values.rate, GROUP_DEFAULTS.ratePagesPerSec),
      forkHoldMs: int(values['fork-hold-ms'], GROUP_DEFAULTS.forkHoldMs, 0),
      settleMs: int(values['settle-ms'], GROUP_DEFAULTS.settleMs, 0),
      warmup: int(values.warmup, GROUP_DEFAULTS.warmup, 0),
    };
  } catch {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const preProtect = values['no-pre-protect'] !== true;
  const startedAt = new Date().toISOString();
  const tree = await treeState();
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-group-run-'));
  process.env['WPSNAP_RUNTIME_DIR'] ??= join(dir, 'run');
  log(`groupbench: ${o.members} members × ${o.mib} MiB private + ${o.sharedMib} MiB shared, ${o.ratePagesPerSec} page writes/s each`);
  const fixture = await launchFixture(
    'groupbench',
    ['--members', String(o.members), '--mib', String(o.mib), '--shared-mib', String(o.sharedMib), '--rate', String(o.ratePagesPerSec), '--fork-hold-ms', String(o.forkHoldMs)],
    300_000,
  );
  const target = new GroupTarget(fixture, JSON.parse(fixture.readyLine) as Line);
  const runs: GroupRun[] = [];
  try {
    for (let i = 0; i < o.warmup; i++) {
      const warm = await measureWpsnap(target, `warmup-${i}`, false, preProtect);
      log(`warm-up ${i + 1}/${o.warmup}: pause ${(warm.result.pauseMicros / 1000).toFixed(2)} ms`);
      await sleep(o.settleMs);
    }
    for (let i = 0; i < o.runs; i++) {
      const order: GroupRun['order'] = i % 2 === 0 ? ['fork', 'wpsnap'] : ['wpsnap', 'fork'];
      const startLoad = loadavg().map((x) => round(x, 2) as number);
      let wpsnap: GroupRun['wpsnap'] | undefined;
      let fork: GroupRun['fork'] | undefined;
      for (const which of order) {
        if (which === 'fork') fork = await measureFork(target, o.forkHoldMs);
        else wpsnap = await measureWpsnap(target, `run-${i}`, !values['no-reference'], preProtect);
        await sleep(o.settleMs);
      }
      const run: GroupRun = { index: i, loadavg: startLoad, order, wpsnap: wpsnap!, fork: fork! };
      runs.push(run);
      log(
        `run ${i + 1}/${o.runs}: pause ${(run.wpsnap.result.pauseMicros / 1000).toFixed(2)} ms, fork sum ${(run.fork.sumMicros / 1000).toFixed(2)} ms / max ${(run.fork.maxMicros / 1000).toFixed(2)} ms` +
          (run.wpsnap.size ? `, stored/reference ${run.wpsnap.size.ratio.toFixed(4)}` : ''),
      );
    }
  } finally {
    target.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  const summary = summarizeGroup(runs);
  const doc = { scenario: 'group', startedAt, options: { ...o, preProtect }, machine: machineInfo(), tree, ready: target.ready, summary, runs };
  let file: string | null = null;
  if (!values['no-write']) {
    const stamp = startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    file = values.out ?? join(repoRoot(), 'bench', 'results', `group-${stamp}.json`);
    mkdirSync(join(file, '..'), { recursive: true });
    writeFileSync(file, `${JSON.stringify(doc)}\n`);
  }
  printSummary(summary, o.runs, file);
  return 0;
}
