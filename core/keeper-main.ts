// The keeper process (core/keeper.ts): holds a tracked target's userfaultfd
// (fd 3) between wpsnap commands and serves its write faults. Spawned by
// `wpsnap snapshot --track`; argv[2] is {pid, startTimeTicks, socket}.
// stdout says "ready" (or why not) once the socket listens; stderr is the
// keeper's log file. Ends when the target exits, on untrack or release, when
// the snapshot holding the context dies, or when its spawner dies before
// handing it the tracking.
import { chmodSync, readFileSync, unlinkSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { loadBinding } from './binding.js';
import { intersect, normalize, pagesIn, subtract } from './intervals.js';
import { KEEPER_UFFD_FD, KeeperLink, decodeTracking, encodeTracking, logIntervals, type KeeperStatus, type TrackingState, type Wire } from './keeper.js';
import type { NativeHandle } from './native/binding.js';
import { processStartTicks, writerAlive } from '../store/liveness.js';
import { unprotectGradually } from './tracker.js';
import { tripleIntervals } from './tracking-handover.js';

/** How often the target's exit is looked for. The log is read only when asked
 * for: it holds one run per written page at most, and merging it every
 * second cost 150–370 ms of CPU a second at 1% of 1 GiB written per second. */
const EXIT_CHECK_MS = 1000;

const config = JSON.parse(process.argv[2] ?? '{}') as { pid: number; startTimeTicks: number; socket: string; log: string };
const binding = loadBinding();
const uid = process.getuid?.() ?? 0;

function log(message: string): void {
  process.stderr.write(`${new Date().toISOString()} keeper ${process.pid} (pid ${config.pid}): ${message}\n`);
}

let state: KeeperStatus['state'] = 'waiting';
let tracking: TrackingState | undefined;
let handle: NativeHandle | undefined;
let faults = 0;
/** The connection of the snapshot that holds the context ('handed-over'). */
let holder: Socket | undefined;
let pidfd = -1;
let ending = false;


/** Fold what the tracker thread logged since the last take into `tracking`. */
function takeLog(): { exited: boolean } {
  if (handle === undefined || tracking === undefined) return { exited: false };
  const taken = binding.trackerTake(handle);
  faults = taken.faults;
  if (taken.error !== undefined) {
    log(`tracking failed: ${taken.error}`);
    tracking.overflowed = true;
  }
  // A fork: the child may write shared memory without a fault here.
  if (taken.overflowed || taken.forks > 0) tracking.overflowed = true;
  tracking.written = normalize([...tracking.written, ...logIntervals(taken.written)]);
  tracking.invalid = normalize([...tracking.invalid, ...logIntervals(taken.invalid)]);
  return { exited: taken.exited };
}

function startServing(next: TrackingState): void {
  tracking = next;
  if (pidfd < 0) pidfd = binding.pidfdOpen(config.pid);
  handle = binding.trackerStart({ uffd: KEEPER_UFFD_FD, pid: config.pid, pidfd, ranges: next.ranges });
  state = 'tracking';
}

/** Stop reading the context (the target's faults wait in it); the log is complete after this. */
function stopServing(): void {
  if (handle === undefined) return;
  binding.trackerStop(handle);
  takeLog();
  handle = undefined;
}

function status(): KeeperStatus {
  if (state === 'tracking') takeLog();
  const covered = tracking === undefined ? [] : tripleIntervals(tracking.ranges);
  return {
    pid: config.pid,
    startTimeTicks: config.startTimeTicks,
    keeperPid: process.pid,
    base: tracking?.base ?? null,
    store: tracking?.store ?? null,
    since: tracking?.since ?? null,
    state,
    writtenPages: tracking === undefined ? 0 : pagesIn(intersect(tracking.written, subtract(covered, tracking.invalid))),
    faults,
    keeperRssBytes: process.memoryUsage.rss(),
  };
}

/** End: the context's last fd (ours) closes with the process, which releases the target. */
function end(reason: string, code = 0): never {
  ending = true;
  log(`ends: ${reason}`);
  // The log stays only when something failed.
  for (const path of code === 0 ? [config.socket, config.log] : [config.socket]) {
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  }
  process.exit(code);
}

function handleRequest(socket: Socket, request: Wire): Wire {
  switch (request['op']) {
    case 'status':
      return { ...status() };
    case 'adopt': {
      if (state === 'tracking') return { error: 'already tracking' };
      if (state === 'handed-over' && socket !== holder) return { error: 'another snapshot holds the tracking' };
      holder = undefined;
      startServing(decodeTracking(request));
      log(`tracking since snapshot ${tracking!.base} (${tracking!.since}) of ${tracking!.store}`);
      process.stdin.destroy(); // the spawner's end no longer matters
      return { ok: true, keeperPid: process.pid };
    }
    case 'handover': {
      if (state !== 'tracking') return { error: state === 'waiting' ? 'not tracking yet' : 'another snapshot holds the tracking' };
      if (request['pid'] !== config.pid || request['startTimeTicks'] !== config.startTimeTicks) return { error: 'not the process this keeper tracks' };
      stopServing();
      state = 'handed-over';
      holder = socket;
      log(`handed over to pid ${binding.peerCredentials(fdOf(socket)).pid}`);
      return { ok: true, fd: KEEPER_UFFD_FD, keeperPid: process.pid, ...encodeTracking(tracking!) };
    }
    case 'release':
      if (socket !== holder) return { error: 'only the snapshot that holds the tracking may release it' };
      setImmediate(() => end('released by the snapshot that took it over'));
      return { ok: true };
    case 'untrack': {
      if (state === 'handed-over') return { error: 'a snapshot of it is running: try again when it ends' };
      const before = status();
      stopServing();
      if (tracking !== undefined) unprotectGradually(binding, KEEPER_UFFD_FD, subtract(tripleIntervals(tracking.ranges), tracking.invalid));
      setImmediate(() => end('untracked'));
      return { ok: true, ...before };
    }
    default:
      return { error: `unknown request ${JSON.stringify(request['op'])}` };
  }
}

function fdOf(socket: Socket): number {
  return (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
}

function onConnection(socket: Socket): void {
  // Only our own user or root: the context lets its holder write-protect, and read, the target.
  let peer;
  try {
    peer = binding.peerCredentials(fdOf(socket));
  } catch (error) {
    log(`refused a connection: no peer credentials (${(error as Error).message})`);
    socket.destroy();
    return;
  }
  if (peer.uid !== uid && peer.uid !== 0) {
    log(`refused a connection from pid ${peer.pid} uid ${peer.uid}`);
    socket.destroy();
    return;
  }
  let buffered = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      let reply: Wire;
      try {
        reply = handleRequest(socket, JSON.parse(line) as Wire);
      } catch (error) {
        reply = { error: (error as Error).message };
      }
      socket.write(JSON.stringify(reply, (_k, v: unknown) => (typeof v === 'bigint' ? '0x' + v.toString(16) : v)) + '\n');
    }
  });
  socket.on('error', () => undefined);
  socket.on('close', () => {
    // The snapshot holding the context died or gave up without handing it back:
    // what it did to the protection is unknown, so the tracking ends here.
    if (socket === holder && !ending) end('the snapshot that took the tracking over ended without handing it back');
  });
}

async function main(): Promise<void> {
  if (processStartTicks(config.pid) !== config.startTimeTicks) end(`pid ${config.pid} is not the process to track`, 1);
  // At most one keeper per target: a live one keeps its socket.
  const existing = await KeeperLink.connect(config.pid);
  if (existing !== undefined) {
    existing.close();
    process.stdout.write(`pid ${config.pid} is tracked by another keeper already\n`);
    process.exit(1);
  }
  const server = createServer(onConnection);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.socket, resolve);
  });
  chmodSync(config.socket, 0o600);
  // Until the tracking is handed to us, our spawner's death ends us (stdin closes).
  process.stdin.on('end', () => {
    if (state === 'waiting') end('the snapshot that started this keeper ended before handing it the tracking');
  });
  process.stdin.on('error', () => undefined);
  process.stdin.resume();
  process.stdout.write('ready\n');
  setInterval(() => {
    if (!writerAlive(config.pid, config.startTimeTicks)) end(`pid ${config.pid} exited`);
  }, EXIT_CHECK_MS);
}

process.on('uncaughtException', (error) => end(`failed: ${error.stack ?? error.message}`, 1));
// Kept in the log for `wpsnap status`: the target's command line, once.
try {
  log(`started for ${readFileSync(`/proc/${config.pid}/cmdline`, 'utf8').split('\0').join(' ').trim()}`);
} catch {
  // the check in main() reports it
}
void main();
