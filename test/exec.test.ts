// Issue 7 item 6: a target that calls exec, or exits, during a snapshot. Both
// end the same way: the snapshot is recorded incomplete with a reason naming
// what happened, the error is "target gone" (exit code 4), the unsaved pages
// are listed lost target-exec / target-exited, and no page of the new image is
// stored (fixtures/execer.c maps the same addresses again after its exec, with
// other content: every stored page must still be the old image's).
import { exitCodeFor } from '../cli/exit-codes.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import { WpsnapError } from '../common/errors.js';
import { snapshotProcess } from '../core/snapshot.js';
import { Store } from '../store/store.js';
import { runCli } from './support/cli.js';
import { startFixture, type FixtureProcess } from './support/oracle.js';

const binding = loadBinding();
const PAGE = 4096;
const OLD_MAGIC = 0x01d01d01d01d0000n;
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-exec-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** The real binding, but the target gets SIGUSR1 (exec or exit) as soon as the engine gets its regions: in the pause, handled after T. */
function signalAtEngineStart(pid: number): NativeBinding {
  return {
    ...binding,
    engineRun: (handle, options) => {
      binding.engineRun(handle, options);
      process.kill(pid, 'SIGUSR1');
    },
  };
}

function storedReason(path: string): { state: string; reason: string | null } {
  const db = new Database(path, { readonly: true });
  try {
    return db.prepare('SELECT state, reason FROM snapshots ORDER BY id DESC LIMIT 1').get() as { state: string; reason: string | null };
  } finally {
    db.close();
  }
}

/** Every page of the fixture's region is stored with the OLD image's content, or listed lost for `reason`. */
function expectOldImageOnly(store: Store, f: FixtureProcess, reason: string): { stored: number; lost: number } {
  const base = BigInt(f.ready['base'] as string);
  const pages = f.ready['pages'] as number;
  const processId = store.processes(1)[0]!.processId;
  const stored = new Map<bigint, Buffer>();
  for (const { address, data } of store.pagesInRange(processId, base, base + BigInt(pages * PAGE))) stored.set(address, Buffer.from(data));
  const lost = store.lost(processId).filter((l) => l.address < base + BigInt(pages * PAGE) && l.address + BigInt(l.pages * PAGE) > base);
  const lostAt = (a: bigint): string | undefined => lost.find((l) => a >= l.address && a < l.address + BigInt(l.pages * PAGE))?.reason;
  const wrong: string[] = [];
  let lostPages = 0;
  for (let p = 0; p < pages; p++) {
    const address = base + BigInt(p * PAGE);
    const data = stored.get(address);
    const why = lostAt(address);
    if (data === undefined) {
      if (why === reason) lostPages++;
      else wrong.push(`page ${p}: not stored, lost ${why ?? 'nowhere'}`);
      continue;
    }
    const want = OLD_MAGIC ^ BigInt(p);
    for (let w = 0; w < PAGE / 8; w += 64) {
      if (data.readBigUInt64LE(w * 8) !== want) {
        wrong.push(`page ${p}: word ${w} is 0x${data.readBigUInt64LE(w * 8).toString(16)}`);
        break;
      }
    }
  }
  expect(wrong.slice(0, 5)).toEqual([]);
  return { stored: stored.size, lost: lostPages };
}

/** The snapshot's error (null if it succeeded); the caller checks it and kills the fixture whatever happens. */
async function snapshotUntilGone(f: FixtureProcess, store: Store): Promise<WpsnapError> {
  const error = await snapshotProcess(signalAtEngineStart(f.pid), store, f.pid, { rateBytesPerSec: 8 << 20 }).then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(WpsnapError);
  return error as WpsnapError;
}

describe('a target that execs or exits during the snapshot', () => {
  it.each([
    ['the new image maps the same addresses again', []],
    ['nothing is mapped where the old image was (every read fails)', ['--bare-exec']],
  ])('exec (%s): incomplete, target gone (exit code 4), reason names exec, no page of the new image stored', async (_what, extra) => {
    const f = await startFixture('execer', ['--mib', '64', ...extra]);
    const path = join(dir, `exec${extra.length}.db`);
    const store = Store.open(path);
    try {
      const error = await snapshotUntilGone(f, store);
      expect(error.message).toMatch(/target called exec during the snapshot/);
      expect(exitCodeFor(error)).toBe(4);
      expect(await f.nextLine()).toEqual({ execed: true });
      expect(store.find('1').state).toBe('incomplete');
      const counts = expectOldImageOnly(store, f, 'target-exec');
      console.log(`[exec] ${counts.stored} pages stored before the exec, ${counts.lost} lost target-exec`);
      expect(counts.lost).toBeGreaterThan(0);
      expect(store.lost(store.processes(1)[0]!.processId).every((l) => l.reason === 'target-exec')).toBe(true);
    } finally {
      await store.close();
      f.child.kill('SIGKILL');
    }
    expect(storedReason(path)).toEqual({ state: 'incomplete', reason: expect.stringMatching(/target called exec/) });
  }, 60_000);

  it('exit: incomplete, target gone (exit code 4), reason names the exit', async () => {
    const f = await startFixture('execer', ['--mib', '64', '--exit']);
    const path = join(dir, 'exit.db');
    const store = Store.open(path);
    try {
      const error = await snapshotUntilGone(f, store);
      expect(error.message).toMatch(/target exited during the snapshot/);
      expect(exitCodeFor(error)).toBe(4);
      expect(store.find('1').state).toBe('incomplete');
      const counts = expectOldImageOnly(store, f, 'target-exited');
      expect(counts.lost).toBeGreaterThan(0);
    } finally {
      await store.close();
      f.child.kill('SIGKILL');
    }
    expect(storedReason(path)).toEqual({ state: 'incomplete', reason: expect.stringMatching(/target exited/) });
  }, 60_000);

  it('the CLI exits 4 with one line that says the target called exec', async () => {
    const f = await startFixture('execer', ['--mib', '64']);
    try {
      const run = await runCli(['snapshot', String(f.pid), '--store', join(dir, 'cli.db'), '--rate', '8'], { binding: () => signalAtEngineStart(f.pid) });
      expect(run.code).toBe(4);
      expect(run.stderr.trim().split('\n')).toHaveLength(1);
      expect(run.stderr).toMatch(/target called exec during the snapshot/);
    } finally {
      f.child.kill('SIGKILL');
    }
  }, 60_000);
});
