// The attach seam: how a target is stopped and how its userfaultfd reaches
// wpsnap. Today's way is ptrace injection (core/ptrace-attacher.ts); a
// cooperative agent passing its fd over SCM_RIGHTS is another. The pause
// (core/pause.ts) only talks to this interface.
import type { SignalAction, ThreadRecord } from '../snapshot-format/model.js';
import type { UffdMethod } from './attach.js';

/** Registers of one thread as captured when the target was stopped (its name is read after the resume). */
export type StoppedThread = Omit<ThreadRecord, 'name'>;

export interface Attacher {
  /** Work done before the pause so it does not lengthen it (start a helper, find what to inject). */
  prepare(): void;
  /**
   * Stop every thread of the target: the pause starts here. tidAddresses: each thread's
   * clear_child_tid read while they are all stopped (a call run inside every thread: costly).
   */
  stop(options?: { tidAddresses?: boolean }): StoppedTarget;
  /** After a stop was resumed: make the next stop as quick as the first (prepare() did that for the first). */
  rearm(): void;
  /** Undo what prepare() set up outside the target (idempotent). */
  release(): void;
}

export interface StoppedTarget {
  readonly threads: StoppedThread[];
  /**
   * A userfaultfd bound to the target's mm, held by this process only (the
   * target keeps no copy, so if wpsnap dies the kernel releases it), before UFFDIO_API.
   */
  obtainUffd(): { fd: number; method: UffdMethod };
  /**
   * The dispositions of these signals (rt_sigaction(2) read inside the target), for a restore;
   * absent where the attach cannot run code in the target.
   */
  readSignalActions?(signals: number[]): SignalAction[];
  /** The clear_child_tid of these threads (prctl(PR_GET_TID_ADDRESS) run inside each), for a restore. */
  readTidAddresses?(tids: number[]): Map<number, bigint>;
  /** Let the target run on; idempotent. */
  resume(): void;
}
