// Dirty tracking: which pages of a running process were written between two
// rounds, the job soft-dirty did for CRIU's pre-copy, with uffd-wp instead
// (this kernel has no soft-dirty). Nothing is copied.
//
// - async (default): a userfaultfd with UFFD_FEATURE_WP_ASYNC. The kernel lets
//   the target's writes through itself and clears the page's protection; a
//   round is one PAGEMAP_SCAN per tracked range that returns the pages
//   written since the last round and protects them again in the same walk.
// - sync: a synchronous uffd-wp context, for kernels without WP_ASYNC; a
//   thread of wpsnap lets each write fault through and logs its page
//   (core/native/dirty_log.c), a round protects the logged pages again.
// - soft-dirty: only where one real round trip shows the kernel keeps the bit.
//
// Either way a native thread reads the context's events (core/native/tracker.c):
// a page zapped by MADV_DONTNEED/REMOVE counts as written (its content changed
// to zero), an mremap'ed range counts as written whole at its new place. Each
// round reads the maps again: a new or grown mapping is registered and counts
// as written whole, an unmapped one is dropped. The attach (a stop of a few
// milliseconds) obtains the userfaultfd; it is held by wpsnap only, so when
// wpsnap exits, the kernel unprotects the target.
import { writeFileSync } from 'node:fs';
import { WpsnapError, fromNative, unsupported } from '../common/errors.js';
import type { Attacher } from './attacher.js';
import { UFFD_FEATURE, UFFDIO_REGISTER_MODE_WP, kernelFeatures, requireFeatures } from './features.js';
import { fromStartLenPairs, intersect, normalize, pagesIn, subtract, type Intervals } from './intervals.js';
import type { NativeBinding, NativeHandle } from './native/binding.js';
import { closeQuietly } from './pause.js';
import { protectWhileRunning } from './preprotect.js';
import { assertProcessExists, readMaps, type MapsEntry } from './procfs.js';
import { ptraceAttacher } from './ptrace-attacher.js';
import { planRegionWithoutFile } from './regions.js';
import { refuseSelfFreeze } from './target-guard.js';

export type TrackerKind = 'async' | 'sync' | 'soft-dirty';
export const TRACKER_KINDS: readonly TrackerKind[] = ['async', 'sync', 'soft-dirty'];

const PAGE = 4096n;
/** Bit 55 of a /proc/PID/pagemap entry. */
const SOFT_DIRTY = 1n << 55n;
/** Unprotected before the close in pieces of this (2 MiB, aligned): each holds the target's writes off briefly. */
const UNPROTECT_SHIFT = 21n;

/** A mapping the target can write that no tracker can see: its writes are not in any round. */
export interface UntrackedMapping {
  start: bigint;
  end: bigint;
  path: string;
  why: string;
}

export interface TrackedMapping {
  start: bigint;
  end: bigint;
  path: string;
  /** Pages of it written since the previous round. */
  dirtyPages: number;
}

export interface DirtyRound {
  /** 0 for the first take after start(). */
  round: number;
  /** Milliseconds since tracking started, when this round was taken. */
  atMillis: number;
  /** Since the previous round (or the start). */
  intervalMillis: number;
  /** The page ranges written since the previous round, [start, end), sorted and merged. */
  dirty: Intervals;
  dirtyPages: number;
  /** Of dirty: mappings registered in this round (new, grown or moved), which count as written whole. */
  added: Intervals;
  /** Every tracked mapping now, in address order, with its dirty pages. */
  mappings: TrackedMapping[];
  untracked: UntrackedMapping[];
  /** The target exited: this is the last round. */
  exited: boolean;
}

export interface DirtyTrackerOptions {
  tracker?: TrackerKind;
  /** How the target is stopped to obtain its userfaultfd (default: ptrace injection). */
  attacher?: (binding: NativeBinding, pid: number, pidfd: number) => Attacher;
}

const EVENTS = UFFD_FEATURE.EVENT_REMAP | UFFD_FEATURE.EVENT_REMOVE | UFFD_FEATURE.EVENT_UNMAP;
const WP_FEATURES = UFFD_FEATURE.WP_UNPOPULATED | UFFD_FEATURE.WP_HUGETLBFS_SHMEM | EVENTS;

type Classified = { track: true; unit: bigint } | { track: false; why?: string };

/** Can a tracker see the writes to this mapping, and if not, should the user hear of it? */
function classify(pid: number, m: MapsEntry, fsCache: Map<string, { type: number; bsize: number }>): Classified {
  const plan = planRegionWithoutFile(pid, m, fsCache);
  if (plan.engine !== undefined) return { track: true, unit: BigInt(plan.engine.pageSize) };
  const capture = plan.record.capture;
  if (capture === 'file-private' || (capture === 'copied' && m.path !== '[vdso]')) {
    return { track: false, why: 'private file mapping: uffd-wp cannot protect it (its written pages are the ones that differ from the file)' };
  }
  if (capture === 'file-reference' && m.perms[1] === 'w') {
    return { track: false, why: 'shared file mapping: writes go to the file and uffd-wp cannot protect it' };
  }
  return { track: false };
}



/** Whether `kind` can run here; throws a one-line unsupported error if not. */
export function requireTracker(binding: NativeBinding, kind: TrackerKind): void {
  requireFeatures(binding);
  if (kind === 'async') {
    if ((kernelFeatures(binding) & UFFD_FEATURE.WP_ASYNC) === 0n) {
      throw unsupported('KERNEL_FEATURE_MISSING', 'this kernel lacks UFFD_FEATURE_WP_ASYNC (6.7+) for the async tracker: use --tracker sync');
    }
    const scan = binding.probePagemapScan();
    if (scan !== 0) throw unsupported('KERNEL_FEATURE_MISSING', `the PAGEMAP_SCAN ioctl does not work here (errno ${scan}): use --tracker sync`);
  }
  if (kind === 'soft-dirty') {
    const probe = binding.probeSoftDirty();
    if (!probe.works) throw unsupported('SOFT_DIRTY_UNAVAILABLE', `--tracker soft-dirty cannot work here: ${probe.why ?? 'the round trip failed'}`);
  }
}

/**
 * Unprotect `ranges` 2 MiB at a time while the target runs, before a context
 * is closed: closing one whose gigabyte is protected unprotects it in one go
 * with the target's writes held off (a 210–300 ms gap at 1 GiB here; 23 ms
 * this way, BENCHMARKS.md "Dirty tracking").
 */
export function unprotectGradually(binding: NativeBinding, uffd: number, ranges: Intervals): void {
  for (const [start, end] of ranges) {
    for (let at = start; at < end; ) {
      const next = ((at >> UNPROTECT_SHIFT) + 1n) << UNPROTECT_SHIFT;
      const stop = next < end ? next : end;
      try {
        binding.uffdWriteProtect(uffd, at, stop - at, false);
      } catch {
        // Changed meanwhile (unmapped, an event pending): the close unprotects it.
      }
      at = stop;
    }
  }
}

export class DirtyTracker {
  private readonly fsCache = new Map<string, { type: number; bsize: number }>();
  private readonly units = new Map<string, bigint>();
  /** What is registered with our context now. */
  private registered: Intervals = [];
  private round = 0;
  private last: number;
  private readonly started: number;
  private stopped = false;
  private exited = false;

  private constructor(
    private readonly binding: NativeBinding,
    readonly pid: number,
    readonly kind: TrackerKind,
    private readonly uffd: number,
    private readonly pidfd: number,
    private readonly handle: NativeHandle | undefined,
  ) {
    this.started = this.last = performance.now();
  }

  /**
   * Attach (a stop of a few milliseconds), then track every mapping a tracker
   * can see: writes from now on are in the first round.
   */
  static start(binding: NativeBinding, pid: number, options: DirtyTrackerOptions = {}): DirtyTracker {
    const kind = options.tracker ?? 'async';
    assertProcessExists(pid);
    refuseSelfFreeze(pid);
    requireTracker(binding, kind);
    let pidfd: number;
    try {
      pidfd = binding.pidfdOpen(pid);
    } catch (error) {
      throw fromNative(error, `pidfd_open(${pid})`);
    }
    if (kind === 'soft-dirty') {
      const tracker = new DirtyTracker(binding, pid, kind, -1, pidfd, undefined);
      tracker.clearSoftDirty();
      return tracker;
    }
    const attacher = (options.attacher ?? ptraceAttacher)(binding, pid, pidfd);
    let uffd = -1;
    try {
      attacher.prepare();
      const stopped = attacher.stop();
      try {
        uffd = stopped.obtainUffd().fd;
        binding.uffdApi(uffd, kind === 'async' ? WP_FEATURES | UFFD_FEATURE.WP_ASYNC : WP_FEATURES);
      } finally {
        stopped.resume();
      }
    } catch (error) {
      if (uffd >= 0) closeQuietly(binding, uffd);
      closeQuietly(binding, pidfd);
      throw fromNative(error, 'obtain the target userfaultfd');
    } finally {
      attacher.release();
    }
    let handle: NativeHandle;
    try {
      handle = binding.trackerStart({ uffd, pid, pidfd, ranges: new BigUint64Array(0) });
    } catch (error) {
      closeQuietly(binding, uffd);
      closeQuietly(binding, pidfd);
      throw fromNative(error, 'start the tracker');
    }
    const tracker = new DirtyTracker(binding, pid, kind, uffd, pidfd, handle);
    try {
      tracker.follow(readMaps(pid));
    } catch (error) {
      tracker.stop();
      throw error;
    }
    return tracker;
  }

  /**
   * The pages written since the previous round (or the start); protects them
   * again, unless `last` (the caller stops tracking next: a scan that does
   * not protect is ~50× quicker, which matters inside a stop).
   */
  take(options: { last?: boolean } = {}): DirtyRound {
    const protect = options.last !== true;
    if (this.stopped) throw new WpsnapError('INTERNAL', 'take() after stop()');
    const now = performance.now();
    const intervalMillis = now - this.last;
    this.last = now;
    let maps: MapsEntry[];
    try {
      maps = this.exited ? [] : readMaps(this.pid);
    } catch (error) {
      if ((error as WpsnapError).code !== 'TARGET_NOT_FOUND') throw error;
      maps = [];
      this.exited = true;
    }
    let dirty: Intervals;
    let added: Intervals = [];
    let untracked: UntrackedMapping[] = [];
    if (this.exited) {
      dirty = [];
    } else if (this.kind === 'soft-dirty') {
      ({ dirty, untracked } = this.softDirtyRound(maps));
    } else {
      const log = this.binding.trackerTake(this.handle!);
      if (log.error !== undefined) throw new WpsnapError('INTERNAL', `the tracker thread failed: ${log.error}`);
      if (log.exited) this.exited = true;
      // Unmapped or moved away: not ours any more (the kernel dropped the registration).
      this.registered = subtract(this.registered, fromStartLenPairs(log.invalid));
      const current = normalize(maps.filter((m) => this.isTracked(m)).map((m) => [m.start, m.end]));
      this.registered = intersect(this.registered, current);
      const logged = log.overflowed ? this.registered : fromStartLenPairs(log.written);
      const written = this.kind === 'async' ? this.scanWritten(protect) : protect ? this.protectAgain(logged) : intersect(logged, this.registered);
      const before = this.registered;
      untracked = this.follow(maps);
      added = subtract(this.registered, before);
      dirty = normalize([...written, ...intersect(logged, this.registered), ...added]);
    }
    const mappings: TrackedMapping[] = [];
    for (const m of maps) {
      if (!this.isTracked(m)) continue;
      mappings.push({ start: m.start, end: m.end, path: m.path, dirtyPages: pagesIn(intersect(dirty, [[m.start, m.end]])) });
    }
    const round: DirtyRound = {
      round: this.round++,
      atMillis: now - this.started,
      intervalMillis,
      dirty,
      dirtyPages: pagesIn(dirty),
      added,
      mappings,
      untracked,
      exited: this.exited,
    };
    return round;
  }

  /**
   * Stop tracking: the target is unprotected (gradually, see
   * unprotectGradually), then the context closes. Idempotent.
   */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.uffd >= 0 && !this.exited) unprotectGradually(this.binding, this.uffd, this.registered);
    if (this.handle !== undefined) this.binding.trackerStop(this.handle);
    if (this.uffd >= 0) closeQuietly(this.binding, this.uffd);
    closeQuietly(this.binding, this.pidfd);
  }

  private key(m: MapsEntry): string {
    return `${m.start}-${m.end} ${m.perms} ${m.dev} ${m.inode} ${m.path}`;
  }

  private isTracked(m: MapsEntry): boolean {
    return this.units.has(this.key(m)) || intersect(this.registered, [[m.start, m.end]]).length > 0;
  }

  /**
   * Register and protect what is not registered yet (new, grown or moved
   * mappings: their pages count as written); returns what cannot be tracked.
   */
  private follow(maps: MapsEntry[]): UntrackedMapping[] {
    const untracked: UntrackedMapping[] = [];
    const units = new Map<string, bigint>();
    const fresh: Intervals = [];
    for (const m of maps) {
      const key = this.key(m);
      let unit = this.units.get(key);
      if (unit === undefined) {
        const c = classify(this.pid, m, this.fsCache);
        if (!c.track) {
          if (c.why !== undefined) untracked.push({ start: m.start, end: m.end, path: m.path, why: c.why });
          continue;
        }
        unit = c.unit;
      }
      const missing = subtract([[m.start, m.end]], this.registered);
      if (missing.length > 0) {
        try {
          this.binding.uffdRegister(this.uffd, m.start, m.end - m.start, UFFDIO_REGISTER_MODE_WP);
        } catch (error) {
          const code = (error as { code?: string }).code;
          if (code === 'EBUSY') {
            throw new WpsnapError('EBUSY', `0x${m.start.toString(16)}-0x${m.end.toString(16)} is registered with another userfaultfd: another wpsnap tracks or snapshots this process`, { errno: 16, syscall: 'ioctl' });
          }
          // Unmapped or changed since the maps were read, or a kind the kernel refuses (SysV shm): next round.
          if (code !== 'EINVAL' && code !== 'ENOMEM' && code !== 'EPERM') throw fromNative(error, 'register a mapping');
          if (code === 'EPERM' || code === 'EINVAL') untracked.push({ start: m.start, end: m.end, path: m.path, why: `the kernel refuses to register it (${code})` });
          continue;
        }
        fresh.push(...missing);
      }
      units.set(key, unit);
    }
    this.units.clear();
    for (const [k, u] of units) this.units.set(k, u);
    const freshNormal = normalize(fresh);
    const all = normalize([...this.registered, ...freshNormal]);
    this.binding.trackerSetRanges(this.handle!, this.rangeUnits(maps, all));
    this.registered = protectWhileRunning(this.binding, this.uffd, freshNormal, all);
    return untracked;
  }

  /** [start, end, unit] triples of the registered mappings, for the sync tracker's faults. */
  private rangeUnits(maps: MapsEntry[], registered: Intervals): BigUint64Array {
    const out: bigint[] = [];
    for (const m of maps) {
      const unit = this.units.get(this.key(m));
      if (unit === undefined) continue;
      for (const [s, e] of intersect(registered, [[m.start, m.end]])) out.push(s, e, unit);
    }
    return BigUint64Array.from(out);
  }

  /** async: one PAGEMAP_SCAN per registered range, protecting again what it reports (if `protect`). */
  private scanWritten(protect: boolean): Intervals {
    const out: Intervals = [];
    for (const [s, e] of this.registered) {
      try {
        out.push(...fromStartLenPairs(this.binding.trackerScan(this.handle!, s, e, protect)));
      } catch (error) {
        // EPERM: part of the range stopped being ours since the maps were read
        // (unmapped, moved): its event is in the next round.
        if ((error as { code?: string }).code !== 'EPERM') throw fromNative(error, 'PAGEMAP_SCAN');
      }
    }
    return normalize(out);
  }

  /** sync: protect again what the fault log holds; returns it. */
  private protectAgain(logged: Intervals): Intervals {
    const written = intersect(logged, this.registered);
    this.registered = protectWhileRunning(this.binding, this.uffd, written, this.registered);
    return written;
  }

  private clearSoftDirty(): void {
    try {
      writeFileSync(`/proc/${this.pid}/clear_refs`, '4');
    } catch (error) {
      throw new WpsnapError('INTERNAL', `write 4 to /proc/${this.pid}/clear_refs: ${(error as Error).message}`);
    }
  }

  /** Pages of [start, end) whose pagemap entry has the soft-dirty bit, as intervals. */
  private softDirtyPages(start: bigint, end: bigint): Intervals {
    const out: Intervals = [];
    const CHUNK = 1n << 18n; // pages per read: 2 MiB of entries
    for (let at = start; at < end; at += CHUNK * PAGE) {
      const pages = Number((end - at) / PAGE < CHUNK ? (end - at) / PAGE : CHUNK);
      const entries = this.binding.readPagemap(this.pid, at, pages);
      for (let i = 0; i < entries.length; i++) {
        if ((entries[i]! & SOFT_DIRTY) !== 0n) out.push([at + BigInt(i) * PAGE, at + BigInt(i + 1) * PAGE]);
      }
    }
    return out;
  }

  /** soft-dirty: read bit 55 of every page's pagemap entry, then clear the bits of the whole process. */
  private softDirtyRound(maps: MapsEntry[]): { dirty: Intervals; untracked: UntrackedMapping[] } {
    const dirty: Intervals = [];
    const untracked: UntrackedMapping[] = [];
    for (const m of maps) {
      const c = classify(this.pid, m, this.fsCache);
      if (!c.track) {
        if (c.why !== undefined) untracked.push({ start: m.start, end: m.end, path: m.path, why: c.why });
        continue;
      }
      this.units.set(this.key(m), c.unit);
      dirty.push(...this.softDirtyPages(m.start, m.end));
    }
    this.clearSoftDirty();
    return { dirty: normalize(dirty), untracked };
  }
}
