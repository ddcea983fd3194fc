// Group snapshots against the real kernel: a tree of processes (fixtures/grouptree.c)
// whose writers overwrite private and shared memory (memfd, SysV, shared
// anonymous) at full speed, snapshotted at one instant, every page of every
// member checked by fixtures/group-oracle.ts from the counters in the snapshot.
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { FAULT_POINTS } from '../core/fault.js';
import { snapshotGroup, type GroupSnapshotResult } from '../core/group.js';
import { checkGroup, formatMismatches, parseGroupLayout, procMemSource, rawExportSource, regionsOf, storeSource, withForkedChild, type GroupLayout, type GroupReport } from '../fixtures/group-oracle.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { Store } from '../store/store.js';
import { runCli, runCliProcess } from './support/cli.js';
import { sleep, uffdWpPages, untraced } from './support/proc.js';

// ---------------------------------------------------------------- the tree

const binding = loadBinding();
let dir: string;
const trees: LaunchedFixture[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-group-'));
});
afterEach(() => {
  // The fixture's pid only; its workers die with it (PR_SET_PDEATHSIG).
  for (const t of trees.splice(0)) t.kill('SIGKILL');
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

interface Tree {
  fixture: LaunchedFixture;
  layout: GroupLayout;
  pids: number[];
}

/** Started for one test (ended after it), or for a whole describe (`perTest` false: its afterAll ends it). */
async function startTree(args: string[], perTest = true): Promise<Tree> {
  const fixture = await launchFixture('grouptree', args);
  if (perTest) trees.push(fixture);
  const layout = parseGroupLayout(JSON.parse(fixture.readyLine) as Record<string, unknown>);
  return { fixture, layout, pids: layout.processes.map((p) => p.pid) };
}

/** SIGTERM to the parent; its done line: every writer's self-check and every worker's exit. */
async function stopTree(tree: Tree): Promise<{ errors: number; workers: Array<{ pid: number; exitCode: number; signal: number }> }> {
  tree.fixture.kill('SIGTERM');
  for (;;) {
    const line = await tree.fixture.nextLine();
    if (line === null) throw new Error('grouptree exited without a done line');
    const json = JSON.parse(line) as Record<string, unknown>;
    if (json['done'] === true) return json as unknown as { errors: number; workers: Array<{ pid: number; exitCode: number; signal: number }> };
  }
}

function liveCounters(layout: GroupLayout): bigint[] {
  return layout.writers.map((w) => {
    const owner = layout.processes.find((p) => p.slot === w.slot)!;
    return binding.processVmRead(owner.pid, w.counter, 8).readBigUInt64LE(0);
  });
}

/** Until every writer has gone round all its pages once (no page of the tree is still zero). */
async function writtenOnce(layout: GroupLayout, pids = layout.processes.map((p) => p.pid)): Promise<void> {
  const writers = layout.writers.filter((w) => pids.includes(layout.processes.find((p) => p.slot === w.slot)?.pid ?? -1));
  for (let waited = 0; ; waited += 20) {
    const counters = liveCounters({ ...layout, writers });
    if (writers.every((w, i) => counters[i]! > BigInt(w.pages))) return;
    if (waited > 20_000) throw new Error(`writers still short of one round after 20 s: ${counters.join(', ')}`);
    await sleep(20);
  }
}

function threadStates(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  });
}

/** Pages of the tree: private written by their writer, shared once each. */
function treePages(layout: GroupLayout): { privatePages: number; sharedPages: number } {
  const privatePages = layout.writers.reduce((n, w) => n + w.segments.filter((s) => s.region === 'private').reduce((m, s) => m + s.pages, 0), 0);
  const sharedPages = layout.shared.memfd.pages + layout.shared.sysv.pages + layout.shared.shanon.pages;
  return { privatePages, sharedPages };
}

function expectExact(report: GroupReport, layout: GroupLayout, members: number): void {
  expect(formatMismatches(report), 'pages that differ from the oracle').toEqual([]);
  expect(report.mismatches).toEqual([]);
  expect(report.lost).toEqual([]);
  expect(report.unverifiedWriters).toEqual([]);
  const { privatePages, sharedPages } = treePages(layout);
  // Every private page once, every shared page in every member that maps it.
  expect(report.pagesChecked).toBe(privatePages + sharedPages * members);
  expect(report.sharedCopiesCompared).toBe(sharedPages * (members - 1));
  expect(report.midWritePages).toBeLessThanOrEqual(layout.writers.length);
}

async function readStore(path: string, id: number, layout: GroupLayout): Promise<GroupReport> {
  const store = Store.open(path, { readonly: true });
  try {
    return checkGroup(layout, storeSource(store, id));
  } finally {
    await store.close();
  }
}

/** 5000 steps a second per writer: every page rewritten about every 0.3 s, with CPU left for wpsnap. */
const PACED = ['--rate', '5000'];
const SMALL = ['--workers', '3', '--threads', '2', '--private-pages', '1024', '--memfd-pages', '2048', '--sysv-pages', '256', '--shanon-pages', '512'];

// ---------------------------------------------------------------- the fixture and its oracle, without wpsnap

describe('grouptree and its oracle', () => {
  it.each(['keep', 'close'])('the live tree, stopped, matches the oracle exactly (memfd fd %s)', async (mode) => {
    const tree = await startTree([...SMALL, '--memfd-fd', mode, '--self-check']);
    expect(tree.pids).toHaveLength(4);
    await writtenOnce(tree.layout);
    for (const pid of tree.pids) process.kill(pid, 'SIGSTOP');
    try {
      for (const pid of tree.pids) {
        for (let waited = 0; !threadStates(pid).every((s) => s === 'T'); waited += 5) {
          if (waited > 5000) throw new Error(`pid ${pid} not stopped: ${threadStates(pid).join('')}`);
          await sleep(5);
        }
      }
      const live = procMemSource(tree.pids);
      try {
        expectExact(checkGroup(tree.layout, live), tree.layout, 4);
        // Every writer went round its pages at least once: no page is still zero.
        const counters = liveCounters(tree.layout);
        tree.layout.writers.forEach((w, i) => expect(counters[i]!).toBeGreaterThan(BigInt(w.pages)));
        // One copy of a shared page that differs is caught: the oracle is not blind.
        const victim = tree.layout.processes[2]!;
        const tampered = checkGroup(tree.layout, {
          ...live,
          readPage: (pid, address) => {
            const data = live.readPage(pid, address);
            if (pid === victim.pid && address === victim.shared.sysv) data[100]! ^= 1;
            return data;
          },
        });
        expect(tampered.mismatches.map((m) => [m.pid, m.address])).toEqual([[victim.pid, victim.shared.sysv]]);
      } finally {
        live.close();
      }
      const parent = tree.layout.processes[0]!;
      if (mode === 'keep') expect(tree.layout.processes[1]!.shared.memfd).not.toBe(parent.shared.memfd);
      expect(tree.layout.processes[1]!.shared.sysv).not.toBe(parent.shared.sysv);
    } finally {
      for (const pid of tree.pids) process.kill(pid, 'SIGCONT');
    }
    const done = await stopTree(tree);
    expect(done).toMatchObject({ errors: 0 });
    expect(done.workers.map((w) => [w.exitCode, w.signal])).toEqual([[0, 0], [0, 0], [0, 0]]);
  });
});

/** SIGSTOP every pid (one instant for all), check the live memory against the oracle, SIGCONT. */
async function checkStopped(layout: GroupLayout, pids: number[]): Promise<GroupReport> {
  for (const pid of pids) process.kill(pid, 'SIGSTOP');
  try {
    for (const pid of pids) {
      for (let waited = 0; !threadStates(pid).every((s) => s === 'T'); waited += 5) {
        if (waited > 5000) throw new Error(`pid ${pid} not stopped: ${threadStates(pid).join('')}`);
        await sleep(5);
      }
    }
    const live = procMemSource(pids);
    try {
      return checkGroup(layout, live);
    } finally {
      live.close();
    }
  } finally {
    for (const pid of pids) process.kill(pid, 'SIGCONT');
  }
}

describe('grouptree options', () => {
  it('a forked child writing its own share and threads that come and go: the live tree exact', async () => {
    const tree = await startTree([...SMALL, '--fork-after', '50', '--churn-worker', '2', '--churn-steps', '100', '--self-check']);
    const forked = JSON.parse((await tree.fixture.nextLine())!) as Record<string, unknown>;
    const layout = withForkedChild(tree.layout, forked);
    expect(layout.processes.map((p) => p.role)).toEqual(['parent', 'worker', 'worker', 'worker', 'forked']);
    await writtenOnce(layout);
    const report = await checkStopped(layout, layout.processes.map((p) => p.pid));
    expectExact(report, layout, 5);
    // Without the child, its writer cannot be checked, and says so.
    const without = await checkStopped(layout, tree.pids);
    expect(formatMismatches(without)).toEqual([]);
    expect(without.unverifiedWriters).toEqual([{ writer: layout.writers.length - 1, pid: forked['forked'], reason: 'its process is not in the snapshot' }]);
    expect(await stopTree(tree)).toMatchObject({ errors: 0 });
  });

  it('--exit-after: the last worker exits, the others go on exact', async () => {
    const tree = await startTree([...SMALL, '--exit-after', '100', '--self-check']);
    const exiting = tree.layout.processes.find((p) => p.slot === tree.layout.exitSlot)!;
    expect(exiting.slot).toBe(3);
    // It writes no shared memory: the others' pages never depend on it.
    for (const w of tree.layout.writers.filter((x) => x.slot === 3)) expect(w.segments.map((s) => s.region)).toEqual(['private']);
    for (let waited = 0; existsSync(`/proc/${exiting.pid}`); waited += 10) {
      if (waited > 5000) throw new Error('the --exit-after worker did not exit');
      await sleep(10);
    }
    const rest = tree.pids.filter((pid) => pid !== exiting.pid);
    const report = await checkStopped(tree.layout, rest);
    expect(formatMismatches(report)).toEqual([]);
    expect(report.unverifiedWriters.map((u) => u.pid)).toEqual([exiting.pid, exiting.pid]);
    const done = await stopTree(tree);
    expect(done.errors).toBe(0);
    expect(done.workers.map((w) => [w.pid, w.exitCode, w.signal])).toContainEqual([exiting.pid, 0, 0]);
  });
});

// ---------------------------------------------------------------- (a) and (b): exact, one instant, shared stored once

describe('a group snapshot of a tree of 1+3 processes', () => {
  // Writers at full speed (8 busy threads on this machine's 2 cores), and paced.
  it.each([
    ['a pid list', 'keep', []],
    ['--tree', 'close', PACED],
  ])('by %s (memfd fd %s): every page of every member exact at one T, shared memory stored once', async (how, mode, pace) => {
    const tree = await startTree([...SMALL, '--memfd-fd', mode, '--self-check', ...pace]);
    await writtenOnce(tree.layout);
    const path = join(dir, `exact-${mode}.db`);
    const before = liveCounters(tree.layout);
    const targets = how === '--tree' ? ['--tree', String(tree.layout.pid)] : tree.pids.map(String);
    const run = await runCli(['snapshot', ...targets, '--store', path, '--name', `tree-${mode}`, '--json']);
    const after = liveCounters(tree.layout);
    // Stopped now (the oracle needs the CPU): every writer checked its pages before each overwrite.
    expect(await stopTree(tree)).toMatchObject({ errors: 0 });
    expect(run.code, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout) as GroupSnapshotResult;
    expect(result.processes.map((p) => p.pid).sort()).toEqual([...tree.pids].sort());
    expect(result.lostPages).toEqual([]);
    for (const p of result.processes) {
      expect(p, `pid ${p.pid}`).toMatchObject({ exited: false, lostPages: [], threads: tree.layout.threads + 1 });
    }
    // Shared memory is saved once and indexed for every member.
    // Three objects (memfd, SysV, shared anonymous), each page of them saved by
    // one member and indexed for the three others.
    const { privatePages, sharedPages } = treePages(tree.layout);
    expect(result.shared).toEqual({ objects: 3, pagesAliased: sharedPages * 3 });
    const oneCopy = (privatePages + sharedPages) * 4096;
    expect(result.bytesStored).toBeLessThan(oneCopy * 1.1 + 4 * 1024 * 1024); // four copies of the shared regions would be +33 MiB
    expect(result.bytesStored).toBeGreaterThan(oneCopy * 0.5);

    // (b) One instant: each counter at T lies between the ones read around the
    // snapshot, and the oracle checks each shared page, in every member, against
    // the counter of its writer's own process.
    const report = await readStore(path, result.id, tree.layout);
    expectExact(report, tree.layout, 4);
    const store = Store.open(path, { readonly: true });
    try {
      expect(store.find(String(result.id)).state).toBe('complete');
      const src = storeSource(store, result.id);
      tree.layout.writers.forEach((w, i) => {
        const owner = tree.layout.processes.find((p) => p.slot === w.slot)!;
        const atT = src.readPage(owner.pid, w.counter & ~4095n).readBigUInt64LE(Number(w.counter & 4095n));
        expect(atT).toBeGreaterThanOrEqual(before[i]!);
        expect(atT).toBeLessThanOrEqual(after[i]!);
      });
      expect((await store.verify(result.id)).problems).toEqual([]);
    } finally {
      await store.close();
    }

    // show --json: every member with its own threads and its own regions.
    const shown = JSON.parse((await runCli(['show', String(result.id), '--store', path, '--json'])).stdout) as {
      processes: Array<{ pid: number; threads: Array<{ tid: number }>; regions: Array<{ start: string; end: string }> }>;
    };
    expect(shown.processes.map((p) => p.pid).sort()).toEqual([...tree.pids].sort());
    for (const p of shown.processes) {
      expect(p.threads, `threads of ${p.pid}`).toHaveLength(tree.layout.threads + 1);
      expect(p.threads.map((t) => t.tid)).toContain(p.pid);
      for (const r of regionsOf(tree.layout, p.pid)) {
        const end = r.start + BigInt(r.pages * 4096);
        expect(p.regions.some((x) => BigInt(x.start) <= r.start && end <= BigInt(x.end)), `${r.what} region of ${p.pid} at 0x${r.start.toString(16)}`).toBe(true);
      }
    }

    // The raw export: a directory per member, the same exact content.
    const out = join(dir, `raw-${mode}`);
    const exported = await runCli(['export', String(result.id), '--format', 'raw', '--out', out, '--store', path]);
    expect(exported.code, exported.stderr).toBe(0);
    expect(readdirSync(out).filter((f) => f !== 'manifest.json').map(Number).sort()).toEqual([...tree.pids].sort());
    const raw = rawExportSource(out);
    try {
      expectExact(checkGroup(tree.layout, raw), tree.layout, 4);
    } finally {
      raw.close();
    }
  });

  it('a child forked by a member and writer threads that come and go: the whole tree exact (--tree after the fork)', async () => {
    const tree = await startTree([...SMALL, ...PACED, '--self-check', '--fork-after', '100', '--fork-worker', '1', '--churn-worker', '2', '--churn-steps', '300']);
    const forked = JSON.parse((await tree.fixture.nextLine())!) as Record<string, unknown>;
    expect(forked).toMatchObject({ worker: tree.pids[1] });
    const layout = withForkedChild(tree.layout, forked);
    await writtenOnce(layout);
    const path = join(dir, 'forked.db');
    const run = await runCli(['snapshot', '--tree', String(layout.pid), '--store', path, '--json']);
    expect(await stopTree(tree)).toMatchObject({ errors: 0 });
    expect(run.code, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout) as GroupSnapshotResult;
    expect(result.processes.map((p) => p.pid).sort()).toEqual(layout.processes.map((p) => p.pid).sort());
    expect(result.lostPages).toEqual([]);
    expect(result.shared).toEqual({ objects: 3, pagesAliased: treePages(layout).sharedPages * 4 });
    const report = await readStore(path, result.id, layout);
    expect(formatMismatches(report)).toEqual([]);
    expect(report.lost).toEqual([]);
    expect(report.unverifiedWriters).toEqual([]);
    const { privatePages, sharedPages } = treePages(layout);
    expect(report.pagesChecked).toBe(privatePages + sharedPages * 5);
  });
});

describe('memory shared with a process outside the group', () => {
  it('a pid list without the forked child: its shared regions lost shared-with-other-process, everything else exact', async () => {
    const tree = await startTree([...SMALL, ...PACED, '--fork-after', '50', '--fork-worker', '1']);
    const forked = JSON.parse((await tree.fixture.nextLine())!) as Record<string, unknown>;
    const layout = withForkedChild(tree.layout, forked);
    await writtenOnce(layout);
    const path = join(dir, 'outsider.db');
    const run = await runCli(['snapshot', ...tree.pids.map(String), '--store', path, '--json']);
    expect(await stopTree(tree)).toMatchObject({ errors: 0 });
    expect(run.code, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout) as GroupSnapshotResult;
    expect(result.processes.map((p) => p.pid).sort()).toEqual([...tree.pids].sort());
    expect(result.lostPages.length).toBeGreaterThan(0);
    expect(new Set(result.lostPages.map((l) => l.reason))).toEqual(new Set(['shared-with-other-process']));
    const report = await readStore(path, result.id, layout);
    expect(formatMismatches(report)).toEqual([]);
    // Only the outsider's writer is unchecked; only shared pages are lost, and only for that reason.
    expect(report.unverifiedWriters.map((u) => u.pid)).toEqual([forked['forked']]);
    expect(new Set(report.lost.map((l) => l.reason))).toEqual(new Set(['shared-with-other-process']));
    for (const l of report.lost) {
      const proc = layout.processes.find((p) => p.pid === l.pid)!;
      const inShared = (['memfd', 'sysv', 'shanon'] as const).some((r) => l.address >= proc.shared[r] && l.address < proc.shared[r] + BigInt(layout.shared[r].pages * 4096));
      expect(inShared, `lost page 0x${l.address.toString(16)} of ${l.pid} is shared`).toBe(true);
    }
  });
});

// ---------------------------------------------------------------- (c) a member that exits mid-snapshot

describe('failure isolation', () => {
  it.each(['close', 'keep'])('a member that exits during the background save is recorded exited, its unsaved pages lost target-exited, the others exact (memfd fd %s)', async (mode) => {
    const tree = await startTree([
      '--workers', '3', '--threads', '2', '--private-pages', '1024', '--memfd-pages', '1024', '--sysv-pages', '256', '--shanon-pages', '512',
      '--memfd-fd', mode, '--rate', '2000', '--exit-after', '600000',
    ]);
    const exiting = tree.layout.processes.find((p) => p.slot === tree.layout.exitSlot)!;
    const store = Store.open(join(dir, `exit-${mode}.db`));
    try {
      // About 12 MiB at 2 MB/s: the save lasts ~6 s. The worker exits (SIGUSR1) at
      // the first progress report, when every member runs again after T.
      let signalled = false;
      const protectedDuring: Record<string, number> = {};
      const onProgress = (): void => {
        if (signalled) return;
        process.kill(exiting.pid, 'SIGUSR1');
        signalled = true;
        // What the kill tests look for is there while a snapshot runs: their "none left" can fail.
        for (const pid of tree.pids.filter((x) => x !== exiting.pid)) {
          for (const r of regionsOf(tree.layout, pid)) protectedDuring[r.what] = (protectedDuring[r.what] ?? 0) + uffdWpPages(pid, r.start, r.pages);
        }
      };
      const result = await snapshotGroup(binding, store, tree.pids.map((pid) => ({ pid })), { name: 'exit', rateBytesPerSec: 2e6, onProgress });
      expect(signalled).toBe(true);
      expect(protectedDuring['private']).toBeGreaterThan(0);
      expect(protectedDuring['memfd']).toBeGreaterThan(0);
      const gone = result.processes.find((p) => p.pid === exiting.pid)!;
      expect(gone.exited).toBe(true);
      expect(gone.lostPages.length).toBeGreaterThan(0);
      expect(new Set(gone.lostPages.map((l) => l.reason))).toEqual(new Set(['target-exited']));
      for (const p of result.processes.filter((x) => x.pid !== exiting.pid)) expect(p, `pid ${p.pid}`).toMatchObject({ exited: false, lostPages: [] });
      expect(result.lostPages.every((l) => l.pid === exiting.pid && l.reason === 'target-exited')).toBe(true);
      expect(store.find(String(result.id)).state).toBe('complete');

      const report = checkGroup(tree.layout, storeSource(store, result.id));
      expect(formatMismatches(report)).toEqual([]);
      // Only the exited member's pages may be missing, and only for that reason.
      expect(report.lost.every((l) => l.pid === exiting.pid && l.reason === 'target-exited')).toBe(true);
      expect(report.unverifiedWriters.every((u) => u.pid === exiting.pid)).toBe(true);
      // The exited member's private pages: each stored (checked above) or lost target-exited.
      const src = storeSource(store, result.id);
      let lostPrivate = 0;
      for (const r of regionsOf(tree.layout, exiting.pid).filter((x) => x.what === 'private')) {
        for (let p = 0; p < r.pages; p++) {
          const reason = src.lostReason(exiting.pid, r.start + BigInt(p * 4096));
          if (reason !== undefined) lostPrivate++;
          expect([undefined, 'target-exited']).toContain(reason);
        }
      }
      expect(lostPrivate).toBeGreaterThan(0);
    } finally {
      await store.close();
    }
    const done = await stopTree(tree);
    expect(done.errors).toBe(0);
    expect(done.workers.find((w) => w.pid === exiting.pid)).toMatchObject({ exitCode: 0, signal: 0 });
  });
});

// ---------------------------------------------------------------- (d) wpsnap killed at every point of a group snapshot

describe('wpsnap snapshot <pids...> killed at every point', () => {
  let tree: Tree;
  beforeAll(async () => {
    tree = await startTree([...SMALL, ...PACED, '--self-check'], false);
  });
  afterAll(async () => {
    try {
      // Checked before every overwrite, by every writer of every member: no write was lost or misplaced.
      const done = await stopTree(tree);
      expect(done).toMatchObject({ errors: 0 });
      expect(done.workers.map((w) => [w.exitCode, w.signal])).toEqual([[0, 0], [0, 0], [0, 0]]);
    } finally {
      tree.fixture.kill('SIGKILL');
    }
  });

  const points = ['before-freeze', 'after-freeze', 'after-inject', 'after-protect', 'after-resume', 'mid-sweep', 'before-commit'] as const;
  it('covers fault points that exist', () => {
    for (const p of points) expect(FAULT_POINTS).toContain(p);
  });
  it.each(points)(
    'SIGKILL at %s: no member stopped or protected, all writing, the store openable', async (point) => {
      const path = join(dir, `kill-${point}.db`);
      const killed = await runCliProcess(['snapshot', ...tree.pids.map(String), '--store', path], { WPSNAP_FAULT: point });
      expect(killed.signal, killed.stderr).toBe('SIGKILL');
      for (const pid of tree.pids) await untraced(pid);
      for (const pid of tree.pids) {
        expect(threadStates(pid).filter((s) => s === 't' || s === 'T'), `stopped threads of ${pid}`).toEqual([]);
      }
      // The kernel drops the protection once the last fd of each userfaultfd closes (moments after the kill).
      const protectedPages = (): number => tree.pids.reduce((n, pid) => n + regionsOf(tree.layout, pid).reduce((m, r) => m + uffdWpPages(pid, r.start, r.pages), 0), 0);
      for (let waited = 0; protectedPages() > 0 && waited < 3000; waited += 20) await sleep(20);
      expect(protectedPages()).toBe(0);
      const c0 = liveCounters(tree.layout);
      await sleep(100);
      const c1 = liveCounters(tree.layout);
      tree.layout.writers.forEach((w, i) => expect(c1[i]!, `writer ${w.index}`).toBeGreaterThan(c0[i]!));
      const store = Store.open(path, { readonly: true });
      try {
        const states = store.list().map((s) => s.state);
        expect(states.length).toBeLessThanOrEqual(1);
        expect(states.every((s) => s === 'incomplete')).toBe(true);
      } finally {
        await store.close();
      }
    },
  );
});
