// Issue 7 item 1: pages the kernel writes through a long-term pin (an io_uring
// registered buffer) never fault under uffd-wp. fixtures/iouring_fixed.c keeps
// the kernel filling such a buffer; the content of every slot at T follows
// from the fixture's counter at T (read from the snapshot itself). Each pinned
// page must be exact (copied during the pause) or listed
// `pinned-kernel-writable`, never stored with what the kernel wrote after T.
// A ring hidden from /proc (fd registered and closed, rings in its own memory)
// cannot be placed: the snapshot must say so (VmPin), in the result, the
// stored stats, the CLI summary, `show` and `show --json`.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { parseRingFdinfo } from '../core/pinned.js';
import { snapshotProcess } from '../core/snapshot.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { Store } from '../store/store.js';
import { runCli } from './support/cli.js';
import { sleep } from './support/proc.js';
import { killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const binding = loadBinding();
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-pinned-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});
afterEach(() => {
  killDetached();
});

interface Ready {
  counter: bigint;
  buffer: bigint;
  slots: number;
}

async function startTarget(args: string[] = []): Promise<{ fixture: DetachedFixture; ready: Ready }> {
  const fixture = await startDetached('iouring_fixed', args);
  const r = fixture.ready;
  return { fixture, ready: { counter: BigInt(r['counter'] as string), buffer: BigInt(r['buffer'] as string), slots: r['slots'] as number } };
}

/** Record n as the fixture writes it: word i is ((n + 1) << 12) | i. */
function record(n: number): Buffer {
  const page = Buffer.alloc(PAGE_SIZE);
  for (let i = 0; i < PAGE_SIZE / 8; i++) page.writeBigUInt64LE((BigInt(n + 1) << 12n) | BigInt(i), i * 8);
  return page;
}

/** What slot k may hold at T, given the counter c at T: the last op m <= c into it (op c may not have landed yet). */
function allowed(k: number, c: number, slots: number): Buffer[] {
  const zero = Buffer.alloc(PAGE_SIZE);
  const m = c - ((((c - k) % slots) + slots) % slots);
  if (m < 0) return [zero];
  if (m < c) return [record(m)];
  return [record(m), m - slots >= 0 ? record(m - slots) : zero];
}

async function stopClean(fixture: DetachedFixture): Promise<void> {
  const { done } = await fixture.stop();
  expect(done).toMatchObject({ done: true, errors: 0 });
}

describe('pages the kernel writes through a long-term pin', () => {
  it('an io_uring fixed buffer the kernel keeps filling is stored as it was at T', async () => {
    const store = Store.open(join(dir, 'ring.db'));
    const { fixture, ready } = await startTarget();
    try {
      await sleep(100);
      // A slow sweep: the kernel rewrites every slot many times before the sweep reaches it.
      const result = await snapshotProcess(binding, store, fixture.pid, { rateBytesPerSec: 4 << 20 });
      expect(result.warnings).toEqual([]);
      const processId = store.processes(result.id)[0]!.processId;
      const c = Number(store.readPage(processId, ready.counter).readBigUInt64LE(0));
      const pinnedLost = store.lost(processId).filter((l) => l.reason === 'pinned-kernel-writable');
      const isLost = (a: bigint): boolean => pinnedLost.some((l) => a >= l.address && a < l.address + BigInt(l.pages * PAGE_SIZE));
      const wrong: string[] = [];
      let exact = 0;
      for (let k = 0; k < ready.slots; k++) {
        const address = ready.buffer + BigInt(k * PAGE_SIZE);
        if (isLost(address)) continue;
        const stored = store.readPage(processId, address);
        if (allowed(k, c, ready.slots).some((p) => p.equals(stored))) exact++;
        else wrong.push(`slot ${k}: word 0 is ${stored.readBigUInt64LE(0) >> 12n} - 1, counter at T ${c}`);
      }
      console.log(`[pinned] counter at T ${c}, ${exact} slots exact, ${pinnedLost.length} lost ranges, pause ${JSON.stringify(result.pauseBreakdownMicros)} µs`);
      expect(wrong, `${wrong.length} slot(s) silently wrong`).toEqual([]);
      expect(exact + pinnedLost.reduce((n, l) => n + l.pages, 0)).toBe(ready.slots);
      // The kernel went on writing after T (the test would prove nothing otherwise), and the target ran on.
      const now = Number(binding.processVmRead(fixture.pid, ready.counter, 8).readBigUInt64LE(0));
      expect(now).toBeGreaterThan(c + 10 * ready.slots);
      await stopClean(fixture);
    } finally {
      await store.close();
    }
  }, 60_000);

  it('pinned pages beyond what the pause may copy are listed pinned-kernel-writable, with a warning naming the kind', async () => {
    const store = Store.open(join(dir, 'budget.db'));
    const { fixture, ready } = await startTarget();
    try {
      const half = (ready.slots / 2) * PAGE_SIZE;
      const result = await snapshotProcess(binding, store, fixture.pid, { rateBytesPerSec: 4 << 20, maxPinnedCopyBytes: half });
      const processId = store.processes(result.id)[0]!.processId;
      const lost = store.lost(processId).filter((l) => l.reason === 'pinned-kernel-writable');
      // One registered buffer: it does not fit, so all of it is listed lost and nothing of it is stored.
      expect(lost).toEqual([{ address: ready.buffer, pages: ready.slots, reason: 'pinned-kernel-writable' }]);
      expect([...store.pagesInRange(processId, ready.buffer, ready.buffer + BigInt(ready.slots * PAGE_SIZE))]).toEqual([]);
      expect(result.warnings).toEqual([
        `${ready.slots} pages of an io_uring registered buffer (io_uring fd 3) at 0x${ready.buffer.toString(16)} listed lost pinned-kernel-writable: over the ${half} bytes the pause copies`,
      ]);
      expect(store.find(String(result.id)).stats?.warnings).toEqual(result.warnings);
      await stopClean(fixture);
    } finally {
      await store.close();
    }
  }, 60_000);

  // --fd-closed: the ring's fd is closed, only its mappings remain (they cannot be reopened);
  // --hidden: not even mapped (IORING_SETUP_NO_MMAP).
  it.each([['--fd-closed'], ['--hidden']])('a pin wpsnap cannot place (io_uring ring %s) is reported in the result, the stored stats, the summary and show', async (mode) => {
    const storePath = join(dir, `hidden${mode}.db`);
    const { fixture } = await startTarget([mode]);
    try {
      const vmPinWarning = /^VmPin is 256 kB but the io_uring buffers wpsnap found explain 0 kB: /;
      const run = await runCli(['snapshot', String(fixture.pid), '--store', storePath, '--name', 'hidden']);
      expect(run.code).toBe(0);
      const lines = run.stdout.split('\n');
      expect(lines).toContain('  no page listed lost, but see the warnings');
      expect(lines.filter((l) => l.startsWith('  WARNING: ')).map((l) => l.slice('  WARNING: '.length))).toEqual([
        expect.stringMatching(vmPinWarning),
      ]);
      const show = await runCli(['show', 'hidden', '--json', '--store', storePath]);
      expect(show.code).toBe(0);
      const warnings = (JSON.parse(show.stdout) as { stats: { warnings?: string[] } }).stats.warnings;
      expect(warnings).toEqual([expect.stringMatching(vmPinWarning)]);
      const text = await runCli(['show', 'hidden', '--store', storePath]);
      expect(text.stdout.split('\n')).toContain(`  WARNING: ${warnings![0]}`);

      const store = Store.open(storePath);
      try {
        const result = await snapshotProcess(binding, store, fixture.pid);
        expect(result.warnings).toEqual([expect.stringMatching(vmPinWarning)]);
        expect(store.find(String(result.id)).stats?.warnings).toEqual(result.warnings);
      } finally {
        await store.close();
      }
      await stopClean(fixture);
    } finally {
      fixture.kill();
    }
  }, 60_000);

  // io_uring/fdinfo.c takes the ring's lock with mutex_trylock: when it is busy, older kernels print
  // the UserBufs count without its entries, newer ones omit the section. Neither may read as "no buffers".
  it('reads the registered buffers of an io_uring fdinfo, and knows when the kernel left them out', () => {
    const head = 'pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t143531\nSqMask:\t0x3\n';
    expect(parseRingFdinfo(`${head}UserFiles:\t0\nUserBufs:\t2\n    0: 0x7f3335b1b000/262144\n    1: <none>\nPollList:\n`)).toEqual({
      ino: '143531',
      buffers: [[0x7f3335b1b000n, 262144n]],
    });
    expect(parseRingFdinfo(`${head}UserFiles:\t0\nUserBufs:\t0\nPollList:\n`)).toEqual({ ino: '143531', buffers: [] });
    expect(parseRingFdinfo(`${head}UserFiles:\t0\nUserBufs:\t2\nPollList:\n`).buffers).toBeUndefined();
    expect(parseRingFdinfo(head).buffers).toBeUndefined();
  });
});
