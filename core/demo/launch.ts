// The one way to start a snapshot target (a bundled fixture, or a real
// program such as python3) so that it is NOT a child of this process: a
// tracer that is also the parent can have the ptrace stop of the target's
// main thread reaped by its own libuv (which waitpid()s its children by pid
// on SIGCHLD), and wpsnap, freezing the target from the same process, would
// wait for a stop that never comes.
//
//   sh -c '"$@" 3>&- & echo $! >&3; exec 3>&- 2>/dev/null; wait $!' sh PROGRAM ARGS...
//
// The shell is our child; the target is the shell's child. The shell waits
// without WUNTRACED, so ptrace stops never reach it, and it exits with the
// target's status (128+N when signal N ended it). It hands over the target's
// pid ($!) on its fd 3 before the target says anything, so that a target that
// never becomes ready is still ended. The shell's own stderr goes to
// /dev/null once the target has its own copy (no "Killed" from the shell when
// the target is SIGKILLed). Until the shell's exit is seen, the target's pid
// is its own (running, or a zombie the shell has not reaped): signals are
// sent by that pid only until then.
//
// The target talks one line per message on stdout, the first of which is its
// ready line, a JSON object with "ready": true (and "pid", which must be $!).
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { constants } from 'node:os';
import { basename } from 'node:path';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';

export type Line = Record<string, unknown>;

export interface OutputLine {
  /** As printed. */
  text: string;
  /** Parsed: a JSON object as is, other JSON as {value}, anything else as {unparsable: text}. */
  json: Line;
}

function parseLine(text: string): Line {
  try {
    const v: unknown = JSON.parse(text);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Line) : { value: v };
  } catch {
    return { unparsable: text };
  }
}

/** The lines of a stream, as they come, each parsed once; callers wait for the one they need. */
export class LineLog {
  readonly lines: OutputLine[] = [];
  private closed = false;
  private wakers: Array<() => void> = [];

  constructor(input: Readable) {
    const rl = createInterface({ input });
    rl.on('line', (text) => {
      this.lines.push({ text, json: parseLine(text) });
      this.wake();
    });
    rl.once('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  /** The stream has ended: no more lines will come. */
  get ended(): boolean {
    return this.closed;
  }

  /** Every line from index `from` on, parsed. */
  json(from = 0): Line[] {
    return this.lines.slice(from).map((l) => l.json);
  }

  /**
   * The index of the first line at `from` or after that `match` accepts (already
   * received or yet to come); 'ended' if the stream ends first, 'timeout' once
   * timeoutMs has passed (never, by default).
   */
  async find(from: number, match: (line: OutputLine) => boolean, timeoutMs = Infinity): Promise<number | 'ended' | 'timeout'> {
    const deadline = Date.now() + timeoutMs;
    for (let i = from; ; ) {
      for (; i < this.lines.length; i++) if (match(this.lines[i]!)) return i;
      if (this.closed) return 'ended';
      const left = deadline - Date.now();
      if (left <= 0) return 'timeout';
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(left) ? setTimeout(resolve, left) : undefined;
        this.wakers.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  private wake(): void {
    for (const w of this.wakers.splice(0)) w();
  }
}

export interface LaunchedExit {
  /** The target's exit code, or null when a signal ended it. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Every line after the ready line, parsed. */
  lines: Line[];
  /** Empty when stderr is inherited. */
  stderr: string;
}

export interface Launched {
  /** The target's pid (its shell's $!); not a child of this process. */
  readonly pid: number;
  /** For messages: the fixture's name, or the command's base names. */
  readonly name: string;
  /** Its ready line (line 0 of `output`). */
  readonly ready: OutputLine;
  /** Its stdout, ready line included. */
  readonly output: LineLog;
  /** Resolves once the target has exited and its output is drained. */
  readonly exited: Promise<LaunchedExit>;
  /** Whether its pid is still its own: its shell's exit has not been seen. */
  running(): boolean;
  /** Sends `signal` by pid while running(); false if it no longer is. */
  signal(signal: NodeJS.Signals): boolean;
  /** SIGTERM, then its exit (rejects if it has not exited within timeoutMs). */
  stop(timeoutMs: number): Promise<LaunchedExit>;
  /** What it wrote on stderr so far (empty when inherited). */
  stderr(): string;
}

export interface LaunchOptions {
  /** Default: the command's base names. */
  name?: string;
  /** How long the ready line may take (default 20 s); the target is SIGKILLed after that. */
  readyTimeoutMs?: number;
  /** Added to this process's environment. */
  env?: NodeJS.ProcessEnv;
  /** 'pipe' (default): collected, see stderr(); 'inherit': this process's stderr. */
  stderr?: 'pipe' | 'inherit';
}

type Signallable = Pick<Launched, 'pid' | 'signal'>;

const running = new Set<Signallable>();
process.once('exit', () => {
  // A last resort: a worker or CLI ended by a signal never gets here.
  killAll(running);
});

/** SIGKILL, by pid, each of `targets` still running; the pids signalled. */
export function killAll(targets: Iterable<Signallable>): number[] {
  const killed: number[] = [];
  for (const t of targets) if (t.signal('SIGKILL')) killed.push(t.pid);
  return killed;
}

function signalName(n: number): NodeJS.Signals | null {
  for (const [name, value] of Object.entries(constants.signals)) if (value === n) return name as NodeJS.Signals;
  return null;
}

const tail = (s: string): string => s.slice(-2000);

/** `promise`, or `fallback` once ms have passed. */
async function within<T, F>(promise: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<F>((resolve) => (timer = setTimeout(resolve, ms, fallback)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Starts `command` re-parented (see the top of this file) and waits for its ready line. */
export async function launch(command: string[], options: LaunchOptions = {}): Promise<Launched> {
  const name = options.name ?? command.map((c) => basename(c)).join(' ');
  const readyTimeoutMs = options.readyTimeoutMs ?? 20_000;
  const inherit = options.stderr === 'inherit';
  const shell = spawn('sh', ['-c', '"$@" 3>&- & echo $! >&3; exec 3>&- 2>/dev/null; wait $!', 'sh', ...command], {
    stdio: ['ignore', 'pipe', inherit ? 'inherit' : 'pipe', 'pipe'],
    ...(options.env === undefined ? {} : { env: { ...process.env, ...options.env } }),
  });
  let stderr = '';
  if (!inherit) {
    shell.stderr!.setEncoding('utf8');
    shell.stderr!.on('data', (d: string) => {
      stderr += d;
    });
  }
  const output = new LineLog(shell.stdout!);
  const pidText = new Promise<string>((resolve) => {
    let text = '';
    const fd3 = shell.stdio[3] as Readable;
    fd3.setEncoding('utf8');
    fd3.on('data', (d: string) => {
      text += d;
    });
    fd3.once('close', () => resolve(text.trim()));
  });

  let shellExited = false;
  let entry: Signallable | undefined;
  const exited = new Promise<LaunchedExit>((resolve, reject) => {
    shell.once('exit', () => {
      shellExited = true;
      if (entry) running.delete(entry);
    });
    shell.once('error', (error) => {
      shellExited = true;
      reject(error);
    });
    // 'close': the shell has exited and every pipe of it is drained.
    shell.once('close', (code, signal) => {
      const bySignal = signal === null && code !== null && code > 128 ? signalName(code - 128) : null;
      resolve({ code: bySignal ? null : code, signal: bySignal ?? signal, lines: output.json(1), stderr });
    });
  });
  exited.catch(() => {});

  // fd 3 closes right after the echo, or when the shell dies (or never started).
  const pid = Number(await Promise.race([pidText, exited.then(() => '', () => '')]));
  const signal = (sig: NodeJS.Signals): boolean => {
    if (shellExited || !(pid > 0)) return false;
    try {
      process.kill(pid, sig);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ESRCH') return false;
      throw error;
    }
  };
  const fail = async (why: string): Promise<never> => {
    signal('SIGKILL');
    const exit = await within(exited.catch(() => null), 2_000, null);
    const status = exit ? ` (exit code ${String(exit.code)}, signal ${String(exit.signal)})` : '';
    throw new Error(`${name}${pid > 0 ? ` (pid ${pid})` : ''}: ${why}${status}${inherit ? '' : `; stderr: ${tail(stderr)}`}`);
  };
  if (!(pid > 0)) return fail('the shell did not start it');
  entry = { pid, signal };
  if (!shellExited) running.add(entry);

  const found = await output.find(0, () => true, readyTimeoutMs);
  if (found === 'timeout') return fail(`no ready line within ${readyTimeoutMs} ms`);
  if (found === 'ended') return fail('its output ended before its ready line');
  const ready = output.lines[0]!;
  if (ready.json['ready'] !== true) return fail(`its first line is not a ready line: ${ready.text}`);
  if ('pid' in ready.json && ready.json['pid'] !== pid) return fail(`its ready line has pid ${String(ready.json['pid'])}, its shell started pid ${pid}`);

  return {
    pid,
    name,
    ready,
    output,
    exited,
    running: () => !shellExited,
    signal,
    stop: async (timeoutMs) => {
      signal('SIGTERM');
      const exit = await within(exited, timeoutMs, null);
      if (exit === null) throw new Error(`${name} (pid ${pid}) did not exit within ${timeoutMs} ms of SIGTERM${inherit ? '' : `; stderr: ${tail(stderr)}`}`);
      return exit;
    },
    stderr: () => stderr,
  };
}

// ---------------------------------------------------------------- programs

export interface LaunchedProgram {
  pid: number;
  /** The program's first JSON line ({"ready":true,...}), unparsed. */
  readyLine: string;
  /** Resolves with the next JSON line the program prints (e.g. its done line), or null at EOF. */
  nextLine: () => Promise<string | null>;
  /** SIGKILL (by default) if still running. */
  kill: (signal?: NodeJS.Signals) => void;
}

/** Starts `binary` re-parented, its stderr on ours, and waits for its ready line. */
export async function launchProgram(binary: string, args: string[], readyTimeoutMs = 20_000): Promise<LaunchedProgram> {
  if (!existsSync(binary)) throw new Error(`${binary} is not built (run npm install)`);
  const t = await launch([binary, ...args], { name: basename(binary), readyTimeoutMs, stderr: 'inherit' });
  let taken = 1;
  return {
    pid: t.pid,
    readyLine: t.ready.text,
    nextLine: async () => {
      const i = await t.output.find(taken, (l) => l.text.startsWith('{'));
      if (typeof i !== 'number') return null;
      taken = i + 1;
      return t.output.lines[i]!.text;
    },
    kill: (signal = 'SIGKILL') => {
      t.signal(signal);
    },
  };
}
