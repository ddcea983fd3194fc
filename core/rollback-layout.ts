// A rollback's layout repairs: what differs between the mappings at T and the
// target's now, as the calls that undo it (brk, munmap, mmap, mprotect), or a
// refusal naming what cannot be undone, before anything changes.
import { readdirSync, readFileSync, statSync } from 'node:fs';
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

/**
 * How a mapping of T removed since is made again in the target: what is
 * left of it just before grown over it (mremap in place, any kind); private
 * anonymous memory; shared anonymous memory nothing else maps any more (a
 * new object, its content written back); a file opened by path in the
 * target (unchanged since T: device, inode, size, mtime); or an fd the
 * target still holds on the shared memory object (memfd, tmpfs, hugetlbfs).
 */
export type Recreate =
  /** mremap in place of the mapping left just before it, over it. */
  | { kind: 'grow'; from: bigint; length: bigint }
  | { kind: 'anonymous' }
  | { kind: 'shared-anonymous' }
  | { kind: 'file'; path: string; writable: boolean }
  | { kind: 'fd'; fd: number; writable: boolean };

/** A part of a mapping of T to make again, and how. */
export type Creation = RegionRecord & { how: Recreate };

export interface Plan {
  brk: { from: bigint; to: bigint } | null;
  unmap: Intervals;
  create: Creation[];
  reprotect: RegionRecord[];
}

/**
 * The layout repairs, or a refusal naming what cannot be repaired.
 * `recreate` says how a part of a mapping of T missing now is made again,
 * or why it cannot be; `mustStayMapped`: what may not be unmapped even for a
 * moment (the threads' rseq areas).
 */
export function planLayout(
  regions: RegionRecord[],
  maps: MapsEntry[],
  pid: number,
  sameProcess: boolean,
  recreate: (part: RegionRecord) => Recreate | string,
  mustStayMapped: Intervals = [],
): Plan {
  const atT = normalize(regions.map((r): [bigint, bigint] => [r.start, r.end]));
  const now = normalize(maps.map((m): [bigint, bigint] => [m.start, m.end]));
  // The heap may be several mappings (a part registered with a userfaultfd, or protected, apart): its extent.
  const heapOf = (xs: Array<{ start: bigint; end: bigint; path: string }>): { start: bigint; end: bigint } | undefined => {
    const parts = xs.filter((x) => x.path === '[heap]');
    if (parts.length === 0) return undefined;
    return { start: parts.reduce((a, x) => (x.start < a ? x.start : a), parts[0]!.start), end: parts.reduce((a, x) => (x.end > a ? x.end : a), parts[0]!.end) };
  };
  const heapT = heapOf(regions);
  const heapNow = heapOf(maps);
  let brk: Plan['brk'] = null;
  if (heapT !== undefined && heapNow !== undefined && heapT.start === heapNow.start && heapT.end !== heapNow.end) {
    brk = { from: heapNow.end, to: heapT.end };
  } else if ((heapT === undefined) !== (heapNow === undefined) || (heapT && heapNow && heapT.start !== heapNow.start)) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: its heap is not where it was at T (a different program, or brk was reset): nothing changed`);
  }
  const heapRange: Intervals = heapT && heapNow ? normalize([[heapT.start, heapT.end > heapNow.end ? heapT.end : heapNow.end]]) : [];
  let unmap = subtract(subtract(now, atT), heapRange);
  const missing = subtract(subtract(atT, now), heapRange);
  // Parts of T's mappings missing now: made again, each the way it can be, as one mapping
  // with the rest where possible: a part mapped alone stays a mapping of its own (the kernel
  // does not merge it with the rest), and an mremap the program does across it, as it could
  // at T, would fail. A part that follows what is left of its mapping grows that mapping over
  // it (mremap in place), which the kernel merges with the rest beyond.
  const create: Creation[] = [];
  const unmapAlso: Intervals = [];
  const refuse = (r: RegionRecord, [start, end]: [bigint, bigint], why: string): never => {
    throw new WpsnapError(
      'ROLLBACK_REFUSED',
      `pid ${pid}: ${formatAddress(start)}-${formatAddress(end)} of ${r.path || 'anonymous memory'} (${r.perms}) was mapped at T and is not now, and cannot be mapped again: ${why}; nothing changed`,
    );
  };
  for (const r of regions) {
    const gone = intersect([[r.start, r.end]], missing);
    const movable = r.path !== '[heap]' && !SPECIAL.has(r.path) && r.capture !== 'skipped';
    // Where the mapping of T is several mappings now with nothing between them to tell them apart
    // (spans moved in, mapped again, left of an mremap), the kernel did not merge them and will not.
    const pieces = maps.filter((m) => m.start < r.end && r.start < m.end).sort((a, b) => (a.start < b.start ? -1 : 1));
    const split = pieces.some((m, i) => i > 0 && pieces[i - 1]!.end === m.start && pieces[i - 1]!.perms === m.perms);
    // Made again whole, as one mapping, unless the kernel writes in what is there now (a thread's rseq
    // area: unmapped even for a moment, the thread gets SIGSEGV): then only what is missing is made again.
    if (movable && (gone.length > 0 || split) && pieces.length > 0 && intersect([[r.start, r.end]], mustStayMapped).length === 0) {
      const how = recreate(r);
      if (typeof how === 'string') refuse(r, gone[0] ?? [r.start, r.end], how);
      unmapAlso.push(...intersect([[r.start, r.end]], now));
      create.push({ ...r, how: how as Recreate });
      continue;
    }
    // A part that follows what is left of its mapping grows that mapping over it (mremap in place),
    // which the kernel merges with the rest beyond.
    for (const [start, end] of gone) {
      const part: RegionRecord = { ...r, start, end, offset: r.offset + (start - r.start) };
      const before = r.path === '[heap]' ? undefined : maps.find((m) => m.end === start && m.start >= r.start && m.inode === r.inode && m.perms[3] === r.perms[3] && (r.inode === 0 || m.offset + (m.end - m.start) === part.offset));
      const how: Recreate | string = !movable ? 'the kernel makes it, not the program' : before !== undefined ? { kind: 'grow', from: before.start, length: before.end - before.start } : recreate(part);
      if (typeof how === 'string') refuse(r, [start, end], how);
      create.push({ ...part, how: how as Recreate });
    }
  }
  unmap = normalize([...unmap, ...unmapAlso]);
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


/** dev_t as stat returns it, from the "major:minor" (hex) of /proc/PID/maps. */
function devOf(majorMinor: string): bigint {
  const [major, minor] = majorMinor.split(':').map((x) => BigInt(Number.parseInt(x, 16))) as [bigint, bigint];
  return (minor & 0xffn) | ((major & 0xfffn) << 8n) | ((minor & ~0xffn) << 12n) | ((major & ~0xfffn) << 32n);
}

/** The file at `path` in the target's root, if it is still the object of `r` (and, for a file reference, unchanged). */
function sameFileAt(pid: number, path: string, r: RegionRecord): boolean {
  try {
    const st = statSync(`/proc/${pid}/root${path}`, { bigint: true });
    if (st.ino !== BigInt(r.inode) || st.dev !== devOf(r.dev)) return false;
    const f = r.file;
    return f === undefined || (st.dev === BigInt(f.dev) && st.ino === BigInt(f.ino) && st.size === BigInt(f.size) && st.mtimeNs.toString() === f.mtimeNs);
  } catch {
    return false;
  }
}

/** An fd the target holds on the object of mapping `r` (device, inode), and whether it was opened for writing. */
function fdOnObject(pid: number, r: RegionRecord): { fd: number; writable: boolean } | undefined {
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  let readOnly: { fd: number; writable: boolean } | undefined;
  for (const name of names) {
    try {
      const st = statSync(`/proc/${pid}/fd/${name}`, { bigint: true });
      if (st.ino !== BigInt(r.inode) || st.dev !== devOf(r.dev)) continue;
      const flags = Number.parseInt(/^flags:\s+([0-7]+)/m.exec(readFileSync(`/proc/${pid}/fdinfo/${name}`, 'utf8'))?.[1] ?? '0', 8);
      const found = { fd: Number(name), writable: (flags & 3) === 2 };
      if (found.writable) return found;
      readOnly ??= found;
    } catch {
      // closed meanwhile
    }
  }
  return readOnly;
}

/**
 * How a part of mapping `r` of T, missing from pid now, can be mapped again
 * (Recreate), or why it cannot. `mapsNow`: the target's mappings now.
 */
export function howToRecreate(pid: number, r: RegionRecord, mapsNow: MapsEntry[]): Recreate | string {
  const shared = r.perms[3] === 's';
  const path = r.path.replace(/ \(deleted\)$/, '');
  const deleted = path !== r.path;
  if (r.inode === 0) return shared ? 'shared memory of unknown origin' : { kind: 'anonymous' };
  if (r.capture === 'file-private' || r.capture === 'file-reference') {
    if (r.capture === 'file-reference' && r.perms[1] === 'w') return 'its writes went to the file, whose content at T is not known';
    if (deleted) return `its file ${path} was deleted`;
    if (r.file === undefined || !sameFileAt(pid, path, r)) return `its file ${path} changed since T`;
    return { kind: 'file', path, writable: false };
  }
  if (r.capture !== 'protected') return 'its content at T was not kept whole';
  if (path.startsWith('/SYSV')) return 'a System V shared memory segment is not attached again by a rollback';
  // Shared memory (memfd, tmpfs, hugetlbfs, shared anonymous): the same object, through an fd the process holds, or its path.
  const held = fdOnObject(pid, r);
  // A shared page's content at T is written back through the mapping, made writable for that (a private one is copied on write).
  const needsWrite = shared;
  if (held !== undefined && (held.writable || !needsWrite)) return { kind: 'fd', ...held };
  if (!deleted && sameFileAt(pid, path, r)) return { kind: 'file', path, writable: needsWrite };
  if (shared && path === '/dev/zero' && !mapsNow.some((m) => m.inode === r.inode)) return { kind: 'shared-anonymous' };
  if (held !== undefined) return `the only fd pid ${pid} holds on it (${held.fd}) is read-only`;
  return mapsNow.some((m) => m.inode === r.inode) ? 'other parts of it are still mapped, and the process holds no fd on it' : 'the process holds no fd on it any more';
}
