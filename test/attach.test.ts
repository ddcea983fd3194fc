// Non-cooperative attach against the real kernel and real processes: freeze
// with ptrace, inject syscalls, take a userfaultfd out of the target, thaw.
// Every fixture here is started re-parented (test/support/spawn.ts): the test
// process traces it and must not also be its parent.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  findSyscallInstruction,
  freeze,
  injectUserfaultfd,
  prepareDeviceNode,
  targetMayCallUserfaultfd,
  type Frozen,
} from '../core/attach.js';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import { WpsnapError } from '../common/errors.js';
import type { FrozenThread } from '../core/native/binding.js';
import { readMaps } from '../core/procfs.js';
import { sleep, taskTids, tracerPids, untraced } from './support/proc.js';
import { buildFixtures, FIXTURES_BUILD_DIR, killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const SYS = { read: 0, pause: 34, getpid: 39, gettid: 186, epoll_wait: 232, restart_syscall: 219, clock_nanosleep: 230 } as const;
const EINTR = -4n;
const ERESTARTSYS = -512n;
const ERESTARTNOHAND = -514n;
const ERESTART_RESTARTBLOCK = -516n;

let B: NativeBinding;

beforeAll(() => {
  buildFixtures();
  B = loadBinding();
}, 60_000);

// A failed test leaves its fixture running (perhaps stopped): end it by pid.
afterEach(() => {
  killDetached();
});

// ------------------------------------------------------------------ helpers

/** fd number -> link target, as /proc/PID/fd lists them. */
function fdListing(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const fd of readdirSync(`/proc/${pid}/fd`)) out[fd] = readlinkSync(`/proc/${pid}/fd/${fd}`);
  return out;
}

/** One-letter state of each thread (R, S, t for a ptrace stop, ...). */
function threadStates(pid: number): Record<number, string> {
  const out: Record<number, string> = {};
  for (const tid of taskTids(pid)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    out[tid] = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  }
  return out;
}

/** Is this a process of ours that traces: this one, or a wpsnap-tracer helper? */
function ourTracer(tracer: number): boolean {
  if (tracer === 0) return false;
  if (tracer === process.pid) return true;
  try {
    return readFileSync(`/proc/${tracer}/comm`, 'utf8').trim() === 'wpsnap-tracer';
  } catch {
    return false; /* gone meanwhile */
  }
}

/** No thread of pid is in a ptrace stop or traced by this process or a wpsnap-tracer. */
function expectUntouched(pid: number): void {
  const states = threadStates(pid);
  expect(Object.values(states).filter((s) => s === 't' || s === 'T'), `thread states ${JSON.stringify(states)}`).toEqual([]);
  const tracers = tracerPids(pid);
  expect(Object.values(tracers).filter(ourTracer), `TracerPid per thread ${JSON.stringify(tracers)}`).toEqual([]);
}

const USER_REGS = ['r15', 'r14', 'r13', 'r12', 'rbp', 'rbx', 'r11', 'r10', 'r9', 'r8', 'rax', 'rcx', 'rdx', 'rsi', 'rdi', 'orig_rax',
  'rip', 'cs', 'eflags', 'rsp', 'ss', 'fs_base', 'gs_base', 'ds', 'es', 'fs', 'gs'] as const;
type RegName = (typeof USER_REGS)[number];

function regs(buf: Buffer): Record<RegName, bigint> {
  expect(buf.length).toBe(216);
  const out = {} as Record<RegName, bigint>;
  USER_REGS.forEach((name, i) => {
    out[name] = buf.readBigUInt64LE(8 * i);
  });
  return out;
}

const signed = (v: bigint): bigint => BigInt.asIntN(64, v);
const hex = (v: bigint): string => '0x' + v.toString(16);

/** regcheck's gpr index order (see fixtures/regcheck.c). */
const RC_GPR: Array<RegName | null> = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', null];

interface RegcheckReady {
  pid: number;
  avx: boolean;
  tids: number[];
  roles: { main: number; nanosleep: number; reader: number; epoll: number; pauser: number; spinners: number[] };
  counters: string[];
  pauseCounters: string;
  epollCounter: string;
  text: string;
  textEnd: string;
  textBytes: string;
  syscallRip: string;
  expect: Record<string, { gpr: string[]; vec: string[] }>;
}

const rcReady = (f: DetachedFixture): RegcheckReady => f.ready as unknown as RegcheckReady;

function readCounters(pid: number, ready: RegcheckReady): bigint[] {
  return ready.counters.map((a) => B.processVmRead(pid, BigInt(a), 8).readBigUInt64LE(0));
}

async function expectCountersAdvance(pid: number, ready: RegcheckReady, ms = 200): Promise<bigint[]> {
  const before = readCounters(pid, ready);
  await sleep(ms);
  const after = readCounters(pid, ready);
  after.forEach((c, i) => expect(c, `spinner ${i} counter (${before[i]} -> ${c})`).toBeGreaterThan(before[i]!));
  return after;
}

/** regcheck, its ready line, once every spinner is inside its loop. */
async function startRegcheck(args: string[], options: Parameters<typeof startDetached>[2] = {}): Promise<{ f: DetachedFixture; ready: RegcheckReady; pid: number }> {
  const f = await startDetached('regcheck', args, options);
  const ready = rcReady(f);
  // The ready line comes out when the threads pass a barrier, just before the
  // spinners enter their loop: wait until every counter moves.
  const deadline = Date.now() + 5_000;
  const first = readCounters(f.pid, ready);
  for (;;) {
    await sleep(20);
    const now = readCounters(f.pid, ready);
    if (now.every((c, i) => c > first[i]!)) break;
    if (Date.now() > deadline) throw new Error(`regcheck spinners do not advance: ${first} -> ${now}`);
  }
  return { f, ready, pid: f.pid };
}

/** The registers regcheck guarantees for a thread parked in its loop or its syscall. */
function checkRegcheckThread(t: FrozenThread, ready: RegcheckReady): void {
  const r = regs(t.regs);
  const exp = ready.expect[String(t.tid)];
  const role = ready.roles.spinners.includes(t.tid) ? 'spinner'
    : t.tid === ready.roles.nanosleep ? 'nanosleep'
    : t.tid === ready.roles.reader ? 'reader'
    : t.tid === ready.roles.pauser ? 'pauser' : 'other';
  const where = `tid ${t.tid} (${role})`;
  if (role === 'spinner') {
    expect(r.rip >= BigInt(ready.text) && r.rip < BigInt(ready.textEnd), `${where} rip ${hex(r.rip)} outside the spin loop`).toBe(true);
    expect(signed(r.orig_rax), `${where} orig_rax`).toBe(-1n);
  } else if (role === 'nanosleep' || role === 'reader' || role === 'pauser') {
    // A few microseconds in every 50-100 ms are spent in C between two calls,
    // where nothing is pinned to a pattern.
    if (signed(r.orig_rax) === -1n && hex(r.rip) !== ready.syscallRip) return;
    // Stopped inside the syscall (before the restart fix-up: rax holds the
    // restart code) or on its way out of a call that just completed; rip is
    // right after the `syscall` instruction either way.
    expect(hex(r.rip), `${where} rip`).toBe(ready.syscallRip);
    if (role === 'nanosleep') {
      expect([BigInt(SYS.clock_nanosleep), BigInt(SYS.restart_syscall)], `${where} orig_rax`).toContain(r.orig_rax);
      expect([ERESTART_RESTARTBLOCK, 0n], `${where} rax`).toContain(signed(r.rax));
    } else if (role === 'reader') {
      expect(r.orig_rax, `${where} orig_rax`).toBe(BigInt(SYS.read));
      expect([ERESTARTSYS, 1n], `${where} rax`).toContain(signed(r.rax));
    } else {
      expect(r.orig_rax, `${where} orig_rax`).toBe(BigInt(SYS.pause));
      expect(signed(r.rax), `${where} rax`).toBe(ERESTARTNOHAND);
    }
  } else {
    return;
  }
  expect(exp, `${where} has expected patterns`).toBeDefined();
  RC_GPR.forEach((name, i) => {
    if (name === null || name === 'rax') return; // rax: the spin loop's scratch, the syscall's result
    if (role !== 'spinner' && (name === 'rcx' || name === 'r11')) return; // clobbered by `syscall`
    expect(hex(r[name]), `${where} ${name}`).toBe(exp!.gpr[i]);
  });
  // user_fpregs_struct: xmm_space at byte 160, 16 bytes a register.
  expect(t.fpregs.length).toBe(512);
  for (let i = 0; i < 16; i++) {
    expect(t.fpregs.subarray(160 + 16 * i, 176 + 16 * i).toString('hex'), `${where} xmm${i}`).toBe(exp!.vec[i]!.slice(0, 32));
  }
  if (ready.avx) {
    // NT_X86_XSTATE, standard format: XSTATE_BV at 512, YMM_Hi128 at 576.
    expect(t.xstate.length).toBeGreaterThanOrEqual(576 + 256);
    expect(t.xstate.readBigUInt64LE(512) & 4n, `${where} XSTATE_BV has YMM`).toBe(4n);
    for (let i = 0; i < 16; i++) {
      expect(t.xstate.subarray(576 + 16 * i, 592 + 16 * i).toString('hex'), `${where} ymm${i} upper half`).toBe(exp!.vec[i]!.slice(32));
    }
  }
}

/** freeze → injectUserfaultfd → close our copy → thaw, as wpsnap's attach does. */
function cycle(pid: number, insn: bigint, pidfd: number, onFrozen?: (frozen: Frozen) => void): void {
  const frozen = freeze(B, pid);
  try {
    onFrozen?.(frozen);
    const { fd } = injectUserfaultfd(B, pid, frozen, insn, pidfd, null);
    B.closeFd(fd);
  } finally {
    B.thaw(frozen.handle);
  }
}

function expectCleanRegcheck(done: Record<string, unknown>, exit: { code: number | null; signal: string | null; stderr: string }): void {
  expect({ errors: done['errors'], failures: done['failures'], stderr: exit.stderr }).toEqual({ errors: 0, failures: [], stderr: '' });
  expect(done['reads']).toBe(done['sent']);
  expect(exit.code).toBe(0);
}

// ------------------------------------------------------------------ tests

describe('attach: freeze and inject', () => {
  it('injects getpid and userfaultfd, lists every thread, leaks no fd into the target', async () => {
    const { f, ready, pid } = await startRegcheck(['--threads', '2']);
    const pidfd = B.pidfdOpen(pid);
    try {
      const insn = findSyscallInstruction(B, pid);
      const fdsBefore = fdListing(pid);
      const frozen = freeze(B, pid);
      try {
        // Every thread of /proc/PID/task, each in a ptrace stop, 216-byte user_regs_struct.
        expect(frozen.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(taskTids(pid));
        expect(taskTids(pid)).toEqual([...ready.tids].sort((a, b) => a - b));
        for (const t of frozen.threads) {
          expect(t.regs.length).toBe(216);
          expect(t.fpregs.length).toBe(512);
          expect(t.stop).toBe('interrupt');
        }
        expect(Object.values(threadStates(pid)).every((s) => s === 't')).toBe(true);
        for (const t of frozen.threads) checkRegcheckThread(t, ready);

        expect(B.injectSyscall(frozen.handle, insn, SYS.getpid, [])).toBe(BigInt(pid));
        // Injections run in the lowest non-leader tid: regcheck's nanosleep thread.
        expect(B.injectSyscall(frozen.handle, insn, SYS.gettid, [])).toBe(BigInt(ready.roles.nanosleep));

        const { fd, method } = injectUserfaultfd(B, pid, frozen, insn, pidfd, null);
        expect(method).toBe('syscall');
        expect(fd).toBeGreaterThan(2);
        expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe('anon_inode:[userfaultfd]');
        const api = B.uffdApi(fd, 0n);
        expect(api.ioctls & (1n << 0x00n)).toBe(1n << 0x00n); // _UFFDIO_REGISTER
        B.closeFd(fd);
        // The target's copy is closed before thaw.
        expect(fdListing(pid)).toEqual(fdsBefore);
      } finally {
        B.thaw(frozen.handle);
      }
      expect(fdListing(pid)).toEqual(fdsBefore);
      expectUntouched(pid);
      await expectCountersAdvance(pid, ready);
    } finally {
      B.closeFd(pidfd);
    }
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
  }, 15_000);

  it('keeps every register bit for bit through 20 freeze/inject/thaw cycles', async () => {
    const { f, ready, pid } = await startRegcheck([]);
    const pidfd = B.pidfdOpen(pid);
    const textBefore = B.processVmRead(pid, BigInt(ready.text), 64).toString('hex');
    expect(textBefore).toBe(ready.textBytes);
    const vdso = readMaps(pid).find((m) => m.path === '[vdso]')!;
    const vdsoBefore = B.processVmRead(pid, vdso.start, Number(vdso.end - vdso.start));
    const fdsBefore = fdListing(pid);
    let firstThreads: FrozenThread[] = [];
    // Documented kernel behaviour, not a wpsnap choice: epoll_wait is never
    // restarted (signal(7): as after SIGSTOP/SIGCONT, it fails with EINTR). The
    // interrupt stop already shows it (rax = -EINTR, not a restart code); the
    // target must then see exactly one EINTR for that freeze, none otherwise.
    const epollAtFreeze: string[] = [];
    let epollExpected = 0n;
    const noteEpoll = (threads: FrozenThread[]): void => {
      const r = regs(threads.find((t) => t.tid === ready.roles.epoll)!.regs);
      epollAtFreeze.push(`${signed(r.orig_rax)}:${signed(r.rax)}`);
      if (r.orig_rax === BigInt(SYS.epoll_wait) && signed(r.rax) === EINTR) epollExpected++;
    };
    const epollSettled = async (): Promise<void> => {
      const read = (): bigint => B.processVmRead(pid, BigInt(ready.epollCounter), 8).readBigUInt64LE(0);
      const deadline = Date.now() + 2_000;
      while (read() < epollExpected && Date.now() < deadline) await sleep(2);
      expect(read(), `epoll_wait EINTRs after freezes ${epollAtFreeze.join(' ')}`).toBe(epollExpected);
    };
    try {
      const insn = findSyscallInstruction(B, pid);
      for (let i = 0; i < 20; i++) {
        cycle(pid, insn, pidfd, (frozen) => {
          if (i === 0) firstThreads = frozen.threads;
          noteEpoll(frozen.threads);
          // Each freeze finds the patterns the previous injections must have left intact.
          for (const t of frozen.threads) checkRegcheckThread(t, ready);
        });
        await epollSettled();
        await sleep(10);
      }
      // Running on after the last thaw; the loop counters keep advancing for 1 s.
      const c0 = readCounters(pid, ready);
      await sleep(500);
      const c1 = await expectCountersAdvance(pid, ready, 500);
      c1.forEach((c, i) => expect(c).toBeGreaterThan(c0[i]!));
      expect(fdListing(pid)).toEqual(fdsBefore);
      expect(B.processVmRead(pid, BigInt(ready.text), 64).toString('hex')).toBe(ready.textBytes);
      expect(B.processVmRead(pid, vdso.start, Number(vdso.end - vdso.start)).equals(vdsoBefore)).toBe(true);

      // A second look: every thread still holds its patterns where it was parked.
      const again = freeze(B, pid);
      noteEpoll(again.threads);
      try {
        for (const t of firstThreads) checkRegcheckThread(t, ready);
        for (const t of again.threads) checkRegcheckThread(t, ready);
        for (const role of ['nanosleep', 'reader'] as const) {
          const tid = ready.roles[role];
          const ta = firstThreads.find((t) => t.tid === tid);
          const tb = again.threads.find((t) => t.tid === tid);
          expect(ta && tb, `${role} thread ${tid} frozen both times (it ends on a register mismatch)`).toBeTruthy();
          const a = regs(ta!.regs);
          const b = regs(tb!.regs);
          if (hex(a.rip) !== ready.syscallRip || hex(b.rip) !== ready.syscallRip) continue; // caught between two calls
          expect({ rip: hex(b.rip), rsp: hex(b.rsp), fs_base: hex(b.fs_base) }, role).toEqual({ rip: hex(a.rip), rsp: hex(a.rsp), fs_base: hex(a.fs_base) });
        }
      } finally {
        B.thaw(again.handle);
      }
      await epollSettled();
    } finally {
      B.closeFd(pidfd);
    }
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
    const iterations = done['iterations'] as number[];
    expect(iterations).toHaveLength(3);
    for (const n of iterations) expect(n).toBeGreaterThan(0);
    expect(done['sleeps'] as number).toBeGreaterThan(5);
    // epoll_wait: one EINTR per freeze that caught the thread in it (nearly all).
    expect(epollExpected).toBeGreaterThanOrEqual(15n);
    expect(done['epollEintr']).toBe(Number(epollExpected));
  }, 20_000);

  it('restarts interrupted blocking syscalls exactly: sleeper sees no EINTR and no early return', async () => {
    const f = await startDetached('sleeper');
    const pid = f.pid;
    const pidfd = B.pidfdOpen(pid);
    const fdsBefore = fdListing(pid);
    try {
      const insn = findSyscallInstruction(B, pid);
      for (let i = 0; i < 10; i++) {
        cycle(pid, insn, pidfd);
        await sleep(50);
      }
    } finally {
      B.closeFd(pidfd);
    }
    expect(fdListing(pid)).toEqual(fdsBefore);
    expectUntouched(pid);
    await sleep(100);
    const { done, exit } = await f.stop();
    expect({ errors: done['errors'], eintr: done['eintr'], stderr: exit.stderr }).toEqual({ errors: 0, eintr: 0, stderr: '' });
    for (const k of ['sleeps', 'absSleeps', 'reads', 'condWaits', 'futexWaits', 'pollWaits']) expect(done[k] as number, k).toBeGreaterThan(0);
    expect(exit.code).toBe(0);
  }, 15_000);

  it('lets a signal that arrives while frozen end the injected thread\'s pause() with EINTR, as without wpsnap', async () => {
    // The pauser (first non-leader thread, so the one injected into) sits in
    // pause() with a SIGUSR1 handler without SA_RESTART; every other thread
    // blocks SIGUSR1. Each signal must run the handler AND end pause() with
    // EINTR, exactly as when nobody traces the process.
    const { f, ready, pid } = await startRegcheck(['--threads', '1', '--pauser']);
    const counts = (): { pauses: bigint; handled: bigint } => {
      const b = B.processVmRead(pid, BigInt(ready.pauseCounters), 16);
      return { pauses: b.readBigUInt64LE(0), handled: b.readBigUInt64LE(8) };
    };
    const settle = async (n: bigint): Promise<{ pauses: bigint; handled: bigint }> => {
      const deadline = Date.now() + 1_000;
      while (Date.now() < deadline && (counts().pauses < n || counts().handled < n)) await sleep(10);
      await sleep(20);
      return counts();
    };
    const pidfd = B.pidfdOpen(pid);
    try {
      const insn = findSyscallInstruction(B, pid);
      // Untraced.
      process.kill(pid, 'SIGUSR1');
      expect(await settle(1n), 'no tracing').toEqual({ pauses: 1n, handled: 1n });
      // Frozen, nothing injected: the kernel's own restart logic decides.
      let frozen = freeze(B, pid);
      process.kill(pid, 'SIGUSR1');
      await sleep(20);
      B.thaw(frozen.handle);
      expect(await settle(2n), 'frozen, no injection').toEqual({ pauses: 2n, handled: 2n });
      // Frozen and injected into: must not differ.
      frozen = freeze(B, pid);
      try {
        for (const t of frozen.threads) checkRegcheckThread(t, ready);
        expect(B.injectSyscall(frozen.handle, insn, SYS.gettid, [])).toBe(BigInt(ready.roles.pauser));
        const { fd } = injectUserfaultfd(B, pid, frozen, insn, pidfd, null);
        B.closeFd(fd);
        process.kill(pid, 'SIGUSR1');
        await sleep(20);
      } finally {
        B.thaw(frozen.handle);
      }
      expect(await settle(3n), 'frozen and injected: the handler ran, so pause() must have returned EINTR').toEqual({ pauses: 3n, handled: 3n });
    } finally {
      B.closeFd(pidfd);
    }
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
    expect({ pauses: done['pauses'], handled: done['handled'] }).toEqual({ pauses: 3, handled: 3 });
  }, 15_000);

  it('delivers a signal that arrived while a syscall was being injected with its own siginfo', async () => {
    // Sent after the freeze and before the injection, SIGUSR1 is pending on the
    // pauser (the only thread that takes it) when the injected syscall runs, so
    // the kernel stops the thread to deliver it mid-injection. wpsnap holds it
    // back; it must reach the handler as it was sent: kill(2) gives SI_USER and
    // the sender's pid, where a re-sent tgkill would give SI_TKILL.
    const { f, ready, pid } = await startRegcheck(['--threads', '1', '--pauser']);
    const SI_USER = 0n;
    const last = (): { handled: bigint; code: bigint; sender: bigint } => {
      const b = B.processVmRead(pid, BigInt(ready.pauseCounters), 32);
      return { handled: b.readBigInt64LE(8), code: b.readBigInt64LE(16), sender: b.readBigInt64LE(24) };
    };
    const insn = findSyscallInstruction(B, pid);
    for (let round = 1n; round <= 3n; round++) {
      const frozen = freeze(B, pid);
      try {
        process.kill(pid, 'SIGUSR1');
        await sleep(10);
        expect(B.injectSyscall(frozen.handle, insn, SYS.gettid, [])).toBe(BigInt(ready.roles.pauser));
      } finally {
        B.thaw(frozen.handle);
      }
      const deadline = Date.now() + 1_000;
      while (Date.now() < deadline && last().handled < round) await sleep(10);
      expect(last(), `round ${round}`).toEqual({ handled: round, code: SI_USER, sender: BigInt(process.pid) });
    }
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
    expect({ pauses: done['pauses'], handled: done['handled'] }).toEqual({ pauses: 3, handled: 3 });
  }, 15_000);

  it('gets a userfaultfd from a non-root target through a device node it owns', async () => {
    const { f, ready, pid } = await startRegcheck(['--threads', '1'], { user: { uid: 65534, gid: 65534 } });
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    expect(/^Uid:\s+(.*)$/m.exec(status)![1]!.split(/\s+/)).toEqual(['65534', '65534', '65534', '65534']);
    expect(targetMayCallUserfaultfd(pid)).toBe(false);
    const nodes = (): string[] => readdirSync('/dev').filter((n) => n.startsWith(`.wpsnap-uffd-${pid}-`));
    const pidfd = B.pidfdOpen(pid);
    const fdsBefore = fdListing(pid);
    try {
      const insn = findSyscallInstruction(B, pid);
      const frozen = freeze(B, pid);
      try {
        // openViaDevice borrows stack below the injection thread's red zone for
        // the path: those bytes must be put back.
        const rsp = B.injectionThreadRsp(frozen.handle);
        expect(hex(rsp)).toBe(hex(regs(frozen.threads.find((t) => t.tid === ready.roles.nanosleep)!.regs).rsp));
        const stackBefore = B.processVmRead(pid, rsp - 4096n, 4096);
        // The plain syscall is refused to this uid (vm.unprivileged_userfaultfd=0):
        // without a prepared node, injectUserfaultfd falls back to one by itself.
        const fallback = injectUserfaultfd(B, pid, frozen, insn, pidfd, null);
        expect(fallback.method).toBe('dev-userfaultfd');
        expect(readlinkSync(`/proc/self/fd/${fallback.fd}`)).toBe('anon_inode:[userfaultfd]');
        B.closeFd(fallback.fd);
        expect(nodes()).toEqual([]);
        // A node prepared beforehand (the usual path) works the same way.
        const node = prepareDeviceNode(B, pid);
        try {
          expect(nodes()).toHaveLength(1);
          const st = statSync(`/dev/${nodes()[0]}`);
          expect({ chr: st.isCharacterDevice(), uid: st.uid, gid: st.gid, mode: st.mode & 0o777 }).toEqual({ chr: true, uid: 65534, gid: 65534, mode: 0o600 });
          const { fd, method } = injectUserfaultfd(B, pid, frozen, insn, pidfd, node);
          expect(method).toBe('dev-userfaultfd');
          expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe('anon_inode:[userfaultfd]');
          const api = B.uffdApi(fd, 0n);
          expect(api.ioctls & 1n).toBe(1n);
          B.closeFd(fd);
        } finally {
          node.remove();
        }
        expect(fdListing(pid)).toEqual(fdsBefore);
        expect(B.processVmRead(pid, rsp - 4096n, 4096).equals(stackBefore), 'stack below the injection thread restored').toBe(true);
        for (const t of frozen.threads) checkRegcheckThread(t, ready);
      } finally {
        B.thaw(frozen.handle);
      }
    } finally {
      B.closeFd(pidfd);
    }
    expect(nodes()).toEqual([]);
    expect(fdListing(pid)).toEqual(fdsBefore);
    expectUntouched(pid);
    await expectCountersAdvance(pid, ready);
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
  }, 15_000);
});

describe('attach: one round trip for a freeze with its records, and for the threads\' states with the thaw', () => {
  it('freeze(withThreads) gives every record with it; setThreadsAndThaw sets every listed thread, thaws even when one fails, and the helper serves the next freeze', async () => {
    const { f, ready, pid } = await startRegcheck(['--threads', '2']);
    try {
      const frozen = freeze(B, pid, { withThreads: true });
      expect(frozen.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(taskTids(pid));
      for (const t of frozen.threads) checkRegcheckThread(t, ready);
      const helper = tracerPids(pid)[pid];
      // Every thread as it was, plus one that is not frozen: set and thawed all the same, the failure thrown after.
      const states = frozen.threads.map((t) => ({ tid: t.tid, regs: t.regs, fpregs: t.fpregs, xstate: t.xstate, sigmask: t.sigmask }));
      expect(() => B.setThreadsAndThaw(frozen.handle, [...states, { ...states[0]!, tid: 999_999_999 }])).toThrow(/999999999|ESRCH|no such/i);
      await untraced(pid);
      expectNoneStoppedOrTraced(pid);
      // The same helper freezes again (kept by the thaw), and the registers are still regcheck's.
      const again = freeze(B, pid, { withThreads: true });
      try {
        expect(tracerPids(pid)[pid]).toBe(helper);
        for (const t of again.threads) checkRegcheckThread(t, ready);
      } finally {
        B.setThreadsAndThaw(again.handle, []);
      }
      expectNoneStoppedOrTraced(pid);
    } finally {
      f.kill();
    }
  });
});

describe('attach: refusals and failures', () => {
  /** fixtures/build/holdtrace seizes tids of pid and holds them until its stdin closes. */
  async function holdTrace(pid: number, tids: number[]): Promise<{ release: () => Promise<void> }> {
    const child = spawn(join(FIXTURES_BUILD_DIR, 'holdtrace'), [String(pid), ...tids.map(String)], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => { stderr += d; });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    const first = await new Promise<string>((resolve, reject) => {
      const rl = createInterface({ input: child.stdout! });
      rl.once('line', resolve);
      child.once('exit', (code) => reject(new Error(`holdtrace exited ${code}: ${stderr}`)));
    });
    expect(JSON.parse(first)).toEqual({ held: true, tids });
    for (const tid of tids) expect(tracerPids(pid)[tid]).toBe(child.pid);
    return {
      release: async () => {
        child.stdin!.end();
        expect(await exited).toBe(0);
      },
    };
  }

  it('refuses a pid another tracer holds with EPERM naming ptrace and the tid, and leaves it running', async () => {
    const { f, ready, pid } = await startRegcheck(['--threads', '1']);
    const tids = taskTids(pid);
    // The leader (the first thread freeze seizes), then the last thread: freeze has
    // already seized and interrupted every other thread when that SEIZE fails, and
    // must wait for their stops before it can detach them. Whether they have
    // stopped by then is a race, hence five rounds.
    const last = tids[tids.length - 1]!;
    for (const held of [pid, last, last, last, last, last]) {
      const holder = await holdTrace(pid, [held]);
      try {
        let error: unknown;
        try {
          const frozen = freeze(B, pid);
          B.thaw(frozen.handle);
        } catch (e) {
          error = e;
        }
        expect(error).toBeInstanceOf(WpsnapError);
        const w = error as WpsnapError;
        expect(w.code).toBe('EPERM');
        expect(w.message).not.toContain('\n');
        expect(w.message).toMatch(/ptrace/);
        expect(w.message).toContain(`tid ${held}`);
        // Nothing of ours is left on the target: no thread stopped, none traced by us.
        await sleep(50);
        expectUntouched(pid);
        await expectCountersAdvance(pid, ready, 100);
      } finally {
        await holder.release();
      }
    }
    expectUntouched(pid);
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
  }, 15_000);

  it('reports a pid that does not exist as targetGone', () => {
    const r = spawnSync('true');
    expect(r.status).toBe(0);
    const pid = r.pid!;
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    let error: unknown;
    try {
      const frozen = freeze(B, pid);
      B.thaw(frozen.handle);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(WpsnapError);
    const w = error as WpsnapError;
    expect({ kind: w.kind, code: w.code }).toEqual({ kind: 'targetGone', code: 'ESRCH' });
    expect(w.message).toContain(String(pid));
    expect(w.message).not.toContain('\n');
  });

  // mid-inject: the controller dies while the tracer helper holds the
  // injected registers in the target (WPSNAP_TRACER_STALL_US keeps them there
  // for 300 ms). With the tracer inside the controller, as before, the kernel
  // detached the thread with those registers: it ran the syscall instruction
  // of the vDSO with the injected arguments and went on after it.
  it('leaves the target running when the controller is SIGKILLed after freeze, during an injected syscall, and after inject', async () => {
    const childScript = join(ROOT, 'test', 'support', 'attach-child.mjs');
    expect(existsSync(join(ROOT, 'dist', 'core', 'attach.js')), 'dist/ is built (npx tsc -p tsconfig.json)').toBe(true);
    const { f, ready, pid } = await startRegcheck(['--threads', '1']);
    const fdsBefore = fdListing(pid);
    for (const point of ['after-freeze', 'mid-inject', 'after-inject'] as const) {
      const env = { ...process.env, WPSNAP_TRACER_STALL_US: point === 'mid-inject' ? '300000' : '0' };
      const r = spawnSync(process.execPath, [childScript, String(pid), point], { encoding: 'utf8', timeout: 10_000, env });
      expect({ signal: r.signal, stderr: r.stderr }, point).toEqual({ signal: 'SIGKILL', stderr: '' });
      const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines[0]).toMatchObject({ frozen: true });
      expect((lines[0]!['tids'] as number[]).sort((a, b) => a - b)).toEqual(taskTids(pid));
      if (point === 'after-inject') expect(lines[1]).toMatchObject({ injected: true, method: 'syscall' });
      expect(lines).toHaveLength(point === 'after-inject' ? 2 : 1);
      if (point === 'mid-inject') {
        // The helper is still holding the thread with the injected registers.
        expect(Object.values(tracerPids(pid)).some(ourTracer), point).toBe(true);
      }
      await untraced(pid);
      // Nothing stopped, nothing leaked: the userfaultfd the helper created
      // during the controller's death is closed in the target again.
      expectUntouched(pid);
      expect(Object.values(tracerPids(pid))).toEqual(Object.values(tracerPids(pid)).map(() => 0));
      expect(fdListing(pid)).toEqual(fdsBefore);
      await expectCountersAdvance(pid, ready);
    }
    const { done, exit } = await f.stop();
    expectCleanRegcheck(done, exit);
  }, 20_000);
});

// ------------------------------------------------------------------ many threads

interface ManyReady {
  pid: number;
  threads: number;
  counters: string;
  stride: number;
  roles: string;
  tids: number[];
}

/** counters[0..count) of fixtures/manythreads (count = threads + 1 with the churn's). */
function manyCounters(pid: number, ready: ManyReady, count = ready.threads): bigint[] {
  const raw = B.processVmRead(pid, BigInt(ready.counters), count * ready.stride);
  return Array.from({ length: count }, (_, i) => raw.readBigUInt64LE(i * ready.stride));
}

/** Every thread's registers, general, x87/SSE and XSAVE area, as one comparable record. */
function registerSets(threads: FrozenThread[], tids: number[]): Record<number, string> {
  const out: Record<number, string> = {};
  for (const tid of tids) {
    const t = threads.find((x) => x.tid === tid)!;
    out[tid] = `${t.regs.toString('hex')}/${t.fpregs.toString('hex')}/${t.xstate.toString('hex')}`;
  }
  return out;
}

/** expectUntouched for a process whose threads come and go: a thread gone while being read is skipped. */
function expectNoneStoppedOrTraced(pid: number): void {
  const held: string[] = [];
  for (const tid of taskTids(pid)) {
    let stat: string, status: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    } catch {
      continue; /* exited meanwhile */
    }
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    const tracer = Number(/^TracerPid:\s+(\d+)/m.exec(status)![1]);
    if (state === 't' || state === 'T' || ourTracer(tracer)) held.push(`${tid}: state ${state}, tracer ${tracer}`);
  }
  expect(held).toEqual([]);
}

describe('attach: many threads', () => {
  it('freezes and thaws 500 threads: every one stopped, every one runs on, parked threads keep their registers bit for bit', async () => {
    const f = await startDetached('manythreads', ['500', '--spinners', '2'], { readyTimeoutMs: 30_000 });
    const ready = f.ready as unknown as ManyReady;
    const pid = f.pid;
    const parked = ready.tids.filter((_, i) => ready.roles[i] === 'P');
    const sample = parked.filter((_, i) => i % 10 === 0);
    expect(sample.length).toBeGreaterThanOrEqual(12);
    await sleep(100);

    // First freeze: the records asked for while frozen (THREADS request).
    const first = freeze(B, pid);
    let firstSets: Record<number, string>;
    try {
      expect(first.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(taskTids(pid));
      expect(first.threads).toHaveLength(501);
      const states = threadStates(pid);
      expect(Object.entries(states).filter(([, s]) => s !== 't')).toEqual([]);
      const stillA = manyCounters(pid, ready);
      await sleep(60);
      expect(manyCounters(pid, ready)).toEqual(stillA); // nothing runs while frozen
      firstSets = registerSets(first.threads, sample);
    } finally {
      B.thaw(first.handle);
    }
    expectUntouched(pid);

    // Every spinner and sleeper runs on.
    const before = manyCounters(pid, ready);
    await sleep(300);
    const after = manyCounters(pid, ready);
    const stuck = ready.tids.filter((_, i) => ready.roles[i] !== 'P' && after[i]! <= before[i]!);
    expect(stuck, 'threads whose counter did not advance after the thaw').toEqual([]);

    // Second freeze: the records come with the thaw's reply, read after it.
    const second = freeze(B, pid);
    B.thaw(second.handle);
    expect(second.threads).toHaveLength(501);
    expect(second.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(taskTids(pid));
    // A parked thread was released and went back into the same FUTEX_WAIT:
    // captured again, every register is as the first freeze saw it.
    expect(registerSets(second.threads, sample)).toEqual(firstSets);
    expectUntouched(pid);

    // The parked threads run on too: woken, each counts once.
    const parkedBefore = manyCounters(pid, ready);
    f.kill('SIGUSR1');
    let late: number[] = [];
    for (let waited = 0; waited < 5000; waited += 20) {
      const now = manyCounters(pid, ready);
      late = ready.tids.filter((_, i) => ready.roles[i] === 'P' && now[i]! <= parkedBefore[i]!);
      if (late.length === 0) break;
      await sleep(20);
    }
    expect(late, 'parked threads that did not run after SIGUSR1').toEqual([]);
    const { exit } = await f.stop();
    expect({ code: exit.code, stderr: exit.stderr }).toEqual({ code: 0, stderr: '' });
  }, 60_000);

  it('stops the threads created while the freeze lists them: the listing is repeated until it names no new thread', async () => {
    // A thread creates a thread every 500 us: listing 300 threads takes longer than that.
    const f = await startDetached('manythreads', ['300', '--churn'], { readyTimeoutMs: 30_000 });
    const ready = f.ready as unknown as ManyReady;
    const pid = f.pid;
    await sleep(100);
    for (let round = 0; round < 5; round++) {
      const frozen = freeze(B, pid);
      try {
        const listed = taskTids(pid);
        expect(frozen.threads.map((t) => t.tid).sort((a, b) => a - b), `round ${round}`).toEqual(listed);
        expect(Object.entries(threadStates(pid)).filter(([, s]) => s !== 't'), `round ${round}`).toEqual([]);
        const created = manyCounters(pid, ready, ready.threads + 1)[ready.threads];
        await sleep(20);
        expect(manyCounters(pid, ready, ready.threads + 1)[ready.threads], 'threads created while frozen').toBe(created);
        expect(taskTids(pid)).toEqual(listed);
      } finally {
        B.thaw(frozen.handle);
      }
      expectNoneStoppedOrTraced(pid);
      await sleep(30);
    }
    const created = manyCounters(pid, ready, ready.threads + 1)[ready.threads]!;
    await sleep(100);
    expect(manyCounters(pid, ready, ready.threads + 1)[ready.threads]!).toBeGreaterThan(created);
    const { exit } = await f.stop();
    expect({ code: exit.code, stderr: exit.stderr }).toEqual({ code: 0, stderr: '' });
  }, 60_000);
});
