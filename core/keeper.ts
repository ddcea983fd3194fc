// Tracking that outlives the command (snapshot --track): a keeper process
// holds the snapshot's userfaultfd between commands, one per target.
//
// Why a process: a userfaultfd context lives as long as an fd of it is open,
// and the kernel clears its protection when the last one closes; wpsnap's
// commands are short-lived. Why the snapshot's own synchronous context and no
// asynchronous one: a range belongs to one context at a time, WP_ASYNC is a
// property of the whole context and unregistering clears the protection, so
// switching to an async context needs a stop that grows with the target's
// size (BENCHMARKS.md, "Tracking between commands"); the sync context is
// handed over with no stop at all, and its first write to a page after T
// costs one fault round trip.
//
// The keeper (core/keeper-main.ts) is spawned by the snapshot with the
// userfaultfd as its fd 3, serves the target's write faults (let through at
// once, logged: core/native/tracker.c), and answers on a unix socket
// (0600, in a 0700 directory, every peer checked with SO_PEERCRED) with
// newline-delimited JSON. The next snapshot of the target takes the context
// over (pidfd_getfd of fd 3, after the keeper stopped reading it), and hands
// it back with its own instant as the new base (--track) or releases it.
// If the keeper dies, the kernel releases the target; if the target exits,
// the keeper ends.
import { spawn } from 'node:child_process';
import { chmodSync, closeSync, lstatSync, mkdirSync, openSync, readdirSync, unlinkSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WpsnapError, fromNative } from '../common/errors.js';
import { packageRoot } from '../common/package-root.js';
import { fromStartLenPairs, normalize, type Intervals } from './intervals.js';
import type { NativeBinding } from './native/binding.js';

/** The keeper holds its copy of the target's userfaultfd as this fd. */
export const KEEPER_UFFD_FD = 3;

/** What a keeper reports of itself (`wpsnap status`). */
export interface KeeperStatus {
  pid: number;
  startTimeTicks: number;
  keeperPid: number;
  /** The snapshot whose instant the tracking starts at, and its store. */
  base: number | null;
  store: string | null;
  /** The base's instant T (ISO 8601). */
  since: string | null;
  /** 'waiting': started, not handed the context yet; 'handed-over': a snapshot holds it now. */
  state: 'waiting' | 'tracking' | 'handed-over';
  /** Pages written since T, as far as the keeper has read its log. */
  writtenPages: number;
  faults: number;
  /** Resident memory of the keeper itself. */
  keeperRssBytes: number;
}

/** What the keeper of `pid` says of itself; undefined if there is none (or it ended while asked). */
export async function keeperStatus(pid: number, dir = keeperDir(false)): Promise<KeeperStatus | undefined> {
  const link = await KeeperLink.connect(pid, dir);
  if (link === undefined) return undefined;
  try {
    return (await link.request({ op: 'status' })) as unknown as KeeperStatus;
  } catch {
    return undefined; // it ended meanwhile
  } finally {
    link.close();
  }
}

/** track and precopy need the target's ranges for a context of their own: refused while a keeper holds them. */
export async function refuseIfTracked(pid: number, what: string): Promise<void> {
  const status = await keeperStatus(pid);
  if (status === undefined) return;
  throw new WpsnapError(
    'TRACKED_BY_KEEPER',
    `pid ${pid} is tracked since snapshot ${status.base} by keeper ${status.keeperPid}: ${what} needs it untracked (wpsnap untrack ${pid}), or take a snapshot --parent ${status.base} instead`,
  );
}

/** The tracking a snapshot takes over, or hands over. */
export interface TrackingState {
  base: number;
  store: string;
  since: string;
  /** How the context was obtained at first (kept for the report). */
  method: string;
  /** What the context covers: [start, end, unit] triples, sorted (unit: the protection unit). */
  ranges: BigUint64Array;
  /** Written since T, and unmapped or moved away: [start, end) intervals. */
  written: Intervals;
  invalid: Intervals;
  /** Something could not be recorded: every page counts as written. */
  overflowed: boolean;
}

// ---- the wire: newline-delimited JSON, addresses as hex strings ----

export type Wire = Record<string, unknown>;

function hex(values: Iterable<bigint>): string[] {
  return [...values].map((v) => '0x' + v.toString(16));
}

export function encodeTracking(t: TrackingState): Wire {
  return {
    base: t.base,
    store: t.store,
    since: t.since,
    method: t.method,
    ranges: hex(t.ranges),
    written: hex(t.written.flat()),
    invalid: hex(t.invalid.flat()),
    overflowed: t.overflowed,
  };
}

function pairsOf(values: unknown): Intervals {
  const flat = (Array.isArray(values) ? values : []).map((v) => BigInt(String(v)));
  const out: Intervals = [];
  for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!]);
  return out;
}

export function decodeTracking(w: Wire): TrackingState {
  return {
    base: Number(w['base']),
    store: String(w['store']),
    since: String(w['since']),
    method: String(w['method'] ?? 'syscall'),
    ranges: BigUint64Array.from((Array.isArray(w['ranges']) ? w['ranges'] : []).map((v) => BigInt(String(v)))),
    written: pairsOf(w['written']),
    invalid: pairsOf(w['invalid']),
    overflowed: w['overflowed'] === true,
  };
}

/** A log of [start, len] pairs as intervals. */
export function logIntervals(pairs: BigUint64Array): Intervals {
  return normalize(fromStartLenPairs(pairs));
}

// ---- where keepers are ----

/**
 * The directory of the keepers' sockets and logs: $WPSNAP_RUNTIME_DIR, else
 * $XDG_RUNTIME_DIR/wpsnap, else /tmp/wpsnap-UID. Created 0700; refused if
 * another user owns it or others may enter it.
 */
export function keeperDir(create = true): string {
  const uid = process.getuid?.() ?? 0;
  const dir =
    process.env['WPSNAP_RUNTIME_DIR'] ??
    (process.env['XDG_RUNTIME_DIR'] ? join(process.env['XDG_RUNTIME_DIR'], 'wpsnap') : join(tmpdir(), `wpsnap-${uid}`));
  if (create) mkdirSync(dir, { recursive: true, mode: 0o700 });
  let st;
  try {
    st = lstatSync(dir);
  } catch {
    return dir; // not created (status): nothing is tracked
  }
  if (!st.isDirectory() || st.uid !== uid) {
    throw new WpsnapError('KEEPER_DIR', `${dir} is not a directory of this user: set WPSNAP_RUNTIME_DIR to a private directory`);
  }
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
  return dir;
}

export function keeperSocketPath(pid: number, dir = keeperDir()): string {
  return join(dir, `${pid}.sock`);
}

export function keeperLogPath(pid: number, dir = keeperDir()): string {
  return join(dir, `${pid}.log`);
}

// ---- talking to a keeper ----

/** One connection to a keeper: requests and their replies, in order. */
export class KeeperLink {
  private buffered = '';
  private readonly waiting: Array<{ resolve: (w: Wire) => void; reject: (e: Error) => void }> = [];
  private ended: Error | undefined;
  private onClose: (() => void) | undefined;

  private constructor(
    private readonly socket: Socket,
    readonly pid: number,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.buffered += chunk;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        const line = this.buffered.slice(0, nl);
        this.buffered = this.buffered.slice(nl + 1);
        const next = this.waiting.shift();
        if (next === undefined) continue;
        try {
          const reply = JSON.parse(line) as Wire;
          if (typeof reply['error'] === 'string') next.reject(new WpsnapError('KEEPER_FAILED', `keeper of pid ${pid}: ${reply['error']}`));
          else next.resolve(reply);
        } catch (error) {
          next.reject(error as Error);
        }
      }
    });
    const end = (why: Error): void => {
      this.ended ??= why;
      for (const w of this.waiting.splice(0)) w.reject(this.ended);
      this.onClose?.();
    };
    socket.on('error', (error) => end(error));
    socket.on('close', () => end(new WpsnapError('KEEPER_FAILED', `the keeper of pid ${pid} closed the connection`)));
  }

  /** Connect to the keeper of `pid`; undefined if there is none (a stale socket is removed). */
  static async connect(pid: number, dir = keeperDir(false)): Promise<KeeperLink | undefined> {
    const path = keeperSocketPath(pid, dir);
    const socket = connect(path);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
    } catch (error) {
      socket.destroy();
      const code = (error as { code?: string }).code;
      if (code === 'ENOENT') return undefined;
      if (code === 'ECONNREFUSED') {
        // Its keeper died (kill -9): the kernel released the target already.
        removeQuietly(path);
        removeQuietly(keeperLogPath(pid, dir));
        return undefined;
      }
      throw new WpsnapError('KEEPER_FAILED', `connect to the keeper of pid ${pid} (${path}): ${(error as Error).message}`);
    }
    return new KeeperLink(socket, pid);
  }

  request(message: Wire): Promise<Wire> {
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.socket.write(JSON.stringify(message) + '\n');
    });
  }

  /** Called once when the keeper goes away. */
  whenClosed(callback: () => void): void {
    this.onClose = callback;
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}

function removeQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

/** The keepers in the directory, each asked for its status; dead ones are cleaned up. */
export async function listKeepers(): Promise<KeeperStatus[]> {
  const dir = keeperDir(false);
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  const out: KeeperStatus[] = [];
  for (const name of names.filter((n) => /^\d+\.sock$/.test(n)).sort((a, b) => parseInt(a) - parseInt(b))) {
    const status = await keeperStatus(parseInt(name), dir);
    if (status !== undefined) out.push(status);
  }
  return out;
}

/** The tracking taken over from a keeper: the context (our fd of it) and its log. */
export interface TakenTracking {
  link: KeeperLink;
  uffd: number;
  keeperPid: number;
  tracking: TrackingState;
}

/**
 * If `pid` is tracked, take the tracking over: the keeper stops reading the
 * context (the target's faults wait in it until our engine reads them), hands
 * its log, and keeps its fd open until we hand the tracking back (adopt) or
 * release it; if we die meanwhile, it closes its fd too and the target is
 * released.
 */
export async function takeOverTracking(binding: NativeBinding, pid: number, startTimeTicks: number): Promise<TakenTracking | undefined> {
  const link = await KeeperLink.connect(pid);
  if (link === undefined) return undefined;
  try {
    const reply = await link.request({ op: 'handover', pid, startTimeTicks });
    const keeperPid = Number(reply['keeperPid']);
    let pidfd = -1;
    try {
      pidfd = binding.pidfdOpen(keeperPid);
      const uffd = binding.pidfdGetfd(pidfd, Number(reply['fd']));
      return { link, uffd, keeperPid, tracking: decodeTracking(reply) };
    } finally {
      if (pidfd >= 0) binding.closeFd(pidfd);
    }
  } catch (error) {
    link.close();
    throw error instanceof WpsnapError ? error : fromNative(error, `take the tracking of pid ${pid} over from its keeper`);
  }
}

/** The keeper's entry point, built (also when this module runs from source, as in the tests). */
function keeperMainPath(): string {
  return join(packageRoot(), 'dist', 'core', 'keeper-main.js');
}

/**
 * Start a keeper for `pid` holding `uffd` (inherited as its fd 3) and hand it
 * the tracking. Resolves once the keeper serves the context.
 */
export async function startKeeper(pid: number, startTimeTicks: number, uffd: number, tracking: TrackingState): Promise<{ keeperPid: number }> {
  const dir = keeperDir();
  const logFd = openSync(keeperLogPath(pid, dir), 'a', 0o600);
  let child;
  try {
    child = spawn(process.execPath, [keeperMainPath(), JSON.stringify({ pid, startTimeTicks, socket: keeperSocketPath(pid, dir), log: keeperLogPath(pid, dir) })], {
      detached: true,
      stdio: ['pipe', 'pipe', logFd, uffd],
    });
  } finally {
    closeSync(logFd);
  }
  const started = child;
  const first = await new Promise<string>((resolve) => {
    let out = '';
    started.stdout!.setEncoding('utf8');
    started.stdout!.on('data', (chunk: string) => {
      out += chunk;
      if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
    });
    started.once('exit', (code) => resolve(out.trim() || `exited with code ${code} (see ${keeperLogPath(pid, dir)})`));
    started.once('error', (error) => resolve(error.message));
  });
  if (first !== 'ready') throw new WpsnapError('KEEPER_FAILED', `the keeper of pid ${pid} did not start: ${first}`);
  const link = await KeeperLink.connect(pid, dir);
  if (link === undefined) throw new WpsnapError('KEEPER_FAILED', `the keeper of pid ${pid} started but its socket is gone`);
  try {
    await link.request({ op: 'adopt', ...encodeTracking(tracking) });
  } finally {
    link.close();
    // Our end of its stdin: until the adopt, its closing told the keeper we died.
    started.stdin!.end();
    started.stdout!.destroy();
    started.unref();
  }
  return { keeperPid: started.pid! };
}
