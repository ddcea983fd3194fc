// Property: whatever a snapshot holds (protected regions of any size, any
// pages stored, zero, duplicated or lost), its raw export gives back each
// region byte for byte as stored (zeros where nothing was stored) and lists
// exactly the lost pages. fast-check reports the seed and the shrunk case of
// any failure. Pure store and format code: no root, no target.
import fc from 'fast-check';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { exportRaw } from '../../snapshot-format/export-raw.js';
import { PAGE_SIZE, type LostRange } from '../../snapshot-format/model.js';
import { Store } from '../../store/index.js';
import { fakeProcess, fakeRegion, fillPage } from '../../store/testing.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const BASE = 0x7f1000000000n;

/** Per page of a region: not stored, stored with content drawn from a seed (small seeds repeat: dedup), lost, or
 * stored and then listed lost (a shared file found changed after its pages were copied): it reads as zero. */
type PageState = { state: 'unstored' } | { state: 'stored'; seed: number } | { state: 'lost' } | { state: 'stored-lost'; seed: number };

const pageState: fc.Arbitrary<PageState> = fc.oneof(
  { weight: 2, arbitrary: fc.constant<PageState>({ state: 'unstored' }) },
  { weight: 5, arbitrary: fc.integer({ min: 0, max: 40 }).map<PageState>((seed) => ({ state: 'stored', seed })) },
  { weight: 1, arbitrary: fc.constant<PageState>({ state: 'lost' }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 40 }).map<PageState>((seed) => ({ state: 'stored-lost', seed })) },
);

const snapshotShape = fc.array(fc.array(pageState, { minLength: 1, maxLength: 24 }), { minLength: 1, maxLength: 4 });

function content(seed: number): Buffer {
  const page = Buffer.alloc(PAGE_SIZE);
  if (seed % 7 !== 0) fillPage(page, seed % 2 === 0 ? 'pointers' : 'random', seed); // every 7th seed: an all-zero page
  return page;
}

describe('raw export round trip (property)', () => {
  it('every region comes back exactly as stored, lost pages as zeros, and exactly the lost pages are listed', async () => {
    const root = mkdtempSync(join(tmpdir(), 'wpsnap-roundtrip-'));
    let run = 0;
    try {
      await fc.assert(
        fc.asyncProperty(snapshotShape, async (regions) => {
          const dir = join(root, String(run++));
          const store = Store.open(join(root, `${run}.db`));
          try {
            const writer = store.beginSnapshot({ name: 'prop' });
            const pid = writer.addProcess(fakeProcess(4242));
            const starts = regions.map((_, r) => BASE + BigInt(r) * 0x1000000n);
            writer.addRegions(pid, regions.map((pages, r) => fakeRegion(starts[r]!, starts[r]! + BigInt(pages.length * PAGE_SIZE))));
            const lost: LostRange[] = [];
            for (const [r, pages] of regions.entries()) {
              const stored = pages.flatMap((p, i) => (p.state === 'stored' || p.state === 'stored-lost' ? [[i, p.seed] as const] : []));
              if (stored.length > 0) {
                const data = new Uint8Array(stored.length * PAGE_SIZE);
                stored.forEach(([, seed], k) => data.set(content(seed), k * PAGE_SIZE));
                await writer.addPages(pid, { addresses: BigUint64Array.from(stored.map(([i]) => starts[r]! + BigInt(i * PAGE_SIZE))), data });
              }
              pages.forEach((p, i) => {
                if (p.state === 'lost' || p.state === 'stored-lost') lost.push({ address: starts[r]! + BigInt(i * PAGE_SIZE), pages: 1, reason: 'interrupted' });
              });
            }
            if (lost.length > 0) writer.addLost(pid, lost);
            await writer.complete(STATS);
            const result = await exportRaw(store, 'prop', dir);
            const manifest = result.manifest.processes[0]!;
            for (const [r, pages] of regions.entries()) {
              const entry = manifest.regions[r]!;
              const file = readFileSync(join(dir, entry.file!));
              expect(file.length).toBe(pages.length * PAGE_SIZE);
              pages.forEach((p, i) => {
                const expected = p.state === 'stored' ? content(p.seed) : Buffer.alloc(PAGE_SIZE);
                expect(file.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE).equals(expected)).toBe(true);
              });
              const listed = entry.lost.flatMap((l) => Array.from({ length: l.pages }, (_, k) => BigInt(l.address) + BigInt(k * PAGE_SIZE)));
              const expectedLost = pages.flatMap((p, i) => (p.state === 'lost' || p.state === 'stored-lost' ? [starts[r]! + BigInt(i * PAGE_SIZE)] : []));
              expect(listed).toEqual(expectedLost);
            }
          } finally {
            await store.close();
          }
        }),
        { numRuns: 25 },
      );
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
