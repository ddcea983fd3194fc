// Usage errors are found before any command acts, and wpsnap refuses targets
// whose freeze would stop wpsnap itself. Real CLI (main(argv) in-process),
// real fixture, real store.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding, tracerHelperPath } from '../core/binding.js';
import { refuseSelfFreeze } from '../core/target-guard.js';
import { progressLine } from '../cli/commands/snapshot.js';
import { launch, launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { Store } from '../store/store.js';
import { CLI_JS, ROOT, runCli, runCliProcess } from './support/cli.js';
import { isAlive, procStatus } from './support/proc.js';

let dir: string;
let store: string;
let target: LaunchedFixture;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-usage-'));
  store = join(dir, 'store.db');
  target = await launchFixture('pagewriter', ['--threads', '1', '--pages', '256', '--memfd-pages', '0', '--kernel-pages', '0', '--untouched-mib', '1']);
  const first = await runCli(['snapshot', String(target.pid), '--store', store, '--name', 'one']);
  expect(first.code).toBe(0);
});
afterAll(() => {
  target.kill();
  rmSync(dir, { recursive: true, force: true });
});

function oneLine(text: string): string {
  const lines = text.trimEnd().split('\n');
  expect(lines, `exactly one line: ${JSON.stringify(text)}`).toHaveLength(1);
  return lines[0]!;
}

/** What a command could have changed: the store's bytes and the files beside it. */
function state(): { store: string; files: string[] } {
  return { store: createHash('sha256').update(readFileSync(store)).digest('hex'), files: readdirSync(dir).sort() };
}

async function snapshotIds(path: string): Promise<Array<{ id: number; state: string }>> {
  if (!existsSync(path)) return [];
  const s = Store.open(path, { readonly: true });
  try {
    return s.list().map((x) => ({ id: x.id, state: x.state }));
  } finally {
    await s.close();
  }
}

describe('a usage error changes nothing', () => {
  // [argv, the message] for an unknown option and a bad value of every command.
  const cases: Array<[string, string[], string]> = [
    ['snapshot, unknown option', ['snapshot', 'PID', '--nmae', 'x'], 'unknown option: --nmae'],
    ['snapshot, bad --rate', ['snapshot', 'PID', '--rate', 'fast'], '--rate must be a positive number of MB/s, not "fast"'],
    ['snapshot, bad --max-shared-copy', ['snapshot', 'PID', '--max-shared-copy', '-1'], '--max-shared-copy must be a non-negative number of MiB, not "-1"'],
    ['snapshot, numeric --name', ['snapshot', 'PID', '--name', '7'], '--name must not be a number (numbers are snapshot ids): "7"'],
    ['ls, unknown option', ['ls', '--long'], 'unknown option: --long'],
    ['ls, extra argument', ['ls', '1'], 'unknown argument: 1'],
    ['show, unknown option', ['show', '1', '--all'], 'unknown option: --all'],
    ['show, extra argument', ['show', '1', '2'], 'unknown argument: 2'],
    ['verify, unknown option', ['verify', '1', '--deep'], 'unknown option: --deep'],
    ['verify, extra argument', ['verify', '1', 'x'], 'unknown argument: x'],
    ['export, unknown option', ['export', '1', '--out', 'OUT', '--fromat', 'raw'], 'unknown option: --fromat'],
    ['export, bad --format', ['export', '1', '--out', 'OUT', '--format', 'elf'], 'invalid value "elf" for --format (choices: "raw", "core")'],
    ['export, no --out', ['export', '1'], 'export needs --out DIR'],
    ['rm, unknown option', ['rm', '1', '--forse'], 'unknown option: --forse'],
    ['rm, extra argument', ['rm', '1', '2'], 'unknown argument: 2'],
    ['check, unknown option', ['check', '--verbose'], 'unknown option: --verbose'],
    ['check, extra argument', ['check', 'now'], 'unknown argument: now'],
    ['demo, unknown option', ['demo', '--mibs', '4'], 'unknown option: --mibs'],
    ['demo, bad --mib', ['demo', '--mib', 'abc'], '--mib must be a positive number of MiB, not "abc"'],
    ['snapshot, not a pid', ['snapshot', 'abc'], 'not a pid: "abc"'],
    ['snapshot, no pid', ['snapshot'], 'name the process to snapshot: wpsnap snapshot <pid> (or several pids, --tree, --cgroup DIR)'],
    ['snapshot, a group with --parent', ['snapshot', 'PID', '1', '--parent', '1'], '--parent and --track take one process: a group snapshot (several pids, --tree, --cgroup) has no generations yet'],
    ['snapshot, --cgroup not a cgroup', ['snapshot', '--cgroup', '/tmp'], '--cgroup /tmp: not a cgroup v2 directory (mounted at /sys/fs/cgroup)'],
    ['snapshot, --cgroup missing', ['snapshot', '--cgroup', '/sys/fs/cgroup/wpsnap-no-such-group'], '--cgroup /sys/fs/cgroup/wpsnap-no-such-group: no such cgroup'],
  ];
  it.each(cases)('%s: exit 2, one line naming it, store and target untouched', async (_name, argv, message) => {
    const out = join(dir, 'OUT');
    const args = argv.map((a) => (a === 'PID' ? String(target.pid) : a === 'OUT' ? out : a));
    const before = state();
    const run = await runCli([...args, '--store', store]);
    expect(run.code).toBe(2);
    expect(run.stdout).toBe('');
    expect(oneLine(run.stderr)).toBe(`wpsnap: ${message}`);
    expect(state()).toEqual(before);
    expect(existsSync(out)).toBe(false);
    expect(await snapshotIds(store)).toEqual([{ id: 1, state: 'complete' }]);
    expect(procStatus(target.pid)['TracerPid']).toBe('0');
  });

  it('--json: the error is one JSON line on stderr', async () => {
    const run = await runCli(['export', '1', '--out', join(dir, 'OUT'), '--format', 'elf', '--json', '--store', store]);
    expect(run.code).toBe(2);
    expect(run.stdout).toBe('');
    expect(JSON.parse(oneLine(run.stderr))).toEqual({ error: { code: 'USAGE', message: 'invalid value "elf" for --format (choices: "raw", "core")', exitCode: 2 } });
  });

  it('completion prints a completion script; export --help marks --out required', async () => {
    const completion = await runCliProcess(['completion']);
    expect(completion.code).toBe(0);
    expect(completion.stdout).toContain('###-begin-wpsnap-completions-###');
    const words = await runCliProcess(['--get-yargs-completions', 'wpsnap', 'ex']);
    expect(words.stdout.split('\n')).toContain('export');
    const help = await runCliProcess(['export', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/--out .*\[required\]/);
  });
});

describe('targets whose freeze would stop wpsnap itself are refused before anything is done', () => {
  async function expectRefused(pid: number, message: RegExp): Promise<void> {
    const path = join(dir, `self-${pid}.db`);
    const run = await runCli(['snapshot', String(pid), '--store', path]);
    expect(run.code).toBe(2);
    expect(oneLine(run.stderr)).toMatch(message);
    expect(await snapshotIds(path)).toEqual([]);
  }

  it('its own pid', async () => {
    await expectRefused(process.pid, new RegExp(`^wpsnap: pid ${process.pid} is this wpsnap process: it cannot snapshot itself`));
  });

  it('one of its own threads', async () => {
    const tid = readdirSync('/proc/self/task').map(Number).find((t) => t !== process.pid)!;
    expect(tid).toBeDefined();
    await expectRefused(tid, new RegExp(`^wpsnap: tid ${tid} is a thread of this wpsnap process \\(pid ${process.pid}\\)`));
  });

  it('its tracer helper', async () => {
    loadBinding().prepareFreeze(); // starts the helper the next freeze will use
    const ours = tracerHelperPath();
    const helpers = readdirSync('/proc').filter((e) => /^\d+$/.test(e)).map(Number).filter((pid) => {
      try {
        return readlinkSync(`/proc/${pid}/exe`) === ours;
      } catch {
        return false;
      }
    });
    expect(helpers.length).toBeGreaterThan(0);
    const helper = Math.max(...helpers);
    await expectRefused(helper, new RegExp(`^wpsnap: pid ${helper} is a wpsnap tracer helper \\(wpsnap_tracer\\)`));
  });

  it('the process tracing wpsnap (a debugger or strace)', async () => {
    // holdtrace traces a process of ours; seen from that process, holdtrace is its debugger.
    const traced = await launchFixture('pagewriter', ['--threads', '1', '--pages', '16', '--memfd-pages', '0', '--kernel-pages', '0', '--untouched-mib', '1']);
    const holder = spawn(join(ROOT, 'fixtures', 'build', 'holdtrace'), [String(traced.pid)], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
      expect(() => refuseSelfFreeze(holder.pid!, traced.pid)).toThrow(`pid ${holder.pid} is tracing this wpsnap process (a debugger or strace)`);
      expect(() => refuseSelfFreeze(target.pid, traced.pid)).not.toThrow();
    } finally {
      holder.stdin.end();
      traced.kill();
    }
  });
});

describe('--max-shared-copy', () => {
  // A SysV segment (uffd-wp cannot register it) of 4 MiB, every page written,
  // removed with IPC_RMID so that it goes away with the process.
  const SYSV_TARGET = `
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
size = 4 << 20
shmid = libc.shmget(0, size, 0o1600)
addr = libc.shmat(shmid, None, 0)
libc.shmctl(shmid, 0, None)
ctypes.memset(addr, 0x5a, size)
print(json.dumps({"ready": True, "pid": os.getpid(), "address": hex(addr), "bytes": size}), flush=True)
time.sleep(600)
`;

  it('a segment beyond the limit is listed lost as shared-copy-limit, one within it is copied', async () => {
    const sysv = await launch(['python3', '-c', SYSV_TARGET]);
    try {
      const address = String(sysv.ready.json['address']);
      const over = await runCli(['snapshot', String(sysv.pid), '--max-shared-copy', '1', '--json', '--store', join(dir, 'sysv.db')]);
      expect(over.code).toBe(0);
      const lost = (JSON.parse(over.stdout) as { lostPages: Array<{ address: string; pages: number; reason: string }> }).lostPages;
      expect(lost).toEqual([{ address, pages: 1024, reason: 'shared-copy-limit' }]);
      const within = await runCli(['snapshot', String(sysv.pid), '--max-shared-copy', '4', '--json', '--store', join(dir, 'sysv.db')]);
      expect(within.code).toBe(0);
      expect((JSON.parse(within.stdout) as { lostPages: unknown[] }).lostPages).toEqual([]);
    } finally {
      sysv.signal('SIGKILL');
    }
  });
});

describe('check', () => {
  it('describes what each userfaultfd feature is used for today', async () => {
    const run = await runCli(['check', '--json']);
    expect(run.code).toBe(0);
    const detail = (name: string): string => (JSON.parse(run.stdout) as { items: Array<{ name: string; detail: string }> }).items.find((i) => i.name === name)!.detail;
    expect(detail('UFFD_FEATURE_EVENT_FORK')).toBe('yes: a fork during a snapshot: the child is released unprotected and unsaved shared pages are listed lost');
    expect(detail('UFFD_FEATURE_WP_ASYNC')).toBe('yes: not used yet (dirty tracking with PAGEMAP_SCAN)');
    expect(detail('UFFD_FEATURE_THREAD_ID')).toBe('yes: faulting thread ids (requested; not used yet)');
  });
});

describe('SIGINT/SIGTERM (ctx.signal aborted): exit 130, nothing half-written', () => {
  const aborted = (): AbortSignal => AbortSignal.abort();

  it('export stops and leaves no output directory', async () => {
    const out = join(dir, 'interrupted-export');
    const run = await runCli(['export', '1', '--out', out, '--store', store], { signal: aborted() });
    expect(run.code).toBe(130);
    expect(oneLine(run.stderr)).toBe(`wpsnap: export of snapshot 1 to ${out} interrupted; nothing of it was left`);
    expect(existsSync(out)).toBe(false);
  });

  it('verify stops', async () => {
    const run = await runCli(['verify', '1', '--store', store], { signal: aborted() });
    expect(run.code).toBe(130);
    expect(run.stdout).toBe('');
    expect(oneLine(run.stderr)).toBe('wpsnap: verify of snapshot 1 interrupted');
  });

  it('demo stops before it snapshots', async () => {
    const path = join(dir, 'demo-interrupted.db');
    const run = await runCli(['demo', '--mib', '1', '--store', path], { signal: aborted() });
    expect(run.code).toBe(130);
    expect(run.stderr.trimEnd().split('\n').at(-1)).toBe('wpsnap: demo interrupted');
    expect(await snapshotIds(path)).toEqual([]);
  });

  it('a real SIGTERM ends demo mid-snapshot at once: exit 130, its pagewriter gone, the snapshot incomplete', async () => {
    const path = join(dir, 'demo-sigterm.db');
    const child = spawn(process.execPath, [CLI_JS, 'demo', '--mib', '64', '--store', path], { stdio: ['ignore', 'pipe', 'pipe'] });
    const closed = once(child, 'close');
    let stderr = '';
    const pid = await new Promise<number>((resolve) =>
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        const m = /^demo: snapshotting pid (\d+) while it writes$/m.exec(stderr);
        if (m) resolve(Number(m[1]));
      }),
    );
    child.kill('SIGTERM');
    const sent = Date.now();
    const [code] = (await closed) as [number | null];
    expect(code).toBe(130);
    // Promptly: the engine stops at once, and what it had already copied is
    // stored before the exit (it is the incomplete snapshot's content); on a
    // machine loaded by other test runs that took up to 11 s, idle about 0.5 s.
    expect(Date.now() - sent).toBeLessThan(20_000);
    expect(stderr.trimEnd().split('\n').at(-1)).toMatch(/^wpsnap: snapshot of pid \d+ interrupted; recorded as incomplete$/);
    expect(isAlive(pid)).toBe(false);
    expect(await snapshotIds(path)).toEqual([{ id: 1, state: 'incomplete' }]);
  });

  it('an incomplete snapshot is exported only with --allow-incomplete, which the refusal names', async () => {
    const path = join(dir, 'incomplete.db');
    const snap = await runCli(['snapshot', String(target.pid), '--store', path], { signal: aborted() });
    expect(snap.code).toBe(130);
    expect(await snapshotIds(path)).toEqual([{ id: 1, state: 'incomplete' }]);
    const out = join(dir, 'incomplete-export');
    const run = await runCli(['export', '1', '--out', out, '--store', path]);
    expect(run.code).toBe(2);
    expect(oneLine(run.stderr)).toBe('wpsnap: snapshot 1 is incomplete, not complete: add --allow-incomplete to export it anyway (unsaved pages read as zero)');
    expect(existsSync(out)).toBe(false);
    const allowed = await runCli(['export', '1', '--out', out, '--allow-incomplete', '--store', path]);
    expect(allowed.code).toBe(0);
    expect(existsSync(join(out, 'manifest.json'))).toBe(true);
  });
});

describe('progress line', () => {
  it('counts pages with data, not zero pages, and says faults are not rate-limited', () => {
    const p = { phase: 'saving' as const, batchesPending: 2, stagingBytes: 0, pagesDone: 95_000, zeroPages: 90_000, totalPages: 100_000, bytesCopied: 20e6, faults: 7, elapsedMillis: 2000 };
    expect(progressLine(p)).toBe('saving: 50% 5000/10000 pages with data (90000 zero of 100000), 10 MB/s, 7 faults');
    expect(progressLine(p, 10)).toBe('saving: 50% 5000/10000 pages with data (90000 zero of 100000), 10 MB/s (sweep limited to 10 MB/s; faults are not rate-limited), 7 faults');
  });

  it('names the phase: once every page is saved, the store still compressing', () => {
    const p = { phase: 'compressing' as const, batchesPending: 3, stagingBytes: 6 * 1024 * 1024, pagesDone: 100_000, zeroPages: 90_000, totalPages: 100_000, bytesCopied: 40e6, faults: 7, elapsedMillis: 4000 };
    expect(progressLine(p)).toBe('compressing: every page saved and unprotected (the target runs freely), 3 batches left to store (6.0 MiB staged)');
    expect(progressLine({ ...p, batchesPending: 1, stagingBytes: 0 })).toBe('compressing: every page saved and unprotected (the target runs freely), 1 batch left to store');
  });
});
