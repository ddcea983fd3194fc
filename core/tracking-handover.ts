// A snapshot of a tracked target (core/keeper.ts): the keeper's context, taken
// over, stands in for pre-protection (its pages have been protected since the
// base snapshot's instant, the ones written since are in its log); a tracked
// generation takes every page not written since from its parent unread; and
// with --track the context goes back to a keeper with this snapshot's instant
// as the new base.
import type { UffdMethod } from './attach.js';
import type { EngineSession } from './engine-session.js';
import { fromStartLenPairs, intersect, normalize, subtract, toStartLenPairs, type Intervals } from './intervals.js';
import type { TakenTracking } from './keeper.js';
import type { EngineRegion } from './native/binding.js';
import type { PreProtection, TrackLog } from './preprotect.js';

/** EngineRegion.kind of a shared file or shared memory: written through an fd without a fault. */
const KIND_SHARED_FILE = 1;

/** [start, end, unit] triples as intervals. */
export function tripleIntervals(triples: BigUint64Array): Intervals {
  const out: Intervals = [];
  for (let i = 0; i + 2 < triples.length; i += 3) out.push([triples[i]!, triples[i + 1]!]);
  return normalize(out);
}

/**
 * The keeper's context as the pause's pre-protection: what it covers stays
 * protected unless written, and the engine thread serves (and logs) the
 * target's faults from now on. No stop: the context was obtained at the base.
 */
export function adoptTracking(taken: TakenTracking, session: EngineSession): PreProtection {
  const triples = taken.tracking.ranges;
  session.track(taken.uffd, triples);
  return {
    uffd: taken.uffd,
    method: taken.tracking.method as UffdMethod,
    attachStopMicros: 0,
    attachBreakdownMicros: { freeze: 0, inject: 0, thaw: 0 },
    covered: taken.tracking.overflowed ? [] : subtract(tripleIntervals(triples), taken.tracking.invalid),
    rounds: [],
  };
}

/** The keeper's log since the base and the engine's since the take-over, as one. */
export function mergeLogs(taken: TakenTracking, log: TrackLog): TrackLog {
  return {
    written: BigUint64Array.from([...toStartLenPairs(taken.tracking.written), ...log.written]),
    invalid: BigUint64Array.from([...toStartLenPairs(taken.tracking.invalid), ...log.invalid]),
    overflowed: log.overflowed || taken.tracking.overflowed,
    faults: log.faults,
  };
}

/**
 * The pages a tracked generation takes from its parent unread: covered by the
 * context since the parent's instant, never written, moved or unmapped since
 * (the log at this instant), and held by the parent (`parentKnown`).
 */
export function unwrittenSinceParent(taken: TakenTracking, atInstant: TrackLog, parentKnown: Intervals): Intervals {
  if (atInstant.overflowed) return [];
  const covered = subtract(tripleIntervals(taken.tracking.ranges), normalize(fromStartLenPairs(atInstant.invalid)));
  return intersect(subtract(covered, normalize(fromStartLenPairs(atInstant.written))), parentKnown);
}

/** The region with `clean` pages marked saved (the engine neither reads nor stores them). */
export function withSaved(region: EngineRegion, clean: Intervals): EngineRegion {
  const inside = intersect(clean, [[region.start, region.end]]);
  if (inside.length === 0) return region;
  return { ...region, savedRanges: BigUint64Array.from([...(region.savedRanges ?? []), ...inside.flat()]) };
}

/**
 * What the context covers after this snapshot, as [start, end, unit] triples
 * for the keeper: the engine's regions, less what no fault tells about (pages
 * left unprotected as never touched, pages the kernel writes through a pin,
 * shared files and memory, which an fd writes without a fault).
 */
export function trackedRanges(regions: EngineRegion[]): BigUint64Array {
  const out: bigint[] = [];
  for (const r of regions) {
    if (r.kind === KIND_SHARED_FILE) continue;
    const excluded: Intervals = [];
    for (const list of [r.zeroRanges, r.savedRanges]) {
      if (list === undefined) continue;
      for (let i = 0; i + 1 < list.length; i += 2) excluded.push([list[i]!, list[i + 1]!]);
    }
    for (const [s, e] of subtract([[r.start, r.end]], normalize(excluded))) out.push(s, e, BigInt(r.pageSize));
  }
  return BigUint64Array.from(out);
}
