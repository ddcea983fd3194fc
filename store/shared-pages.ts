// A group snapshot's shared memory (core/group.ts): a page of a file several
// members map (a memfd, shmem, a SysV segment) is copied once, by whichever
// member's engine came first, and indexed for that member only. Once every
// page is stored, each member's mappings of the file get index entries for the
// pages another member's mapping holds at the same file page (the same content
// id: nothing is stored twice), and the lost ranges another member recorded
// for them. A page no member holds nor lost was zero at T for every member.
import type Database from 'better-sqlite3';
import { PAGE_SIZE, type LostRange } from '../snapshot-format/model.js';
import { decodeIndex, encodeIndex, type IndexRow } from './codec.js';

const PAGE = BigInt(PAGE_SIZE);
/** Entries per index row written here (the format allows up to 2^20). */
const ROW_ENTRIES = 4096;

/** One member's mapping of a shared file: [start, end) in its address space, from file page firstPage. */
export interface SharedMapping {
  processId: number;
  start: bigint;
  end: bigint;
  firstPage: number;
}

interface Found {
  cidByPage: Map<number, number>;
  lostByPage: Map<number, LostRange['reason']>;
  /** Per mapping: the file pages it already has an entry or a lost range for. */
  own: Array<Set<number>>;
}

function pageOf(m: SharedMapping, address: bigint): number {
  return m.firstPage + Number((address - m.start) / PAGE);
}

function readHeld(db: Database.Database, mappings: SharedMapping[]): Found {
  const rows = db.prepare('SELECT first_address, last_address, count, entries FROM page_index WHERE process_id = ? AND first_address < ? AND last_address >= ?');
  const lost = db.prepare('SELECT address, pages, reason FROM lost WHERE process_id = ? AND address < ? AND address + pages * 4096 > ?');
  const found: Found = { cidByPage: new Map(), lostByPage: new Map(), own: [] };
  for (const m of mappings) {
    const own = new Set<number>();
    for (const row of rows.all(m.processId, m.end, m.start) as IndexRow[]) {
      const { addresses, cids } = decodeIndex(row);
      for (let i = 0; i < addresses.length; i++) {
        const address = addresses[i]!;
        if (address < m.start || address >= m.end) continue;
        const page = pageOf(m, address);
        found.cidByPage.set(page, cids[i]!);
        own.add(page);
      }
    }
    for (const l of lost.all(m.processId, m.end, m.start) as Array<{ address: bigint | number; pages: number; reason: LostRange['reason'] }>) {
      const from = BigInt(l.address) > m.start ? BigInt(l.address) : m.start;
      const to = BigInt(l.address) + BigInt(l.pages) * PAGE < m.end ? BigInt(l.address) + BigInt(l.pages) * PAGE : m.end;
      for (let a = from; a < to; a += PAGE) {
        const page = pageOf(m, a);
        found.lostByPage.set(page, l.reason);
        own.add(page);
      }
    }
    found.own.push(own);
  }
  return found;
}

/**
 * For each shared file (its members' mappings), give every mapping the pages
 * and lost ranges the others hold for the same file pages. Call inside a
 * transaction once every page of the snapshot is stored; returns the number
 * of index entries added.
 */
export function shareAcrossProcesses(db: Database.Database, files: SharedMapping[][]): number {
  const insertIndex = db.prepare('INSERT INTO page_index (process_id, first_address, last_address, count, entries) VALUES (?, ?, ?, ?, ?)');
  const insertLost = db.prepare('INSERT INTO lost (process_id, address, pages, reason) VALUES (?, ?, ?, ?)');
  let added = 0;
  for (const mappings of files) {
    if (mappings.length < 2) continue;
    const found = readHeld(db, mappings);
    mappings.forEach((m, k) => {
      const own = found.own[k]!;
      const addresses: bigint[] = [];
      const cids: number[] = [];
      let lostRun: { address: bigint; pages: number; reason: LostRange['reason'] } | undefined;
      const endLostRun = (): void => {
        if (lostRun !== undefined) insertLost.run(m.processId, lostRun.address, lostRun.pages, lostRun.reason);
        lostRun = undefined;
      };
      for (let address = m.start; address < m.end; address += PAGE) {
        const page = pageOf(m, address);
        const reason = own.has(page) ? undefined : found.lostByPage.get(page);
        const cid = own.has(page) ? undefined : found.cidByPage.get(page);
        if (cid !== undefined) {
          addresses.push(address);
          cids.push(cid);
        }
        if (reason !== undefined && cid === undefined && lostRun?.reason === reason && lostRun.address + BigInt(lostRun.pages) * PAGE === address) {
          lostRun.pages++;
          continue;
        }
        endLostRun();
        if (reason !== undefined && cid === undefined) lostRun = { address, pages: 1, reason };
      }
      endLostRun();
      for (let i = 0; i < addresses.length; i += ROW_ENTRIES) {
        const rowAddresses = BigUint64Array.from(addresses.slice(i, i + ROW_ENTRIES));
        const rowCids = cids.slice(i, i + ROW_ENTRIES);
        insertIndex.run(m.processId, rowAddresses[0]!, rowAddresses[rowAddresses.length - 1]!, rowAddresses.length, encodeIndex(rowAddresses, rowCids));
      }
      added += addresses.length;
    });
  }
  return added;
}
