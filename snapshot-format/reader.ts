// What a reader of snapshots offers, whatever keeps them: the store implements
// it, and every exporter takes it (so the format layer depends on no store).
import type { LostRange, ProcessRecord, ProcessState, RegionRecord, SnapshotSummary, ThreadRecord } from './model.js';

export interface SnapshotReader {
  /** A snapshot by id or name; throws SNAPSHOT_NOT_FOUND. */
  find(ref: string): SnapshotSummary;
  list(): SnapshotSummary[];
  processes(snapshotId: number): Array<ProcessRecord & { processId: number }>;
  threads(processId: number): ThreadRecord[];
  /** The process state recorded with the process (schema 6), undefined when none was. Optional: a reader without it records none. */
  processState?(processId: number): ProcessState | undefined;
  regions(processId: number): RegionRecord[];
  lost(processId: number): LostRange[];
  /** The stored pages of [start, end), in address order (pages not stored were zero at T, or are listed lost). */
  pagesInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }>;
  /** As pagesInRange, but each `data` is a view valid only until the next step: copy it before (no Buffer per page). */
  pageViewsInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }>;
  /** One page's content at T (zeros if not stored). */
  readPage(processId: number, address: bigint): Buffer;
}
