// The page store: one SQLite file (WAL) per store. Store.open checks the file
// is a wpsnap store before anything is written to it (open.ts); writing goes
// through SnapshotWriter and the PageSink; reading through the PageReader.
import { dirname } from 'node:path';
import type Database from 'better-sqlite3';
import { WpsnapError } from '../common/errors.js';
import type { SnapshotReader } from '../snapshot-format/reader.js';
import type {
  LostRange,
  ProcessRecord,
  ProcessState,
  RegionRecord,
  SnapshotState,
  SnapshotStats,
  SnapshotSummary,
  ThreadRecord,
  VerifyReport,
} from '../snapshot-format/model.js';
import { blobOfContent, decodeIndex, encodeIndex, lowerBound, MAX_INDEX_ENTRIES, type DecodedIndex, type IndexRow } from './codec.js';
import { processStartTicks, writerAlive } from './liveness.js';
import { openDatabase, sqliteError } from './open.js';
import { PageReader } from './reader.js';
import { RecordReader } from './records.js';
import { PageSink } from './page-sink.js';
import { MIGRATIONS, type Migration } from './schema.js';
import { verifyPages } from './verify.js';
import { WorkerPool } from './worker-pool.js';
import { SnapshotWriter, type WriterHost } from './writer.js';
import { decodePageRuns, encodePageRuns, indicesWithin, lostRanges, regionRanges } from './page-ranges.js';

export { SnapshotWriter } from './writer.js';
export type { WriterCounters, WriterStats } from './writer.js';

export interface StoreOpenOptions {
  readonly?: boolean;
  /** Testing only: the migration list to run instead of MIGRATIONS. */
  migrations?: readonly Migration[];
  /**
   * Receives one line (without a "wpsnap:" prefix) when the store is open to
   * other users; at most once per store file and process. Default: printed
   * on stderr as "wpsnap: warning: …".
   */
  onWarning?: (line: string) => void;
}

const warnOnStderr = (line: string): void => {
  process.stderr.write(`wpsnap: warning: ${line}\n`);
};

interface SnapshotRow {
  id: number;
  name: string | null;
  state: SnapshotState;
  created_at: string;
  completed_at: string | null;
  writer_pid: number;
  writer_start_ticks: number | null;
  reason: string | null;
  stats: string | null;
  pids: string | null;
  /** Absent before schema version 3 (read-only media). */
  pause_micros?: number | null;
  pause_breakdown?: string | null;
  /** Absent before schema version 4. */
  parent_id?: number | null;
  incremental?: 'compared' | 'tracked' | null;
}

export class Store implements SnapshotReader {
  private readonly running = new Set<SnapshotWriter>();
  private readonly reader: PageReader;
  private readonly records: RecordReader;
  private pool: WorkerPool | undefined;
  private sink: PageSink | undefined;
  private closed = false;
  /** meta.gc_generation when the dedup index was last known valid. */
  private sinkGeneration: string | undefined;

  private constructor(
    readonly path: string,
    private readonly db: Database.Database,
    readonly readonly: boolean,
  ) {
    this.reader = new PageReader(db, path);
    this.records = new RecordReader(db, path);
  }

  /**
   * Open the store at `path`, creating it (and its directories, 0700; the file
   * 0600) unless readonly. A store on a read-only filesystem is read without
   * writing anything (FORMAT.md). Errors: STORE_NOT_FOUND, STORE_IS_DIRECTORY,
   * NOT_A_STORE, STORE_TOO_NEW, STORE_NEEDS_UPGRADE (readonly and older than
   * this build), STORE_READ_ONLY_FS (read-write on a read-only filesystem), or
   * the errno code.
   */
  static open(path: string, options: StoreOpenOptions = {}): Store {
    const readonly = options.readonly ?? false;
    const { file, db } = openDatabase(path, {
      readonly,
      migrations: options.migrations ?? MIGRATIONS,
      onWarning: options.onWarning ?? warnOnStderr,
    });
    return new Store(file, db, readonly);
  }

  /** Snapshots stage their copied pages next to the store by default (core/staging.ts). */
  get stagingDir(): string {
    return dirname(this.path);
  }

  /** Mark this process's unfinished snapshots incomplete, stop the workers, close the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const writer of [...this.running]) await writer.abort('the store was closed before the snapshot completed');
    this.closed = true;
    await this.pool?.close();
    this.db.close();
  }

  /**
   * Start a snapshot: a 'running' row with writer_pid = this process, committed
   * at once. Also loads the store's dedup index (about 50 MB and well under a
   * second per million distinct pages in the store), so call it before
   * stopping the target.
   */
  beginSnapshot(
    options: { name?: string; parent?: { ref: string; pid: number; startTimeTicks: number; incremental?: 'compared' | 'tracked' } } = {},
  ): SnapshotWriter {
    this.checkWritable('begin a snapshot');
    const name = options.name ?? null;
    const parent = options.parent === undefined ? undefined : { id: this.parentFor(options.parent), incremental: options.parent.incremental ?? 'compared' };
    if (name !== null && (name === '' || /^\d+$/.test(name) || /[\n\r]/.test(name))) {
      throw new WpsnapError('INVALID_NAME', `snapshot name ${JSON.stringify(name)} must be non-empty, not all digits, one line`);
    }
    let id: number;
    try {
      id = Number(
        this.db
          .prepare(
            // The parent's columns only for a generation: a store of an older schema has none.
            parent === undefined
              ? `INSERT INTO snapshots (name, state, created_at, writer_pid, writer_start_ticks) VALUES (?, 'running', ?, ?, ?)`
              : `INSERT INTO snapshots (name, state, created_at, writer_pid, writer_start_ticks, parent_id, incremental) VALUES (?, 'running', ?, ?, ?, ?, ?)`,
          )
          .run(name, new Date().toISOString(), process.pid, processStartTicks(process.pid), ...(parent === undefined ? [] : [parent.id, parent.incremental])).lastInsertRowid,
      );
    } catch (error) {
      if ((error as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') {
        throw new WpsnapError('NAME_TAKEN', `a snapshot named ${JSON.stringify(name)} already exists in ${this.path}`);
      }
      throw sqliteError(error, this.path, 'begin snapshot');
    }
    this.pool ??= new WorkerPool(2);
    this.sink ??= new PageSink(this.db, this.pool);
    const generation = this.gcGeneration();
    if (generation !== this.sinkGeneration) {
      if (this.running.size === 0) this.sink.invalidate();
      this.sinkGeneration = generation;
    }
    // Load the dedup index here, before the caller stops a target, not at its first batch.
    try {
      this.sink.prepare();
    } catch (error) {
      this.db.prepare(`UPDATE snapshots SET state = 'incomplete', reason = ? WHERE id = ?`).run('dedup index failed to load', id);
      throw sqliteError(error, this.path, 'load the dedup index of');
    }
    const store = this;
    const host: WriterHost = {
      db: this.db,
      sink: this.sink,
      path: this.path,
      finished(writer) {
        store.running.delete(writer);
      },
      parentProcess(pid) {
        if (parent === undefined) return undefined;
        const found = store.processes(parent.id).find((p) => p.pid === pid);
        if (found === undefined) return undefined;
        return { snapshotId: parent.id, incremental: parent.incremental, index: store.pageIndex(found.processId) };
      },
    };
    const writer = new SnapshotWriter(host, id);
    this.running.add(writer);
    return writer;
  }

  /** SnapshotTarget.parentContent: what a tracked generation may take from its parent unread. */
  parentContent(parent: { ref: string; pid: number; startTimeTicks: number }): { id: number; protectedRanges: Array<[bigint, bigint]>; lost: Array<[bigint, bigint]> } {
    const id = this.parentFor(parent);
    const processId = this.processes(id).find((p) => p.pid === parent.pid)!.processId;
    const protectedRanges = this.regions(processId)
      .filter((r) => r.capture === 'protected')
      .map((r): [bigint, bigint] => [r.start, r.end]);
    const lost = this.lost(processId).map((l): [bigint, bigint] => [l.address, l.address + BigInt(l.pages) * 4096n]);
    return { id, protectedRanges, lost };
  }

  /** The id of a generation's parent, checked: complete, and a snapshot of this very process. */
  private parentFor(parent: { ref: string; pid: number; startTimeTicks: number }): number {
    const summary = this.find(parent.ref);
    if (summary.state !== 'complete') {
      throw new WpsnapError('PARENT_INVALID', `snapshot ${summary.id} is ${summary.state}: a generation needs a complete parent`);
    }
    const processes = this.processes(summary.id);
    const same = processes.find((p) => p.pid === parent.pid && p.startTimeTicks === parent.startTimeTicks);
    if (same === undefined) {
      const held = processes.map((p) => `pid ${p.pid}`).join(', ');
      const reused = processes.some((p) => p.pid === parent.pid);
      throw new WpsnapError(
        'PARENT_INVALID',
        `snapshot ${summary.id} is not of this process: it holds ${held}${reused ? ' started at another time (the pid was reused)' : ''}, not pid ${parent.pid}`,
      );
    }
    return summary.id;
  }

  /** Every snapshot, oldest first. Running snapshots whose writer died are reported (and marked) incomplete. */
  list(): SnapshotSummary[] {
    return this.summaries('', []);
  }

  /** A snapshot by numeric id or by name. */
  find(ref: string): SnapshotSummary {
    const byId = /^\d+$/.test(ref);
    const found = this.summaries(byId ? 'WHERE s.id = ?' : 'WHERE s.name = ?', [byId ? Number(ref) : ref]);
    const summary = found[0];
    if (summary === undefined) {
      throw new WpsnapError('SNAPSHOT_NOT_FOUND', `no snapshot ${byId ? ref : JSON.stringify(ref)} in ${this.path}`);
    }
    return summary;
  }

  processes(snapshotId: number): Array<ProcessRecord & { processId: number }> {
    return this.records.processes(snapshotId);
  }

  /** The process state recorded with the process (schema 6), or undefined when none was. */
  processState(processId: number): ProcessState | undefined {
    return this.records.processState(processId);
  }

  threads(processId: number): ThreadRecord[] {
    return this.records.threads(processId);
  }

  regions(processId: number): RegionRecord[] {
    return this.records.regions(processId);
  }

  lost(processId: number): LostRange[] {
    return this.records.lost(processId);
  }

  /** The stored (non-zero) pages of a process in address order; each `data` is a fresh 4096-byte Buffer. */
  pages(processId: number): Iterable<{ address: bigint; data: Buffer }> {
    return this.reader.pagesInRange(processId, 0n, 1n << 64n);
  }

  /** Stored pages of a process in [start, end): pages() without decoding what lies outside. */
  pagesInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }> {
    return this.reader.pagesInRange(processId, start, end);
  }

  /** pagesInRange() with each `data` a view valid only until the next step (copy it before): no Buffer per page. */
  pageViewsInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }> {
    return this.reader.pageViewsInRange(processId, start, end);
  }

  /**
   * The stored pages of a process in [start, start + into.length), copied into
   * `into` at their offsets (other bytes untouched), and marked in `stored`;
   * pagesInRange() without a Buffer per page. Returns the pages stored.
   */
  readRangeInto(processId: number, start: bigint, into: Buffer, stored?: Uint8Array): number {
    return this.reader.readRangeInto(processId, start, into, stored);
  }

  /** readRangeInto decoding only the index rows that cross the range; undefined for a generation (use readRangeInto). */
  readRangeIntoFromRows(processId: number, start: bigint, into: Buffer, stored?: Uint8Array): number | undefined {
    return this.reader.readRangeIntoFromRows(processId, start, into, stored);
  }

  /** Every stored page of a process: addresses ascending and their content ids (equal ids, equal content). */
  pageIndex(processId: number): DecodedIndex {
    return this.reader.index(processId);
  }

  /** Do two content ids hold the same page? Equal ids do; others compare their content hashes (a page stored twice). */
  sameContent(a: number, b: number): boolean {
    return a === b || this.reader.contentHash(a).equals(this.reader.contentHash(b));
  }

  /** The page a content id holds (a view: copy it to keep it). */
  content(cid: number): Buffer {
    return this.reader.content(cid);
  }

  /**
   * The page at `address` (4096 bytes): its stored content, or zeros if none is
   * stored (a zero page, or a page of a lost range: check lost()).
   */
  readPage(processId: number, address: bigint): Buffer {
    return this.reader.readPage(processId, address);
  }

  /**
   * Re-read every stored page of the snapshot: decompress each blob (in the
   * worker pool), re-hash each page, compare with its content hash; check every
   * index entry points at existing content. Problems name the page and blob.
   */
  async verify(snapshotId: number): Promise<VerifyReport> {
    const summary = this.find(String(snapshotId));
    this.pool ??= new WorkerPool(2);
    const { pagesChecked, problems } = await verifyPages(this.db, this.pool, this.processes(snapshotId));
    return { ok: problems.length === 0, snapshot: snapshotId, state: summary.state, pagesChecked, problems };
  }

  /**
   * Delete a snapshot (not one still being written), then drop the blobs no
   * other snapshot references. Blob collection is skipped while any snapshot
   * is running (its writer may be about to reference them); it happens on a
   * later delete. Returns the number of blobs dropped.
   */
  delete(snapshotId: number, options: { force?: boolean } = {}): { blobsDeleted: number; bytesFreed: number; folded: number[] } {
    this.checkWritable('delete a snapshot');
    const summary = this.find(String(snapshotId));
    if (summary.state === 'running') {
      throw new WpsnapError('SNAPSHOT_RUNNING', `snapshot ${snapshotId} is still being written`);
    }
    const children = this.children(snapshotId);
    if (children.length > 0 && !options.force) {
      const running = children.filter((c) => c.state === 'running');
      throw new WpsnapError(
        'HAS_GENERATIONS',
        `snapshot ${snapshotId} is the parent of generation${children.length > 1 ? 's' : ''} ${children.map((c) => c.id).join(', ')}: ` +
          (running.length > 0 ? 'one is still being written' : 'delete those first, or add --force to fold its pages into them'),
      );
    }
    if (children.some((c) => c.state === 'running')) {
      throw new WpsnapError('SNAPSHOT_RUNNING', `a generation of snapshot ${snapshotId} is still being written`);
    }
    let freed = { blobsDeleted: 0, bytesFreed: 0 };
    this.db
      .transaction(() => {
        // Each generation of it takes over what it took from it: rebased onto its grandparent.
        for (const child of children) this.rebase(child.id, summary.parentId);
        this.db.prepare('DELETE FROM snapshots WHERE id = ?').run(snapshotId);
        freed = this.collectBlobs();
      })
      .immediate();
    return { ...freed, folded: children.map((c) => c.id) };
  }

  /** Drop the blobs no snapshot references any more (not while a snapshot is being written); what it freed. */
  gc(): { blobsDeleted: number; bytesFreed: number; skipped: string | null } {
    this.checkWritable('collect unused pages of');
    let freed = { blobsDeleted: 0, bytesFreed: 0 };
    let skipped: string | null = null;
    this.db
      .transaction(() => {
        this.list(); // marks dead writers' snapshots incomplete
        if (this.db.prepare("SELECT 1 FROM snapshots WHERE state = 'running' LIMIT 1").get() !== undefined) {
          skipped = 'a snapshot is being written: its writer may be about to use them';
          return;
        }
        freed = this.collectBlobs();
      })
      .immediate();
    return { ...freed, skipped };
  }

  /** The generations whose parent is this snapshot. */
  children(snapshotId: number): SnapshotSummary[] {
    if (!this.hasGenerations()) return [];
    return this.summaries('WHERE s.parent_id = ?', [snapshotId]);
  }

  /** The chain a snapshot belongs to: its ancestors (oldest first), itself, then every descendant. */
  chain(snapshotId: number): SnapshotSummary[] {
    const all = this.list();
    const byId = new Map(all.map((s) => [s.id, s]));
    const up: SnapshotSummary[] = [];
    for (let s = byId.get(snapshotId); s !== undefined; s = s.parentId === null ? undefined : byId.get(s.parentId)) {
      if (up.includes(s)) break;
      up.unshift(s);
    }
    const down: SnapshotSummary[] = [];
    const walk = (id: number): void => {
      for (const c of all.filter((s) => s.parentId === id)) {
        down.push(c);
        walk(c.id);
      }
    };
    walk(snapshotId);
    return [...up, ...down];
  }

  private hasGenerations(): boolean {
    return this.db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'generation_pages'").get() !== undefined;
  }

  /**
   * Make generation `childId` read exactly as it does now with `newParent`
   * (or none) as its parent: it stores itself every page that differs from
   * the new parent's, and records as zeroed those the new parent has and it
   * does not. Its dirty set grows by its old parent's. Inside the caller's
   * transaction.
   */
  private rebase(childId: number, newParent: number | null): void {
    const oldParent = this.find(String(childId)).parentId;
    const insertRow = this.db.prepare('INSERT INTO page_index (process_id, first_address, last_address, count, entries) VALUES (?, ?, ?, ?, ?)');
    for (const p of this.processes(childId)) {
      const now = this.pageIndex(p.processId);
      const base = newParent === null ? undefined : this.processes(newParent).find((q) => q.pid === p.pid);
      const baseIndex = base === undefined ? { addresses: new BigUint64Array(0), cids: new Float64Array(0) } : this.pageIndex(base.processId);
      const keepAddresses: bigint[] = [];
      const keepCids: number[] = [];
      for (let i = 0; i < now.addresses.length; i++) {
        const a = now.addresses[i] as bigint;
        const j = lowerBound(baseIndex.addresses, a);
        if (baseIndex.addresses[j] === a && baseIndex.cids[j] === now.cids[i]) continue;
        keepAddresses.push(a);
        keepCids.push(now.cids[i] as number);
      }
      // What the new parent has inside this generation's regions, outside its lost ranges, and it does not.
      const zeroed = indicesWithin(baseIndex.addresses, regionRanges(this.db, p.processId), lostRanges(this.db, p.processId))
        .map((i) => baseIndex.addresses[i] as bigint)
        .filter((a) => now.addresses[lowerBound(now.addresses, a)] !== a);
      const dirty = [...this.generationRanges(p.processId, 'dirty')];
      const oldParentProcess = oldParent === null ? undefined : this.processes(oldParent).find((q) => q.pid === p.pid);
      if (oldParentProcess !== undefined && newParent !== null) dirty.push(...this.generationRanges(oldParentProcess.processId, 'dirty'));
      this.db.prepare('DELETE FROM page_index WHERE process_id = ?').run(p.processId);
      this.db.prepare('DELETE FROM generation_pages WHERE process_id = ?').run(p.processId);
      for (let at = 0; at < keepAddresses.length; at += MAX_INDEX_ENTRIES) {
        const addresses = BigUint64Array.from(keepAddresses.slice(at, at + MAX_INDEX_ENTRIES));
        const cids = keepCids.slice(at, at + MAX_INDEX_ENTRIES);
        insertRow.run(p.processId, addresses[0] as bigint, addresses[addresses.length - 1] as bigint, addresses.length, encodeIndex(addresses, cids));
      }
      if (newParent !== null) {
        const insert = this.db.prepare('INSERT INTO generation_pages (process_id, kind, ranges) VALUES (?, ?, ?)');
        if (zeroed.length > 0) insert.run(p.processId, 'zeroed', encodePageRuns(zeroed));
        insert.run(p.processId, 'dirty', encodePageRuns([...new Set(dirty)].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0))));
      }
    }
    this.db.prepare('UPDATE snapshots SET parent_id = ?, incremental = ? WHERE id = ?').run(newParent, newParent === null ? null : this.find(String(childId)).incremental, childId);
  }

  /** The pages of a generation's process in one kind of generation_pages, ascending. */
  private *generationRanges(processId: number, kind: 'zeroed' | 'dirty'): Iterable<bigint> {
    for (const row of this.db.prepare('SELECT ranges FROM generation_pages WHERE process_id = ? AND kind = ?').all(processId, kind) as Array<{ ranges: Buffer }>) {
      for (const [start, end] of decodePageRuns(row.ranges)) for (let a = start; a < end; a += 4096n) yield a;
    }
  }

  /** The changed pages recorded for a generation's process (its dirty set since its parent). */
  dirtyPages(processId: number): bigint[] {
    if (!this.hasGenerations()) return [];
    return [...this.generationRanges(processId, 'dirty')];
  }

  /** Drop every blob no page_index entry references; inside the caller's transaction, with no snapshot running. */
  private collectBlobs(): { blobsDeleted: number; bytesFreed: number } {
    this.list(); // marks dead writers' snapshots incomplete
    const stillRunning = this.db.prepare("SELECT 1 FROM snapshots WHERE state = 'running' LIMIT 1").get();
    if (stillRunning !== undefined) return { blobsDeleted: 0, bytesFreed: 0 };
    const used = new Set<number>();
    const rows = this.db.prepare('SELECT first_address, last_address, count, entries FROM page_index').safeIntegers(true);
    for (const row of rows.iterate() as Iterable<IndexRow>) {
      for (const cid of decodeIndex(row).cids) used.add(blobOfContent(cid));
    }
    const unused: Array<{ id: number; bytes: number }> = [];
    for (const row of this.db.prepare('SELECT id, length(data) AS bytes FROM blobs').all() as Array<{ id: number; bytes: number }>) {
      if (!used.has(row.id)) unused.push(row);
    }
    if (unused.length === 0) return { blobsDeleted: 0, bytesFreed: 0 };
    const dropBlob = this.db.prepare('DELETE FROM blobs WHERE id = ?');
    let bytesFreed = 0;
    for (const { id, bytes } of unused) {
      dropBlob.run(id);
      this.reader.forgetBlob(id);
      bytesFreed += bytes;
    }
    // Writers (here and in other processes) rebuild their dedup index when this changes.
    this.db.prepare("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'gc_generation'").run();
    return { blobsDeleted: unused.length, bytesFreed };
  }

  private gcGeneration(): string {
    const row = this.db.prepare("SELECT value FROM meta WHERE key = 'gc_generation'").get() as { value: string } | undefined;
    return row?.value ?? '0';
  }

  private summaries(where: string, params: unknown[]): SnapshotSummary[] {
    const rows = this.db
      .prepare(
        `SELECT s.*, (SELECT group_concat(pid) FROM (SELECT pid FROM processes WHERE snapshot_id = s.id ORDER BY pid)) AS pids
         FROM snapshots s ${where} ORDER BY s.id`,
      )
      .all(...params) as SnapshotRow[];
    const markDead = this.readonly
      ? undefined
      : this.db.prepare(`UPDATE snapshots SET state = 'incomplete', reason = ? WHERE id = ? AND state = 'running'`);
    return rows.map((row) => {
      let state = row.state;
      if (state === 'running' && !writerAlive(row.writer_pid, row.writer_start_ticks)) {
        state = 'incomplete';
        markDead?.run(`writer process ${row.writer_pid} died before the snapshot completed`, row.id);
      }
      return {
        id: row.id,
        name: row.name,
        state,
        createdAt: row.created_at,
        completedAt: row.completed_at,
        pids: row.pids === null ? [] : row.pids.split(',').map(Number),
        stats: row.stats === null ? null : (JSON.parse(row.stats) as SnapshotStats),
        pauseMicros: row.pause_micros ?? null,
        pauseBreakdownMicros: row.pause_breakdown == null ? null : (JSON.parse(row.pause_breakdown) as Record<string, number>),
        parentId: row.parent_id ?? null,
        incremental: row.incremental ?? null,
      };
    });
  }

  private checkWritable(step: string): void {
    if (this.closed) throw new WpsnapError('STORE_CLOSED', `cannot ${step}: ${this.path} is closed`);
    if (this.readonly) throw new WpsnapError('STORE_READONLY', `cannot ${step}: ${this.path} is open read-only`);
  }
}
