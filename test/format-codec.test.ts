// The packed page index and blob decoding: round trips and the limits checked
// before anything is decoded (FORMAT.md, "Limits").
import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { createRequire } from 'node:module';
import { CorruptError, decodeBlob, decodeIndex, encodeIndex, contentId, blobOfContent, indexInBlob } from '../store/codec.js';
import { ClaimTable, ContentIndex } from '../store/content-index.js';

const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as {
  compress(dst: Uint8Array, src: Uint8Array, level: number): number;
  compressBound(size: number): number;
};

describe('page index entries', () => {
  it('round-trip sorted addresses and content ids', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.bigInt({ min: 0n, max: (1n << 35n) - 1n }), { minLength: 1, maxLength: 200 }),
        fc.array(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), { minLength: 200, maxLength: 200 }),
        (pageNumbers, cids) => {
          const addresses = BigUint64Array.from(pageNumbers.sort((a, b) => (a < b ? -1 : 1)).map((n) => n * 4096n));
          const ids = cids.slice(0, addresses.length);
          const entries = encodeIndex(addresses, ids);
          expect(entries.length).toBe(addresses.length * 16);
          const decoded = decodeIndex({
            first_address: addresses[0] as bigint,
            last_address: addresses[addresses.length - 1] as bigint,
            count: addresses.length,
            entries,
          });
          expect([...decoded.addresses]).toEqual([...addresses]);
          expect([...decoded.cids]).toEqual(ids);
        },
      ),
    );
  });

  it('lays out addresses then content ids, little-endian u64', () => {
    const entries = encodeIndex(BigUint64Array.of(0x1000n, 0x7f0000003000n), [contentId(5, 3), 2 ** 40 + 7]);
    expect(entries.toString('hex')).toBe(
      '0010000000000000' + '00300000007f0000' + '4301000000000000' + '0700000000010000',
    );
    expect(blobOfContent(contentId(5, 3))).toBe(5);
    expect(indexInBlob(contentId(5, 3))).toBe(3);
  });

  it('refuses rows that break the limits', () => {
    const good = encodeIndex(BigUint64Array.of(0x1000n, 0x2000n), [1, 2]);
    const row = { first_address: 0x1000n, last_address: 0x2000n, count: 2, entries: good };
    expect(() => decodeIndex({ ...row, count: 0 })).toThrow(CorruptError);
    expect(() => decodeIndex({ ...row, count: 2 ** 21 })).toThrow(/limit/);
    expect(() => decodeIndex({ ...row, entries: good.subarray(0, 31) })).toThrow(/31 bytes for 2 entries/);
    expect(() => decodeIndex({ ...row, last_address: 0x3000n })).toThrow(/disagree/);
    const unsorted = encodeIndex(BigUint64Array.of(0x2000n, 0x1000n), [1, 2]);
    expect(() => decodeIndex({ ...row, entries: unsorted })).toThrow(/out of order/);
    const unaligned = encodeIndex(BigUint64Array.of(0x1000n, 0x2001n), [1, 2]);
    expect(() => decodeIndex({ ...row, entries: unaligned })).toThrow(/unaligned/);
    // An unaligned Buffer (as SQLite may hand out) still decodes.
    const shifted = Buffer.alloc(good.length + 1);
    good.copy(shifted, 1);
    expect([...decodeIndex({ ...row, entries: shifted.subarray(1) }).cids]).toEqual([1, 2]);
  });
});

describe('blobs', () => {
  const pages = Buffer.alloc(3 * 4096);
  pages.fill('abc', 0, 4096);
  pages.fill('xyz', 8192);
  const frame = Buffer.alloc(zstd.compressBound(pages.length));
  const frameSize = zstd.compress(frame, pages, 1);
  const zstdRow = { id: 9, pages: 3, codec: 1, hashes: Buffer.alloc(48), data: frame.subarray(0, frameSize) };

  it('decode zstd and raw blobs to exactly pages × 4096 bytes', () => {
    expect(decodeBlob(zstdRow).equals(pages)).toBe(true);
    expect(decodeBlob({ ...zstdRow, codec: 0, data: pages }).equals(pages)).toBe(true);
  });

  it('check sizes and codec before decompressing', () => {
    expect(() => decodeBlob({ ...zstdRow, pages: 65, hashes: Buffer.alloc(65 * 16) })).toThrow(/limit 1..64/);
    expect(() => decodeBlob({ ...zstdRow, hashes: Buffer.alloc(47) })).toThrow(/hash list/);
    expect(() => decodeBlob({ ...zstdRow, codec: 7 })).toThrow(/unknown codec 7/);
    expect(() => decodeBlob({ ...zstdRow, codec: 0 })).toThrow(/raw blob 9 holds/);
    // A frame that declares another size is refused before it is decompressed.
    expect(() => decodeBlob({ ...zstdRow, pages: 2, hashes: Buffer.alloc(32) })).toThrow(/declares 12288 bytes, expected 8192/);
    expect(() => decodeBlob({ ...zstdRow, data: Buffer.from('not a zstd frame') })).toThrow(CorruptError);
  });
});

describe('dedup index', () => {
  it('finds every hash it was given, and nothing else, across growth', () => {
    const index = new ContentIndex(16);
    const hashes = new Uint32Array(4 * 5000);
    for (let i = 0; i < hashes.length; i++) hashes[i] = Math.imul(i + 1, 2654435761) >>> 0;
    for (let i = 0; i < 5000; i++) index.set(hashes, i * 4, i * 3);
    expect(index.size).toBe(5000);
    for (let i = 0; i < 5000; i++) expect(index.get(hashes, i * 4)).toBe(i * 3);
    index.set(hashes, 0, 99); // the first content id for a hash stays
    expect(index.get(hashes, 0)).toBe(0);
    const other = Uint32Array.of(hashes[0] as number, 1, 2, 3);
    expect(index.get(other, 0)).toBe(-1);
  });
});

describe('claim table', () => {
  it('agrees with a Map through any sequence of claims and removals, colliding keys included', () => {
    // Few distinct first words: long probe runs, so backward-shift deletion is exercised.
    const key = fc.tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 15 }));
    const op = fc.tuple(fc.constantFrom('add', 'delete', 'delete-other'), key);
    fc.assert(
      fc.property(fc.array(op, { minLength: 100, maxLength: 400 }), (ops) => {
        const table = new ClaimTable(4);
        const model = new Map<string, number>();
        let next = 1;
        for (const [kind, [first, rest]] of ops) {
          // Spread the first word's low bits so that keys land at the same home slot.
          const words = Uint32Array.of(first * 1024, rest, rest * 7, 1);
          const name = `${first}/${rest}`;
          if (kind === 'add') {
            if (model.has(name)) continue;
            table.add(words, 0, next);
            model.set(name, next++);
          } else if (kind === 'delete') {
            table.delete(words, 0, model.get(name) ?? -5);
            model.delete(name);
          } else {
            table.delete(words, 0, 123456789); // not its claim: nothing happens
          }
          expect(table.size).toBe(model.size);
          for (let other = 0; other <= 15; other++) {
            expect(table.get(Uint32Array.of(first * 1024, other, other * 7, 1), 0)).toBe(model.get(`${first}/${other}`) ?? -1);
          }
        }
      }),
      { numRuns: 200 },
    );
  });
});

describe('x86_64 register layout', () => {
  it('decodes struct user_regs_struct by name: rip is word 16, rsp word 19, 27 words in all', async () => {
    const { decodeUserRegs, pcAndSp, USER_REGS_BYTES } = await import('../snapshot-format/regs-x86_64.js');
    const regs = Buffer.alloc(216);
    for (let i = 0; i < 27; i++) regs.writeBigUInt64LE(BigInt(0x1000 + i), i * 8);
    expect(USER_REGS_BYTES).toBe(216);
    const decoded = decodeUserRegs(regs)!;
    expect(decoded.r15).toBe(0x1000n);
    expect(decoded.orig_rax).toBe(0x100fn);
    expect(decoded.rip).toBe(0x1010n);
    expect(decoded.rsp).toBe(0x1013n);
    expect(decoded.gs).toBe(0x101an);
    expect(pcAndSp({ regs })).toEqual({ rip: 0x1010n, rsp: 0x1013n });
    expect(decodeUserRegs(regs.subarray(0, 215))).toBeNull();
    expect(pcAndSp({ regs: Buffer.alloc(0) })).toEqual({ rip: 0n, rsp: 0n });
  });
});
