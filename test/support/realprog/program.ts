// Real programs (python3, node, ...) as snapshot targets: started by
// core/demo/launch.ts so that the test process is NOT their parent (see there
// why), talking one JSON object per line on stdout, the first of which is
// {"ready": true, "pid": N}. Plain reference runs, which are never
// snapshotted, are direct children.
import { spawn } from 'node:child_process';
import { killAll, launch, LineLog, type Launched, type LaunchedExit, type Line } from '../../../fixtures/launch.js';

export type { Line };

/** code, signal, every JSON line after the ready line, stderr. */
export type ProgramExit = LaunchedExit;

export interface Program {
  /** The program's own pid; not a child of this process. */
  pid: number;
  ready: Line;
  /** Every JSON line after the ready line so far. */
  lines(): Line[];
  /** The first line after the ready line (already printed or yet to come) that `match` accepts. */
  waitFor(match: (line: Line) => boolean, timeoutMs?: number): Promise<Line>;
  exited: Promise<ProgramExit>;
  /** Signal the program by its pid while it runs (so the pid is still its own). */
  signal(signal: NodeJS.Signals): void;
  /** SIGTERM, then its exit (rejects if it has not exited within timeoutMs). */
  stop(timeoutMs?: number): Promise<ProgramExit>;
  stderr(): string;
}

const live = new Set<Launched>();

/** SIGKILL, by pid, every program started here that is still running. For afterEach/afterAll. */
export function killPrograms(): number[] {
  const killed = killAll(live);
  live.clear();
  return killed;
}

export interface StartOptions {
  readyTimeoutMs?: number;
  env?: NodeJS.ProcessEnv;
}

/** Starts `command` re-parented and waits for its ready line. */
export async function startProgram(command: string[], options: StartOptions = {}): Promise<Program> {
  const p = await launch(command, { readyTimeoutMs: options.readyTimeoutMs ?? 60_000, env: options.env });
  live.add(p);
  return {
    pid: p.pid,
    ready: p.ready.json,
    lines: () => p.output.json(1),
    waitFor: async (match, timeoutMs = 60_000) => {
      const i = await p.output.find(1, (l) => match(l.json), timeoutMs);
      if (i === 'ended') throw new Error(`${p.name}: output ended before the line awaited; stderr: ${p.stderr().slice(-2000)}`);
      if (i === 'timeout') throw new Error(`${p.name}: no such line within ${timeoutMs} ms; last lines: ${JSON.stringify(p.output.json(1).slice(-3))}`);
      return p.output.lines[i]!.json;
    },
    exited: p.exited,
    signal: (signal) => {
      p.signal(signal);
    },
    stop: (timeoutMs = 30_000) => p.stop(timeoutMs),
    stderr: p.stderr,
  };
}

/** Runs `command` to its end as a direct child (a reference run, never snapshotted); its JSON lines. */
export function runProgram(command: string[], timeoutMs = 120_000): Promise<ProgramExit> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => {
      stderr += d;
    });
    const output = new LineLog(child.stdout!);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command.join(' ')} did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    child.once('error', reject);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, lines: output.json(1), stderr });
    });
  });
}
