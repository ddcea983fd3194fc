// The store's SQLite schema, its version, and the migrations between versions.
// FORMAT.md (snapshot-format/) draws every table; keep the two in step.
import type Database from 'better-sqlite3';
import { WpsnapError } from '../common/errors.js';

/** `PRAGMA application_id` of every wpsnap store: "wpsn" as a big-endian u32. */
export const APPLICATION_ID = 0x7770736e;
/** `meta.format` of every wpsnap store. */
export const STORE_FORMAT = 'wpsnap-store';
/** Bytes 0..15 of every SQLite 3 database file. */
const SQLITE_MAGIC = Buffer.from('SQLite format 3\0', 'latin1');
/** Offset of the big-endian application_id in the SQLite file header. */
const APPLICATION_ID_OFFSET = 68;

/** One migration: turns a store of version i into version i + 1. Runs inside a transaction. */
export type Migration = (db: Database.Database) => void;

const V1_SCHEMA = `
CREATE TABLE meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE snapshots (
  id                 INTEGER PRIMARY KEY AUTOINCREMENT,
  name               TEXT UNIQUE,
  state              TEXT NOT NULL CHECK (state IN ('running', 'complete', 'incomplete')),
  created_at         TEXT NOT NULL,
  completed_at       TEXT,
  writer_pid         INTEGER NOT NULL,
  writer_start_ticks INTEGER,
  reason             TEXT,
  stats              TEXT
);

CREATE TABLE processes (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  snapshot_id      INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
  pid              INTEGER NOT NULL,
  ppid             INTEGER NOT NULL,
  uid              INTEGER NOT NULL,
  gid              INTEGER NOT NULL,
  exe              TEXT NOT NULL,
  cmdline          TEXT NOT NULL,
  comm             TEXT NOT NULL,
  start_time_ticks INTEGER NOT NULL,
  started_at       TEXT NOT NULL,
  auxv             BLOB NOT NULL,
  UNIQUE (snapshot_id, pid)
);

CREATE TABLE threads (
  process_id INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  tid        INTEGER NOT NULL,
  name       TEXT NOT NULL,
  regs       BLOB NOT NULL,
  fpregs     BLOB NOT NULL,
  xstate     BLOB NOT NULL,
  PRIMARY KEY (process_id, tid)
);

CREATE TABLE regions (
  process_id    INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  start_address INTEGER NOT NULL,
  end_address   INTEGER NOT NULL,
  perms         TEXT NOT NULL,
  file_offset   INTEGER NOT NULL,
  dev           TEXT NOT NULL,
  inode         INTEGER NOT NULL,
  path          TEXT NOT NULL,
  page_size     INTEGER NOT NULL,
  capture       TEXT NOT NULL CHECK (capture IN ('protected', 'file-private', 'file-reference', 'skipped')),
  skip_reason   TEXT,
  file_path     TEXT,
  file_dev      INTEGER,
  file_ino      INTEGER,
  file_size     INTEGER,
  file_mtime_ns TEXT,
  PRIMARY KEY (process_id, start_address)
);

CREATE TABLE lost (
  process_id INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  address    INTEGER NOT NULL,
  pages      INTEGER NOT NULL,
  reason     TEXT NOT NULL
);
CREATE INDEX lost_by_process ON lost (process_id, address);

CREATE TABLE page_index (
  id            INTEGER PRIMARY KEY,
  process_id    INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  first_address INTEGER NOT NULL,
  last_address  INTEGER NOT NULL,
  count         INTEGER NOT NULL,
  entries       BLOB NOT NULL
);
CREATE INDEX page_index_by_address ON page_index (process_id, first_address);

CREATE TABLE blobs (
  id     INTEGER PRIMARY KEY,
  pages  INTEGER NOT NULL,
  codec  INTEGER NOT NULL,
  hashes BLOB NOT NULL,
  data   BLOB NOT NULL
);
`;

function migrateTo1(db: Database.Database): void {
  db.exec(V1_SCHEMA);
  const put = db.prepare('INSERT INTO meta (key, value) VALUES (?, ?)');
  put.run('format', STORE_FORMAT);
  put.run('created_at', new Date().toISOString());
  put.run('gc_generation', '0');
}

/**
 * Version 2: a region copied whole during the pause ([vdso], a SysV segment,
 * a private file mapping whose file cannot be referenced) has its own capture
 * value, 'copied', instead of 'file-private' without a file reference. SQLite
 * cannot change a CHECK constraint, so the table is rebuilt; nothing
 * references regions, and its rows keep their primary key.
 */
function migrateTo2(db: Database.Database): void {
  db.exec(`
CREATE TABLE regions_v2 (
  process_id    INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  start_address INTEGER NOT NULL,
  end_address   INTEGER NOT NULL,
  perms         TEXT NOT NULL,
  file_offset   INTEGER NOT NULL,
  dev           TEXT NOT NULL,
  inode         INTEGER NOT NULL,
  path          TEXT NOT NULL,
  page_size     INTEGER NOT NULL,
  capture       TEXT NOT NULL CHECK (capture IN ('protected', 'copied', 'file-private', 'file-reference', 'skipped')),
  skip_reason   TEXT,
  file_path     TEXT,
  file_dev      INTEGER,
  file_ino      INTEGER,
  file_size     INTEGER,
  file_mtime_ns TEXT,
  PRIMARY KEY (process_id, start_address)
);
INSERT INTO regions_v2
  SELECT process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size,
         CASE WHEN capture = 'file-private' AND file_path IS NULL THEN 'copied' ELSE capture END,
         skip_reason, file_path, file_dev, file_ino, file_size, file_mtime_ns
  FROM regions;
DROP TABLE regions;
ALTER TABLE regions_v2 RENAME TO regions;
`);
}

/**
 * Version 3: each process's pid in every PID namespace it is in (NSpid of
 * /proc/PID/status, outermost first, as JSON), and the pause of a snapshot
 * recorded as soon as it is over, so an incomplete snapshot keeps it. Columns
 * only: a row of an older version reads as "not recorded" (NULL).
 */
function migrateTo3(db: Database.Database): void {
  db.exec(`
ALTER TABLE processes ADD COLUMN ns_pids TEXT;
ALTER TABLE snapshots ADD COLUMN pause_micros INTEGER;
ALTER TABLE snapshots ADD COLUMN pause_breakdown TEXT;
`);
}

/**
 * Version 4: generations. A snapshot may name its parent (`parent_id`) and how
 * it knows what changed since (`incremental`: 'compared' when every page was
 * captured and compared with the parent's, 'tracked' when only the pages
 * written since were). A generation's page_index holds only the pages whose
 * content differs from its parent's; `generation_pages` holds, per process,
 * the page ranges that turned zero since the parent (`zeroed`: the parent's
 * page must not show through) and those written since (`dirty`, which
 * includes pages written back with the value they held). A reader resolves
 * a generation's page through its parent, within the generation's regions
 * and outside its lost ranges.
 */
function migrateTo4(db: Database.Database): void {
  db.exec(`
ALTER TABLE snapshots ADD COLUMN parent_id INTEGER REFERENCES snapshots(id);
ALTER TABLE snapshots ADD COLUMN incremental TEXT CHECK (incremental IN ('compared', 'tracked'));
CREATE INDEX snapshots_by_parent ON snapshots (parent_id);
CREATE TABLE generation_pages (
  process_id INTEGER NOT NULL REFERENCES processes(id) ON DELETE CASCADE,
  kind       TEXT NOT NULL CHECK (kind IN ('zeroed', 'dirty')),
  ranges     BLOB NOT NULL
);
CREATE INDEX generation_pages_by_process ON generation_pages (process_id, kind);
`);
}

/**
 * Version 5: each thread's blocked signal mask at T (`threads.sigmask`). A
 * mask is 64 bits and SQLite's INTEGER a signed 64-bit one: the column holds
 * the mask's two's complement (bit 63, SIGRTMAX, makes it negative), written
 * and read as a BigInt (better-sqlite3's safeIntegers) and taken back with
 * BigInt.asUintN(64), as region addresses are. A column only: rows from
 * before hold NULL, "not recorded", never an empty mask.
 */
function migrateTo5(db: Database.Database): void {
  db.exec('ALTER TABLE threads ADD COLUMN sigmask INTEGER;');
}

/**
 * Version 6: the process state a restore will need besides memory, threads
 * and registers (issue 13): open fds, cwd and root, umask, credentials,
 * personality, rlimits, the mm fields of /proc/PID/stat and the executable's
 * identity, as one JSON document per process (ProcessState of
 * snapshot-format/model.ts; FORMAT.md lists its fields). A table of its own,
 * one row per process: a process of an older snapshot has no row, "not
 * recorded", never an empty state.
 */
function migrateTo6(db: Database.Database): void {
  db.exec(`
CREATE TABLE process_state (
  process_id INTEGER PRIMARY KEY REFERENCES processes(id) ON DELETE CASCADE,
  state      TEXT NOT NULL
);
`);
}

/**
 * Version 7: what a restore gives each thread again besides its registers
 * (threads.kernel_state, JSON): clear_child_tid, the robust futex list and
 * the rseq registration, addresses as decimal strings. NULL: not recorded.
 */
function migrateTo7(db: Database.Database): void {
  db.exec('ALTER TABLE threads ADD COLUMN kernel_state TEXT;');
}

/**
 * Version 8: an index on each page_index row's span (process_id,
 * first_address, last_address): the rows that cross a range are found in the
 * index alone, without reading every row of the process (a lazy restore reads
 * a few pages before the process runs; the table scan took 28 ms at 1 GiB).
 */
function migrateTo8(db: Database.Database): void {
  db.exec('CREATE INDEX page_index_span ON page_index (process_id, first_address, last_address);');
}

/**
 * MIGRATIONS[i] turns a version-i store into version i + 1; version 0 is an
 * empty database. To change the schema, append a function here: never edit
 * one that has shipped.
 */
export const MIGRATIONS: readonly Migration[] = [migrateTo1, migrateTo2, migrateTo3, migrateTo4, migrateTo5, migrateTo6, migrateTo7, migrateTo8];

/**
 * The oldest version a read-only open reads without upgrading, where no
 * upgrade is possible (read-only media): every later step only adds columns
 * or tables, which readers take as not recorded when absent.
 */
export const OLDEST_READABLE_VERSION = 2;

/** Check the first 100 bytes of an existing file without opening it as a database. */
export function checkHeader(path: string, header: Buffer): void {
  if (header.length < 100 || !header.subarray(0, 16).equals(SQLITE_MAGIC)) {
    throw new WpsnapError('NOT_A_STORE', `${path} is not a wpsnap store (not an SQLite database)`);
  }
  const applicationId = header.readUInt32BE(APPLICATION_ID_OFFSET);
  if (applicationId !== APPLICATION_ID) {
    throw new WpsnapError(
      'NOT_A_STORE',
      `${path} is not a wpsnap store (an SQLite database with application_id 0x${applicationId.toString(16)})`,
    );
  }
}

/** The schema version recorded in `meta`, after checking the wpsnap marker. */
export function readSchemaVersion(db: Database.Database, path: string): number {
  const hasMeta = db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta'").get();
  if (hasMeta === undefined) {
    throw new WpsnapError('NOT_A_STORE', `${path} is not a wpsnap store (no meta table)`);
  }
  const rows = db.prepare("SELECT key, value FROM meta WHERE key IN ('format', 'schema_version')").all() as Array<{
    key: string;
    value: string;
  }>;
  const meta = new Map(rows.map((row) => [row.key, row.value]));
  if (meta.get('format') !== STORE_FORMAT) {
    throw new WpsnapError('NOT_A_STORE', `${path} is not a wpsnap store (meta.format is not ${STORE_FORMAT})`);
  }
  const version = Number(meta.get('schema_version'));
  if (!Number.isSafeInteger(version) || version < 1) {
    throw new WpsnapError('NOT_A_STORE', `${path} is not a wpsnap store (bad meta.schema_version)`);
  }
  return version;
}

/**
 * Bring the database from version `from` to `migrations.length`, one
 * transaction per step, recording each new version in `meta`. A store newer
 * than this build is refused before anything is written.
 */
export function migrate(
  db: Database.Database,
  path: string,
  from: number,
  migrations: readonly Migration[] = MIGRATIONS,
): number {
  const latest = migrations.length;
  if (from > latest) {
    throw new WpsnapError(
      'STORE_TOO_NEW',
      `${path} has store schema version ${from}; this wpsnap reads versions up to ${latest} (upgrade wpsnap)`,
    );
  }
  for (let version = from; version < latest; version++) {
    const step = migrations[version];
    if (step === undefined) throw new Error(`missing migration ${version} -> ${version + 1}`);
    db.transaction(() => {
      step(db);
      db.prepare(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
      ).run(String(version + 1));
    }).immediate();
  }
  return latest;
}
