// The write path for page batches: worker scan (zero test + hash) → dedup on
// this thread against the in-memory ContentIndex → worker packs the new pages
// into zstd blobs → one SQLite transaction (grouped with whatever else is
// ready) writes the blobs and one packed page_index row per batch.
//
// Dedup across batches in flight: the first batch to see a new hash claims it;
// a later batch that meets the same hash waits for the claimer's commit and
// reuses its content id. Claims are made synchronously on this thread, so a
// batch only ever waits on batches claimed before it: no cycles.
import type Database from 'better-sqlite3';
import { WpsnapError } from '../common/errors.js';
import { PAGE_SIZE, type PageBatch } from '../snapshot-format/model.js';
import { blobOfContent, contentId, encodeIndex, lowerBound, MAX_ADDRESS, MAX_INDEX_ENTRIES, type DecodedIndex } from './codec.js';
import { ClaimTable, ContentIndex, hashWords } from './content-index.js';
import { BLOB_PAGES, HASH_BYTES, type PackedBlob, type ScanResult, type WorkerPool } from './worker-pool.js';

/** What one batch added, once durable. */
export interface BatchResult {
  pages: number;
  zeroPages: number;
  pagesSaved: number;
  pagesNew: number;
  bytesStored: number;
}

interface Batch {
  /** Names the batch in claim numbers (claim = seq × SLOT_LIMIT + slot). */
  seq: number;
  processId: number;
  addresses: BigUint64Array;
  /** Page indices (into the batch) of the non-zero pages, in address order. */
  order: Uint32Array;
  /** Per page: content id ≥ 0; ZERO; OWN (slotOf); WAIT (claimOf). */
  cidOf: Float64Array;
  slotOf: Int32Array;
  /** Per WAIT page: the claim number it waits on. */
  claimOf: Float64Array;
  /** The batches this one waits on, by seq. */
  waitsOn: Map<number, Batch>;
  /** Pages this batch claimed as new content, one slot each. */
  slotCount: number;
  /** Page index (into the batch) holding each claimed slot's content. */
  slotPages: Uint32Array;
  slotHashes: Buffer;
  slotCids: Float64Array;
  blobs: PackedBlob[];
  /** The pack() buffer the blobs are views of, recycled after the commit. */
  output: ArrayBuffer | undefined;
  zeroPages: number;
  written: Promise<void>;
  settle: (error?: Error) => void;
}

const ZERO = -1;
const OWN = -2;
const WAIT = -3;
/** Slots per batch in a claim number: a batch holds at most MAX_INDEX_ENTRIES pages. */
const SLOT_LIMIT = MAX_INDEX_ENTRIES;
const WORDS = HASH_BYTES / 4;
/** Highest word of a user address below MAX_ADDRESS (2^63 - 1). */
const MAX_ADDRESS_HIGH_WORD = Number(MAX_ADDRESS >> 32n);

/**
 * A generation's process: its pages whose content id equals the parent's at
 * the same address are not indexed (they resolve through the parent); every
 * address with data is remembered, to find the pages that turned zero.
 */
interface Baseline {
  parent: DecodedIndex;
  seen: BigUint64Array[];
  stored: number;
}

export class PageSink {
  private readonly baselines = new Map<number, Baseline>();
  /** Batches between dedup and commit, by seq. */
  private readonly inFlight = new Map<number, Batch>();
  /** New content claimed by batches in flight: hash → claim number. */
  private readonly claims = new ClaimTable();
  private nextSeq = 1;
  private readonly ready: Array<{ batch: Batch; done: (error?: Error) => void }> = [];
  private flushScheduled = false;
  private index: ContentIndex | undefined;
  /** Highest blob id whose hashes are in `index`. */
  private indexedThrough = 0;
  /** Highest blob id this sink committed (and indexed as it did). */
  private ownThrough = 0;
  /** PRAGMA data_version at the last refresh: it changes when another connection commits. */
  private dataVersion = -1;
  private readonly newBlobs: Database.Statement;
  private readonly readDataVersion: Database.Statement;
  private readonly countPages: Database.Statement;
  private readonly insertBlob: Database.Statement;
  private readonly insertIndex: Database.Statement;
  private readonly commitGroup: (group: Batch[]) => void;

  constructor(
    db: Database.Database,
    private readonly pool: WorkerPool,
  ) {
    this.newBlobs = db.prepare('SELECT id, pages, hashes FROM blobs WHERE id > ? ORDER BY id');
    this.readDataVersion = db.prepare('PRAGMA data_version').pluck();
    this.countPages = db.prepare('SELECT coalesce(sum(pages), 0) FROM blobs').pluck();
    this.insertBlob = db.prepare('INSERT INTO blobs (pages, codec, hashes, data) VALUES (?, ?, ?, ?)');
    this.insertIndex = db.prepare(
      'INSERT INTO page_index (process_id, first_address, last_address, count, entries) VALUES (?, ?, ?, ?, ?)',
    );
    this.commitGroup = db.transaction((group: Batch[]) => {
      for (const batch of group) this.write(batch);
    }).immediate as (group: Batch[]) => void;
  }

  /** Index only the pages of `processId` whose content differs from `parent` (a generation's parent, resolved). */
  setBaseline(processId: number, parent: DecodedIndex): void {
    this.baselines.set(processId, { parent, seen: [], stored: 0 });
  }

  /** End a process's baseline: every address with data seen, and how many entries were indexed. */
  takeBaseline(processId: number): { seen: BigUint64Array[]; stored: number } | undefined {
    const b = this.baselines.get(processId);
    this.baselines.delete(processId);
    return b;
  }

  /** Forget the dedup index (blobs were deleted): the next batch rebuilds it. */
  invalidate(): void {
    if (this.inFlight.size > 0) throw new Error('cannot invalidate the dedup index while batches are in flight');
    this.index = undefined;
    this.indexedThrough = 0;
    this.dataVersion = -1;
  }

  /** Load (or catch up) the dedup index now, rather than at the first batch. */
  prepare(): void {
    this.refresh();
  }

  /** Bytes held by the dedup index. */
  get indexBytes(): number {
    return this.index?.bytes ?? 0;
  }

  /** Add the hashes of blobs committed since the last call (by anyone) to the dedup index. */
  private refresh(): ContentIndex {
    const version = this.readDataVersion.get() as number;
    if (this.index !== undefined && version === this.dataVersion) {
      // Nobody else committed: every blob past indexedThrough is ours, indexed by committed().
      this.indexedThrough = Math.max(this.indexedThrough, this.ownThrough);
      return this.index;
    }
    this.dataVersion = version;
    // Sized for what the store holds now, so loading it does not rehash.
    const index = (this.index ??= new ContentIndex(Math.ceil((this.countPages.get() as number) / 0.7)));
    for (const row of this.newBlobs.iterate(this.indexedThrough) as Iterable<{ id: number; pages: number; hashes: Buffer }>) {
      const words = hashWords(row.hashes);
      const pages = Math.min(row.pages, Math.floor(words.length / 4));
      for (let k = 0; k < pages; k++) index.set(words, k * 4, contentId(row.id, k));
      this.indexedThrough = row.id;
    }
    return index;
  }

  /** Store a batch; resolves once it is committed. */
  async add(processId: number, input: PageBatch): Promise<BatchResult> {
    const n = input.addresses.length;
    const order = checkBatch(input);
    if (n === 0) return { pages: 0, zeroPages: 0, pagesSaved: 0, pagesNew: 0, bytesStored: 0 };
    const copy = this.pool.buffer(n * PAGE_SIZE); // transferred to the worker, recycled after pack
    new Uint8Array(copy).set(input.data.subarray(0, n * PAGE_SIZE));
    const scan = await this.pool.scan(this.pool.pick(), copy);
    let batch: Batch;
    try {
      batch = this.dedup(processId, input.addresses, order, scan);
    } catch (error) {
      this.pool.release(scan);
      throw new WpsnapError('STORE_READ', `dedup lookup: ${(error as Error).message}`, { cause: error });
    }
    try {
      if (batch.slotCount > 0) {
        const packed = await this.pool.pack(scan, batch.slotPages.slice(0, batch.slotCount));
        batch.blobs = packed.blobs;
        batch.output = packed.output;
      } else {
        this.pool.release(scan);
      }
      await Promise.all([...batch.waitsOn.values()].map((claimer) => claimer.written));
      await new Promise<void>((resolve, reject) => {
        this.ready.push({ batch, done: (error) => (error === undefined ? resolve() : reject(error)) });
        this.scheduleFlush();
      });
    } catch (error) {
      this.abandon(batch, error as Error);
      throw error;
    }
    return {
      pages: n,
      zeroPages: batch.zeroPages,
      pagesSaved: n - batch.zeroPages,
      pagesNew: batch.slotCount,
      bytesStored: batch.blobs.reduce((sum, blob) => sum + blob.data.length, 0),
    };
  }

  private dedup(processId: number, addresses: BigUint64Array, allOrder: Uint32Array, scan: ScanResult): Batch {
    const n = addresses.length;
    const index = this.refresh();
    const words = hashWords(scan.hashes);
    let zeroPages = 0;
    for (let i = 0; i < n; i++) if (scan.zero[i] === 1) zeroPages++;
    const order = new Uint32Array(n - zeroPages);
    let k = 0;
    for (let j = 0; j < n; j++) {
      const page = allOrder[j] as number;
      if (scan.zero[page] !== 1) order[k++] = page;
    }
    let settle!: (error?: Error) => void;
    const written = new Promise<void>((resolve, reject) => {
      settle = (error) => (error === undefined ? resolve() : reject(error));
    });
    written.catch(() => undefined); // waiters see the rejection; nobody else must
    const batch: Batch = {
      seq: this.nextSeq++,
      processId,
      addresses,
      order,
      cidOf: new Float64Array(n),
      slotOf: new Int32Array(n),
      claimOf: new Float64Array(n),
      waitsOn: new Map(),
      slotCount: 0,
      slotPages: new Uint32Array(n),
      slotHashes: Buffer.alloc(0),
      slotCids: new Float64Array(0),
      blobs: [],
      output: undefined,
      zeroPages,
      written,
      settle,
    };
    this.inFlight.set(batch.seq, batch);
    const ownFirst = batch.seq * SLOT_LIMIT;
    for (let i = 0; i < n; i++) {
      if (scan.zero[i] === 1) {
        batch.cidOf[i] = ZERO;
        continue;
      }
      const at = i * WORDS;
      const cid = index.get(words, at);
      if (cid >= 0) {
        batch.cidOf[i] = cid;
        continue;
      }
      const claim = this.claims.get(words, at);
      if (claim >= ownFirst) {
        batch.cidOf[i] = OWN;
        batch.slotOf[i] = claim - ownFirst;
      } else if (claim >= 0) {
        const claimer = this.inFlight.get(Math.floor(claim / SLOT_LIMIT)) as Batch;
        batch.cidOf[i] = WAIT;
        batch.claimOf[i] = claim;
        batch.waitsOn.set(claimer.seq, claimer);
      } else {
        const slot = batch.slotCount++;
        batch.slotPages[slot] = i;
        this.claims.add(words, at, ownFirst + slot);
        batch.cidOf[i] = OWN;
        batch.slotOf[i] = slot;
      }
    }
    const slotWords = new Uint32Array(batch.slotCount * WORDS);
    for (let slot = 0; slot < batch.slotCount; slot++) {
      const from = (batch.slotPages[slot] as number) * WORDS;
      slotWords.set(words.subarray(from, from + WORDS), slot * WORDS);
    }
    batch.slotHashes = Buffer.from(slotWords.buffer);
    batch.slotCids = new Float64Array(batch.slotCount);
    return batch;
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      const group = this.ready.splice(0);
      if (group.length === 0) return;
      try {
        this.commitGroup(group.map((entry) => entry.batch));
      } catch (error) {
        const failure =
          error instanceof WpsnapError
            ? error
            : new WpsnapError('STORE_WRITE', `write page batch: ${(error as Error).message}`, { cause: error });
        for (const entry of group) entry.done(failure);
        return;
      }
      for (const entry of group) {
        this.committed(entry.batch);
        entry.batch.settle();
        entry.done();
      }
    });
  }

  /** Inside the transaction: the batch's blobs, then its index row. */
  private write(batch: Batch): void {
    let slot = 0;
    for (const blob of batch.blobs) {
      const pages = Math.min(BLOB_PAGES, batch.slotCount - slot);
      const hashes = batch.slotHashes.subarray(slot * HASH_BYTES, (slot + pages) * HASH_BYTES);
      const info = this.insertBlob.run(pages, blob.codec, hashes, blob.data);
      const blobId = Number(info.lastInsertRowid);
      for (let k = 0; k < pages; k++, slot++) batch.slotCids[slot] = contentId(blobId, k);
    }
    if (slot !== batch.slotCount) throw new Error(`packed ${slot} pages, expected ${batch.slotCount}`);
    const count = batch.order.length;
    if (count === 0) return;
    // Addresses move as pairs of 32-bit words: no BigInt per page.
    const from = new Uint32Array(batch.addresses.buffer, batch.addresses.byteOffset, batch.addresses.length * 2);
    const addresses = new BigUint64Array(count);
    const to = new Uint32Array(addresses.buffer);
    const cids = new Float64Array(count);
    for (let j = 0; j < count; j++) {
      const page = batch.order[j] as number;
      to[2 * j] = from[2 * page] as number;
      to[2 * j + 1] = from[2 * page + 1] as number;
      const cid = batch.cidOf[page] as number;
      if (cid >= 0) cids[j] = cid;
      else if (cid === OWN) cids[j] = batch.slotCids[batch.slotOf[page] as number] as number;
      else {
        const claim = batch.claimOf[page] as number;
        const claimer = batch.waitsOn.get(Math.floor(claim / SLOT_LIMIT)) as Batch;
        cids[j] = claimer.slotCids[claim % SLOT_LIMIT] as number;
      }
    }
    const baseline = this.baselines.get(batch.processId);
    let kept = count;
    if (baseline !== undefined) {
      baseline.seen.push(addresses.slice());
      kept = 0;
      for (let j = 0; j < count; j++) {
        const at = lowerBound(baseline.parent.addresses, addresses[j] as bigint);
        const same = baseline.parent.addresses[at] === addresses[j] && baseline.parent.cids[at] === cids[j];
        if (same) continue;
        addresses[kept] = addresses[j] as bigint;
        cids[kept] = cids[j] as number;
        kept++;
      }
      baseline.stored += kept;
      if (kept === 0) return;
    }
    this.insertIndex.run(
      batch.processId,
      addresses[0] as bigint,
      addresses[kept - 1] as bigint,
      kept,
      encodeIndex(addresses.subarray(0, kept), cids.subarray(0, kept)),
    );
  }

  /** After commit: the batch's new content goes into the dedup index, its claims go. */
  private committed(batch: Batch): void {
    for (const cid of batch.slotCids) this.ownThrough = Math.max(this.ownThrough, blobOfContent(cid));
    if (this.index !== undefined && batch.slotCount > 0) {
      const words = hashWords(batch.slotHashes);
      for (let slot = 0; slot < batch.slotCount; slot++) {
        this.index.set(words, slot * WORDS, batch.slotCids[slot] as number);
      }
    }
    if (batch.output !== undefined) this.pool.recycleOutput(batch.output);
    batch.output = undefined;
    this.release(batch);
  }

  /** Drop the batch's claims. */
  private release(batch: Batch): void {
    const words = hashWords(batch.slotHashes);
    const ownFirst = batch.seq * SLOT_LIMIT;
    for (let slot = 0; slot < batch.slotCount; slot++) this.claims.delete(words, slot * WORDS, ownFirst + slot);
    this.inFlight.delete(batch.seq);
  }

  private abandon(batch: Batch, error: Error): void {
    this.release(batch);
    batch.settle(error);
  }
}

/** Validate a batch; returns its page indices in address order. */
function checkBatch(batch: PageBatch): Uint32Array {
  const n = batch.addresses.length;
  if (n > MAX_INDEX_ENTRIES) {
    throw new WpsnapError('INVALID_BATCH', `page batch of ${n} pages exceeds the limit of ${MAX_INDEX_ENTRIES}`);
  }
  if (batch.data.length < n * PAGE_SIZE) {
    throw new WpsnapError('INVALID_BATCH', `page batch holds ${batch.data.length} bytes for ${n} pages`);
  }
  // Checked as pairs of 32-bit words (low, high): no BigInt per page.
  const words = new Uint32Array(batch.addresses.buffer, batch.addresses.byteOffset, n * 2);
  const order = new Uint32Array(n);
  let sorted = true;
  for (let i = 0; i < n; i++) {
    order[i] = i;
    const low = words[2 * i] as number;
    const high = words[2 * i + 1] as number;
    if ((low & (PAGE_SIZE - 1)) !== 0 || high > MAX_ADDRESS_HIGH_WORD) {
      throw new WpsnapError('INVALID_BATCH', `page address 0x${(batch.addresses[i] as bigint).toString(16)} is not a page-aligned user address`);
    }
    if (i > 0) {
      const previousHigh = words[2 * i - 1] as number;
      if (high < previousHigh || (high === previousHigh && low <= (words[2 * i - 2] as number))) sorted = false;
    }
  }
  if (!sorted) {
    const addresses = batch.addresses;
    order.sort((a, b) => {
      const x = addresses[a] as bigint;
      const y = addresses[b] as bigint;
      return x < y ? -1 : x > y ? 1 : 0;
    });
    for (let j = 1; j < n; j++) {
      if (addresses[order[j] as number] === addresses[order[j - 1] as number]) {
        throw new WpsnapError(
          'INVALID_BATCH',
          `page 0x${(addresses[order[j] as number] as bigint).toString(16)} appears twice in one batch`,
        );
      }
    }
  }
  return order;
}
