// Opening a store file: recognise it before SQLite touches it, create it
// atomically when missing, migrate it, set the connection's pragmas.
import Database from 'better-sqlite3';
import { closeSync, linkSync, openSync, readSync, rmSync, statSync, type Stats } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { WpsnapError, externalCode } from '../common/errors.js';
import { createPrivateFile, makePrivateDirs, onReadOnlyFilesystem, openToOthers } from './private-files.js';
import { APPLICATION_ID, checkHeader, migrate, OLDEST_READABLE_VERSION, readSchemaVersion, type Migration } from './schema.js';

/**
 * SQLite page size of new stores. 16 KiB: a blob (10-256 KiB) takes 4× fewer
 * WAL frames than with 4 KiB pages, while the B-tree pages every commit
 * rewrites stay small (measured: 64 KiB is no faster, 4 KiB ~2× slower on
 * bulk blob writes).
 */
const SQLITE_PAGE_SIZE = 16384;

// better-sqlite3 reads SQLITE_USE_URI once, when its addon loads at the
// first `new Database`: a store on read-only media is opened through a URI
// filename (`?immutable=1`, see openSqlite). Our other filenames are absolute
// paths, which mean the same with URIs on.
process.env['SQLITE_USE_URI'] ??= '1';

export interface OpenDatabaseOptions {
  readonly: boolean;
  migrations: readonly Migration[];
  /** One line, no "wpsnap:" prefix: the store is open to other users. */
  onWarning: (line: string) => void;
}

/**
 * Open (or create, unless readonly) the store file. Errors: STORE_NOT_FOUND,
 * STORE_IS_DIRECTORY, NOT_A_STORE, STORE_TOO_NEW, STORE_NEEDS_UPGRADE,
 * STORE_READ_ONLY_FS, or the errno / SQLite code, each one line naming the path.
 */
export function openDatabase(path: string, options: OpenDatabaseOptions): { file: string; db: Database.Database } {
  const { readonly, migrations } = options;
  const file = resolve(path);
  let stats = statOrUndefined(file);
  if (stats === undefined) {
    if (readonly) throw new WpsnapError('STORE_NOT_FOUND', `no store at ${file}`);
    createStore(file, migrations);
    stats = statOrUndefined(file);
    if (stats === undefined) throw new WpsnapError('STORE_NOT_FOUND', `no store at ${file} after creating it`);
  }
  if (stats.isDirectory()) {
    throw new WpsnapError('STORE_IS_DIRECTORY', `${file} is a directory; give the path of a store file`);
  }
  if (!stats.isFile()) throw new WpsnapError('NOT_A_STORE', `${file} is not a wpsnap store (not a regular file)`);
  // Only plain reads until the file is known to be ours: a foreign file stays untouched.
  checkHeader(file, readHeader(file));
  const readOnlyMedia = onReadOnlyFilesystem(file);
  if (!readonly && readOnlyMedia) {
    throw new WpsnapError('STORE_READ_ONLY_FS', `cannot write to ${file}: its filesystem is read-only (reading commands still work)`);
  }
  warnOnce(file, options.onWarning);

  const db = openSqlite(file, readonly, readOnlyMedia);
  try {
    const version = readSchemaVersion(db, file);
    if (version > migrations.length) migrate(db, file, version, migrations); // throws STORE_TOO_NEW, writes nothing
    if (readonly) {
      // On read-only media no upgrade is possible; the versions whose later steps only add columns are read as they are.
      const readable = readOnlyMedia && version >= OLDEST_READABLE_VERSION;
      if (version < migrations.length && !readable) {
        const why = readOnlyMedia ? ', which its read-only filesystem does not allow' : '';
        throw new WpsnapError(
          'STORE_NEEDS_UPGRADE',
          `${file} has store schema version ${version}; open it once read-write to upgrade it to ${migrations.length}${why}`,
        );
      }
    } else {
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = NORMAL');
      migrate(db, file, version, migrations);
    }
    db.pragma('foreign_keys = ON');
  } catch (error) {
    db.close();
    throw sqliteError(error, file, 'open', readOnlyMedia);
  }
  return { file, db };
}

/**
 * SQLite's open. A read-only open of a WAL store needs its -shm file, which
 * read-only media cannot hold when the last writer closed cleanly (and so
 * removed its -wal and -shm): there the database file alone is the whole
 * store and is opened immutable (no locks, no -wal, no -shm). A -wal left
 * behind holds committed transactions: SQLite reads it, keeping its index in
 * memory when the -shm file is read-only.
 */
function openSqlite(file: string, readonly: boolean, readOnlyMedia: boolean): Database.Database {
  let name = file;
  if (readOnlyMedia) {
    const wal = statOrUndefined(`${file}-wal`);
    if (wal === undefined || wal.size === 0) {
      name = `file:${encodeURI(file).replace(/\?/g, '%3f').replace(/#/g, '%23')}?immutable=1`;
    } else if (statOrUndefined(`${file}-shm`) === undefined) {
      throw new WpsnapError(
        'STORE_READ_ONLY_FS',
        `${file} has a write-ahead log (-wal) but no -shm file, which its read-only filesystem cannot hold: copy the store with its -wal to writable media`,
      );
    }
  }
  try {
    return new Database(name, { readonly, fileMustExist: true, timeout: 10_000 });
  } catch (error) {
    throw sqliteError(error, file, 'open', readOnlyMedia);
  }
}

/** Stores already warned about, so that one command (which may open its store thrice) warns once. */
const warned = new Set<string>();

function warnOnce(file: string, onWarning: (line: string) => void): void {
  if (warned.has(file)) return;
  const open = openToOthers([file, `${file}-wal`, `${file}-shm`]);
  if (open === undefined) return;
  warned.add(file);
  onWarning(`other users can open the store: ${open}; snapshots hold memory contents (chmod 600 them)`);
}

function statOrUndefined(file: string): Stats | undefined {
  try {
    return statSync(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fsError(error, file, 'stat');
  }
}

function readHeader(file: string): Buffer {
  const header = Buffer.alloc(100);
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (error) {
    throw fsError(error, file, 'open');
  }
  try {
    return header.subarray(0, readSync(fd, header, 0, 100, 0));
  } finally {
    closeSync(fd);
  }
}

/**
 * Build a new store beside `file` and link it into place, so a half-built
 * store is never seen. The file is created 0600 before SQLite opens it, and
 * SQLite gives its -wal, -shm and -journal files the database file's mode.
 */
function createStore(file: string, migrations: readonly Migration[]): void {
  try {
    makePrivateDirs(dirname(file));
  } catch (error) {
    throw fsError(error, dirname(file), 'create the store directory');
  }
  const temp = `${file}.new-${process.pid}-${Math.random().toString(36).slice(2)}`;
  try {
    createPrivateFile(temp);
    const db = new Database(temp);
    try {
      db.pragma(`page_size = ${SQLITE_PAGE_SIZE}`);
      db.pragma(`application_id = ${APPLICATION_ID}`);
      migrate(db, file, 0, migrations);
    } finally {
      db.close();
    }
    try {
      linkSync(temp, file);
    } catch (error) {
      // Someone else created it meanwhile: use theirs (the caller checks it).
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
  } catch (error) {
    throw error instanceof WpsnapError ? error : fsError(error, file, 'create store');
  } finally {
    rmSync(temp, { force: true });
    rmSync(`${temp}-journal`, { force: true });
  }
}

function fsError(error: unknown, file: string, step: string): WpsnapError {
  const e = error as NodeJS.ErrnoException;
  const code = externalCode(e.code, 'STORE_IO');
  let reason = e.code !== undefined && e.syscall !== undefined ? `${e.syscall}: ${e.code}` : e.message;
  if (e.code === 'EROFS') reason += ' (the filesystem is read-only)';
  return new WpsnapError(code, `${step} ${file}: ${reason}`, {
    cause: error,
    ...(e.errno === undefined ? {} : { errno: Math.abs(e.errno) }),
    ...(e.syscall === undefined ? {} : { syscall: e.syscall }),
  });
}

/**
 * A WpsnapError for an SQLite failure on `file`; corrupt or foreign databases
 * are NOT_A_STORE. `readOnlyMedia`: the message says the filesystem is read-only.
 */
export function sqliteError(error: unknown, file: string, step: string, readOnlyMedia = false): WpsnapError {
  if (error instanceof WpsnapError) return error;
  const code = externalCode((error as { code?: string }).code, 'STORE_IO');
  const message = ((error as Error).message ?? String(error)).replace(/\s+/g, ' ');
  if (code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT') {
    return new WpsnapError('NOT_A_STORE', `${file} is not a wpsnap store (${message})`, { cause: error });
  }
  const media = readOnlyMedia ? ' (its filesystem is read-only)' : '';
  return new WpsnapError(code, `${step} ${file}: ${message}${media}`, { cause: error });
}
