// Reading a snapshot's records from the store: its processes (and their
// recorded state), threads, regions and lost ranges, as the model's types,
// with what older schemas did not record read as not recorded.
import type Database from 'better-sqlite3';
import { WpsnapError } from '../common/errors.js';
import type { LostRange, LostReason, ProcessRecord, ProcessState, RegionCapture, RegionRecord, ThreadRecord } from '../snapshot-format/model.js';

export class RecordReader {
  constructor(
    private readonly db: Database.Database,
    private readonly path: string,
  ) {}

  processes(snapshotId: number): Array<ProcessRecord & { processId: number }> {
    const rows = this.db.prepare('SELECT * FROM processes WHERE snapshot_id = ? ORDER BY pid').all(snapshotId) as Array<
      Record<string, unknown>
    >;
    return rows.map((row) => ({
      processId: row['id'] as number,
      pid: row['pid'] as number,
      ppid: row['ppid'] as number,
      uid: row['uid'] as number,
      gid: row['gid'] as number,
      exe: row['exe'] as string,
      cmdline: JSON.parse(row['cmdline'] as string) as string[],
      comm: row['comm'] as string,
      startTimeTicks: row['start_time_ticks'] as number,
      startedAt: row['started_at'] as string,
      auxv: row['auxv'] as Buffer,
      ...this.nsPids(row['ns_pids']),
    }));
  }

  /** The ns_pids column as `{ nsPids }`, or nothing if not recorded (NULL, or absent before schema 3). */
  private nsPids(column: unknown): { nsPids?: number[] } {
    if (column === null || column === undefined) return {};
    let nsPids: unknown;
    try {
      nsPids = JSON.parse(String(column));
    } catch {
      nsPids = undefined;
    }
    if (!Array.isArray(nsPids) || !nsPids.every((pid) => Number.isSafeInteger(pid) && (pid as number) > 0)) {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: processes.ns_pids ${JSON.stringify(column)} is not a list of pids`);
    }
    return { nsPids: nsPids as number[] };
  }

  /**
   * The process state recorded with the process (schema 6), or undefined when
   * none was: a snapshot from before, or from a writer that read none (a
   * store of an older schema on read-only media has no table at all).
   */
  processState(processId: number): ProcessState | undefined {
    const hasTable = this.db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'process_state'").get();
    if (hasTable === undefined) return undefined;
    const row = this.db.prepare('SELECT state FROM process_state WHERE process_id = ?').get(processId) as { state: string } | undefined;
    if (row === undefined) return undefined;
    let state: unknown;
    try {
      state = JSON.parse(row.state);
    } catch {
      state = undefined;
    }
    if (typeof state !== 'object' || state === null || !Array.isArray((state as { fds?: unknown }).fds)) {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: process_state of process ${processId} is not a process state document`);
    }
    return state as ProcessState;
  }

  threads(processId: number): ThreadRecord[] {
    // Every column (sigmask is absent before schema 5, on read-only media), as BigInts: the mask uses all 64 bits.
    const rows = this.db
      .prepare('SELECT * FROM threads WHERE process_id = ? ORDER BY tid')
      .safeIntegers(true)
      .all(processId) as Array<Record<string, unknown>>;
    return rows.map((row) => ({
      tid: Number(row['tid']),
      name: row['name'] as string,
      regs: row['regs'] as Buffer,
      fpregs: row['fpregs'] as Buffer,
      xstate: row['xstate'] as Buffer,
      ...this.sigmask(row['sigmask'], row['tid']),
      ...this.kernelState(row['kernel_state'], row['tid']),
    }));
  }

  /** threads.kernel_state (schema 7) as ThreadRecord fields; nothing when not recorded. */
  private kernelState(column: unknown, tid: unknown): Pick<ThreadRecord, 'clearChildTid' | 'robustList' | 'rseq'> {
    if (column === null || column === undefined) return {};
    try {
      const k = JSON.parse(column as string) as { clearChildTid?: string; robustList?: { head: string; len: number }; rseq?: { area: string; size: number; signature: number } };
      return {
        ...(k.clearChildTid === undefined ? {} : { clearChildTid: BigInt(k.clearChildTid) }),
        ...(k.robustList === undefined ? {} : { robustList: { head: BigInt(k.robustList.head), len: k.robustList.len } }),
        ...(k.rseq === undefined ? {} : { rseq: { area: BigInt(k.rseq.area), size: k.rseq.size, signature: k.rseq.signature } }),
      };
    } catch {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: threads.kernel_state of tid ${String(tid)} is not a thread state document`);
    }
  }

  /** The sigmask column as `{ sigmask }` (two's complement taken back to 0 ..= 2^64-1), or nothing if not recorded. */
  private sigmask(column: unknown, tid: unknown): { sigmask?: bigint } {
    if (column === null || column === undefined) return {};
    if (typeof column !== 'bigint') {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: threads.sigmask of tid ${String(tid)} is not an integer`);
    }
    return { sigmask: BigInt.asUintN(64, column) };
  }

  regions(processId: number): RegionRecord[] {
    const rows = this.db
      .prepare('SELECT * FROM regions WHERE process_id = ? ORDER BY start_address')
      .safeIntegers(true)
      .all(processId) as Array<Record<string, bigint | string | null>>;
    return rows.map((row) => {
      const region: RegionRecord = {
        start: BigInt.asUintN(64, row['start_address'] as bigint),
        end: BigInt.asUintN(64, row['end_address'] as bigint),
        perms: row['perms'] as string,
        offset: row['file_offset'] as bigint,
        dev: row['dev'] as string,
        inode: Number(row['inode']),
        path: row['path'] as string,
        pageSize: Number(row['page_size']),
        capture: row['capture'] as RegionCapture,
      };
      if (row['skip_reason'] !== null) region.skipReason = row['skip_reason'] as string;
      if (row['file_path'] !== null) {
        region.file = {
          path: row['file_path'] as string,
          dev: Number(row['file_dev']),
          ino: Number(row['file_ino']),
          size: Number(row['file_size']),
          mtimeNs: row['file_mtime_ns'] as string,
        };
      }
      return region;
    }).sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  }

  lost(processId: number): LostRange[] {
    const rows = this.db
      .prepare('SELECT address, pages, reason FROM lost WHERE process_id = ? ORDER BY address')
      .safeIntegers(true)
      .all(processId) as Array<{ address: bigint; pages: bigint; reason: LostReason }>;
    return rows.map((row) => ({ address: row.address, pages: Number(row.pages), reason: row.reason }));
  }
}
