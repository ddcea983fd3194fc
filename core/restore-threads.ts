// A restore's threads: T's other threads created in the frozen process
// (clone3, at their tids of T inside the new PID namespace, born stopped
// under the tracer), then each given what the kernel keeps per thread:
// clear_child_tid, robust futex list, rseq registration, name and
// credentials; the signal dispositions of T (process-wide); last, every
// thread's registers, FP/vector state and signal mask, and the thaw.
import { WpsnapError } from '../common/errors.js';
import type { ThreadRecord } from '../snapshot-format/model.js';
import { SYSCALL } from './constants.js';
import { scratchWrite, type Builder } from './restore-memory.js';
import type { RestorePlan } from './restore-plan.js';

const CLONE_VM = 0x100;
const CLONE_FS = 0x200;
const CLONE_FILES = 0x400;
const CLONE_SIGHAND = 0x800;
const CLONE_THREAD = 0x10000;
const CLONE_SYSVSEM = 0x40000;
const CLONE_CHILD_CLEARTID = 0x200000;
const CLONE_ARGS_SIZE = 88;
const PR_SET_NAME = 15;
const PR_SET_DUMPABLE = 4;
const ROBUST_LIST_HEAD_SIZE = 24;
/** Offsets in struct user_regs_struct (x86_64). */
const REG = { rax: 80, origRax: 120, rip: 128 } as const;
const ERESTARTNOINTR = -513n;
const ERESTART_RESTARTBLOCK = -516n;

/** Scratch offsets (restore-memory's area: 0 paths, 1024 prctl_mm_map, 4096 auxv). */
const AT = { clone: 16384, tid: 16640, name: 16704, groups: 17408, sigaction: 32768 } as const;

export class ThreadSetup {
  /** T's tid -> the tid the thread has now (the host's view). */
  private readonly tids = new Map<number, number>();
  private readonly main: ThreadRecord;

  constructor(
    private readonly b: Builder,
    private readonly plan: RestorePlan,
    private readonly inNamespace: boolean,
  ) {
    const main = plan.threads.find((t) => t.tid === plan.process.pid) ?? plan.threads[0];
    if (main === undefined) throw new WpsnapError('RESTORE_REFUSED', `snapshot ${plan.snapshotId} records no thread`);
    this.main = main;
    this.tids.set(main.tid, b.pid);
  }

  private call(tid: number, nr: number, args: Array<number | bigint>, what: string): bigint {
    const raw = this.b.binding.injectSyscallInThread(this.b.frozen.handle, tid, this.b.insn, nr, args.map((a) => (typeof a === 'number' && a < 0 ? BigInt.asUintN(64, BigInt(a)) : a)));
    const result = BigInt.asIntN(64, raw);
    if (result < 0n && result > -4096n) throw new WpsnapError('RESTORE_FAILED', `${what} failed in thread ${tid} of the process being restored: errno ${-result}`, { errno: Number(-result) });
    return result;
  }

  /** T's other threads, created stopped; warnings for what T did not record. */
  create(): string[] {
    const warnings: string[] = [];
    for (const t of this.plan.threads) {
      if (t === this.main) continue;
      const args = Buffer.alloc(CLONE_ARGS_SIZE);
      let flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
      if (t.clearChildTid !== undefined && t.clearChildTid !== 0n) {
        flags |= CLONE_CHILD_CLEARTID;
        args.writeBigUInt64LE(t.clearChildTid, 16);
      }
      args.writeBigUInt64LE(BigInt(flags), 0);
      if (this.inNamespace) {
        const tid = Buffer.alloc(4);
        tid.writeInt32LE(t.tid);
        args.writeBigUInt64LE(scratchWrite(this.b, AT.tid, tid), 64);
        args.writeBigUInt64LE(1n, 72);
      }
      const at = scratchWrite(this.b, AT.clone, args);
      const tid = this.b.binding.cloneThread(this.b.frozen.handle, this.b.insn, at, CLONE_ARGS_SIZE);
      if (tid < 0) throw new WpsnapError('RESTORE_FAILED', `creating thread ${t.tid} (clone3) failed: errno ${-tid}${-tid === 17 ? ' (its tid is taken)' : ''}`);
      this.tids.set(t.tid, tid);
    }
    if (this.plan.threads.some((t) => t.clearChildTid === undefined)) {
      warnings.push('clear_child_tid, robust lists and rseq areas were not recorded (a snapshot before wpsnap recorded them): a thread joining another may wait forever');
    }
    return warnings;
  }

  /** T's signal dispositions (rt_sigaction in the main thread); a warning when not recorded. */
  setSignalActions(): string[] {
    const actions = this.plan.state.signals;
    if (actions === undefined) return ['signal dispositions were not recorded (a snapshot before wpsnap recorded them): every signal has its default action'];
    for (const a of actions) {
      const act = Buffer.alloc(32);
      act.writeBigUInt64LE(BigInt(a.handler), 0);
      act.writeBigUInt64LE(BigInt(a.flags), 8);
      act.writeBigUInt64LE(BigInt(a.restorer), 16);
      act.writeBigUInt64LE(BigInt(a.mask), 24);
      const at = scratchWrite(this.b, AT.sigaction, act);
      this.call(this.b.pid, SYSCALL.rt_sigaction, [a.signal, at, 0, 8], `rt_sigaction(${a.signal})`);
    }
    return [];
  }

  /** Per thread: clear_child_tid (main; the others got it at clone), robust list, rseq (its area must be in: the kernel writes it), name. */
  perThreadState(): void {
    for (const t of this.plan.threads) {
      const tid = this.tids.get(t.tid)!;
      if (t === this.main) this.call(tid, SYSCALL.set_tid_address, [t.clearChildTid ?? 0n], 'set_tid_address');
      this.call(tid, SYSCALL.set_robust_list, [t.robustList?.head ?? 0n, t.robustList?.len ?? ROBUST_LIST_HEAD_SIZE], 'set_robust_list');
      if (t.rseq !== undefined && t.rseq.area !== 0n) this.call(tid, SYSCALL.rseq, [t.rseq.area, t.rseq.size, 0, t.rseq.signature], 'rseq');
      const name = scratchWrite(this.b, AT.name, Buffer.from(t.name.slice(0, 15) + '\0'));
      this.call(tid, SYSCALL.prctl, [PR_SET_NAME, name, 0, 0, 0], 'prctl(PR_SET_NAME)');
    }
  }

  /** Every thread's credentials of T: last, they drop the capabilities the steps before need. */
  credentials(): void {
    const { credentials } = this.plan.state;
    const groups = Buffer.alloc(4 * credentials.groups.length);
    credentials.groups.forEach((g, i) => groups.writeUInt32LE(g, 4 * i));
    const groupsAt = scratchWrite(this.b, AT.groups, groups.length > 0 ? groups : Buffer.alloc(4));
    const [ruid, euid, suid] = credentials.uid;
    const [rgid, egid, sgid] = credentials.gid;
    for (const t of this.plan.threads) {
      const tid = this.tids.get(t.tid)!;
      this.call(tid, SYSCALL.setgroups, [credentials.groups.length, groupsAt], 'setgroups');
      this.call(tid, SYSCALL.setresgid, [rgid!, egid!, sgid!], 'setresgid');
      this.call(tid, SYSCALL.setresuid, [ruid!, euid!, suid!], 'setresuid');
    }
    // A change of euid made the process undumpable (its /proc files root's, no core): as a process started by its user, it is.
    this.call(this.b.pid, SYSCALL.prctl, [PR_SET_DUMPABLE, 1, 0, 0, 0], 'prctl(PR_SET_DUMPABLE)');
  }

  /** Every thread's registers, FP/vector state and signal mask of T; then the process runs. */
  thaw(): string[] {
    const { binding, pid } = this.b;
    const codeBefore = (at: bigint): Buffer | undefined => {
      try {
        return binding.processVmRead(pid, at, 7);
      } catch {
        return undefined;
      }
    };
    const warnings: string[] = [];
    const states = this.plan.threads.map((t) => {
      const { regs, eintr } = restartable(t.regs, codeBefore);
      if (eintr) warnings.push(`thread ${t.tid} was in a syscall the kernel would have restarted from its own record (a sleep or a wait with a timeout): it gets EINTR instead`);
      return { tid: this.tids.get(t.tid)!, regs, fpregs: t.fpregs, xstate: t.xstate, sigmask: t.sigmask };
    });
    binding.frozenThreads(this.b.frozen.handle); // the tracer sends every state with the thaw once the records are read
    binding.setThreadsAndThaw(this.b.frozen.handle, states);
    return warnings;
  }

  get threadIds(): Map<number, number> {
    return this.tids;
  }
}

/** Syscalls a thread may be re-run from the start with the same arguments (their timeouts start again). */
const RERUNNABLE = new Set([7, 23, 34, 35, 202, 230, 232, 270, 271, 281]); // poll select pause nanosleep futex clock_nanosleep epoll_wait pselect6 ppoll epoll_pwait
const SYS_RESTART_SYSCALL = 219n;
const EINTR = -4n;

/**
 * A thread stopped at T inside a syscall the kernel restarts through its
 * restart block (nanosleep, a futex wait with a timeout, poll…): the new
 * thread has no restart block. The syscall is made again from the start
 * instead: the one in orig_rax, or, when that is restart_syscall (the
 * thread was restarted once already, by an earlier stop), the one a `mov
 * $NR, %eax` right before the `syscall` instruction names. When neither
 * says, the thread gets EINTR (as CRIU does), and a warning.
 */
function restartable(regs: Buffer, codeBefore: (rip: bigint) => Buffer | undefined): { regs: Buffer; eintr: boolean } {
  const rax = regs.readBigInt64LE(REG.rax);
  const orig = regs.readBigInt64LE(REG.origRax);
  if (orig < 0n || rax !== ERESTART_RESTARTBLOCK) return { regs, eintr: false };
  const out = Buffer.from(regs);
  let nr = orig;
  if (orig === SYS_RESTART_SYSCALL) {
    // b8 NN NN NN NN (mov $NR, %eax) then 0f 05 (syscall), rip right after it.
    const code = codeBefore(regs.readBigUInt64LE(REG.rip) - 7n);
    nr = code !== undefined && code[0] === 0xb8 && code[5] === 0x0f && code[6] === 0x05 ? BigInt(code.readUInt32LE(1)) : -1n;
  }
  if (!RERUNNABLE.has(Number(nr))) {
    out.writeBigInt64LE(EINTR, REG.rax);
    return { regs: out, eintr: true };
  }
  out.writeBigInt64LE(nr, REG.origRax);
  out.writeBigInt64LE(ERESTARTNOINTR, REG.rax);
  return { regs: out, eintr: false };
}
