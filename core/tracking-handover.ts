// A snapshot of a tracked target (core/keeper.ts): the keeper's context, taken
// over, stands in for pre-protection (its pages have been protected since the
// base snapshot's instant, the ones written since are in its log); a tracked
// generation takes every page not written since from its parent unread; and
// with --track the context goes back to a keeper with this snapshot's instant
// as the new base.
import type { UffdMethod } from './attach.js';
import type { EngineSession } from './engine-session.js';
import { fromStartLenPairs, intersect, normalize, subtract, type Intervals } from './intervals.js';
import type { TakenTracking } from './keeper.js';
import type { EngineRegion, NativeBinding } from './native/binding.js';
import { protectAgainInRounds, protectWhileRunning, type PreProtection, type TrackLog } from './preprotect.js';

/** EngineRegion.kind of a shared file or shared memory: written through an fd without a fault. */
const KIND_SHARED_FILE = 1;

/** Written ranges past which the covered ranges are protected whole. */
const WHOLE_RANGES_BEYOND = 2048;

/** [start, end, unit] triples as intervals. */
export function tripleIntervals(triples: BigUint64Array): Intervals {
  const out: Intervals = [];
  for (let i = 0; i + 2 < triples.length; i += 3) out.push([triples[i]!, triples[i + 1]!]);
  return normalize(out);
}

/** The adopted context as pre-protection, and what it says of the time since the base's instant. */
export interface Adopted {
  protection: PreProtection;
  /**
   * Before the pause: the pages a tracked generation may take from its parent
   * unread if nothing else is written (covered since the parent's instant,
   * never written, moved or unmapped, and held by the parent); empty when
   * not a tracked generation.
   */
  unwrittenSoFar: Intervals;
}

/**
 * The keeper's context as the pause's pre-protection, with no stop (the
 * context was obtained at the base): the engine thread serves (and logs) the
 * target's faults from now on; the pages written since the base, which the
 * keeper let through, are protected again while the target runs, then
 * rounds as in pre-protection, so that the pause protects again only what
 * was written in the last few milliseconds. With `parentKnown` (a tracked
 * generation), also what may be taken from the parent unread so far.
 */
export function adoptTracking(binding: NativeBinding, taken: TakenTracking, session: EngineSession, parentKnown: Intervals | undefined): Adopted {
  const t = taken.tracking;
  session.track(taken.uffd, t.ranges);
  const everCovered = tripleIntervals(t.ranges);
  const written: Intervals[] = [t.written];
  const invalid: Intervals[] = [t.invalid];
  let overflowed = t.overflowed;
  let covered = overflowed ? [] : subtract(everCovered, t.invalid);
  // One call per written range costs a TLB flush each (~40 µs here): past a
  // few hundred ranges, protecting the covered ranges whole is cheaper (1 GiB:
  // ~90 ms; already protected pages stay so).
  const toProtect = intersect(t.written, covered);
  covered = protectWhileRunning(binding, taken.uffd, toProtect.length > WHOLE_RANGES_BEYOND ? covered : toProtect, covered);
  const again = protectAgainInRounds(binding, taken.uffd, session, covered, (log) => {
    written.push(fromStartLenPairs(log.written));
    invalid.push(fromStartLenPairs(log.invalid));
    overflowed ||= log.overflowed;
  });
  const protection: PreProtection = {
    uffd: taken.uffd,
    method: t.method as UffdMethod,
    attachStopMicros: 0,
    attachBreakdownMicros: { freeze: 0, inject: 0, thaw: 0 },
    covered: again.covered,
    rounds: again.rounds,
  };
  if (parentKnown === undefined || overflowed) return { protection, unwrittenSoFar: [] };
  const changedSince = normalize([...written.flat(), ...invalid.flat()]);
  return { protection, unwrittenSoFar: intersect(subtract(everCovered, changedSince), parentKnown) };
}

/** At the instant: what is still unwritten, given the last log (the writes of the last milliseconds). */
export function unwrittenAtInstant(unwrittenSoFar: Intervals, finalLog: TrackLog): Intervals {
  if (finalLog.overflowed) return [];
  if (finalLog.written.length === 0 && finalLog.invalid.length === 0) return unwrittenSoFar;
  return subtract(unwrittenSoFar, normalize([...fromStartLenPairs(finalLog.written), ...fromStartLenPairs(finalLog.invalid)]));
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
