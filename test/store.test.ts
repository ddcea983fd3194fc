// The page store with real SQLite files: round trips, dedup, lifecycle, migrations.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fc from 'fast-check';
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { PAGE_SIZE, type PageBatch, type SnapshotStats } from '../snapshot-format/model.js';
import { MIGRATIONS, resolveStorePath, Store, type Migration } from '../store/index.js';
import { fakeProcess, fakeRegion, fakeThread, fillPage } from '../store/testing.js';

const STATS = { pauseMicros: 5, durationMillis: 7, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const BASE = 0x7f0000000000n;

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-store-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});
let counter = 0;
function freshPath(): string {
  return join(root, `s${++counter}`, 'store.db');
}

/** Raw SQL on a store file, beside the Store under test. */
function rawCount(path: string, sql: string): number {
  const db = new Database(path, { readonly: true });
  try {
    return Number(Object.values(db.prepare(sql).get() as Record<string, number>)[0] ?? 0);
  } finally {
    db.close();
  }
}

type PageSpec = { kind: 'zero' } | { kind: 'random'; seed: number } | { kind: 'dup'; of: number };

function pageContent(spec: PageSpec, pool: Buffer[]): Buffer {
  const page = Buffer.alloc(PAGE_SIZE);
  if (spec.kind === 'random') {
    // Deterministic pseudo-random content from the seed.
    let x = spec.seed * 2654435761 + 1;
    for (let i = 0; i < PAGE_SIZE; i += 4) {
      x = (x * 1103515245 + 12345) >>> 0;
      page.writeUInt32LE(x, i);
    }
  } else if (spec.kind === 'dup') {
    pool[spec.of % pool.length]?.copy(page);
  }
  return page;
}

function toBatch(entries: Array<{ address: bigint; data: Buffer }>): PageBatch {
  const addresses = new BigUint64Array(entries.length);
  const data = new Uint8Array(entries.length * PAGE_SIZE);
  entries.forEach((entry, i) => {
    addresses[i] = entry.address;
    data.set(entry.data, i * PAGE_SIZE);
  });
  return { addresses, data };
}

describe('resolveStorePath', () => {
  it('prefers --store, then WPSNAP_STORE, then XDG_DATA_HOME, then ~/.local/share', () => {
    expect(resolveStorePath('/x/s.db', { WPSNAP_STORE: '/y' })).toBe('/x/s.db');
    expect(resolveStorePath(undefined, { WPSNAP_STORE: '/y/s.db', XDG_DATA_HOME: '/d' })).toBe('/y/s.db');
    expect(resolveStorePath(undefined, { XDG_DATA_HOME: '/d', HOME: '/h' })).toBe('/d/wpsnap/store.db');
    expect(resolveStorePath(undefined, { XDG_DATA_HOME: 'relative', HOME: '/h' })).toBe('/h/.local/share/wpsnap/store.db');
    expect(resolveStorePath(undefined, { HOME: '/h' })).toBe('/h/.local/share/wpsnap/store.db');
  });
});

describe('page round trip', () => {
  it('reads back exactly what was written, stores zero pages nowhere and each content once', async () => {
    const specArb = fc.oneof(
      { weight: 2, arbitrary: fc.constant<PageSpec>({ kind: 'zero' }) },
      { weight: 3, arbitrary: fc.integer({ min: 0, max: 1_000_000 }).map<PageSpec>((seed) => ({ kind: 'random', seed })) },
      { weight: 2, arbitrary: fc.nat(50).map<PageSpec>((of) => ({ kind: 'dup', of })) },
    );
    await fc.assert(
      fc.asyncProperty(
        fc.uniqueArray(fc.nat(4000), { minLength: 1, maxLength: 300 }),
        fc.array(specArb, { minLength: 300, maxLength: 300 }),
        fc.array(fc.integer({ min: 1, max: 70 }), { minLength: 1, maxLength: 20 }),
        fc.boolean(),
        async (slots, specs, batchSizes, shuffle) => {
          const path = freshPath();
          const store = Store.open(path);
          try {
            // Page contents: "dup" pages copy an earlier random page.
            const pool: Buffer[] = [];
            const pages = slots.map((slot, i) => {
              const spec = specs[i] as PageSpec;
              const data = pageContent(spec.kind === 'dup' && pool.length === 0 ? { kind: 'zero' } : spec, pool);
              if (spec.kind === 'random') pool.push(data);
              return { address: BASE + BigInt(slot) * BigInt(PAGE_SIZE), data };
            });
            if (shuffle) pages.reverse();
            const writer = store.beginSnapshot({ name: 'round-trip' });
            const pid = writer.addProcess(fakeProcess());
            // Many batches in flight at once, of random sizes.
            const inFlight: Array<Promise<void>> = [];
            for (let at = 0, b = 0; at < pages.length; b++) {
              const size = batchSizes[b % batchSizes.length] as number;
              inFlight.push(writer.addPages(pid, toBatch(pages.slice(at, at + size))));
              at += size;
            }
            await Promise.all(inFlight);
            const stats = await writer.complete(STATS);

            const zero = Buffer.alloc(PAGE_SIZE);
            const expected = pages
              .filter((p) => !p.data.equals(zero))
              .sort((a, b) => (a.address < b.address ? -1 : 1));
            const got = [...store.pages(pid)];
            expect(got.map((p) => p.address)).toEqual(expected.map((p) => p.address));
            got.forEach((p, i) => expect(p.data.equals((expected[i] as { data: Buffer }).data)).toBe(true));
            for (const p of pages) expect(store.readPage(pid, p.address).equals(p.data)).toBe(true);
            expect(store.readPage(pid, BASE + 5000n * BigInt(PAGE_SIZE)).equals(zero)).toBe(true);

            const distinct = new Set(expected.map((p) => p.data.toString('base64'))).size;
            expect(stats.pagesSaved).toBe(expected.length);
            expect(stats.zeroPages).toBe(pages.length - expected.length);
            expect(stats.pagesNew).toBe(distinct);
            expect(stats.bytesRaw).toBe(pages.length * PAGE_SIZE);
            expect(rawCount(path, 'SELECT coalesce(sum(pages), 0) FROM blobs')).toBe(distinct);
            expect((await store.verify(writer.id)).ok).toBe(true);
          } finally {
            await store.close();
          }
        },
      ),
      { numRuns: 25 },
    );
  }, 120_000);

  it('stores a page held by two snapshots once, and reads it back from both', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const pages = Array.from({ length: 130 }, (_, i) => {
      const data = Buffer.alloc(PAGE_SIZE);
      fillPage(data, i % 3 === 0 ? 'random' : 'pointers', i);
      return { address: BASE + BigInt(i * PAGE_SIZE), data };
    });
    const first = store.beginSnapshot({ name: 'one' });
    const p1 = first.addProcess(fakeProcess(10));
    await first.addPages(p1, toBatch(pages));
    const s1 = await first.complete(STATS);
    const blobsAfterFirst = rawCount(path, 'SELECT count(*) FROM blobs');
    const contentAfterFirst = rawCount(path, 'SELECT sum(pages) FROM blobs');
    expect(s1.pagesNew).toBe(130);
    expect(contentAfterFirst).toBe(130);
    await store.close();

    // A second process (a fresh Store, so the dedup index comes from the file) with the same pages elsewhere.
    const again = Store.open(path);
    const second = again.beginSnapshot({ name: 'two' });
    const p2 = second.addProcess(fakeProcess(11));
    const moved = pages.map((p) => ({ address: p.address + 0x100000000n, data: p.data }));
    await Promise.all([second.addPages(p2, toBatch(moved.slice(0, 64))), second.addPages(p2, toBatch(moved.slice(64)))]);
    const s2 = await second.complete(STATS);
    expect(s2.pagesNew).toBe(0);
    expect(s2.bytesStored).toBe(0);
    expect(rawCount(path, 'SELECT count(*) FROM blobs')).toBe(blobsAfterFirst);
    for (const p of moved) expect(again.readPage(p2, p.address).equals(p.data)).toBe(true);
    expect((await again.verify(second.id)).ok).toBe(true);
    await again.close();
  });

  it('dedups between batches in flight together', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const page = Buffer.alloc(PAGE_SIZE);
    fillPage(page, 'random', 1);
    const writer = store.beginSnapshot({});
    const pid = writer.addProcess(fakeProcess());
    await Promise.all(
      Array.from({ length: 8 }, (_, b) =>
        writer.addPages(pid, toBatch(Array.from({ length: 4 }, (_, i) => ({ address: BASE + BigInt((b * 4 + i) * PAGE_SIZE), data: page })))),
      ),
    );
    const stats = await writer.complete(STATS);
    expect(stats.pagesSaved).toBe(32);
    expect(stats.pagesNew).toBe(1);
    expect(rawCount(path, 'SELECT sum(pages) FROM blobs')).toBe(1);
    expect([...store.pages(pid)].every((p) => p.data.equals(page))).toBe(true);
    await store.close();
  });

  it('uses far fewer index rows than pages', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const writer = store.beginSnapshot({});
    const pid = writer.addProcess(fakeProcess());
    const pages = Array.from({ length: 1024 }, (_, i) => {
      const data = Buffer.alloc(PAGE_SIZE);
      fillPage(data, 'pointers', i);
      return { address: BASE + BigInt(i * PAGE_SIZE), data };
    });
    for (let at = 0; at < pages.length; at += 256) await writer.addPages(pid, toBatch(pages.slice(at, at + 256)));
    await writer.complete(STATS);
    expect(rawCount(path, 'SELECT count(*) FROM page_index')).toBe(4);
    expect(rawCount(path, 'SELECT count(*) FROM blobs')).toBe(16);
    await store.close();
  });

  it('rejects malformed batches', async () => {
    const store = Store.open(freshPath());
    const writer = store.beginSnapshot({});
    const pid = writer.addProcess(fakeProcess());
    const code = async (batch: PageBatch): Promise<string | undefined> =>
      writer.addPages(pid, batch).then(
        () => undefined,
        (error: WpsnapError) => error.code,
      );
    await expect(code({ addresses: BigUint64Array.of(BASE + 1n), data: new Uint8Array(PAGE_SIZE) })).resolves.toBe('INVALID_BATCH');
    await expect(code({ addresses: BigUint64Array.of(BASE, BASE), data: new Uint8Array(2 * PAGE_SIZE) })).resolves.toBe('INVALID_BATCH');
    await expect(code({ addresses: BigUint64Array.of(BASE), data: new Uint8Array(100) })).resolves.toBe('INVALID_BATCH');
    await expect(writer.addPages(pid + 1, { addresses: new BigUint64Array(0), data: new Uint8Array(0) })).rejects.toMatchObject({
      code: 'UNKNOWN_PROCESS',
    });
    await writer.abort('test');
    await store.close();
  });
});

describe('snapshot lifecycle', () => {
  it('keeps metadata: processes, threads, regions, lost ranges', async () => {
    const store = Store.open(freshPath());
    const writer = store.beginSnapshot({ name: 'meta' });
    const process = fakeProcess(77, { cmdline: ['a', 'b c', ''] });
    const pid = writer.addProcess(process);
    const threads = [fakeThread(77), fakeThread(78)];
    writer.addThreads(pid, threads);
    const regions = [
      fakeRegion(0x400000n, 0x401000n, { perms: 'r-xp', capture: 'file-private', path: '/bin/x', offset: 0x1000n, inode: 42, dev: '08:01',
        file: { path: '/bin/x', dev: 2049, ino: 42, size: 9000, mtimeNs: '1700000000123456789' } }),
      fakeRegion(BASE, BASE + 0x10000n),
      fakeRegion(0xffffffffff600000n - 0xff00000000000000n, 0xffffffffff601000n - 0xff00000000000000n, { capture: 'skipped', skipReason: '[vsyscall]' }),
    ];
    writer.addRegions(pid, regions);
    writer.addLost(pid, [{ address: BASE + 0x2000n, pages: 3, reason: 'discarded-before-saved' }]);
    await writer.complete(STATS);

    const [stored] = store.processes(writer.id);
    expect(stored).toEqual({ ...process, processId: pid });
    expect(store.threads(pid)).toEqual(threads);
    expect(store.regions(pid)).toEqual([...regions].sort((a, b) => (a.start < b.start ? -1 : 1)));
    expect(store.lost(pid)).toEqual([{ address: BASE + 0x2000n, pages: 3, reason: 'discarded-before-saved' }]);
    const summary = store.find('meta');
    expect(summary).toMatchObject({ id: writer.id, name: 'meta', state: 'complete', pids: [77] });
    expect(store.find(String(writer.id)).name).toBe('meta');
    await store.close();
  });

  it('is visible as complete only after the final commit', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const writer = store.beginSnapshot({ name: 'slow' });
    const pid = writer.addProcess(fakeProcess());
    const data = Buffer.alloc(PAGE_SIZE * 4);
    fillPage(data.subarray(0, PAGE_SIZE), 'random', 3);
    await writer.addPages(pid, { addresses: BigUint64Array.of(BASE, BASE + 4096n, BASE + 8192n, BASE + 12288n), data });

    const observer = Store.open(path, { readonly: true });
    expect(observer.find('slow').state).toBe('running');
    expect(observer.find('slow').stats).toBeNull();
    const stats: SnapshotStats = await writer.complete(STATS);
    expect(observer.find('slow').state).toBe('complete');
    expect(observer.find('slow').stats).toEqual(stats);
    expect(stats).toMatchObject({ ...STATS, pagesSaved: 1, zeroPages: 3, pagesNew: 1, bytesRaw: 4 * PAGE_SIZE });
    expect(() => writer.addProcess(fakeProcess(2))).toThrow(WpsnapError);
    await observer.close();
    await store.close();
  });

  it('names are unique; abort marks incomplete; close aborts what is still running', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const a = store.beginSnapshot({ name: 'dup' });
    expect(() => store.beginSnapshot({ name: 'dup' })).toThrow(expect.objectContaining({ code: 'NAME_TAKEN' }));
    expect(() => store.beginSnapshot({ name: '123' })).toThrow(expect.objectContaining({ code: 'INVALID_NAME' }));
    await a.abort('target vanished');
    expect(store.find('dup').state).toBe('incomplete');
    const b = store.beginSnapshot({ name: 'left-open' });
    b.addProcess(fakeProcess());
    await store.close();
    const reopened = Store.open(path);
    expect(reopened.find('left-open').state).toBe('incomplete');
    expect(() => reopened.find('nope')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
    expect(() => reopened.find('99')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
    expect(reopened.list().map((s) => s.name)).toEqual(['dup', 'left-open']);
    await reopened.close();
  });

  it('close() waits for a completion in progress, and batches still in flight', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const writer = store.beginSnapshot({ name: 'closing' });
    const pid = writer.addProcess(fakeProcess());
    const data = Buffer.alloc(64 * PAGE_SIZE);
    for (let i = 0; i < 64; i++) fillPage(data.subarray(i * PAGE_SIZE), 'pointers', i);
    const pages = writer.addPages(pid, { addresses: BigUint64Array.from({ length: 64 }, (_, i) => BASE + BigInt(i * PAGE_SIZE)), data });
    const completing = writer.complete(STATS);
    await store.close();
    await pages;
    expect((await completing).pagesSaved).toBe(64);
    await expect(writer.complete(STATS)).rejects.toMatchObject({ code: 'WRITER_CLOSED' });
    const reopened = Store.open(path, { readonly: true });
    expect(reopened.find('closing').state).toBe('complete');
    await reopened.close();
  });

  it('delete drops a snapshot and the blobs only it used', async () => {
    const path = freshPath();
    const store = Store.open(path);
    const shared = Buffer.alloc(PAGE_SIZE);
    fillPage(shared, 'random', 1);
    const own = Buffer.alloc(PAGE_SIZE);
    fillPage(own, 'random', 2);
    const w1 = store.beginSnapshot({ name: 'keep' });
    const p1 = w1.addProcess(fakeProcess());
    await w1.addPages(p1, toBatch([{ address: BASE, data: shared }]));
    await w1.complete(STATS);
    const w2 = store.beginSnapshot({ name: 'drop' });
    const p2 = w2.addProcess(fakeProcess());
    await w2.addPages(p2, toBatch([{ address: BASE, data: shared }, { address: BASE + 4096n, data: own }]));
    await w2.complete(STATS);
    expect(rawCount(path, 'SELECT count(*) FROM blobs')).toBe(2);
    expect(store.delete(w2.id)).toEqual({ blobsDeleted: 1, bytesFreed: expect.any(Number), folded: [] });
    expect(rawCount(path, 'SELECT count(*) FROM blobs')).toBe(1);
    expect(rawCount(path, 'SELECT count(*) FROM processes')).toBe(1);
    expect((await store.verify(w1.id)).ok).toBe(true);
    // The dedup index forgot the dropped blob: the page is stored again, not pointed at a hole.
    const w3 = store.beginSnapshot({ name: 'again' });
    const p3 = w3.addProcess(fakeProcess());
    await w3.addPages(p3, toBatch([{ address: BASE, data: own }]));
    expect((await w3.complete(STATS)).pagesNew).toBe(1);
    expect(store.readPage(p3, BASE).equals(own)).toBe(true);
    expect((await store.verify(w3.id)).ok).toBe(true);
    await store.close();
  });
});

describe('schema migrations', () => {
  const LATEST = MIGRATIONS.length;

  it('runs appended migrations in order and records the version', async () => {
    const path = freshPath();
    await Store.open(path).close();
    const next: Migration = (db) => db.exec('ALTER TABLE snapshots ADD COLUMN note TEXT');
    const store = Store.open(path, { migrations: [...MIGRATIONS, next] });
    await store.close();
    const db = new Database(path, { readonly: true });
    expect((db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string }).value).toBe(String(LATEST + 1));
    expect(db.prepare('SELECT note FROM snapshots').all()).toEqual([]);
    db.close();
    // This build refuses the upgraded store.
    expect(() => Store.open(path)).toThrow(expect.objectContaining({ code: 'STORE_TOO_NEW' }));
    // A new store gets every migration at once.
    const fresh = freshPath();
    await Store.open(fresh, { migrations: [...MIGRATIONS, next] }).close();
    expect(rawCount(fresh, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(LATEST + 1);
  });

  it('rolls back a failing migration and keeps the old version', async () => {
    const path = freshPath();
    await Store.open(path).close();
    const broken: Migration = (db) => {
      db.exec('CREATE TABLE half_done (x)');
      throw new Error('disk on fire');
    };
    expect(() => Store.open(path, { migrations: [...MIGRATIONS, broken] })).toThrow(/disk on fire/);
    expect(rawCount(path, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(LATEST);
    expect(rawCount(path, "SELECT count(*) FROM sqlite_schema WHERE name = 'half_done'")).toBe(0);
    await Store.open(path).close();
  });

  it('refuses to upgrade a read-only store', async () => {
    const path = freshPath();
    await Store.open(path).close();
    const next: Migration = (db) => db.exec('CREATE TABLE extra (x)');
    expect(() => Store.open(path, { readonly: true, migrations: [...MIGRATIONS, next] })).toThrow(
      expect.objectContaining({ code: 'STORE_NEEDS_UPGRADE' }),
    );
  });

  it('v2 -> v3: NSpid and the pause are new columns; rows from before read as not recorded', async () => {
    const path = freshPath();
    const v2 = Store.open(path, { migrations: MIGRATIONS.slice(0, 2) });
    const w = v2.beginSnapshot({ name: 'old' });
    w.addProcess(fakeProcess(4242));
    await w.complete(STATS);
    await v2.close();

    const v3 = Store.open(path, { migrations: MIGRATIONS.slice(0, 3) });
    expect(rawCount(path, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(3);
    const old = v3.find('old');
    expect(old).toMatchObject({ state: 'complete', pauseMicros: null, pauseBreakdownMicros: null, stats: { ...STATS } });
    expect(v3.processes(old.id)[0]).not.toHaveProperty('nsPids');
    const next = v3.beginSnapshot({ name: 'new' });
    next.addProcess(fakeProcess(4243, { nsPids: [4243, 17, 1] }));
    next.recordPause(42, { freeze: 40, thaw: 2 });
    await next.complete(STATS);
    expect(v3.processes(next.id)[0]!.nsPids).toEqual([4243, 17, 1]);
    expect(v3.find('new')).toMatchObject({ pauseMicros: 42, pauseBreakdownMicros: { freeze: 40, thaw: 2 } });
    expect(() => next.recordPause(1, {})).toThrow(expect.objectContaining({ code: 'WRITER_CLOSED' }));
    const w2 = v3.beginSnapshot({});
    expect(() => w2.addProcess(fakeProcess(1, { nsPids: [] }))).toThrow(expect.objectContaining({ code: 'INVALID_PROCESS' }));
    expect(() => w2.recordPause(Number.NaN, {})).toThrow(expect.objectContaining({ code: 'INVALID_PAUSE' }));
    await v3.close();
  });

  it('v3 -> v4: generations; snapshots from before are full ones', async () => {
    const path = freshPath();
    const v3 = Store.open(path, { migrations: MIGRATIONS.slice(0, 3) });
    const w = v3.beginSnapshot({ name: 'old' });
    w.addProcess(fakeProcess(4242));
    await w.complete(STATS);
    await v3.close();

    const v4 = Store.open(path, { migrations: MIGRATIONS.slice(0, 4) });
    expect(rawCount(path, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(4);
    expect(v4.find('old')).toMatchObject({ state: 'complete', parentId: null, incremental: null });
    expect(v4.children(v4.find('old').id)).toEqual([]);
    expect(v4.chain(v4.find('old').id).map((x) => x.name)).toEqual(['old']);
    await v4.close();
  });

  it('v1 -> v2: regions copied whole become capture "copied", everything else is kept', async () => {
    // A version-1 store with a complete snapshot: a protected region, a
    // private file mapping with its file reference, and [vdso] copied whole,
    // which version 1 recorded as 'file-private' without a file.
    const path = freshPath();
    const v1 = Store.open(path, { migrations: MIGRATIONS.slice(0, 1) });
    const w = v1.beginSnapshot({ name: 'old' });
    const pid = w.addProcess(fakeProcess(4242));
    const raw = v1 as unknown as { db: Database.Database };
    expect(rawCount(path, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(1);
    raw.db
      .prepare(
        `INSERT INTO regions (process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size, capture,
           file_path, file_dev, file_ino, file_size, file_mtime_ns)
         VALUES (?, ?, ?, ?, 0, '00:00', ?, ?, 4096, ?, ?, ?, ?, ?, ?)`,
      )
      .run(pid, 0x1000, 0x3000, 'rw-p', 0, '', 'protected', null, null, null, null, null);
    raw.db
      .prepare(
        `INSERT INTO regions (process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size, capture,
           file_path, file_dev, file_ino, file_size, file_mtime_ns)
         VALUES (?, ?, ?, ?, 0, '08:01', ?, ?, 4096, ?, ?, ?, ?, ?, ?)`,
      )
      .run(pid, 0x400000, 0x401000, 'r--p', 42, '/bin/x', 'file-private', '/bin/x', 2049, 42, 4096, '1');
    raw.db
      .prepare(
        `INSERT INTO regions (process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size, capture)
         VALUES (?, ?, ?, ?, 0, '00:00', 0, ?, 4096, ?)`,
      )
      .run(pid, 0x7000, 0x9000, 'r-xp', '[vdso]', 'file-private');
    const page = Buffer.alloc(PAGE_SIZE, 7);
    await w.addPages(pid, { addresses: BigUint64Array.of(0x7000n), data: page });
    await w.complete(STATS);
    await v1.close();

    const v2 = Store.open(path, { migrations: MIGRATIONS.slice(0, 2) });
    expect(rawCount(path, "SELECT value FROM meta WHERE key = 'schema_version'")).toBe(2);
    const snapshot = v2.find('old');
    const processId = v2.processes(snapshot.id)[0]!.processId;
    const regions = v2.regions(processId);
    expect(regions.map((r) => [r.path, r.capture])).toEqual([
      ['', 'protected'],
      ['[vdso]', 'copied'],
      ['/bin/x', 'file-private'],
    ]);
    expect(regions[2]!.file).toEqual({ path: '/bin/x', dev: 2049, ino: 42, size: 4096, mtimeNs: '1' });
    expect(v2.readPage(processId, 0x7000n).equals(page)).toBe(true);
    // The new CHECK admits 'copied' and still refuses what is not a capture.
    const db = new Database(path);
    expect(() =>
      db
        .prepare(
          `INSERT INTO regions (process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size, capture)
           VALUES (?, 0x20000, 0x21000, 'rw-p', 0, '00:00', 0, '', 4096, 'scribbled')`,
        )
        .run(pid),
    ).toThrow(/CHECK constraint/);
    db.close();
    await v2.close();
  });
});
