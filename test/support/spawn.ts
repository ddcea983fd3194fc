// Fixtures a test may freeze with ptrace: started so that the test process is
// NOT their parent. A tracer that is also the parent can have the ptrace stop
// of tid == pid reaped by its own libuv (which waitpid()s its children by pid
// on SIGCHLD), and wpsnap would then wait for a stop that never comes.
//
// `sh -c '"$@" & wait $!'` runs the fixture as a child of that shell: the shell
// is our child (its exit status is the fixture's), the fixture its child. The
// shell is not the tracer, so its wait() never sees ptrace stops. stdout and
// stderr are the fixture's own pipes. The fixture is signalled by its pid,
// which every fixture prints in its ready line.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { buildFixtures, FIXTURES_BUILD_DIR, FIXTURES_DIR } from './oracle.js';

export { buildFixtures, FIXTURES_BUILD_DIR, FIXTURES_DIR };

export interface DetachedExit {
  /** The fixture's exit code, or null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Every JSON line printed after the ready line. */
  lines: Array<Record<string, unknown>>;
  stderr: string;
}

export interface DetachedFixture {
  /** The fixture's pid (from its ready line); not a child of this process. */
  pid: number;
  ready: Record<string, unknown>;
  /** The next JSON line after those already taken (rejects if the fixture exits first). */
  nextLine(timeoutMs?: number): Promise<Record<string, unknown>>;
  /** Resolves once the fixture has exited and its output is drained. */
  exited: Promise<DetachedExit>;
  /** Signal the fixture by pid, while it still runs. */
  kill(signal?: NodeJS.Signals): void;
  /** SIGTERM, then the line with `done: true` and the exit. */
  stop(timeoutMs?: number): Promise<{ done: Record<string, unknown>; exit: DetachedExit }>;
  stderr(): string;
}

export interface DetachedOptions {
  /** Run as this uid/gid (setpriv --reuid --regid --clear-groups). */
  user?: { uid: number; gid: number };
  readyTimeoutMs?: number;
}

const live = new Map<number, { ended: boolean }>();

/**
 * SIGKILL, by pid, every fixture started here whose output has not ended (so
 * the pid is still its own). Call it from afterEach: a failed test never
 * leaves its fixture running (the process 'exit' hook below is only a last
 * resort: a worker ended by a signal never runs it).
 */
export function killDetached(): number[] {
  const killed: number[] = [];
  for (const [pid, state] of live) {
    if (state.ended) {
      live.delete(pid);
      continue;
    }
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(pid);
    } catch {
      // already gone
    }
  }
  return killed;
}
process.once('exit', () => {
  killDetached();
});

const SIGNALS: Record<number, NodeJS.Signals> = { 1: 'SIGHUP', 2: 'SIGINT', 6: 'SIGABRT', 9: 'SIGKILL', 11: 'SIGSEGV', 15: 'SIGTERM', 4: 'SIGILL', 7: 'SIGBUS', 8: 'SIGFPE' };

/** Parent pid of `pid` from /proc/PID/stat. */
export function parentOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

/** Starts fixtures/build/<name> re-parented (see the top of this file) and waits for its ready line. */
export async function startDetached(name: string, args: string[] = [], options: DetachedOptions = {}): Promise<DetachedFixture> {
  buildFixtures();
  const command = [join(FIXTURES_BUILD_DIR, name), ...args];
  if (options.user) {
    command.unshift('setpriv', `--reuid=${options.user.uid}`, `--regid=${options.user.gid}`, '--clear-groups', '--');
  }
  const shell: ChildProcess = spawn('sh', ['-c', '"$@" & wait $!', 'sh', ...command], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  shell.stderr!.setEncoding('utf8');
  shell.stderr!.on('data', (d: string) => {
    stderr += d;
  });

  const lines: Array<Record<string, unknown>> = [];
  let taken = 0;
  let ended = false;
  let wake: (() => void) | undefined;
  const notify = (): void => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const rl = createInterface({ input: shell.stdout! });
  rl.on('line', (line) => {
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      parsed = { unparsable: line };
    }
    lines.push(typeof parsed === 'object' && parsed !== null ? (parsed as Record<string, unknown>) : { value: parsed });
    notify();
  });
  const stdoutClosed = new Promise<void>((r) => rl.once('close', r));
  let state: { ended: boolean } | undefined;
  const exited = new Promise<DetachedExit>((resolve, reject) => {
    shell.once('error', (e) => {
      ended = true;
      notify();
      reject(e);
    });
    shell.once('exit', (code, signal) => {
      void stdoutClosed.then(() => {
        ended = true;
        if (state) state.ended = true;
        notify();
        // The shell exits with the fixture's status: 128+N when signal N ended it.
        const bySignal = signal === null && code !== null && code > 128 ? SIGNALS[code - 128] ?? null : null;
        resolve({
          code: bySignal ? null : code,
          signal: bySignal ?? signal,
          lines: lines.slice(1),
          stderr,
        });
      });
    });
  });
  exited.catch(() => {});

  const nextLine = async (timeoutMs = 20_000): Promise<Record<string, unknown>> => {
    const deadline = Date.now() + timeoutMs;
    while (taken >= lines.length) {
      if (ended) throw new Error(`${name} exited before printing another line; stderr: ${stderr}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${name}: no output line within ${timeoutMs} ms; stderr: ${stderr}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    return lines[taken++]!;
  };

  let ready: Record<string, unknown>;
  try {
    ready = await nextLine(options.readyTimeoutMs ?? 20_000);
  } catch (e) {
    shell.kill('SIGKILL');
    throw e;
  }
  const pid = ready['pid'];
  if (ready['ready'] !== true || typeof pid !== 'number') {
    shell.kill('SIGKILL');
    throw new Error(`${name}: first line is not a ready line with a pid: ${JSON.stringify(ready)}`);
  }
  state = { ended };
  live.set(pid, state);
  if (parentOf(pid) === process.pid) throw new Error(`${name} (pid ${pid}) is a child of the test process`);

  const kill = (signal: NodeJS.Signals = 'SIGTERM'): void => {
    if (!ended) process.kill(pid, signal);
  };
  const stop = async (timeoutMs = 10_000): Promise<{ done: Record<string, unknown>; exit: DetachedExit }> => {
    kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${name} (pid ${pid}) did not exit within ${timeoutMs} ms of SIGTERM; stderr: ${stderr}`)), timeoutMs);
    });
    try {
      const exit = await Promise.race([exited, timeout]);
      const done = exit.lines.find((l) => l['done'] === true);
      if (!done) throw new Error(`${name} exited (code ${exit.code}, signal ${exit.signal}) without a done line; stderr: ${exit.stderr}`);
      return { done, exit };
    } finally {
      clearTimeout(timer);
    }
  };
  return { pid, ready, nextLine, exited, kill, stop, stderr: () => stderr };
}
