// Types of the lazy-restore page server's native exports (core/native/lazy_server.c,
// lazy_state.c). NativeBinding (binding.d.ts) extends LazyServerBinding.
//
// Model: the restored process's anonymous private memory is registered with a
// userfaultfd in MISSING mode. Every page of the registered ranges, named by
// its T address (where it was at the restore's start), is *unsettled* in every
// context (the process's userfaultfd and one per forked child) until it is
// filled (lazyServerFill/lazyServerZero, or found present: EEXIST), removed
// (MADV_DONTNEED: a REMOVE event; it reads zero from then on) or unmapped (an
// UNMAP event; gone), or the context's mm is gone. A missing fault on an
// unsettled page is reported to JS (`faults` message), which answers with a
// fill; a fault on a settled page, or outside T's ranges (a vma grown by
// mremap), is answered natively with the zero page (EEXIST -> UFFDIO_WAKE).
// mremap moves are followed per context (REMAP events), so a fill always lands
// where the page lives now. Each throws an Error with `code` (errno name),
// `errno` and `syscall` on failure, a TypeError for bad arguments.
import type { NativeHandle } from './binding.js';

/** What the server thread posts to onMessage (on the JS thread). */
export type LazyServerMessage =
  /** Missing faults on unsettled pages, read since the last message: T addresses,
   * page-aligned, each once per message (a fault repeated before its fill is
   * not reported again). Answer with lazyServerFill/lazyServerZero. */
  | { type: 'faults'; addresses: BigUint64Array }
  /** Once: every page of every context is settled (lazyServerFinish may run). */
  | { type: 'settled' }
  /** The target exited (its pidfd became readable); forked children may still be served. */
  | { type: 'exit' }
  /** The server met an error (the first one; lazyServerStats(handle).error keeps it). */
  | { type: 'error'; message: string };

export interface LazyServerStart {
  /** The restored process's userfaultfd, in this process (pidfd_getfd). It must
   * have had UFFDIO_API with at least `lazyUffdFeatures` (EVENT_FORK | EVENT_REMAP
   * | EVENT_REMOVE | EVENT_UNMAP) and UFFDIO_REGISTER mode MISSING on `ranges`.
   * Owned by the caller: close it after lazyServerFinish/Stop (the server sets
   * O_NONBLOCK on its file description). */
  uffd: number;
  /** pidfd of the restored process (its exit -> `exit` message); owned by the caller. Optional. */
  pidfd?: number;
  /** The registered ranges as [start, end) pairs in T addresses: sorted,
   * disjoint, page-aligned. Every page in them starts unsettled. */
  ranges: BigUint64Array;
}

export interface LazyServerStats {
  /** Missing faults read (all contexts, answered natively or by JS). */
  faults: number;
  /** Pages filled by lazyServerFill/Zero while a fault reported for them was pending (per context). */
  pagesOnDemand: number;
  /** Pages filled by lazyServerFill/Zero with no fault pending on them (per context). */
  pagesPrefetched: number;
  /** Faults answered natively with the zero page (settled page, or outside T's ranges). */
  pagesZeroed: number;
  /** Unsettled pages that became unreachable (unmapped, or no registered vma for a fill). */
  pagesGone: number;
  /** Fault service time, from reading the fault to the ioctl that woke it (fill or native zero page). */
  faultServiceP50Micros: number;
  faultServiceP99Micros: number;
  /** Faults whose service time was measured (the percentiles' sample; the last 2^20 kept). */
  faultsServed: number;
  /** Contexts ever served: 1 + forked children. */
  contexts: number;
  /** Contexts whose mm still exists (as far as the server knows: probed on each stats/pending call). */
  liveContexts: number;
  /** Non-cooperative events read (fork, remap, remove, unmap). */
  events: number;
  /** Times a fill's ioctl met EAGAIN (the target's mm changing) and waited for the server thread to read the events. */
  fillWaits: number;
  /** Unsettled pages summed over live contexts. */
  unsettledPages: number;
  /** Every page of every context is settled. */
  settled: boolean;
  /** The target exited. */
  exited: boolean;
  /** The first error the server thread met, if any. */
  error?: string;
}

export interface LazyServerBinding {
  /** The UFFDIO_API features the server needs (EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP = 0x4e);
   * request them where the userfaultfd is created (in the target). */
  readonly lazyUffdFeatures: bigint;
  /** ioctl(UFFDIO_API) with lazyUffdFeatures on a new userfaultfd (usable when
   * the context was created without its API call); throws ENOTSUP if one is missing. */
  lazyUffdApi(uffd: number): { features: bigint; ioctls: bigint };
  /** Start a server thread polling the userfaultfd(s), the pidfd and its own
   * eventfd. onMessage runs on the JS thread. The handle keeps the event loop
   * alive until lazyServerFinish or lazyServerStop. */
  lazyServerStart(options: LazyServerStart, onMessage: (message: LazyServerMessage) => void): NativeHandle;
  /**
   * Pages [tAddress, tAddress + data.length) have T's content `data` (whole
   * pages): UFFDIO_COPY them into every context where they are still unsettled,
   * at the address they live at now, waking the threads faulting on them. A
   * present page (EEXIST) is settled and skipped; removed or unmapped pages are
   * never filled. Waits (≤ ~5 s, then EAGAIN) while the target's mm changes
   * until the server thread has read the pending events. Returns the pages
   * filled now, summed over contexts (counted as on demand or prefetched).
   * Throws EBADF once the server has ended (lazyServerFinish/Stop).
   */
  lazyServerFill(handle: NativeHandle, tAddress: bigint, data: Buffer): number;
  /** As lazyServerFill, with pages that are zero at T (UFFDIO_ZEROPAGE). */
  lazyServerZero(handle: NativeHandle, tAddress: bigint, length: bigint | number): number;
  /** [start, len] pairs (T addresses, merged) of the pages in [start, end) still
   * unsettled in some live context: what the background pass has left to fill. */
  lazyServerPending(handle: NativeHandle, start: bigint, end: bigint): BigUint64Array;
  lazyServerStats(handle: NativeHandle): LazyServerStats;
  /**
   * Every page is settled (EBUSY otherwise): UFFDIO_UNREGISTER every range in
   * every context (where it lives now; for the target, whole vmas that hold a
   * part of one, so a vma grown in place is released too), then stop and join
   * the thread and close the children's userfaultfds. Later missing faults
   * (after MADV_DONTNEED, say) are the kernel's ordinary zero fill. Close the
   * uffd afterwards.
   */
  lazyServerFinish(handle: NativeHandle): void;
  /** End now (target exited, or an error) without unregistering: stop and
   * join the thread, close the children's userfaultfds (which releases their
   * registrations). Threads still waiting on a fault in the target are woken
   * when the caller closes the uffd. Idempotent. */
  lazyServerStop(handle: NativeHandle): void;
}
