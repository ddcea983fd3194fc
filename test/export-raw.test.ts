// Raw export of a synthetic snapshot: exact sizes and bytes per region, sparse
// files, file-backed regions overlaid with their copy-on-write pages, and
// detection of a referenced file that changed since T.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { exportRaw, readRawManifest } from '../snapshot-format/export-raw.js';
import { PAGE_SIZE, type FileReference, type PageBatch } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, fakeRegion, fillPage, heapBatch } from '../store/testing.js';
import { runCli, runCliProcess } from './support/cli.js';
import { exitCodeFor } from '../cli/exit-codes.js';
import type { WpsnapError } from '../common/errors.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const HEAP = 0x5555a0000000n;
const LIB = 0x7f3300000000n;
const VDSO = 0x7ffff7fc0000n;
const PID = 4321;

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-export-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

function page(kind: 'random' | 'pointers', seed: number): Buffer {
  const data = Buffer.alloc(PAGE_SIZE);
  fillPage(data, kind, seed);
  return data;
}

function batch(entries: Array<[bigint, Buffer]>): PageBatch {
  const data = new Uint8Array(entries.length * PAGE_SIZE);
  entries.forEach(([, bytes], i) => data.set(bytes, i * PAGE_SIZE));
  return { addresses: BigUint64Array.from(entries.map(([address]) => address)), data };
}

function reference(path: string): FileReference {
  const st = statSync(path, { bigint: true });
  return { path, dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: st.mtimeNs.toString() };
}

interface Fixture {
  store: Store;
  snapshot: number;
  libFile: string;
  libBytes: Buffer;
  heapPages: Map<number, Buffer>;
  cowPage: Buffer;
}

/**
 * heap: 16 pages, protected: pages 1, 2, 9 stored (2 a duplicate of 1), page 5 zero-stored, 12-13 lost.
 * lib:  8 pages, file-private at file offset 4096 of a 22,528-byte file (so 4.5 pages
 *       of file, then zeros); page 2 is a saved copy-on-write page.
 * vdso: skipped.
 */
async function makeSnapshot(dir: string, complete = true): Promise<Fixture> {
  const libFile = join(dir, 'libfake.so');
  const libBytes = Buffer.alloc(22_528);
  for (let i = 0; i < libBytes.length; i += 8) libBytes.writeUInt32LE(0xc0de0000 + i, i);
  writeFileSync(libFile, libBytes);
  const store = Store.open(join(dir, 'store.db'));
  const writer = store.beginSnapshot({ name: complete ? 'snap' : 'partial' });
  const pid = writer.addProcess(fakeProcess(PID));
  writer.addRegions(pid, [
    fakeRegion(HEAP, HEAP + 16n * 4096n, { path: '[heap]' }),
    fakeRegion(LIB, LIB + 8n * 4096n, {
      perms: 'rw-p',
      capture: 'file-private',
      offset: 4096n,
      path: libFile,
      inode: Number(statSync(libFile).ino),
      file: reference(libFile),
    }),
    fakeRegion(VDSO, VDSO + 2n * 4096n, { perms: 'r-xp', path: '[vvar]', capture: 'skipped', skipReason: '[vvar] cannot be read' }),
  ]);
  const heapPages = new Map<number, Buffer>([
    [1, page('random', 1)],
    [2, page('random', 1)],
    [9, page('pointers', 9)],
  ]);
  const cowPage = page('pointers', 1234);
  await writer.addPages(
    pid,
    batch([
      [HEAP + 1n * 4096n, heapPages.get(1) as Buffer],
      [HEAP + 2n * 4096n, heapPages.get(2) as Buffer],
      [HEAP + 5n * 4096n, Buffer.alloc(PAGE_SIZE)],
      [LIB + 2n * 4096n, cowPage],
    ]),
  );
  await writer.addPages(pid, batch([[HEAP + 9n * 4096n, heapPages.get(9) as Buffer]]));
  writer.addLost(pid, [{ address: HEAP + 12n * 4096n, pages: 2, reason: 'unmapped-before-saved' }]);
  if (complete) await writer.complete(STATS);
  else await writer.abort('test interruption');
  return { store, snapshot: writer.id, libFile, libBytes, heapPages, cowPage };
}

describe('exportRaw', () => {
  it('writes each region byte-exact, sparse, with a manifest', async () => {
    const dir = join(root, 'exact');
    mkdirSync(dir);
    const fx = await makeSnapshot(dir);
    const out = join(dir, 'out');
    const result = await exportRaw(fx.store, 'snap', out);
    expect(result).toMatchObject({ snapshot: fx.snapshot, files: 2, bytes: 24 * 4096, pagesStored: 4, lostPages: 2 });

    const manifest = readRawManifest(out);
    expect(manifest).toMatchObject({ snapshot: fx.snapshot, state: 'complete', name: 'snap' });
    expect(manifest.processes).toHaveLength(1);
    const [heap, lib, vdso] = manifest.processes[0]?.regions ?? [];
    expect(manifest.processes[0]?.pid).toBe(PID);
    expect(heap).toEqual({
      start: '0x5555a0000000',
      end: '0x5555a0010000',
      perms: 'rw-p',
      offset: 0,
      path: '[heap]',
      file: `${PID}/5555a0000000-5555a0010000.bin`,
      capture: 'protected',
      lost: [{ address: '0x5555a000c000', pages: 2, reason: 'unmapped-before-saved' }],
    });
    expect(lib).toMatchObject({ file: `${PID}/7f3300000000-7f3300008000.bin`, capture: 'file-private', offset: 4096, lost: [] });
    expect(vdso).toMatchObject({ file: null, capture: 'skipped', skipReason: '[vvar] cannot be read', lost: [] });
    expect(existsSync(join(out, String(PID), '7ffff7fc0000-7ffff7fc2000.bin'))).toBe(false);

    // Heap: stored pages where stored, zeros everywhere else.
    const heapFile = join(out, heap?.file as string);
    const heapBytes = readFileSync(heapFile);
    expect(heapBytes.length).toBe(16 * 4096);
    const expectedHeap = Buffer.alloc(16 * 4096);
    for (const [index, bytes] of fx.heapPages) bytes.copy(expectedHeap, index * 4096);
    expect(heapBytes.equals(expectedHeap)).toBe(true);
    // Sparse: only the 3 stored pages take blocks (allow one filesystem block of slack each).
    expect(statSync(heapFile).blocks * 512).toBeLessThanOrEqual(3 * 4096 + 3 * 4096);

    // Library: the file from offset 4096 (4.5 pages of it), then zeros; page 2 is the COW copy.
    const libBytes = readFileSync(join(out, lib?.file as string));
    expect(libBytes.length).toBe(8 * 4096);
    const expectedLib = Buffer.alloc(8 * 4096);
    fx.libBytes.copy(expectedLib, 0, 4096);
    fx.cowPage.copy(expectedLib, 2 * 4096);
    expect(libBytes.equals(expectedLib)).toBe(true);
    await fx.store.close();
  });

  it('reports the unmodified pages of a changed file as lost (file-changed) and writes zeros', async () => {
    const dir = join(root, 'changed');
    mkdirSync(dir);
    const fx = await makeSnapshot(dir);
    const out = join(dir, 'out');
    await exportRaw(fx.store, 'snap', out);
    // Same size, new mtime: the content at T can no longer be trusted.
    const later = new Date(Date.now() + 60_000);
    utimesSync(fx.libFile, later, later);
    // Exporting again into a previous export is allowed.
    const result = await exportRaw(fx.store, String(fx.snapshot), out);
    const lib = readRawManifest(out).processes[0]?.regions[1];
    // File-backed pages are 0..4 (4.5 pages of file); page 2 is stored; 5..7 are past the end of the file.
    expect(lib?.lost).toEqual([
      { address: '0x7f3300000000', pages: 2, reason: 'file-changed' },
      { address: '0x7f3300003000', pages: 2, reason: 'file-changed' },
    ]);
    expect(result.lostPages).toBe(2 + 4);
    const expected = Buffer.alloc(8 * 4096);
    fx.cowPage.copy(expected, 2 * 4096);
    expect(readFileSync(join(out, lib?.file as string)).equals(expected)).toBe(true);

    // A file that is gone is changed too.
    rmSync(fx.libFile);
    await exportRaw(fx.store, 'snap', out);
    expect(readRawManifest(out).processes[0]?.regions[1]?.lost.map((l) => l.reason)).toEqual(['file-changed', 'file-changed']);
    await fx.store.close();
  });

  it('refuses an incomplete snapshot unless allowed, and a foreign non-empty directory', async () => {
    const dir = join(root, 'refuse');
    mkdirSync(dir);
    const fx = await makeSnapshot(dir, false);
    await expect(exportRaw(fx.store, 'partial', join(dir, 'out'))).rejects.toMatchObject({ code: 'SNAPSHOT_INCOMPLETE' });
    expect(existsSync(join(dir, 'out'))).toBe(false);
    const result = await exportRaw(fx.store, 'partial', join(dir, 'out'), { allowIncomplete: true });
    expect(readRawManifest(result.outDir).state).toBe('incomplete');

    const foreign = join(dir, 'foreign');
    mkdirSync(foreign);
    writeFileSync(join(foreign, 'thesis.tex'), 'precious');
    await expect(exportRaw(fx.store, 'partial', foreign, { allowIncomplete: true })).rejects.toMatchObject({
      code: 'EXPORT_DIR_NOT_EMPTY',
    });
    expect(readFileSync(join(foreign, 'thesis.tex'), 'utf8')).toBe('precious');
    // A pid directory holding something other than region files is not an export either.
    const sneaky = join(dir, 'sneaky');
    mkdirSync(join(sneaky, '12'), { recursive: true });
    writeFileSync(join(sneaky, '12', 'notes.txt'), 'keep me');
    await expect(exportRaw(fx.store, 'partial', sneaky, { allowIncomplete: true })).rejects.toMatchObject({
      code: 'EXPORT_DIR_NOT_EMPTY',
    });
    expect(readFileSync(join(sneaky, '12', 'notes.txt'), 'utf8')).toBe('keep me');
    await fx.store.close();
  });
});

describe('exportRaw output directory', () => {
  it('--out under /proc fails at once with one line, instead of looping on mkdir', async () => {
    const dir = join(root, 'proc');
    mkdirSync(dir);
    const fx = await makeSnapshot(dir);
    await fx.store.close();
    const out = `/proc/wpsnap-export-${process.pid}`;
    const started = Date.now();
    const run = await runCliProcess(['export', 'snap', '--out', out, '--store', join(dir, 'store.db')], {}, 15_000);
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toBe(`wpsnap: create the export directory ${out}: mkdir: ENOENT (the filesystem of /proc does not allow new directories)\n`);
  });

  it('refuses to create missing parents: one line naming the missing parent, nothing created', async () => {
    const dir = join(root, 'parents');
    mkdirSync(dir);
    const fx = await makeSnapshot(dir);
    await fx.store.close();
    const out = join(dir, 'nonexistent', 'deeper', 'x');
    const run = await runCli(['export', 'snap', '--out', out, '--store', join(dir, 'store.db')]);
    expect(run.code).toBe(2);
    expect(run.stderr).toBe(`wpsnap: cannot create ${out}: its parent directory ${join(dir, 'nonexistent', 'deeper')} does not exist\n`);
    expect(existsSync(join(dir, 'nonexistent'))).toBe(false);
  });
});

describe('exportRaw interrupted by its AbortSignal', () => {
  const BIG = 0x600000000000n;
  const REGIONS = 4;
  const PAGES = 1024;

  /** A snapshot of REGIONS regions of PAGES stored pages each (16 MiB of exports). */
  async function bigSnapshot(dir: string): Promise<Store> {
    const store = Store.open(join(dir, 'store.db'));
    const writer = store.beginSnapshot({ name: 'big' });
    const pid = writer.addProcess(fakeProcess(PID));
    const starts = Array.from({ length: REGIONS }, (_, i) => BIG + BigInt(i) * 0x10000000n);
    writer.addRegions(pid, starts.map((start) => fakeRegion(start, start + BigInt(PAGES * PAGE_SIZE))));
    for (const [i, start] of starts.entries()) await writer.addPages(pid, heapBatch(start, PAGES, ['random', 'pointers'], i * PAGES));
    await writer.complete(STATS);
    return store;
  }

  /** Aborts `controller` as soon as a region file holds data. */
  function abortOnceWriting(out: string, controller: AbortController): NodeJS.Timeout {
    const timer = setInterval(() => {
      const pidDir = join(out, String(PID));
      if (!existsSync(pidDir)) return;
      if (readdirSync(pidDir).some((f) => statSync(join(pidDir, f)).blocks > 0)) {
        controller.abort();
        clearInterval(timer);
      }
    }, 1);
    return timer;
  }

  it('stops mid-export, removes the directory it created, and throws INTERRUPTED (exit 130)', async () => {
    const dir = join(root, 'abort-new');
    mkdirSync(dir);
    const store = await bigSnapshot(dir);
    const out = join(dir, 'out');
    const controller = new AbortController();
    const timer = abortOnceWriting(out, controller);
    const error = await exportRaw(store, 'big', out, { signal: controller.signal }).catch((e: unknown) => e);
    clearInterval(timer);
    expect(controller.signal.aborted).toBe(true);
    expect(error).toMatchObject({ code: 'INTERRUPTED', kind: 'interrupted' });
    expect(exitCodeFor(error as WpsnapError)).toBe(130);
    expect((error as Error).message).toBe(`export of snapshot 1 to ${out} interrupted; nothing of it was left`);
    expect(existsSync(out)).toBe(false);
    // Without a signal the same export completes.
    const done = await exportRaw(store, 'big', out);
    expect(done.pagesStored).toBe(REGIONS * PAGES);
    await store.close();
  });

  it('in a directory it did not create (a previous export), leaves it empty; an aborted signal does nothing', async () => {
    const dir = join(root, 'abort-existing');
    mkdirSync(dir);
    const store = await bigSnapshot(dir);
    const out = join(dir, 'out');
    await exportRaw(store, 'big', out);
    const controller = new AbortController();
    const timer = abortOnceWriting(out, controller);
    await expect(exportRaw(store, 'big', out, { signal: controller.signal })).rejects.toMatchObject({ code: 'INTERRUPTED' });
    clearInterval(timer);
    expect(readdirSync(out)).toEqual([]);

    const never = join(dir, 'never');
    await expect(exportRaw(store, 'big', never, { signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'INTERRUPTED' });
    expect(existsSync(never)).toBe(false);
    await store.close();
  });
});
