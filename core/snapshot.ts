// Snapshot one running process: the pause (freeze, protect, resume) and the
// background part (engine batches → store), ending in the store's final commit.
import { closeSync } from 'node:fs';
import { PAGE_SIZE, type LostRange, type PageBatch, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';
import type { SnapshotWriter, Store } from '../store/store.js';
import {
  findSyscallInstruction,
  freeze,
  injectUserfaultfd,
  prepareDeviceNode,
  targetMayCallUserfaultfd,
  type DeviceNode,
  type Frozen,
  type UffdMethod,
} from './attach.js';
import { WpsnapError, fromNative } from './errors.js';
import { faultPoint } from './fault.js';
import { requireFeatures, UFFD_FEATURES_FOR_SNAPSHOT, UFFDIO_REGISTER_MODE_WP } from './features.js';
import type { EngineFinalStats, EngineMessage, NativeBinding, NativeHandle } from './native/binding.js';
import { assertProcessExists, readProcessRecord, threadName, type MapsEntry } from './procfs.js';
import { RegionPlanner, type RegionPlan } from './regions.js';
import { refuseSelfFreeze } from './target-guard.js';

export interface SnapshotProgress {
  pagesDone: number;
  /** Of pagesDone, those found zero (never read, nothing to save). */
  zeroPages: number;
  totalPages: number;
  bytesCopied: number;
  faults: number;
  elapsedMillis: number;
}

export interface SnapshotOptions {
  name?: string;
  /** Background sweep limit in bytes per second; 0 or undefined = unlimited. */
  rateBytesPerSec?: number;
  onProgress?: (progress: SnapshotProgress) => void;
  /** Aborting stops the snapshot: it is recorded as incomplete. */
  signal?: AbortSignal;
  /** Shared memory that uffd-wp cannot protect (SysV segments) is copied whole
   * during the pause, up to this many bytes in all; beyond that it is listed as lost. */
  maxSharedCopyBytes?: number;
}

export const DEFAULT_MAX_SHARED_COPY = 512 * 1024 * 1024;

export interface LostPagesEntry {
  address: string;
  pages: number;
  reason: string;
}

export interface SnapshotResult {
  id: number;
  name: string | null;
  pid: number;
  pauseMicros: number;
  durationMillis: number;
  pagesSaved: number;
  zeroPages: number;
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  lostPages: LostPagesEntry[];
  threads: number;
  /** sparse: of the protected regions, those protected only where populated (their other pages were zero at T). */
  regions: { protected: number; sparse: number; copied: number; filePrivate: number; fileReference: number; skipped: number };
  uffdMethod: UffdMethod;
  pauseBreakdownMicros: PauseBreakdown;
  engine: Omit<EngineFinalStats, 'lost' | 'error'>;
}

/** Where the pause went, in microseconds. */
export interface PauseBreakdown {
  freeze: number;
  inject: number;
  plan: number;
  protect: number;
  copy: number;
  thaw: number;
}

interface PausePhase {
  breakdown: PauseBreakdown;
  uffd: number;
  method: UffdMethod;
  plans: RegionPlan[];
  threads: ThreadRecord[];
  pausedPages: PageBatch[];
  pauseMicros: number;
  /** Regions protected only where populated (see protectionRanges). */
  sparseRegions: number;
}

function closeQuietly(binding: NativeBinding, fd: number): void {
  try {
    binding.closeFd(fd);
  } catch {
    // already closed
  }
}

/** Register one region for write-protect faults; false if the kernel refuses the mapping type. */
function register(binding: NativeBinding, uffd: number, plan: RegionPlan): boolean {
  const { start, end } = plan.record;
  try {
    binding.uffdRegister(uffd, start, end - start, UFFDIO_REGISTER_MODE_WP);
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === 'EINVAL' || code === 'EPERM') return false;
    const range = `0x${start.toString(16)}-0x${end.toString(16)}`;
    if (code === 'EBUSY') {
      // A mapping belongs to one userfaultfd context at a time.
      throw new WpsnapError(
        'EBUSY',
        `${range} is already registered with another userfaultfd: another snapshot of this process is still running, or the program uses userfaultfd itself`,
        { errno: 16, syscall: 'ioctl' },
      );
    }
    throw fromNative(error, `register ${range}`);
  }
  return true;
}

/** Write-protect every range in one call (spread over the CPUs: the target is stopped meanwhile). */
function writeProtectAll(binding: NativeBinding, uffd: number, ranges: bigint[]): void {
  try {
    binding.uffdWriteProtectRanges(uffd, BigUint64Array.from(ranges), true);
  } catch (error) {
    throw fromNative(error, 'write-protect');
  }
}

/**
 * Private anonymous mappings at least this large, with at most a quarter of
 * their pages present or swapped, are protected only where populated. Write-
 * protecting a never-touched page costs a page-table entry holding a marker
 * (WP_UNPOPULATED): for a runtime's multi-GiB PROT_NONE reservation (V8, the
 * JVM, Go, malloc arenas) that is megabytes of page tables and tens of
 * milliseconds of pause, for pages that are zero at T and need no protection:
 * they are recorded as zero and never read, whatever is written to them later.
 * Thread stacks (8 MiB each with glibc, mostly untouched) count too: 300 of
 * them left 3.6 MB of page tables in the target when the floor was 16 MiB.
 */
const SPARSE_MIN_BYTES = 1n << 20n;
const SPARSE_MAX_POPULATED = 0.25;

function sparseCandidate(start: bigint, end: bigint, inode: number, perms: string): boolean {
  return inode === 0 && perms[3] === 'p' && end - start >= SPARSE_MIN_BYTES;
}

/**
 * The candidate mappings whose populated share is small now, before the
 * freeze (the scan costs ~5 ms per dense GiB), as address intervals: mappings
 * may split or merge before the pause (mprotect), so the pause asks which
 * of its mappings overlap one.
 */
function findSparse(binding: NativeBinding, pid: number, maps: MapsEntry[]): SparseIntervals {
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

/** The present-or-swapped runs [start, end) of each range, from one populatedRanges call. */
function populatedRuns(binding: NativeBinding, pid: number, ranges: Array<{ start: bigint; end: bigint }>): Array<Array<[bigint, bigint]>> {
  const scan = binding.populatedRanges(pid, BigUint64Array.from(ranges.flatMap((r) => [r.start, r.end])));
  let at = 0;
  return ranges.map((_, i) => {
    const runs: Array<[bigint, bigint]> = [];
    for (let k = 0; k < (scan.counts[i] as number); k++, at++) runs.push([scan.ranges[2 * at] as bigint, scan.ranges[2 * at + 1] as bigint]);
    return runs;
  });
}

type SparseIntervals = Array<[start: bigint, end: bigint]>;

function overlapsSparse(sparse: SparseIntervals, start: bigint, end: bigint): boolean {
  return sparse.some(([s, e]) => s < end && start < e);
}

/**
 * The ranges to write-protect: registered regions whole, except the sparse
 * ones, which get their populated runs only (scanned now, with the target
 * stopped) and their engine region the rest as zeroRanges. Returns how many
 * regions were protected that way.
 */
function protectionRanges(
  binding: NativeBinding,
  pid: number,
  registered: RegionPlan[],
  sparse: SparseIntervals,
): { ranges: bigint[]; sparseRegions: number } {
  const ranges: bigint[] = [];
  const scanned = registered.filter((plan) => {
    const { start, end, inode, perms } = plan.record;
    return plan.engine?.kind === 0 && !plan.engine.hugetlb && sparseCandidate(start, end, inode, perms) && overlapsSparse(sparse, start, end);
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

/** [start, end, allPresent] of the mappings whose pages are copied in the pause because uffd-wp cannot protect them. */
function privateCopyRanges(plans: Iterable<RegionPlan>): BigUint64Array {
  const ranges: bigint[] = [];
  for (const plan of plans) {
    if (plan.pausedCopy === 'cow' || plan.pausedCopy === 'all-present') {
      ranges.push(plan.record.start, plan.record.end, plan.pausedCopy === 'all-present' ? 1n : 0n);
    }
  }
  return BigUint64Array.from(ranges);
}

/**
 * Memory for the pages copied in the pause, touched now: on this kind of VM
 * the first touch of fresh memory costs as much as the copy (about 2.5 µs a
 * page), and a JVM copies ~3,000 pages of its CDS archive. Sized from a count
 * taken now, with room for pages copied on write before the freeze; if more
 * turn up, the copy takes a new buffer.
 */
function privateCopyBuffer(binding: NativeBinding, pid: number, plans: Iterable<RegionPlan>): Buffer | undefined {
  const ranges = privateCopyRanges(plans);
  if (ranges.length === 0) return undefined;
  let pages: number;
  try {
    pages = binding.countPrivatePages(pid, ranges);
  } catch (error) {
    throw fromNative(error, 'count the copied-on-write pages of private file mappings');
  }
  if (pages === 0) return undefined;
  return Buffer.allocUnsafeSlow((Math.ceil(pages * 1.25) + 256) * PAGE_SIZE).fill(0);
}

/** Everything that happens while the target is stopped. */
function pausePhase(
  binding: NativeBinding,
  pid: number,
  pidfd: number,
  insn: bigint,
  deviceNode: DeviceNode | null,
  planner: RegionPlanner,
  maxSharedCopyBytes: number,
  sparse: SparseIntervals,
  copyBuffer: Buffer | undefined,
): PausePhase {
  const started = process.hrtime.bigint();
  let mark = started;
  const lap = (): number => {
    const now = process.hrtime.bigint();
    const us = Number(now - mark) / 1000;
    mark = now;
    return us;
  };
  const frozen: Frozen = freeze(binding, pid);
  const breakdown: PauseBreakdown = { freeze: lap(), inject: 0, plan: 0, protect: 0, copy: 0, thaw: 0 };
  let uffd = -1;
  try {
    faultPoint('after-freeze');
    const injected = injectUserfaultfd(binding, pid, frozen, insn, pidfd, deviceNode);
    uffd = injected.fd;
    faultPoint('after-inject');
    try {
      binding.uffdApi(uffd, UFFD_FEATURES_FOR_SNAPSHOT);
    } catch (error) {
      throw fromNative(error, 'ioctl(UFFDIO_API) on the target userfaultfd');
    }
    breakdown.inject = lap();
    const plans = planner.plan(planner.readMaps());
    breakdown.plan = lap();
    let sharedCopyBytes = 0;
    const registered: RegionPlan[] = [];
    for (const plan of plans) {
      if (plan.engine === undefined) continue;
      const bytes = Number(plan.record.end - plan.record.start);
      if (plan.sharedWith !== undefined) {
        // uffd-wp only sees writes through this process's mapping: memory other
        // processes write is not capturable at one instant without freezing them.
        delete plan.engine;
        plan.record.capture = 'skipped';
        plan.record.skipReason = `shared memory also mapped writable by pid ${plan.sharedWith.join(', ')}: snapshot those processes together to capture it`;
        plan.lost = { address: plan.record.start, pages: bytes / 4096, reason: 'shared-with-other-process' };
        continue;
      }
      if (register(binding, uffd, plan)) {
        registered.push(plan);
        continue;
      }
      // The kernel will not register it (a SysV segment): copy it whole now,
      // while the target, its only writer, is stopped.
      delete plan.engine;
      plan.record.capture = 'copied';
      if (plan.openedFd === undefined) {
        plan.pausedCopy = 'all-present';
      } else if (sharedCopyBytes + bytes <= maxSharedCopyBytes) {
        sharedCopyBytes += bytes;
        plan.pausedCopy = 'file';
      } else {
        plan.record.capture = 'skipped';
        plan.record.skipReason = 'shared memory uffd-wp cannot protect, larger than --max-shared-copy';
        plan.lost = { address: plan.record.start, pages: bytes / 4096, reason: 'shared-copy-limit' };
      }
    }
    const protection = protectionRanges(binding, pid, registered, sparse);
    writeProtectAll(binding, uffd, protection.ranges);
    breakdown.protect = lap();
    faultPoint('after-protect');
    const pausedPages: PageBatch[] = [];
    for (const plan of plans) {
      const { start, end, offset } = plan.record;
      if (plan.pausedCopy === 'file') {
        const copy = binding.copyFilePages(plan.openedFd!, offset, end - start, start);
        if (copy.addresses.length > 0) pausedPages.push({ addresses: copy.addresses, data: copy.data });
      }
    }
    const privateRanges = privateCopyRanges(plans);
    if (privateRanges.length > 0) {
      const copy = binding.copyPrivatePages(pid, privateRanges, copyBuffer);
      const pages = copy.addresses.length;
      if (pages > 0) pausedPages.push({ addresses: copy.addresses, data: copy.data.subarray(0, pages * PAGE_SIZE) });
    }
    breakdown.copy = lap();
    binding.thaw(frozen.handle);
    breakdown.thaw = lap();
    const pauseMicros = Number(process.hrtime.bigint() - started) / 1000;
    // Thread names are read after the resume: they are for recognising the
    // snapshot, and reading /proc per thread would lengthen the pause.
    const threads: ThreadRecord[] = frozen.threads.map((t) => ({
      tid: t.tid,
      name: threadName(pid, t.tid),
      regs: t.regs,
      fpregs: t.fpregs,
      xstate: t.xstate,
    }));
    return { breakdown, uffd, method: injected.method, plans, threads, pausedPages, pauseMicros, sparseRegions: protection.sparseRegions };
  } catch (error) {
    // Closing the only reference releases every registration and protection.
    if (uffd >= 0) closeQuietly(binding, uffd);
    binding.thaw(frozen.handle);
    throw error;
  }
}

function runEngine(
  binding: NativeBinding,
  writer: SnapshotWriter,
  processId: number,
  options: { pid: number; uffd: number; pidfd: number; plans: RegionPlan[]; rate: number },
  snapshotOptions: SnapshotOptions,
  startedAt: number,
  stopSignal: AbortSignal,
): Promise<EngineFinalStats> {
  return new Promise((resolve, reject) => {
    const regions = options.plans.flatMap((p) => (p.engine ? [p.engine] : []));
    const pending = new Set<Promise<void>>();
    let storeError: unknown;
    let batches = 0;
    let handle: NativeHandle | undefined;
    const onMessage = (message: EngineMessage): void => {
      if (message.type === 'batch') {
        batches++;
        if (batches === 3) faultPoint('mid-sweep');
        const slot = message.slot;
        const stored = writer
          .addPages(processId, { addresses: message.addresses, data: message.data })
          .catch((error: unknown) => {
            storeError ??= error;
            if (handle) binding.engineStop(handle);
          })
          .finally(() => {
            pending.delete(stored);
            if (handle) binding.engineRelease(handle, slot);
          });
        pending.add(stored);
        return;
      }
      clearInterval(timer);
      snapshotOptions.signal?.removeEventListener('abort', onAbort);
      stopSignal.removeEventListener('abort', onAbort);
      const finish = async (): Promise<void> => {
        while (pending.size > 0) await Promise.all([...pending]);
        if (handle) binding.engineJoin(handle);
        if (storeError !== undefined) throw storeError;
        resolve(message.stats);
      };
      finish().catch(reject);
    };
    const onAbort = (): void => {
      if (handle) binding.engineStop(handle);
    };
    try {
      handle = binding.engineStart(
        { pid: options.pid, uffd: options.uffd, pidfd: options.pidfd, regions, rateBytesPerSec: options.rate },
        onMessage,
      );
    } catch (error) {
      reject(fromNative(error, 'start the snapshot engine'));
      return;
    }
    snapshotOptions.signal?.addEventListener('abort', onAbort);
    stopSignal.addEventListener('abort', onAbort);
    if (snapshotOptions.signal?.aborted || stopSignal.aborted) onAbort();
    const timer = setInterval(() => {
      if (!handle || !snapshotOptions.onProgress) return;
      const s = binding.engineStats(handle);
      snapshotOptions.onProgress({
        pagesDone: s.pagesFromFaults + s.pagesFromSweep + s.pagesZero + s.pagesLost,
        zeroPages: s.pagesZero,
        totalPages: s.totalPages,
        bytesCopied: s.bytesCopied,
        faults: s.faults,
        elapsedMillis: Date.now() - startedAt,
      });
    }, 100);
  });
}

export async function snapshotProcess(
  binding: NativeBinding,
  store: Store,
  pid: number,
  options: SnapshotOptions = {},
): Promise<SnapshotResult> {
  assertProcessExists(pid);
  refuseSelfFreeze(pid);
  requireFeatures(binding);
  const startedAt = Date.now();
  const processRecord = readProcessRecord(pid);
  const insn = findSyscallInstruction(binding, pid);
  let pidfd: number;
  try {
    pidfd = binding.pidfdOpen(pid);
  } catch (error) {
    throw fromNative(error, `pidfd_open(${pid})`);
  }
  let deviceNode: DeviceNode | null = null;
  let writer: SnapshotWriter | undefined;
  let pause: PausePhase | undefined;
  const planner = new RegionPlanner(pid);
  try {
    deviceNode = targetMayCallUserfaultfd(pid) ? null : prepareDeviceNode(binding, pid);
    writer = store.beginSnapshot(options.name === undefined ? {} : { name: options.name });
    const processId = writer.addProcess(processRecord);
    const mapsBefore = planner.readMaps();
    planner.prepare(mapsBefore);
    const sparse = findSparse(binding, pid, mapsBefore);
    const copyBuffer = privateCopyBuffer(binding, pid, planner.prepared());
    try {
      binding.prepareFreeze();
    } catch (error) {
      throw fromNative(error, 'start the tracer helper');
    }
    faultPoint('before-freeze');
    const maxSharedCopy = options.maxSharedCopyBytes ?? DEFAULT_MAX_SHARED_COPY;
    pause = pausePhase(binding, pid, pidfd, insn, deviceNode, planner, maxSharedCopy, sparse, copyBuffer);
    deviceNode?.remove();
    deviceNode = null;
    faultPoint('after-resume');

    // The engine starts first: the target is running and its first writes to
    // protected pages wait for it. The metadata and the pages copied in the
    // pause are stored meanwhile (the first batch also starts the store's workers).
    const stopEngine = new AbortController();
    const engineDone = runEngine(
      binding,
      writer,
      processId,
      { pid, uffd: pause.uffd, pidfd, plans: pause.plans, rate: options.rateBytesPerSec ?? 0 },
      options,
      startedAt,
      stopEngine.signal,
    );
    let pausedStored: Promise<unknown>;
    const initialLost = pause.plans.flatMap((p): LostRange[] => (p.lost ? [p.lost] : []));
    try {
      writer.addThreads(processId, pause.threads);
      writer.addRegions(processId, pause.plans.map((p): RegionRecord => p.record));
      if (initialLost.length > 0) writer.addLost(processId, initialLost);
      pausedStored = Promise.all(pause.pausedPages.map((batch) => writer!.addPages(processId, batch)));
    } catch (error) {
      stopEngine.abort();
      await engineDone.catch(() => undefined);
      throw error;
    }
    pausedStored.catch(() => undefined); // surfaced below, once the engine has stopped
    const stats = await engineDone;
    await pausedStored;
    // Every page is saved: closing the only reference drops the registrations.
    closeQuietly(binding, pause.uffd);
    const engineLost: LostRange[] = stats.lost.map((l) => ({ address: l.address, pages: l.pages, reason: l.reason as LostRange['reason'] }));
    if (engineLost.length > 0) writer.addLost(processId, engineLost);
    if (stats.error) {
      const error = fromNative(stats.error, `snapshot of pid ${pid}`);
      await writer.abort(error.message);
      throw error;
    }
    if (stats.stopped) {
      await writer.abort('interrupted');
      throw new WpsnapError('INTERRUPTED', `snapshot of pid ${pid} interrupted; recorded as incomplete`, { kind: 'interrupted' });
    }
    faultPoint('before-commit');
    writer.countZeroPages(stats.pagesZero);
    const durationMillis = Date.now() - startedAt;
    const final = await writer.complete({
      pauseMicros: Math.round(pause.pauseMicros),
      durationMillis,
      faults: stats.faults,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
    });
    const allLost = [...initialLost, ...engineLost];
    const { lost: _lost, error: _error, ...engine } = stats;
    return {
      id: writer.id,
      name: options.name ?? null,
      pid,
      pauseMicros: Math.round(pause.pauseMicros),
      durationMillis,
      pagesSaved: final.pagesSaved,
      zeroPages: final.zeroPages,
      pagesNew: final.pagesNew,
      bytesRaw: final.bytesRaw,
      bytesStored: final.bytesStored,
      faults: stats.faults,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
      lostPages: allLost.map((l) => ({ address: `0x${l.address.toString(16)}`, pages: l.pages, reason: l.reason })),
      threads: pause.threads.length,
      regions: {
        protected: pause.plans.filter((p) => p.record.capture === 'protected').length,
        sparse: pause.sparseRegions,
        copied: pause.plans.filter((p) => p.record.capture === 'copied').length,
        filePrivate: pause.plans.filter((p) => p.record.capture === 'file-private').length,
        fileReference: pause.plans.filter((p) => p.record.capture === 'file-reference').length,
        skipped: pause.plans.filter((p) => p.record.capture === 'skipped').length,
      },
      uffdMethod: pause.method,
      pauseBreakdownMicros: pause.breakdown,
      engine,
    };
  } catch (error) {
    if (pause) closeQuietly(binding, pause.uffd);
    if (writer) await writer.abort(error instanceof Error ? error.message : String(error)).catch(() => undefined);
    throw error;
  } finally {
    planner.release();
    deviceNode?.remove();
    closeQuietly(binding, pidfd);
    for (const plan of pause?.plans ?? []) if (plan.openedFd !== undefined) closeSync(plan.openedFd);
  }
}
