// Generations: `snapshot --parent` stores only the pages whose content
// changed since its parent and reads every other page through the chain;
// `rm --force` folds a parent into its generations, `gc` collects what no
// snapshot uses, both atomic under kill -9. Real snapshots of
// fixtures/dirtywriter, whose writes between two instants are known.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { Store } from '../store/store.js';
import { writerScope } from './support/writer-scope.js';
import { generationPages, pageWords, storedPages, within } from './support/generation-pages.js';
import { PAGE, type Writer } from './support/dirtywriter.js';
import { CLI_JS, runCli } from './support/cli.js';

const scope = writerScope('wpsnap-generations-');
const { writer } = scope;
let dir: string;
let store: string;
beforeEach(() => {
  ({ dir, store } = scope);
});

async function snapshot(w: Writer, name: string, ...more: string[]): Promise<Record<string, unknown>> {
  const run = await runCli(['snapshot', String(w.fixture.pid), '--json', '--store', store, '--name', name, ...more]);
  expect(run.stderr).toBe('');
  expect(run.code).toBe(0);
  return JSON.parse(run.stdout) as Record<string, unknown>;
}

const words = (ref: string, base: bigint, pages: number): bigint[] => pageWords(store, ref, base, pages);
const ownPages = (ref: string): bigint[] => storedPages(store, ref);
const zeroedPages = (ref: string): bigint[] => generationPages(store, ref, 'zeroed');

/** anon page i holds i+1 and shm page i holds 65+i after the fill; writes take 129, 130, … */
const filledAnon = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(i + 1));
const filledShm = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(65 + i));

describe('snapshot --parent', () => {
  it('stores only the changed pages and reads the rest through its parent, exactly', async () => {
    const w = await writer();
    await snapshot(w, 'g0');
    await w.send('write anon 3'); // 4 -> 129
    await w.send('same anon 7'); // written back unchanged
    await w.send('write shm 10'); // 75 -> 130
    await w.send('dontneed anon 20 1'); // 21 -> 0
    const mapped = BigInt((await w.send('map 4'))['addr'] as string); // 131..134
    const g1 = await snapshot(w, 'g1', '--parent', 'g0');
    expect(g1).toMatchObject({ parent: 1, incremental: 'compared', writtenUnchangedPages: null });
    expect(g1['changedPages']).toBe(g1['dirtyPages']);
    // Changed = stored + turned zero; of the fixture's regions only anon page 20 turned zero.
    const zeroed = zeroedPages('g1');
    expect((g1['changedPages'] as number) - (g1['pagesStored'] as number)).toBe(zeroed.length);
    expect(within(zeroed, w.anon, 64)).toEqual([w.anon + 20n * PAGE]);
    // Stored by g1 itself: exactly the changed pages with data of the fixture's regions.
    const own = ownPages('g1');
    expect(within(own, w.anon, 64)).toEqual([w.anon + 3n * PAGE]);
    expect(within(own, w.shm, 64)).toEqual([w.shm + 10n * PAGE]);
    expect(within(own, mapped, 4)).toEqual([0n, 1n, 2n, 3n].map((i) => mapped + i * PAGE));
    // Read through the chain: every page as it was at g1's instant.
    const anon = filledAnon(64);
    anon[3] = 129n;
    anon[20] = 0n;
    expect(words('g1', w.anon, 64)).toEqual(anon);
    const shm = filledShm(64);
    shm[10] = 130n;
    expect(words('g1', w.shm, 64)).toEqual(shm);
    expect(words('g1', mapped, 4)).toEqual([131n, 132n, 133n, 134n]);
    // The parent is untouched.
    expect(words('g0', w.anon, 64)).toEqual(filledAnon(64));
    // verify and a raw export read the generation whole.
    expect((await runCli(['verify', 'g1', '--store', store])).code).toBe(0);
    const out = join(dir, 'export');
    expect((await runCli(['export', 'g1', '--out', out, '--store', store])).code).toBe(0);
    const manifest = JSON.parse(readFileSync(join(out, 'manifest.json'), 'utf8')) as { processes: Array<{ regions: Array<{ start: string; file: string | null }> }> };
    const region = manifest.processes[0]!.regions.find((r) => BigInt(r.start) <= w.anon && w.anon < BigInt(r.start) + 64n * PAGE)!;
    const image = readFileSync(join(out, region.file!));
    const at = Number(w.anon - BigInt(region.start));
    expect(Array.from({ length: 64 }, (_, i) => image.readBigUInt64LE(at + i * 4096))).toEqual(anon);
    // diff of two generations of one chain: from the stored dirty sets, the same answer as by hashes.
    const diff = JSON.parse((await runCli(['diff', 'g0', 'g1', '--json', '--pages', '--store', store])).stdout) as {
      method: string;
      regions: Array<{ pages?: string[] }>;
    };
    expect(diff.method).toBe('dirty-sets');
    const changed = diff.regions.flatMap((r) => (r.pages ?? []).map((p) => BigInt(p)));
    expect(within(changed, w.anon, 64)).toEqual([w.anon + 3n * PAGE, w.anon + 20n * PAGE]);
    expect(within(changed, w.shm, 64)).toEqual([w.shm + 10n * PAGE]);
    expect(within(changed, mapped, 4)).toEqual([0n, 1n, 2n, 3n].map((i) => mapped + i * PAGE));
    // log shows the chain.
    const log = JSON.parse((await runCli(['log', 'g1', '--json', '--store', store])).stdout) as { chain: Array<{ id: number; parent: number | null; incremental: string | null }> };
    expect(log.chain.map((c) => [c.id, c.parent, c.incremental])).toEqual([
      [1, null, null],
      [2, 1, 'compared'],
    ]);
  });

  it('refuses a parent of another process, or an incomplete one, and stores nothing', async () => {
    const a = await writer(8);
    const b = await writer(8);
    await snapshot(a, 'of-a');
    const other = await runCli(['snapshot', String(b.fixture.pid), '--parent', 'of-a', '--store', store]);
    expect(other.code).toBe(2);
    expect(other.stderr).toMatch(new RegExp(`^wpsnap: snapshot 1 is not of this process: it holds pid ${a.fixture.pid}, not pid ${b.fixture.pid}\\n$`));
    const s = Store.open(store, { onWarning: () => undefined });
    const broken = s.beginSnapshot({ name: 'broken' });
    await broken.abort('test: an incomplete parent');
    await s.close();
    const incomplete = await runCli(['snapshot', String(a.fixture.pid), '--parent', 'broken', '--store', store]);
    expect(incomplete.code).toBe(2);
    expect(incomplete.stderr).toBe('wpsnap: snapshot 2 is incomplete: a generation needs a complete parent\n');
    const missing = await runCli(['snapshot', String(a.fixture.pid), '--parent', 'nope', '--store', store]);
    expect(missing.code).toBe(1);
    const ls = JSON.parse((await runCli(['ls', '--json', '--store', store])).stdout) as { snapshots: Array<{ name: string }> };
    expect(ls.snapshots.map((x) => x.name)).toEqual(['of-a', 'broken']);
  });
});

describe('rm and gc of generations', () => {
  it('refuses rm of a parent, folds it with --force, and the generations read the same', async () => {
    const w = await writer();
    await snapshot(w, 'g0');
    await w.send('write anon 3');
    await w.send('dontneed anon 20 1');
    await snapshot(w, 'g1', '--parent', 'g0');
    await w.send('write anon 5');
    await snapshot(w, 'g2', '--parent', 'g1');
    const g1Before = words('g1', w.anon, 64);
    const g2Before = words('g2', w.anon, 64);
    expect(g2Before[5]).toBe(130n);
    expect(g2Before[20]).toBe(0n);

    const refused = await runCli(['rm', 'g1', '--store', store]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toBe('wpsnap: snapshot 2 is the parent of generation 3: delete those first, or add --force to fold its pages into them\n');
    // The middle one goes: g2 is rebased onto g0 and reads the same.
    const folded = await runCli(['rm', 'g1', '--force', '--json', '--store', store]);
    expect(folded.code).toBe(0);
    expect(JSON.parse(folded.stdout)).toMatchObject({ snapshot: 2, folded: [3] });
    expect(words('g2', w.anon, 64)).toEqual(g2Before);
    let log = JSON.parse((await runCli(['log', 'g2', '--json', '--store', store])).stdout) as { chain: Array<{ id: number; parent: number | null }> };
    expect(log.chain.map((c) => [c.id, c.parent])).toEqual([
      [1, null],
      [3, 1],
    ]);
    // The base goes: g2 becomes a full snapshot and still reads the same; verify agrees.
    expect((await runCli(['rm', 'g0', '--force', '--store', store])).code).toBe(0);
    expect(words('g2', w.anon, 64)).toEqual(g2Before);
    expect((await runCli(['verify', 'g2', '--store', store])).code).toBe(0);
    log = JSON.parse((await runCli(['log', 'g2', '--json', '--store', store])).stdout) as { chain: Array<{ id: number; parent: number | null }> };
    expect(log.chain.map((c) => [c.id, c.parent])).toEqual([[3, null]]);
    expect(g1Before[3]).toBe(129n);
    const gc = JSON.parse((await runCli(['gc', '--json', '--store', store])).stdout) as { blobsDeleted: number; skipped: string | null };
    expect(gc.skipped).toBeNull();
  });

  it('keeps the store consistent when rm --force is killed at any moment', async () => {
    const w = await writer(256);
    await snapshot(w, 'g0');
    await w.send(`write anon ${Array.from({ length: 100 }, (_, i) => i * 2).join(' ')}`);
    await snapshot(w, 'g1', '--parent', 'g0');
    const expected = words('g1', w.anon, 256);
    for (const delayMs of [0, 5, 20, 40, 80, 150, 300]) {
      const child = spawn(process.execPath, [CLI_JS, 'rm', 'g0', '--force', '--store', store], { stdio: 'ignore' });
      await new Promise((r) => setTimeout(r, delayMs));
      child.kill('SIGKILL');
      await new Promise((r) => child.on('close', r));
      // Either the fold happened whole or not at all; g1 reads the same either way.
      const s = Store.open(store, { onWarning: () => undefined });
      const names = s.list().map((x) => x.name);
      const g1 = s.find('g1');
      await s.close();
      expect(names).toContain('g1');
      expect(g1.parentId === null ? !names.includes('g0') : names.includes('g0')).toBe(true);
      expect(words('g1', w.anon, 256)).toEqual(expected);
      if (!names.includes('g0')) break;
    }
    expect((await runCli(['verify', 'g1', '--store', store])).code).toBe(0);
  });
});
