// Deciding, for each mapping of the target, how its content at T is captured.
// uffd-wp (synchronous) can protect anonymous, shmem and hugetlbfs mappings
// only; private file mappings get their copy-on-write pages copied while the
// target is stopped and the rest referenced to the file.
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, statSync, statfsSync } from 'node:fs';
import type { FileReference, LostRange, RegionRecord } from '../snapshot-format/model.js';
import { REGION_KIND } from './constants.js';
import type { EngineRegion } from './native/binding.js';
import { MapsReader, type MapsEntry } from './procfs.js';

const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/** Kernel-provided mappings that are not the process's memory. */
const SKIPPED_SPECIAL = new Map<string, string>([
  ['[vvar]', 'kernel data page (vvar), not process memory'],
  ['[vvar_vclock]', 'kernel clock page (vvar_vclock), not process memory'],
  ['[vsyscall]', 'legacy vsyscall page, identical in every process'],
  ['[uprobes]', 'uprobes trampoline page'],
]);

/** What to copy while the target is stopped: copy-on-write pages of a private
 * file mapping, every present page, or every data page of a shared file. */
export type PausedCopy = 'none' | 'cow' | 'all-present' | 'file';

export interface RegionPlan {
  record: RegionRecord;
  /** Present when the region is registered with uffd-wp and swept by the engine. */
  engine?: EngineRegion;
  /** What to copy while the target is stopped. */
  pausedCopy: PausedCopy;
  /** Pages known lost from the start (e.g. writable shared file mappings). */
  lost?: LostRange;
  /** fd opened here that must be closed when the snapshot ends. */
  openedFd?: number;
  /** Other processes that map this shared memory writable: their writes do not fault here. */
  sharedWith?: number[];
}

function mapFilesPath(pid: number, m: MapsEntry): string {
  return `/proc/${pid}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`;
}

function fileReference(path: string, statPath: string): FileReference | undefined {
  try {
    const st = statSync(statPath, { bigint: true });
    return { path, dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: st.mtimeNs.toString() };
  } catch {
    return undefined;
  }
}

function base(m: MapsEntry): Omit<RegionRecord, 'capture' | 'pageSize'> {
  return { start: m.start, end: m.end, perms: m.perms, offset: m.offset, dev: m.dev, inode: m.inode, path: m.path };
}

/** Classify one mapping. `fsCache` memoises statfs per (dev, inode). */
export function planRegion(pid: number, m: MapsEntry, fsCache: Map<string, { type: number; bsize: number }>): RegionPlan {
  const shared = m.perms[3] === 's';
  const skip = SKIPPED_SPECIAL.get(m.path);
  if (skip !== undefined) {
    return { record: { ...base(m), pageSize: 4096, capture: 'skipped', skipReason: skip }, pausedCopy: 'none' };
  }
  if (m.path === '[vdso]') {
    // Read-only code provided by the kernel, needed by a debugger: copy it whole.
    return { record: { ...base(m), pageSize: 4096, capture: 'copied' }, pausedCopy: 'all-present' };
  }
  if (m.inode === 0) {
    return {
      record: { ...base(m), pageSize: 4096, capture: 'protected' },
      engine: { start: m.start, end: m.end, pageSize: 4096, kind: REGION_KIND.anon },
      pausedCopy: 'none',
    };
  }
  const major = Number.parseInt(m.dev.split(':')[0]!, 16);
  const key = `${m.dev}:${m.inode}`;
  let fs = fsCache.get(key);
  if (fs === undefined && major === 0) {
    try {
      const st = statfsSync(mapFilesPath(pid, m));
      fs = { type: Number(st.type), bsize: Number(st.bsize) };
    } catch {
      fs = { type: 0, bsize: 4096 };
    }
    fsCache.set(key, fs);
  }
  if (fs !== undefined && (fs.type === TMPFS_MAGIC || fs.type === HUGETLBFS_MAGIC)) {
    const hugetlb = fs.type === HUGETLBFS_MAGIC;
    const pageSize = hugetlb ? fs.bsize : 4096;
    const record: RegionRecord = { ...base(m), pageSize, capture: 'protected' };
    if (shared) {
      // Read the shared file itself: no faults in the target, holes skipped for free.
      const fd = openSync(mapFilesPath(pid, m), 'r');
      // The file's times at T: the engine proves every page it copies against
      // them (a write through an fd does not fault). Read again in the pause (core/pause.ts).
      const { ctimeNs, mtimeNs } = fstatSync(fd, { bigint: true });
      return {
        record,
        engine: { start: m.start, end: m.end, pageSize, kind: REGION_KIND.file, fd, fileOffset: m.offset, hugetlb, ctimeNs, mtimeNs },
        pausedCopy: 'none',
        openedFd: fd,
      };
    }
    const anonymousHuge = hugetlb && m.path.startsWith('/anon_hugepage');
    return {
      record,
      engine: { start: m.start, end: m.end, pageSize, kind: anonymousHuge ? REGION_KIND.anon : REGION_KIND.private, hugetlb },
      pausedCopy: 'none',
    };
  }
  if (major === 0 || m.path.startsWith('/dev/')) {
    return {
      record: { ...base(m), pageSize: 4096, capture: 'skipped', skipReason: 'device or special-filesystem mapping' },
      pausedCopy: 'none',
    };
  }
  const file = fileReference(m.path.replace(/ \(deleted\)$/, ''), mapFilesPath(pid, m));
  if (!shared) {
    // Without a file to refer to, every page with data is copied.
    const record: RegionRecord = { ...base(m), pageSize: 4096, capture: file ? 'file-private' : 'copied' };
    if (file) record.file = file;
    return { record, pausedCopy: file ? 'cow' : 'all-present' };
  }
  const record: RegionRecord = { ...base(m), pageSize: 4096, capture: 'file-reference' };
  if (file) record.file = file;
  if (m.perms[1] === 'w') {
    // Writes after T reach the file without a fault: its content at T is unknown.
    return {
      record,
      pausedCopy: 'none',
      lost: { address: m.start, pages: Number((m.end - m.start) / 4096n), reason: 'shared-file-not-protectable' },
    };
  }
  return { record, pausedCopy: 'none' };
}

/**
 * Plan one mapping without keeping its shared file open: for whoever reads
 * the memory through the mapping itself (the dirty tracker, pre-copy), not
 * through the file as the snapshot engine does.
 */
export function planRegionWithoutFile(pid: number, m: MapsEntry, fsCache: Map<string, { type: number; bsize: number }>): RegionPlan {
  const plan = planRegion(pid, m, fsCache);
  if (plan.openedFd !== undefined) closeSync(plan.openedFd);
  return plan;
}

/** For each of these files ("dev inode" as in maps), the other processes (outside `group`) that map it writable. */
function writersOfFiles(pid: number, files: Set<string>, group: ReadonlySet<number>): Map<string, number[]> {
  const found = new Map<string, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === pid || group.has(Number(entry))) continue;
    let text: string;
    try {
      text = readFileSync(`/proc/${entry}/maps`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    for (const line of text.split('\n')) {
      // "start-end perms offset dev inode path": perms is field 2, dev and inode 4 and 5.
      const fields = line.split(/\s+/, 5);
      const key = `${fields[3]} ${fields[4]}`;
      if (!files.has(key) || fields[1]?.[1] !== 'w') continue;
      const pids = found.get(key) ?? [];
      if (!pids.includes(Number(entry))) pids.push(Number(entry));
      found.set(key, pids);
    }
  }
  return found;
}

/** A stat's st_dev as maps prints it ("major:minor" in hex, at least two digits each). */
function mapsDev(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}`;
}

/**
 * A file anyone may open by its path at any time (a file on a tmpfs or hugetlbfs
 * mount): an fd seen on it before the snapshot says nothing of one opened
 * during it. A memfd, anonymous shared memory and a deleted file have no path:
 * an fd on them comes only from their holders (inherited, passed, or through
 * /proc/PID/fd with ptrace rights over a holder).
 */
function openableByPath(path: string): boolean {
  return !(path.startsWith('/memfd:') || path.endsWith(' (deleted)'));
}

/**
 * Of these files ("dev inode" as in maps), those some process (any, the
 * target included) holds an fd on that may write it: a write through an fd
 * does not fault, so only such a file needs its times proven. A file opened
 * for writing after this read is not seen (docs/design.md says so).
 */
export function filesWithFdWriters(files: Set<string>): Set<string> {
  const inodes = new Set([...files].map((f) => f.split(' ')[1]));
  const writable = new Set<string>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${entry}/fd`);
    } catch {
      continue; // exited meanwhile, or not ours to read
    }
    for (const fd of fds) {
      try {
        // fdinfo names the inode: only a candidate is stat'ed (for its device) and its open mode read.
        const info = readFileSync(`/proc/${entry}/fdinfo/${fd}`, 'utf8');
        const ino = /^ino:\s*(\d+)$/m.exec(info)?.[1];
        if (ino === undefined || !inodes.has(ino)) continue;
        const st = statSync(`/proc/${entry}/fd/${fd}`, { bigint: true });
        const key = `${mapsDev(st.dev)} ${st.ino}`;
        const flags = Number.parseInt(/^flags:\s*([0-7]+)$/m.exec(info)?.[1] ?? '2', 8);
        if (files.has(key) && (flags & 3) !== 0) writable.add(key);
      } catch {
        // closed meanwhile
      }
    }
  }
  return writable;
}

/**
 * Plans made while the target still runs (statfs, stat and opening shared
 * files take milliseconds): inside the pause only mappings that changed since
 * are planned again. Both listings come from the planner's MapsReader, which
 * returns the same object for an unchanged line: that is how a mapping is
 * known unchanged.
 */
export class RegionPlanner {
  private readonly fsCache = new Map<string, { type: number; bsize: number }>();
  private readonly early = new Map<MapsEntry, RegionPlan>();
  private readonly reader: MapsReader;

  /** group: the pids snapshotted together with this one (their mappings of a shared file are not "other writers"). */
  constructor(
    private readonly pid: number,
    private readonly group: ReadonlySet<number> = new Set(),
  ) {
    this.reader = new MapsReader(pid);
  }

  /** /proc/PID/maps now, unchanged lines as the same objects as in the previous read. */
  readMaps(): MapsEntry[] {
    return this.reader.read();
  }

  /** Plan ahead from a maps listing read (with readMaps()) before the freeze. */
  prepare(maps: MapsEntry[]): void {
    for (const m of maps) this.early.set(m, planRegion(this.pid, m, this.fsCache));
    const shared = [...this.early.values()].filter((p) => p.openedFd !== undefined);
    if (shared.length === 0) return;
    const files = new Set(shared.map((p) => `${p.record.dev} ${p.record.inode}`));
    const others = writersOfFiles(this.pid, files, this.group);
    const fdWritten = filesWithFdWriters(files);
    for (const plan of shared) {
      const key = `${plan.record.dev} ${plan.record.inode}`;
      const pids = others.get(key);
      if (pids) plan.sharedWith = pids;
      if (plan.engine !== undefined && !fdWritten.has(key) && !openableByPath(plan.record.path)) plan.engine.noFdWriters = true;
    }
  }

  /** Plans for the maps read (with readMaps()) during the pause; plans made ahead for mappings gone since are released. */
  plan(maps: MapsEntry[]): RegionPlan[] {
    const plans = maps.map((m) => {
      const ready = this.early.get(m);
      this.early.delete(m);
      return ready ?? planRegion(this.pid, m, this.fsCache);
    });
    this.release();
    return plans;
  }

  /** The plans made ahead by prepare(). */
  prepared(): Iterable<RegionPlan> {
    return this.early.values();
  }

  /** Close files opened for plans that were not used. */
  release(): void {
    for (const plan of this.early.values()) if (plan.openedFd !== undefined) closeSync(plan.openedFd);
    this.early.clear();
  }
}

/**
 * Shared memory planned ahead that pre-protection may protect while the target runs: shmem and memfd
 * mappings in 4 KiB pages that no process outside the snapshot maps writable (those are lost anyway).
 */
export function sharedToPreProtect(plans: Iterable<RegionPlan>): Array<[bigint, bigint]> {
  const ranges: Array<[bigint, bigint]> = [];
  for (const p of plans) {
    if (p.engine?.kind === REGION_KIND.file && p.engine.hugetlb !== true && p.engine.pageSize === 4096 && p.sharedWith === undefined) ranges.push([p.record.start, p.record.end]);
  }
  return ranges;
}

/** Plan every mapping now (no planning ahead). */
export function planRegions(pid: number, maps: MapsEntry[]): RegionPlan[] {
  return new RegionPlanner(pid).plan(maps);
}
