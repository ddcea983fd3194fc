// Address intervals [start, end) as sorted, disjoint lists: the arithmetic the
// sparse scan (core/sparse.ts), pre-protection (core/preprotect.ts) and the
// dirty tracker (core/tracker.ts) share.

/** Sorted, disjoint [start, end) intervals. */
export type Intervals = Array<[bigint, bigint]>;

/** Sorted, merged where they overlap or touch, empty ones dropped. */
export function normalize(intervals: Intervals): Intervals {
  const sorted = intervals.filter(([s, e]) => s < e).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const out: Intervals = [];
  for (const [s, e] of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && s <= last[1]) {
      if (e > last[1]) last[1] = e;
    } else {
      out.push([s, e]);
    }
  }
  return out;
}

/** a minus b (both normalized). */
export function subtract(a: Intervals, b: Intervals): Intervals {
  const out: Intervals = [];
  let j = 0;
  for (const [s0, e] of a) {
    let s = s0;
    while (j < b.length && b[j]![1] <= s) j++;
    let k = j;
    while (k < b.length && b[k]![0] < e) {
      const [bs, be] = b[k]!;
      if (bs > s) out.push([s, bs]);
      if (be > s) s = be;
      if (s >= e) break;
      k++;
    }
    if (s < e) out.push([s, e]);
  }
  return out;
}

/** a ∩ b (both normalized). */
export function intersect(a: Intervals, b: Intervals): Intervals {
  const out: Intervals = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    const s = a[i]![0] > b[j]![0] ? a[i]![0] : b[j]![0];
    const e = a[i]![1] < b[j]![1] ? a[i]![1] : b[j]![1];
    if (s < e) out.push([s, e]);
    if (a[i]![1] < b[j]![1]) i++;
    else j++;
  }
  return out;
}


/** [start, len, start, len, …] pairs (the native logs' shape) as normalized intervals. */
export function fromStartLenPairs(pairs: BigUint64Array): Intervals {
  const out: Intervals = [];
  for (let i = 0; i < pairs.length; i += 2) out.push([pairs[i]!, pairs[i]! + pairs[i + 1]!]);
  return normalize(out);
}

/** How many 4 KiB pages the (disjoint) intervals hold. */
/** Intervals as the [start, len] pairs the native logs use. */
export function toStartLenPairs(intervals: Intervals): BigUint64Array {
  const out = new BigUint64Array(intervals.length * 2);
  intervals.forEach(([s, e], i) => out.set([s, e - s], 2 * i));
  return out;
}

export function pagesIn(intervals: Intervals): number {
  let pages = 0n;
  for (const [s, e] of intervals) pages += (e - s) / 4096n;
  return Number(pages);
}
