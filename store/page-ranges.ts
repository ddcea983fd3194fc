// Page ranges inside the store: the runs `generation_pages` holds, a
// process's regions and lost ranges as sorted [start, end) intervals, and the
// one sweep that picks the addresses of an index lying inside some ranges and
// outside others. The reader (a generation's pages through its parent), the
// writer (what turned zero) and a rebase all decide "inside" the same way.
import type Database from 'better-sqlite3';
import { PAGE_SIZE } from '../snapshot-format/model.js';

const PAGE = BigInt(PAGE_SIZE);

/** Sorted [start, end) intervals; they may overlap. */
export type PageRanges = Array<[bigint, bigint]>;

/** Ascending page addresses as u64 LE [first address, pages] runs (generation_pages.ranges). */
export function encodePageRuns(addresses: readonly bigint[]): Buffer {
  const runs: bigint[] = [];
  for (const a of addresses) {
    const n = runs.length;
    if (n > 0 && runs[n - 2]! + runs[n - 1]! * PAGE === a) runs[n - 1]! += 1n;
    else runs.push(a, 1n);
  }
  return Buffer.from(BigUint64Array.from(runs).buffer);
}

/** generation_pages.ranges as [start, end) intervals. */
export function decodePageRuns(blob: Buffer): PageRanges {
  const pairs = new BigUint64Array(blob.buffer.slice(blob.byteOffset, blob.byteOffset + blob.length));
  const out: PageRanges = [];
  for (let i = 0; i + 1 < pairs.length; i += 2) out.push([pairs[i]!, pairs[i]! + pairs[i + 1]! * PAGE]);
  return out;
}

function byStart(a: [bigint, bigint], b: [bigint, bigint]): number {
  return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
}

/** A process's regions, unsigned and sorted ([vsyscall] is stored as a negative INTEGER). */
export function regionRanges(db: Database.Database, processId: number): PageRanges {
  const rows = db.prepare('SELECT start_address AS s, end_address AS e FROM regions WHERE process_id = ?').safeIntegers(true).all(processId) as Array<{ s: bigint; e: bigint }>;
  return rows.map((r) => [BigInt.asUintN(64, r.s), BigInt.asUintN(64, r.e)] as [bigint, bigint]).sort(byStart);
}

/** A process's lost ranges, sorted. */
export function lostRanges(db: Database.Database, processId: number): PageRanges {
  const rows = db.prepare('SELECT address AS s, pages AS n FROM lost WHERE process_id = ?').safeIntegers(true).all(processId) as Array<{ s: bigint; n: bigint }>;
  return rows.map((l) => [l.s, l.s + l.n * PAGE] as [bigint, bigint]).sort(byStart);
}

/** Merge lists of ranges into one sorted list (overlaps kept). */
export function sortedRanges(...lists: PageRanges[]): PageRanges {
  return lists.flat().sort(byStart);
}

/**
 * The indices of the ascending `addresses` that lie inside some range of
 * `inside` and in none of `outside` (both sorted by start; they may overlap),
 * in one sweep.
 */
export function indicesWithin(addresses: BigUint64Array, inside: PageRanges, outside: PageRanges): number[] {
  const out: number[] = [];
  let r = 0;
  let h = 0;
  for (let i = 0; i < addresses.length; i++) {
    const address = addresses[i] as bigint;
    // Sorted by start: the ranges passed over all end at or before the address; if any range
    // holds it, the first one not yet ended does.
    while (r < inside.length && inside[r]![1] <= address) r++;
    if (r >= inside.length) break;
    if (address < inside[r]![0]) continue;
    while (h < outside.length && outside[h]![1] <= address) h++;
    if (h < outside.length && outside[h]![0] <= address) continue;
    out.push(i);
  }
  return out;
}
