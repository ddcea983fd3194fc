// Encoding of the packed page index and decoding of compressed blobs, with the
// limits checked before anything is decoded (FORMAT.md, "Limits").
import { createRequire } from 'node:module';
import { endianness } from 'node:os';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { BLOB_PAGES, CODEC_RAW, CODEC_ZSTD, HASH_BYTES } from './worker-pool.js';

const zstd = createRequire(import.meta.url)('zstd-napi/binding.js') as typeof ZstdBinding;

if (endianness() !== 'LE') throw new Error('the wpsnap store format is little-endian; this host is not');

/** Most entries one page_index row may hold. */
export const MAX_INDEX_ENTRIES = 1 << 20;
/** Addresses are stored as SQLite INTEGER (signed 64-bit): they must stay below 2^63. */
export const MAX_ADDRESS = (1n << 63n) - 1n;
const PAGE_MASK = BigInt(PAGE_SIZE - 1);
const TWO_32 = 2 ** 32;

/** A content id names a page inside a blob: blob id × BLOB_PAGES + index in the blob. */
export function contentId(blobId: number, index: number): number {
  return blobId * BLOB_PAGES + index;
}
export function blobOfContent(cid: number): number {
  return Math.floor(cid / BLOB_PAGES);
}
export function indexInBlob(cid: number): number {
  return cid % BLOB_PAGES;
}

/** Thrown when stored bytes break a limit; the message says which. */
export class CorruptError extends Error {
  override readonly name = 'CorruptError';
}

export interface DecodedIndex {
  /** Strictly increasing page addresses. */
  addresses: BigUint64Array;
  /** Content id of each page. */
  cids: Float64Array;
}

/**
 * `entries` of a page_index row: count × u64 LE address (strictly increasing),
 * then count × u64 LE content id.
 */
export function encodeIndex(addresses: BigUint64Array, cids: ArrayLike<number>): Buffer {
  const count = addresses.length;
  const buffer = new ArrayBuffer(count * 16);
  new BigUint64Array(buffer, 0, count).set(addresses);
  const words = new Uint32Array(buffer, count * 8, count * 2);
  for (let i = 0; i < count; i++) {
    const cid = cids[i] as number;
    words[2 * i] = cid % TWO_32;
    words[2 * i + 1] = Math.floor(cid / TWO_32);
  }
  return Buffer.from(buffer);
}

/** The first position in `addresses` (ascending) holding a value >= address. */
export function lowerBound(addresses: BigUint64Array, address: bigint): number {
  let lo = 0;
  let hi = addresses.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((addresses[mid] as bigint) < address) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export interface IndexRow {
  first_address: bigint;
  last_address: bigint;
  count: bigint | number;
  entries: Buffer;
}

/** Decode one page_index row, checking its limits first. */
export function decodeIndex(row: IndexRow): DecodedIndex {
  const count = Number(row.count);
  if (!Number.isInteger(count) || count < 1 || count > MAX_INDEX_ENTRIES) {
    throw new CorruptError(`page index row has count ${count} (limit 1..${MAX_INDEX_ENTRIES})`);
  }
  if (!Buffer.isBuffer(row.entries) || row.entries.length !== count * 16) {
    throw new CorruptError(`page index row holds ${row.entries?.length ?? 0} bytes for ${count} entries`);
  }
  let bytes = row.entries;
  if (bytes.byteOffset % 8 !== 0) bytes = Buffer.from(bytes);
  const addresses = new BigUint64Array(bytes.buffer, bytes.byteOffset, count);
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset + count * 8, count * 2);
  const cids = new Float64Array(count);
  let previous = -1n;
  for (let i = 0; i < count; i++) {
    const address = addresses[i] as bigint;
    if (address <= previous || (address & PAGE_MASK) !== 0n || address > MAX_ADDRESS) {
      throw new CorruptError(`page index entry ${i} has address 0x${address.toString(16)} (unaligned or out of order)`);
    }
    previous = address;
    cids[i] = (words[2 * i + 1] as number) * TWO_32 + (words[2 * i] as number);
  }
  if (addresses[0] !== BigInt(row.first_address) || addresses[count - 1] !== BigInt(row.last_address)) {
    throw new CorruptError('page index row first/last address disagree with its entries');
  }
  return { addresses, cids };
}

export interface BlobRow {
  id: number;
  pages: number;
  codec: number;
  hashes: Buffer;
  data: Buffer;
}

/** Check a blob row's limits (not its content). */
export function checkBlobRow(row: BlobRow): void {
  if (!Number.isInteger(row.pages) || row.pages < 1 || row.pages > BLOB_PAGES) {
    throw new CorruptError(`blob ${row.id} has ${row.pages} pages (limit 1..${BLOB_PAGES})`);
  }
  if (!Buffer.isBuffer(row.hashes) || row.hashes.length !== row.pages * HASH_BYTES) {
    throw new CorruptError(`blob ${row.id} has a hash list of the wrong size`);
  }
  if (!Buffer.isBuffer(row.data)) throw new CorruptError(`blob ${row.id} has no data`);
  const size = row.pages * PAGE_SIZE;
  if (row.codec === CODEC_RAW) {
    if (row.data.length !== size) throw new CorruptError(`raw blob ${row.id} holds ${row.data.length} bytes, expected ${size}`);
  } else if (row.codec === CODEC_ZSTD) {
    if (row.data.length > zstd.compressBound(size)) {
      throw new CorruptError(`zstd blob ${row.id} is larger than zstd's bound for ${size} bytes`);
    }
  } else {
    throw new CorruptError(`blob ${row.id} has unknown codec ${row.codec}`);
  }
}

let dctx: ZstdBinding.DCtx | undefined;

/** The blob's pages, decompressed: exactly pages × PAGE_SIZE bytes (into `reuse` when it is that size). */
export function decodeBlob(row: BlobRow, reuse?: Buffer): Buffer {
  checkBlobRow(row);
  const size = row.pages * PAGE_SIZE;
  if (row.codec === CODEC_RAW) return row.data;
  let declared: number | null;
  try {
    declared = zstd.getFrameContentSize(row.data);
  } catch (error) {
    throw new CorruptError(`zstd blob ${row.id}: ${(error as Error).message}`);
  }
  if (declared !== size) throw new CorruptError(`zstd blob ${row.id} declares ${declared} bytes, expected ${size}`);
  const out = reuse !== undefined && reuse.length === size ? reuse : Buffer.allocUnsafe(size);
  dctx ??= new zstd.DCtx();
  let got: number;
  try {
    got = dctx.decompress(out, row.data);
  } catch (error) {
    throw new CorruptError(`zstd blob ${row.id}: ${(error as Error).message}`);
  }
  if (got !== size) throw new CorruptError(`zstd blob ${row.id} decompressed to ${got} bytes, expected ${size}`);
  return out;
}
