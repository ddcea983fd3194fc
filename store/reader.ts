// Reading stored pages: the packed index rows of a process merged into address
// order, and the blobs that hold the content, decompressed on demand (LRU).
import type Database from 'better-sqlite3';
import { WpsnapError } from '../common/errors.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import { blobOfContent, CorruptError, decodeBlob, decodeIndex, indexInBlob, lowerBound, MAX_ADDRESS, type BlobRow, type DecodedIndex, type IndexRow } from './codec.js';
import { HASH_BYTES } from './worker-pool.js';
import { decodePageRuns, indicesWithin, lostRanges, regionRanges, sortedRanges } from './page-ranges.js';

/** Decompressed blobs kept. */
/** Decompressed blobs kept (256 KiB each): pages of one address range are spread over blobs in arrival order. */
const BLOB_CACHE = 128;
const PAGE_MASK = BigInt(PAGE_SIZE - 1);

export class PageReader {
  private readonly blobCache = new Map<number, Buffer>();
  /**
   * Blobs decompressed for readRangeInto and pageViewsInRange, whose callers
   * copy out of them at once: no view of one outlives the next step, so an
   * evicted one's buffer takes the next
   * (a GiB read is 4096 blobs: no garbage to collect).
   */
  private readonly copyBlobs = new Map<number, Buffer>();
  /** Resolved indexes by process id (a generation's includes what it takes from its parents). */
  private readonly indexCache = new Map<number, { key: string; index: DecodedIndex }>();
  private readonly zeroedRanges: Database.Statement | undefined;
  private readonly rowsOfProcess: Database.Statement;
  private readonly rowsAcross: Database.Statement;
  /** Index rows decoded by readRangeIntoFromRows, by row id (rows are never rewritten: a new snapshot adds rows). */
  private readonly rowCache = new Map<bigint, DecodedIndex>();
  private readonly indexVersion: Database.Statement;
  private readonly blob: Database.Statement;
  private readonly hashes: Database.Statement;

  constructor(
    private readonly db: Database.Database,
    private readonly path: string,
  ) {
    this.rowsOfProcess = db
      .prepare('SELECT first_address, last_address, count, entries FROM page_index WHERE process_id = ? ORDER BY first_address')
      .safeIntegers(true);
    // The span index (schema 8) answers from the index alone; SQLite would pick the address index and read every row.
    const spanIndex = db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = 'page_index_span'").get() !== undefined;
    this.rowsAcross = db
      .prepare(`SELECT id, first_address, last_address, count, entries FROM page_index ${spanIndex ? 'INDEXED BY page_index_span ' : ''}WHERE process_id = ? AND first_address < ? AND last_address >= ?`)
      .safeIntegers(true);
    const generations = db.prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'generation_pages'").get() !== undefined;
    // What a cached index depends on, in one query per process read: its own rows and (schema 4) its parent's process.
    const parent = generations
      ? `(SELECT pp.id FROM processes p JOIN snapshots s ON s.id = p.snapshot_id
          JOIN processes pp ON pp.snapshot_id = s.parent_id AND pp.pid = p.pid WHERE p.id = @id)`
      : 'NULL';
    this.indexVersion = db.prepare(
      `SELECT (SELECT count(*) FROM page_index WHERE process_id = @id) AS n, (SELECT max(id) FROM page_index WHERE process_id = @id) AS last, ${parent} AS parent`,
    );
    if (generations) this.zeroedRanges = db.prepare("SELECT ranges FROM generation_pages WHERE process_id = ? AND kind = 'zeroed'");

    this.blob = db.prepare('SELECT id, pages, codec, hashes, data FROM blobs WHERE id = ?');
    this.hashes = db.prepare('SELECT hashes FROM blobs WHERE id = ?');
  }

  /** Stored pages of a process in [start, end), in address order; each `data` is a fresh Buffer. */
  *pagesInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }> {
    const index = this.processIndex(processId);
    for (let i = lowerBound(index.addresses, start); i < index.addresses.length; i++) {
      const address = index.addresses[i] as bigint;
      if (address >= end) break;
      yield { address, data: Buffer.from(this.contentPage(index.cids[i] as number)) };
    }
  }

  /**
   * Copy the stored pages of [start, start + into.length) into `into` at
   * their offsets (bytes of pages not stored are left as they are), without
   * a Buffer per page; `stored[i]` is set to 1 for each page i stored.
   * Returns how many pages were stored.
   */
  readRangeInto(processId: number, start: bigint, into: Buffer, stored?: Uint8Array): number {
    const { addresses, cids } = this.processIndex(processId);
    const end = start + BigInt(into.length);
    const page = BigInt(PAGE_SIZE);
    let n = 0;
    // A run at a time: pages at consecutive addresses stored one after another in one blob (a sweep's), one copy.
    for (let i = lowerBound(addresses, start); i < addresses.length && (addresses[i] as bigint) < end; ) {
      const cid = cids[i] as number;
      const blobId = blobOfContent(cid);
      let j = i + 1;
      let next = (addresses[i] as bigint) + page;
      while (j < addresses.length && addresses[j] === next && next < end && cids[j] === cid + (j - i) && blobOfContent(cids[j] as number) === blobId) {
        j++;
        next += page;
      }
      const pages = this.blobToCopy(blobId);
      const first = indexInBlob(cid);
      if ((first + (j - i)) * PAGE_SIZE > pages.length) {
        throw new WpsnapError('STORE_CORRUPT', `${this.path}: content ${cid + (j - i) - 1} is beyond the end of blob ${blobId}`);
      }
      const at = Number((addresses[i] as bigint) - start) / PAGE_SIZE;
      pages.copy(into, at * PAGE_SIZE, first * PAGE_SIZE, (first + (j - i)) * PAGE_SIZE);
      if (stored !== undefined) stored.fill(1, at, at + (j - i));
      n += j - i;
      i = j;
    }
    return n;
  }

  /**
   * readRangeInto for a process with no parent, without decoding its whole
   * index: only the rows whose span crosses the range (a restore writes a few
   * pages before the process runs; the whole index of a large process takes
   * longer than the rest of it). A generation reads through its parents:
   * undefined, use readRangeInto.
   */
  readRangeIntoFromRows(processId: number, start: bigint, into: Buffer, stored?: Uint8Array): number | undefined {
    const version = this.indexVersion.get({ id: processId }) as { parent: number | null };
    if (version.parent !== null) return undefined;
    const end = start + BigInt(into.length);
    let n = 0;
    // SQLite integers are signed 64-bit: no page is stored above MAX_ADDRESS ([vsyscall] is never stored).
    const below = end > MAX_ADDRESS ? MAX_ADDRESS : end;
    for (const row of this.rowsAcross.all(processId, below, start) as Array<IndexRow & { id: bigint }>) {
      // Rows of fault-time batches span much of the address space: decoded once for all the ranges asked for.
      let decoded = this.rowCache.get(row.id);
      if (decoded === undefined) {
        if (this.rowCache.size >= 256) this.rowCache.clear();
        decoded = this.decode(row, processId);
        this.rowCache.set(row.id, decoded);
      }
      const { addresses, cids } = decoded;
      for (let i = lowerBound(addresses, start); i < addresses.length && (addresses[i] as bigint) < end; i++) {
        const at = Number((addresses[i] as bigint) - start) / PAGE_SIZE;
        this.contentPage(cids[i] as number).copy(into, at * PAGE_SIZE);
        if (stored !== undefined) stored[at] = 1;
        n++;
      }
    }
    return n;
  }

  /** As pagesInRange, each `data` a view into a blob decompressed for copying, valid until the next step (its buffer is recycled later). */
  *pageViewsInRange(processId: number, start: bigint, end: bigint): Iterable<{ address: bigint; data: Buffer }> {
    const index = this.processIndex(processId);
    for (let i = lowerBound(index.addresses, start); i < index.addresses.length; i++) {
      const address = index.addresses[i] as bigint;
      if (address >= end) break;
      const cid = index.cids[i] as number;
      const pages = this.blobToCopy(blobOfContent(cid));
      const at = indexInBlob(cid) * PAGE_SIZE;
      if (at + PAGE_SIZE > pages.length) throw new WpsnapError('STORE_CORRUPT', `${this.path}: content ${cid} is beyond the end of blob ${blobOfContent(cid)}`);
      yield { address, data: pages.subarray(at, at + PAGE_SIZE) };
    }
  }

  /** The page at `address`: its stored content, or zeros if none is stored. */
  readPage(processId: number, address: bigint): Buffer {
    if ((address & PAGE_MASK) !== 0n) {
      throw new WpsnapError('INVALID_ADDRESS', `0x${address.toString(16)} is not page-aligned`);
    }
    // The merged index (cached): fault batches span wide address ranges, so
    // looking rows up by range would decode many of them for every page.
    const index = this.processIndex(processId);
    const i = lowerBound(index.addresses, address);
    if (index.addresses[i] === address) return Buffer.from(this.contentPage(index.cids[i] as number));
    return Buffer.alloc(PAGE_SIZE);
  }

  /** Every stored page of a process: addresses ascending, with their content ids (cached; not to be modified). */
  index(processId: number): DecodedIndex {
    return this.processIndex(processId);
  }

  /** The content of a content id: a view into a cached decompressed blob, not to be modified. */
  content(cid: number): Buffer {
    return this.contentPage(cid);
  }

  /** The content hash of a content id (HASH_BYTES bytes). */
  contentHash(cid: number): Buffer {
    const blobId = blobOfContent(cid);
    const row = this.hashes.get(blobId) as { hashes: Buffer } | undefined;
    if (row === undefined) throw new WpsnapError('STORE_CORRUPT', `${this.path}: blob ${blobId} is missing`);
    const at = indexInBlob(cid) * HASH_BYTES;
    if (at + HASH_BYTES > row.hashes.length) throw new WpsnapError('STORE_CORRUPT', `${this.path}: content ${cid} has no hash in blob ${blobId}`);
    return row.hashes.subarray(at, at + HASH_BYTES);
  }

  /** Forget a deleted blob. */
  forgetBlob(blobId: number): void {
    this.blobCache.delete(blobId);
    this.copyBlobs.delete(blobId);
  }

  /** All index entries of a process in address order (cached until the process gets new rows). */
  private processIndex(processId: number): DecodedIndex {
    return this.resolved(processId, 0).index;
  }

  /**
   * A process's pages: its own index entries, and for a generation those of
   * its parent's process (resolved the same way) that it did not store
   * itself, inside its own regions, outside its lost and zeroed ranges.
   */
  private resolved(processId: number, depth: number): { key: string; index: DecodedIndex } {
    if (depth > 10_000) throw new WpsnapError('STORE_CORRUPT', `${this.path}: process ${processId}: its chain of parents loops`);
    const version = this.indexVersion.get({ id: processId }) as { n: number; last: number | null; parent: number | null };
    const parentId = version.parent ?? undefined;
    const parent = parentId === undefined ? undefined : this.resolved(parentId, depth + 1);
    const key = `${processId}:${version.n}:${version.last}:${parent?.key ?? ''}`;
    const cached = this.indexCache.get(processId);
    if (cached?.key === key) return cached;
    const own = this.merge(processId);
    const index = parent === undefined ? own : this.overlay(processId, own, parent.index);
    if (this.indexCache.size >= 16) this.indexCache.delete(this.indexCache.keys().next().value as number);
    const entry = { key, index };
    this.indexCache.set(processId, entry);
    return entry;
  }

  /** own ∪ (base ∩ regions − lost − zeroed − own), in address order. */
  private overlay(processId: number, own: DecodedIndex, base: DecodedIndex): DecodedIndex {
    const zeroed = ((this.zeroedRanges?.all(processId) ?? []) as Array<{ ranges: Buffer }>).map((row) => decodePageRuns(row.ranges));
    const hidden = sortedRanges(lostRanges(this.db, processId), ...zeroed);
    const inherited = indicesWithin(base.addresses, regionRanges(this.db, processId), hidden).filter((i) => {
      const at = lowerBound(own.addresses, base.addresses[i] as bigint);
      return own.addresses[at] !== base.addresses[i];
    });
    const total = own.addresses.length + inherited.length;
    const out: DecodedIndex = { addresses: new BigUint64Array(total), cids: new Float64Array(total) };
    let a = 0;
    let b = 0;
    for (let k = 0; k < total; k++) {
      const fromOwn = b >= inherited.length || (a < own.addresses.length && (own.addresses[a] as bigint) < (base.addresses[inherited[b]!] as bigint));
      if (fromOwn) {
        out.addresses[k] = own.addresses[a] as bigint;
        out.cids[k] = own.cids[a++] as number;
      } else {
        out.addresses[k] = base.addresses[inherited[b]!] as bigint;
        out.cids[k] = base.cids[inherited[b++]!] as number;
      }
    }
    return out;
  }

  private merge(processId: number): DecodedIndex {
    const parts = (this.rowsOfProcess.all(processId) as IndexRow[]).map((row) => this.decode(row, processId));
    let total = 0;
    let disjoint = true;
    let last = -1n;
    for (const part of parts) {
      total += part.addresses.length;
      if ((part.addresses[0] as bigint) <= last) disjoint = false;
      last = part.addresses[part.addresses.length - 1] as bigint;
    }
    const addresses = new BigUint64Array(total);
    const cids = new Float64Array(total);
    let at = 0;
    for (const part of parts) {
      addresses.set(part.addresses, at);
      cids.set(part.cids, at);
      at += part.addresses.length;
    }
    if (disjoint) return { addresses, cids };
    // Rows overlap (fault-time batches): sort all entries by address.
    const order = Array.from({ length: total }, (_, i) => i);
    order.sort((a, b) => {
      const x = addresses[a] as bigint;
      const y = addresses[b] as bigint;
      return x < y ? -1 : x > y ? 1 : 0;
    });
    const sorted: DecodedIndex = { addresses: new BigUint64Array(total), cids: new Float64Array(total) };
    for (let j = 0; j < total; j++) {
      sorted.addresses[j] = addresses[order[j] as number] as bigint;
      sorted.cids[j] = cids[order[j] as number] as number;
      if (j > 0 && sorted.addresses[j] === sorted.addresses[j - 1]) {
        throw new WpsnapError(
          'STORE_CORRUPT',
          `${this.path}: process ${processId} has page 0x${(sorted.addresses[j] as bigint).toString(16)} stored twice`,
        );
      }
    }
    return sorted;
  }

  private decode(row: IndexRow, processId: number): DecodedIndex {
    try {
      return decodeIndex(row);
    } catch (error) {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: process ${processId}: ${(error as Error).message}`);
    }
  }

  /** One page of content: a view into a cached decompressed blob, not to be modified. */
  private contentPage(cid: number): Buffer {
    const blobId = blobOfContent(cid);
    const pages = this.blobPages(blobId);
    const index = indexInBlob(cid);
    if ((index + 1) * PAGE_SIZE > pages.length) {
      throw new WpsnapError('STORE_CORRUPT', `${this.path}: content ${cid} is beyond the end of blob ${blobId}`);
    }
    return pages.subarray(index * PAGE_SIZE, (index + 1) * PAGE_SIZE);
  }

  /** A blob's pages to copy from: cached already, or decompressed into a recycled buffer. */
  private blobToCopy(blobId: number): Buffer {
    const known = this.blobCache.get(blobId) ?? this.copyBlobs.get(blobId);
    if (known !== undefined) return known;
    let recycled: Buffer | undefined;
    if (this.copyBlobs.size >= BLOB_CACHE) {
      const oldest = this.copyBlobs.keys().next().value as number;
      recycled = this.copyBlobs.get(oldest);
      this.copyBlobs.delete(oldest);
    }
    const pages = this.decodeRow(blobId, recycled);
    this.copyBlobs.set(blobId, pages);
    return pages;
  }

  private decodeRow(blobId: number, reuse?: Buffer): Buffer {
    const row = this.blob.get(blobId) as BlobRow | undefined;
    if (row === undefined) throw new WpsnapError('STORE_CORRUPT', `${this.path}: blob ${blobId} is missing`);
    try {
      return decodeBlob(row, reuse);
    } catch (error) {
      if (error instanceof CorruptError) throw new WpsnapError('STORE_CORRUPT', `${this.path}: ${error.message}`);
      throw error;
    }
  }

  /** A blob's pages, decompressed (LRU cache): not to be modified. */
  private blobPages(blobId: number): Buffer {
    let pages = this.blobCache.get(blobId);
    if (pages === undefined) {
      pages = this.decodeRow(blobId);
      if (this.blobCache.size >= BLOB_CACHE) this.blobCache.delete(this.blobCache.keys().next().value as number);
    } else {
      this.blobCache.delete(blobId); // re-inserted below: most recently used last
    }
    this.blobCache.set(blobId, pages);
    return pages;
  }
}
