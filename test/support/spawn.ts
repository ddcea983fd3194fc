// Fixtures a test may freeze with ptrace, started by core/demo/launch.ts (through fixtures/launch.ts) so
// that the test process is NOT their parent (see there why). Each is
// signalled by its pid, never through a child handle.
import { join } from 'node:path';
import { killAll, launch, type Launched, type LaunchedExit } from '../../fixtures/launch.js';
import { buildFixtures, FIXTURES_BUILD_DIR, FIXTURES_DIR } from './oracle.js';

export { buildFixtures, FIXTURES_BUILD_DIR, FIXTURES_DIR };

/** code (null when a signal ended it), signal, every JSON line after the ready line, stderr. */
export type DetachedExit = LaunchedExit;

export interface DetachedFixture {
  /** The fixture's pid; not a child of this process. */
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

const live = new Set<Launched>();

/**
 * SIGKILL, by pid, every fixture started here that is still running. Call it
 * from afterEach: a failed test never leaves its fixture running (the exit
 * hook of core/demo/launch.ts is only a last resort: a worker ended by a
 * signal never runs it).
 */
export function killDetached(): number[] {
  const killed = killAll(live);
  live.clear();
  return killed;
}

/** Starts fixtures/build/<name> re-parented and waits for its ready line. */
export async function startDetached(name: string, args: string[] = [], options: DetachedOptions = {}): Promise<DetachedFixture> {
  buildFixtures();
  const command = [join(FIXTURES_BUILD_DIR, name), ...args];
  if (options.user) {
    command.unshift('setpriv', `--reuid=${options.user.uid}`, `--regid=${options.user.gid}`, '--clear-groups', '--');
  }
  const f = await launch(command, { name, readyTimeoutMs: options.readyTimeoutMs ?? 20_000 });
  live.add(f);

  let taken = 1;
  const nextLine = async (timeoutMs = 20_000): Promise<Record<string, unknown>> => {
    const i = await f.output.find(taken, () => true, timeoutMs);
    if (i === 'ended') throw new Error(`${name} exited before printing another line; stderr: ${f.stderr()}`);
    if (i === 'timeout') throw new Error(`${name}: no output line within ${timeoutMs} ms; stderr: ${f.stderr()}`);
    taken = i + 1;
    return f.output.lines[i]!.json;
  };
  const stop = async (timeoutMs = 10_000): Promise<{ done: Record<string, unknown>; exit: DetachedExit }> => {
    const exit = await f.stop(timeoutMs);
    const done = exit.lines.find((l) => l['done'] === true);
    if (!done) throw new Error(`${name} exited (code ${exit.code}, signal ${exit.signal}) without a done line; stderr: ${exit.stderr}`);
    return { done, exit };
  };
  return {
    pid: f.pid,
    ready: f.ready.json,
    nextLine,
    exited: f.exited,
    kill: (signal = 'SIGTERM') => {
      f.signal(signal);
    },
    stop,
    stderr: f.stderr,
  };
}
