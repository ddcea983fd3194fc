// Real programs (python3, node, ...) as snapshot targets: started so that the
// test process is NOT their parent (`sh -c '"$@" & wait $!'`, as in
// test/support/spawn.ts: a tracer that is also the parent could have the
// ptrace stop of the main thread reaped by its own libuv), talking one JSON
// object per line on stdout, the first of which is {"ready": true, "pid": N}.
// Plain reference runs, which are never snapshotted, are direct children.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

export type Line = Record<string, unknown>;

export interface ProgramExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Every JSON line after the ready line. */
  lines: Line[];
  stderr: string;
}

export interface Program {
  /** The program's own pid (from its ready line); not a child of this process. */
  pid: number;
  ready: Line;
  /** Every JSON line after the ready line so far. */
  lines(): Line[];
  /** The first line after the ready line (already printed or yet to come) that `match` accepts. */
  waitFor(match: (line: Line) => boolean, timeoutMs?: number): Promise<Line>;
  exited: Promise<ProgramExit>;
  /** Signal the program by its pid while its output is open (so the pid is still its own). */
  signal(signal: NodeJS.Signals): void;
  /** SIGTERM, then its exit (rejects if it has not exited within timeoutMs). */
  stop(timeoutMs?: number): Promise<ProgramExit>;
  stderr(): string;
}

const live = new Map<number, { ended: boolean }>();

/** SIGKILL, by pid, every program started here whose output has not ended. For afterEach/afterAll. */
export function killPrograms(): number[] {
  const killed: number[] = [];
  for (const [pid, state] of live) {
    live.delete(pid);
    if (state.ended) continue;
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
  killPrograms();
});

function parentOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

function parse(line: string): Line {
  try {
    const v: unknown = JSON.parse(line);
    return typeof v === 'object' && v !== null ? (v as Line) : { value: v };
  } catch {
    return { unparsable: line };
  }
}

/** Collects JSON lines from a child's stdout and lets callers wait for one. */
class LineSink {
  readonly all: Line[] = [];
  ended = false;
  private wakers: Array<() => void> = [];

  constructor(child: ChildProcess) {
    const rl = createInterface({ input: child.stdout! });
    rl.on('line', (line) => {
      this.all.push(parse(line));
      this.wake();
    });
    rl.once('close', () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.wakers.splice(0)) w();
  }

  /** The first line at index >= from that `match` accepts, and its index. */
  async find(from: number, match: (line: Line) => boolean, timeoutMs: number, what: string, stderr: () => string): Promise<[Line, number]> {
    const deadline = Date.now() + timeoutMs;
    let i = from;
    for (;;) {
      for (; i < this.all.length; i++) if (match(this.all[i]!)) return [this.all[i]!, i];
      if (this.ended) throw new Error(`${what}: output ended before the line awaited; stderr: ${stderr().slice(-2000)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${what}: no such line within ${timeoutMs} ms; last lines: ${JSON.stringify(this.all.slice(-3))}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wakers.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }
}

export interface StartOptions {
  readyTimeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

/** Starts `command` re-parented (see the top of this file) and waits for its ready line. */
export async function startProgram(command: string[], options: StartOptions = {}): Promise<Program> {
  const what = command.map((c) => c.split('/').pop()).join(' ');
  const shell = spawn('sh', ['-c', '"$@" & wait $!', 'sh', ...command], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...options.env },
  });
  let stderr = '';
  shell.stderr!.setEncoding('utf8');
  shell.stderr!.on('data', (d: string) => {
    stderr += d;
  });
  const sink = new LineSink(shell);
  let state: { ended: boolean } | undefined;
  const exited = new Promise<ProgramExit>((resolve, reject) => {
    shell.once('error', reject);
    shell.once('close', (code, signal) => {
      sink.ended = true;
      if (state) state.ended = true;
      // The shell exits with the program's status: 128+N when signal N ended it.
      const bySignal = signal === null && code !== null && code > 128 ? ((SIGNALS[code - 128] ?? null) as NodeJS.Signals | null) : null;
      resolve({ code: bySignal ? null : code, signal: bySignal ?? signal, lines: sink.all.slice(1), stderr });
    });
  });
  exited.catch(() => {});
  let ready: Line;
  try {
    [ready] = await sink.find(0, () => true, options.readyTimeoutMs ?? 60_000, what, () => stderr);
  } catch (error) {
    shell.kill('SIGKILL');
    throw error;
  }
  const pid = ready['pid'];
  if (ready['ready'] !== true || typeof pid !== 'number') {
    shell.kill('SIGKILL');
    throw new Error(`${what}: first line is not a ready line with a pid: ${JSON.stringify(ready)}`);
  }
  state = { ended: sink.ended };
  live.set(pid, state);
  if (parentOf(pid) === process.pid) throw new Error(`${what} (pid ${pid}) is a child of the test process`);
  return {
    pid,
    ready,
    lines: () => sink.all.slice(1),
    waitFor: async (match, timeoutMs = 60_000) => (await sink.find(1, match, timeoutMs, what, () => stderr))[0],
    exited,
    signal: (signal) => {
      if (!sink.ended) process.kill(pid, signal);
    },
    stop: async (timeoutMs = 30_000) => {
      if (!sink.ended) process.kill(pid, 'SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} (pid ${pid}) did not exit within ${timeoutMs} ms of SIGTERM`)), timeoutMs);
      });
      try {
        return await Promise.race([exited, late]);
      } finally {
        clearTimeout(timer);
      }
    },
    stderr: () => stderr,
  };
}

const SIGNALS: Record<number, string> = { 1: 'SIGHUP', 2: 'SIGINT', 6: 'SIGABRT', 9: 'SIGKILL', 11: 'SIGSEGV', 15: 'SIGTERM', 4: 'SIGILL', 7: 'SIGBUS', 8: 'SIGFPE' };

/** Runs `command` to its end as a direct child (a reference run, never snapshotted); its JSON lines. */
export function runProgram(command: string[], timeoutMs = 120_000): Promise<ProgramExit> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => {
      stderr += d;
    });
    const sink = new LineSink(child);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command.join(' ')} did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    child.once('error', reject);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, lines: sink.all.slice(1), stderr });
    });
  });
}
