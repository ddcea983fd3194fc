// The target barely notices (issue 9), against the real kernel: the pause
// protects only what the target wrote since its pre-protection (and falls back
// to everything when it writes faster than that converges), pages wait for the
// store in a private staging area (memory, then an unlinked spill file) so the
// protection ends with the copying, and the store runs at idle priority while
// the engine's threads do not. Exactness is checked page by page against the
// pagewriter oracle in every case.
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { snapshotProcess, type SnapshotResult } from '../core/snapshot.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { checkSnapshot, parseLayout, type PagewriterLayout } from '../fixtures/oracle.js';
import { Store } from '../store/store.js';
import { CLI_JS, runCliProcess } from './support/cli.js';
import { sleep, untraced } from './support/proc.js';

const binding = loadBinding();
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-impact-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

async function pagewriter(args: string[]): Promise<{ fixture: LaunchedFixture; layout: PagewriterLayout }> {
  const fixture = await launchFixture('pagewriter', args);
  return { fixture, layout: parseLayout(fixture.readyLine) };
}

/** Every page of the writers and of the untouched region is its content at T. */
function expectExact(storePath: string, id: number, layout: PagewriterLayout): void {
  const store = Store.open(storePath, { readonly: true });
  try {
    const processId = store.processes(id)[0]!.processId;
    const report = checkSnapshot(layout, (address) => store.readPage(processId, address));
    expect(report.mismatches).toEqual([]);
    expect(report.pagesChecked).toBe(layout.writers.reduce((n, w) => n + w.pages, 0) + layout.untouched.bytes / 4096);
  } finally {
    void store.close();
  }
}

const WRITER_64MIB = ['--threads', '2', '--pages', '8192', '--memfd-pages', '2048', '--kernel-pages', '256', '--untouched-mib', '64'];

describe('pre-protection: the pause protects what was written since', () => {
  it('a writer rewriting everything at full speed: the rounds do not converge, the pause protects everything, every page exact', async () => {
    const path = join(dir, 'full-speed.db');
    const store = Store.open(path);
    const { fixture, layout } = await pagewriter(WRITER_64MIB);
    let result: SnapshotResult;
    try {
      await sleep(200);
      result = await snapshotProcess(binding, store, fixture.pid);
    } finally {
      fixture.kill();
      await store.close();
    }
    expect(result.lostPages).toEqual([]);
    expect(result.preProtection).not.toBeNull();
    expect(result.preProtection!.rounds.length).toBeGreaterThan(0);
    // Two stops, and pauseMicros is the longer.
    expect(result.stops.attach).toBeGreaterThan(0);
    expect(result.pauseMicros).toBe(Math.max(result.stops.attach!, result.stops.instant));
    expectExact(path, result.id, layout);
  });

  it('a slow writer: the pause protects only the ranges written since the last round, every page exact', async () => {
    const path = join(dir, 'slow.db');
    const store = Store.open(path);
    // No memfd: a write to shared memory after T changes its file's times, and its unsaved pages are then lost (test/races.test.ts).
    // 2 × 512 pages filled in a quarter second, then rewritten 2000 times a second. Its mappings
    // merge into one with the untouched one: 1 MiB keeps it dense (pre-protected), not sparse.
    const { fixture, layout } = await pagewriter(['--threads', '2', '--pages', '512', '--memfd-pages', '0', '--kernel-pages', '0', '--untouched-mib', '1', '--rate', '2000']);
    let result: SnapshotResult;
    try {
      await sleep(600);
      result = await snapshotProcess(binding, store, fixture.pid, { preProtectHoldMillis: 200 });
    } finally {
      fixture.kill();
      await store.close();
    }
    expect(result.lostPages).toEqual([]);
    const pre = result.preProtection!;
    console.log(`[slow writer] pre-protection ${JSON.stringify(pre)}, stops ${JSON.stringify(result.stops)}`);
    // Written during the hold: faults let through, protected again in a round.
    expect(pre.faults).toBeGreaterThan(0);
    expect(pre.rounds[0]).toBeGreaterThan(0);
    // 4000 steps a second cannot have written thousands of ranges since: no fallback.
    expect(pre.writtenAtInstant).toBeGreaterThanOrEqual(0);
    expect(pre.writtenAtInstant).toBeLessThan(4096);
    expectExact(path, result.id, layout);
  });

  it('--no-pre-protect: one stop, everything protected in it, every page exact', async () => {
    const path = join(dir, 'no-pre.db');
    const { fixture, layout } = await pagewriter(WRITER_64MIB);
    try {
      await sleep(200);
      const r = await runCliProcess(['snapshot', String(fixture.pid), '--store', path, '--json', '--no-pre-protect']);
      expect(r.stderr).toBe('');
      const doc = JSON.parse(r.stdout) as SnapshotResult;
      expect(doc.preProtection).toBeNull();
      expect(doc.stops.attach).toBeNull();
      expect(doc.pauseMicros).toBe(doc.stops.instant);
      expectExact(path, doc.id, layout);
    } finally {
      fixture.kill();
    }
  });
});

/** A thread's scheduling policy (0 SCHED_OTHER, 5 SCHED_IDLE) and nice, from /proc/PID/task/TID/stat. */
function threadSched(pid: number, tid: number): { comm: string; policy: number; nice: number } | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields[0] is field 3 (state)
  return { comm, policy: Number(fields[38]), nice: Number(fields[16]) };
}

interface Watched {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Per poll: every thread's comm, policy and nice. */
  threads: Array<{ tid: number; comm: string; policy: number; nice: number }>;
  /** Staging directories seen, with their mode, and the modes of the wpsnap process's fds into them. */
  stagingDirModes: Map<string, number>;
  spillFdModes: number[];
  spillFdTargets: string[];
}

/** Run the CLI under umask 000 and watch its threads and its staging while it runs. */
function watchCli(argv: string[], stagingParent: string): Promise<Watched> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', 'umask 000; exec "$0" "$@"', process.execPath, CLI_JS, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
    const watched: Watched = { code: null, stdout: '', stderr: '', threads: [], stagingDirModes: new Map(), spillFdModes: [], spillFdTargets: [] };
    child.stdout.on('data', (d: Buffer) => (watched.stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (watched.stderr += d.toString()));
    const pid = child.pid!;
    const poll = setInterval(() => {
      try {
        for (const name of readdirSync(`/proc/${pid}/task`)) {
          const s = threadSched(pid, Number(name));
          if (s) watched.threads.push({ tid: Number(name), ...s });
        }
        for (const name of readdirSync(stagingParent)) {
          if (name.startsWith('wpsnap-staging-')) watched.stagingDirModes.set(name, statSync(join(stagingParent, name)).mode & 0o777);
        }
        for (const fd of readdirSync(`/proc/${pid}/fd`)) {
          const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
          if (target.includes('wpsnap-staging-')) {
            watched.spillFdTargets.push(target);
            watched.spillFdModes.push(statSync(`/proc/${pid}/fd/${fd}`).mode & 0o777);
          }
        }
      } catch {
        // the process or the file went away between two reads
      }
    }, 15);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`wpsnap ${argv.join(' ')} timed out`));
    }, 120_000);
    child.on('close', (code) => {
      clearInterval(poll);
      clearTimeout(timer);
      watched.code = code;
      resolve(watched);
    });
  });
}

describe('staging: copied pages wait for the store in private memory and an unlinked spill file', () => {
  it('spills beyond a small pool under umask 000: the directory 0700, the file 0600 and unlinked, both gone after; every page exact', async () => {
    const path = join(dir, 'spill.db');
    const staging = join(dir, 'staging-spill');
    mkdirSync(staging);
    const { fixture, layout } = await pagewriter(WRITER_64MIB);
    let doc: SnapshotResult;
    let watched: Watched;
    try {
      await sleep(200);
      // A pool of 8 batches (16 MiB) for ~50 MiB of pages, the store at normal priority.
      watched = await watchCli(['snapshot', String(fixture.pid), '--store', path, '--json', '--staging-dir', staging, '--staging-memory', '16'], staging);
      expect(watched.stderr).toBe('');
      expect(watched.code).toBe(0);
      doc = JSON.parse(watched.stdout) as SnapshotResult;
    } finally {
      fixture.kill();
    }
    expect(doc.engine.spilledBatches).toBeGreaterThan(0);
    expect(doc.staging.spillBytesPeak).toBeGreaterThan(0);
    expect(doc.stagingBytesPeak).toBeGreaterThanOrEqual(doc.staging.spillBytesPeak);
    expect(doc.staging.fallback).toBeNull();
    expect(doc.staging.spillDir).toMatch(new RegExp(`^${staging}/wpsnap-staging-\\d+-[0-9a-f]+$`));
    // Seen while it ran: the directory exactly 0700, the spill file exactly 0600 and never named.
    expect([...watched.stagingDirModes.values()]).toEqual([0o700]);
    expect(watched.spillFdModes.length).toBeGreaterThan(0);
    expect(new Set(watched.spillFdModes)).toEqual(new Set([0o600]));
    for (const target of watched.spillFdTargets) expect(target).toMatch(/\(deleted\)$/);
    expect(readdirSync(staging)).toEqual([]);
    expectExact(path, doc.id, layout);
  });

  it('a staging directory that fills up: spilling stops, the pool alone goes on, the snapshot says so and is exact', async () => {
    const path = join(dir, 'full.db');
    const tiny = join(dir, 'tiny');
    mkdirSync(tiny);
    const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m,mode=0700', 'tmpfs', tiny]);
    expect(mount.status, mount.stderr?.toString()).toBe(0);
    const { fixture, layout } = await pagewriter(WRITER_64MIB);
    try {
      await sleep(200);
      // --staging-max beyond what the filesystem holds: the disk fills before the limit.
      const r = await runCliProcess(['snapshot', String(fixture.pid), '--store', path, '--json', '--staging-dir', tiny, '--staging-memory', '16', '--staging-max', '64']);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const doc = JSON.parse(r.stdout) as SnapshotResult;
      expect(doc.staging.fallback).toMatch(/^the spill file could not grow beyond \d+ MiB \(ENOSPC: .*\): the rest waited in the memory pool$/);
      expect(doc.lostPages).toEqual([]);
      expectExact(path, doc.id, layout);
      const human = await runCliProcess(['snapshot', String(fixture.pid), '--store', path, '--staging-dir', tiny, '--staging-memory', '16', '--staging-max', '64']);
      expect(human.code, human.stderr).toBe(0);
      expect(human.stdout).toMatch(/staging fell back to memory: the spill file could not grow beyond/);
      expect(readdirSync(tiny)).toEqual([]);
    } finally {
      fixture.kill();
      spawnSync('umount', [tiny]);
    }
  });

  it('a staging directory that does not exist: one line, exit 2, the target untouched', async () => {
    const { fixture } = await pagewriter(['--threads', '1', '--pages', '64', '--memfd-pages', '0', '--kernel-pages', '0']);
    try {
      const r = await runCliProcess(['snapshot', String(fixture.pid), '--store', join(dir, 'nodir.db'), '--staging-dir', join(dir, 'no', 'such')]);
      expect(r.code).toBe(2);
      expect(r.stderr).toBe(`wpsnap: staging directory ${join(dir, 'no', 'such')} does not exist or is not a directory\n`);
    } finally {
      fixture.kill();
    }
  });

  it('killed while spilling: only an empty private directory is left, and the next snapshot there removes it', async () => {
    const path = join(dir, 'crash.db');
    const staging = join(dir, 'staging-crash');
    mkdirSync(staging);
    const { fixture } = await pagewriter(WRITER_64MIB);
    try {
      await sleep(200);
      const killed = await runCliProcess(['snapshot', String(fixture.pid), '--store', path, '--staging-dir', staging, '--staging-memory', '16'], { WPSNAP_FAULT: 'mid-spill' });
      expect(killed.signal).toBe('SIGKILL');
      await untraced(fixture.pid);
      const left = readdirSync(staging);
      expect(left).toHaveLength(1);
      expect(left[0]).toMatch(/^wpsnap-staging-\d+-[0-9a-f]+$/);
      expect(readdirSync(join(staging, left[0]!))).toEqual([]); // the spill file had no name
      expect(statSync(join(staging, left[0]!)).mode & 0o777).toBe(0o700);
      const next = await runCliProcess(['snapshot', String(fixture.pid), '--store', path, '--staging-dir', staging]);
      expect(next.code).toBe(0);
      expect(readdirSync(staging)).toEqual([]);
    } finally {
      fixture.kill();
    }
  });
});

describe("the store's priority", () => {
  const SCHED_OTHER = 0;
  const SCHED_IDLE = 5;

  async function threadsDuring(priority: string): Promise<{ threads: Watched['threads']; doc: SnapshotResult }> {
    const staging = join(dir, `staging-${priority}`);
    mkdirSync(staging, { recursive: true });
    // Rate-limited: a target using both CPUs would leave an idle store nothing.
    const { fixture } = await pagewriter([...WRITER_64MIB, '--rate', '20000']);
    try {
      await sleep(200);
      const watched = await watchCli(
        ['snapshot', String(fixture.pid), '--store', join(dir, `priority-${priority}.db`), '--json', '--priority', priority, '--staging-dir', staging],
        staging,
      );
      expect(watched.stderr).toBe('');
      return { threads: watched.threads, doc: JSON.parse(watched.stdout) as SnapshotResult };
    } finally {
      fixture.kill();
    }
  }

  it('idle (the default): the store threads run SCHED_IDLE; the engine (nice -10 for faults, 0 for the sweep) and the stager (nice 0) never do', async () => {
    const { threads, doc } = await threadsDuring('idle');
    expect(doc.priority).toBe('idle');
    const engine = threads.filter((t) => t.comm === 'wpsnap-engine');
    const stager = threads.filter((t) => t.comm === 'wpsnap-stager');
    expect(engine.length).toBeGreaterThan(0);
    expect(stager.length).toBeGreaterThan(0);
    for (const t of engine) {
      expect(t.policy).toBe(SCHED_OTHER);
      expect([-10, 0]).toContain(t.nice);
    }
    expect(engine.some((t) => t.nice === -10)).toBe(true);
    for (const t of stager) expect(t).toMatchObject({ policy: SCHED_OTHER, nice: 0 });
    // The main thread (SQLite) and the page workers (hashing, zstd) are node threads.
    expect(threads.some((t) => t.comm === 'node' && t.policy === SCHED_IDLE)).toBe(true);
    for (const key of ['before', 'window', 'compressing'] as const) {
      expect(doc.targetCpu[key]).toBeGreaterThanOrEqual(0);
      expect(doc.targetCpu[key]).toBeLessThanOrEqual(4);
    }
  });

  it('nice: nice 19, never SCHED_IDLE; normal: neither', async () => {
    const nice = await threadsDuring('nice');
    expect(nice.threads.some((t) => t.policy === SCHED_IDLE)).toBe(false);
    expect(nice.threads.some((t) => t.comm === 'node' && t.nice === 19)).toBe(true);
    const normal = await threadsDuring('normal');
    expect(normal.threads.some((t) => t.policy === SCHED_IDLE || t.nice === 19)).toBe(false);
  });
});
