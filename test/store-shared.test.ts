// A group snapshot's shared pages in a real store file (store/shared-pages.ts): a
// page of a file several members map is stored once, by the member that saved
// it, and every other member's mapping of the same file page gets an index
// entry for the same content (and the lost ranges another member recorded).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, fakeRegion, fakeThread } from '../store/testing.js';

const STATS = { pauseMicros: 5, durationMillis: 7, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const PAGE = BigInt(PAGE_SIZE);

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-shared-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

function page(tag: number): Uint8Array {
  const p = new Uint8Array(PAGE_SIZE);
  for (let i = 0; i < PAGE_SIZE; i += 4) new DataView(p.buffer).setUint32(i, tag * 7919 + i, true);
  return p;
}

describe('shared pages across the processes of a group snapshot', () => {
  it('indexes each file page for every member that maps it, stores it once, and carries lost ranges over', async () => {
    const path = join(root, 'store.db');
    const store = Store.open(path);
    // The same 8-page file: member A maps file pages 0..8 at 0x10000000, member B maps pages 2..8 at 0x20000000.
    const file = { dev: '00:01', inode: 4711, path: '/memfd:shared (deleted)', perms: 'rw-s' };
    const a = { start: 0x10000000n, end: 0x10000000n + 8n * PAGE };
    const b = { start: 0x20000000n, end: 0x20000000n + 6n * PAGE };
    const writer = store.beginSnapshot({ name: 'group' });
    const pa = writer.addProcess(fakeProcess(100));
    const pb = writer.addProcess(fakeProcess(101));
    writer.addThreads(pa, [fakeThread(100)]);
    writer.addThreads(pb, [fakeThread(101)]);
    writer.addRegions(pa, [fakeRegion(a.start, a.end, { ...file, offset: 0n })]);
    writer.addRegions(pb, [fakeRegion(b.start, b.end, { ...file, offset: 2n * PAGE })]);
    // A saved file pages 0, 2, 3; B saved file page 5 (its own page 3) and lost file page 6; page 7 is zero.
    const batch = (addresses: bigint[], tags: number[]) => {
      const data = new Uint8Array(addresses.length * PAGE_SIZE);
      tags.forEach((t, i) => data.set(page(t), i * PAGE_SIZE));
      return { addresses: BigUint64Array.from(addresses), data };
    };
    await writer.addPages(pa, batch([a.start, a.start + 2n * PAGE, a.start + 3n * PAGE], [0, 2, 3]));
    await writer.addPages(pb, batch([b.start + 3n * PAGE], [5]));
    writer.addLost(pb, [{ address: b.start + 4n * PAGE, pages: 1, reason: 'discarded-before-saved' }]);
    const mappings = [[
      { processId: pa, start: a.start, end: a.end, firstPage: 0 },
      { processId: pb, start: b.start, end: b.end, firstPage: 2 },
    ]];
    expect(await writer.shareAcross!(mappings)).toBe(3); // B gets file pages 2 and 3, A gets file page 5
    await writer.complete(STATS);
    const [procA, procB] = store.processes(store.find('group').id);
    expect(Buffer.from(store.readPage(procB!.processId, b.start))).toEqual(Buffer.from(page(2)));
    expect(Buffer.from(store.readPage(procB!.processId, b.start + PAGE))).toEqual(Buffer.from(page(3)));
    expect(Buffer.from(store.readPage(procA!.processId, a.start + 5n * PAGE))).toEqual(Buffer.from(page(5)));
    expect(store.lost(procA!.processId)).toEqual([{ address: a.start + 6n * PAGE, pages: 1, reason: 'discarded-before-saved' }]);
    expect(store.lost(procB!.processId)).toEqual([{ address: b.start + 4n * PAGE, pages: 1, reason: 'discarded-before-saved' }]);
    // Page 7 (zero) and page 1 (A only, zero) stay without entries; every page's content is stored once.
    await store.close();
    const db = new Database(path, { readonly: true });
    try {
      expect(Number((db.prepare('SELECT sum(pages) AS n FROM blobs').get() as { n: number }).n)).toBe(4);
      const entries = (pid: number) => Number((db.prepare('SELECT sum(count) AS n FROM page_index WHERE process_id = ?').get(pid) as { n: number }).n);
      expect(entries(procA!.processId)).toBe(4);
      expect(entries(procB!.processId)).toBe(3);
    } finally {
      db.close();
    }
  });
});
