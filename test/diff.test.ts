// wpsnap diff on two real snapshots of fixtures/dirtywriter, whose writes
// between them are known exactly: the changed pages are those whose content
// changed (a page written back with its old value is not), with their bytes.
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { killDetached } from './support/spawn.js';
import { PAGE, startWriter, type Writer } from './support/dirtywriter.js';
import { runCli } from './support/cli.js';

let dir: string;
let store: string;
const cleanups: Array<() => void> = [];
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-diff-'));
  store = join(dir, 'store.db');
});
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
  killDetached();
  rmSync(dir, { recursive: true, force: true });
});

async function snapshot(w: Writer, name: string): Promise<void> {
  const run = await runCli(['snapshot', String(w.fixture.pid), '--json', '--store', store, '--name', name]);
  expect(run.stderr).toBe('');
  expect(run.code).toBe(0);
}

interface JsonRegion {
  start: string;
  end: string;
  status: string;
  changedPages: number;
  changedBytes: number;
  unknownPages: number;
  pages?: string[];
}

/** Changed page addresses of the JSON diff within [base, base + pages). */
function changedIn(regions: JsonRegion[], base: bigint, pages: number): bigint[] {
  const end = base + BigInt(pages) * PAGE;
  return regions.flatMap((r) => (r.pages ?? []).map((p) => BigInt(p))).filter((p) => p >= base && p < end);
}

describe('wpsnap diff', () => {
  it('lists exactly the pages whose content changed, with the bytes that differ', async () => {
    const w = await startWriter(64);
    cleanups.push(() => w.close());
    await snapshot(w, 'a');
    // Page n of anon holds the counter n+1 (filled first), page n of shm 65+n; writes take 129, 130, …
    await w.send('write anon 3'); // 4 -> 129: one byte differs
    await w.send('same anon 7'); // written, content unchanged: not a change
    await w.send('write shm 10'); // 75 -> 130: one byte
    await w.send('dontneed anon 20 1'); // 21 -> zero: one byte
    const mapped = BigInt((await w.send('map 4'))['addr'] as string); // counters 131..134
    await snapshot(w, 'b');

    const run = await runCli(['diff', 'a', 'b', '--json', '--pages', '--store', store]);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
    const diff = JSON.parse(run.stdout) as { a: { name: string }; b: { name: string }; regions: JsonRegion[]; totals: { changedPages: number }; method: string };
    expect([diff.a.name, diff.b.name, diff.method]).toEqual(['a', 'b', 'hashes']);
    expect(changedIn(diff.regions, w.anon, 64)).toEqual([w.anon + 3n * PAGE, w.anon + 20n * PAGE]);
    expect(changedIn(diff.regions, w.shm, 64)).toEqual([w.shm + 10n * PAGE]);
    expect(changedIn(diff.regions, mapped, 4)).toEqual([0n, 1n, 2n, 3n].map((i) => mapped + i * PAGE));
    // The new mapping is a region of its own, or grew one next to it.
    const holder = diff.regions.find((r) => BigInt(r.start) <= mapped && mapped < BigInt(r.end))!;
    expect(['added', 'resized']).toContain(holder.status);
    const shmRegion = diff.regions.find((r) => BigInt(r.start) === w.shm)!;
    expect(shmRegion).toMatchObject({ status: 'changed', changedPages: 1, changedBytes: 1, unknownPages: 0 });
    // Totals add up.
    expect(diff.totals.changedPages).toBe(diff.regions.reduce((n, r) => n + r.changedPages, 0));

    // One page's bytes, A beside B.
    const page3 = `0x${(w.anon + 3n * PAGE).toString(16)}`;
    const bytes = await runCli(['diff', 'a', 'b', '--bytes', page3, '--json', '--store', store]);
    expect(JSON.parse(bytes.stdout)).toMatchObject({ differingBytes: 1, rows: [{ offset: 0, a: '04 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00', b: '81 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00' }] });
    const page7 = await runCli(['diff', 'a', 'b', '--bytes', `0x${(w.anon + 7n * PAGE).toString(16)}`, '--store', store]);
    expect(page7.stdout).toMatch(/the same in both/);

    // The table names the changed regions and the totals.
    const text = await runCli(['diff', 'a', 'b', '--store', store]);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/^A: snapshot 1 \(a\) of pid \d+/);
    expect(text.stdout).toMatch(new RegExp(`${w.shm.toString(16)}-[0-9a-f]+\\s+changed\\s+1 pages`));
    expect(text.stdout).toMatch(/total: \d+ pages changed/);

    // A snapshot compared with itself: nothing.
    const self = JSON.parse((await runCli(['diff', 'a', 'a', '--json', '--store', store])).stdout) as { totals: { changedPages: number }; regions: JsonRegion[] };
    expect(self.totals.changedPages).toBe(0);
    expect(self.regions.every((r) => r.status === 'same' || r.unknownPages > 0)).toBe(true);
  });

  it('writes the HTML report private whatever the umask, and refuses bad input with one line', async () => {
    const w = await startWriter(16);
    cleanups.push(() => w.close());
    await snapshot(w, 'a');
    await w.send('write anon 1');
    await snapshot(w, 'b');
    const report = join(dir, 'report.html');
    const old = process.umask(0);
    try {
      const run = await runCli(['diff', 'a', 'b', '--html', report, '--store', store]);
      expect(run.code).toBe(0);
    } finally {
      process.umask(old);
    }
    expect(statSync(report).mode & 0o777).toBe(0o600);
    expect(readFileSync(report, 'utf8')).toMatch(/^<!DOCTYPE html>/i);

    const missing = await runCli(['diff', 'a', 'nope', '--store', store]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^wpsnap: no snapshot "nope" in .*\n$/);
    const unaligned = await runCli(['diff', 'a', 'b', '--bytes', `0x${(w.anon + 1n).toString(16)}`, '--store', store]);
    expect(unaligned.code).toBe(2);
    expect(unaligned.stderr).toMatch(/^wpsnap: 0x[0-9a-f]+ is not page-aligned\n$/);
    const garbage = await runCli(['diff', 'a', 'b', '--bytes', 'here', '--store', store]);
    expect(garbage.code).toBe(2);
    expect(garbage.stderr).toBe('wpsnap: --bytes must be a page address such as 0x7f0000001000, not "here"\n');
  });
});
