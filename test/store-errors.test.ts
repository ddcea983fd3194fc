// Opening things that are not (usable) stores: each fails with its own code, a
// one-line message naming the path, and leaves the file untouched.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import Database from 'better-sqlite3';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { MIGRATIONS, Store } from '../store/index.js';
import { runCliProcess } from './support/cli.js';

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-errors-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

function openError(path: string, options: { readonly?: boolean } = {}): WpsnapError {
  try {
    Store.open(path, options);
  } catch (error) {
    expect(error).toBeInstanceOf(WpsnapError);
    const e = error as WpsnapError;
    expect(e.message).not.toMatch(/\n/);
    expect(e.message).toContain(path);
    return e;
  }
  throw new Error(`Store.open(${path}) did not fail`);
}

describe('Store.open errors', () => {
  it('a directory: STORE_IS_DIRECTORY', () => {
    const dir = join(root, 'a-directory');
    mkdirSync(dir);
    expect(openError(dir).code).toBe('STORE_IS_DIRECTORY');
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a text file: NOT_A_STORE, file unchanged', () => {
    const file = join(root, 'notes.txt');
    writeFileSync(file, 'just some notes\n'.repeat(50));
    const before = readFileSync(file);
    expect(openError(file).code).toBe('NOT_A_STORE');
    expect(openError(file, { readonly: true }).code).toBe('NOT_A_STORE');
    expect(readFileSync(file).equals(before)).toBe(true);
    expect(readdirSync(root).filter((name) => name.startsWith('notes.txt'))).toEqual(['notes.txt']);
  });

  it('an empty file: NOT_A_STORE, still empty', () => {
    const file = join(root, 'empty.db');
    writeFileSync(file, '');
    expect(openError(file).code).toBe('NOT_A_STORE');
    expect(readFileSync(file).length).toBe(0);
  });

  it('a foreign SQLite database: NOT_A_STORE, byte-for-byte unchanged, no WAL files', () => {
    const file = join(root, 'foreign.db');
    const db = new Database(file);
    db.exec("CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('format', 'wpsnap-store')");
    db.close();
    const before = readFileSync(file);
    const error = openError(file);
    expect(error.code).toBe('NOT_A_STORE');
    expect(error.message).toMatch(/application_id/);
    expect(readFileSync(file).equals(before)).toBe(true);
    expect(existsSync(`${file}-wal`)).toBe(false);
    expect(existsSync(`${file}-shm`)).toBe(false);
    expect(existsSync(`${file}-journal`)).toBe(false);
  });

  it('a store from a newer wpsnap: STORE_TOO_NEW, unchanged', async () => {
    const file = join(root, 'future.db');
    await Store.open(file).close();
    const db = new Database(file);
    db.prepare("UPDATE meta SET value = '99' WHERE key = 'schema_version'").run();
    db.pragma('wal_checkpoint(TRUNCATE)');
    db.close();
    const before = readFileSync(file);
    const error = openError(file);
    expect(error.code).toBe('STORE_TOO_NEW');
    expect(error.message).toMatch(/version 99/);
    expect(openError(file, { readonly: true }).code).toBe('STORE_TOO_NEW');
    expect(readFileSync(file).equals(before)).toBe(true);
  });

  it('a missing store opened read-only: STORE_NOT_FOUND, nothing created', () => {
    const file = join(root, 'nowhere', 'store.db');
    expect(openError(file, { readonly: true }).code).toBe('STORE_NOT_FOUND');
    expect(existsSync(join(root, 'nowhere'))).toBe(false);
  });

  it('creates the directory and the store when missing, and reopens it', async () => {
    const file = join(root, 'deep', 'er', 'store.db');
    const store = Store.open(file);
    expect(store.path).toBe(file);
    await store.close();
    expect(readdirSync(join(root, 'deep', 'er')).filter((name) => name.includes('.new-'))).toEqual([]);
    const again = Store.open(file, { readonly: true });
    expect(again.list()).toEqual([]);
    expect(() => again.beginSnapshot({})).toThrow(expect.objectContaining({ code: 'STORE_READONLY' }));
    await again.close();
  });

  it('a parent path that is a file: the errno code, one line', () => {
    const blocker = join(root, 'blocker');
    writeFileSync(blocker, 'x');
    const error = openError(join(blocker, 'store.db'));
    expect(error.code).toMatch(/^E/);
  });
});

describe('a store from an older wpsnap', () => {
  it('is upgraded by the first command that reads it, which then works', async () => {
    const path = join(root, 'old-version.db');
    const old = Store.open(path, { migrations: MIGRATIONS.slice(0, MIGRATIONS.length - 1) });
    const w = old.beginSnapshot({ name: 'from-before' });
    w.addProcess({ pid: 77, ppid: 1, uid: 0, gid: 0, exe: '/bin/true', cmdline: ['true'], comm: 'true', startTimeTicks: 1, startedAt: new Date(0).toISOString(), auxv: Buffer.alloc(0) });
    await w.complete({ pauseMicros: 1, durationMillis: 1, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });
    await old.close();
    // The library refuses a read-only open of it...
    expect(openError(path, { readonly: true }).code).toBe('STORE_NEEDS_UPGRADE');
    // ...the CLI upgrades it once, says so on stderr, and lists it.
    const ls = await runCliProcess(['ls', '--json', '--store', path]);
    expect(ls.code, ls.stderr).toBe(0);
    expect(ls.stderr).toContain(`upgraded ${path}`);
    const listed = JSON.parse(ls.stdout) as { snapshots: Array<{ name: string; state: string }> };
    expect(listed.snapshots.map((s) => [s.name, s.state])).toEqual([['from-before', 'complete']]);
    const again = await runCliProcess(['ls', '--json', '--store', path]);
    expect(again.stderr).not.toContain('upgraded');
    const db = new Database(path, { readonly: true });
    expect((db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string }).value).toBe(String(MIGRATIONS.length));
    db.close();
  });
});
