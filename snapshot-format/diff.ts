// What changed between two snapshots (or two generations of one chain): the
// model `wpsnap diff` prints as text, JSON (docs/cli.md) or a self-contained
// HTML report (diff-html.ts). Addresses are bigints; JSON writes them "0x…".

/** How a region of B relates to A's region at the same start address. */
export type DiffStatus = 'added' | 'removed' | 'resized' | 'changed' | 'same';

export interface DiffRegion {
  /** B's range (A's for a removed region). */
  start: bigint;
  end: bigint;
  path: string;
  perms: string;
  status: DiffStatus;
  /** resized: A's end (B's is `end`). */
  endInA?: bigint;
  /** Pages whose content differs (in an added or removed region: its pages with data). */
  changedPages: number;
  /** Bytes that differ within those pages (in an added or removed region: every byte of its pages with data). */
  changedBytes: number;
  /** Pages listed lost in either snapshot: their content is not known, not compared. */
  unknownPages: number;
  /** The changed pages' addresses, ascending (filled when asked for: --pages, --html). */
  pages?: bigint[];
}

export interface DiffSide {
  id: number;
  name: string | null;
  pid: number;
  createdAt: string;
}

export interface SnapshotDiff {
  a: DiffSide;
  b: DiffSide;
  /** Every region of A or B, ordered by start address. */
  regions: DiffRegion[];
  totals: { changedPages: number; changedBytes: number; unknownPages: number };
  /** How pages were compared: "hashes" (content hashes of both) or "dirty-sets" (a generation chain's stored dirty sets). */
  method: 'hashes' | 'dirty-sets';
}
