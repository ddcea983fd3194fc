// Pre-protection: write-protect the bulk of the target's memory while it
// runs, so that the pause only has to protect again what it wrote since.
//
// 1. A short stop obtains the userfaultfd (the attach; every thread stopped
//    for the injection, ~1–3 ms whatever the target's size).
// 2. With the target running: its large private anonymous mappings (the heap,
//    arenas; sparse reservations excepted, the pause handles them as before)
//    are registered, the engine thread starts tracking (a write fault is let
//    through at once and its page recorded, core/native/engine_track.c), and
//    they are write-protected.
// 3. Rounds, still running: what was written meanwhile is protected again,
//    while the written set shrinks (at most MAX_ROUNDS).
// 4. In the pause (core/pause.ts, protectAtInstant): the last written set is
//    protected again, with whatever the pre-phase did not cover (new or grown
//    mappings, moved or unmapped ranges). When the target writes faster than
//    the rounds converge, that falls back to protecting whole mappings: the
//    pause is then what it was without pre-protection.
import type { UffdMethod } from './attach.js';
import type { Attacher, StoppedTarget } from './attacher.js';
import type { SignalAction } from '../snapshot-format/model.js';
import { nonDefaultSignalSets } from './process-state.js';
import type { EngineSession } from './engine-session.js';
import { fromNative } from '../common/errors.js';
import { faultPoint } from './fault.js';
import { UFFD_FEATURES_FOR_SNAPSHOT, UFFDIO_REGISTER_MODE_WP } from './features.js';
import type { NativeBinding } from './native/binding.js';
import { closeQuietly, stopwatch } from './pause.js';
import type { MapsEntry } from './procfs.js';
import { readMaps } from './procfs.js';
import type { SparseIntervals } from './sparse.js';
import { fromStartLenPairs, intersect, normalize, subtract, type Intervals } from './intervals.js';

export type { Intervals } from './intervals.js';

/** Mappings smaller than this are protected in the pause: too small to matter. */
const PRE_PROTECT_MIN_BYTES = 1n << 20n;
/** Stop the rounds once this few ranges are left for the pause. */
const ROUNDS_DONE_RANGES = 64;
const MAX_ROUNDS = 8;
/** Special mappings never registered. */
const SPECIAL = new Set(['[vvar]', '[vvar_vclock]', '[vdso]', '[vsyscall]']);

export interface PreProtection {
  uffd: number;
  method: UffdMethod;
  /** How long the attach stopped the target, µs, and where that went. */
  attachStopMicros: number;
  attachBreakdownMicros: { freeze: number; inject: number; thaw: number };
  /** What was registered and protected while the target ran. */
  covered: Intervals;
  /** Written ranges protected again per round, while running. */
  rounds: number[];
  /**
   * What a restore needs that costs a call run inside the target, read at the attach stop so that
   * the pause at T does not (core/pause.ts checks at T that it still holds).
   */
  forRestore?: EarlyRestoreState;
}

/** Signal dispositions and each thread's clear_child_tid, read at the attach stop. */
export interface EarlyRestoreState {
  /** SigIgn and SigCgt of /proc/PID/status when they were read: the pause reads them again. */
  signalSets: string;
  signals?: SignalAction[];
  tidAddresses: Map<number, bigint>;
}

/** What the pre-phase recorded since its last round: to protect again in the pause. */
export interface TrackLog {
  /** Written (or zapped, or moved into) since the last round: [start, len] pairs. */
  written: BigUint64Array;
  /** Unmapped or moved away: no longer covered. [start, len] pairs. */
  invalid: BigUint64Array;
  /** Something could not be recorded: nothing is covered. */
  overflowed: boolean;
  /** Write faults let through while running, so far. */
  faults: number;
}


const EAGAIN_RETRIES = 100;
const sleeper = new Int32Array(new SharedArrayBuffer(4));

/**
 * Write-protect `ranges` while the target runs; returns `covered` less what
 * could not be protected. The target may change its mappings meanwhile:
 * EAGAIN (an event not yet read: the tracking thread reads it) is tried again
 * a millisecond later; a range the kernel refuses otherwise (ENOENT: unmapped
 * or moved) is no longer covered, and the pause protects whatever is there
 * at T. One range at a time, so a failure leaves no doubt about the others.
 */
export function protectWhileRunning(binding: NativeBinding, uffd: number, ranges: Intervals, covered: Intervals): Intervals {
  const failed: Intervals = [];
  for (const [start, end] of ranges) {
    for (let attempt = 0; ; attempt++) {
      try {
        binding.uffdWriteProtect(uffd, start, end - start, true);
        break;
      } catch (error) {
        if ((error as { code?: string }).code === 'EAGAIN' && attempt < EAGAIN_RETRIES) {
          Atomics.wait(sleeper, 0, 0, 1);
          continue;
        }
        failed.push([start, end]);
        break;
      }
    }
  }
  return failed.length === 0 ? covered : subtract(covered, normalize(failed));
}

function candidates(maps: MapsEntry[], sparse: SparseIntervals): MapsEntry[] {
  return maps.filter(
    (m) =>
      m.inode === 0 &&
      m.perms[3] === 'p' &&
      !SPECIAL.has(m.path) &&
      m.end - m.start >= PRE_PROTECT_MIN_BYTES &&
      !sparse.some(([s, e]) => s < m.end && m.start < e),
  );
}

export interface PreProtectInputs {
  pid: number;
  attacher: Attacher;
  sparse: SparseIntervals;
  session: EngineSession;
  /** Keep the target pre-protected this long before the rounds (tests: a hostile target changes its mappings meanwhile). */
  holdMillis?: number | undefined;
  /** Read what a restore needs at the attach stop (EarlyRestoreState). */
  forRestore?: boolean;
  /**
   * Shared memory to protect as well ([start, end): shmem and memfd mappings in 4 KiB pages, planned
   * ahead, that no process outside the snapshot maps writable): in a group it is most of what the pause
   * would protect (each member's mapping of it is its own to protect).
   */
  shared?: Intervals | undefined;
}

/**
 * The signal dispositions, while the target is stopped at the attach (calls
 * run inside it); what cannot be read is left to the pause.
 */
function readEarlySignals(pid: number, stopped: StoppedTarget): Pick<EarlyRestoreState, 'signalSets' | 'signals'> {
  const { sets, signals } = nonDefaultSignalSets(pid);
  try {
    const actions = stopped.readSignalActions?.(signals);
    return { signalSets: sets, ...(actions === undefined ? {} : { signals: actions }) };
  } catch {
    return { signalSets: sets }; // read again in the pause
  }
}

/** Each thread's clear_child_tid, read in the attach stop, from the thread records: taken after the resume. */
function earlyTidAddresses(stopped: StoppedTarget): Map<number, bigint> {
  const tidAddresses = new Map<number, bigint>();
  for (const t of stopped.threads) if (t.clearChildTid !== undefined) tidAddresses.set(t.tid, t.clearChildTid);
  return tidAddresses;
}

/**
 * Steps 1–3. On failure the userfaultfd is closed (which drops every
 * registration and protection) and the target runs on.
 */
export async function preProtect(binding: NativeBinding, inputs: PreProtectInputs): Promise<PreProtection> {
  const { pid, attacher, session } = inputs;
  const { lap, total } = stopwatch();
  const stopped = attacher.stop({ tidAddresses: inputs.forRestore === true });
  const attachBreakdownMicros = { freeze: lap(), inject: 0, thaw: 0 };
  let earlySignals: Pick<EarlyRestoreState, 'signalSets' | 'signals'> | undefined;
  let uffd = -1;
  let method: UffdMethod;
  try {
    const obtained = stopped.obtainUffd();
    uffd = obtained.fd;
    method = obtained.method;
    faultPoint('after-inject');
    binding.uffdApi(uffd, UFFD_FEATURES_FOR_SNAPSHOT);
  } catch (error) {
    if (uffd >= 0) closeQuietly(binding, uffd);
    stopped.resume();
    throw fromNative(error, 'obtain the target userfaultfd');
  }
  if (inputs.forRestore === true) earlySignals = readEarlySignals(pid, stopped);
  attachBreakdownMicros.inject = lap();
  stopped.resume();
  attachBreakdownMicros.thaw = lap();
  const attachStopMicros = total();
  // The thread records (with their clear_child_tid) come with the thaw's reply, not during the stop.
  const forRestore: EarlyRestoreState | undefined = earlySignals === undefined ? undefined : { ...earlySignals, tidAddresses: earlyTidAddresses(stopped) };
  attacher.rearm();
  try {
    const covered: Intervals = [];
    const ranges: Intervals = [...candidates(readMaps(pid), inputs.sparse).map((m): [bigint, bigint] => [m.start, m.end]), ...(inputs.shared ?? [])];
    for (const [start, end] of ranges) {
      try {
        binding.uffdRegister(uffd, start, end - start, UFFDIO_REGISTER_MODE_WP);
        covered.push([start, end]);
      } catch {
        // Not registrable (or changed meanwhile): the pause protects it as before.
      }
    }
    let coveredNormal = normalize(covered);
    session.track(uffd, coveredNormal);
    faultPoint('mid-pre-protect');
    coveredNormal = protectWhileRunning(binding, uffd, coveredNormal, coveredNormal);
    if (inputs.holdMillis) await new Promise((resolve) => setTimeout(resolve, inputs.holdMillis));
    const again = protectAgainInRounds(binding, uffd, session, coveredNormal);
    coveredNormal = again.covered;
    const rounds = again.rounds;
    return { uffd, method, attachStopMicros, attachBreakdownMicros, covered: coveredNormal, rounds, ...(forRestore === undefined ? {} : { forRestore }) };
  } catch (error) {
    closeQuietly(binding, uffd);
    throw fromNative(error, 'write-protect the target while it runs');
  }
}

/**
 * Step 3: rounds while the target runs, each protecting again what it wrote
 * since the last take, while that shrinks (at most MAX_ROUNDS). Returns what
 * is still covered and the ranges protected per round; `onTaken` sees each
 * log taken. A log that overflowed leaves nothing covered: the pause then
 * protects everything.
 */
export function protectAgainInRounds(
  binding: NativeBinding,
  uffd: number,
  session: EngineSession,
  covered: Intervals,
  onTaken?: (log: TrackLog) => void,
): { covered: Intervals; rounds: number[] } {
  const rounds: number[] = [];
  let previous = Infinity;
  for (let round = 0; round < MAX_ROUNDS; round++) {
    const log = session.trackTake(false);
    onTaken?.(log);
    if (log.overflowed) return { covered: [], rounds };
    // Unmapped or moved away: covered no more (a range mapped there later is new at T).
    covered = subtract(covered, fromStartLenPairs(log.invalid));
    const written = intersect(fromStartLenPairs(log.written), covered);
    covered = protectWhileRunning(binding, uffd, written, covered);
    rounds.push(written.length);
    // Another round while the set still shrinks: each leaves the pause fewer ranges to protect.
    if (written.length <= ROUNDS_DONE_RANGES || written.length >= previous) break;
    previous = written.length;
  }
  return { covered, rounds };
}

/** More written ranges than this in the pause: protect the covered mappings whole instead (one call each). */
const MAX_WRITTEN_RANGES = 4096;

/**
 * Step 4, in the pause: `toProtect` ([start, len, …], what the pause would
 * protect without pre-protection) less what the pre-phase covers and nobody
 * wrote since, given the final log. Also returns how many written ranges
 * that leaves.
 */
export function rangesAtInstant(pre: PreProtection, log: TrackLog, toProtect: bigint[]): { ranges: bigint[]; written: number } {
  if (log.overflowed) return { ranges: toProtect, written: -1 };
  const stillCovered = subtract(pre.covered, fromStartLenPairs(log.invalid));
  const writtenAll = fromStartLenPairs(log.written);
  const out: bigint[] = [];
  let written = 0;
  // Range by range: two adjacent ranges may need different alignments (a
  // hugetlb mapping next to a small one) and must never merge into one call.
  for (let i = 0; i < toProtect.length; i += 2) {
    const range: Intervals = [[toProtect[i]!, toProtect[i]! + toProtect[i + 1]!]];
    const covered = intersect(range, stillCovered);
    const writtenHere = intersect(writtenAll, covered);
    written += writtenHere.length;
    for (const [s, e] of normalize([...subtract(range, covered), ...writtenHere])) out.push(s, e - s);
  }
  if (written > MAX_WRITTEN_RANGES) return { ranges: toProtect, written };
  return { ranges: out, written };
}
