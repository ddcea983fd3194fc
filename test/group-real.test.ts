// Group snapshots (issue 12) of real multi-process programs nobody here wrote,
// through the real CLI: a PostgreSQL server under pgbench (the postmaster, its
// auxiliary processes and one backend per client, all mapping the same big
// MAP_SHARED or SysV shared memory) and a prefork nginx (a master and 4 workers), by
// `--tree PID` and by `--cgroup DIR`.
//
// What a user must be able to rely on: every process of the tree is in the
// snapshot, nothing is lost (their shared memory is shared only inside the
// group), the shared memory is stored once and reads back the same in every
// member at T (a row inserted before T is there, one inserted after is not),
// and the programs go on serving while and after they are snapshotted.
//
// Each test prints its figures (pause, shared pages, pgbench tps before,
// during and after) with console.log: they are the numbers BENCHMARKS.md quotes.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HttpLoad, Nginx, NGINX_WORKERS, type HttpLoadResult } from '../fixtures/realprog/nginx.js';
import { alive, PgCluster, type PgbenchProgress, type PgbenchRun } from '../fixtures/realprog/postgres.js';
import type { RawManifest, RawManifestRegion } from '../snapshot-format/export-raw.js';
import { runCli } from './support/cli.js';
import { sleep } from './support/proc.js';
import { manifestRegions, offsetsOf, readManifest, regionAt } from './support/realprog/memory.js';

/** What `wpsnap snapshot` prints for a group (the GroupSnapshotResult). */
interface GroupJson {
  id: number;
  pauseMicros: number;
  pauseBreakdownMicros: Record<string, number>;
  durationMillis: number;
  protectWindowMillis: number;
  pagesSaved: number;
  zeroPages: number;
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  shared: { objects: number; pagesAliased: number };
  lostPages: Array<{ pid: number; address: string; pages: number; reason: string }>;
  warnings: string[];
  processes: Array<{
    pid: number;
    threads: number;
    pagesSaved: number;
    faults: number;
    lostPages: Array<{ address: string; pages: number; reason: string }>;
    exited: boolean;
    uffdMethod: string;
  }>;
}

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-group-real-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

async function cli<T>(argv: string[]): Promise<T> {
  const run = await runCli([...argv, '--json']);
  expect(run.code, `wpsnap ${argv.join(' ')}: ${run.stderr}`).toBe(0);
  return JSON.parse(run.stdout) as T;
}

/** Snapshots, timed from the test's side (the window in which the processes may be paused). */
async function snapshotGroup(args: string[], store: string): Promise<{ snap: GroupJson; began: number; ended: number }> {
  const began = Date.now();
  const snap = await cli<GroupJson>(['snapshot', ...args, '--store', store]);
  return { snap, began, ended: Date.now() };
}

function figures(label: string, s: GroupJson): void {
  const breakdown = Object.entries(s.pauseBreakdownMicros)
    .map(([k, v]) => `${k} ${(v / 1000).toFixed(1)}`)
    .join(', ');
  console.log(
    `[${label}] ${s.processes.length} processes, pause ${(s.pauseMicros / 1000).toFixed(1)} ms (${breakdown} ms), took ${s.durationMillis} ms, ` +
      `protect window ${s.protectWindowMillis} ms, ${s.pagesSaved} pages saved (${s.zeroPages} zero, ${s.pagesNew} new), ` +
      `${(s.bytesRaw / 2 ** 20).toFixed(1)} MiB raw, ${(s.bytesStored / 2 ** 20).toFixed(1)} MiB stored, shared ${JSON.stringify(s.shared)}, ` +
      `faults ${s.processes.map((p) => p.faults).join('/')}, lost ${JSON.stringify(s.lostPages)}, warnings ${JSON.stringify(s.warnings)}`,
  );
}

const sorted = (pids: number[]): number[] => [...pids].sort((a, b) => a - b);

/** Each lost range as "pid 0x.. +N pages REASON in PATH (PERMS)", the region's path from the raw export's manifest. */
function lostWhere(snap: GroupJson, manifest: RawManifest | null): string[] {
  return snap.processes.flatMap((p) =>
    p.lostPages.map((l) => {
      const region = manifest === null ? undefined : regionAt(manifestRegions(manifest, p.pid), BigInt(l.address));
      return `pid ${p.pid} ${l.address} +${l.pages} pages ${l.reason} in ${region ? `${region.start}-${region.end} ${region.path || '[anon]'} (${region.perms})` : 'no exported region'}`;
    }),
  );
}

/** Every member present, none exited, nothing lost (the failure message lists each lost range, its reason and region). */
function expectWholeGroup(snap: GroupJson, pids: number[], manifest: RawManifest | null): void {
  expect(sorted(snap.processes.map((p) => p.pid))).toEqual(sorted(pids));
  for (const p of snap.processes) {
    expect(p.exited, `member ${p.pid} exited`).toBe(false);
    expect(p.threads, `member ${p.pid}`).toBeGreaterThan(0);
  }
  const lost = lostWhere(snap, manifest);
  if (lost.length > 0) console.log(`lost pages:\n  ${lost.join('\n  ')}`);
  expect(lost, 'lost pages').toEqual([]);
  expect(snap.lostPages, 'lost pages (pid, address, pages, reason)').toEqual([]);
}

/** `show` lists every member of a complete snapshot, and `verify` checks every stored page of it. */
async function expectComplete(id: number, store: string, pids: number[]): Promise<void> {
  const shown = await cli<{ state: string; processes: Array<{ pid: number }> }>(['show', String(id), '--store', store]);
  expect(shown.state).toBe('complete');
  expect(sorted(shown.processes.map((p) => p.pid))).toEqual(sorted(pids));
  const verified = await cli<{ ok: boolean; state: string; pagesChecked: number; problems: string[] }>(['verify', String(id), '--store', store]);
  expect(verified.problems).toEqual([]);
  expect(verified).toMatchObject({ ok: true, state: 'complete' });
  expect(verified.pagesChecked).toBeGreaterThan(0);
}

/** The raw export's manifest (lost pages are checked by expectWholeGroup, with their regions). */
async function exportRaw(id: number, store: string, out: string): Promise<RawManifest> {
  const r = await cli<{ files: number; lostPages: number }>(['export', String(id), '--format', 'raw', '--out', out, '--store', store]);
  expect(r.files).toBeGreaterThan(0);
  return readManifest(out);
}

/** The member's one shared anonymous mapping (MAP_SHARED|MAP_ANONYMOUS shows as /dev/zero (deleted)) of at least `minBytes`. */
function sharedAnonRegion(regions: RawManifestRegion[], minBytes: number): RawManifestRegion {
  const candidates = regions.filter(
    (r) => r.perms.startsWith('rw') && r.perms[3] === 's' && /^\/dev\/zero|^\/SYSV|anon_inode/.test(r.path) && Number(BigInt(r.end) - BigInt(r.start)) >= minBytes,
  );
  expect(candidates.map((r) => `${r.start}-${r.end} ${r.path}`), 'shared anonymous mappings').toHaveLength(1);
  const region = candidates[0]!;
  expect(region.file, `${region.start}-${region.end} ${region.path} was not exported: ${region.skipReason ?? region.capture}`).not.toBeNull();
  return region;
}

/** sha256 of a region file and every offset of each needle in it (read in 16 MiB chunks that overlap by a needle). */
function scanRegionFile(file: string, needles: Buffer[]): { sha256: string; offsets: number[][] } {
  const hash = createHash('sha256');
  const offsets: number[][] = needles.map(() => []);
  const overlap = Math.max(...needles.map((n) => n.length)) - 1;
  const chunk = Buffer.alloc(16 << 20);
  const fd = openSync(file, 'r');
  try {
    let position = 0;
    let carried = Buffer.alloc(0);
    for (;;) {
      const n = readSync(fd, chunk, 0, chunk.length, position);
      if (n === 0) break;
      const fresh = chunk.subarray(0, n);
      hash.update(fresh);
      const window = Buffer.concat([carried, fresh]);
      const base = position - carried.length;
      needles.forEach((needle, i) => {
        for (const off of offsetsOf(window, needle)) if (!offsets[i]!.includes(base + off)) offsets[i]!.push(base + off);
      });
      carried = Buffer.from(window.subarray(Math.max(0, window.length - overlap)));
      position += n;
    }
  } finally {
    closeSync(fd);
  }
  return { sha256: hash.digest('hex'), offsets };
}

function sha256File(file: string): string {
  const hash = createHash('sha256');
  const chunk = Buffer.alloc(16 << 20);
  const fd = openSync(file, 'r');
  try {
    for (let position = 0, n = 0; (n = readSync(fd, chunk, 0, chunk.length, position)) > 0; position += n) hash.update(chunk.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

/**
 * Every shared mapping (rw-s: shared anonymous memory, SysV, POSIX shm) of
 * the first member is in every member at the same address, and reads back
 * byte-identical in each: one content at T, whichever member's view is read.
 */
function expectSharedMappingsAgree(out: string, manifest: RawManifest, pids: number[], label: string): void {
  const views = pids.map((pid) => {
    const shared = manifestRegions(manifest, pid).filter((r) => r.perms[3] === 's' && r.perms.startsWith('rw'));
    return { pid, byKey: new Map(shared.map((r) => [`${r.start}-${r.end} ${r.path}`, r])) };
  });
  const keys = [...views[0]!.byKey.keys()];
  console.log(`[${label}] shared mappings of every member: ${keys.join('; ')}`);
  expect(keys.length).toBeGreaterThan(0);
  for (const key of keys) {
    const hashes = views.map(({ pid, byKey }) => {
      const region = byKey.get(key);
      expect(region, `member ${pid} maps ${key}`).toBeDefined();
      expect(region!.file, `${key} of member ${pid} was not exported: ${region!.skipReason ?? region!.capture}`).not.toBeNull();
      return `${pid} ${sha256File(join(out, region!.file!))}`;
    });
    const first = hashes[0]!.split(' ')[1]!;
    expect(hashes, `${key}: each member's content at T`).toEqual(views.map(({ pid }) => `${pid} ${first}`));
  }
}

/** Mean tps of pgbench's progress lines wholly before `t`, overlapping [t, u], and wholly after `u`. */
function tpsAround(bench: PgbenchRun, t: number, u: number): { before: number; during: number; after: number; duringLines: number[] } {
  const mean = (xs: number[]): number => (xs.length === 0 ? Number.NaN : xs.reduce((a, b) => a + b, 0) / xs.length);
  const lineEnd = (p: PgbenchProgress): number => bench.lineStart(p) + 1000;
  const before = bench.progress.filter((p) => lineEnd(p) < t).map((p) => p.tps);
  const during = bench.progress.filter((p) => lineEnd(p) >= t && bench.lineStart(p) <= u).map((p) => p.tps);
  const after = bench.progress.filter((p) => bench.lineStart(p) > u).map((p) => p.tps);
  return { before: mean(before), during: mean(during), after: mean(after), duringLines: during };
}

// PostgreSQL's main shared memory is MAP_SHARED|MAP_ANONYMOUS by default ("/dev/zero (deleted)"); with
// shared_memory_type=sysv it is one big SysV segment, which a single-process snapshot can only list lost.
const PG_VARIANTS: Array<{ label: string; memory: string; settings: Record<string, string> }> = [
  { label: 'postgres', memory: 'mmap', settings: {} },
  { label: 'postgres-sysv', memory: 'sysv', settings: { shared_memory_type: 'sysv' } },
];
describe.each(PG_VARIANTS)('PostgreSQL under pgbench, shared memory $memory: the postmaster tree at one instant', ({ label, settings }) => {
  let pg: PgCluster | undefined;
  const store = (): string => join(root, `${label}.db`);

  beforeAll(async () => {
    pg = PgCluster.start({ sharedBuffers: '128MB', settings });
    // Scale 5 (~75 MB) fits in 128 MB of shared buffers whole: no page the test inserts into is evicted before T.
    await pg.initPgbench(5);
    pg.psql('CREATE TABLE wpsnap_markers (id serial PRIMARY KEY, note text NOT NULL)');
  }, 120_000);

  afterAll(async () => {
    await pg?.destroy();
  }, 60_000);

  it('captures every backend with the shared buffers stored once, row A (before T) in every member and row B (after T) in none', async () => {
    const server = pg!;
    const markerA = `wpsnap-group-A-${randomBytes(12).toString('hex')}`;
    const markerB = `wpsnap-group-B-${randomBytes(12).toString('hex')}`;
    // Runs until stopped, however long the snapshot takes: its progress lines (-P 1) are the record.
    const bench = server.pgbench(['-c', '4', '-j', '2', '-T', '600', '-P', '1']);
    try {
      await bench.progressLines(4);
      // Its own session, ended (and its backend gone) before T: the tree is the postmaster, its auxiliary processes and pgbench's 4 backends.
      await server.psqlAndWaitBackendGone(`INSERT INTO wpsnap_markers (note) VALUES ('${markerA}')`);
      const treeBefore = server.tree();
      expect(treeBefore.length, `postmaster tree ${treeBefore.join(' ')}`).toBeGreaterThanOrEqual(1 + 3 + 4);

      const { snap, began, ended } = await snapshotGroup(['--tree', String(server.pid)], store());
      await server.psqlAndWaitBackendGone(`INSERT INTO wpsnap_markers (note) VALUES ('${markerB}')`);
      const treeAfter = server.tree();
      figures(label, snap);
      const out = join(root, `${label}-export`);
      const manifest = await exportRaw(snap.id, store(), out);

      expectWholeGroup(snap, treeBefore, manifest);
      expect(sorted(treeAfter), 'the server kept every process').toEqual(sorted(treeBefore));
      await expectComplete(snap.id, store(), treeBefore);

      // The server answers, with both rows, and pgbench ran on through the snapshot and after it without a failure.
      expect(server.psql('SELECT note FROM wpsnap_markers ORDER BY id').split('\n')).toEqual([markerA, markerB]);
      await bench.progressLines(3, ended);
      const run = await bench.stop();
      const tps = tpsAround(bench, began, ended);
      console.log(
        `[${label}] pgbench -c 4 -j 2 -P 1 (scale 5): tps before ${tps.before.toFixed(0)}, during the snapshot's ${ended - began} ms ` +
          `${tps.during.toFixed(0)} (worst second ${Math.min(...tps.duringLines).toFixed(0)}, ${tps.duringLines.filter((t) => t < tps.before / 10).length} seconds under a tenth of before), ` +
          `after ${tps.after.toFixed(0)}; ` +
          `per second (the second's start, s from the snapshot's start: tps): ${run.progress.map((p) => `${((bench.lineStart(p) - began) / 1000).toFixed(0)}:${p.tps.toFixed(0)}`).join(' ')}`,
      );
      expect(run.stderr.split('\n').filter((l) => l.length > 0 && !l.startsWith('progress: ') && l !== 'starting vacuum...end.'), 'pgbench errors').toEqual([]);
      expect(run.progress.filter((p) => p.failed > 0), 'progress lines with failed transactions').toEqual([]);
      expect(tps.during, 'pgbench tps while the snapshot ran').toBeGreaterThan(0);
      expect(tps.after, 'pgbench tps after the snapshot').toBeGreaterThan(0);

      // Each member's shared memory at T, from the raw export: the same address, byte-identical, row A there at the same offsets, row B nowhere.
      const needles = [Buffer.from(markerA), Buffer.from(markerB)];
      const scans = treeBefore.map((pid) => {
        const region = sharedAnonRegion(manifestRegions(manifest, pid), 64 << 20);
        return { pid, region, ...scanRegionFile(join(out, region.file!), needles) };
      });
      const first = scans[0]!;
      const sharedBytes = Number(BigInt(first.region.end) - BigInt(first.region.start));
      console.log(
        `[${label}] shared memory ${first.region.start}-${first.region.end} ${first.region.path} (${(sharedBytes / 2 ** 20).toFixed(0)} MiB): ` +
          `row A at offsets ${first.offsets[0]!.map((o) => '0x' + o.toString(16)).join(' ')}`,
      );
      for (const s of scans) {
        expect(`${s.pid} ${s.region.start}-${s.region.end}`).toBe(`${s.pid} ${first.region.start}-${first.region.end}`);
        expect(s.offsets[0]!.length, `row A in ${s.pid}'s shared memory`).toBeGreaterThan(0);
        expect(s.offsets[0], `row A's offsets in ${s.pid}`).toEqual(first.offsets[0]);
        expect(s.offsets[1], `row B in ${s.pid}'s shared memory`).toEqual([]);
        expect(s.sha256, `${s.pid}'s shared memory differs from ${first.pid}'s`).toBe(first.sha256);
      }

      expectSharedMappingsAgree(out, manifest, treeBefore, label);

      // Stored once: aliased for every member, the store holding far less than a copy per member.
      expect(snap.shared.objects).toBeGreaterThan(0);
      expect(snap.shared.pagesAliased).toBeGreaterThan(0);
      expect(snap.bytesStored).toBeLessThan(2 * sharedBytes);
      expect(snap.bytesStored).toBeLessThan((treeBefore.length * sharedBytes) / 4);
    } finally {
      bench.kill();
    }
  }, 300_000);
});

describe('nginx prefork (a master and 4 workers) under HTTP load', () => {
  let nginx: Nginx | undefined;
  let cgroup: { dir: string; original: Map<number, string>; mount: string } | undefined;
  const store = (): string => join(root, 'nginx.db');

  beforeAll(async () => {
    nginx = await Nginx.start();
  }, 60_000);

  afterAll(async () => {
    try {
      if (cgroup) leaveCgroup(cgroup);
    } finally {
      await nginx?.destroy();
    }
  }, 60_000);

  /** The load's requests, checked: none failed, some ended while the snapshot ran or just after, some after it. */
  function expectServed(load: HttpLoadResult, began: number, ended: number, label: string): void {
    const during = load.endedAt.filter((t) => t >= began && t <= ended).length;
    const after = load.endedAt.filter((t) => t > ended).length;
    console.log(`[${label}] HTTP: ${load.ok} requests ok, ${load.failed} failed, ${during} ended during the snapshot's ${ended - began} ms, ${after} after; max latency ${load.maxLatencyMillis} ms`);
    expect(load.errors).toEqual([]);
    expect(load.failed).toBe(0);
    expect(during, 'requests served while the snapshot ran').toBeGreaterThan(0);
    expect(after, 'requests served after the snapshot').toBeGreaterThan(0);
  }

  /** nginx's shared zone (its accept mutex and stub_status counters) at T: one address, the same bytes in every member. */
  function expectSharedZoneAliased(out: string, manifest: RawManifest, pids: number[]): void {
    const zones = pids.map((pid) => {
      const region = sharedAnonRegion(manifestRegions(manifest, pid), 4096);
      return { pid, range: `${region.start}-${region.end}`, bytes: readFileSync(join(out, region.file!)) };
    });
    for (const z of zones) {
      expect(z.range, `member ${z.pid}`).toBe(zones[0]!.range);
      expect(z.bytes.equals(zones[0]!.bytes), `member ${z.pid}'s shared zone differs from ${zones[0]!.pid}'s`).toBe(true);
    }
    expect(zones[0]!.bytes.some((b) => b !== 0), 'the shared zone holds counters').toBe(true);
  }

  it('--tree: the master and every worker, nothing lost, serving throughout', async () => {
    const server = nginx!;
    const load = new HttpLoad(server.url, server.body, 4);
    try {
      await load.started;
      await sleep(1000);
      const treeBefore = server.tree();
      expect(treeBefore).toHaveLength(1 + NGINX_WORKERS);
      const { snap, began, ended } = await snapshotGroup(['--tree', String(server.pid)], store());
      await sleep(1000);
      const served = await load.stop();
      figures('nginx --tree', snap);
      const out = join(root, 'nginx-tree-export');
      const manifest = await exportRaw(snap.id, store(), out);
      expectWholeGroup(snap, treeBefore, manifest);
      expect(sorted(server.tree())).toEqual(sorted(treeBefore));
      await expectComplete(snap.id, store(), treeBefore);
      expectServed(served, began, ended, 'nginx --tree');
      expect(snap.shared.pagesAliased).toBeGreaterThan(0);
      expectSharedZoneAliased(out, manifest, treeBefore);
      expectSharedMappingsAgree(out, manifest, treeBefore, 'nginx --tree');
      expect((await fetch(server.url)).status).toBe(200);
    } finally {
      load.kill();
    }
  }, 120_000);

  it('--cgroup DIR: the same processes as the tree, from a fresh cgroup v2', async () => {
    const server = nginx!;
    const pids = server.tree();
    cgroup = enterCgroup(pids);
    expect(sorted(cgroupProcs(cgroup.dir))).toEqual(sorted(pids));
    const load = new HttpLoad(server.url, server.body, 4);
    try {
      await load.started;
      await sleep(500);
      const { snap, began, ended } = await snapshotGroup(['--cgroup', cgroup.dir], store());
      await sleep(1000);
      const served = await load.stop();
      figures('nginx --cgroup', snap);
      const out = join(root, 'nginx-cgroup-export');
      const manifest = await exportRaw(snap.id, store(), out);
      expectWholeGroup(snap, pids, manifest);
      await expectComplete(snap.id, store(), pids);
      expectServed(served, began, ended, 'nginx --cgroup');
      expectSharedZoneAliased(out, manifest, pids);
      expectSharedMappingsAgree(out, manifest, pids, 'nginx --cgroup');
    } finally {
      load.kill();
    }
  }, 120_000);
});

/** Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host like this one. */
function cgroup2Mount(): string {
  const line = readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .find((l) => l.split(' ')[2] === 'cgroup2');
  if (line === undefined) throw new Error('no cgroup v2 hierarchy is mounted');
  return line.split(' ')[1]!;
}

function cgroupProcs(dir: string): number[] {
  return readFileSync(join(dir, 'cgroup.procs'), 'utf8')
    .split('\n')
    .filter((l) => l.length > 0)
    .map(Number);
}

/** A fresh cgroup wpsnap-test-<our pid> holding `pids`, each one's v2 cgroup remembered to move it back. */
function enterCgroup(pids: number[]): { dir: string; original: Map<number, string>; mount: string } {
  const mount = cgroup2Mount();
  const dir = join(mount, `wpsnap-test-${process.pid}`);
  mkdirSync(dir);
  const original = new Map<number, string>();
  const entered = { dir, original, mount };
  try {
    for (const pid of pids) {
      const v2 = readFileSync(`/proc/${pid}/cgroup`, 'utf8')
        .split('\n')
        .find((l) => l.startsWith('0::'));
      original.set(pid, v2 === undefined ? '/' : v2.slice(3));
      writeFileSync(join(dir, 'cgroup.procs'), `${pid}\n`);
    }
  } catch (err) {
    leaveCgroup(entered);
    throw err;
  }
  return entered;
}

/** Moves the processes still there back where they were, and removes the cgroup. */
function leaveCgroup({ dir, original, mount }: { dir: string; original: Map<number, string>; mount: string }): void {
  if (!existsSync(dir)) return;
  for (const pid of cgroupProcs(dir)) {
    if (!alive(pid)) continue;
    writeFileSync(join(mount, original.get(pid) ?? '/', 'cgroup.procs'), `${pid}\n`);
  }
  rmdirSync(dir);
}
