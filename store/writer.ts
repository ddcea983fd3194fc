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
  type ProcessState,
  type RegionRecord,
  type GenerationStats,
  type SnapshotStats,
  type ThreadRecord,
} from '../snapshot-format/model.js';
import { decodeIndex, lowerBound, MAX_ADDRESS, type DecodedIndex, type IndexRow } from './codec.js';
import { encodePageRuns, indicesWithin, lostRanges, regionRanges } from './page-ranges.js';

const U64_MAX = (1n << 64n) - 1n;
import type { PageSink } from './page-sink.js';
import { shareAcrossProcesses, type SharedMapping } from './shared-pages.js';

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
  /** A generation: the parent's process with this pid and its resolved pages; undefined for a full snapshot. */
  parentProcess(pid: number): { snapshotId: number; incremental: 'compared' | 'tracked'; index: DecodedIndex } | undefined;
}

const PAGE_MASK = BigInt(PAGE_SIZE - 1);
const PAGE = BigInt(PAGE_SIZE);

/** Sorted chunks of addresses as one ascending array. */
function sortedUnion(chunks: BigUint64Array[]): BigUint64Array {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new BigUint64Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out.sort();
}

const LOST_REASON_SET: ReadonlySet<string> = new Set(LOST_REASONS);

/** threads.kernel_state (schema.ts, version 7): the JSON of what is recorded, or null. */
function kernelState(t: ThreadRecord): string | null {
  if (t.clearChildTid === undefined && t.robustList === undefined && t.rseq === undefined) return null;
  return JSON.stringify({
    ...(t.clearChildTid === undefined ? {} : { clearChildTid: t.clearChildTid.toString() }),
    ...(t.robustList === undefined ? {} : { robustList: { head: t.robustList.head.toString(), len: t.robustList.len } }),
    ...(t.rseq === undefined ? {} : { rseq: { area: t.rseq.area.toString(), size: t.rseq.size, signature: t.rseq.signature } }),
  });
}

export class SnapshotWriter {
  readonly counters: WriterCounters = { pagesSaved: 0, zeroPages: 0, pagesNew: 0, bytesRaw: 0, bytesStored: 0 };
  private readonly inFlight = new Set<Promise<void>>();
  private readonly processIds = new Set<number>();
  /** A generation's processes: their parent's pages, to find what turned zero at complete(). */
  private readonly baselines = new Map<number, DecodedIndex>();
  private generation: { parent: number; incremental: 'compared' | 'tracked' } | undefined;
  /** 'tracked': per process, the pages written since the parent ([start, end) ranges, sorted, disjoint). */
  private readonly dirty = new Map<number, Array<[bigint, bigint]>>();
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
      const processId = this.host.db.transaction(() => {
        const info = this.host.db
          .prepare(`INSERT INTO processes (${columns.join(', ')}) VALUES (${columns.map((c) => `@${c}`).join(', ')})`)
          .run(values);
        const id = Number(info.lastInsertRowid);
        // Only when recorded: the tests' stores of older schema versions lack the table (schema.ts, version 6).
        if (p.state !== undefined) {
          this.host.db.prepare('INSERT INTO process_state (process_id, state) VALUES (?, ?)').run(id, JSON.stringify(p.state));
        }
        return id;
      })();
      this.processIds.add(processId);
      const parent = this.host.parentProcess(p.pid);
      if (parent !== undefined) {
        this.generation = { parent: parent.snapshotId, incremental: parent.incremental };
        this.baselines.set(processId, parent.index);
        this.host.sink.setBaseline(processId, parent.index);
      }
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

  setProcessState(processId: number, state: ProcessState): void {
    this.checkProcess(processId);
    this.transaction(`record the state of process ${processId}`, () => {
      this.host.db.prepare('INSERT INTO process_state (process_id, state) VALUES (?, ?) ON CONFLICT (process_id) DO UPDATE SET state = excluded.state').run(processId, JSON.stringify(state));
    });
  }

  addThreads(processId: number, threads: ThreadRecord[]): void {
    this.checkProcess(processId);
    for (const t of threads) {
      if (t.sigmask !== undefined && (t.sigmask < 0n || t.sigmask > U64_MAX)) {
        throw new WpsnapError('INVALID_PROCESS', `process ${processId}, thread ${t.tid}: sigmask ${t.sigmask} is not a 64-bit signal mask`);
      }
    }
    // sigmask and kernel_state only when known: the tests' stores of older schema versions lack the columns.
    const withMask = threads.some((t) => t.sigmask !== undefined);
    const withKernel = threads.some((t) => kernelState(t) !== null);
    const columns = ['process_id', 'tid', 'name', 'regs', 'fpregs', 'xstate', ...(withMask ? ['sigmask'] : []), ...(withKernel ? ['kernel_state'] : [])];
    const insert = this.host.db.prepare(`INSERT INTO threads (${columns.join(', ')}) VALUES (${columns.map(() => '?').join(', ')})`);
    this.transaction(`add threads of process ${processId}`, () => {
      for (const t of threads) {
        const row: unknown[] = [processId, t.tid, t.name, t.regs, t.fpregs, t.xstate];
        // Two's complement in SQLite's signed INTEGER: bit 63 (SIGRTMAX) makes it negative (schema.ts, version 5).
        if (withMask) row.push(t.sigmask === undefined ? null : BigInt.asIntN(64, t.sigmask));
        if (withKernel) row.push(kernelState(t));
        insert.run(...row);
      }
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
   * A group's shared files (store/shared-pages.ts): once every batch in flight
   * is stored, each member's mapping gets the pages and lost ranges another
   * member holds for the same file pages. Returns the index entries added.
   */
  async shareAcross(files: SharedMapping[][]): Promise<number> {
    this.checkOpen();
    for (const m of files.flat()) this.checkProcess(m.processId);
    await this.drain();
    if (this.failure !== undefined) throw this.failure;
    let added = 0;
    this.transaction('index shared pages for every process that maps them', () => {
      added = shareAcrossProcesses(this.host.db, files);
    });
    return added;
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

  /**
   * A 'tracked' generation: the pages of this process written since the
   * parent's instant. Only they were captured; every other page is the
   * parent's (inside this generation's regions).
   */
  setDirty(processId: number, ranges: Array<[bigint, bigint]>): void {
    this.checkOpen();
    if (this.generation?.incremental !== 'tracked' || !this.baselines.has(processId)) {
      throw new WpsnapError('INTERNAL', `snapshot ${this.id}: a dirty set is for a tracked generation's process`);
    }
    this.dirty.set(processId, ranges);
  }

  /**
   * A generation's last step before its final commit: per process, the pages
   * of the parent that turned zero (the parent's page must not show through)
   * and the pages that changed, recorded in generation_pages.
   */
  private recordGeneration(): GenerationStats | undefined {
    if (this.generation === undefined) return undefined;
    const db = this.host.db;
    const totals = { changed: 0, stored: 0, dirty: 0 };
    const insert = db.prepare('INSERT INTO generation_pages (process_id, kind, ranges) VALUES (?, ?, ?)');
    const ownRows = db.prepare('SELECT first_address, last_address, count, entries FROM page_index WHERE process_id = ?').safeIntegers(true);
    for (const [processId, parent] of this.baselines) {
      const taken = this.host.sink.takeBaseline(processId);
      const seen = sortedUnion(taken?.seen ?? []);
      const regions = regionRanges(db, processId);
      // 'tracked': only the written pages were captured, so only they can have turned zero.
      const dirty = this.generation.incremental === 'tracked' ? (this.dirty.get(processId) ?? []) : undefined;
      // The parent's pages inside the regions, outside the lost ranges (and, tracked, inside the dirty set), not seen now.
      let candidates = BigUint64Array.from(indicesWithin(parent.addresses, regions, lostRanges(db, processId)), (i) => parent.addresses[i] as bigint);
      if (dirty !== undefined) candidates = BigUint64Array.from(indicesWithin(candidates, dirty, []), (i) => candidates[i] as bigint);
      const zeroed = [...candidates].filter((address) => seen[lowerBound(seen, address)] !== address);
      const stored: bigint[] = [];
      for (const row of ownRows.iterate(processId) as Iterable<IndexRow>) stored.push(...decodeIndex(row).addresses);
      const changed = [...stored, ...zeroed].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));
      // The dirty set: what was written ('tracked', inside the regions), or what changed ('compared').
      let dirtyRuns: Buffer;
      let dirtyPages: number;
      if (dirty === undefined) {
        dirtyRuns = encodePageRuns(changed);
        dirtyPages = changed.length;
      } else {
        const clipped: bigint[] = [];
        for (const [s0, e0] of dirty) {
          for (const [rs, re] of regions) {
            const s1 = s0 > rs ? s0 : rs;
            const e1 = e0 < re ? e0 : re;
            if (s1 < e1) clipped.push(s1, (e1 - s1) / PAGE);
          }
        }
        dirtyRuns = Buffer.from(BigUint64Array.from(clipped).buffer);
        dirtyPages = 0;
        for (let i = 1; i < clipped.length; i += 2) dirtyPages += Number(clipped[i]!);
      }
      this.transaction(`record the changes of generation ${this.id}`, () => {
        if (zeroed.length > 0) insert.run(processId, 'zeroed', encodePageRuns(zeroed));
        insert.run(processId, 'dirty', dirtyRuns);
      });
      totals.changed += changed.length;
      totals.stored += stored.length;
      totals.dirty += dirtyPages;
    }
    const { parent, incremental } = this.generation;
    if (incremental === 'tracked') {
      // Written since the parent and read back the same: dirty, not changed.
      return { parent, incremental, dirtyPages: totals.dirty, changedPages: totals.changed, writtenUnchangedPages: Math.max(0, totals.dirty - totals.changed), pagesStored: totals.stored };
    }
    // Compared with the parent, a page written back with the value it held is not seen: writes are not known.
    return { parent, incremental, dirtyPages: totals.changed, changedPages: totals.changed, writtenUnchangedPages: null, pagesStored: totals.stored };
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
      const generation = this.recordGeneration();
      if (generation !== undefined) full.generation = generation;
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
      for (const processId of this.baselines.keys()) this.host.sink.takeBaseline(processId);
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
        for (const processId of this.baselines.keys()) this.host.sink.takeBaseline(processId);
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
