// Roll a live process back to a snapshot, in place: every thread stopped; the
// layout compared with the snapshot's and repaired with syscalls injected into
// the target (mappings created since T unmapped; mappings removed since mapped
// again at their addresses, with their protections, flags and offsets:
// anonymous memory, files opened again by path, shared memory through an fd
// the process holds; brk and protections restored); every page whose content
// differs from T's written back (process_vm_writev, and /proc/PID/mem for
// pages that are not writable); every thread's registers and FP/vector state
// put back; threads created since T made to exit; then every thread resumes,
// at T.
//
// Everything that could make it refuse is checked before anything changes:
// a thread of T that is gone, a mapping of T that cannot be made again, pages
// the snapshot lost, a file a private mapping reads that changed since T.
// What a rollback cannot undo (file descriptors, file offsets, children,
// data sent) is listed in its warnings.
import { closeSync, openSync } from 'node:fs';
import { WpsnapError, fromNative } from '../common/errors.js';
import { fileUnchanged } from '../snapshot-format/export-raw.js';
import { formatAddress, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';
import { findSyscallInstruction, freeze, inject, openInTarget, type Frozen } from './attach.js';
import { fromStartLenPairs, intersect, normalize, subtract, type Intervals } from './intervals.js';
import { encodeTracking, takeOverTracking, type TakenTracking, type TrackingState } from './keeper.js';
import { UFFDIO_REGISTER_MODE_WP } from './features.js';
import { closeQuietly } from './pause.js';
import { faultPoint } from './fault.js';
import { SYSCALL } from './constants.js';
import { protectWhileRunning } from './preprotect.js';
import { tripleIntervals } from './tracking-handover.js';
import type { NativeBinding, NativeHandle } from './native/binding.js';
import { assertProcessExists, listThreads, parseMaps, readProc, readProcessRecord, readStartTimeTicks } from './procfs.js';
import { compareAndRewrite, ContentCache, hasContent, type Rewrite } from './rollback-content.js';
import { howToRecreate, planLayout, protOf, type Creation, type Plan } from './rollback-layout.js';
import { refuseSelfFreeze } from './target-guard.js';

const { mprotect: SYS_MPROTECT, mmap: SYS_MMAP, munmap: SYS_MUNMAP, brk: SYS_BRK, mremap: SYS_MREMAP, exit: SYS_EXIT, close: SYS_CLOSE } = SYSCALL;
const PROT_WRITE = 2;
const O_RDONLY = 0;
const O_RDWR = 2;
const O_CLOEXEC = 0o2000000;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
/** Offsets in struct user_regs_struct (x86_64). */
const REG = { rax: 80, rip: 128, origRax: 120, rdi: 112 } as const;

/** What a rollback cannot undo, always said. */
const CANNOT_UNDO = [
  'file descriptors opened or closed since T, and file offsets, are as they are now',
  'child processes started since T, and data sent or received on pipes and sockets, are not undone',
  'signals pending now stay pending (signals pending at T are not recorded)',
];

export interface RollbackOptions {
  /** Roll this live process back instead (the same program, started apart): default the snapshot's own process. */
  pid?: number;
  /**
   * Rewrite only the pages written since T (or since the last rollback), as
   * logged by the tracking `snapshot --track` left (core/keeper.ts), and keep
   * the tracking; its cost grows with the pages written, not the size.
   */
  incremental?: boolean;
  /**
   * Incremental: how many pages written since T stay writable, written back
   * at every rollback, before they are protected again (default 8192). A
   * page left writable costs a 4 KiB copy per rollback; a page protected
   * again, a UFFDIO_WRITEPROTECT now and a fault at the target's next write.
   */
  keepWritablePages?: number;
}

export interface RollbackResult {
  id: number;
  pid: number;
  incremental: boolean;
  /** Pages whose content differed from T's, written back. */
  pagesWritten: number;
  /** Pages compared with T's. */
  pagesCompared: number;
  /** Mappings unmapped, re-created, resized (brk) or re-protected. */
  mappingsRepaired: number;
  threadsRestored: number;
  /** Threads created since T, made to exit. */
  threadsExited: number;
  /** How long the target was stopped for the rollback proper, µs (ending the threads started since T stops it briefly before). */
  micros: number;
  warnings: string[];
}

/**
 * T's threads as the target's: its own, or (--pid, another process of the
 * program) the target's threads in the same order, main thread first; the
 * target's threads beyond T's count are ended like threads started since T.
 */
function asThreadsOf(threads: ThreadRecord[], snapshotPid: number, pid: number): ThreadRecord[] {
  if (pid === snapshotPid) return threads;
  const order = (main: number) => (a: number, b: number) => (a === main ? -1 : b === main ? 1 : a - b);
  const atT = [...threads].sort((a, b) => order(snapshotPid)(a.tid, b.tid));
  const live = [...taskTids(pid)].sort(order(pid));
  if (live.length < atT.length) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} has ${live.length} thread${live.length === 1 ? '' : 's'}, and the process of the snapshot had ${atT.length} at T: nothing changed`);
  }
  return atT.map((t, i) => ({ ...t, tid: live[i]! }));
}

/** Threads created since T resume at a syscall instruction calling exit(0). */
function exitRegisters(regs: Buffer, insn: bigint): Buffer {
  const out = Buffer.from(regs);
  out.writeBigUInt64LE(insn, REG.rip);
  out.writeBigUInt64LE(BigInt(SYS_EXIT), REG.rax);
  out.writeBigUInt64LE(0xffffffffffffffffn, REG.origRax); // no syscall restart
  out.writeBigUInt64LE(0n, REG.rdi);
  return out;
}

const taskTids = (pid: number): Set<number> => new Set(listThreads(pid));

/**
 * Make the threads created since T exit, before the rollback proper: each
 * must exit with its own stack still mapped (the kernel writes its rseq area
 * and clear_child_tid there on the way out, and a thread whose rseq area is
 * gone takes the whole process down with SIGSEGV), and that stack is a
 * mapping made since T, which the rollback unmaps. The other threads run for
 * the moment it takes; the rollback puts them back at T anyway.
 */
async function endThreadsSinceT(binding: NativeBinding, pid: number, insn: bigint, atT: Set<number>): Promise<number> {
  const tids = [...taskTids(pid)].filter((t) => !atT.has(t));
  if (tids.length === 0) return 0;
  binding.prepareFreeze();
  const frozen = freeze(binding, pid);
  let ending: number[];
  try {
    const gone = [...atT].filter((t) => !frozen.threads.some((f) => f.tid === t));
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.join(', ')} of T exited since; nothing changed`);
    }
    const fresh = frozen.threads.filter((t) => !atT.has(t.tid));
    for (const t of fresh) binding.setThreadState(frozen.handle, t.tid, { regs: exitRegisters(t.regs, insn), fpregs: t.fpregs, xstate: t.xstate });
    ending = fresh.map((t) => t.tid);
  } finally {
    binding.thaw(frozen.handle);
  }
  const until = Date.now() + 5000;
  while (ending.some((t) => taskTids(pid).has(t))) {
    if (Date.now() > until) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: threads ${ending.join(', ')}, started since T, did not exit`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return ending.length;
}

/**
 * Rollbacks of one live process to one snapshot's instant: once (`rollback`)
 * or again and again (`rollbackSession`, a fuzzing loop). What does not
 * change between rollbacks is done once: the store's checks, T's threads and
 * content (kept in memory as first read), the tracer helper (kept for the
 * next freeze), the target's /proc/PID/mem, and, with --incremental, the
 * tracking context itself, taken from the keeper once and handed back at
 * close().
 *
 * Incremental: a page the target writes after T faults once, is logged and
 * left writable; from then on every rollback writes T's content back to it
 * (it stays "written since T", as the keeper's log says) instead of
 * protecting it again (a UFFDIO_WRITEPROTECT and a TLB flush per range, and
 * a fault at the next write, against a 4 KiB copy). Past keepWritablePages
 * such pages, they are protected again.
 */
export class InPlaceRollback {
  private readonly tidsAtT: Set<number>;
  private readonly withContent: RegionRecord[];
  private readonly content: ContentCache;
  /** The maps at the end of the previous rollback, and the plan they give (nothing to repair, or what could not be). */
  private layout: { text: string; plan: Plan } | undefined;
  /** Incremental: pages of T's layout unprotected since T (written, zapped, re-created), rewritten at every rollback. */
  private writable: Intervals = [];
  /** Incremental: what the context covers, [start, end, unit] triples. */
  private ranges: BigUint64Array;
  /** The pages left writable with T's content, as last prepared (rebuilt when the writable pages change). */
  private rewrite: { writable: Intervals; rewrite: Rewrite } | undefined;
  /** What the tracking does not cover, compared whole at every rollback (rebuilt when the covered ranges change). */
  private untracked: { ranges: BigUint64Array; parts: RegionRecord[] } | undefined;
  /** A rollback failed half-way: the target is partly rolled back, and this session ends. */
  private broken = false;
  private closed = false;

  private constructor(
    private readonly binding: NativeBinding,
    private readonly store: Store,
    private readonly snapId: number,
    private readonly processId: number,
    private readonly pid: number,
    private readonly startTimeTicks: number,
    /** The snapshot's own process (not --pid of another). */
    private readonly sameProcess: boolean,
    private readonly regions: RegionRecord[],
    private readonly threadsAtT: ThreadRecord[],
    private readonly insn: bigint,
    private readonly mem: number,
    private readonly tracked: Tracked | undefined,
    private readonly keepWritablePages: number,
  ) {
    this.tidsAtT = new Set(threadsAtT.map((t) => t.tid));
    this.withContent = regions.filter(hasContent);
    this.content = new ContentCache(store, processId);
    this.ranges = tracked?.taken.tracking.ranges ?? new BigUint64Array(0);
    // Only what the context covers: the rest (shared memory…) is compared whole at every rollback anyway.
    if (tracked !== undefined) this.writable = intersect(normalize([...tracked.taken.tracking.written, ...tracked.taken.tracking.invalid]), tripleIntervals(this.ranges));
  }

  /** Every check that does not need the target stopped, and (incremental) the tracking taken over. */
  static async open(binding: NativeBinding, store: Store, ref: string, options: RollbackOptions = {}): Promise<InPlaceRollback> {
    const snap = store.find(ref);
    if (snap.state !== 'complete') {
      throw new WpsnapError('SNAPSHOT_INCOMPLETE', `snapshot ${snap.id} is ${snap.state}: only a complete snapshot can be rolled back to`);
    }
    const processes = store.processes(snap.id);
    if (processes.length !== 1) {
      throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} holds ${processes.length} processes: rollback takes a snapshot of one`);
    }
    const proc = processes[0]!;
    const keep = options.keepWritablePages;
    if (keep !== undefined && !(Number.isSafeInteger(keep) && keep >= 0)) throw new WpsnapError('USAGE', `keepWritablePages must be a whole number of pages, 0 or more (not ${keep})`);
    const pid = options.pid ?? proc.pid;
    assertProcessExists(pid);
    refuseSelfFreeze(pid);
    const live = readProcessRecord(pid);
    if (options.pid === undefined && live.startTimeTicks !== proc.startTimeTicks) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} is not the process of snapshot ${snap.id} (the pid was reused): give --pid of a live process of ${proc.exe}`);
    }
    if (live.exe !== proc.exe) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} runs ${live.exe}, not ${proc.exe} as in snapshot ${snap.id}: nothing changed`);
    }
    const lost = store.lost(proc.processId);
    if (lost.length > 0) {
      const pages = lost.reduce((n, l) => n + l.pages, 0);
      throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} lost ${pages} pages (wpsnap show ${snap.id}): a rollback would leave them as they are now; nothing changed`);
    }
    const regions = store.regions(proc.processId);
    for (const r of regions) {
      if (r.capture === 'file-private' && !fileUnchanged(r)) {
        throw new WpsnapError('ROLLBACK_REFUSED', `${r.file?.path ?? r.path} changed since snapshot ${snap.id}: its pages at T are not known; nothing changed`);
      }
    }
    const threadsAtT = asThreadsOf(store.threads(proc.processId), proc.pid, pid);
    const insn = findSyscallInstruction(binding, pid);
    const sameProcess = pid === proc.pid && live.startTimeTicks === proc.startTimeTicks;
    const mem = openSync(`/proc/${pid}/mem`, 'r+');
    try {
      const tracked = options.incremental === true ? await takeTracking(binding, store, snap.id, pid, live.startTimeTicks) : undefined;
      return new InPlaceRollback(binding, store, snap.id, proc.processId, pid, live.startTimeTicks, sameProcess, regions, threadsAtT, insn, mem, tracked, options.keepWritablePages ?? KEEP_WRITABLE_PAGES);
    } catch (error) {
      closeSync(mem);
      throw error;
    }
  }

  async rollback(): Promise<RollbackResult> {
    const { binding, pid } = this;
    if (this.closed) throw new WpsnapError('ROLLBACK_FAILED', `this rollback session of pid ${pid} is closed`);
    if (this.broken) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid} was left partly rolled back by an earlier failure of this session: open a new one`);
    assertProcessExists(pid);
    // Only its identity, at every rollback: not the whole record (exe, cmdline, auxv…).
    if (readStartTimeTicks(pid) !== this.startTimeTicks) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} is another process than when this session began (the pid was reused): nothing changed`);
    }
    const { stopped, threadsExited } = await this.freezeThreadsOfT();
    let result: Omit<RollbackResult, 'micros' | 'threadsExited'>;
    try {
      result = await this.rollbackStopped(stopped);
    } catch (error) {
      if (!(error instanceof WpsnapError && error.code === 'ROLLBACK_REFUSED')) this.broken = true;
      throw error;
    } finally {
      binding.thaw(stopped.handle);
    }
    const micros = Number(process.hrtime.bigint() - stopped.frozenAt) / 1000;
    return { ...result, threadsExited, micros: Math.round(micros) };
  }

  /**
   * End the session: with --incremental, the tracking goes back to the
   * keeper (with what was logged meanwhile, and the pages left writable as
   * written since T); after a failure half-way it does not, and the keeper
   * ends, releasing the target.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.mem);
    const tracked = this.tracked;
    if (tracked === undefined) return;
    const { binding } = this;
    try {
      binding.trackerStop(tracked.reader);
      if (!this.broken) {
        const log = binding.trackerTake(tracked.reader);
        const t = tracked.taken.tracking;
        const missed = log.overflowed || log.forks > 0 || log.error !== undefined;
        const back: TrackingState = {
          ...t,
          ranges: this.ranges,
          written: normalize([...this.writable, ...fromStartLenPairs(log.written)]),
          invalid: fromStartLenPairs(log.invalid),
          overflowed: missed,
        };
        await tracked.taken.link.request({ op: 'adopt', ...encodeTracking(back) }).catch(() => undefined);
      }
    } finally {
      closeQuietly(binding, tracked.pidfd);
      closeQuietly(binding, tracked.taken.uffd);
      tracked.taken.link.close(); // handed back already, or the keeper ends and releases the target
    }
  }

  /**
   * Every thread stopped, and only T's: threads started since T are made to
   * exit first (a thread pool that keeps starting them: a few tries, then
   * the rollback refuses).
   */
  private async freezeThreadsOfT(): Promise<{ stopped: Frozen; threadsExited: number }> {
    const { binding, pid, insn, tidsAtT } = this;
    let threadsExited = 0;
    for (let attempt = 0; ; attempt++) {
      try {
        threadsExited += await endThreadsSinceT(binding, pid, insn, tidsAtT);
        binding.prepareFreeze();
      } catch (error) {
        throw error instanceof WpsnapError ? error : fromNative(error, `end the threads of pid ${pid} started since T`);
      }
      const candidate = freeze(binding, pid, { withThreads: true }); // its threads are checked at once
      if (candidate.threads.every((t) => tidsAtT.has(t.tid)) || attempt >= 3) return { stopped: candidate, threadsExited };
      binding.thaw(candidate.handle);
    }
  }

  private async rollbackStopped(stopped: Frozen): Promise<Omit<RollbackResult, 'micros' | 'threadsExited'>> {
    const { binding, pid, regions, threadsAtT, insn, tracked } = this;
    // Every check first: a refusal changes nothing.
    const frozenTids = new Set(stopped.threads.map((t) => t.tid));
    const gone = threadsAtT.filter((t) => !frozenTids.has(t.tid));
    const fresh = stopped.threads.filter((t) => !this.tidsAtT.has(t.tid));
    if (fresh.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} keeps starting threads (${fresh.map((t) => t.tid).join(', ')}): they could not all be ended before the rollback; nothing else changed`);
    }
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.map((t) => t.tid).join(', ')} of T exited since; nothing changed`);
    }
    const mapsText = readProc(pid, 'maps').toString('utf8');
    const plan = this.layout !== undefined && this.layout.text === mapsText ? this.layout.plan : this.planFor(mapsText, stopped);
    // Incremental: what was written (or zapped, moved, unmapped) since the last take, as logged up to the freeze.
    const logged = tracked !== undefined ? loggedSince(binding, tracked) : undefined;
    const missed = tracked !== undefined && logged === undefined;
    if (logged !== undefined && logged.length > 0) this.writable = normalize([...this.writable, ...intersect(logged, tripleIntervals(this.ranges))]);

    let mappingsRepaired = 0;
    const call = (nr: number, args: Array<number | bigint>, what: string): void => {
      const result = inject(binding, stopped, insn, nr, args, what);
      if (result < 0) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: ${what} failed in the target (errno ${-result}); it is partly rolled back`);
    };
    if (plan.brk !== null) {
      const got = inject(binding, stopped, insn, SYS_BRK, [plan.brk.to], `brk(${formatAddress(plan.brk.to)})`);
      if (BigInt.asUintN(64, BigInt(got)) !== plan.brk.to) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: brk(${formatAddress(plan.brk.to)}) failed in the target (the break is at ${formatAddress(BigInt.asUintN(64, BigInt(got)))}); it is partly rolled back`);
      mappingsRepaired++;
    }
    for (const [s, e] of plan.unmap) {
      call(SYS_MUNMAP, [s, e - s], `munmap(${formatAddress(s)}, ${e - s})`);
      mappingsRepaired++;
    }
    for (const c of plan.create) {
      mapAgain(binding, stopped, pid, insn, c);
      mappingsRepaired++;
    }
    // The heap grown back to T's break is new memory too (zeros), as anonymous memory mapped again.
    const heapGrown: Intervals = plan.brk !== null && plan.brk.to > plan.brk.from ? [[plan.brk.from, plan.brk.to]] : [];
    const created = normalize([...plan.create.map((r): [bigint, bigint] => [r.start, r.end]), ...heapGrown]);
    if (tracked !== undefined && created.length > 0) {
      // Anonymous memory re-created is registered with the context again (a new mapping has none), writable
      // until protected; what is re-created otherwise is not tracked (no fault tells of its writes): compared whole.
      const anonymous = normalize([...plan.create.filter((c) => c.how.kind === 'anonymous' || (c.how.kind === 'grow' && c.inode === 0)).map((r): [bigint, bigint] => [r.start, r.end]), ...heapGrown]);
      for (const [s, e] of anonymous) binding.uffdRegister(tracked.taken.uffd, s, e - s, UFFDIO_REGISTER_MODE_WP);
      this.ranges = rearmedRanges(this.ranges, regions, created, anonymous);
      binding.trackerSetRanges(tracked.reader, this.ranges);
      this.writable = normalize([...this.writable, ...anonymous]);
    }

    faultPoint('rollback-after-layout');
    let pagesWritten: number;
    let pagesCompared: number;
    if (tracked !== undefined && !missed) {
      // Only what was written since T (and what was re-created), written whole: its cost is what the target touched.
      if (this.rewrite?.writable !== this.writable) this.rewrite = { writable: this.writable, rewrite: this.content.prepareRewrite(this.withContent, this.writable) };
      pagesWritten = pagesCompared = this.rewrite.rewrite.write(binding, pid, this.mem);
      faultPoint('rollback-mid-content');
      // What the tracking does not see (shared memory, private file mappings' copies…) is compared whole.
      if (this.untracked?.ranges !== this.ranges) {
        const covered = tripleIntervals(this.ranges);
        const parts = this.withContent.flatMap((r) => subtract([[r.start, r.end]], covered).map(([start, end]) => ({ ...r, start, end, offset: r.offset + (start - r.start) })));
        this.untracked = { ranges: this.ranges, parts };
      }
      const compared = await this.content.compare(binding, pid, this.mem, this.untracked.parts);
      pagesWritten += compared.pagesWritten;
      pagesCompared += compared.pagesCompared;
    } else {
      ({ pagesWritten, pagesCompared } = await compareAndRewrite(binding, pid, this.mem, this.store, this.processId, this.withContent));
    }
    for (const r of plan.create.filter((c) => c.perms[1] !== 'w')) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${formatAddress(r.start)})`);
    }
    for (const r of plan.reprotect) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${formatAddress(r.start)}, ${r.perms})`);
      mappingsRepaired++;
    }
    if (tracked !== undefined && (missed || pageCount(this.writable) > this.keepWritablePages)) this.protectAgain(tracked, missed);
    // The next rollback finds these maps unless the target changes them: then nothing to plan.
    if (plan.brk !== null || plan.unmap.length > 0 || plan.create.length > 0 || plan.reprotect.length > 0) {
      const text = readProc(pid, 'maps').toString('utf8');
      this.layout = { text, plan: this.planFor(text, stopped) };
    } else {
      this.layout = { text: mapsText, plan };
    }
    // Registers last (injections run in one of these threads and put its registers back after each),
    // and the thaw with them, in one round trip to the tracer.
    try {
      binding.setThreadsAndThaw(stopped.handle, threadsAtT.map((t) => ({ tid: t.tid, regs: t.regs, fpregs: t.fpregs, xstate: t.xstate, sigmask: t.sigmask })));
    } catch (error) {
      throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: its threads' registers could not all be put back (${(error as Error).message}); it is partly rolled back`);
    }
    const warnings = [...CANNOT_UNDO];
    if (regions.some((r) => r.perms[3] === 's' && hasContent(r))) warnings.push('shared memory was written back: other processes that map it see its content at T too');
    if (missed) warnings.push('the tracking missed writes (a fork?): every page was compared instead');
    if (threadsAtT.some((t) => t.sigmask === undefined)) warnings.push('signal masks are as they are now: this snapshot was taken before wpsnap recorded them');
    for (const c of plan.create.filter((x) => x.how.kind === 'shared-anonymous')) {
      warnings.push(`${formatAddress(c.start)}-${formatAddress(c.end)}, shared anonymous memory unmapped since T, was mapped again as new memory with its content at T: processes that shared it with pid ${pid} no longer do`);
    }
    return {
      id: this.snapId,
      pid,
      incremental: tracked !== undefined && !missed,
      pagesWritten,
      pagesCompared,
      mappingsRepaired,
      threadsRestored: threadsAtT.length,
      warnings,
    };
  }

  /** The layout repairs for the target's maps `text`, its threads stopped as `stopped`. */
  private planFor(text: string, stopped: Frozen): Plan {
    const now = parseMaps(text);
    const rseq = normalize(stopped.threads.filter((t) => t.rseqArea !== undefined).map((t): [bigint, bigint] => [t.rseqArea!, t.rseqArea! + BigInt(t.rseqSize ?? 32)]));
    return planLayout(this.regions, now, this.pid, this.sameProcess, (part) => howToRecreate(this.pid, part, now), rseq);
  }

  /**
   * Protect the pages left writable again (the target's next write to one is
   * logged again): past keepWritablePages of them, or after the tracking
   * missed writes (then every covered page). Ranges that would not take the
   * protection stay writable, rewritten at every rollback.
   */
  private protectAgain(tracked: Tracked, everything: boolean): void {
    const uffd = tracked.taken.uffd;
    const covered = tripleIntervals(this.ranges);
    const again = everything ? covered : intersect(this.writable, covered);
    // A range unmapped and mapped again since T (a logged event) lost its registration: register it again.
    for (const [s, e] of intersect(this.writable, covered)) {
      try {
        this.binding.uffdRegister(uffd, s, e - s, UFFDIO_REGISTER_MODE_WP);
      } catch {
        // not one mapping, or gone: it stays writable
      }
    }
    const protectedNow = protectWhileRunning(this.binding, uffd, again.length > 2048 ? covered : again, covered);
    this.writable = subtract(this.writable, intersect(again, protectedNow));
  }
}

/** Pages a session leaves writable (rewritten at every rollback) before protecting them again, by default. */
const KEEP_WRITABLE_PAGES = 8192;

const pageCount = (intervals: Intervals): number => intervals.reduce((n, [s, e]) => n + Number((e - s) / 4096n), 0);

/** Roll the live process back to snapshot `ref`, once. */
export async function rollback(binding: NativeBinding, store: Store, ref: string, options: RollbackOptions = {}): Promise<RollbackResult> {
  const once = await InPlaceRollback.open(binding, store, ref, options);
  try {
    return await once.rollback();
  } finally {
    await once.close();
  }
}

/** Map part `c` of a mapping of T again, at its address, as planned (rollback-layout's Recreate). */
function mapAgain(binding: NativeBinding, stopped: Frozen, pid: number, insn: bigint, c: Creation): void {
  const where = `${formatAddress(c.start)}-${formatAddress(c.end)} (${c.path || 'anonymous'})`;
  const failed = (what: string, errno: number): WpsnapError => new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: ${what} for ${where} failed in the target (errno ${errno}); it is partly rolled back`);
  const shared = c.perms[3] === 's';
  // Writable while its content is written back (then protected as at T), unless it is a shared mapping
  // whose content is the file's: that one is mapped as it was.
  const writable = c.how.kind === 'anonymous' || c.how.kind === 'shared-anonymous' || c.how.kind === 'grow' || !shared || c.how.writable;
  const prot = protOf(c.perms) | (writable ? PROT_WRITE : 0);
  const flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED_NOREPLACE;
  const map = (extra: number, fd: number, offset: bigint): void => {
    const at = inject(binding, stopped, insn, SYS_MMAP, [c.start, c.end - c.start, prot, flags | extra, fd, offset], `mmap(${formatAddress(c.start)})`);
    if (BigInt.asUintN(64, BigInt(at)) !== c.start) throw failed('mmap', at < 0 ? -at : 0);
  };
  const how = c.how;
  if (how.kind === 'grow') {
    const at = inject(binding, stopped, insn, SYS_MREMAP, [how.from, how.length, how.length + (c.end - c.start), 0], `mremap(${formatAddress(how.from)})`);
    if (BigInt.asUintN(64, BigInt(at)) !== how.from) throw failed('mremap', at < 0 ? -at : 0);
    return;
  }
  if (how.kind === 'anonymous' || how.kind === 'shared-anonymous') return map(MAP_ANONYMOUS, -1, 0n);
  if (how.kind === 'fd') return map(0, how.fd, c.offset);
  const fd = openInTarget(binding, pid, stopped, insn, how.path, (how.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) throw failed(`openat(${how.path})`, -fd);
  try {
    map(0, fd, c.offset);
  } finally {
    inject(binding, stopped, insn, SYS_CLOSE, [fd], `close(${fd})`);
  }
}

/** What the tracking logged since the last take; undefined if it missed something. */
function loggedSince(binding: NativeBinding, tracked: Tracked): Intervals | undefined {
  const log = binding.trackerTake(tracked.reader);
  if (log.overflowed || log.forks > 0 || log.error !== undefined) return undefined;
  return normalize([...fromStartLenPairs(log.written), ...fromStartLenPairs(log.invalid)]);
}

/** The tracking taken over from the keeper, and our reader of the target's faults meanwhile. */
interface Tracked {
  taken: TakenTracking;
  reader: NativeHandle;
  pidfd: number;
}

/**
 * --incremental: the keeper's context and its log since T, and a thread of
 * ours serving (and logging) the target's faults until the freeze. Refused,
 * the tracking handed back as it was, unless it runs since this very
 * snapshot, in this store, and missed nothing.
 */
async function takeTracking(binding: NativeBinding, store: Store, snapId: number, pid: number, startTimeTicks: number): Promise<Tracked> {
  const how = `take the snapshot with --track (wpsnap snapshot ${pid} --name base --track), then roll back to it`;
  const taken = await takeOverTracking(binding, pid, startTimeTicks);
  if (taken === undefined) throw new WpsnapError('NOT_TRACKED', `rollback --incremental needs the writes since T tracked, and pid ${pid} is not tracked: ${how}`);
  const t = taken.tracking;
  const refusal =
    t.store !== store.path || t.base !== snapId
      ? `pid ${pid} is tracked since snapshot ${t.base} of ${t.store}, not since snapshot ${snapId} of ${store.path}: ${how}`
      : t.overflowed
        ? `the tracking of pid ${pid} missed writes (a fork, or no memory for its log): roll back without --incremental`
        : undefined;
  if (refusal !== undefined) {
    await taken.link.request({ op: 'adopt', ...encodeTracking(t) }).catch(() => undefined);
    taken.link.close();
    closeQuietly(binding, taken.uffd);
    throw new WpsnapError('NOT_TRACKED', refusal);
  }
  let pidfd = -1;
  try {
    pidfd = binding.pidfdOpen(pid);
    const reader = binding.trackerStart({ uffd: taken.uffd, pid, pidfd, ranges: t.ranges });
    return { taken, reader, pidfd };
  } catch (error) {
    if (pidfd >= 0) closeQuietly(binding, pidfd);
    closeQuietly(binding, taken.uffd);
    taken.link.close();
    throw fromNative(error, `serve the faults of pid ${pid}`);
  }
}

/** What the context covers after the rollback: its ranges still mapped as at T (not re-created), and the anonymous memory re-created. */
function rearmedRanges(triples: BigUint64Array, regions: RegionRecord[], created: Intervals, registered: Intervals): BigUint64Array {
  const atT = normalize(regions.map((r): [bigint, bigint] => [r.start, r.end]));
  const out: bigint[] = [];
  for (let i = 0; i + 2 < triples.length; i += 3) {
    for (const [s, e] of intersect(subtract([[triples[i]!, triples[i + 1]!]], created), atT)) out.push(s, e, triples[i + 2]!);
  }
  for (const [s, e] of registered) out.push(s, e, 4096n);
  const sorted: Array<[bigint, bigint, bigint]> = [];
  for (let i = 0; i < out.length; i += 3) sorted.push([out[i]!, out[i + 1]!, out[i + 2]!]);
  sorted.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return BigUint64Array.from(sorted.flat());
}

