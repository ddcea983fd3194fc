// What a store holds of a snapshot's pages, read directly: the first word of
// each page through the chain, the pages a snapshot stores itself, and a
// generation's recorded page sets (generation_pages).
import Database from 'better-sqlite3';
import { decodeIndex, type IndexRow } from '../../store/codec.js';
import { Store } from '../../store/store.js';

export const PAGE = 4096n;

/** The first word of each page of [base, base + pages) as snapshot `ref` reads it. */
export function pageWords(store: string, ref: string, base: bigint, pages: number): bigint[] {
  const s = Store.open(store, { readonly: true, onWarning: () => undefined });
  try {
    const p = s.processes(s.find(ref).id)[0]!;
    return Array.from({ length: pages }, (_, i) => s.readPage(p.processId, base + BigInt(i) * PAGE).readBigUInt64LE(0));
  } finally {
    void s.close();
  }
}

function snapshotId(db: Database.Database, ref: string): number {
  return /^\d+$/.test(ref) ? Number(ref) : (db.prepare('SELECT id FROM snapshots WHERE name = ?').get(ref) as { id: number }).id;
}

/** Page addresses snapshot `ref` stores itself (its own page_index rows), sorted. */
export function storedPages(store: string, ref: string): bigint[] {
  const db = new Database(store, { readonly: true });
  try {
    const rows = db
      .prepare('SELECT first_address, last_address, count, entries FROM page_index WHERE process_id IN (SELECT id FROM processes WHERE snapshot_id = ?)')
      .safeIntegers(true)
      .all(snapshotId(db, ref)) as IndexRow[];
    return rows.flatMap((r) => [...decodeIndex(r).addresses]).sort((a, b) => (a < b ? -1 : 1));
  } finally {
    db.close();
  }
}

/** The pages generation `ref` records as written since its parent ('dirty') or turned zero ('zeroed'), sorted. */
export function generationPages(store: string, ref: string, kind: 'dirty' | 'zeroed'): bigint[] {
  const db = new Database(store, { readonly: true });
  try {
    const rows = db
      .prepare('SELECT ranges FROM generation_pages WHERE kind = ? AND process_id IN (SELECT id FROM processes WHERE snapshot_id = ?)')
      .all(kind, snapshotId(db, ref)) as Array<{ ranges: Buffer }>;
    const out: bigint[] = [];
    for (const r of rows) {
      const pairs = new BigUint64Array(r.ranges.buffer.slice(r.ranges.byteOffset, r.ranges.byteOffset + r.ranges.length));
      for (let i = 0; i < pairs.length; i += 2) for (let k = 0n; k < pairs[i + 1]!; k++) out.push(pairs[i]! + k * PAGE);
    }
    return out.sort((a, b) => (a < b ? -1 : 1));
  } finally {
    db.close();
  }
}

/** Of `pages`, those in [base, base + n pages). */
export const within = (pages: bigint[], base: bigint, n: number): bigint[] => pages.filter((p) => p >= base && p < base + BigInt(n) * PAGE);
