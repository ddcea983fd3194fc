// Crash safety for real: a child `node` process writes a snapshot and is
// SIGKILLed mid-way. The store must open, list the snapshot as incomplete, keep
// the earlier snapshot intact and verifiable, and still take new snapshots.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, heapBatch } from '../store/testing.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
let build: string;
let root: string;

beforeAll(() => {
  // The child runs plain node, so compile the store (and what it imports) first.
  // The output sits inside the repository so that node_modules resolves.
  mkdirSync(join(repo, '.vitest-tmp'), { recursive: true });
  build = mkdtempSync(join(repo, '.vitest-tmp', 'crash-'));
  execFileSync(
    process.execPath,
    [
      join(repo, 'node_modules', 'typescript', 'bin', 'tsc'),
      '--outDir', build, '--rootDir', repo, '--module', 'NodeNext', '--moduleResolution', 'NodeNext',
      '--target', 'ES2022', '--skipLibCheck', '--types', 'node',
      join(repo, 'store', 'index.ts'), join(repo, 'store', 'testing.ts'),
    ],
    { stdio: 'inherit' },
  );
  writeFileSync(join(build, 'package.json'), '{"type":"module"}\n');
  // The store's workers load the native addon from <package root>/build/Release.
  symlinkSync(join(repo, 'build'), join(build, 'build'));
  root = mkdtempSync(join(tmpdir(), 'wpsnap-crash-'));
}, 120_000);

afterAll(() => {
  rmSync(build, { recursive: true, force: true });
  rmSync(root, { recursive: true, force: true });
});

const CHILD = `
import { Store } from './store/index.js';
import { fakeProcess, heapBatch } from './store/testing.js';
const store = Store.open(process.argv[2]);
const writer = store.beginSnapshot({ name: 'victim' });
const pid = writer.addProcess(fakeProcess(2222));
writer.addRegions(pid, [{ start: 0x500000000000n, end: 0x510000000000n, perms: 'rw-p', offset: 0n, dev: '00:00',
  inode: 0, path: '', pageSize: 4096, capture: 'protected' }]);
let batch = 0;
for (;;) {
  // Two batches in flight at a time, forever: the parent kills us mid-stream.
  const a = writer.addPages(pid, heapBatch(0x500000000000n + BigInt(batch) * 0x100000n, 256, ['pointers', 'random', 'zero', 'repetitive'], batch * 1000));
  const b = writer.addPages(pid, heapBatch(0x500000000000n + BigInt(batch + 1) * 0x100000n, 256, ['pointers', 'random', 'zero'], batch * 1000 + 500));
  await Promise.all([a, b]);
  batch += 2;
  process.stdout.write('committed ' + batch + '\\n');
}
`;

describe('crash safety', () => {
  it('a writer killed with SIGKILL mid-snapshot leaves a consistent store', async () => {
    const path = join(root, 'store.db');
    // An earlier, complete snapshot.
    const before = Store.open(path);
    const w = before.beginSnapshot({ name: 'earlier' });
    const earlierPid = w.addProcess(fakeProcess(1111));
    const earlierBatch = heapBatch(0x600000000000n, 300, ['pointers', 'random', 'zero', 'repetitive'], 7);
    await w.addPages(earlierPid, earlierBatch);
    await w.complete(STATS);
    await before.close();

    const script = join(build, 'child.mjs');
    writeFileSync(script, CHILD);
    const child = spawn(process.execPath, [script, path], { stdio: ['ignore', 'pipe', 'inherit'] });
    let output = '';
    await new Promise<void>((done, fail) => {
      child.stdout.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        if ((output.match(/committed/g) ?? []).length >= 6) done();
      });
      child.on('exit', (code) => fail(new Error(`child exited early with ${code}: ${output}`)));
    });
    // Alive and still writing: other readers see it running.
    const observer = Store.open(path, { readonly: true });
    expect(observer.find('victim').state).toBe('running');
    await observer.close();

    child.kill('SIGKILL');
    await new Promise((done) => child.once('exit', done));

    const after = Store.open(path);
    const list = after.list();
    expect(list.map((s) => [s.name, s.state])).toEqual([
      ['earlier', 'complete'],
      ['victim', 'incomplete'],
    ]);
    // The earlier snapshot reads back exactly.
    const earlier = after.find('earlier');
    const [earlierProcess] = after.processes(earlier.id);
    for (let i = 0; i < 300; i++) {
      const address = 0x600000000000n + BigInt(i * PAGE_SIZE);
      const expected = Buffer.from(earlierBatch.data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
      expect(after.readPage(earlierProcess?.processId ?? -1, address).equals(expected)).toBe(true);
    }
    expect((await after.verify(earlier.id)).ok).toBe(true);
    // Every batch the victim committed is intact too.
    const victim = after.find('victim');
    const [victimProcess] = after.processes(victim.id);
    const victimReport = await after.verify(victim.id);
    expect(victimReport.ok).toBe(true);
    expect(victimReport.pagesChecked).toBeGreaterThanOrEqual(6 * 192);
    const first = heapBatch(0x500000000000n, 256, ['pointers', 'random', 'zero', 'repetitive'], 0);
    expect(after.readPage(victimProcess?.processId ?? -1, 0x500000000000n + 4096n).equals(Buffer.from(first.data.subarray(4096, 8192)))).toBe(true);
    // And the store takes new snapshots.
    const next = after.beginSnapshot({ name: 'after' });
    const nextPid = next.addProcess(fakeProcess(3333));
    await next.addPages(nextPid, heapBatch(0x700000000000n, 64, ['pointers'], 99));
    await next.complete(STATS);
    expect((await after.verify(next.id)).ok).toBe(true);
    await after.close();
    // A read-only opener sees the same, without writing.
    const ro = Store.open(path, { readonly: true });
    expect(ro.find('victim').state).toBe('incomplete');
    await ro.close();
  }, 120_000);
});
