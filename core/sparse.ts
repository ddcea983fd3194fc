// Sparse private anonymous mappings are write-protected only where populated.
//
// Private anonymous mappings at least SPARSE_MIN_BYTES large, with at most a
// quarter of their pages present or swapped, are protected only where
// populated. Write-protecting a never-touched page costs a page-table entry
// holding a marker (WP_UNPOPULATED): for a runtime's multi-GiB PROT_NONE
// reservation (V8, the JVM, Go, malloc arenas) that is megabytes of page
// tables and tens of milliseconds of pause, for pages that are zero at T and
// need no protection: they are recorded as zero and never read, whatever is
// written to them later. Thread stacks (8 MiB each with glibc, mostly
// untouched) count too: 300 of them left 3.6 MB of page tables in the target
// when the floor was 16 MiB.
import { REGION_KIND } from './constants.js';
import { fromNative } from '../common/errors.js';
import type { NativeBinding } from './native/binding.js';
import type { MapsEntry } from './procfs.js';
import type { RegionPlan } from './regions.js';
import { normalize } from './intervals.js';

const SPARSE_MIN_BYTES = 1n << 20n;
const SPARSE_MAX_POPULATED = 0.25;

/** Address intervals [start, end) of the mappings found sparse before the freeze. */
export type SparseIntervals = Array<[start: bigint, end: bigint]>;

function sparseCandidate(start: bigint, end: bigint, inode: number, perms: string): boolean {
  return inode === 0 && perms[3] === 'p' && end - start >= SPARSE_MIN_BYTES;
}

/**
 * The candidate mappings whose populated share is small now, before the
 * freeze (the scan costs ~5 ms per dense GiB), as address intervals: mappings
 * may split or merge before the pause (mprotect), so the pause asks which
 * of its mappings overlap one.
 */
export function findSparse(binding: NativeBinding, pid: number, maps: MapsEntry[]): SparseIntervals {
  const candidates = maps.filter((m) => sparseCandidate(m.start, m.end, m.inode, m.perms));
  const sparse: SparseIntervals = [];
  if (candidates.length === 0) return sparse;
  let runs: Array<Array<[bigint, bigint]>>;
  try {
    runs = populatedRuns(binding, pid, candidates);
  } catch {
    return sparse; // an optimisation only: protect everything instead
  }
  candidates.forEach((m, i) => {
    const populated = runs[i]!.reduce((sum, [start, end]) => sum + (end - start), 0n);
    if (Number(populated) <= Number(m.end - m.start) * SPARSE_MAX_POPULATED) sparse.push([m.start, m.end]);
  });
  return sparse;
}

/** The present-or-swapped runs [start, end) of each range, from one populatedRanges call, sorted and disjoint. */
function populatedRuns(binding: NativeBinding, pid: number, ranges: Array<{ start: bigint; end: bigint }>): Array<Array<[bigint, bigint]>> {
  const scan = binding.populatedRanges(pid, BigUint64Array.from(ranges.flatMap((r) => [r.start, r.end])));
  let at = 0;
  return ranges.map((range, i) => {
    const runs: Array<[bigint, bigint]> = [];
    for (let k = 0; k < (scan.counts[i] as number); k++, at++) runs.push([scan.ranges[2 * at] as bigint, scan.ranges[2 * at + 1] as bigint]);
    return normalizeRuns(runs, range.start, range.end);
  });
}

/**
 * Runs sorted, clipped to [start, end) and merged where they overlap or touch.
 * The zero ranges are the complement of these runs: a run reported twice or
 * out of order (a PAGEMAP_SCAN continued from a walk_end below what it had
 * already returned did that, under load) must never turn into a zero range
 * over populated pages, which would be stored as zero without being read.
 */
export function normalizeRuns(runs: Array<[bigint, bigint]>, start: bigint, end: bigint): Array<[bigint, bigint]> {
  return normalize(runs.map(([s, e]): [bigint, bigint] => [s < start ? start : s, e > end ? end : e]));
}

function overlapsSparse(sparse: SparseIntervals, start: bigint, end: bigint): boolean {
  return sparse.some(([s, e]) => s < end && start < e);
}

/**
 * The ranges to write-protect ([start, len, …]): registered regions whole,
 * except the sparse ones, which get their populated runs only (scanned now,
 * with the target stopped) and their engine region the rest as zeroRanges.
 * Also returns how many regions were protected that way.
 */
export function protectionRanges(
  binding: NativeBinding,
  pid: number,
  registered: RegionPlan[],
  sparse: SparseIntervals,
): { ranges: bigint[]; sparseRegions: number } {
  const ranges: bigint[] = [];
  const scanned = registered.filter((plan) => {
    const { start, end, inode, perms } = plan.record;
    return plan.engine?.kind === REGION_KIND.anon && !plan.engine.hugetlb && sparseCandidate(start, end, inode, perms) && overlapsSparse(sparse, start, end);
  });
  const isScanned = new Set(scanned);
  for (const plan of registered) if (!isScanned.has(plan)) ranges.push(plan.record.start, plan.record.end - plan.record.start);
  if (scanned.length === 0) return { ranges, sparseRegions: 0 };
  let runs: Array<Array<[bigint, bigint]>>;
  try {
    runs = populatedRuns(binding, pid, scanned.map((p) => p.record));
  } catch (error) {
    throw fromNative(error, 'find the populated pages of sparse mappings');
  }
  scanned.forEach((plan, i) => {
    const zero: bigint[] = [];
    let cursor = plan.record.start;
    for (const [start, end] of runs[i]!) {
      if (start > cursor) zero.push(cursor, start);
      ranges.push(start, end - start);
      cursor = end;
    }
    if (cursor < plan.record.end) zero.push(cursor, plan.record.end);
    plan.engine!.zeroRanges = BigUint64Array.from(zero);
  });
  return { ranges, sparseRegions: scanned.length };
}
