// One snapshot being written. Metadata goes in directly, each call its own
// transaction; pages go through the PageSink; complete() is the one final
// transaction that makes the snapshot visible as complete.
import type Database from 'better-sqlite3';
import { WpsnapError, externalCode } from '../common/errors.js';
import {
  LOST_REASONS,
  PAGE_SIZE,
  type LostRange,
  type PageBatch,
  type ProcessRecord,
  type RegionRecord,
  type SnapshotStats,
  type ThreadRecord,
} from '../snapshot-format/model.js';
import { MAX_ADDRESS } from './codec.js';

const U64_MAX = (1n << 64n) - 1n;
import type { PageSink } from './page-sink.js';

export type WriterStats = Omit<SnapshotStats, 'pagesSaved' | 'zeroPages' | 'pagesNew' | 'bytesRaw' | 'bytesStored'>;

export interface WriterCounters {
  /** Non-zero pages stored, deduplicated or not. */
  pagesSaved: number;
  /** All-zero pages seen (not stored). */
  zeroPages: number;
  /** Pages that were new content for the store. */
  pagesNew: number;
  /** Bytes of pages received (zero pages included). */
  bytesRaw: number;
  /** Bytes of compressed blobs written. */
  bytesStored: number;
}

/** What the Store lends a writer. */
export interface WriterHost {
  readonly db: Database.Database;
  readonly sink: PageSink;
  readonly path: string;
  finished(writer: SnapshotWriter): void;
}

const PAGE_MASK = BigInt(PAGE_SIZE - 1);
const LOST_REASON_SET: ReadonlySet<string> = new Set(LOST_REASONS);

export class SnapshotWriter {
  readonly counters: WriterCounters = { pagesSaved: 0, zeroPages: 0, pagesNew: 0, bytesRaw: 0, bytesStored: 0 };
  private readonly inFlight = new Set<Promise<void>>();
  private readonly processIds = new Set<number>();
  private failure: Error | undefined;
  private open = true;
  /** Settles when complete() or abort() has finished (never rejects). */
  private finishing: Promise<unknown> | undefined;

  constructor(
    private readonly host: WriterHost,
    readonly id: number,
  ) {}

  /** True until complete() or abort() is called. */
  get running(): boolean {
    return this.open;
  }

  addProcess(p: ProcessRecord): number {
    this.checkOpen();
    if (p.nsPids !== undefined && (p.nsPids.length === 0 || !p.nsPids.every((pid) => Number.isSafeInteger(pid) && pid > 0))) {
      throw new WpsnapError('INVALID_PROCESS', `process ${p.pid}: nsPids ${JSON.stringify(p.nsPids)} is not a list of pids`);
    }
    // ns_pids only when known: the tests' stores of older schema versions lack the column.
    const values: Record<string, unknown> = {
      snapshot_id: this.id,
      pid: p.pid,
      ppid: p.ppid,
      uid: p.uid,
      gid: p.gid,
      exe: p.exe,
      cmdline: JSON.stringify(p.cmdline),
      comm: p.comm,
      start_time_ticks: p.startTimeTicks,
      started_at: p.startedAt,
      auxv: p.auxv,
      ...(p.nsPids === undefined ? {} : { ns_pids: JSON.stringify(p.nsPids) }),
    };
    const columns = Object.keys(values);
    try {
      const info = this.host.db
        .prepare(`INSERT INTO processes (${columns.join(', ')}) VALUES (${columns.map((c) => `@${c}`).join(', ')})`)
        .run(values);
      const processId = Number(info.lastInsertRowid);
      this.processIds.add(processId);
      return processId;
    } catch (error) {
      if ((error as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') {
        throw new WpsnapError('DUPLICATE_PROCESS', `snapshot ${this.id} already holds process ${p.pid}`);
      }
      throw this.wrap(error, `add process ${p.pid}`);
    }
  }

  /**
   * Record the pause as soon as it is over (its own transaction), so that
   * the snapshot keeps it even if it never completes. `breakdown`: microseconds
   * per phase.
   */
  recordPause<Phases extends Record<keyof Phases, number>>(micros: number, breakdown: Phases): void {
    this.checkOpen();
    const values: number[] = [micros, ...Object.values<number>(breakdown)];
    if (!values.every((v) => Number.isFinite(v) && v >= 0)) {
      throw new WpsnapError('INVALID_PAUSE', `pause ${micros} µs (${JSON.stringify(breakdown)}) is not a duration`);
    }
    this.transaction(`record the pause of snapshot ${this.id}`, () => {
      this.host.db
        .prepare(`UPDATE snapshots SET pause_micros = ?, pause_breakdown = ? WHERE id = ?`)
        .run(Math.round(micros), JSON.stringify(breakdown), this.id);
    });
  }

  addThreads(processId: number, threads: ThreadRecord[]): void {
    this.checkProcess(processId);
    const insert = this.host.db.prepare(
      'INSERT INTO threads (process_id, tid, name, regs, fpregs, xstate) VALUES (?, ?, ?, ?, ?, ?)',
    );
    this.transaction(`add threads of process ${processId}`, () => {
      for (const t of threads) insert.run(processId, t.tid, t.name, t.regs, t.fpregs, t.xstate);
    });
  }

  addRegions(processId: number, regions: RegionRecord[]): void {
    this.checkProcess(processId);
    for (const r of regions) {
      // Region records span the whole 64-bit space ([vsyscall] is at 0xffffffffff600000).
      if (r.start >= r.end || (r.start & PAGE_MASK) !== 0n || (r.end & PAGE_MASK) !== 0n || r.end > U64_MAX) {
        throw new WpsnapError('INVALID_REGION', `region 0x${r.start.toString(16)}-0x${r.end.toString(16)} is not a page-aligned range`);
      }
      if (r.offset < 0n || r.offset > MAX_ADDRESS) {
        throw new WpsnapError('INVALID_REGION', `region 0x${r.start.toString(16)} has file offset ${r.offset} out of range`);
      }
    }
    const insert = this.host.db.prepare(
      `INSERT INTO regions (process_id, start_address, end_address, perms, file_offset, dev, inode, path, page_size,
         capture, skip_reason, file_path, file_dev, file_ino, file_size, file_mtime_ns)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    this.transaction(`add regions of process ${processId}`, () => {
      for (const r of regions) {
        insert.run(
          processId,
          BigInt.asIntN(64, r.start),
          BigInt.asIntN(64, r.end),
          r.perms,
          r.offset,
          r.dev,
          r.inode,
          r.path,
          r.pageSize,
          r.capture,
          r.skipReason ?? null,
          r.file?.path ?? null,
          r.file?.dev ?? null,
          r.file?.ino ?? null,
          r.file?.size ?? null,
          r.file?.mtimeNs ?? null,
        );
      }
    });
  }

  /**
   * Store a batch of pages. Resolves once the batch is committed; batch.data
   * may be reused then. Many calls may be in flight at once. Every error
   * (INVALID_BATCH, UNKNOWN_PROCESS, WRITER_CLOSED, STORE_WRITE …) is a rejection.
   */
  addPages(processId: number, batch: PageBatch): Promise<void> {
    try {
      this.checkProcess(processId);
    } catch (error) {
      return Promise.reject(error as Error);
    }
    const work = this.host.sink.add(processId, batch).then(
      (result) => {
        this.counters.pagesSaved += result.pagesSaved;
        this.counters.zeroPages += result.zeroPages;
        this.counters.pagesNew += result.pagesNew;
        this.counters.bytesRaw += result.pages * PAGE_SIZE;
        this.counters.bytesStored += result.bytesStored;
      },
      (error: unknown) => {
        this.failure ??= error as Error;
        throw error;
      },
    );
    const tracked = work.catch(() => undefined);
    this.inFlight.add(tracked);
    void tracked.then(() => this.inFlight.delete(tracked));
    return work;
  }

  addLost(processId: number, lost: LostRange[]): void {
    this.checkProcess(processId);
    for (const l of lost) {
      if ((l.address & PAGE_MASK) !== 0n || l.address > MAX_ADDRESS || !Number.isSafeInteger(l.pages) || l.pages < 1) {
        throw new WpsnapError('INVALID_LOST', `lost range at 0x${l.address.toString(16)} of ${l.pages} pages is invalid`);
      }
      if (!LOST_REASON_SET.has(l.reason)) throw new WpsnapError('INVALID_LOST', `unknown lost reason ${JSON.stringify(l.reason)}`);
    }
    const insert = this.host.db.prepare('INSERT INTO lost (process_id, address, pages, reason) VALUES (?, ?, ?, ?)');
    this.transaction(`add lost pages of process ${processId}`, () => {
      for (const l of lost) insert.run(processId, l.address, l.pages, l.reason);
    });
  }

  /**
   * Wait for every batch in flight, then mark the snapshot complete in one
   * transaction, synced to disk (synchronous = FULL) before it returns.
   */
  complete(stats: WriterStats): Promise<SnapshotStats> {
    try {
      this.checkOpen();
    } catch (error) {
      return Promise.reject(error as Error);
    }
    this.open = false;
    const finishing = this.finishComplete(stats);
    this.finishing = finishing.catch(() => undefined);
    return finishing;
  }

  private async finishComplete(stats: WriterStats): Promise<SnapshotStats> {
    try {
      await this.drain();
      if (this.failure !== undefined) {
        throw new WpsnapError(
          'SNAPSHOT_WRITE_FAILED',
          `snapshot ${this.id} cannot complete: a page batch failed (${this.failure.message})`,
          { cause: this.failure },
        );
      }
      const full: SnapshotStats = { ...stats, ...this.counters };
      const db = this.host.db;
      db.pragma('synchronous = FULL');
      try {
        const changes = db
          .prepare(
            `UPDATE snapshots SET state = 'complete', completed_at = ?, stats = ? WHERE id = ? AND state = 'running'`,
          )
          .run(new Date().toISOString(), JSON.stringify(full), this.id).changes;
        if (changes !== 1) {
          throw new WpsnapError('SNAPSHOT_NOT_RUNNING', `snapshot ${this.id} is no longer running in ${this.host.path}`);
        }
      } finally {
        db.pragma('synchronous = NORMAL');
      }
      return full;
    } catch (error) {
      this.markIncomplete(error instanceof Error ? error.message : String(error));
      throw this.wrap(error, `complete snapshot ${this.id}`);
    } finally {
      this.host.finished(this);
    }
  }

  /** Count zero pages that were never handed over (the engine found them never written). */
  countZeroPages(pages: number): void {
    if (!Number.isSafeInteger(pages) || pages < 0) throw new WpsnapError('INVALID_COUNT', `zero page count ${pages} is not a count`);
    this.counters.zeroPages += pages;
  }

  /**
   * Wait for the batches in flight, then mark the snapshot incomplete with the
   * reason. After complete() or abort(), waits for that to finish instead.
   */
  async abort(reason: string): Promise<void> {
    if (!this.open) {
      await this.finishing;
      return;
    }
    this.open = false;
    const finishing = (async () => {
      try {
        await this.drain();
        this.markIncomplete(reason);
      } finally {
        this.host.finished(this);
      }
    })();
    this.finishing = finishing.catch(() => undefined);
    await finishing;
  }

  private markIncomplete(reason: string): void {
    try {
      this.host.db
        .prepare(`UPDATE snapshots SET state = 'incomplete', reason = ? WHERE id = ? AND state = 'running'`)
        .run(reason, this.id);
    } catch {
      // The store is unusable; list() will report the snapshot incomplete once this process is gone.
    }
  }

  private async drain(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all(this.inFlight);
  }

  private checkOpen(): void {
    if (!this.open) throw new WpsnapError('WRITER_CLOSED', `snapshot ${this.id} is already completed or aborted`);
  }

  private checkProcess(processId: number): void {
    this.checkOpen();
    if (!this.processIds.has(processId)) {
      throw new WpsnapError('UNKNOWN_PROCESS', `process id ${processId} was not added to snapshot ${this.id}`);
    }
  }

  private transaction(step: string, body: () => void): void {
    try {
      this.host.db.transaction(body).immediate();
    } catch (error) {
      throw this.wrap(error, step);
    }
  }

  private wrap(error: unknown, step: string): WpsnapError {
    if (error instanceof WpsnapError) return error;
    const code = externalCode((error as { code?: string }).code, 'STORE_WRITE');
    return new WpsnapError(code, `${step} in ${this.host.path}: ${(error as Error).message}`, { cause: error });
  }
}
