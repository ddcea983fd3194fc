// Opening a store file: recognise it before SQLite touches it, create it
// atomically when missing, migrate it, set the connection's pragmas.
import Database from 'better-sqlite3';
import { closeSync, linkSync, mkdirSync, openSync, readSync, rmSync, statSync, type Stats } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { WpsnapError, externalCode } from '../common/errors.js';
import { APPLICATION_ID, checkHeader, migrate, readSchemaVersion, type Migration } from './schema.js';

/**
 * SQLite page size of new stores. 16 KiB: a blob (10-256 KiB) takes 4× fewer
 * WAL frames than with 4 KiB pages, while the B-tree pages every commit
 * rewrites stay small (measured: 64 KiB is no faster, 4 KiB ~2× slower on
 * bulk blob writes).
 */
const SQLITE_PAGE_SIZE = 16384;

/**
 * Open (or create, unless readonly) the store file. Errors: STORE_NOT_FOUND,
 * STORE_IS_DIRECTORY, NOT_A_STORE, STORE_TOO_NEW, STORE_NEEDS_UPGRADE, or the
 * errno / SQLite code, each one line naming the path.
 */
export function openDatabase(
  path: string,
  readonly: boolean,
  migrations: readonly Migration[],
): { file: string; db: Database.Database } {
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

  let db: Database.Database;
  try {
    db = new Database(file, { readonly, fileMustExist: true, timeout: 10_000 });
  } catch (error) {
    throw sqliteError(error, file, 'open');
  }
  try {
    const version = readSchemaVersion(db, file);
    if (version > migrations.length) migrate(db, file, version, migrations); // throws STORE_TOO_NEW, writes nothing
    if (readonly) {
      if (version < migrations.length) {
        throw new WpsnapError(
          'STORE_NEEDS_UPGRADE',
          `${file} has store schema version ${version}; open it once read-write to upgrade it to ${migrations.length}`,
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
    throw sqliteError(error, file, 'open');
  }
  return { file, db };
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

/** Build a new store beside `file` and link it into place, so a half-built store is never seen. */
function createStore(file: string, migrations: readonly Migration[]): void {
  try {
    mkdirSync(dirname(file), { recursive: true });
  } catch (error) {
    throw fsError(error, dirname(file), 'create the store directory');
  }
  const temp = `${file}.new-${process.pid}-${Math.random().toString(36).slice(2)}`;
  try {
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
  const reason = e.code !== undefined && e.syscall !== undefined ? `${e.syscall}: ${e.code}` : e.message;
  return new WpsnapError(code, `${step} ${file}: ${reason}`, {
    cause: error,
    ...(e.errno === undefined ? {} : { errno: Math.abs(e.errno) }),
    ...(e.syscall === undefined ? {} : { syscall: e.syscall }),
  });
}

/** A WpsnapError for an SQLite failure on `file`; corrupt or foreign databases are NOT_A_STORE. */
export function sqliteError(error: unknown, file: string, step: string): WpsnapError {
  if (error instanceof WpsnapError) return error;
  const code = externalCode((error as { code?: string }).code, 'STORE_IO');
  const message = ((error as Error).message ?? String(error)).replace(/\s+/g, ' ');
  if (code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT') {
    return new WpsnapError('NOT_A_STORE', `${file} is not a wpsnap store (${message})`, { cause: error });
  }
  return new WpsnapError(code, `${step} ${file}: ${message}`, { cause: error });
}
