// Every thread's blocked signal mask: captured at the freeze, kept in the
// store (schema 5, all 64 bits), shown by the raw export, `show` and the ELF
// core's NT_PRSTATUS (pr_sighold), and set again by setThreadState. A fixture
// whose threads each block a known set (a real-time signal, SIGRTMAX at bit
// 63, everything, nothing) is snapshotted with the CLI; a store of schema 4
// reads its threads' masks as not recorded.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { freeze } from '../core/attach.js';
import { loadBinding } from '../core/binding.js';
import { NT_PRSTATUS } from '../snapshot-format/elf-core.js';
import { readRawManifest } from '../snapshot-format/export-raw.js';
import { MIGRATIONS, Store } from '../store/index.js';
import { fakeProcess, fakeThread } from '../store/testing.js';
import { runCli, runCliProcess } from './support/cli.js';
import { untraced } from './support/proc.js';
import { killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const bit = (signal: number): bigint => 1n << BigInt(signal - 1);
const SIGKILL = 9;
const SIGSTOP = 19;
/** glibc's SIGRTMIN (32 and 33 are its own) and the kernel's SIGRTMAX. */
const SIGRTMIN = 34;
const SIGRTMAX = 64;

interface FixtureThread {
  name: 'main' | 'rt' | 'high' | 'all' | 'none';
  tid: number;
  mask: bigint;
}

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-sigmask-'));
});

afterAll(() => {
  killDetached();
  rmSync(dir, { recursive: true, force: true });
});

async function startFixture(): Promise<{ fixture: DetachedFixture; threads: FixtureThread[] }> {
  const fixture = await startDetached('sigmasks');
  const threads = (fixture.ready['threads'] as Array<{ name: FixtureThread['name']; tid: number; mask: string }>).map((t) => ({
    name: t.name,
    tid: t.tid,
    mask: BigInt(t.mask),
  }));
  return { fixture, threads };
}

/** SigBlk of /proc/PID/task/TID/status. */
function sigBlk(pid: number, tid: number): bigint {
  const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
  return BigInt(`0x${/^SigBlk:\s+([0-9a-f]+)$/m.exec(status)![1]!}`);
}

/** pr_pid → pr_sighold (and pr_sigpend) of every NT_PRSTATUS note of an ELF64 core. */
function prStatusMasks(corePath: string): Map<number, { sighold: bigint; sigpend: bigint }> {
  const core = readFileSync(corePath);
  expect(core.subarray(0, 4).toString('latin1')).toBe('\x7fELF');
  const phoff = Number(core.readBigUInt64LE(32));
  const phentsize = core.readUInt16LE(54);
  const out = new Map<number, { sighold: bigint; sigpend: bigint }>();
  // The first program header is the PT_NOTE segment (FORMAT.md, "The core export").
  const note = phoff;
  expect(core.readUInt32LE(note)).toBe(4);
  expect(phentsize).toBe(56);
  const start = Number(core.readBigUInt64LE(note + 8));
  const end = start + Number(core.readBigUInt64LE(note + 32));
  const align4 = (n: number): number => (n + 3) & ~3;
  for (let at = start; at < end; ) {
    const namesz = core.readUInt32LE(at);
    const descsz = core.readUInt32LE(at + 4);
    const type = core.readUInt32LE(at + 8);
    const name = core.subarray(at + 12, at + 12 + namesz - 1).toString('latin1');
    const desc = at + 12 + align4(namesz);
    if (name === 'CORE' && type === NT_PRSTATUS) {
      // struct elf_prstatus: elf_siginfo (12), pr_cursig (2 + 2 padding), pr_sigpend at 16, pr_sighold at 24, pr_pid at 32.
      out.set(core.readInt32LE(desc + 32), { sigpend: core.readBigUInt64LE(desc + 16), sighold: core.readBigUInt64LE(desc + 24) });
    }
    at = desc + align4(descsz);
  }
  return out;
}

describe('a snapshot records every thread\'s blocked signals', () => {
  let fixture: DetachedFixture;
  let threads: FixtureThread[];
  let store: string;

  beforeAll(async () => {
    ({ fixture, threads } = await startFixture());
    store = join(dir, 'store.db');
    const snap = await runCliProcess(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'masks']);
    expect(snap.code, snap.stderr).toBe(0);
  });

  afterAll(async () => {
    await fixture.stop();
  });

  it('the fixture blocks what it says, a real-time signal and SIGRTMAX (bit 63) among them', () => {
    const by = Object.fromEntries(threads.map((t) => [t.name, t]));
    expect(Object.keys(by).sort()).toEqual(['all', 'high', 'main', 'none', 'rt']);
    for (const t of threads) expect(sigBlk(fixture.pid, t.tid), t.name).toBe(t.mask);
    expect(by['rt']!.mask).toBe(bit(10) | bit(SIGRTMIN + 5));
    expect(by['high']!.mask).toBe(bit(12) | bit(SIGRTMAX - 1) | bit(SIGRTMAX));
    expect(by['high']!.mask >> 63n).toBe(1n);
    // Every signal but SIGKILL and SIGSTOP, which the kernel never blocks.
    expect(by['all']!.mask).toBe(((1n << 64n) - 1n) & ~bit(SIGKILL) & ~bit(SIGSTOP));
    expect(by['none']!.mask).toBe(0n);
  });

  it('the store holds each thread\'s mask exactly', async () => {
    const s = Store.open(store, { readonly: true });
    try {
      const snapshot = s.find('masks');
      const [process] = s.processes(snapshot.id);
      const stored = s.threads(process!.processId);
      expect(stored.map((t) => t.tid).sort((a, b) => a - b)).toEqual(threads.map((t) => t.tid).sort((a, b) => a - b));
      for (const t of threads) {
        const record = stored.find((r) => r.tid === t.tid)!;
        expect(record.sigmask, `${t.name} (tid ${t.tid})`).toBe(t.mask);
      }
    } finally {
      await s.close();
    }
    // Bit 63 is the sign bit of SQLite's INTEGER: the column holds the two's complement.
    const db = new Database(store, { readonly: true });
    try {
      const high = threads.find((t) => t.name === 'high')!;
      const row = db.prepare('SELECT sigmask FROM threads WHERE tid = ?').safeIntegers(true).get(high.tid) as { sigmask: bigint };
      expect(row.sigmask).toBe(BigInt.asIntN(64, high.mask));
      expect(row.sigmask < 0n).toBe(true);
    } finally {
      db.close();
    }
  });

  it('the raw export lists each thread with its mask as 0x and 16 hex digits', async () => {
    const out = join(dir, 'raw');
    const run = await runCli(['export', 'masks', '--format', 'raw', '--out', out, '--json', '--store', store]);
    expect(run.code, run.stderr).toBe(0);
    const manifest = readRawManifest(out);
    const listed = manifest.processes[0]!.threads;
    expect(listed).toHaveLength(threads.length);
    for (const t of threads) {
      expect(listed.find((l) => l.tid === t.tid), t.name).toEqual({
        tid: t.tid,
        name: expect.any(String),
        sigmask: `0x${t.mask.toString(16).padStart(16, '0')}`,
      });
    }
    expect(listed.find((l) => l.tid === threads.find((t) => t.name === 'high')!.tid)!.sigmask).toBe('0xc000000000000800');
  });

  it('the core export puts each mask in its thread\'s NT_PRSTATUS pr_sighold, pr_sigpend 0', async () => {
    const core = join(dir, 'masks.core');
    const run = await runCli(['export', 'masks', '--format', 'core', '--out', core, '--json', '--store', store]);
    expect(run.code, run.stderr).toBe(0);
    const notes = prStatusMasks(core);
    expect([...notes.keys()].sort((a, b) => a - b)).toEqual(threads.map((t) => t.tid).sort((a, b) => a - b));
    for (const t of threads) expect(notes.get(t.tid), `${t.name} (tid ${t.tid})`).toEqual({ sighold: t.mask, sigpend: 0n });
  });

  it('show --json gives each thread its mask', async () => {
    const run = await runCli(['show', 'masks', '--json', '--store', store]);
    expect(run.code, run.stderr).toBe(0);
    const shown = JSON.parse(run.stdout) as { processes: Array<{ threads: Array<{ tid: number; sigmask: string | null }> }> };
    for (const t of threads) {
      expect(shown.processes[0]!.threads.find((s) => s.tid === t.tid)!.sigmask, t.name).toBe(`0x${t.mask.toString(16).padStart(16, '0')}`);
    }
    const text = await runCli(['show', 'masks', '--store', store]);
    expect(text.stdout).toContain(`${threads.find((t) => t.name === 'high')!.tid} `);
    expect(text.stdout).toMatch(/blocked 0xc000000000000800/);
  });
});

describe('stores of schema 4', () => {
  it('read their threads\' masks as not recorded, never as 0; new rows keep all 64 bits', async () => {
    const path = join(dir, 'v4.db');
    const v4 = Store.open(path, { migrations: MIGRATIONS.slice(0, 4) });
    const old = v4.beginSnapshot({ name: 'old' });
    const oldProcess = old.addProcess(fakeProcess(4242));
    old.addThreads(oldProcess, [fakeThread(4242), fakeThread(4243)]);
    await old.complete(STATS);
    await v4.close();

    const v5 = Store.open(path);
    try {
      const db = (v5 as unknown as { db: Database.Database }).db;
      expect((db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string }).value).toBe(String(MIGRATIONS.length));
      const before = v5.threads(v5.processes(v5.find('old').id)[0]!.processId);
      expect(before.map((t) => t.tid)).toEqual([4242, 4243]);
      for (const t of before) {
        expect(t).not.toHaveProperty('sigmask');
        expect(t).toEqual(fakeThread(t.tid));
      }

      const next = v5.beginSnapshot({ name: 'new' });
      const processId = next.addProcess(fakeProcess(4244));
      const masks = [0n, bit(SIGRTMAX), (1n << 64n) - 1n, bit(SIGRTMIN + 5) | bit(1)];
      next.addThreads(processId, [
        ...masks.map((sigmask, i) => ({ ...fakeThread(5000 + i), sigmask })),
        fakeThread(5100), // one of another source that recorded none
      ]);
      await next.complete(STATS);
      const after = v5.threads(processId);
      expect(after.map((t) => t.sigmask)).toEqual([...masks, undefined]);
      expect(after[4]).not.toHaveProperty('sigmask');

      const bad = v5.beginSnapshot({});
      const badProcess = bad.addProcess(fakeProcess(4245));
      for (const sigmask of [-1n, 1n << 64n]) {
        expect(() => bad.addThreads(badProcess, [{ ...fakeThread(1), sigmask }])).toThrow(expect.objectContaining({ code: 'INVALID_PROCESS' }));
      }
    } finally {
      await v5.close();
    }

    // The exports and show say null, not "0x0…".
    const out = join(dir, 'v4-raw');
    const raw = await runCli(['export', 'old', '--format', 'raw', '--out', out, '--json', '--store', path]);
    expect(raw.code, raw.stderr).toBe(0);
    expect(readRawManifest(out).processes[0]!.threads).toEqual([
      { tid: 4242, name: 'thread-4242', sigmask: null },
      { tid: 4243, name: 'thread-4243', sigmask: null },
    ]);
    const shown = await runCli(['show', 'old', '--json', '--store', path]);
    expect(shown.code, shown.stderr).toBe(0);
    const doc = JSON.parse(shown.stdout) as { processes: Array<{ threads: Array<{ sigmask: string | null }> }> };
    expect(doc.processes[0]!.threads.map((t) => t.sigmask)).toEqual([null, null]);
  });
});

describe('setThreadState with a sigmask', () => {
  afterEach(() => {
    killDetached();
  });

  it('gives a frozen thread the new mask, exactly as /proc shows it after the thaw; without one the mask stays', async () => {
    const B = loadBinding();
    const { fixture, threads } = await startFixture();
    const named = (name: FixtureThread['name']): FixtureThread => threads.find((t) => t.name === name)!;
    B.prepareFreeze();
    const frozen = freeze(B, fixture.pid);
    let thawed = false;
    try {
      // Captured at the freeze, as the fixture reported them.
      for (const t of threads) expect(frozen.threads.find((f) => f.tid === t.tid)!.sigmask, t.name).toBe(t.mask);
      const state = (tid: number): { regs: Buffer; fpregs: Buffer; xstate: Buffer } => {
        const t = frozen.threads.find((f) => f.tid === tid)!;
        return { regs: t.regs, fpregs: t.fpregs, xstate: t.xstate };
      };
      // none blocked nothing: now SIGRTMAX (bit 63), SIGRTMIN+5, SIGUSR2 and SIGHUP.
      const fresh = bit(SIGRTMAX) | bit(SIGRTMIN + 5) | bit(12) | bit(1);
      B.setThreadState(frozen.handle, named('none').tid, { ...state(named('none').tid), sigmask: fresh });
      // all blocked everything: now nothing.
      B.setThreadState(frozen.handle, named('all').tid, { ...state(named('all').tid), sigmask: 0n });
      // rt: SIGKILL and SIGSTOP asked for too, which the kernel drops.
      B.setThreadState(frozen.handle, named('rt').tid, { ...state(named('rt').tid), sigmask: bit(SIGKILL) | bit(SIGSTOP) | bit(SIGRTMAX - 1) });
      // high: registers only, its mask stays.
      B.setThreadState(frozen.handle, named('high').tid, state(named('high').tid));
      // Not a 64-bit mask: refused before anything is sent.
      for (const sigmask of [-1n, 1n << 64n, 5]) {
        expect(() => B.setThreadState(frozen.handle, named('main').tid, { ...state(named('main').tid), sigmask: sigmask as bigint })).toThrow(TypeError);
      }
      B.thaw(frozen.handle);
      thawed = true;
      await untraced(fixture.pid);
      expect(sigBlk(fixture.pid, named('none').tid)).toBe(fresh);
      expect(sigBlk(fixture.pid, named('all').tid)).toBe(0n);
      expect(sigBlk(fixture.pid, named('rt').tid)).toBe(bit(SIGRTMAX - 1));
      expect(sigBlk(fixture.pid, named('high').tid)).toBe(named('high').mask);
      expect(sigBlk(fixture.pid, named('main').tid)).toBe(named('main').mask);
      // And it runs on: SIGTERM's handler still ends it cleanly.
      const { done } = await fixture.stop();
      expect(done).toMatchObject({ done: true });
    } finally {
      if (!thawed) B.thaw(frozen.handle);
    }
  });
});
