// Memory images are secrets: under umask 000 the store's directories are
// created 0700, the store and its -wal/-shm 0600, an export is 0600 files in
// 0700 directories; a store other users can open is pointed out, once.
import { chmodSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { exportRaw } from '../snapshot-format/export-raw.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, fakeRegion, heapBatch } from '../store/testing.js';
import { runCliProcess } from './support/cli.js';

const STATS = { pauseMicros: 5, durationMillis: 7, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const HEAP = 0x5555a0000000n;

let root: string;
let savedUmask: number;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-private-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});
beforeEach(() => {
  savedUmask = process.umask(0o000);
});
afterEach(() => {
  process.umask(savedUmask);
});

const mode = (path: string): string => (statSync(path).mode & 0o777).toString(8).padStart(4, '0');

async function snapshotInto(store: Store, name: string): Promise<number> {
  const writer = store.beginSnapshot({ name });
  const pid = writer.addProcess(fakeProcess(4321));
  writer.addRegions(pid, [fakeRegion(HEAP, HEAP + BigInt(8 * PAGE_SIZE)), fakeRegion(HEAP + 0x100000n, HEAP + 0x102000n)]);
  await writer.addPages(pid, heapBatch(HEAP, 8, ['random', 'pointers'], 1));
  await writer.complete(STATS);
  return writer.id;
}

describe('a private store, whatever the umask', () => {
  it('creates its directories 0700 and the store, -wal and -shm 0600', async () => {
    const path = join(root, 'new', 'deeper', 'store.db');
    const store = Store.open(path);
    await snapshotInto(store, 'first');
    // While open, the write-ahead log and its index exist.
    expect([mode(join(root, 'new')), mode(join(root, 'new', 'deeper')), mode(path), mode(`${path}-wal`), mode(`${path}-shm`)]).toEqual([
      '0700', '0700', '0600', '0600', '0600',
    ]);
    await store.close();
    expect(mode(path)).toBe('0600');
    // An existing directory is not the store's to change.
    const existing = join(root, 'existing');
    mkdirSync(existing, 0o755);
    await Store.open(join(existing, 'store.db')).close();
    expect([mode(existing), mode(join(existing, 'store.db'))]).toEqual(['0755', '0600']);
  });

  it('exports 0600 files in 0700 directories, also over a previous export', async () => {
    const store = Store.open(join(root, 'export-src', 'store.db'));
    const id = await snapshotInto(store, 'exported');
    const out = join(root, 'export');
    for (let round = 0; round < 2; round++) {
      await exportRaw(store, String(id), out);
      const files = readdirSync(join(out, '4321')).map((f) => join(out, '4321', f));
      expect(files).toHaveLength(2);
      expect([mode(out), mode(join(out, '4321')), mode(join(out, 'manifest.json')), ...files.map(mode)]).toEqual([
        '0700', '0700', '0600', '0600', '0600',
      ]);
    }
    await store.close();
  });
});

describe('a store other users can open', () => {
  it('warns once, in one line naming the file and its mode; a 0600 store does not', async () => {
    const path = join(root, 'shared', 'store.db');
    const store = Store.open(path);
    await snapshotInto(store, 'x');
    await store.close();
    const warnings: string[] = [];
    const onWarning = (line: string): void => {
      warnings.push(line);
    };
    await Store.open(path, { onWarning }).close();
    expect(warnings).toEqual([]);

    chmodSync(path, 0o644);
    await Store.open(path, { readonly: true, onWarning }).close();
    await Store.open(path, { onWarning }).close();
    expect(warnings).toEqual([`other users can open the store: ${path} (mode 0644); snapshots hold memory contents (chmod 600 them)`]);
  });

  it('the CLI prints the warning once on stderr, and still does its work', async () => {
    const path = join(root, 'shared-cli', 'store.db');
    const store = Store.open(path);
    await snapshotInto(store, 'y');
    await store.close();
    chmodSync(path, 0o640);
    const ls = await runCliProcess(['ls', '--json', '--store', path]);
    expect(ls.code).toBe(0);
    expect(ls.stderr).toBe(
      `wpsnap: warning: other users can open the store: ${path} (mode 0640); snapshots hold memory contents (chmod 600 them)\n`,
    );
    expect((JSON.parse(ls.stdout) as { snapshots: Array<{ name: string }> }).snapshots.map((s) => s.name)).toEqual(['y']);
  });

  it('a foreign file is refused before any check of its mode', async () => {
    mkdirSync(join(root, 'foreign'));
    const path = join(root, 'foreign', 'notes.txt');
    writeFileSync(path, 'not a store');
    chmodSync(path, 0o644);
    const warnings: string[] = [];
    expect(() => Store.open(path, { onWarning: (line) => warnings.push(line) })).toThrow(expect.objectContaining({ code: 'NOT_A_STORE' }));
    expect(warnings).toEqual([]);
  });
});
