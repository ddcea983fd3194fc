// What the pause protects again after pre-protection (core/preprotect.ts
// rangesAtInstant), as pure interval arithmetic: the written set and what the
// pre-phase did not cover, range by range, never less.
import { describe, expect, it } from 'vitest';
import { intersect, normalize, subtract, type Intervals } from '../../core/intervals.js';
import { rangesAtInstant, type PreProtection, type TrackLog } from '../../core/preprotect.js';

const K = 4096n;
const M = 2n << 20n;

function pre(covered: Intervals): PreProtection {
  return { uffd: 3, method: 'syscall', attachStopMicros: 0, attachBreakdownMicros: { freeze: 0, inject: 0, thaw: 0 }, covered, rounds: [] };
}

function log(written: Intervals, invalid: Intervals = [], overflowed = false): TrackLog {
  const pairs = (list: Intervals): BigUint64Array => BigUint64Array.from(list.flatMap(([s, e]) => [s, e - s]));
  return { written: pairs(written), invalid: pairs(invalid), overflowed, faults: written.length };
}

/** [start, len, …] back to intervals. */
function asIntervals(ranges: bigint[]): Intervals {
  const out: Intervals = [];
  for (let i = 0; i < ranges.length; i += 2) out.push([ranges[i]!, ranges[i]! + ranges[i + 1]!]);
  return out;
}

describe('interval arithmetic', () => {
  it('normalize sorts and merges overlapping and touching intervals, and drops empty ones', () => {
    expect(normalize([[10n, 20n], [0n, 5n], [5n, 8n], [15n, 30n], [40n, 40n]])).toEqual([[0n, 8n], [10n, 30n]]);
  });

  it('subtract and intersect', () => {
    const a: Intervals = [[0n, 100n], [200n, 300n]];
    const b: Intervals = [[10n, 20n], [90n, 210n], [250n, 260n]];
    expect(subtract(a, b)).toEqual([[0n, 10n], [20n, 90n], [210n, 250n], [260n, 300n]]);
    expect(intersect(a, b)).toEqual([[10n, 20n], [90n, 100n], [200n, 210n], [250n, 260n]]);
    expect(subtract(a, [])).toEqual(a);
    expect(intersect(a, [])).toEqual([]);
  });
});

describe('rangesAtInstant', () => {
  const heap: Intervals = [[0x10000000n, 0x10000000n + 64n * M]];

  it('a covered mapping nobody wrote needs nothing; a written page only itself', () => {
    const toProtect = [heap[0]![0], heap[0]![1] - heap[0]![0]];
    expect(rangesAtInstant(pre(heap), log([]), toProtect)).toEqual({ ranges: [], written: 0 });
    const page = 0x10000000n + 5n * K;
    expect(rangesAtInstant(pre(heap), log([[page, page + K]]), toProtect)).toEqual({ ranges: [page, K], written: 1 });
  });

  it('what grew past the covered part, and what was unmapped and mapped again, is protected whole', () => {
    const grown = [heap[0]![0], 65n * M]; // the heap grew by 1 MiB since
    const r1 = rangesAtInstant(pre(heap), log([]), grown);
    expect(asIntervals(r1.ranges)).toEqual([[heap[0]![1], heap[0]![0] + 65n * M]]);
    const hole: Intervals = [[0x10000000n + M, 0x10000000n + 2n * M]];
    const r2 = rangesAtInstant(pre(heap), log([], hole), [heap[0]![0], 64n * M]);
    expect(asIntervals(r2.ranges)).toEqual(hole);
  });

  it('a mapping the pre-phase never covered (new, sparse, hugetlb) is protected exactly as given', () => {
    const other = [0x20000000n, 3n * M];
    expect(rangesAtInstant(pre(heap), log([[0x20000000n, 0x20000000n + K]]), other)).toEqual({ ranges: other, written: 0 });
  });

  it('two adjacent ranges stay two calls: a hugetlb mapping next to a small one keeps its alignment', () => {
    const small = [0x7f0000000000n - 2n * K, 2n * K];
    const huge = [0x7f0000000000n, 8n * M];
    const { ranges } = rangesAtInstant(pre([]), log([]), [...small, ...huge]);
    expect(ranges).toEqual([...small, ...huge]);
  });

  it('an overflowed log, or too many written ranges, protects everything as given', () => {
    const toProtect = [heap[0]![0], 64n * M];
    expect(rangesAtInstant(pre(heap), log([], [], true), toProtect)).toEqual({ ranges: toProtect, written: -1 });
    const scattered: Intervals = Array.from({ length: 5000 }, (_, i) => [0x10000000n + BigInt(2 * i) * K, 0x10000000n + BigInt(2 * i + 1) * K]);
    expect(rangesAtInstant(pre(heap), log(scattered), toProtect)).toEqual({ ranges: toProtect, written: 5000 });
  });
});
