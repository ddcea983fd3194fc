// What `wpsnap restore` asks of the tracer helper, against the real kernel:
// a syscall injected into a chosen frozen thread, a thread cloned into the
// frozen process (stopped from birth, its tid chosen inside a PID namespace),
// the per-thread state a restore sets again (clear_child_tid, robust list,
// rseq signature) checked against what each thread of fixtures/tidaddr reads
// of itself, and a target doomed when its controller dies mid-construction.
// Fixtures are started re-parented (test/support/spawn.ts) and ended by pid.
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { findSyscallInstruction } from '../core/attach.js';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import type { FrozenThread, NativeHandle } from '../core/native/binding.js';
import { launch, type Launched } from '../fixtures/launch.js';
import { sleep, taskTids, untraced } from './support/proc.js';
import { buildFixtures, FIXTURES_BUILD_DIR, killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const SYS = { read: 0, gettid: 186, prctl: 157, exit: 60, clock_nanosleep: 230, pause: 34, rt_sigtimedwait: 128 } as const;
const PR_GET_TID_ADDRESS = 40;
const ERESTARTSYS = -512n;
const ERESTARTNOHAND = -514n;
const ERESTART_RESTARTBLOCK = -516n;
const EINVAL = -22;
const EEXIST = -17;
/** Offsets in struct user_regs_struct (x86_64). */
const REG = { rax: 80, rdi: 112, orig_rax: 120, rip: 128, rsp: 152 } as const;
const CLONE = { VM: 0x100n, FS: 0x200n, FILES: 0x400n, SIGHAND: 0x800n, THREAD: 0x10000n, SYSVSEM: 0x40000n, CHILD_CLEARTID: 0x200000n } as const;
const THREAD_FLAGS = CLONE.VM | CLONE.FS | CLONE.FILES | CLONE.SIGHAND | CLONE.THREAD | CLONE.SYSVSEM;
/** CLONE_ARGS_SIZE_VER2: struct clone_args with set_tid and cgroup. */
const CLONE_ARGS_SIZE = 88;
const GLIBC_RSEQ_SIG = 0x53053053;
const CUSTOM_RSEQ_SIG = 0x1badc0de;

interface FixtureThread {
  name: 'main' | 'sleeper' | 'reader' | 'custom';
  tid: number;
  nstid: number;
  tidAddress: string;
  robustHead: string;
  robustLen: number;
  rseqArea: string;
  rseqSig: string;
}

interface Ready {
  pid: number;
  nspid: number;
  pipeWrite: number;
  scratch: string;
  exitWord: string;
  glibcRseqSig: string;
  threads: FixtureThread[];
}

let B: NativeBinding;
const launched: Launched[] = [];

beforeAll(() => {
  buildFixtures();
  B = loadBinding();
}, 60_000);

afterEach(() => {
  killDetached();
  for (const l of launched.splice(0)) l.signal('SIGKILL');
});

const reg = (regs: Buffer, name: keyof typeof REG): bigint => regs.readBigUInt64LE(REG[name]);
const signed = (v: bigint): bigint => BigInt.asIntN(64, v);

/** Each thread's syscall once settled: main in sigwait, sleeper in clock_nanosleep, reader in read, custom in pause. */
const SETTLED: Record<FixtureThread['name'], number> = { main: SYS.rt_sigtimedwait, sleeper: SYS.clock_nanosleep, reader: SYS.read, custom: SYS.pause };

/** Until every thread of tidaddr is blocked in its syscall (/proc/PID/task/TID/syscall): the ready line comes just before. */
async function settled(ready: Ready): Promise<void> {
  const blocked = (t: FixtureThread): boolean => readFileSync(`/proc/${ready.pid}/task/${t.tid}/syscall`, 'utf8').split(' ')[0] === String(SETTLED[t.name]);
  for (let waited = 0; waited < 5000 && !ready.threads.every(blocked); waited += 5) await sleep(5);
  expect(ready.threads.filter((t) => !blocked(t)).map((t) => t.name)).toEqual([]);
}

async function startTidaddr(): Promise<{ f: DetachedFixture; ready: Ready }> {
  const f = await startDetached('tidaddr');
  const ready = f.ready as unknown as Ready;
  await settled(ready);
  return { f, ready };
}

function thread(ready: Ready, name: FixtureThread['name']): FixtureThread {
  return ready.threads.find((t) => t.name === name)!;
}

function frozenThread(threads: FrozenThread[], tid: number): FrozenThread {
  const t = threads.find((x) => x.tid === tid);
  expect(t, `tid ${tid} frozen`).toBeDefined();
  return t!;
}

/** Write to the fixture's pipe through /proc/PID/fd (the same pipe its reader reads). */
function writePipe(ready: Ready, text: string): void {
  const fd = openSync(`/proc/${ready.pid}/fd/${ready.pipeWrite}`, 'w');
  try {
    writeSync(fd, text);
  } finally {
    closeSync(fd);
  }
}

function cloneArgs(o: { flags: bigint; childTid?: bigint; setTid?: bigint; setTidSize?: number }): Buffer {
  const b = Buffer.alloc(CLONE_ARGS_SIZE);
  b.writeBigUInt64LE(o.flags, 0);
  b.writeBigUInt64LE(o.childTid ?? 0n, 16);
  b.writeBigUInt64LE(o.setTid ?? 0n, 64);
  b.writeBigUInt64LE(BigInt(o.setTidSize ?? 0), 72);
  return b;
}

/** One-letter state of a thread (t: ptrace stop). */
function threadState(pid: number, tid: number): string {
  const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
}

/** The new thread's registers made into exit(0) at the syscall instruction: it leaves without running user code. */
function exitNow(t: FrozenThread, insn: bigint): { regs: Buffer; fpregs: Buffer; xstate: Buffer } {
  const regs = Buffer.from(t.regs);
  regs.writeBigUInt64LE(insn, REG.rip);
  regs.writeBigUInt64LE(BigInt(SYS.exit), REG.rax);
  regs.writeBigUInt64LE(0n, REG.rdi);
  regs.writeBigUInt64LE(0xffffffffffffffffn, REG.orig_rax);
  return { regs, fpregs: t.fpregs, xstate: t.xstate };
}

async function waitGone(pid: number, tid: number): Promise<void> {
  for (let waited = 0; waited < 3000 && taskTids(pid).includes(tid); waited += 10) await sleep(10);
}

describe('injectSyscallInThread', () => {
  it('runs gettid in each chosen thread, and the threads blocked in read and clock_nanosleep complete them as if never stopped', async () => {
    const { f, ready } = await startTidaddr();
    const insn = findSyscallInstruction(B, ready.pid);
    const h = B.freeze(ready.pid, true);
    let thawed = false;
    try {
      const threads = B.frozenThreads(h);
      // Where each was found: the reader in read(), the sleeper in clock_nanosleep(), custom in pause().
      const reader = frozenThread(threads, thread(ready, 'reader').tid);
      expect([reg(reader.regs, 'orig_rax'), signed(reg(reader.regs, 'rax'))]).toEqual([BigInt(SYS.read), ERESTARTSYS]);
      const sleeper = frozenThread(threads, thread(ready, 'sleeper').tid);
      expect([reg(sleeper.regs, 'orig_rax'), signed(reg(sleeper.regs, 'rax'))]).toEqual([BigInt(SYS.clock_nanosleep), ERESTART_RESTARTBLOCK]);
      const custom = frozenThread(threads, thread(ready, 'custom').tid);
      expect([reg(custom.regs, 'orig_rax'), signed(reg(custom.regs, 'rax'))]).toEqual([BigInt(SYS.pause), ERESTARTNOHAND]);
      // Twice each, in an order that leaves no thread where the previous one was.
      for (const name of ['reader', 'sleeper', 'main', 'custom', 'reader', 'custom', 'sleeper', 'main'] as const) {
        const tid = thread(ready, name).tid;
        expect(B.injectSyscallInThread(h, tid, insn, SYS.gettid, []), name).toBe(BigInt(tid));
      }
      // The threads' own answers differ from the injection thread's: prctl in custom reads custom's tid address.
      const scratch = BigInt(ready.scratch) + 1024n;
      expect(B.injectSyscallInThread(h, thread(ready, 'custom').tid, insn, SYS.prctl, [PR_GET_TID_ADDRESS, scratch])).toBe(0n);
      expect(B.processVmRead(ready.pid, scratch, 8).readBigUInt64LE(0)).toBe(BigInt(thread(ready, 'custom').tidAddress));
      // A tid that is not frozen.
      let error: unknown;
      try {
        B.injectSyscallInThread(h, 0x3fffffff, insn, SYS.gettid, []);
      } catch (e) {
        error = e;
      }
      expect((error as { code?: string }).code).toBe('ESRCH');
      B.thaw(h);
      thawed = true;
    } finally {
      if (!thawed) B.thaw(h);
    }
    await untraced(ready.pid);
    // The read restarts (no EINTR, no spurious return): the next line is the data written after the thaw.
    writePipe(ready, 'hello');
    expect(await f.nextLine(5000)).toEqual({ read: 'hello', n: 5 });
    await sleep(700); // two more whole sleeps
    const { done, exit } = await f.stop();
    expect(exit.code).toBe(0);
    expect(done['badSleeps']).toBe(0);
    expect(done['sleeps'] as number).toBeGreaterThanOrEqual(2);
  }, 30_000);
});

describe('cloneThread', () => {
  it('adds a thread stopped from birth that joins the frozen set, takes its registers and exits cleanly after the thaw', async () => {
    const { f, ready } = await startTidaddr();
    const insn = findSyscallInstruction(B, ready.pid);
    const before = taskTids(ready.pid);
    const scratch = BigInt(ready.scratch);
    const exitWord = BigInt(ready.exitWord);
    const h: NativeHandle = B.freeze(ready.pid, true);
    let thawed = false;
    let tid = 0;
    try {
      // A refused clone3 (CLONE_THREAD without CLONE_SIGHAND) adds nothing.
      B.processVmWrite(ready.pid, scratch, cloneArgs({ flags: CLONE.VM | CLONE.THREAD }));
      expect(B.cloneThread(h, insn, scratch, CLONE_ARGS_SIZE)).toBe(EINVAL);
      expect(taskTids(ready.pid)).toEqual(before);
      expect(B.frozenThreads(h)).toHaveLength(before.length);

      B.processVmWrite(ready.pid, scratch, cloneArgs({ flags: THREAD_FLAGS | CLONE.CHILD_CLEARTID, childTid: exitWord }));
      tid = B.cloneThread(h, insn, scratch, CLONE_ARGS_SIZE);
      expect(tid).toBeGreaterThan(0);
      expect(taskTids(ready.pid)).toEqual([...before, tid].sort((a, b) => a - b));
      expect(threadState(ready.pid, tid)).toBe('t');
      const threads = B.frozenThreads(h);
      expect(threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual([...before, tid].sort((a, b) => a - b));
      const born = frozenThread(threads, tid);
      // Never ran: it stands where clone3 returned in the child (right after the syscall instruction, rax 0).
      expect({ stop: born.stop, rip: reg(born.regs, 'rip'), rax: reg(born.regs, 'rax') }).toEqual({ stop: 'interrupt', rip: insn + 2n, rax: 0n });
      expect(born.robustList).toEqual({ head: 0n, len: 24 });
      expect(B.injectSyscallInThread(h, tid, insn, SYS.gettid, [])).toBe(BigInt(tid));
      expect(B.injectSyscallInThread(h, tid, insn, SYS.prctl, [PR_GET_TID_ADDRESS, scratch + 512n])).toBe(0n);
      expect(B.processVmRead(ready.pid, scratch + 512n, 8).readBigUInt64LE(0)).toBe(exitWord);
      expect(B.processVmRead(ready.pid, exitWord, 4).readInt32LE(0)).toBe(0x7777);
      B.setThreadState(h, tid, exitNow(born, insn));
      B.thaw(h);
      thawed = true;
    } finally {
      if (!thawed) B.thaw(h);
    }
    await waitGone(ready.pid, tid);
    expect(taskTids(ready.pid)).toEqual(before);
    // CLONE_CHILD_CLEARTID: the kernel cleared the word at the thread's exit.
    expect(B.processVmRead(ready.pid, exitWord, 4).readInt32LE(0)).toBe(0);
    writePipe(ready, 'after');
    expect(await f.nextLine(5000)).toEqual({ read: 'after', n: 5 });
    const { done, exit } = await f.stop();
    expect(exit.code).toBe(0);
    expect(done['badSleeps']).toBe(0);
  }, 30_000);

  it('chooses the tid inside a new PID namespace with set_tid (NSpid), and reports clone3 refusing a taken one', async () => {
    buildFixtures();
    const l = await launch(['unshare', '--pid', '--fork', '--kill-child', join(FIXTURES_BUILD_DIR, 'tidaddr'), '--in-pidns'], { name: 'tidaddr in a pid namespace' });
    launched.push(l);
    const ready = l.ready.json as unknown as Ready & { targetPid: number };
    expect(ready.nspid).toBe(1);
    const pid = ready.targetPid;
    const insn = findSyscallInstruction(B, pid);
    const before = taskTids(pid);
    const scratch = BigInt(ready.scratch);
    const WANTED = 4321;
    const setTid = Buffer.alloc(4);
    const h = B.freeze(pid);
    let thawed = false;
    let tid = 0;
    try {
      setTid.writeInt32LE(WANTED);
      B.processVmWrite(pid, scratch + 256n, setTid);
      B.processVmWrite(pid, scratch, cloneArgs({ flags: THREAD_FLAGS, setTid: scratch + 256n, setTidSize: 1 }));
      tid = B.cloneThread(h, insn, scratch, CLONE_ARGS_SIZE);
      expect(tid).toBeGreaterThan(0);
      expect(tid).not.toBe(WANTED);
      const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
      expect(/^NSpid:\s*(.*)$/m.exec(status)![1]!.split(/\s+/)).toEqual([String(tid), String(WANTED)]);
      expect(B.injectSyscallInThread(h, tid, insn, SYS.gettid, [])).toBe(BigInt(WANTED));
      // Taken now (and 1 is the namespace's init): clone3 says EEXIST, nothing is added.
      expect(B.cloneThread(h, insn, scratch, CLONE_ARGS_SIZE)).toBe(EEXIST);
      setTid.writeInt32LE(1);
      B.processVmWrite(pid, scratch + 256n, setTid);
      expect(B.cloneThread(h, insn, scratch, CLONE_ARGS_SIZE)).toBe(EEXIST);
      expect(taskTids(pid)).toEqual([...before, tid].sort((a, b) => a - b));
      B.setThreadState(h, tid, exitNow(frozenThread(B.frozenThreads(h), tid), insn));
      B.thaw(h);
      thawed = true;
    } finally {
      if (!thawed) B.thaw(h);
    }
    await waitGone(pid, tid);
    expect(taskTids(pid)).toEqual(before);
    process.kill(pid, 'SIGKILL'); // the namespace's init: unshare exits with it
    await l.exited; // unshare --fork exits once it reaped it (with 1 here, util-linux 2.38)
    expect(existsSync(`/proc/${pid}`)).toBe(false);
  }, 30_000);
});

describe('thread records', () => {
  it('clearChildTid, robustList and rseqSignature equal what each thread reads of itself; the stack bytes borrowed are put back', async () => {
    const { f, ready } = await startTidaddr();
    const blocked = (['main', 'reader', 'custom'] as const).map((n) => thread(ready, n).tid);
    // A canary where each blocked thread's scratch word will be (8 bytes below its red zone).
    const canary = 0x1122334455667788n;
    const plain = B.freeze(ready.pid, true);
    const plainThreads = B.frozenThreads(plain);
    const scratchOf = new Map<number, bigint>();
    for (const tid of blocked) {
      const rsp = reg(frozenThread(plainThreads, tid).regs, 'rsp');
      scratchOf.set(tid, (rsp - 128n - 8n) & ~7n);
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(canary);
      B.processVmWrite(ready.pid, scratchOf.get(tid)!, b);
    }
    for (const t of plainThreads) expect(t.clearChildTid, 'not asked for').toBeUndefined();
    B.thaw(plain);

    const h = B.freeze(ready.pid, false, { tidAddresses: true });
    let threads: FrozenThread[];
    try {
      threads = B.frozenThreads(h);
      for (const tid of blocked) {
        // Still blocked where they were, and the word prctl wrote there is the canary again.
        expect(reg(frozenThread(threads, tid).regs, 'rsp')).toBe(reg(frozenThread(plainThreads, tid).regs, 'rsp'));
        expect(B.processVmRead(ready.pid, scratchOf.get(tid)!, 8).readBigUInt64LE(0)).toBe(canary);
      }
    } finally {
      B.thaw(h);
    }
    expect(threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(ready.threads.map((t) => t.tid).sort((a, b) => a - b));
    for (const t of ready.threads) {
      const got = frozenThread(threads, t.tid);
      expect(
        { clearChildTid: got.clearChildTid, robustList: got.robustList, rseqArea: got.rseqArea, rseqSignature: got.rseqSignature },
        t.name,
      ).toEqual({
        clearChildTid: BigInt(t.tidAddress),
        robustList: { head: BigInt(t.robustHead), len: t.robustLen },
        rseqArea: BigInt(t.rseqArea),
        rseqSignature: Number(t.rseqSig),
      });
      expect(got.stop, 'the record keeps the stop the thread was found in').toBe('interrupt');
    }
    // glibc registered its threads' rseq areas with RSEQ_SIG; custom registered its own.
    expect(Number(ready.glibcRseqSig)).toBe(GLIBC_RSEQ_SIG);
    for (const name of ['main', 'sleeper', 'reader'] as const) expect(frozenThread(threads, thread(ready, name).tid).rseqSignature, name).toBe(GLIBC_RSEQ_SIG);
    expect(frozenThread(threads, thread(ready, 'custom').tid).rseqSignature).toBe(CUSTOM_RSEQ_SIG);
    // Custom's values are its own, not glibc's.
    expect(BigInt(thread(ready, 'custom').tidAddress)).toBe(BigInt(ready.exitWord) - 4n);
    await untraced(ready.pid);
    writePipe(ready, 'x');
    expect(await f.nextLine(5000)).toEqual({ read: 'x', n: 1 });
    const { done, exit } = await f.stop();
    expect(exit.code).toBe(0);
    expect(done['badSleeps']).toBe(0);
  }, 30_000);
});

describe('doomOnAbandon', () => {
  /** A controller (node) that freezes pid, dooms it or not, and SIGKILLs itself before thawing. */
  function controllerDies(pid: number, doom: boolean): void {
    const binding = join(ROOT, 'dist', 'core', 'binding.js');
    expect(existsSync(binding), 'dist/ is built (npx tsc -p tsconfig.json)').toBe(true);
    const code = [
      `import { writeSync } from 'node:fs';`,
      `const { loadBinding } = await import(${JSON.stringify(binding)});`,
      `const B = loadBinding();`,
      `const h = B.freeze(Number(process.env.TARGET_PID));`,
      `if (process.env.DOOM === '1') B.doomOnAbandon(h);`,
      `writeSync(1, 'frozen\\n');`,
      `process.kill(process.pid, 'SIGKILL');`,
    ].join('\n');
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], {
      encoding: 'utf8',
      timeout: 10_000,
      env: { ...process.env, TARGET_PID: String(pid), DOOM: doom ? '1' : '0' },
    });
    expect({ signal: r.signal, stdout: r.stdout, stderr: r.stderr }).toEqual({ signal: 'SIGKILL', stdout: 'frozen\n', stderr: '' });
  }

  it('a doomed target is SIGKILLed when its controller dies before the thaw; without doom it runs on', async () => {
    const { f, ready } = await startTidaddr();
    controllerDies(ready.pid, false);
    await untraced(ready.pid);
    writePipe(ready, 'alive');
    expect(await f.nextLine(5000)).toEqual({ read: 'alive', n: 5 });

    controllerDies(ready.pid, true);
    const exit = await Promise.race([f.exited, sleep(5000).then(() => 'still running' as const)]);
    expect(exit).not.toBe('still running');
    expect(exit === 'still running' ? null : exit.signal).toBe('SIGKILL');
    expect(existsSync(`/proc/${ready.pid}`)).toBe(false);
  }, 30_000);

  it('thaw still thaws a doomed target', async () => {
    const { f, ready } = await startTidaddr();
    const h = B.freeze(ready.pid);
    B.doomOnAbandon(h);
    B.thaw(h);
    await untraced(ready.pid);
    writePipe(ready, 'thawed');
    expect(await f.nextLine(5000)).toEqual({ read: 'thawed', n: 6 });
    const { exit } = await f.stop();
    expect(exit.code).toBe(0);
  }, 30_000);
});
