// The dedup index: content hash → content id, an open-addressing hash table in
// typed arrays (24 bytes a slot, ≤ 70% full). It is rebuilt from the hash lists
// of the blobs table (append-only, so reading what is new is one range query),
// which spares SQLite a random B-tree insert per new page.
import { HASH_BYTES } from './worker-pool.js';

const WORDS = HASH_BYTES / 4;
const MAX_LOAD = 0.7;

export class ContentIndex {
  private words: Uint32Array;
  /** Content id of each slot; -1 = empty. */
  private cids: Float64Array;
  private mask: number;
  private count = 0;

  constructor(capacity = 1 << 16) {
    let size = 1 << 10;
    while (size < capacity) size *= 2;
    this.words = new Uint32Array(size * WORDS);
    this.cids = new Float64Array(size).fill(-1);
    this.mask = size - 1;
  }

  get size(): number {
    return this.count;
  }

  /** Bytes held by the table. */
  get bytes(): number {
    return this.words.byteLength + this.cids.byteLength;
  }

  /** The content id of the hash at hashes[at .. at + 4), or -1. */
  get(hashes: Uint32Array, at: number): number {
    const words = this.words;
    const a = hashes[at] as number;
    const b = hashes[at + 1] as number;
    const c = hashes[at + 2] as number;
    const d = hashes[at + 3] as number;
    for (let slot = a & this.mask; ; slot = (slot + 1) & this.mask) {
      const cid = this.cids[slot] as number;
      if (cid < 0) return -1;
      const w = slot * WORDS;
      if (words[w] === a && words[w + 1] === b && words[w + 2] === c && words[w + 3] === d) return cid;
    }
  }

  /** Record a hash's content id (keeps the first one if the hash is already known). */
  set(hashes: Uint32Array, at: number, cid: number): void {
    if ((this.count + 1) / this.cids.length > MAX_LOAD) this.grow();
    this.insert(hashes, at, cid);
  }

  private insert(hashes: Uint32Array, at: number, cid: number): void {
    const words = this.words;
    const a = hashes[at] as number;
    const b = hashes[at + 1] as number;
    const c = hashes[at + 2] as number;
    const d = hashes[at + 3] as number;
    for (let slot = a & this.mask; ; slot = (slot + 1) & this.mask) {
      const w = slot * WORDS;
      if ((this.cids[slot] as number) < 0) {
        words[w] = a;
        words[w + 1] = b;
        words[w + 2] = c;
        words[w + 3] = d;
        this.cids[slot] = cid;
        this.count++;
        return;
      }
      if (words[w] === a && words[w + 1] === b && words[w + 2] === c && words[w + 3] === d) return;
    }
  }

  private grow(): void {
    const oldWords = this.words;
    const oldCids = this.cids;
    const size = oldCids.length * 2;
    this.words = new Uint32Array(size * WORDS);
    this.cids = new Float64Array(size).fill(-1);
    this.mask = size - 1;
    this.count = 0;
    for (let slot = 0; slot < oldCids.length; slot++) {
      const cid = oldCids[slot] as number;
      if (cid >= 0) this.insert(oldWords, slot * WORDS, cid);
    }
  }
}

/** A Uint32Array over hash bytes, copying them if they are not 4-byte aligned. */
export function hashWords(bytes: Uint8Array): Uint32Array {
  if (bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  return new Uint32Array(Uint8Array.from(bytes).buffer);
}
