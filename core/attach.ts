// Non-cooperative attach: freeze every thread with ptrace, create a
// userfaultfd inside the target (it binds to the caller's mm), take it with
// pidfd_getfd, close the target's copy. Registers are restored bit for bit.
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, statSync, chownSync } from 'node:fs';
import type { FrozenThread, NativeBinding, NativeHandle } from './native/binding.js';
import { SYSCALL, USERFAULTFD_IOC_NEW } from './constants.js';
import { WpsnapError, fromNative, externalCode } from '../common/errors.js';
import { readIds, readMaps } from './procfs.js';
import type { SignalAction } from '../snapshot-format/model.js';

const { ioctl: SYS_ioctl, close: SYS_close, userfaultfd: SYS_userfaultfd, openat: SYS_openat } = SYSCALL;
const AT_FDCWD = -100;
const O_RDWR = 0o2;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const RED_ZONE = 128n;
const EPERM = 1;

/** How the userfaultfd was created inside the target. */
/** How the userfaultfd was obtained: injected userfaultfd(2), injected open of /dev/userfaultfd, or passed by a cooperative agent (SCM_RIGHTS). */
export type UffdMethod = 'syscall' | 'dev-userfaultfd' | 'agent';

export interface Frozen {
  readonly handle: NativeHandle;
  /**
   * Every thread's registers as captured at the freeze. Fetched when first
   * read: after the thaw they come with the thaw's reply, outside the pause
   * (500 threads are 1.7 MB of records).
   */
  readonly threads: FrozenThread[];
  readonly frozenAt: bigint;
}

/** A `syscall` instruction (0f 05) in the target's vDSO: injections jump there, no text is modified. */
export function findSyscallInstruction(binding: NativeBinding, pid: number): bigint {
  const vdso = readMaps(pid).find((m) => m.path === '[vdso]');
  if (!vdso) {
    throw new WpsnapError('NO_VDSO', `pid ${pid} has no [vdso] mapping to run an injected syscall from`);
  }
  const code = binding.processVmRead(pid, vdso.start, Number(vdso.end - vdso.start));
  for (let i = 0; i + 1 < code.length; i++) {
    if (code[i] === 0x0f && code[i + 1] === 0x05) return vdso.start + BigInt(i);
  }
  throw new WpsnapError('NO_SYSCALL_INSN', `no syscall instruction in the [vdso] of pid ${pid}`);
}

export function freeze(binding: NativeBinding, pid: number, options: { withThreads?: boolean; tidAddresses?: { syscallInsn: bigint } } = {}): Frozen {
  const frozenAt = process.hrtime.bigint();
  let handle: NativeHandle;
  try {
    const withThreads = options.withThreads === true;
    handle =
      options.tidAddresses !== undefined
        ? binding.freeze(pid, withThreads, { tidAddresses: true, syscallInsn: options.tidAddresses.syscallInsn })
        : withThreads
          ? binding.freeze(pid, true)
          : binding.freeze(pid);
  } catch (error) {
    const wrapped = fromNative(error, `freeze pid ${pid}`);
    if (wrapped.code === 'EPERM') {
      const tracer = tracerOf(pid);
      const why = tracer !== 0 ? `pid ${pid} is already traced by pid ${tracer} (a debugger?)` : `wpsnap must run as root (or with CAP_SYS_PTRACE) to trace pid ${pid}`;
      throw new WpsnapError('EPERM', `${wrapped.message} — ${why}`, {
        errno: 1,
        syscall: 'ptrace',
      });
    }
    throw wrapped;
  }
  let threads: FrozenThread[] | undefined;
  return {
    handle,
    get threads(): FrozenThread[] {
      threads ??= binding.frozenThreads(handle);
      return threads;
    },
    frozenAt,
  };
}

/** TracerPid from /proc/PID/status (0: not traced). */
function tracerOf(pid: number): number {
  try {
    return Number(/^TracerPid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

function syscallResult(raw: bigint): number {
  return Number(BigInt.asIntN(64, raw));
}

function errnoName(errno: number): string {
  const names: Record<number, string> = { 1: 'EPERM', 2: 'ENOENT', 9: 'EBADF', 13: 'EACCES', 22: 'EINVAL', 24: 'EMFILE', 38: 'ENOSYS' };
  return names[errno] ?? `UNKNOWN_ERRNO_${errno}`;
}

function injectedFailure(what: string, result: number): WpsnapError {
  const code = errnoName(-result);
  return new WpsnapError(externalCode(code, 'INTERNAL'), `${what} inside the target failed: ${code}`, { errno: -result, syscall: what.split('(')[0]! });
}

/** Run one syscall inside the frozen target (from `insn`); its result, negative errno included. */
export function inject(binding: NativeBinding, frozen: Frozen, insn: bigint, nr: number, args: Array<number | bigint>, what: string): number {
  try {
    // Registers are unsigned 64-bit: negative arguments (AT_FDCWD) go as two's complement.
    const registers = args.map((a) => (typeof a === 'number' && a < 0 ? BigInt.asUintN(64, BigInt(a)) : a));
    return syscallResult(binding.injectSyscall(frozen.handle, insn, nr, registers));
  } catch (error) {
    throw fromNative(error, `inject ${what}`);
  }
}

/**
 * A device node for /dev/userfaultfd owned by the target's filesystem uid,
 * inside the target's root. With vm.unprivileged_userfaultfd=0 a non-root
 * target may not call userfaultfd(2), but may open a node it owns and ask it
 * for a context (USERFAULTFD_IOC_NEW): access is scoped to that one uid for
 * the few milliseconds of the attach, nothing global changes.
 */
export interface DeviceNode {
  /** Path as the target sees it. */
  targetPath: string;
  remove(): void;
}

export function prepareDeviceNode(binding: NativeBinding, pid: number): DeviceNode {
  let rdev: number;
  try {
    rdev = statSync('/dev/userfaultfd').rdev;
  } catch {
    throw new WpsnapError('NO_DEV_USERFAULTFD', `pid ${pid} may not call userfaultfd(2) and /dev/userfaultfd (Linux 6.1+) is missing`);
  }
  const name = `.wpsnap-uffd-${pid}-${randomBytes(6).toString('hex')}`;
  const hostPath = `/proc/${pid}/root/dev/${name}`;
  const fsuid = readIds(pid).uid[3]!;
  const fsgid = readIds(pid).gid[3]!;
  try {
    binding.mknodDevice(hostPath, 0o600, rdev);
    chownSync(hostPath, fsuid, fsgid);
  } catch (error) {
    rmSync(hostPath, { force: true });
    throw fromNative(error, `create a userfaultfd device node for pid ${pid}`);
  }
  return { targetPath: `/dev/${name}`, remove: () => rmSync(hostPath, { force: true }) };
}

/** Whether the target may call userfaultfd(2) itself (root in the initial user namespace, or the sysctl allows it). */
export function targetMayCallUserfaultfd(pid: number): boolean {
  let unprivileged = '0';
  try {
    unprivileged = readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim();
  } catch {
    unprivileged = '0';
  }
  if (unprivileged === '1') return true;
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const capEff = /^CapEff:\s+([0-9a-f]+)/m.exec(status)?.[1] ?? '0';
  const CAP_SYS_PTRACE = 19n;
  return ((BigInt('0x' + capEff) >> CAP_SYS_PTRACE) & 1n) === 1n;
}

/**
 * Create a userfaultfd inside the frozen target and move it here. Returns the
 * fd in this process; the target's copy is closed, so this process holds the
 * only reference (if wpsnap dies the context is released and the target runs on).
 */
export function injectUserfaultfd(
  binding: NativeBinding,
  pid: number,
  frozen: Frozen,
  insn: bigint,
  pidfd: number,
  deviceNode: DeviceNode | null,
): { fd: number; method: UffdMethod } {
  const flags = O_CLOEXEC | O_NONBLOCK;
  let targetFd: number;
  let method: UffdMethod;
  if (deviceNode === null) {
    targetFd = inject(binding, frozen, insn, SYS_userfaultfd, [flags], 'userfaultfd(O_CLOEXEC|O_NONBLOCK)');
    method = 'syscall';
    if (targetFd === -EPERM) {
      // Capabilities said yes but the kernel says no (e.g. root in a user
      // namespace): lend the target a device node after all.
      const node = prepareDeviceNode(binding, pid);
      try {
        targetFd = openViaDevice(binding, pid, frozen, insn, node, flags);
        method = 'dev-userfaultfd';
      } finally {
        node.remove();
      }
    }
    if (targetFd < 0) throw injectedFailure('userfaultfd(2)', targetFd);
  } else {
    targetFd = openViaDevice(binding, pid, frozen, insn, deviceNode, flags);
    method = 'dev-userfaultfd';
  }
  let fd: number;
  try {
    fd = binding.pidfdGetfd(pidfd, targetFd);
  } catch (error) {
    inject(binding, frozen, insn, SYS_close, [targetFd], `close(${targetFd})`);
    throw fromNative(error, `take the userfaultfd from pid ${pid}`);
  }
  const closed = inject(binding, frozen, insn, SYS_close, [targetFd], `close(${targetFd})`);
  if (closed < 0) {
    binding.closeFd(fd);
    throw injectedFailure(`close(${targetFd})`, closed);
  }
  return { fd, method };
}

function openViaDevice(binding: NativeBinding, pid: number, frozen: Frozen, insn: bigint, node: DeviceNode, flags: number): number {
  const devFd = openInTarget(binding, pid, frozen, insn, node.targetPath, O_RDWR | O_CLOEXEC);
  if (devFd < 0) throw injectedFailure(`openat(${node.targetPath})`, devFd);
  const uffd = inject(binding, frozen, insn, SYS_ioctl, [devFd, USERFAULTFD_IOC_NEW, flags], 'ioctl(USERFAULTFD_IOC_NEW)');
  inject(binding, frozen, insn, SYS_close, [devFd], `close(${devFd})`);
  if (uffd < 0) throw injectedFailure('ioctl(USERFAULTFD_IOC_NEW)', uffd);
  return uffd;
}

/**
 * openat(AT_FDCWD, path, flags) run inside the frozen target: the fd there, or
 * a negative errno. The path goes below the injection thread's red zone, and
 * the bytes there are put back.
 */
export function openInTarget(binding: NativeBinding, pid: number, frozen: Frozen, insn: bigint, path: string, flags: number): number {
  const bytes = Buffer.from(path + '\0');
  if (bytes.length > 4096) throw new WpsnapError('ENAMETOOLONG', `path too long to open in pid ${pid}: ${path.slice(0, 80)}…`);
  return belowRedZone(binding, pid, binding.injectionThreadRsp(frozen.handle), bytes.length, 512n, (scratch) => {
    binding.processVmWrite(pid, scratch, bytes);
    return inject(binding, frozen, insn, SYS_openat, [AT_FDCWD, scratch, flags], `openat(${path})`);
  });
}

/**
 * Run `use` with `bytes` bytes of a stopped thread's stack below its red zone
 * (and `margin` more), 16-byte aligned, as scratch memory for an injected
 * call; the bytes there are put back afterwards, whatever happens.
 */
function belowRedZone<T>(binding: NativeBinding, pid: number, rsp: bigint, bytes: number, margin: bigint, use: (scratch: bigint) => T): T {
  const scratch = (rsp - RED_ZONE - BigInt(bytes) - margin) & ~15n;
  const saved = binding.processVmRead(pid, scratch, bytes);
  try {
    return use(scratch);
  } finally {
    binding.processVmWrite(pid, scratch, saved);
  }
}

/** struct kernel_sigaction (x86_64): handler, flags, restorer, mask. */
const SIGACTION_BYTES = 32;

/**
 * rt_sigaction(sig, NULL, &old, 8) for each signal, run inside the frozen
 * target: its dispositions (a restore sets them again). The answers go below
 * the injection thread's red zone, and the bytes there are put back.
 */
export function readSignalActions(binding: NativeBinding, pid: number, frozen: Frozen, insn: bigint, signals: number[]): SignalAction[] {
  if (signals.length === 0) return [];
  const bytes = SIGACTION_BYTES * signals.length;
  return belowRedZone(binding, pid, binding.injectionThreadRsp(frozen.handle), bytes, 512n, (scratch) => {
    signals.forEach((signal, i) => {
      const result = inject(binding, frozen, insn, SYSCALL.rt_sigaction, [signal, 0, scratch + BigInt(i * SIGACTION_BYTES), 8], `rt_sigaction(${signal})`);
      if (result < 0) throw injectedFailure(`rt_sigaction(${signal})`, result);
    });
    const read = binding.processVmRead(pid, scratch, bytes);
    return signals.map((signal, i) => {
      const at = i * SIGACTION_BYTES;
      const field = (k: number): string => read.readBigUInt64LE(at + 8 * k).toString();
      return { signal, handler: field(0), flags: field(1), restorer: field(2), mask: field(3) };
    });
  });
}

/** Offset of rsp in struct user_regs_struct (x86_64). */
const RSP_OFFSET = 152;
const PR_GET_TID_ADDRESS = 40;

/**
 * prctl(PR_GET_TID_ADDRESS) run inside each of these frozen threads: its
 * clear_child_tid (a restore gives it again). The answer goes below the
 * thread's red zone, and the bytes there are put back. A thread that cannot
 * run it (a signal-delivery stop) is left out.
 */
export function readTidAddresses(binding: NativeBinding, pid: number, frozen: Frozen, insn: bigint, tids: number[]): Map<number, bigint> {
  const out = new Map<number, bigint>();
  const byTid = new Map(frozen.threads.map((t) => [t.tid, t]));
  for (const tid of tids) {
    const t = byTid.get(tid);
    if (t === undefined) continue;
    belowRedZone(binding, pid, t.regs.readBigUInt64LE(RSP_OFFSET), 8, 56n, (scratch) => {
      try {
        const raw = BigInt.asIntN(64, binding.injectSyscallInThread(frozen.handle, tid, insn, SYSCALL.prctl, [PR_GET_TID_ADDRESS, scratch, 0, 0, 0]));
        if (raw === 0n) out.set(tid, binding.processVmRead(pid, scratch, 8).readBigUInt64LE(0));
      } catch {
        // a thread that cannot run it: left out
      }
    });
  }
  return out;
}
