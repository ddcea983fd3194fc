// What the store records about a snapshot beyond its pages, through the real
// path (snapshot → store → ls/show): the pid of a target inside its own PID
// namespace (NSpid), and the pause of a snapshot that never completed.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchFixture } from '../fixtures/launch.js';
import { Store } from '../store/index.js';
import { fakeProcess } from '../store/testing.js';
import { FIXTURES_BUILD_DIR } from './support/spawn.js';
import { runCli, runCliProcess } from './support/cli.js';
import { sleep, untraced } from './support/proc.js';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-records-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** The sleeper fixture as pid 1 of a new PID namespace; `unshare` is our child, the target its child. */
async function sleeperInPidNamespace(): Promise<{ unshare: ChildProcess; pid: number }> {
  const unshare = spawn('unshare', ['--pid', '--fork', '--mount-proc', '--kill-child', join(FIXTURES_BUILD_DIR, 'sleeper')], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    const lines = createInterface({ input: unshare.stdout! });
    const [ready] = (await Promise.race([once(lines, 'line'), sleep(20_000).then(() => ['no ready line within 20 s'])])) as string[];
    expect(ready).toMatch(/"ready":true/);
    expect(JSON.parse(ready!)).toMatchObject({ ready: true, pid: 1 });
    const children = readFileSync(`/proc/${unshare.pid}/task/${unshare.pid}/children`, 'utf8').trim().split(' ');
    expect(children).toHaveLength(1);
    return { unshare, pid: Number(children[0]) };
  } catch (error) {
    unshare.kill('SIGKILL'); // --kill-child: the sleeper goes with it
    throw error;
  }
}

describe('a target in its own PID namespace', () => {
  it('show gives its pid inside the namespace (NSpid), in text and --json', async () => {
    const { unshare, pid } = await sleeperInPidNamespace();
    try {
      const store = join(dir, 'nspid.db');
      const snap = await runCli(['snapshot', String(pid), '--store', store, '--name', 'contained']);
      expect(snap.stderr).toBe('');
      expect(snap.code).toBe(0);

      const json = await runCli(['show', 'contained', '--json', '--store', store]);
      const shown = JSON.parse(json.stdout) as { processes: Array<{ pid: number; nsPids: number[] }> };
      expect(shown.processes.map((p) => [p.pid, p.nsPids])).toEqual([[pid, [pid, 1]]]);

      const text = await runCli(['show', 'contained', '--store', store]);
      expect(text.stdout.split('\n')).toContain(`  pid 1 in its own PID namespace (NSpid, ours first: ${pid} 1)`);
    } finally {
      process.kill(pid, 'SIGKILL');
      if (unshare.exitCode === null) await once(unshare, 'exit');
    }
  });

  it('a process in ours has one NSpid, and show prints no namespace line', async () => {
    const store = join(dir, 'own-namespace.db');
    const writer = Store.open(store);
    const w = writer.beginSnapshot({ name: 'plain' });
    w.addProcess(fakeProcess(4242, { nsPids: [4242] }));
    await w.complete({ pauseMicros: 1, durationMillis: 1, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });
    await writer.close();
    const shown = JSON.parse((await runCli(['show', 'plain', '--json', '--store', store])).stdout) as { processes: Array<{ nsPids: number[] }> };
    expect(shown.processes[0]!.nsPids).toEqual([4242]);
    expect((await runCli(['show', 'plain', '--store', store])).stdout).not.toContain('PID namespace');
  });
});

describe('the pause of a snapshot that never completed', () => {
  it('is recorded right after the pause and shown by ls and show (writer killed mid-sweep)', async () => {
    const fixture = await launchFixture('pagewriter', ['--threads', '2', '--pages', '4096', '--memfd-pages', '0', '--kernel-pages', '0', '--rate', '1000']);
    try {
      const store = join(dir, 'killed.db');
      const killed = await runCliProcess(['snapshot', String(fixture.pid), '--store', store, '--rate', '1'], { WPSNAP_FAULT: 'mid-sweep' });
      expect(killed.signal).toBe('SIGKILL');
      await untraced(fixture.pid);

      const listed = JSON.parse((await runCli(['ls', '--json', '--store', store])).stdout) as {
        snapshots: Array<{ state: string; stats: unknown; pauseMicros: number; pauseBreakdownMicros: Record<string, number> }>;
      };
      const [snap] = listed.snapshots;
      expect(snap).toMatchObject({ state: 'incomplete', stats: null });
      expect(snap!.pauseMicros).toBeGreaterThan(0);
      expect(Object.keys(snap!.pauseBreakdownMicros).sort()).toEqual(['copy', 'engine', 'freeze', 'inject', 'plan', 'protect', 'restoreState', 'thaw']);

      const table = (await runCli(['ls', '--store', store])).stdout.split('\n');
      expect(table[0]).toMatch(/PAUSE/);
      const pauseColumn = table[0]!.indexOf('PAUSE');
      expect(table[1]!.slice(pauseColumn).split(/\s+/)[0]).toBe(`${(snap!.pauseMicros / 1000).toFixed(1)}ms`);

      const show = (await runCli(['show', '1', '--store', store])).stdout.split('\n');
      expect(show[0]).toMatch(/^snapshot 1: incomplete, taken /);
      expect(show[1]).toMatch(/^ {2}paused [\d.]+ (ms|µs) \(freeze [\d.]+ (ms|µs), inject .*, thaw [\d.]+ (ms|µs)\)$/);
    } finally {
      fixture.kill();
    }
  });

  it('survives abort() and is read back as recorded', async () => {
    const store = Store.open(join(dir, 'aborted.db'));
    const w = store.beginSnapshot({ name: 'aborted' });
    w.recordPause(1234.4, { freeze: 200, inject: 300, plan: 100, protect: 500, copy: 34, thaw: 100 });
    await w.abort('interrupted');
    expect(store.find('aborted')).toMatchObject({
      state: 'incomplete',
      stats: null,
      pauseMicros: 1234,
      pauseBreakdownMicros: { freeze: 200, inject: 300, plan: 100, protect: 500, copy: 34, thaw: 100 },
    });
    expect(() => w.recordPause(1, {})).toThrow(expect.objectContaining({ code: 'WRITER_CLOSED' }));
    await store.close();
  });
});
