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

/**
 * Hashes claimed by batches in flight → a claim number, with removal. Linear
 * probing with backward-shift deletion, so no tombstones build up over a long
 * snapshot. Keys are HASH_BYTES-byte hashes given as 4 words.
 */
export class ClaimTable {
  private words: Uint32Array;
  /** Claim number of each slot; -1 = empty. */
  private values: Float64Array;
  private mask: number;
  private count = 0;

  constructor(capacity = 1 << 12) {
    let size = 1 << 10;
    while (size < capacity / MAX_LOAD) size *= 2;
    this.words = new Uint32Array(size * WORDS);
    this.values = new Float64Array(size).fill(-1);
    this.mask = size - 1;
  }

  get size(): number {
    return this.count;
  }

  /** The claim number of the hash at hashes[at .. at + 4), or -1. */
  get(hashes: Uint32Array, at: number): number {
    const slot = this.find(hashes, at);
    return slot < 0 ? -1 : (this.values[slot] as number);
  }

  /** Claim a hash that is not claimed yet. */
  add(hashes: Uint32Array, at: number, value: number): void {
    if ((this.count + 1) / this.values.length > MAX_LOAD) this.grow();
    const words = this.words;
    let slot = (hashes[at] as number) & this.mask;
    while ((this.values[slot] as number) >= 0) slot = (slot + 1) & this.mask;
    const w = slot * WORDS;
    words[w] = hashes[at] as number;
    words[w + 1] = hashes[at + 1] as number;
    words[w + 2] = hashes[at + 2] as number;
    words[w + 3] = hashes[at + 3] as number;
    this.values[slot] = value;
    this.count++;
  }

  /** Drop the hash's claim if it is `value`'s. */
  delete(hashes: Uint32Array, at: number, value: number): void {
    let hole = this.find(hashes, at);
    if (hole < 0 || this.values[hole] !== value) return;
    const words = this.words;
    const values = this.values;
    const mask = this.mask;
    // Shift later members of the probe run back into the hole.
    for (let j = (hole + 1) & mask; (values[j] as number) >= 0; j = (j + 1) & mask) {
      const home = (words[j * WORDS] as number) & mask;
      const stays = hole <= j ? hole < home && home <= j : hole < home || home <= j;
      if (stays) continue;
      words.copyWithin(hole * WORDS, j * WORDS, (j + 1) * WORDS);
      values[hole] = values[j] as number;
      hole = j;
    }
    values[hole] = -1;
    this.count--;
  }

  private find(hashes: Uint32Array, at: number): number {
    const words = this.words;
    const a = hashes[at] as number;
    const b = hashes[at + 1] as number;
    const c = hashes[at + 2] as number;
    const d = hashes[at + 3] as number;
    for (let slot = a & this.mask; ; slot = (slot + 1) & this.mask) {
      if ((this.values[slot] as number) < 0) return -1;
      const w = slot * WORDS;
      if (words[w] === a && words[w + 1] === b && words[w + 2] === c && words[w + 3] === d) return slot;
    }
  }

  private grow(): void {
    const oldWords = this.words;
    const oldValues = this.values;
    const size = oldValues.length * 2;
    this.words = new Uint32Array(size * WORDS);
    this.values = new Float64Array(size).fill(-1);
    this.mask = size - 1;
    this.count = 0;
    for (let slot = 0; slot < oldValues.length; slot++) {
      const value = oldValues[slot] as number;
      if (value >= 0) this.add(oldWords, slot * WORDS, value);
    }
  }
}
