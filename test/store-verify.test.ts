// verify() re-reads every stored page and names the pages a damaged blob holds.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PAGE_SIZE, formatAddress } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, heapBatch } from '../store/testing.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const BASE = 0x7f1200000000n;

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'wpsnap-verify-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

/** A store with one snapshot of 200 pages: zstd blobs (pointer pages) and raw blobs (random pages). */
async function makeStore(name: string): Promise<{ path: string; snapshot: number; pid: number }> {
  const path = join(root, name, 'store.db');
  const store = Store.open(path);
  const writer = store.beginSnapshot({ name });
  const processId = writer.addProcess(fakeProcess(321));
  await writer.addPages(processId, heapBatch(BASE, 100, ['pointers', 'zero'], 0));
  await writer.addPages(processId, heapBatch(BASE + 0x1000000n, 100, ['random'], 0));
  await writer.complete(STATS);
  expect(await store.verify(writer.id)).toEqual({ ok: true, snapshot: writer.id, state: 'complete', pagesChecked: 150, problems: [] });
  await store.close();
  return { path, snapshot: writer.id, pid: processId };
}

/** Flip one byte of a blob with raw SQL; returns the addresses of the pages stored in it. */
function corruptBlob(path: string, codec: number, at: (length: number) => number): { blob: number; addresses: string[] } {
  const db = new Database(path);
  const row = db.prepare('SELECT id, data FROM blobs WHERE codec = ? ORDER BY id LIMIT 1').get(codec) as { id: number; data: Buffer };
  const data = Buffer.from(row.data);
  const offset = at(data.length);
  data[offset] = (data[offset] as number) ^ 0x5a;
  db.prepare('UPDATE blobs SET data = ? WHERE id = ?').run(data, row.id);
  // Which pages point into this blob: decode the packed index (address u64 × n, then content id u64 × n).
  const addresses: string[] = [];
  for (const r of db.prepare('SELECT count, entries FROM page_index').all() as Array<{ count: number; entries: Buffer }>) {
    for (let i = 0; i < r.count; i++) {
      const cid = Number(r.entries.readBigUInt64LE(r.count * 8 + i * 8));
      if (Math.floor(cid / 64) === row.id) addresses.push(formatAddress(r.entries.readBigUInt64LE(i * 8)));
    }
  }
  db.close();
  return { blob: row.id, addresses };
}

function reportedAddresses(problems: string[]): string[] {
  return problems.map((p) => /page (0x[0-9a-f]+)/.exec(p)?.[1] ?? p).sort();
}

describe('verify', () => {
  it('catches a flipped byte in a zstd blob and names every page it holds', async () => {
    const { path, snapshot } = await makeStore('zstd');
    const { blob, addresses } = corruptBlob(path, 1, (length) => Math.floor(length / 2));
    expect(addresses.length).toBeGreaterThan(0);
    const store = Store.open(path, { readonly: true });
    const report = await store.verify(snapshot);
    await store.close();
    expect(report.ok).toBe(false);
    expect(report.problems.every((p) => p.includes(`blob ${blob}`) && p.startsWith('pid 321 page 0x'))).toBe(true);
    // A flip inside a zstd frame either breaks decoding (all its pages) or changes content (some pages).
    expect(reportedAddresses(report.problems).every((a) => addresses.includes(a))).toBe(true);
  });

  it('catches a flipped byte in a raw blob as a hash mismatch of exactly that page', async () => {
    const { path, snapshot } = await makeStore('raw');
    const { blob, addresses } = corruptBlob(path, 0, () => 5 * PAGE_SIZE + 17);
    const store = Store.open(path, { readonly: true });
    const report = await store.verify(snapshot);
    await store.close();
    expect(report.ok).toBe(false);
    expect(report.problems).toEqual([`pid 321 page ${addresses[5]}: content hash mismatch (blob ${blob} index 5)`]);
  });

  it('reports index entries pointing at a missing blob', async () => {
    const { path, snapshot } = await makeStore('missing');
    const db = new Database(path);
    const { id } = db.prepare('SELECT max(id) AS id FROM blobs').get() as { id: number };
    db.prepare('DELETE FROM blobs WHERE id = ?').run(id);
    db.close();
    const store = Store.open(path, { readonly: true });
    const report = await store.verify(snapshot);
    await store.close();
    expect(report.ok).toBe(false);
    expect(report.problems.length).toBeGreaterThan(0);
    expect(report.problems.every((p) => p.endsWith(`points at blob ${id}, which does not exist`))).toBe(true);
  });

  it('reports a page index row that breaks its limits', async () => {
    const { path, snapshot } = await makeStore('bad-index');
    const db = new Database(path);
    db.prepare('UPDATE page_index SET count = count + 1 WHERE id = (SELECT min(id) FROM page_index)').run();
    db.close();
    const store = Store.open(path, { readonly: true });
    const report = await store.verify(snapshot);
    await store.close();
    expect(report.ok).toBe(false);
    expect(report.problems[0]).toMatch(/^pid 321: page index row \d+: page index row holds \d+ bytes for \d+ entries$/);
  });
});
