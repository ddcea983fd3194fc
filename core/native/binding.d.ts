// Types of every export of the native addon (build/Release/wpsnap_native.node).
import type { RegionKind } from '../constants.js';
import type { AgentSocketBinding } from './agent-binding.js';
import type { LazyServerBinding } from './lazy-binding.js';

// Each throws an Error with `code` (errno name), `errno` and `syscall` on failure.

/** An opaque handle owned by the addon. */
export interface NativeHandle {
  readonly __brand: 'native-handle';
}

export interface UffdApiResult {
  features: bigint;
  ioctls: bigint;
}

export interface FrozenThread {
  tid: number;
  /** struct user_regs_struct, 216 bytes. */
  regs: Buffer;
  /** struct user_fpregs_struct, 512 bytes. */
  fpregs: Buffer;
  /** NT_X86_XSTATE regset. */
  xstate: Buffer;
  /** Blocked signals at the freeze (PTRACE_GETSIGMASK): bit n-1 set when signal n is blocked. */
  sigmask: bigint;
  /**
   * The thread's registered rseq area (where the kernel writes its cpu id when it runs), when
   * the records were read before the thaw (undefined after it, or when none is registered).
   */
  rseqArea?: bigint;
  rseqSize?: number;
  /** The signature the rseq area was registered with (glibc's RSEQ_SIG is 0x53053053 on x86_64); with rseqArea. */
  rseqSignature?: number;
  /** get_robust_list(tid) at the freeze: the head the thread registered (0n: none) and its length. */
  robustList?: { head: bigint; len: number };
  /**
   * The thread's clear_child_tid (set_tid_address, CLONE_CHILD_CLEARTID), 0n when none: only with
   * freeze's `tidAddresses`, and not for a thread found in a signal-delivery stop (or whose stack
   * could not be read).
   */
  clearChildTid?: bigint;
  /** The ptrace stop the thread was found in. */
  stop: 'interrupt' | 'signal' | 'syscall';
}

export interface EngineRegion {
  start: bigint;
  end: bigint;
  /** 4096 or the hugetlb page size. */
  pageSize: number;
  /** 0: anonymous (process_vm_readv, pagemap finds never-touched pages);
   *  1: shared file (pread from fd, holes skipped); 2: other private (process_vm_readv). */
  kind: RegionKind;
  fd?: number;
  fileOffset?: bigint;
  hugetlb?: boolean;
  /** kind 1: the file's st_ctime and st_mtime (ns) at T. A page copied later is
   *  kept only if both are unchanged after the copy (writes through an fd do not fault). */
  ctimeNs?: bigint;
  mtimeNs?: bigint;
  /** [start, end, …] of pages never touched at T and left unprotected: zero, never read. */
  zeroRanges?: BigUint64Array;
  /** [start, end, …] of pages settled during the pause (copied then, or listed lost): never copied by the engine. */
  savedRanges?: BigUint64Array;
  /** kind 1: no process held a writable fd on the file at T, so only mappings write it and they fault: no times proof. */
  noFdWriters?: boolean;
  /** kind 1, in a group (engineRun's group): the page states are the group's for this file, shared with the other members' engines. */
  groupShared?: boolean;
}

/** What engineCreate needs: everything but the userfaultfd and the regions, known before the pause. */
export interface EngineCreateOptions {
  pid: number;
  /** pidfd of the target: its exit ends the engine with ESRCH. */
  pidfd: number;
  /** Pages per batch (>= 512). */
  batchPages?: number;
  /** Batches in the staging pool (memory): the sweep fills them, the store empties them. */
  poolBatches?: number;
  /** Of them, batches touched at creation, before the pause (fresh memory is slow to touch). */
  warmBatches?: number;
  /** Batches the store holds at most at a time; the others wait in staging. */
  storeBatches?: number;
  /** An unlinked, private file for the batches the pool cannot hold; -1 or absent: none. */
  spillFd?: number;
  /** Bytes of the spill file in use at most. */
  spillMaxBytes?: number;
  /** Sweep rate limit, bytes/s; 0 = unlimited. */
  rateBytesPerSec?: number;
}

/** What engineRun adds, in the pause: the target's userfaultfd and the protected regions. */
export interface EngineRunOptions {
  uffd: number;
  regions: EngineRegion[];
  /**
   * Keep the target tracked after the window (snapshot --track): saved pages stay protected,
   * every write after T is logged, and the engine thread serves the context after the window
   * until engineTrackTake(handle, true); the userfaultfd is then the caller's to hand over.
   */
  keep?: boolean;
  /**
   * A tracked generation: pages identical to the parent's, marked saved (neither read nor stored):
   * `unwritten` [start, end) pairs, sorted, disjoint, less `writtenAtInstant` [start, len] pairs.
   */
  unwritten?: BigUint64Array;
  writtenAtInstant?: BigUint64Array;
  /** A member of a process group (groupCreate): its groupShared regions' page states are the group's. */
  group?: NativeHandle;
}

/** engineCreate and engineRun in one call (tests and tools that need no pause in between). */
export type EngineOptions = EngineCreateOptions & EngineRunOptions;

export interface EngineLiveStats {
  faults: number;
  pagesFromFaults: number;
  pagesFromSweep: number;
  pagesZero: number;
  /** pagesZero by how each page was known zero without reading it. */
  zeroPagesBy: { marker: number; sharedZeroPage: number; hugeZeroPage: number; fileHole: number; sparse: number };
  pagesLost: number;
  bytesCopied: number;
  events: number;
  eagainRetries: number;
  overflowBatches: number;
  totalPages: number;
  /** Full batches waiting in staging (memory or spill file), and those the store holds now. */
  stagedBatches: number;
  storeBatches: number;
  /** Bytes waiting in staging now, and at most so far (memory + spill file). */
  stagingBytes: number;
  stagingBytesPeak: number;
  /** Bytes in the spill file at most so far, and batches written to it. */
  spillBytesPeak: number;
  spilledBatches: number;
  /** The staging pool's size in bytes (touched only as it fills). */
  poolBytes: number;
  /** Why spilling stopped (the spill file could not grow): the rest waited in the pool. */
  stagingFallback?: string;
}

export interface EngineFinalStats extends EngineLiveStats {
  faultServiceP50Micros: number;
  faultServiceP99Micros: number;
  faultServiceMaxMicros: number;
  latencySamples: number;
  /** From the engine's start (right after the resume) until the sweep ended: the target's pages were protected meanwhile. */
  windowMicros: number;
  lost: Array<{ address: bigint; pages: number; reason: string }>;
  error?: Error & { code: string; errno: number; syscall: string };
  stopped: number;
}

export type EngineMessage =
  | { type: 'batch'; slot: number; addresses: BigUint64Array; data: Uint8Array }
  /** Staging is full: the sweep waits for the store, with pages still protected (sent once). */
  | { type: 'staging-full' }
  /** The sweep ended: every page is saved or lost and the target unprotected; staged batches may remain. */
  | { type: 'window'; windowMicros: number }
  | { type: 'done'; stats: EngineFinalStats };

/** Values the C code and TypeScript share, as the C code has them (test/constants.test.ts compares). */
export interface NativeConstants {
  readonly pageSize: number;
  readonly syscalls: Readonly<Record<'ioctl' | 'close' | 'openat' | 'userfaultfd' | 'pidfd_open' | 'pidfd_getfd', number>>;
  readonly uffdFeatures: Readonly<Record<string, bigint>>;
  readonly ioctls: Readonly<Record<'UFFDIO_REGISTER_MODE_WP' | 'USERFAULTFD_IOC_NEW', number>>;
  readonly regionKinds: Readonly<Record<'anon' | 'file' | 'private', number>>;
  /** The lost reasons the engine reports, by its index. */
  readonly lostReasons: readonly string[];
  /** Forced-failure points checked in C. */
  readonly faultPoints: readonly string[];
}

export interface NativeBinding extends LazyServerBinding, AgentSocketBinding {
  /**
   * The bytes the target's pipe (read end at `fd`) holds, read without taking them: a copy of
   * the end (pidfd_getfd) tee'd into a pipe of this process (pipe_peek.c).
   */
  peekPipe(pidfd: number, fd: number): Buffer;
  /**
   * The options of the target's socket at `fd` a restore sets again (getsockopt on a copy taken with
   * pidfd_getfd): 1 or 0 each, -1 when the kernel would not say; v6Only for inet6, noDelay for TCP.
   */
  socketOptions(pidfd: number, fd: number): { reuseAddr: number; reusePort: number; keepAlive: number; v6Only?: number; noDelay?: number };
  readonly constants: NativeConstants;
  /** ioctl(UFFDIO_API): enable features on a new context. */
  uffdApi(fd: number, features: bigint): UffdApiResult;
  /** ioctl(UFFDIO_REGISTER); returns the ioctls allowed on the range. */
  uffdRegister(fd: number, start: bigint, len: bigint, mode: bigint): bigint;
  /** ioctl(UFFDIO_UNREGISTER). */
  uffdUnregister(fd: number, start: bigint, len: bigint): void;
  /** ioctl(UFFDIO_WRITEPROTECT) with mode WP (protect) or 0 (unprotect + wake). */
  uffdWriteProtect(fd: number, start: bigint, len: bigint, protect: boolean): void;
  /**
   * PAGEMAP_SCAN over [start, end, …]: the runs of present or swapped pages of
   * each range (counts[i] runs for range i, in order, in `ranges`).
   */
  populatedRanges(pid: number, ranges: BigUint64Array): { counts: Uint32Array; ranges: BigUint64Array };
  /**
   * UFFDIO_WRITEPROTECT over many ranges ([start, len, start, len, …]), split
   * across one thread per online CPU when they add up to 64 MiB or more.
   * Throws naming the first piece the kernel refused.
   */
  uffdWriteProtectRanges(fd: number, ranges: BigUint64Array, protect: boolean): void;
  /** userfaultfd() + UFFDIO_API(0) in this process: what the kernel offers. */
  probeUffd(): UffdApiResult;
  /** ioctl(PAGEMAP_SCAN) on /proc/self/pagemap: 0 if it works, else the errno. */
  probePagemapScan(): number;
  /** pidfd_open(2). */
  pidfdOpen(pid: number): number;
  /** pidfd_getfd(2): a copy of the target's fd in this process. */
  pidfdGetfd(pidfd: number, targetFd: number): number;
  /** SO_PEERCRED of a connected unix socket: the peer's pid, uid and gid. */
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
  /** close(2). */
  closeFd(fd: number): void;
  /** process_vm_readv(2). */
  processVmRead(pid: number, address: bigint, length: number): Buffer;
  /** process_vm_writev(2). */
  processVmWrite(pid: number, address: bigint, data: Buffer): void;
  /**
   * Runs of the target's memory read into `into`, many per call (process_vm_readv, up to 1024 runs a
   * call; a run it cannot read is read through `memFd`, the target's /proc/PID/mem). Each run is
   * [address, length, offset into into] (triples).
   */
  readRuns(pid: number, memFd: number, runs: BigUint64Array, into: Buffer): void;
  /** readRuns on a thread of libuv's pool: `runs` and `into` must stay untouched until it settles. */
  readRunsAsync(pid: number, memFd: number, runs: BigUint64Array, into: Buffer): Promise<void>;
  /** Runs [address, length, offset into data] written into the target, as readRuns reads (read-only pages through memFd). */
  writeRuns(pid: number, memFd: number, runs: BigUint64Array, data: Buffer): void;
  /** Indices of the 4 KiB pages where `a` and `b` (same length) differ; pages with skip[i] set are left out. */
  differingPages(a: Buffer, b: Buffer, skip?: Uint8Array): Uint32Array;
  /** mknod(2) of a character device (S_IFCHR | mode). */
  mknodDevice(path: string, mode: number, rdev: number): void;
  /** Raw /proc/PID/pagemap entries. */
  readPagemap(pid: number, address: bigint, npages: number): BigUint64Array;
  /** The shared zero page's pfn as the engine trusts it (confirmed by /proc/kpageflags), or 0n. */
  zeroPagePfn(): bigint;
  /** Pages of private file mappings that differ from the file (copy-on-write or
   *  swapped), over ranges given as [start, end, allPresent (0/1), …]: with
   *  allPresent every present page. One batch, in the order of the ranges. */
  /** The pages go into `into` when they fit (data is then `into`, the pages at its start), else into a new buffer. */
  copyPrivatePages(pid: number, ranges: BigUint64Array, into?: Buffer): { addresses: BigUint64Array; data: Buffer };
  /**
   * Every page of the [start, end) ranges (pairs), read from the process (one remote iovec per
   * range); pages that cannot be read are left out. data holds `pages` pages (it may be longer).
   */
  readRanges(pid: number, ranges: BigUint64Array): { addresses: BigUint64Array; data: Buffer; pages: number };
  /** How many pages copyPrivatePages would copy now. */
  countPrivatePages(pid: number, ranges: BigUint64Array): number;
  /** pread the data (non-hole) pages of a shared file range, labelled with their mapped addresses. */
  copyFilePages(fd: number, fileOffset: bigint, length: bigint, address: bigint): { addresses: BigUint64Array; data: Buffer };
  /** ptrace(PTRACE_SEIZE + PTRACE_INTERRUPT) every thread and wait for the stops. */
  /** withThreads: every thread's record comes with the freeze's reply (one round trip instead of two). */
  /**
   * options.tidAddresses: while every thread is stopped, inject prctl(PR_GET_TID_ADDRESS) into each
   * (onto its stack below the red zone, the bytes put back) for FrozenThread.clearChildTid: it
   * lengthens the pause. options.syscallInsn: the `syscall` instruction for that (default: one found
   * in the target's [vdso]).
   */
  freeze(pid: number, withThreads?: boolean, options?: { tidAddresses?: boolean; syscallInsn?: bigint }): NativeHandle;
  /** Start the tracer helper (wpsnap_tracer) now, so that the next freeze() does not spend the pause on it. */
  prepareFreeze(count?: number): void;
  /** Registers of every frozen thread, as captured at the freeze. */
  frozenThreads(handle: NativeHandle): FrozenThread[];
  /** Run one syscall in a frozen thread (at insnAddress, a `syscall` instruction)
   *  and restore its registers; returns rax (negative errno as two's complement). */
  injectSyscall(handle: NativeHandle, insnAddress: bigint, nr: number, args: Array<number | bigint>): bigint;
  /**
   * injectSyscall in the frozen thread tid (ESRCH if it is not frozen, EBUSY if it was found in a
   * signal-delivery stop): it resumes after the thaw exactly as if never stopped (a blocking call
   * restarts, or returns EINTR to a handler, as it would have).
   */
  injectSyscallInThread(handle: NativeHandle, tid: number, insnAddress: bigint, nr: number, args: Array<number | bigint>): bigint;
  /**
   * clone3(cloneArgsAddress, cloneArgsSize) injected into the injection thread, with PTRACE_O_TRACECLONE
   * for that call: the new thread is stopped from birth (it never runs user code before the caller
   * sets its registers), joins the frozen threads (frozenThreads lists it, setThreadState and
   * injectSyscallInThread work on it, thaw detaches it) and starts with the injection thread's
   * registers as clone3 left them. The caller writes struct clone_args into the target first.
   * Returns the new tid as this process sees it, or clone3's negative errno (no thread added).
   */
  cloneThread(handle: NativeHandle, insnAddress: bigint, cloneArgsAddress: bigint, cloneArgsSize: number): number;
  /**
   * From now on, if this process dies (the helper's socket closes) before thaw, the helper
   * SIGKILLs the target instead of thawing it (a process under construction never runs half
   * built). thaw and setThreadsAndThaw still thaw it.
   */
  doomOnAbandon(handle: NativeHandle): void;
  /**
   * A rollback: the frozen thread resumes with these registers (struct user_regs_struct, 216
   * bytes; also after later injections) and takes this FP/vector state now (the XSAVE area
   * if not empty, else the 512-byte fpregs) and, when `sigmask` is given, this blocked signal
   * mask (PTRACE_SETSIGMASK; the kernel drops SIGKILL and SIGSTOP from it). Without it the
   * thread keeps the mask it has.
   */
  setThreadState(handle: NativeHandle, tid: number, state: { regs: Buffer; fpregs: Buffer; xstate: Buffer; sigmask?: bigint | undefined }): void;
  /**
   * Every listed thread's state (as setThreadState), then the thaw, in one round trip; the thaw happens
   * whatever a thread's answer, and the first failure is thrown after it. The records must have been read.
   */
  setThreadsAndThaw(handle: NativeHandle, states: Array<{ tid: number; regs: Buffer; fpregs: Buffer; xstate: Buffer; sigmask?: bigint | undefined }>): void;
  /** Stack pointer of the thread injectSyscall uses. */
  injectionThreadRsp(handle: NativeHandle): bigint;
  /** ptrace(PTRACE_DETACH) every thread; idempotent. */
  /** Detach every thread; the helper stays for the next freeze() when nothing is left to read from it. */
  thaw(handle: NativeHandle): void;
  /**
   * Create the engine before the pause (its staging pool, its stager thread, its fds on the target);
   * onMessage gets batches, one 'window' when the protection ends, then one 'done' (once it ran).
   */
  engineCreate(options: EngineCreateOptions, onMessage: (message: EngineMessage) => void): NativeHandle;
  /** Give the engine the protected regions (in the pause, right before the resume). */
  engineRun(handle: NativeHandle, options: EngineRunOptions): void;
  /**
   * A process group's shared files (st_dev, st_ino, pages spanned in any member's mapping), every page
   * unsaved: the members' engines (engineRun's group) copy each page of them once (engine_group.c).
   */
  groupCreate(objects: Array<{ dev: bigint; ino: bigint; pages: number }>): NativeHandle;
  /** Once every engine is done: the pages of the group's shared files no engine saved nor lost, [first, end) page pairs. */
  groupUnsaved(handle: NativeHandle): Array<{ dev: bigint; ino: bigint; pages: BigUint64Array }>;
  /** Start the snapshot: the engine thread serves faults and sweeps from now on (right after the resume). */
  engineGo(handle: NativeHandle): void;
  /** End an engine that never ran; a no-op once it ran. */
  engineClose(handle: NativeHandle): void;
  /**
   * Before the pause: the engine thread lets write faults on these protected ranges
   * ([start, end, unit] triples, sorted) through at once and records them.
   */
  engineTrack(handle: NativeHandle, options: { uffd: number; ranges: BigUint64Array }): void;
  /**
   * What was recorded since the last take, as [start, len] pairs: written (or zapped, or
   * moved into), and unmapped (or moved away). With stop, tracking ends first. After a run with
   * keep: every write since T, and exited once the target exited.
   */
  engineTrackTake(
    handle: NativeHandle,
    stop: boolean,
  ): { written: BigUint64Array; invalid: BigUint64Array; overflowed: boolean; faults: number; forks: number; error?: string; exited?: boolean };
  /**
   * Start the standalone dirty tracker's thread on a userfaultfd of the target (after
   * UFFDIO_API): it reads events (and, for a synchronous context, lets write faults
   * through and logs them). ranges: [start, end, unit] triples, sorted.
   */
  trackerStart(options: { uffd: number; pid: number; pidfd: number; ranges: BigUint64Array }): NativeHandle;
  /** The ranges registered now ([start, end, unit] triples, sorted). */
  trackerSetRanges(handle: NativeHandle, ranges: BigUint64Array): void;
  /** What the thread logged since the last take, as [start, len] pairs. */
  trackerTake(handle: NativeHandle): {
    written: BigUint64Array;
    invalid: BigUint64Array;
    overflowed: boolean;
    faults: number;
    forks: number;
    exited: boolean;
    error?: string;
  };
  /** End the thread (the userfaultfd stays open); idempotent. */
  trackerStop(handle: NativeHandle): void;
  /**
   * PAGEMAP_SCAN of [start, end) of the tracked process: the written pages as [start, len]
   * pairs; reset protects them again in the same walk (a round of the asynchronous tracker).
   */
  trackerScan(handle: NativeHandle, start: bigint, end: bigint, reset: boolean): BigUint64Array;
  /** One soft-dirty round trip on a page of this process. */
  probeSoftDirty(): { works: boolean; why?: string };
  /** The batch in slot is stored: its memory may be reused. */
  engineRelease(handle: NativeHandle, slot: number): void;
  /** Stop early: unsaved pages are reported lost as "interrupted". */
  engineStop(handle: NativeHandle): void;
  engineStats(handle: NativeHandle): EngineLiveStats;
  /** Join the engine thread (after 'done'). */
  engineJoin(handle: NativeHandle): void;
}
