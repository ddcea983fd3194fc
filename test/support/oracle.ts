// Helpers to run fixtures in tests; the oracle itself lives in core/demo/oracle.ts
// (the demo command uses it too).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
export * from '../../fixtures/oracle.js';
import { PAGE_SIZE, parseLayout, type PagewriterLayout } from '../../fixtures/oracle.js';

// ---------------------------------------------------------------- processes

export const FIXTURES_DIR = fileURLToPath(new URL('../../fixtures/', import.meta.url));
export const FIXTURES_BUILD_DIR = join(FIXTURES_DIR, 'build');

let built = false;
/** Runs `make -C fixtures` once per process (incremental, safe to run concurrently). */
export function buildFixtures(): void {
  if (built) return;
  const r = spawnSync('make', ['-s', '-C', FIXTURES_DIR], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`make -C fixtures failed (${r.status ?? r.signal}):\n${r.stdout}${r.stderr}`);
  built = true;
}

export interface FixtureExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Every JSON line printed after the ready line. */
  lines: Array<Record<string, unknown>>;
  stderr: string;
}

export interface FixtureProcess {
  child: ChildProcess;
  pid: number;
  ready: Record<string, unknown>;
  /** The next JSON line on stdout after those already taken (rejects if the process exits first). */
  nextLine(timeoutMs?: number): Promise<Record<string, unknown>>;
  /** Resolves when the process has exited and its output is drained. */
  exited: Promise<FixtureExit>;
  stderr(): string;
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  // Never leave a fixture we started behind a failed test (by our own child's pid only).
  for (const c of running) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

/** Spawns fixtures/build/<name> and resolves once its `{"ready":true,…}` line is out. */
export async function startFixture(name: string, args: string[] = [], readyTimeoutMs = 20_000): Promise<FixtureProcess> {
  buildFixtures();
  const child = spawn(join(FIXTURES_BUILD_DIR, name), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => { stderr += d; });

  const lines: Array<Record<string, unknown>> = [];
  let taken = 0;
  let ended = false;
  let wake: (() => void) | undefined;
  const notify = (): void => { const w = wake; wake = undefined; w?.(); };
  const rl = createInterface({ input: child.stdout! });
  rl.on('line', (line) => {
    let parsed: unknown;
    try { parsed = JSON.parse(line); } catch { parsed = { unparsable: line }; }
    lines.push(typeof parsed === 'object' && parsed !== null ? (parsed as Record<string, unknown>) : { value: parsed });
    notify();
  });
  const stdoutClosed = new Promise<void>((r) => rl.once('close', r));
  const exited = new Promise<FixtureExit>((resolve, reject) => {
    child.once('error', (e) => { running.delete(child); ended = true; notify(); reject(e); });
    child.once('exit', (code, signal) => {
      void stdoutClosed.then(() => {
        running.delete(child);
        ended = true;
        notify();
        resolve({ code, signal, lines: lines.slice(1), stderr });
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
        wake = () => { clearTimeout(t); r(); };
      });
    }
    return lines[taken++]!;
  };

  let ready: Record<string, unknown>;
  try {
    ready = await nextLine(readyTimeoutMs);
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
  if (ready['ready'] !== true) {
    child.kill('SIGKILL');
    throw new Error(`${name}: first line is not a ready line: ${JSON.stringify(ready)}`);
  }
  return { child, pid: child.pid!, ready, nextLine, exited, stderr: () => stderr };
}

export interface DoneLine {
  done: true;
  checksum: string;
  sleeps: number;
  reads: number;
  errors: number;
  counters: number[];
  selfCheck?: string;
  /** Process outcome, added by startPagewriter. */
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

export interface PagewriterProcess {
  child: ChildProcess;
  layout: PagewriterLayout;
  /** The done line, once the process has exited (rejects if it exited without one). */
  done: Promise<DoneLine>;
}

export async function startPagewriter(args: string[]): Promise<PagewriterProcess> {
  const f = await startFixture('pagewriter', args);
  const layout = parseLayout(JSON.stringify(f.ready));
  const done = f.exited.then((e) => {
    const d = e.lines.find((l) => l['done'] === true);
    if (!d) throw new Error(`pagewriter exited (code ${e.code}, signal ${e.signal}) without a done line; stderr: ${e.stderr}`);
    return { ...(d as unknown as DoneLine), exitCode: e.code, signal: e.signal, stderr: e.stderr };
  });
  done.catch(() => {});
  return { child: f.child, layout, done };
}

// ---------------------------------------------------------------- live memory

/** readPage over /proc/PID/mem (the process should be stopped for a consistent view). */
export function openProcMem(pid: number): { readPage: (address: bigint) => Buffer; close: () => void } {
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  return {
    readPage(address: bigint): Buffer {
      const buf = Buffer.alloc(PAGE_SIZE);
      const n = readSync(fd, buf, 0, PAGE_SIZE, address);
      if (n !== PAGE_SIZE) throw new Error(`/proc/${pid}/mem: read ${n} bytes at 0x${address.toString(16)}`);
      return buf;
    },
    close: () => closeSync(fd),
  };
}

/** Waits until every thread of `pid` is in a stopped state (T/t) after SIGSTOP. */
export async function waitStopped(pid: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const states = readdirSync(`/proc/${pid}/task`).map((tid) => {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    });
    if (states.every((s) => s === 'T' || s === 't')) return;
    if (Date.now() > deadline) throw new Error(`pid ${pid} not stopped after ${timeoutMs} ms (states ${states.join('')})`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
