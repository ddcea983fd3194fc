// Restore a snapshot as a new running process (wpsnap restore).
//
// 1. planRestore (core/restore-plan.ts) checks everything that can refuse,
//    before anything starts.
// 2. The restorer (core/native/restorer_main.c) starts: in a new PID
//    namespace by default, a guardian (pid 1 there) creates the process at
//    its pid of T, which re-creates its fds, cwd, root, umask, rlimits and
//    personality, and waits.
// 3. wpsnap freezes it (the tracer dooms it: if wpsnap dies now, it is
//    killed, never left half-built), replaces its address space with T's
//    (core/restore-memory.ts), creates T's other threads at their tids,
//    gives each its clear_child_tid, robust list, rseq area, name,
//    credentials and registers, sets the signal dispositions of T, and lets
//    it run.
// 4. The guardian is told "commit": from then on it only waits for the
//    process and exits with its status. Lazy (core/restore-lazy.ts): the
//    anonymous memory is served on first touch, and the guardian kills the
//    process if the server dies before every page is in.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import type { Socket } from 'node:net';
import { WpsnapError, fromNative } from '../common/errors.js';
import type { Store } from '../store/store.js';
import type { RegionRecord } from '../snapshot-format/model.js';
import { freeze, inject, type Frozen } from './attach.js';
import { restorerPath } from './binding.js';
import { faultPoint } from './fault.js';
import { stopwatch } from './pause.js';
import { SYSCALL } from './constants.js';
import type { NativeBinding } from './native/binding.js';
import { clearAndMoveSpecials, mapRegions, setMmFields, storedContent, writeContent, type Builder, isAnonymousPrivate } from './restore-memory.js';
import { restorablePlan, type FdFate, type RestoreOptions, type RestorePlan, type StdioChoice } from './restore-plan.js';
import { ThreadSetup } from './restore-threads.js';

const UFFDIO_REGISTER_MODE_MISSING = 1n;

/**
 * The pages holding each thread's rseq area: registering it makes the kernel write it, so a lazy restore
 * writes them before (their region is served by the page server otherwise).
 */
function rseqPages(plan: RestorePlan): RegionRecord[] {
  const pages = plan.threads.flatMap((t) => (t.rseq === undefined || t.rseq.area === 0n ? [] : [t.rseq.area & ~4095n, (t.rseq.area + BigInt(t.rseq.size) - 1n) & ~4095n]));
  return [...new Set(pages)].map((start) => ({ ...plan.regions[0]!, start, end: start + 4096n, path: '', capture: 'protected' as const }));
}

/** What a lazy restore serves on first touch: readable anonymous private memory (the rest is written before the process runs). */
const isLazy = (r: RegionRecord): boolean => isAnonymousPrivate(r) && r.perms[0] === 'r' && r.capture === 'protected';

export type { RestoreOptions, RestorePlan, FdFate, StdioChoice } from './restore-plan.js';

export interface RestoreResult {
  id: number;
  /** The restored process's pid here (the host's PID namespace). */
  pid: number;
  /** Its pid inside its own PID namespace: the pid it had at T (or pid without a namespace). */
  nsPid: number;
  pidNamespace: boolean;
  /** From the start until the process ran. */
  millis: number;
  fds: FdFate[];
  warnings: string[];
  /** Pages written before it ran. */
  pagesWritten: number;
  threads: number;
  /** Where the time until it ran went, ms (the plan, the store's page index, the restorer making the process and its fds, layout, memory, threads, thaw). */
  phasesMillis: Record<string, number>;
}

/**
 * The control socket to the restorer's processes, read a line at a time.
 * The launcher, the guardian and the process write to it independently: a
 * line is taken by its first word, in whatever order they came.
 */
class Control {
  private buffer = '';
  private lines: string[] = [];
  private waiting: Array<() => void> = [];
  private ended = false;

  constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.buffer += chunk;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        this.lines.push(this.buffer.slice(0, nl));
        this.buffer = this.buffer.slice(nl + 1);
      }
      this.notify();
    });
    const end = (): void => {
      this.ended = true;
      this.notify();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  private notify(): void {
    for (const w of this.waiting.splice(0)) w();
  }

  /** The first line starting with `expect`; an "error …" line, the end or the timeout throw. */
  async line(expect: string, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const error = this.lines.find((l) => l.startsWith('error '));
      if (error !== undefined) throw new WpsnapError('RESTORE_FAILED', error.slice('error '.length));
      const at = this.lines.findIndex((l) => l === expect || l.startsWith(`${expect} `));
      if (at >= 0) return this.lines.splice(at, 1)[0]!;
      if (this.ended) throw new WpsnapError('RESTORE_FAILED', `the restorer ended before saying "${expect}"`);
      const left = deadline - Date.now();
      if (left <= 0) throw new WpsnapError('RESTORE_FAILED', `the restorer did not say "${expect}" within ${timeoutMs / 1000} s`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiting.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  send(text: string): void {
    this.socket.write(text);
  }

  /** Send and wait until it is written (before synchronous work that would hold it back). */
  sendNow(text: string): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(text, (error) => (error ? reject(error) : resolve())));
  }

  end(): void {
    this.socket.end();
  }
}

/** The stdio the restorer (and the process) gets: [stdin, stdout, stderr]. */
function stdioFor(choice: StdioChoice): { stdio: Array<'ignore' | 'inherit' | number>; close: () => void } {
  if (choice === 'inherit') return { stdio: ['inherit', 'inherit', 'inherit'], close: () => {} };
  if (choice === 'null') return { stdio: ['ignore', 'ignore', 'ignore'], close: () => {} };
  const out = openSync(choice.file, 'a', 0o600);
  return { stdio: ['ignore', out, out], close: () => closeSync(out) };
}

function startRestorer(choice: StdioChoice): { child: ChildProcess; control: Control } {
  const { stdio, close } = stdioFor(choice);
  let child: ChildProcess;
  try {
    // glibc's rseq registration off: the restorer's thread then holds no rseq area that its own memory, soon unmapped, would back.
    child = spawn(restorerPath(), [], { stdio: [...stdio, 'pipe'], env: { GLIBC_TUNABLES: 'glibc.pthread.rseq=0' }, detached: true });
  } finally {
    close();
  }
  child.unref();
  const socket = child.stdio[3] as Socket;
  return { child, control: new Control(socket) };
}

/** Restore a snapshot as a new process; resolves once it runs. */
export async function restore(binding: NativeBinding, store: Store, ref: string, options: RestoreOptions = {}): Promise<RestoreResult> {
  const started = performance.now();
  const plan = restorablePlan(store, ref, options);
  const planMillis = performance.now() - started;
  if (options.lazy === true) throw new WpsnapError('USAGE', 'use restoreLazy for a lazy restore');
  const built = await buildProcess(binding, store, plan, options, false);
  built.control.send('commit\n');
  built.control.end();
  return {
    id: plan.snapshotId,
    pid: built.pid,
    nsPid: built.nsPid,
    pidNamespace: options.newIds !== true,
    millis: Math.round(performance.now() - started),
    fds: plan.fds,
    warnings: [...plan.warnings, ...built.warnings],
    pagesWritten: built.pagesWritten,
    threads: plan.threads.length,
    phasesMillis: { plan: planMillis, ...built.phasesMillis },
  };
}

export interface BuiltProcess {
  pid: number;
  nsPid: number;
  guardianPid: number;
  control: Control;
  pagesWritten: number;
  warnings: string[];
  /** Where the time until it ran went, ms: page index, restorer (process and fds), layout, memory, threads, thaw. */
  phasesMillis: Record<string, number>;
  /** Lazy: the regions left for the page server, and the userfaultfd the guardian also holds. */
  lazy?: { uffd: number; regions: RestorePlan['regions'] };
}

/**
 * Everything up to the process running: the restorer started and told its
 * plan, frozen, built and thawed. Lazy: the anonymous private regions are
 * registered with a userfaultfd (missing pages) instead of written, and the
 * process runs with them missing.
 */
export async function buildProcess(binding: NativeBinding, store: Store, plan: RestorePlan, options: RestoreOptions, lazy: boolean): Promise<BuiltProcess> {
  const nsPid = options.newIds === true ? 0 : plan.process.pid;
  const watch = stopwatch();
  const lap = (): number => Math.round(watch.lap() / 100) / 10;
  const phases: Record<string, number> = {};
  binding.prepareFreeze();
  const { child, control } = startRestorer(options.stdio ?? 'null');
  let pid = 0;
  let frozen: Frozen | undefined;
  let thawed = false;
  let uffdTaken = -1;
  try {
    await control.sendNow([`ns ${nsPid}`, ...plan.lines, 'go', ''].join('\n'));
    // Lazy: what is written before the process runs is read now, while the restorer makes the process and its
    // fds, without decoding the store's whole page index (for a large process that takes longer than the rest).
    const early = lazy ? [...storedContent(store, plan.processId, [...plan.regions.filter((r) => !isLazy(r)), ...rseqPages(plan)], { fromRows: true, keep: true })] : undefined;
    phases['read'] = lap();
    const pids = (await control.line('pids')).split(' ');
    const guardianPid = Number(pids[1]);
    pid = Number(pids[2]);
    const controlFd = Number((await control.line('ready')).split(' ')[1]);
    phases['restorer'] = lap();
    frozen = freeze(binding, pid);
    binding.doomOnAbandon(frozen.handle);
    faultPoint('restore-after-freeze');
    const b: Builder = { binding, pid, frozen, insn: 0n, scratch: 0n };
    clearAndMoveSpecials(b, plan.regions);
    mapRegions(b, plan);
    phases['layout'] = lap();
    const written = writeContent(b, early ?? storedContent(store, plan.processId, plan.regions));
    phases['memory'] = lap();
    setMmFields(b, plan);
    const threads = new ThreadSetup(b, plan, nsPid !== 0);
    const warnings = threads.create();
    faultPoint('restore-after-threads');
    warnings.push(...threads.setSignalActions());
    threads.perThreadState();
    let lazyPart: BuiltProcess['lazy'];
    if (lazy) {
      // Readable anonymous private memory: its pages missing, served on first touch once it runs.
      const regions = plan.regions.filter(isLazy);
      const uffd = await takeUserfaultfd(b, control);
      uffdTaken = uffd;
      lazyPart = { uffd, regions };
      binding.lazyUffdApi(uffd);
      for (const r of regions) binding.uffdRegister(uffd, r.start, r.end - r.start, UFFDIO_REGISTER_MODE_MISSING);
    }
    threads.credentials();
    inject(binding, frozen, b.insn, SYSCALL.close, [controlFd], `close(${controlFd})`);
    inject(binding, frozen, b.insn, SYSCALL.munmap, [b.scratch, BigInt(1 << 20)], 'munmap(scratch)');
    phases['threads'] = lap();
    warnings.push(...threads.thaw());
    thawed = true;
    phases['thaw'] = lap();
    return { pid, nsPid: nsPid || pid, guardianPid, control, pagesWritten: written.pages, warnings, phasesMillis: phases, ...(lazyPart ? { lazy: lazyPart } : {}) };
  } catch (error) {
    // Never half-built: the process goes (the tracer's doom kills it if we die instead).
    if (pid > 0) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    if (frozen !== undefined && !thawed) {
      try {
        binding.thaw(frozen.handle);
      } catch {
        // the tracer ends with the process
      }
    }
    if (uffdTaken >= 0) binding.closeFd(uffdTaken);
    control.end();
    child.kill('SIGKILL');
    throw error instanceof WpsnapError ? error : fromNative(error, 'restore');
  }
}

/** A userfaultfd created inside the process, a copy held by the guardian, ours taken, the process's closed. */
async function takeUserfaultfd(b: Builder, control: Control): Promise<number> {
  const O_CLOEXEC = 0o2000000;
  const O_NONBLOCK = 0o4000;
  const inTarget = inject(b.binding, b.frozen, b.insn, SYSCALL.userfaultfd, [O_CLOEXEC | O_NONBLOCK], 'userfaultfd');
  if (inTarget < 0) throw new WpsnapError('RESTORE_FAILED', `userfaultfd() in the process being restored failed: errno ${-inTarget}`);
  control.send(`hold-uffd ${inTarget}\n`);
  await control.line('held');
  const pidfd = b.binding.pidfdOpen(b.pid);
  try {
    return b.binding.pidfdGetfd(pidfd, inTarget);
  } finally {
    b.binding.closeFd(pidfd);
    inject(b.binding, b.frozen, b.insn, SYSCALL.close, [inTarget], `close(${inTarget})`);
  }
}

