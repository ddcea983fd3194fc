// Where a snapshot goes, as the controller sees it: the interface the
// pipeline writes through. The store implements it (Store.beginSnapshot and
// SnapshotWriter); the controller imports no store code.
import type { LostRange, PageBatch, ProcessRecord, ProcessState, RegionRecord, SnapshotStats, ThreadRecord } from '../snapshot-format/model.js';

/** The stats the controller measures; the sink adds the page counts. */
export type MeasuredStats = Omit<SnapshotStats, 'pagesSaved' | 'zeroPages' | 'pagesNew' | 'bytesRaw' | 'bytesStored'>;

export interface SnapshotSink {
  readonly id: number;
  addProcess(process: ProcessRecord): number;
  addThreads(processId: number, threads: ThreadRecord[]): void;
  /** The process state again, completed with what the pause read (signal dispositions, pipe contents). */
  setProcessState(processId: number, state: ProcessState): void;
  addRegions(processId: number, regions: RegionRecord[]): void;
  addLost(processId: number, lost: LostRange[]): void;
  /** Resolves once the batch is stored; its memory may then be reused. */
  addPages(processId: number, batch: PageBatch): Promise<void>;
  /** The pause, recorded as soon as it is over (an incomplete snapshot keeps it). */
  recordPause<Phases extends Record<keyof Phases, number>>(micros: number, breakdown: Phases): void;
  countZeroPages(pages: number): void;
  /** A 'tracked' generation: the pages of this process written since the parent's instant (only they were captured). */
  setDirty(processId: number, ranges: Array<[bigint, bigint]>): void;
  /**
   * A process group: once every page is stored, index each shared file's pages for every member that maps
   * them (files: per file, each member's mapping and the file page it starts at). Returns the entries added.
   */
  shareAcross?(files: Array<Array<{ processId: number; start: bigint; end: bigint; firstPage: number }>>): Promise<number>;
  /** The final commit: only now is the snapshot complete. */
  complete(stats: MeasuredStats): Promise<SnapshotStats>;
  /** Record it incomplete, with the reason. */
  abort(reason: string): Promise<void>;
}

/** A generation's parent: the snapshot named `ref`, which must hold this very process (pid and start time). */
export interface ParentRef {
  ref: string;
  pid: number;
  startTimeTicks: number;
  /** compared (default): every page is captured and compared; tracked: only the pages written since (setDirty). */
  incremental?: 'compared' | 'tracked';
}

export interface SnapshotTarget {
  /** With a parent: a generation, storing only the pages whose content differs from the parent's. */
  beginSnapshot(options: { name?: string; parent?: ParentRef }): SnapshotSink;
  /** Where copied pages may wait on disk for the store by default (the store's directory). */
  readonly stagingDir?: string;
  /** The store's file (a keeper records which store its base snapshot is in). */
  readonly path?: string;
  /**
   * For a tracked generation: the parent's id (checked as for any generation),
   * its protected regions of this process and its lost ranges, [start, end):
   * the parent holds the content at its instant of the first less the second,
   * and a page there not written since may be taken from it unread.
   */
  parentContent?(parent: ParentRef): { id: number; protectedRanges: Array<[bigint, bigint]>; lost: Array<[bigint, bigint]> };
}
