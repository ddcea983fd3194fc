// wpsnap restore: a snapshot run again as a new process, eagerly or lazily,
// after its original is gone. fixtures/restorable reports from the inside
// what it holds (its pid and its worker's tid, a pipe's unread bytes, an
// eventfd's count, an epoll registration, a timer, umask, limits, cwd, a
// connection reset) and its worker checks every page it rewrites; the
// sleeper checks every interrupted syscall restarts as if never stopped.
import { copyFileSync, chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, appendFileSync, renameSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { RESTORE_FAULT_POINTS } from '../core/fault.js';
import { Store } from '../store/store.js';
import { CLI_JS, runCli, runCliProcess } from './support/cli.js';
import { FIXTURES_BUILD_DIR, startDetached, type DetachedFixture } from './support/spawn.js';
import { writerScope } from './support/writer-scope.js';

const scope = writerScope('wpsnap-restore-');
const { cleanups, cli } = scope;
let dir: string;
let store: string;
beforeEach(() => {
  ({ dir, store } = scope);
});

/** Processes a restore started (restored processes and their guardians): SIGKILLed by pid after each test. */
const started: number[] = [];
afterEach(() => {
  for (const pid of started.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
});

const status = (pid: number, key: string): string => new RegExp(`^${key}:\\s*(.*)$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? '';
const nsPids = (pid: number, tid = pid): number[] => status(pid, `NSpid`).length === 0 ? [] : readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8').match(/^NSpid:\s*(.*)$/m)![1]!.split(/\s+/).map(Number);
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Hosts' pids of processes whose innermost pid is `nsPid` in a namespace of their own (a restore of pid nsPid). */
function restoredAs(nsPid: number, exe: string): number[] {
  const found: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const ns = readFileSync(`/proc/${entry}/status`, 'utf8').match(/^NSpid:\s*(.*)$/m)![1]!.split(/\s+/).map(Number);
      if (ns.length === 2 && ns[1] === nsPid && readFileSync(`/proc/${entry}/cmdline`, 'utf8').startsWith(exe)) found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

/** The next line of a file the restored process writes, parsed (up to 10 s). */
async function lineOf(path: string, key: string): Promise<Record<string, unknown>> {
  for (let waited = 0; waited < 10_000; waited += 50) {
    if (existsSync(path)) {
      const line = readFileSync(path, 'utf8').split('\n').find((l) => l.includes(`"${key}":true`));
      if (line !== undefined) return JSON.parse(line) as Record<string, unknown>;
    }
    await sleep(50);
  }
  throw new Error(`no "${key}" line in ${path}: ${existsSync(path) ? readFileSync(path, 'utf8') : '(no file)'}`);
}

async function restorable(pages = 4096): Promise<{ f: DetachedFixture; work: string; worker: number; port: number; sigCgt: string; sigIgn: string }> {
  const work = join(dir, 'work');
  mkdirSync(work);
  const f = await startDetached('restorable', [work, String(pages)]);
  return { f, work, worker: f.ready['worker'] as number, port: f.ready['port'] as number, sigCgt: status(f.pid, 'SigCgt'), sigIgn: status(f.pid, 'SigIgn') };
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}

/** What restorable reports after a faithful restore of a process snapshotted at pid/worker. */
function expectFaithfulReport(report: Record<string, unknown>, pid: number, worker: number, work: string): void {
  expect(report).toMatchObject({
    pid,
    worker,
    pipe: 'restore-me',
    eventfd: 5,
    epoll: '1:1122334455667788',
    interval: 7,
    umask: 0o027,
    nofile: 512,
    cwd: work,
    reset: 'ECONNRESET',
    nodelay: 1, // a socket option recorded at T and set again
    bad: 0,
    joined: true,
  });
  expect(report['gen'] as number).toBeGreaterThanOrEqual(2);
}

/** Snapshot the fixture as "t", kill it, restore it with these options: the result, the restored pid and its stdio file. */
async function snapshotKillRestore(f: DetachedFixture, ...options: string[]): Promise<{ result: Record<string, unknown>; pid: number; out: string }> {
  await cli('snapshot', String(f.pid), '--name', 't');
  f.kill('SIGKILL');
  await f.exited;
  const out = join(dir, 'out.txt');
  const result = await cli('restore', 't', '--stdio', out, ...options);
  const pid = result['pid'] as number;
  started.push(pid);
  return { result, pid, out };
}

describe('wpsnap restore', () => {
  it('runs the snapshot again at its pid and tids in a new PID namespace, with its fds, cwd, umask, limits and signal dispositions', async () => {
    const { f, work, worker, port, sigCgt, sigIgn } = await restorable();
    const { result, pid, out } = await snapshotKillRestore(f);
    expect(result).toMatchObject({ id: 1, nsPid: f.pid, pidNamespace: true, threads: 2 });
    expect(pid).not.toBe(f.pid);
    expect(nsPids(pid)).toEqual([pid, f.pid]);
    const tids = readdirSync(`/proc/${pid}/task`).map(Number).map((t) => nsPids(pid, t)[1]).sort((a, b) => a! - b!);
    expect(tids).toEqual([f.pid, worker].sort((a, b) => a - b));
    expect(readFileSync(`/proc/${pid}/comm`, 'utf8').trim()).toBe('restorable');
    expect(status(pid, 'SigCgt')).toBe(sigCgt);
    expect(status(pid, 'SigIgn')).toBe(sigIgn);
    expect(readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]).toBe(join(FIXTURES_BUILD_DIR, 'restorable'));
    const fds = result['fds'] as Array<{ fd: number; kind: string; restored: boolean; note: string }>;
    expect(fds.filter((x) => x.kind === 'socket' && /connection reset/.test(x.note)).map((x) => x.fd)).toHaveLength(2);
    expect(fds.every((x) => x.restored)).toBe(true);
    expect(await canConnect(port)).toBe(true); // its listening socket, at its address of T
    process.kill(pid, 'SIGUSR1');
    expectFaithfulReport(await lineOf(out, 'report'), f.pid, worker, work);
  });

  it('--lazy: it runs at once, its memory served on first touch and in the background, every page exact', async () => {
    const { f, work, worker } = await restorable(16384);
    const { result, pid, out } = await snapshotKillRestore(f, '--lazy');
    const lazy = result['lazy'] as Record<string, number>;
    expect(lazy['pagesOnDemand']! + lazy['pagesPrefetched']!).toBeGreaterThanOrEqual(16384);
    expect(lazy['allInMillis']).toBeGreaterThanOrEqual(lazy['firstInstructionMillis']!);
    expect(lazy['faultP99Micros']).toBeGreaterThanOrEqual(lazy['faultP50Micros']!);
    process.kill(pid, 'SIGUSR1');
    expectFaithfulReport(await lineOf(out, 'report'), f.pid, worker, work);
  });

  it('the store reads a range from the index rows that cross it exactly as from the whole index (what a lazy restore writes before the process runs)', async () => {
    const { f } = await restorable();
    await cli('snapshot', String(f.pid), '--name', 't');
    const s = Store.open(store, { readonly: true });
    try {
      const proc = s.processes(s.find('t').id)[0]!;
      let compared = 0;
      for (const r of s.regions(proc.processId)) {
        if (r.capture === 'skipped' || r.end > 1n << 63n) continue;
        for (let at = r.start; at < r.end; at += 1n << 22n) {
          const length = Number(r.end - at < 1n << 22n ? r.end - at : 1n << 22n);
          const [a, b] = [Buffer.alloc(length, 0xee), Buffer.alloc(length, 0xee)];
          const [sa, sb] = [new Uint8Array(length / 4096), new Uint8Array(length / 4096)];
          expect(s.readRangeIntoFromRows(proc.processId, at, a, sa)).toBe(s.readRangeInto(proc.processId, at, b, sb));
          expect(a.equals(b)).toBe(true);
          expect(sa).toEqual(sb);
          compared += sa.reduce((n, x) => n + x, 0);
        }
      }
      expect(compared).toBeGreaterThan(4096);
    } finally {
      await s.close();
    }
  });

  it.each([[], ['--lazy']])('the point-in-time oracle workload restored (%s) passes its own self-check and keeps writing', async (...mode: string[]) => {
    const f = await startDetached('pagewriter', ['--threads', '2', '--pages', '4096', '--memfd-pages', '1024', '--kernel-pages', '256', '--untouched-mib', '64', '--self-check-on-exit']);
    await sleep(200);
    const { result, pid, out } = await snapshotKillRestore(f, ...mode);
    expect(result['warnings']).not.toEqual(expect.arrayContaining([expect.stringMatching(/gets EINTR/)]));
    await sleep(700);
    process.kill(pid, 'SIGTERM');
    const done = await lineOf(out, 'done');
    expect(done).toMatchObject({ errors: 0, selfCheck: 'ok' });
    expect((done['counters'] as number[]).every((c) => c > 4096)).toBe(true); // writing on from T
  });

  it('--lazy --detach returns at once; a background process serves the pages and exits', async () => {
    const { f, work, worker } = await restorable(16384);
    const { result, pid, out } = await snapshotKillRestore(f, '--lazy', '--detach');
    const lazy = result['lazy'] as Record<string, unknown>;
    expect(lazy['allInMillis']).toBeNull();
    const server = lazy['serverPid'] as number;
    started.push(server);
    for (let waited = 0; existsSync(`/proc/${server}`) && status(server, 'State').startsWith('Z') === false && waited < 20_000; waited += 50) await sleep(50);
    expect(existsSync(`/proc/${server}`) && !status(server, 'State').startsWith('Z')).toBe(false);
    process.kill(pid, 'SIGUSR1');
    expectFaithfulReport(await lineOf(out, 'report'), f.pid, worker, work);
  });

  it('--new-ids: no namespace, a new pid, and a warning', async () => {
    const { f, work } = await restorable();
    const { result, pid, out } = await snapshotKillRestore(f, '--new-ids');
    expect(result).toMatchObject({ nsPid: pid, pidNamespace: false });
    expect(result['warnings']).toEqual(expect.arrayContaining([expect.stringMatching(/--new-ids/)]));
    expect(nsPids(pid)).toEqual([pid]);
    process.kill(pid, 'SIGUSR1');
    const report = await lineOf(out, 'report');
    expect(report).toMatchObject({ pid, pipe: 'restore-me', cwd: work, bad: 0, joined: true });
  });

  it('restarts every interrupted syscall as the kernel would have (sleeper), and says which thread gets EINTR instead', async () => {
    const f = await startDetached('sleeper');
    const { result, pid, out } = await snapshotKillRestore(f);
    await sleep(500);
    process.kill(pid, 'SIGTERM');
    const done = await lineOf(out, 'done');
    const eintr = (result['warnings'] as string[]).filter((w) => /gets EINTR/.test(w)).length;
    expect(done['errors']).toBe(eintr);
    expect(done['eintr']).toBe(eintr);
    expect(done['sleeps'] as number).toBeGreaterThan(0);
  });

  it('--dry-run lists every fd and refuses a port still in use, naming the fd and the address; --close-unsupported closes it', async () => {
    const { f, port } = await restorable();
    await cli('snapshot', String(f.pid), '--name', 't');
    // The original still listens on its port.
    const dry = await runCli(['restore', 't', '--dry-run', '--store', store]);
    expect(dry.code).not.toBe(0);
    expect(dry.stdout).toMatch(/fd\s+5 eventfd\s+restored: count 5/);
    expect(dry.stderr.trim().split('\n')).toHaveLength(1);
    expect(dry.stderr).toMatch(new RegExp(`fd 8 \\(socket socket:\\[\\d+\\]\\): 127\\.0\\.0\\.1:${port} is in use now`));
    const real = await runCli(['restore', 't', '--store', store]);
    expect(real.code).not.toBe(0);
    expect(real.stderr).toMatch(/cannot be restored: fd 8/);
    const closing = JSON.parse((await runCli(['restore', 't', '--dry-run', '--close-unsupported', '--json', '--store', store])).stdout) as { restorable: boolean; fds: Array<{ fd: number; restored: boolean; note: string }> };
    expect(closing.restorable).toBe(true);
    expect(closing.fds.find((x) => x.fd === 8)).toMatchObject({ restored: false, note: expect.stringMatching(/^closed \(--close-unsupported\)/) });
  });

  it('refuses, in one line and starting nothing: an incomplete snapshot, a changed executable, a user who may not', async () => {
    // A changed executable: a copy of the fixture, run, snapshotted, then rewritten.
    const exe = join(dir, 'restorable-copy');
    copyFileSync(join(FIXTURES_BUILD_DIR, 'restorable'), exe);
    chmodSync(exe, 0o755);
    const work = join(dir, 'w');
    mkdirSync(work);
    const { launch } = await import('../fixtures/launch.js');
    const f = await launch([exe, work], { name: 'restorable-copy', readyTimeoutMs: 20_000 });
    cleanups.push(() => {
      try {
        process.kill(f.pid, 'SIGKILL');
      } catch {
        // gone
      }
    });
    await cli('snapshot', String(f.pid), '--name', 't');
    process.kill(f.pid, 'SIGKILL');
    // Replaced by another build of it (a new file: the running one's text cannot be written).
    copyFileSync(exe, `${exe}.new`);
    appendFileSync(`${exe}.new`, Buffer.from([0]));
    renameSync(`${exe}.new`, exe);
    const changed = await runCli(['restore', 't', '--store', store]);
    expect(changed.code).not.toBe(0);
    expect(changed.stderr.trim().split('\n')).toHaveLength(1);
    expect(changed.stderr).toContain(`snapshot 1 cannot be restored: the executable ${exe} changed since T (device, inode, size or mtime)`);
    expect(restoredAs(f.pid, exe)).toEqual([]);

    // An incomplete snapshot.
    const s = Store.open(store);
    const w = s.beginSnapshot({ name: 'broken' });
    await w.abort('a test');
    await s.close();
    const incomplete = await runCli(['restore', 'broken', '--store', store]);
    expect(incomplete.code).not.toBe(0);
    expect(incomplete.stderr.trim()).toMatch(/^wpsnap: snapshot 2 is incomplete: only a complete snapshot can be restored$/);

    // Not root: refused before anything starts.
    chownSync(dir, 65534, 65534);
    for (const name of readdirSync(dir)) chownSync(join(dir, name), 65534, 65534);
    const user = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--', process.execPath, CLI_JS, 'restore', 't', '--store', store], { encoding: 'utf8' });
    expect(user.status).not.toBe(0);
    expect(user.stderr.trim().split('\n')).toHaveLength(1);
    expect(user.stderr).toMatch(/restore needs root/);
  });

  it.each([...RESTORE_FAULT_POINTS, 'mid-inject'])('a restore killed at %s leaves no process behind', async (point) => {
    const { f } = await restorable(point === 'restore-lazy-serving' ? 32768 : 4096);
    await cli('snapshot', String(f.pid), '--name', 't');
    f.kill('SIGKILL');
    await f.exited;
    const exe = join(FIXTURES_BUILD_DIR, 'restorable');
    const lazy = point === 'restore-lazy-serving' ? ['--lazy'] : [];
    const run = await runCliProcess(['restore', 't', '--store', store, ...lazy], { WPSNAP_FAULT: point });
    expect(run.signal).toBe('SIGKILL');
    let left = restoredAs(f.pid, exe);
    for (let waited = 0; left.length > 0 && waited < 5000; waited += 100) {
      await sleep(100);
      left = restoredAs(f.pid, exe);
    }
    started.push(...left);
    expect(left).toEqual([]);
  });
});

