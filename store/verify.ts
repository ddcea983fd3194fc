// verify(): re-read every stored page of a snapshot and say which are damaged.
import type Database from 'better-sqlite3';
import { checkBlobRow, blobOfContent, decodeIndex, indexInBlob, type BlobRow, type DecodedIndex, type IndexRow } from './codec.js';
import { HASH_BYTES, type WorkerPool } from './worker-pool.js';

/** Most problems listed one by one; the rest are counted. */
const MAX_PROBLEMS = 1000;
/** Blobs handed to the worker pool per round. */
const VERIFY_CHUNK = 64;

interface Ref {
  pid: number;
  address: bigint;
  index: number;
}

/**
 * Decode each index row of the processes, check every entry points at an
 * existing blob and index, decompress each blob in the worker pool, re-hash its
 * pages and compare with the stored hashes.
 */
export async function verifyPages(
  db: Database.Database,
  pool: WorkerPool,
  processes: Array<{ pid: number; processId: number }>,
): Promise<{ pagesChecked: number; problems: string[] }> {
  const problems: string[] = [];
  let dropped = 0;
  const problem = (text: string): void => {
    if (problems.length < MAX_PROBLEMS) problems.push(text);
    else dropped++;
  };
  const pageName = (ref: Ref): string => `pid ${ref.pid} page 0x${ref.address.toString(16)}`;

  const refs = new Map<number, Ref[]>();
  const indexRows = db
    .prepare('SELECT id, first_address, last_address, count, entries FROM page_index WHERE process_id = ? ORDER BY first_address')
    .safeIntegers(true);
  for (const p of processes) {
    const seen = new Set<bigint>();
    for (const row of indexRows.all(p.processId) as Array<IndexRow & { id: bigint }>) {
      let index: DecodedIndex;
      try {
        index = decodeIndex(row);
      } catch (error) {
        problem(`pid ${p.pid}: page index row ${row.id}: ${(error as Error).message}`);
        continue;
      }
      for (let i = 0; i < index.addresses.length; i++) {
        const address = index.addresses[i] as bigint;
        if (seen.has(address)) problem(`pid ${p.pid} page 0x${address.toString(16)}: stored more than once`);
        seen.add(address);
        const cid = index.cids[i] as number;
        const blob = blobOfContent(cid);
        let list = refs.get(blob);
        if (list === undefined) refs.set(blob, (list = []));
        list.push({ pid: p.pid, address, index: indexInBlob(cid) });
      }
    }
  }

  let pagesChecked = 0;
  const blobIds = [...refs.keys()].sort((a, b) => a - b);
  const select = db.prepare('SELECT id, pages, codec, hashes, data FROM blobs WHERE id = ?');
  for (let first = 0; first < blobIds.length; first += VERIFY_CHUNK) {
    const rows: BlobRow[] = [];
    for (const id of blobIds.slice(first, first + VERIFY_CHUNK)) {
      const list = refs.get(id) as Ref[];
      const row = select.get(id) as BlobRow | undefined;
      if (row === undefined) {
        for (const ref of list) problem(`${pageName(ref)}: points at blob ${id}, which does not exist`);
        continue;
      }
      try {
        checkBlobRow(row);
      } catch (error) {
        for (const ref of list) problem(`${pageName(ref)}: blob ${id}: ${(error as Error).message}`);
        continue;
      }
      rows.push(row);
    }
    const results = await pool.check(rows.map((row) => ({ pages: row.pages, codec: row.codec, data: row.data })));
    rows.forEach((row, k) => {
      const result = results[k];
      for (const ref of refs.get(row.id) as Ref[]) {
        pagesChecked++;
        if (result === undefined || result.error !== undefined) {
          problem(`${pageName(ref)}: blob ${row.id} does not decompress: ${result?.error ?? 'no result'}`);
        } else if (ref.index >= row.pages) {
          problem(`${pageName(ref)}: points at index ${ref.index} of blob ${row.id}, which holds ${row.pages} pages`);
        } else {
          const at = ref.index * HASH_BYTES;
          if (!row.hashes.subarray(at, at + HASH_BYTES).equals(result.hashes.subarray(at, at + HASH_BYTES))) {
            problem(`${pageName(ref)}: content hash mismatch (blob ${row.id} index ${ref.index})`);
          }
        }
      }
    });
  }
  if (dropped > 0) problems.push(`... and ${dropped} more problems`);
  return { pagesChecked, problems };
}
