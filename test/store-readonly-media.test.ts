// A store on a read-only filesystem (a real tmpfs remounted ro): ls, show,
// verify and export read it, whether its last writer closed it cleanly (no
// -wal, no -shm: SQLite cannot create the -shm it wants) or left committed
// transactions in its write-ahead log; what cannot work says the filesystem is
// read-only.
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { MIGRATIONS, Store } from '../store/index.js';
import { fakeProcess, fakeRegion, heapBatch } from '../store/testing.js';
import { ROOT, runCli } from './support/cli.js';

const STATS = { pauseMicros: 5, durationMillis: 7, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const HEAP = 0x5555a0000000n;
const PAGES = 40;

let root: string;
let media: string;
let mounted = false;

/** A store at `path` with one complete snapshot `name` of PAGES pages at HEAP; returns the pages. */
async function writeStore(path: string, name: string, seed: number, migrations = MIGRATIONS): Promise<Buffer> {
  const store = Store.open(path, { migrations });
  const writer = store.beginSnapshot({ name });
  const pid = writer.addProcess(fakeProcess(4000 + seed));
  writer.addRegions(pid, [fakeRegion(HEAP, HEAP + BigInt(PAGES * PAGE_SIZE))]);
  const batch = heapBatch(HEAP, PAGES, ['random', 'pointers', 'zero'], seed);
  await writer.addPages(pid, batch);
  await writer.complete(STATS);
  await store.close();
  return Buffer.from(batch.data);
}

/**
 * A second snapshot written by a child process that exits without closing
 * the store: its commit stays in the -wal (with the -shm beside it).
 */
function writeInWalOnly(path: string, name: string, seed: number): Buffer {
  const script = join(root, `wal-writer-${seed}.mjs`);
  writeFileSync(
    script,
    `import { Store } from ${JSON.stringify(join(ROOT, 'dist/store/index.js'))};
       import { fakeProcess, fakeRegion, heapBatch } from ${JSON.stringify(join(ROOT, 'dist/store/testing.js'))};
       const store = Store.open(${JSON.stringify(path)});
       const writer = store.beginSnapshot({ name: ${JSON.stringify(name)} });
       const pid = writer.addProcess(fakeProcess(${5000 + seed}));
       writer.addRegions(pid, [fakeRegion(${HEAP}n, ${HEAP + BigInt(PAGES * PAGE_SIZE)}n)]);
       await writer.addPages(pid, heapBatch(${HEAP}n, ${PAGES}, ['random', 'pointers', 'zero'], ${seed}));
       await writer.complete(${JSON.stringify(STATS)});
       process.exit(0);`,
  );
  const child = spawnSync(process.execPath, [script], { encoding: 'utf8' });
  expect(child.status, child.stderr).toBe(0);
  expect(existsSync(`${path}-wal`) && statSync(`${path}-wal`).size > 0, 'the -wal holds the commit').toBe(true);
  return Buffer.from(heapBatch(HEAP, PAGES, ['random', 'pointers', 'zero'], seed).data);
}

let cleanPages: Buffer;
let walPages: Buffer;
let olderPages: Buffer;
const cleanStore = (): string => join(media, 'clean', 'store.db');
const walStore = (): string => join(media, 'wal', 'store.db');
const noShmStore = (): string => join(media, 'noshm', 'store.db');
const olderStore = (): string => join(media, 'older', 'store.db');

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-romedia-'));
  media = join(root, 'media');
  mkdirSync(media);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', media]);
  mounted = true;
  cleanPages = await writeStore(cleanStore(), 'clean', 1);
  expect(existsSync(`${cleanStore()}-wal`) || existsSync(`${cleanStore()}-shm`), 'closed cleanly: no -wal, no -shm').toBe(false);

  await writeStore(walStore(), 'checkpointed', 2);
  walPages = writeInWalOnly(walStore(), 'in-wal', 3);
  // The commit is in the -wal only: the database file alone does not hold it.
  const copy = join(root, 'main-file-only.db');
  copyFileSync(walStore(), copy);
  const db = new Database(copy, { readonly: true });
  expect(db.prepare('SELECT name FROM snapshots ORDER BY id').all()).toEqual([{ name: 'checkpointed' }]);
  db.close();

  await writeStore(noShmStore(), 'checkpointed', 4);
  writeInWalOnly(noShmStore(), 'in-wal', 5);
  rmSync(`${noShmStore()}-shm`);

  olderPages = await writeStore(olderStore(), 'older', 6, MIGRATIONS.slice(0, 2));

  execFileSync('mount', ['-o', 'remount,ro', media]);
}, 60_000);

afterAll(() => {
  if (mounted) execFileSync('umount', [media]);
  rmSync(root, { recursive: true, force: true });
});

async function json(argv: string[]): Promise<unknown> {
  const run = await runCli([...argv, '--json']);
  expect(run.stderr, argv.join(' ')).toBe('');
  expect(run.code, argv.join(' ')).toBe(0);
  return JSON.parse(run.stdout) as unknown;
}

/** ls, show, verify and export of snapshot `name` (pages `pages`) from the store at `path`. */
async function readsEverything(path: string, names: string[], name: string, pages: Buffer): Promise<void> {
  const listed = (await json(['ls', '--store', path])) as { snapshots: Array<{ name: string; state: string }> };
  expect(listed.snapshots.map((s) => [s.name, s.state])).toEqual(names.map((n) => [n, 'complete']));

  const shown = (await json(['show', name, '--store', path])) as { name: string; processes: Array<{ regions: Array<{ start: string }> }> };
  expect(shown.name).toBe(name);
  expect(shown.processes[0]!.regions.map((r) => r.start)).toEqual([`0x${HEAP.toString(16)}`]);

  const verified = (await json(['verify', name, '--store', path])) as { ok: boolean; pagesChecked: number };
  expect(verified).toMatchObject({ ok: true, pagesChecked: Math.ceil((PAGES * 2) / 3) });

  const out = mkdtempSync(join(root, 'export-'));
  rmSync(out, { recursive: true });
  const exported = (await json(['export', name, '--out', out, '--store', path])) as { manifest: { processes: Array<{ pid: number }> } };
  const pid = exported.manifest.processes[0]!.pid;
  const region = readFileSync(join(out, String(pid), `${HEAP.toString(16)}-${(HEAP + BigInt(PAGES * PAGE_SIZE)).toString(16)}.bin`));
  expect(region.equals(pages)).toBe(true);
}

describe('a store on a read-only filesystem', () => {
  it('closed cleanly (no -wal, no -shm): ls, show, verify and export read it', async () => {
    await readsEverything(cleanStore(), ['clean'], 'clean', cleanPages);
    expect(existsSync(`${cleanStore()}-shm`)).toBe(false);
  });

  it('with committed transactions left in its -wal: they are read too', async () => {
    await readsEverything(walStore(), ['checkpointed', 'in-wal'], 'in-wal', walPages);
  });

  it('of the previous schema version, which cannot be upgraded there: read as it is', async () => {
    await readsEverything(olderStore(), ['older'], 'older', olderPages);
    const store = Store.open(olderStore(), { readonly: true });
    expect(store.processes(store.find('older').id)[0]!.nsPids).toBeUndefined();
    expect(store.find('older').pauseMicros).toBeNull();
    await store.close();
  });

  it('a -wal without its -shm: one line saying the filesystem is read-only', async () => {
    const run = await runCli(['ls', '--store', noShmStore()]);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toBe(
      `wpsnap: ${noShmStore()} has a write-ahead log (-wal) but no -shm file, which its read-only filesystem cannot hold: copy the store with its -wal to writable media\n`,
    );
  });

  it('a command that writes (rm) fails at once, saying the filesystem is read-only', async () => {
    const run = await runCli(['rm', 'clean', '--store', cleanStore()]);
    expect(run.code).toBe(1);
    expect(run.stderr).toBe(`wpsnap: cannot write to ${cleanStore()}: its filesystem is read-only (reading commands still work)\n`);
    expect(() => Store.open(join(media, 'new', 'store.db'))).toThrow(/create the store directory .*: mkdir: EROFS \(the filesystem is read-only\)$/);
    const listed = (await json(['ls', '--store', cleanStore()])) as { snapshots: unknown[] };
    expect(listed.snapshots).toHaveLength(1);
  });
});
