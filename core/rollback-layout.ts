// A rollback's layout repairs: what differs between the mappings at T and the
// target's now, as the calls that undo it (brk, munmap, mmap, mprotect), or a
// refusal naming what cannot be undone, before anything changes.
import { WpsnapError } from '../common/errors.js';
import { formatAddress, type RegionRecord } from '../snapshot-format/model.js';
import { intersect, normalize, subtract, type Intervals } from './intervals.js';
import type { MapsEntry } from './procfs.js';

/** Mappings the kernel makes and no program changes. */
export const SPECIAL = new Set(['[vvar]', '[vvar_vclock]', '[vdso]', '[vsyscall]']);

/** The protection bits of a maps/regions perms string. */
export function protOf(perms: string): number {
  return (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);
}


export interface Plan {
  brk: { from: bigint; to: bigint } | null;
  unmap: Intervals;
  create: RegionRecord[];
  reprotect: RegionRecord[];
}

/** The layout repairs, or a refusal naming what cannot be repaired. */
export function planLayout(regions: RegionRecord[], maps: MapsEntry[], pid: number, sameProcess: boolean): Plan {
  const atT = normalize(regions.map((r): [bigint, bigint] => [r.start, r.end]));
  const now = normalize(maps.map((m): [bigint, bigint] => [m.start, m.end]));
  const heapT = regions.find((r) => r.path === '[heap]');
  const heapNow = maps.find((m) => m.path === '[heap]');
  let brk: Plan['brk'] = null;
  if (heapT !== undefined && heapNow !== undefined && heapT.start === heapNow.start && heapT.end !== heapNow.end) {
    brk = { from: heapNow.end, to: heapT.end };
  } else if ((heapT === undefined) !== (heapNow === undefined) || (heapT && heapNow && heapT.start !== heapNow.start)) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: its heap is not where it was at T (a different program, or brk was reset): nothing changed`);
  }
  const heapRange: Intervals = heapT && heapNow ? normalize([[heapT.start, heapT.end > heapNow.end ? heapT.end : heapNow.end]]) : [];
  const unmap = subtract(subtract(now, atT), heapRange);
  const missing = subtract(subtract(atT, now), heapRange);
  // Parts of T's mappings missing now: re-created where they were private anonymous memory.
  const create: RegionRecord[] = [];
  for (const r of regions) {
    const parts = intersect([[r.start, r.end]], missing);
    if (parts.length === 0) continue;
    const anonymousPrivate = r.inode === 0 && r.perms[3] === 'p' && !SPECIAL.has(r.path) && r.capture !== 'skipped';
    if (!anonymousPrivate) {
      throw new WpsnapError(
        'ROLLBACK_REFUSED',
        `pid ${pid}: ${formatAddress(parts[0]![0])}-${formatAddress(parts[0]![1])} of ${r.path || 'a mapping'} (${r.perms}) was mapped at T and is not now, and only private anonymous memory can be re-created: nothing changed`,
      );
    }
    for (const [start, end] of parts) create.push({ ...r, start, end });
  }
  const reprotect: RegionRecord[] = [];
  for (const r of regions) {
    if (SPECIAL.has(r.path)) continue;
    const differs = maps.some((m) => m.start < r.end && r.start < m.end && m.perms.slice(0, 3) !== r.perms.slice(0, 3));
    // Another process of the program (--pid) has its own shared memory objects, under the same names.
    const sameObject = (m: MapsEntry): boolean => m.inode === r.inode || (!sameProcess && r.perms[3] === 's' && m.path === r.path);
    const kindChanged = maps.some((m) => m.start < r.end && r.start < m.end && (!sameObject(m) || m.perms[3] !== r.perms[3]));
    if (kindChanged) {
      throw new WpsnapError(
        'ROLLBACK_REFUSED',
        `pid ${pid}: ${formatAddress(r.start)}-${formatAddress(r.end)} holds another mapping than at T (${r.path || 'anonymous'}, ${r.perms}): nothing changed`,
      );
    }
    if (differs) reprotect.push(r);
  }
  return { brk, unmap, create, reprotect };
}

