// The cooperative agent against the real kernel: agentapp (LD_PRELOAD) and
// agentlinked (linked in) talk to an AgentServer over a real socket; FREEZE,
// the registers, the userfaultfd, THAW, a killed controller, a refused
// stranger, and snapshots whose pages are checked word by word.
import { spawn } from 'node:child_process';
import { chownSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { AGENT_FREEZE_TIMEOUT_MS } from '../core/agent-attacher.js';
import { AgentServer, type AgentMember } from '../core/agent-server.js';
import { WpsnapError } from '../common/errors.js';
import { loadBinding } from '../core/binding.js';
import { mix64 } from '../core/demo/oracle.js';
import { snapshotProcess } from '../core/snapshot.js';
import { killAll, launch, type Launched } from '../fixtures/launch.js';
import { decodeUserRegs } from '../snapshot-format/regs-x86_64.js';
import { Store } from '../store/store.js';
import { ROOT, runCli } from './support/cli.js';
import { buildFixtures, FIXTURES_BUILD_DIR } from './support/oracle.js';
import { sleep } from './support/proc.js';

const binding = loadBinding();
const AGENT_SO = join(ROOT, 'build', 'Release', 'libwpsnap-agent.so');
const NATIVE = join(ROOT, 'build', 'Release', 'wpsnap_native.node');
const GOLDEN = 0x9e3779b97f4a7c15n;
const M64 = (1n << 64n) - 1n;
const MAGIC = 0x4147n << 48n;
const MARKER = { r12: 0x1212121212121212n, r13: 0x1313131313131313n, r14: 0x1414141414141414n, r15: 0x1515151515151515n };
const UFFDIO_REGISTER_MODE_WP = 2n;
const UFFD_FEATURE_WP_UNPOPULATED = 1n << 13n;

interface Region {
  writer: number;
  tid: number;
  base: bigint;
  pages: number;
  shared: boolean;
}
interface App {
  launched: Launched;
  pid: number;
  seed: bigint;
  counters: bigint;
  markerTid: number;
  markerLoop: bigint;
  markerEnd: bigint;
  regions: Region[];
}

let dir: string;
const launched: Launched[] = [];
const servers: AgentServer[] = [];

beforeAll(() => {
  buildFixtures();
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-agent-'));
});
afterEach(() => {
  for (const s of servers.splice(0)) s.close();
  killAll(launched.splice(0));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let sockets = 0;
function socketPath(): string {
  return join(dir, `run${++sockets}`, 'agent.sock');
}

function listen(path: string): AgentServer {
  const server = AgentServer.listen(binding, path);
  servers.push(server);
  return server;
}

async function startApp(kind: 'agentapp' | 'agentlinked', socket: string, args: string[] = [], extraEnv: string[] = []): Promise<App> {
  // Through env(1): the launcher's shell must not load the agent itself.
  const env = ['env', `WPSNAP_SOCKET=${socket}`, ...(kind === 'agentapp' ? [`LD_PRELOAD=${AGENT_SO}`] : []), ...extraEnv];
  const l = await launch([...env, join(FIXTURES_BUILD_DIR, kind), ...args], { name: kind });
  launched.push(l);
  const r = l.ready.json as Record<string, unknown>;
  const regions = (r['regions'] as Array<Record<string, unknown>>).map((g) => ({
    writer: g['writer'] as number,
    tid: g['tid'] as number,
    base: BigInt(g['base'] as string),
    pages: g['pages'] as number,
    shared: g['shared'] as boolean,
  }));
  return {
    launched: l,
    pid: l.pid,
    seed: BigInt(r['seed'] as number),
    counters: BigInt(r['counters'] as string),
    markerTid: r['markerTid'] as number,
    markerLoop: BigInt(r['markerLoop'] as string),
    markerEnd: BigInt(r['markerEnd'] as string),
    regions,
  };
}

function liveCounters(app: App): bigint[] {
  const page = binding.processVmRead(app.pid, app.counters, 4096);
  return app.regions.map((r) => page.readBigUInt64LE(64 * r.writer));
}

/** Word w of the page step s of writer q writes on page p (fixtures/agentapp.c). */
function stepPage(seed: bigint, q: number, s: bigint, p: number): Buffer {
  const key = mix64(seed ^ (BigInt(q + 1) << 56n));
  const h = mix64(key ^ ((s << 20n) & M64) ^ BigInt(p));
  const buf = Buffer.alloc(4096);
  buf.writeBigUInt64LE(MAGIC | (BigInt(q) << 40n) | BigInt(p), 0);
  buf.writeBigUInt64LE(s, 8);
  for (let w = 2; w < 512; w++) buf.writeBigUInt64LE(h ^ ((BigInt(w) * GOLDEN) & M64), 8 * w);
  return buf;
}

/**
 * Every page of writer region r as it must have been with counter c at T: steps
 * < c complete, step c possibly in progress on page c mod P (a prefix of its
 * content over what was there). The mismatches, described.
 */
function checkRegion(seed: bigint, r: Region, c: bigint, readPage: (address: bigint) => Buffer): string[] {
  const P = BigInt(r.pages);
  const zero = Buffer.alloc(4096);
  const wrong: string[] = [];
  for (let p = 0; p < r.pages; p++) {
    const got = readPage(r.base + BigInt(p) * 4096n);
    const pb = BigInt(p);
    const last = c - 1n >= pb ? pb + P * ((c - 1n - pb) / P) : -1n;
    const old = last >= 0n ? stepPage(seed, r.writer, last, p) : zero;
    if (c % P === pb) {
      const next = stepPage(seed, r.writer, c, p);
      let k = 0;
      while (k < 4096 && got[k] === next[k]) k += 8;
      k = Math.min(k, 4096);
      if (!got.subarray(k).equals(old.subarray(k))) wrong.push(`writer ${r.writer} page ${p}: neither step ${c} over step ${last} nor a prefix of it`);
    } else if (!got.equals(old)) {
      wrong.push(`writer ${r.writer} page ${p}: not step ${last} (word 1 = ${got.readBigUInt64LE(8)})`);
    }
  }
  return wrong;
}

/** The counters at T as a snapshot holds them, and every region checked against them. */
function checkApp(app: App, readPage: (address: bigint) => Buffer): { counters: bigint[]; mismatches: string[] } {
  const page = readPage(app.counters);
  const counters = app.regions.map((r) => page.readBigUInt64LE(64 * r.writer));
  const mismatches = app.regions.flatMap((r, i) => checkRegion(app.seed, r, counters[i]!, readPage));
  return { counters, mismatches };
}

function tasks(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => a - b);
}
function taskSyscall(pid: number, tid: number): string {
  return readFileSync(`/proc/${pid}/task/${tid}/syscall`, 'utf8').split(' ')[0]!;
}
function taskComm(pid: number, tid: number): string {
  return readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
}
/** The signals the process has a handler for (/proc's SigCgt): bit n-1 for signal n. */
function caughtSignals(pid: number): bigint {
  return BigInt(`0x${/SigCgt:\s*([0-9a-f]+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]!}`);
}
function userfaultfds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).filter((fd) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${fd}`) === 'anon_inode:[userfaultfd]';
    } catch {
      return false;
    }
  }).length;
}

async function until(what: string, ok: () => boolean, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(20);
  }
}

async function joinOne(server: AgentServer, refused: string[] = []): Promise<AgentMember> {
  const [member] = await server.waitForAgents(1, 10_000, (line) => refused.push(line));
  return member!;
}

describe('the agent socket', () => {
  it('is 0600 in a 0700 directory even under umask 0, and refuses a directory others can enter', () => {
    const path = socketPath();
    const old = process.umask(0);
    try {
      listen(path);
    } finally {
      process.umask(old);
    }
    expect(statSync(join(path, '..')).mode & 0o777).toBe(0o700);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(statSync(path).isSocket()).toBe(true);

    const open = join(dir, 'open');
    mkdirSync(open, { mode: 0o755 });
    const others = join(dir, 'others');
    mkdirSync(others, { mode: 0o700 });
    chownSync(others, 65534, 65534);
    for (const d of [open, others]) {
      expect(() => AgentServer.listen(binding, join(d, 'agent.sock'))).toThrow(expect.objectContaining({ code: 'EACCES', message: expect.stringMatching(/must be private to uid 0/) }));
      expect(readdirSync(d)).toEqual([]);
    }
  });

  it('takes an agent with its HELLO (pid as SO_PEERCRED says, comm), refuses and logs a stranger of another uid', async () => {
    const path = socketPath();
    const server = listen(path);
    // The stranger: uid 65534 with CAP_DAC_OVERRIDE kept only to reach the socket.
    const stranger = spawn(join(FIXTURES_BUILD_DIR, 'agentapp'), ['--stranger', path], { stdio: ['ignore', 'pipe', 'pipe'] });
    let strangerOut = '';
    stranger.stdout.on('data', (d: Buffer) => (strangerOut += d.toString()));
    const strangerExit = new Promise((resolve) => stranger.once('close', resolve));
    const refused: string[] = [];
    const waiting = server.waitForAgents(1, 10_000, (line) => refused.push(line));
    await until('the stranger refused', () => refused.length > 0, 5_000);
    const app = await startApp('agentapp', path);
    const [member] = await waiting;
    await strangerExit;

    expect(refused).toEqual([`refused an agent: pid ${stranger.pid} uid 65534 (only uid 0 and root may join)`]);
    expect(JSON.parse(strangerOut)).toEqual({ stranger: true, uid: 65534, closed: true });
    expect(member!.pid).toBe(app.pid);
    expect(member!.uid).toBe(0);
    expect(member!.comm).toBe('agentapp');
    expect(member!.linked).toBe(false);
  });
});

describe('FREEZE and THAW', () => {
  it('holds every thread with its registers, passes a working userfaultfd it keeps no copy of, and THAW lets them go (twice)', async () => {
    const path = socketPath();
    const server = listen(path);
    const app = await startApp('agentapp', path);
    const member = await joinOne(server);
    const pidfd = binding.pidfdOpen(app.pid);
    const attacher = member.attacher(binding, app.pid, pidfd);
    attacher.prepare();
    await sleep(50);
    try {
      const stopped = attacher.stop();
      const all = tasks(app.pid);
      expect(stopped.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(all);
      const service = all.filter((tid) => taskComm(app.pid, tid) === 'wpsnap-agent');
      expect(service).toHaveLength(1);
      // Every other thread waits on the agent's futex (syscall 202), and nothing advances.
      for (const tid of all) {
        if (tid === service[0]) continue;
        expect(taskSyscall(app.pid, tid)).toBe('202');
        expect(readFileSync(`/proc/${app.pid}/task/${tid}/stat`, 'utf8').split(') ')[1]![0]).toBe('S');
      }
      const held = liveCounters(app);
      await sleep(200);
      expect(liveCounters(app)).toEqual(held);

      const marker = stopped.threads.find((t) => t.tid === app.markerTid)!;
      const regs = decodeUserRegs(marker.regs)!;
      expect({ r12: regs.r12, r13: regs.r13, r14: regs.r14, r15: regs.r15 }).toEqual(MARKER);
      expect(regs.rip >= app.markerLoop && regs.rip <= app.markerEnd).toBe(true);
      expect(regs.cs).toBe(0x33n);
      expect(regs.ss).toBe(0x2bn);
      expect(regs.orig_rax).toBe(0xffffffffffffffffn);
      // SIGINT, SIGTERM (blocked by main before any thread) and the marker's own SIGUSR2.
      expect(marker.sigmask).toBe((1n << 1n) | (1n << 14n) | (1n << 11n));
      expect(marker.fpregs.length).toBe(512);
      expect(marker.xstate.length === 0 || marker.xstate.length >= 576).toBe(true);
      // fs_base is the thread's TLS: distinct per thread, inside the process.
      expect(new Set(stopped.threads.map((t) => decodeUserRegs(t.regs)!.fs_base)).size).toBe(all.length);

      // The default signal, SIGRTMAX-3 (61), has the agent's handler.
      expect((caughtSignals(app.pid) >> 60n) & 1n).toBe(1n);
      const { fd: uffd, method } = stopped.obtainUffd();
      expect(method).toBe('agent');
      expect(readlinkSync(`/proc/self/fd/${uffd}`)).toBe('anon_inode:[userfaultfd]');
      expect(userfaultfds(app.pid)).toBe(0);
      // The fd is bound to the app's mm: protect writer 0's region from here.
      const w0 = app.regions[0]!;
      const len = BigInt(w0.pages) * 4096n;
      binding.uffdApi(uffd, UFFD_FEATURE_WP_UNPOPULATED);
      binding.uffdRegister(uffd, w0.base, len, UFFDIO_REGISTER_MODE_WP);
      binding.uffdWriteProtect(uffd, w0.base, len, true);
      stopped.resume();
      // Writer 0 blocks on its next write; writer 1 runs on.
      await sleep(150);
      const a = liveCounters(app);
      await sleep(200);
      const b = liveCounters(app);
      expect(b[0]).toBe(a[0]);
      expect(b[1]! > a[1]!).toBe(true);
      // Blocked in its page fault, not in a syscall.
      expect(taskSyscall(app.pid, w0.tid)).toBe('-1');
      expect(readFileSync(`/proc/${app.pid}/task/${w0.tid}/stat`, 'utf8').split(') ')[1]![0]).toBe('S');
      binding.uffdWriteProtect(uffd, w0.base, len, false);
      await until('writer 0 writes again', () => liveCounters(app)[0]! > b[0]!, 1_000);
      binding.closeFd(uffd);

      // A second stop after the resume works the same (pre-protection stops twice).
      attacher.rearm();
      const again = attacher.stop();
      expect(again.threads.map((t) => t.tid).sort((x, y) => x - y)).toEqual(tasks(app.pid));
      const c1 = liveCounters(app);
      await sleep(100);
      expect(liveCounters(app)).toEqual(c1);
      again.resume(); // its userfaultfd, never taken, is closed here
      await until('every writer runs after the second thaw', () => liveCounters(app).every((c, i) => c > c1[i]!), 1_000);
      expect(userfaultfds(app.pid)).toBe(0);
    } finally {
      attacher.release();
      binding.closeFd(pidfd);
    }
  });

  it('a controller killed while the threads are held and protected lets them go within a second; the agent joins a later server', async () => {
    const path = socketPath();
    mkdirSync(join(path, '..'), { mode: 0o700 });
    const script = join(dir, 'controller.cjs');
    writeFileSync(
      script,
      `const b = require(${JSON.stringify(NATIVE)});
const [path, base, len] = [process.argv[2], BigInt(process.argv[3]), BigInt(process.argv[4])];
const lfd = b.agentListen(path);
console.log(JSON.stringify({ listening: true }));
let c = null;
for (const end = Date.now() + 10000; c === null && Date.now() < end; ) c = b.agentAccept(lfd, 100);
b.agentReceive(c.fd, 2000);
b.agentSend(c.fd, b.agentProtocol.ops.freeze, Buffer.alloc(8), 1000);
const frozen = b.agentReceive(c.fd, 4000);
b.uffdApi(frozen.fd, ${UFFD_FEATURE_WP_UNPOPULATED}n);
b.uffdRegister(frozen.fd, base, len, 2n);
b.uffdWriteProtect(frozen.fd, base, len, true);
console.log(JSON.stringify({ frozen: frozen.op }));
setInterval(() => {}, 1000);
`,
    );
    const app = await startApp('agentapp', path);
    const w0 = app.regions[0]!;
    const controller = spawn(process.execPath, [script, path, `${w0.base}`, `${BigInt(w0.pages) * 4096n}`], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    controller.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const gone = new Promise((resolve) => controller.once('exit', resolve));
    try {
      await until('the controller froze the app', () => out.includes('"frozen":3'), 10_000);
      const held = liveCounters(app);
      await sleep(200);
      expect(liveCounters(app)).toEqual(held);
      process.kill(controller.pid!, 'SIGKILL');
      await gone;
      const killedAt = Date.now();
      await until('every writer runs again', () => liveCounters(app).every((c, i) => c > held[i]!), 1_000);
      expect(Date.now() - killedAt).toBeLessThan(1_000);
      expect(userfaultfds(app.pid)).toBe(0);
    } finally {
      if (controller.exitCode === null && controller.signalCode === null) process.kill(controller.pid!, 'SIGKILL');
    }
    // The dead controller's socket is replaced; the agent finds the new server.
    const server = listen(path);
    const member = await joinOne(server);
    expect(member.pid).toBe(app.pid);
  });

  it('threads created and exiting all the time: the freeze holds exactly the threads that exist, none is created while held', async () => {
    const path = socketPath();
    const server = listen(path);
    const app = await startApp('agentapp', path, ['--churn']);
    const member = await joinOne(server);
    const attacher = member.attacher(binding, app.pid, -1);
    const churned = (): bigint => binding.processVmRead(app.pid, app.counters + 64n * 63n, 8).readBigUInt64LE(0);
    for (let round = 0; round < 20; round++) {
      const stopped = attacher.stop();
      try {
        expect(stopped.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(tasks(app.pid));
        const n = churned();
        await sleep(20);
        expect(churned()).toBe(n);
      } finally {
        stopped.resume();
      }
      await sleep(10);
    }
    expect(churned() > 0n).toBe(true);
  });

  it('a thread that blocks the agent signal fails the stop with ETIMEDOUT (ERROR from the agent), every other thread runs on', async () => {
    const path = socketPath();
    const server = listen(path);
    const app = await startApp('agentapp', path, ['--stubborn']);
    const member = await joinOne(server);
    const attacher = member.attacher(binding, app.pid, -1);
    const started = Date.now();
    let caught: unknown;
    try {
      attacher.stop();
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(WpsnapError);
    expect((caught as WpsnapError).code).toBe('ETIMEDOUT');
    expect((caught as WpsnapError).message).toMatch(new RegExp(`agent of pid ${app.pid} could not stop its threads: hold every thread`));
    expect(Date.now() - started).toBeLessThan(AGENT_FREEZE_TIMEOUT_MS + 1_000);
    const c = liveCounters(app);
    await until('every writer runs after the failed freeze', () => liveCounters(app).every((x, i) => x > c[i]!), 1_000);
    expect(userfaultfds(app.pid)).toBe(0);
  });

  it('an agent that never answers FREEZE fails the stop within its timeout, never hangs', async () => {
    const path = socketPath();
    const server = listen(path);
    // A fake agent: HELLO with its own pid, then silence.
    const fake = spawn(
      process.execPath,
      [
        '-e',
        `const h = Buffer.alloc(40); h.writeUInt32LE(0x47415057, 0); h.writeUInt16LE(1, 4); h.writeUInt16LE(1, 6); h.writeUInt32LE(24, 8);
         h.writeUInt32LE(process.pid, 16); h.write('silent', 24);
         const s = require('net').connect(process.argv[1], () => s.write(h)); s.on('error', () => {}); setInterval(() => {}, 1000);`,
        path,
      ],
      { stdio: 'ignore' },
    );
    try {
      const member = await joinOne(server);
      expect(member.pid).toBe(fake.pid);
      expect(member.comm).toBe('silent');
      const attacher = member.attacher(binding, fake.pid!, -1);
      const started = Date.now();
      expect(() => attacher.stop()).toThrow(expect.objectContaining({ code: 'ETIMEDOUT', message: expect.stringMatching(new RegExp(`agent of pid ${fake.pid}: FREEZE`)) }));
      const took = Date.now() - started;
      expect(took).toBeGreaterThanOrEqual(AGENT_FREEZE_TIMEOUT_MS);
      expect(took).toBeLessThan(AGENT_FREEZE_TIMEOUT_MS + 1_500);
      // The connection was closed: a second stop fails at once.
      expect(() => attacher.stop()).toThrow(/its connection failed earlier/);
    } finally {
      fake.kill('SIGKILL');
    }
  });

  it('an agent whose process died fails the stop as a target gone (ESRCH)', async () => {
    const path = socketPath();
    const server = listen(path);
    const app = await startApp('agentapp', path);
    const member = await joinOne(server);
    app.launched.signal('SIGKILL');
    await app.launched.exited;
    expect(() => member.attacher(binding, app.pid, -1).stop()).toThrow(expect.objectContaining({ code: 'ESRCH', kind: 'targetGone' }));
  });

  it('after DONE the agent waits for another server, not the same one', async () => {
    const path = socketPath();
    const first = listen(path);
    const app = await startApp('agentlinked', path, [], ['WPSNAP_AGENT_SIGNAL=40']);
    const member = await joinOne(first);
    expect(member.linked).toBe(true);
    expect(member.comm).toBe('agentlinked');
    // The signal WPSNAP_AGENT_SIGNAL names holds the threads, not the default SIGRTMAX-3 (61).
    const stopped = member.attacher(binding, app.pid, -1).stop();
    stopped.resume();
    expect(stopped.threads.map((t) => t.tid).sort((a, b) => a - b)).toEqual(tasks(app.pid));
    expect((caughtSignals(app.pid) >> 39n) & 1n).toBe(1n);
    expect((caughtSignals(app.pid) >> 60n) & 1n).toBe(0n);
    member.close();
    await expect(first.waitForAgents(1, 800)).rejects.toThrow(/0 of 1 agent joined/);
    first.close();
    const second = listen(path);
    expect((await joinOne(second)).pid).toBe(app.pid);
  });
});

describe('snapshots through the agent', () => {
  it('snapshotProcess with the agent attacher: every page exact at T, the marker thread registers stored (linked agent)', async () => {
    const path = socketPath();
    const server = listen(path);
    const app = await startApp('agentlinked', path, ['--pages', '64', '--shared-pages', '16']);
    const member = await joinOne(server);
    const store = Store.open(join(dir, 'single.db'));
    try {
      await sleep(100);
      const before = liveCounters(app);
      const result = await snapshotProcess(binding, store, app.pid, { attacher: member.attacher });
      expect(result.lostPages).toEqual([]);
      const processId = store.processes(result.id)[0]!.processId;
      const { counters, mismatches } = checkApp(app, (a) => store.readPage(processId, a));
      expect(mismatches).toEqual([]);
      counters.forEach((c, i) => expect(c >= before[i]!).toBe(true));
      // The writers ran on during the snapshot and their writes landed after T.
      await until('the writers pass T', () => liveCounters(app).every((c, i) => c > counters[i]!), 2_000);
      const marker = store.threads(processId).find((t) => t.tid === app.markerTid)!;
      const regs = decodeUserRegs(marker.regs)!;
      expect({ r12: regs.r12, r13: regs.r13, r14: regs.r14, r15: regs.r15 }).toEqual(MARKER);
      expect(store.threads(processId).map((t) => t.tid).sort((a, b) => a - b)).toEqual(tasks(app.pid));
      expect(userfaultfds(app.pid)).toBe(0);
    } finally {
      await store.close();
    }
  });

  it('wpsnap serve --expect 2: a preloaded and a linked agent snapshotted together, every page exact', async () => {
    const path = socketPath();
    const storePath = join(dir, 'serve.db');
    const serving = runCli(['serve', '--socket', path, '--expect', '2', '--timeout', '20', '--store', storePath, '--name', 'agents', '--json']);
    const apps = [await startApp('agentapp', path, ['--pages', '32']), await startApp('agentlinked', path, ['--pages', '32', '--seed', '7'])];
    const run = await serving;
    expect(run.stderr).toContain(`agent joined: pid ${apps[0]!.pid} (agentapp, preloaded, uid 0)`);
    expect(run.stderr).toContain(`agent joined: pid ${apps[1]!.pid} (agentlinked, linked, uid 0)`);
    expect(run.code).toBe(0);
    const result = JSON.parse(run.stdout) as { id: number; name: string; lostPages: unknown[]; processes: Array<{ pid: number; uffdMethod: string; exited: boolean }> };
    expect(result.name).toBe('agents');
    expect(result.lostPages).toEqual([]);
    expect(result.processes.map((p) => [p.pid, p.uffdMethod, p.exited]).sort()).toEqual(apps.map((a) => [a.pid, 'agent', false]).sort());
    const store = Store.open(storePath, { readonly: true });
    try {
      const processes = store.processes(result.id);
      for (const app of apps) {
        const processId = processes.find((p) => p.pid === app.pid)!.processId;
        expect(checkApp(app, (a) => store.readPage(processId, a)).mismatches).toEqual([]);
        // The registers the agent sent are the ones stored.
        const marker = decodeUserRegs(store.threads(processId).find((t) => t.tid === app.markerTid)!.regs)!;
        expect({ r12: marker.r12, r13: marker.r13, r14: marker.r14, r15: marker.r15 }).toEqual(MARKER);
        expect(marker.rip >= app.markerLoop && marker.rip <= app.markerEnd).toBe(true);
      }
    } finally {
      await store.close();
    }
    // The socket is gone; both apps run on and have no userfaultfd left.
    expect(() => statSync(path)).toThrow();
    for (const app of apps) expect(userfaultfds(app.pid)).toBe(0);
  });

  it('wpsnap serve: too few agents by the timeout is a one-line error, and the one that came is let go', async () => {
    const path = socketPath();
    const serving = runCli(['serve', '--socket', path, '--expect', '2', '--timeout', '2', '--store', join(dir, 'few.db')]);
    const app = await startApp('agentapp', path);
    const run = await serving;
    expect(run.code).toBe(1);
    expect(run.stderr).toMatch(/1 of 2 agents joined at .* within 2 s/);
    const c = liveCounters(app);
    await until('the app runs', () => liveCounters(app).every((x, i) => x > c[i]!), 1_000);
  });
});
