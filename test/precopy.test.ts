// wpsnap precopy: rounds while the target runs, a final stop for the rest,
// and a generation chain whose last generation is exact at the final stop
// (checked against fixtures/dirtywriter's known values and against
// pagewriter's point-in-time oracle while it writes at full speed).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { precopy } from '../core/precopy.js';
import { launchFixture } from '../fixtures/launch.js';
import { checkSnapshot, parseLayout } from '../fixtures/oracle.js';
import { Store } from '../store/store.js';
import { killDetached } from './support/spawn.js';
import { PAGE, startWriter } from './support/dirtywriter.js';
import { runCli } from './support/cli.js';
import { procStatus, uffdWpPages } from './support/proc.js';

const binding = loadBinding();
let dir: string;
let store: string;
const cleanups: Array<() => void | Promise<void>> = [];
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-precopy-'));
  store = join(dir, 'store.db');
});
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
  killDetached();
  rmSync(dir, { recursive: true, force: true });
});


describe('wpsnap precopy', () => {
  it('ends in a generation chain whose last generation holds the target exactly, and leaves it untracked', async () => {
    const w = await startWriter(64);
    cleanups.push(() => w.close());
    await w.send('write anon 3'); // 129
    await w.send('dontneed anon 20 1');
    const run = await runCli(['precopy', String(w.fixture.pid), '--max-pause', '200ms', '--json', '--name', 'last', '--store', store]);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
    const result = JSON.parse(run.stdout) as { id: number; rounds: Array<Record<string, number>>; finalPauseMicros: number; generations: number[]; converged: boolean };
    expect(result.converged).toBe(true);
    expect(result.generations.length).toBe(result.rounds.length);
    expect(result.id).toBe(result.generations.at(-1));
    for (const r of result.rounds) expect(Object.keys(r).sort()).toEqual(['bytes', 'dirtyPagesPerSec', 'millis', 'pages', 'round']);
    expect(result.finalPauseMicros).toBeGreaterThan(0);
    const s = Store.open(store, { readonly: true, onWarning: () => undefined });
    try {
      const last = s.find('last');
      expect(last.parentId).toBe(result.generations.at(-2));
      expect(last.incremental).toBe('tracked');
      const p = s.processes(last.id)[0]!;
      const words = Array.from({ length: 64 }, (_, i) => s.readPage(p.processId, w.anon + BigInt(i) * PAGE).readBigUInt64LE(0));
      const expected = Array.from({ length: 64 }, (_, i) => BigInt(i + 1));
      expected[3] = 129n;
      expected[20] = 0n;
      expect(words).toEqual(expected);
      expect(s.threads(p.processId).length).toBe(1);
      // The rounds before the last say they are not at one instant.
      expect(s.find(String(result.generations[0])).stats?.warnings?.[0]).toMatch(/pre-copy round/);
      expect(last.stats?.warnings).toBeUndefined();
    } finally {
      await s.close();
    }
    expect((await runCli(['verify', 'last', '--store', store])).code).toBe(0);
    expect(uffdWpPages(w.fixture.pid, w.anon, 64)).toBe(0);
    expect(procStatus(w.fixture.pid)['TracerPid']).toBe('0');
    await w.send('write anon 1'); // runs on
  });

  it('is exact at the final stop for a target writing at full speed (the oracle), in rounds', async () => {
    const fixture = await launchFixture('pagewriter', ['--threads', '2', '--pages', '2048', '--memfd-pages', '512', '--kernel-pages', '0', '--untouched-mib', '16']);
    cleanups.push(() => {
      fixture.kill();
    });
    const layout = parseLayout(fixture.readyLine);
    const s = Store.open(store, { onWarning: () => undefined });
    cleanups.push(() => s.close());
    const rounds: number[] = [];
    const result = await precopy(binding, s, fixture.pid, { maxPauseMicros: 30_000, maxRounds: 6, onRound: (r) => rounds.push(r.pages) });
    expect(result.rounds.length).toBeGreaterThanOrEqual(2);
    const processId = s.processes(result.id)[0]!.processId;
    const report = checkSnapshot(layout, (address) => s.readPage(processId, address));
    expect(report.mismatches).toEqual([]);
    expect(report.pagesChecked).toBe(layout.writers.reduce((n, w) => n + w.pages, 0) + layout.untouched.bytes / 4096);
    expect((await s.verify(result.id)).problems).toEqual([]);
  });

  it('refuses --max-pause 0 and a missing pid with one line', async () => {
    const zero = await runCli(['precopy', '1', '--max-pause', '0', '--store', store]);
    expect(zero.code).toBe(2);
    expect(zero.stderr).toBe('wpsnap: --max-pause must be a positive duration such as 500ms, 1s or 2m, not "0"\n');
    const gone = await runCli(['precopy', '999999999', '--store', store]);
    expect(gone.code).toBe(4);
    expect(gone.stderr).toBe('wpsnap: no process with pid 999999999\n');
  });
});
