// The dedup index: content hash → content id, an open-addressing hash table in
// typed arrays (24 bytes a slot, ≤ 70% full). It is rebuilt from the hash lists
// of the blobs table (append-only, so reading what is new is one range query),
// which spares SQLite a random B-tree insert per new page.
import { HASH_BYTES } from './worker-pool.js';

const WORDS = HASH_BYTES / 4;
const MAX_LOAD = 0.7;

/**
 * Open addressing with linear probing over HASH_BYTES-byte hashes (given as 4
 * words) mapping to a non-negative number, kept at most MAX_LOAD full.
 */
class HashSlots {
  protected words: Uint32Array;
  /** Value of each slot; -1 = empty. */
  protected values: Float64Array;
  protected mask: number;
  private count = 0;

  /** `slots` must be a power of two. */
  protected constructor(slots: number) {
    this.words = new Uint32Array(slots * WORDS);
    this.values = new Float64Array(slots).fill(-1);
    this.mask = slots - 1;
  }

  get size(): number {
    return this.count;
  }

  /** The value of the hash at hashes[at .. at + 4), or -1. */
  get(hashes: Uint32Array, at: number): number {
    return this.values[this.slotOf(hashes, at)] as number;
  }

  /** The slot holding this hash, or the empty slot where it would go. */
  protected slotOf(hashes: Uint32Array, at: number): number {
    const words = this.words;
    const a = hashes[at] as number;
    const b = hashes[at + 1] as number;
    const c = hashes[at + 2] as number;
    const d = hashes[at + 3] as number;
    for (let slot = a & this.mask; ; slot = (slot + 1) & this.mask) {
      if ((this.values[slot] as number) < 0) return slot;
      const w = slot * WORDS;
      if (words[w] === a && words[w + 1] === b && words[w + 2] === c && words[w + 3] === d) return slot;
    }
  }

  /** Store a hash and its value in an empty slot. */
  protected fill(slot: number, hashes: Uint32Array, at: number, value: number): void {
    this.words.set(hashes.subarray(at, at + WORDS), slot * WORDS);
    this.values[slot] = value;
    this.count++;
  }

  /** Empty a slot (the caller keeps the probe runs intact). */
  protected clear(slot: number): void {
    this.values[slot] = -1;
    this.count--;
  }

  /** Make room for one more entry. */
  protected reserve(): void {
    if ((this.count + 1) / this.values.length <= MAX_LOAD) return;
    const oldWords = this.words;
    const oldValues = this.values;
    const size = oldValues.length * 2;
    this.words = new Uint32Array(size * WORDS);
    this.values = new Float64Array(size).fill(-1);
    this.mask = size - 1;
    this.count = 0;
    for (let slot = 0; slot < oldValues.length; slot++) {
      const value = oldValues[slot] as number;
      if (value >= 0) this.fill(this.slotOf(oldWords, slot * WORDS), oldWords, slot * WORDS, value);
    }
  }
}

/** Content hash → content id. */
export class ContentIndex extends HashSlots {
  constructor(capacity = 1 << 16) {
    let size = 1 << 10;
    while (size < capacity) size *= 2;
    super(size);
  }

  /** Bytes held by the table. */
  get bytes(): number {
    return this.words.byteLength + this.values.byteLength;
  }

  /** Record a hash's content id (keeps the first one if the hash is already known). */
  set(hashes: Uint32Array, at: number, cid: number): void {
    this.reserve();
    const slot = this.slotOf(hashes, at);
    if ((this.values[slot] as number) < 0) this.fill(slot, hashes, at, cid);
  }
}

/** A Uint32Array over hash bytes, copying them if they are not 4-byte aligned. */
export function hashWords(bytes: Uint8Array): Uint32Array {
  if (bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  return new Uint32Array(Uint8Array.from(bytes).buffer);
}

/**
 * Hashes claimed by batches in flight → a claim number, with removal.
 * Backward-shift deletion, so no tombstones build up over a long snapshot.
 */
export class ClaimTable extends HashSlots {
  constructor(capacity = 1 << 12) {
    let size = 1 << 10;
    while (size < capacity / MAX_LOAD) size *= 2;
    super(size);
  }

  /** Claim a hash that is not claimed yet. */
  add(hashes: Uint32Array, at: number, value: number): void {
    this.reserve();
    this.fill(this.slotOf(hashes, at), hashes, at, value);
  }

  /** Drop the hash's claim if it is `value`'s. */
  delete(hashes: Uint32Array, at: number, value: number): void {
    let hole = this.slotOf(hashes, at);
    if (value < 0 || this.values[hole] !== value) return;
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
    this.clear(hole);
  }
}
