// Fast tier: the snapshot path's TypeScript (pause cleanup, errors,
// interruption, the store pipeline) against a scripted fake binding and a
// fake attacher. No root, no ptrace, no userfaultfd: the target is a real
// sleeping python whose /proc entries are read and nothing else.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { exitCodeFor } from '../../cli/exit-codes.js';
import { WpsnapError } from '../../common/errors.js';
import { snapshotProcess } from '../../core/snapshot.js';
import type { SnapshotSink, SnapshotTarget } from '../../core/sink.js';
import { Store } from '../../store/index.js';
import { FAKE_UFFD, FakeKernel, fakePageContent, nativeError, type FakeScript } from '../support/fake-binding.js';

let target: ChildProcess;
let dir: string;
let store: Store;

beforeAll(async () => {
  // A 4 MiB anonymous mapping (one the sparse rule considers) and a sleep.
  target = spawn('python3', ['-c', 'import sys, time; b = bytearray(4 << 20); print("ready", flush=True); time.sleep(600)'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve) => target.stdout!.once('data', resolve));
});
afterAll(() => {
  target.kill('SIGKILL');
});
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-fast-'));
  store = Store.open(join(dir, 'store.db'));
});
afterEach(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

function run(script: FakeScript, options: { signal?: AbortSignal } = {}) {
  const kernel = new FakeKernel(script);
  // Pre-protection is the real kernel's business (test/impact.test.ts, test/races.test.ts); here, the pause.
  const result = snapshotProcess(kernel.binding(), store, target.pid!, { attacher: kernel.attacher(), preProtect: false, ...options });
  return { kernel, result };
}

describe('a snapshot through a scripted kernel', () => {
  it('reports the phase: saving while the engine runs, then compressing while batches are still being stored', async () => {
    // A sink that takes 200 ms per batch: the engine is done long before the store.
    const slow: SnapshotTarget = {
      beginSnapshot: (options) => {
        const sink = store.beginSnapshot(options);
        return new Proxy(sink, {
          get(target, key: keyof SnapshotSink) {
            if (key === 'addPages') {
              return async (processId: number, batch: Parameters<SnapshotSink['addPages']>[1]) => {
                await new Promise((resolve) => setTimeout(resolve, 200));
                return target.addPages(processId, batch);
              };
            }
            const value = target[key];
            return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
          },
        });
      },
    };
    const kernel = new FakeKernel({ pagesPerRegion: 3 });
    const seen: Array<{ phase: string; batchesPending: number }> = [];
    const r = await snapshotProcess(kernel.binding(), slow, target.pid!, {
      attacher: kernel.attacher(),
      preProtect: false,
      onProgress: (p) => seen.push({ phase: p.phase, batchesPending: p.batchesPending }),
    });
    const compressing = seen.filter((p) => p.phase === 'compressing');
    expect(compressing.length).toBeGreaterThan(0);
    expect(compressing[0]!.batchesPending).toBeGreaterThan(0);
    // Never back to saving once compressing began.
    expect(seen.slice(seen.findIndex((p) => p.phase === 'compressing')).every((p) => p.phase === 'compressing')).toBe(true);
    expect(store.find(String(r.id)).state).toBe('complete');
  });

  it('stores every page the engine hands over, exactly, and completes', async () => {
    const { kernel, result } = run({ pagesPerRegion: 3 });
    const r = await result;
    expect(r.pid).toBe(target.pid);
    expect(kernel.stops).toBe(1);
    expect(kernel.resumes).toBe(1);
    const regions = kernel.calls.engineStarts[0]!.regions;
    expect(regions.length).toBeGreaterThan(0);
    // Everything registered was write-protected, whole (nothing is sparse: every run is populated).
    expect(kernel.calls.registered).toEqual(regions.map((g) => g.start));
    expect(kernel.calls.protectedRanges).toEqual(regions.flatMap((g) => [g.start, g.end - g.start]));
    const summary = store.find(String(r.id));
    expect(summary.state).toBe('complete');
    const [proc] = store.processes(r.id);
    for (const region of regions) {
      for (let i = 0n; i < 3n; i++) {
        const address = region.start + i * 4096n;
        if (address >= region.end) break;
        expect(store.readPage(proc!.processId, address).equals(fakePageContent(address))).toBe(true);
      }
    }
    const expected = regions.reduce((sum, g) => sum + Math.min(3, Number((g.end - g.start) / 4096n)), 0);
    expect(r.pagesSaved).toBe(expected);
    expect(kernel.calls.released).toHaveLength(regions.length);
    expect(Object.keys(r.pauseBreakdownMicros).sort()).toEqual(['copy', 'engine', 'freeze', 'inject', 'plan', 'protect', 'restoreState', 'thaw']);
    // The userfaultfd is closed once every page is saved.
    expect(kernel.calls.closed).toContain(FAKE_UFFD);
  });

  it('a sparse mapping is protected only where populated, the rest handed to the engine as zero', async () => {
    const { kernel, result } = run({
      // Every range: one populated page at its start.
      populated: (start) => [[start, start + 4096n]],
    });
    await result;
    const regions = kernel.calls.engineStarts[0]!.regions;
    const sparse = regions.filter((g) => g.zeroRanges !== undefined);
    expect(sparse.length).toBeGreaterThan(0);
    for (const g of sparse) {
      expect(g.end - g.start).toBeGreaterThanOrEqual(1n << 20n);
      expect([...g.zeroRanges!]).toEqual([g.start + 4096n, g.end]);
      const at = kernel.calls.protectedRanges.indexOf(g.start);
      expect(kernel.calls.protectedRanges[at + 1]).toBe(4096n);
    }
  });
});

describe('failures leave the target running and the store openable', () => {
  it('a registration that fails mid-pause: the target resumes once, the userfaultfd is closed, the snapshot is incomplete', async () => {
    let first: bigint | undefined;
    const { kernel, result } = run({
      registerError: (start) => {
        first ??= start;
        return start !== first ? nativeError('ENOMEM', 12, 'ioctl') : undefined;
      },
    });
    const error = (await result.catch((e: unknown) => e)) as WpsnapError;
    expect(error).toBeInstanceOf(WpsnapError);
    expect(error.code).toBe('ENOMEM');
    expect(error.message).toMatch(/^register 0x[0-9a-f]+-0x[0-9a-f]+: ioctl: ENOMEM$/);
    expect(kernel.resumes).toBe(1);
    expect(kernel.calls.closed).toContain(FAKE_UFFD);
    expect(kernel.calls.engineStarts).toHaveLength(0);
    const [row] = store.list();
    expect(row!.state).toBe('incomplete');
  });

  it('EBUSY (another userfaultfd owns a mapping) is one line that says so', async () => {
    const { kernel, result } = run({ registerError: () => nativeError('EBUSY', 16, 'ioctl') });
    const error = (await result.catch((e: unknown) => e)) as WpsnapError;
    expect(error.code).toBe('EBUSY');
    expect(error.message).toContain('already registered with another userfaultfd');
    expect(error.message).not.toContain('\n');
    expect(kernel.resumes).toBe(1);
  });

  it('an interrupt stops the engine: INTERRUPTED, exit 130, the pages it lost recorded, the snapshot incomplete', async () => {
    const controller = new AbortController();
    const { kernel, result } = run({ engineHangs: true }, { signal: controller.signal });
    setTimeout(() => controller.abort(), 20);
    const error = (await result.catch((e: unknown) => e)) as WpsnapError;
    expect(error.code).toBe('INTERRUPTED');
    expect(exitCodeFor(error)).toBe(130);
    expect(kernel.calls.engineStops).toBeGreaterThan(0);
    const [row] = store.list();
    expect(row!.state).toBe('incomplete');
    const [proc] = store.processes(row!.id);
    expect(store.lost(proc!.processId).every((l) => l.reason === 'interrupted')).toBe(true);
    expect(store.lost(proc!.processId).length).toBe(kernel.calls.engineStarts[0]!.regions.length);
  });

  it('the engine failing (target gone) ends in exit 4 and an incomplete snapshot', async () => {
    const { result } = run({ engineError: nativeError('ESRCH', 3, 'process_vm_readv') });
    const error = (await result.catch((e: unknown) => e)) as WpsnapError;
    expect(error.code).toBe('ESRCH');
    expect(exitCodeFor(error)).toBe(4);
    expect(store.list()[0]!.state).toBe('incomplete');
  });

  it('the store refusing a batch stops the engine and fails the snapshot; the store stays usable', async () => {
    const { kernel, result } = run({ badBatch: true, engineHangs: true });
    const error = (await result.catch((e: unknown) => e)) as WpsnapError;
    expect(error.code).toBe('INVALID_BATCH');
    expect(kernel.calls.engineStops).toBeGreaterThan(0);
    expect(store.list()[0]!.state).toBe('incomplete');
    // A later snapshot into the same store works.
    const again = await run({ pagesPerRegion: 1 }).result;
    expect(store.find(String(again.id)).state).toBe('complete');
  });
});

describe('populated runs from PAGEMAP_SCAN', () => {
  it('runs reported twice or out of order never make a zero range over populated pages', async () => {
    const { normalizeRuns } = await import('../../core/sparse.js');
    const P = 0x1000n;
    const base = 0x7f0000000000n;
    // What a scan continued from a walk_end below its last region returned: the tail again, out of order.
    const reported: Array<[bigint, bigint]> = [
      [base + 2n * P, base + 3n * P],
      [base + 10n * P, base + 12n * P],
      [base + 20n * P, base + 21n * P],
      [base + 10n * P, base + 12n * P],
      [base + 11n * P, base + 13n * P],
      [base + 20n * P, base + 21n * P],
      [base - P, base + P],
      [base + 63n * P, base + 70n * P],
    ];
    expect(normalizeRuns(reported, base, base + 64n * P)).toEqual([
      [base, base + P],
      [base + 2n * P, base + 3n * P],
      [base + 10n * P, base + 13n * P],
      [base + 20n * P, base + 21n * P],
      [base + 63n * P, base + 64n * P],
    ]);
  });

  it('a sparse mapping whose scan repeats runs gets the exact complement as zero ranges', async () => {
    const P = 0x1000n;
    const { kernel, result } = run({
      // Two populated pages at the start, reported three times and out of order.
      populated: (start) => [
        [start + 4n * P, start + 5n * P],
        [start, start + P],
        [start + 4n * P, start + 5n * P],
        [start, start + P],
      ],
    });
    await result;
    const sparse = kernel.calls.engineStarts[0]!.regions.filter((g) => g.zeroRanges !== undefined);
    expect(sparse.length).toBeGreaterThan(0);
    for (const g of sparse) expect([...g.zeroRanges!]).toEqual([g.start + P, g.start + 4n * P, g.start + 5n * P, g.end]);
  });
});
