// A restore's address space: the restorer process, frozen, is emptied of its
// own mappings and given T's, with syscalls injected into it from its vDSO
// (moved first to where T had it): every mapping of T at its address, with
// its protections, flags and offsets (files opened again by path, memfds
// through the fd re-created at their numbers or made anew), the pages T
// stored written in (or, lazy, left to the page server), then the mm's
// fields (brk, arg/env ranges, auxv, exe) with PR_SET_MM_MAP.
import { closeSync, openSync } from 'node:fs';
import { WpsnapError } from '../common/errors.js';
import { formatAddress, type RegionRecord } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';
import { findSyscallInstruction, inject, type Frozen } from './attach.js';
import { SYSCALL } from './constants.js';
import { faultPoint } from './fault.js';
import type { NativeBinding } from './native/binding.js';
import { readMaps } from './procfs.js';
import { protOf } from './rollback-layout.js';
import { SPECIAL_REGIONS, type RestorePlan } from './restore-plan.js';

const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_GROWSDOWN = 0x100;
const MAP_FIXED_NOREPLACE = 0x100000;
const MREMAP_MAYMOVE = 1;
const MREMAP_FIXED = 2;
const PROT_READ = 1;
const PROT_WRITE = 2;
const O_RDONLY = 0;
const O_CLOEXEC = 0o2000000;
const MFD_CLOEXEC = 1;
const AT_FDCWD = -100;
const PR_SET_MM = 35;
const PR_SET_MM_MAP = 14;
const PR_SET_VMA = 0x53564d41;
const PR_SET_VMA_ANON_NAME = 0;
/** The scratch area: paths, clone_args, prctl_mm_map, auxv… written here for injected calls. */
export const SCRATCH_BYTES = 1 << 20;
/** Bytes written per process_vm_writev batch. */
const CHUNK = 4 << 20;

/** A frozen process being built, and how syscalls reach it. */
export interface Builder {
  readonly binding: NativeBinding;
  readonly pid: number;
  readonly frozen: Frozen;
  /** The `syscall` instruction injections run from (in the vDSO, wherever it is now). */
  insn: bigint;
  /** A mapping of SCRATCH_BYTES in a hole of T's layout, once made. */
  scratch: bigint;
}

export function call(b: Builder, nr: number, args: Array<number | bigint>, what: string): bigint {
  const result = inject(b.binding, b.frozen, b.insn, nr, args, what);
  if (result < 0 && result > -4096) throw new WpsnapError('RESTORE_FAILED', `${what} failed in the process being restored: errno ${-result}`, { errno: -result });
  return BigInt.asUintN(64, BigInt(result));
}

/** Write `data` into the scratch area at `offset`; its address there. */
export function scratchWrite(b: Builder, offset: number, data: Buffer): bigint {
  if (offset + data.length > SCRATCH_BYTES) throw new WpsnapError('RESTORE_FAILED', `${data.length} bytes do not fit the scratch area`);
  b.binding.processVmWrite(b.pid, b.scratch + BigInt(offset), data);
  return b.scratch + BigInt(offset);
}

function openIn(b: Builder, path: string, flags: number): number {
  const at = scratchWrite(b, 0, Buffer.from(path + '\0'));
  return Number(call(b, SYSCALL.openat, [AT_FDCWD, at, flags | O_CLOEXEC], `openat(${path})`));
}

/** A hole of T's layout for the scratch area, far from its mappings (a gap of 2× its size at least). */
function holeFor(regions: RegionRecord[], bytes: bigint): bigint {
  const sorted = [...regions].sort((a, b) => (a.start < b.start ? -1 : 1));
  let from = 0x10000000n;
  for (const r of sorted) {
    if (r.start >= from + 2n * bytes) return from + bytes / 2n;
    if (r.end > from) from = r.end;
  }
  if (from + 2n * bytes < 0x7ff000000000n) return from + bytes / 2n;
  throw new WpsnapError('RESTORE_FAILED', 'no hole in the layout at T for the restore\'s scratch area');
}

/**
 * Empty the restorer of its own mappings, move its vDSO and vvar where T had
 * them (injections follow the vDSO), and map the scratch area.
 */
export function clearAndMoveSpecials(b: Builder, regions: RegionRecord[]): void {
  const own = readMaps(b.pid);
  const vdso = own.find((m) => m.path === '[vdso]');
  if (vdso === undefined) throw new WpsnapError('RESTORE_FAILED', 'the restorer has no [vdso] to inject from');
  const insnOffset = findSyscallInstruction(b.binding, b.pid) - vdso.start;
  b.insn = vdso.start + insnOffset;
  // Everything below and above the special mappings in two calls (the restorer's text, data, heap, stack);
  // a mapping between them (none in practice) on its own.
  const specials = own.filter((m) => SPECIAL_REGIONS.has(m.path) && m.path !== '[vsyscall]');
  const low = specials.reduce((x, m) => (m.start < x ? m.start : x), vdso.start);
  const high = specials.reduce((x, m) => (m.end > x ? m.end : x), vdso.end);
  const userTop = 0x7ffffffff000n;
  if (low > 0x10000n) call(b, SYSCALL.munmap, [0x10000n, low - 0x10000n], 'munmap(below the vDSO)');
  if (high < userTop) call(b, SYSCALL.munmap, [high, userTop - high], 'munmap(above the vDSO)');
  for (const m of own) {
    if (!SPECIAL_REGIONS.has(m.path) && m.start >= low && m.end <= high) call(b, SYSCALL.munmap, [m.start, m.end - m.start], `munmap(${formatAddress(m.start)})`);
  }
  // T's special mappings, where they are now: moved through a free place first if their targets overlap.
  const moves = own
    .filter((m) => SPECIAL_REGIONS.has(m.path) && m.path !== '[vsyscall]')
    .map((m) => ({ m, at: regions.find((r) => r.path === m.path) }))
    .filter((x): x is { m: (typeof own)[number]; at: RegionRecord } => x.at !== undefined && x.at.start !== x.m.start);
  for (const { m, at } of moves) {
    if (at.end - at.start !== m.end - m.start) throw new WpsnapError('RESTORE_REFUSED', `${m.path} is ${m.end - m.start} bytes here, ${at.end - at.start} at T: another kernel`);
  }
  const park = holeFor([...regions, ...own.map((m) => ({ ...m, capture: 'copied' as const, pageSize: 4096 }))], 1n << 24n);
  let parked = park;
  const current = new Map(moves.map(({ m }) => [m.path, m.start]));
  for (const { m } of moves) {
    call(b, SYSCALL.mremap, [m.start, m.end - m.start, m.end - m.start, MREMAP_MAYMOVE | MREMAP_FIXED, parked], `mremap(${m.path})`);
    current.set(m.path, parked);
    if (m.path === '[vdso]') b.insn = parked + insnOffset;
    parked += m.end - m.start + 0x10000n;
  }
  for (const { m, at } of moves) {
    call(b, SYSCALL.mremap, [current.get(m.path)!, m.end - m.start, m.end - m.start, MREMAP_MAYMOVE | MREMAP_FIXED, at.start], `mremap(${m.path})`);
    if (m.path === '[vdso]') b.insn = at.start + insnOffset;
  }
  const scratchAt = holeFor(regions, BigInt(SCRATCH_BYTES));
  b.scratch = call(b, SYSCALL.mmap, [scratchAt, SCRATCH_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0], 'mmap(scratch)');
}

/** Anonymous private memory: what a lazy restore leaves to the page server. */
export function isAnonymousPrivate(r: RegionRecord): boolean {
  return r.perms[3] === 'p' && (r.path === '' || r.path === '[heap]' || r.path === '[stack]' || r.path.startsWith('[anon:'));
}

/** Map every region of T (not the special ones) at its address. */
export function mapRegions(b: Builder, plan: RestorePlan): void {
  const memfds = new Map<number, number>(); // inode -> fd in the process (re-created at its number, or made here)
  for (const f of plan.state.fds) if (f.kind === 'memfd' && plan.fds.some((x) => x.fd === f.fd && x.restored)) memfds.set(f.ino, f.fd);
  const made: number[] = []; // fds opened here, closed once everything is mapped
  const opened = new Map<string, number>();
  try {
    for (const r of plan.regions) {
      if (SPECIAL_REGIONS.has(r.path)) continue;
      const len = r.end - r.start;
      const prot = protOf(r.perms);
      const shared = r.perms[3] === 's';
      const where = `mmap(${formatAddress(r.start)} ${r.path || 'anonymous'})`;
      let at: bigint;
      if (isAnonymousPrivate(r) || (!shared && (r.capture === 'copied' || r.capture === 'protected') && r.file === undefined)) {
        at = call(b, SYSCALL.mmap, [r.start, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | (r.path === '[stack]' ? MAP_GROWSDOWN : 0), -1, 0], where);
        if (r.path.startsWith('[anon:')) {
          const name = scratchWrite(b, 0, Buffer.from(r.path.slice(6, -1) + '\0'));
          call(b, SYSCALL.prctl, [PR_SET_VMA, PR_SET_VMA_ANON_NAME, r.start, len, name], `prctl(PR_SET_VMA_ANON_NAME ${r.path})`);
        }
      } else if (r.path.startsWith('/memfd:')) {
        let fd = memfds.get(r.inode);
        if (fd === undefined) {
          const name = scratchWrite(b, 0, Buffer.from(r.path.replace(/^\/memfd:/, '').replace(/ \(deleted\)$/, '') + '\0'));
          fd = Number(call(b, SYSCALL.memfd_create, [name, MFD_CLOEXEC], `memfd_create(${r.path})`));
          made.push(fd);
          memfds.set(r.inode, fd);
          const size = plan.regions.filter((x) => x.inode === r.inode && x.path === r.path).reduce((n, x) => (x.offset + x.end - x.start > n ? x.offset + x.end - x.start : n), 0n);
          call(b, SYSCALL.ftruncate, [fd, size], `ftruncate(${r.path})`);
        }
        at = call(b, SYSCALL.mmap, [r.start, len, prot, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED_NOREPLACE, fd, r.offset], where);
      } else if (shared && (r.path === '' || r.path.startsWith('/dev/zero'))) {
        at = call(b, SYSCALL.mmap, [r.start, len, prot, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0], where);
      } else {
        // A file is opened once for all its mappings (a library has four or five): fewer injected calls.
        const path = r.file?.path ?? r.path;
        let fd = opened.get(path);
        if (fd === undefined) {
          fd = openIn(b, path, O_RDONLY);
          opened.set(path, fd);
          made.push(fd);
        }
        at = call(b, SYSCALL.mmap, [r.start, len, prot, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED_NOREPLACE, fd, r.offset], where);
      }
      if (at !== r.start) throw new WpsnapError('RESTORE_FAILED', `${where} mapped at ${formatAddress(at)}`);
    }
  } finally {
    for (const fd of made) call(b, SYSCALL.close, [fd], `close(${fd})`);
  }
}

/** Stored pages of T to write: runs [address, length, offset in data] (triples) and their bytes. */
export interface ContentChunk {
  runs: BigUint64Array;
  data: Buffer;
  pages: number;
}

/**
 * The stored pages of these regions, a chunk (up to 4 MiB of address space)
 * at a time; `data` is reused from one chunk to the next unless `keep`.
 * fromRows: read without decoding the process's whole page index (a few
 * pages of a snapshot with no parent; store.readRangeIntoFromRows).
 */
export function* storedContent(store: Store, processId: number, regions: RegionRecord[], options: { fromRows?: boolean; keep?: boolean } = {}): Iterable<ContentChunk> {
  const buffer = Buffer.allocUnsafe(CHUNK);
  for (const r of regions) {
    if (SPECIAL_REGIONS.has(r.path) || r.capture === 'file-reference' || r.capture === 'skipped') continue;
    for (let start = r.start; start < r.end; start += BigInt(CHUNK)) {
      const length = Number(r.end - start < BigInt(CHUNK) ? r.end - start : BigInt(CHUNK));
      const into = options.keep === true ? Buffer.allocUnsafe(length) : buffer.subarray(0, length);
      const stored = new Uint8Array(length / 4096);
      const found = (options.fromRows === true ? store.readRangeIntoFromRows(processId, start, into, stored) : undefined) ?? store.readRangeInto(processId, start, into, stored);
      if (found === 0) continue;
      const runs: bigint[] = [];
      for (let i = 0; i < stored.length; ) {
        if (!stored[i]) {
          i++;
          continue;
        }
        let j = i;
        while (j < stored.length && stored[j]) j++;
        runs.push(start + BigInt(i * 4096), BigInt((j - i) * 4096), BigInt(i * 4096));
        i = j;
      }
      yield { runs: BigUint64Array.from(runs), data: into, pages: found };
    }
  }
}

/** Chunks of T's content written into the process (process_vm_writev; /proc/PID/mem where not writable). */
export function writeContent(b: Builder, chunks: Iterable<ContentChunk>): { pages: number } {
  const mem = openSync(`/proc/${b.pid}/mem`, 'r+');
  let pages = 0;
  try {
    for (const chunk of chunks) {
      b.binding.writeRuns(b.pid, mem, chunk.runs, chunk.data);
      pages += chunk.pages;
      faultPoint('restore-mid-memory');
    }
  } finally {
    closeSync(mem);
  }
  return { pages };
}

/** The heap's end at T: brk (page-aligned; the kernel keeps no finer trace in /proc). */
function brkAtT(plan: RestorePlan): bigint {
  const heap = plan.regions.filter((r) => r.path === '[heap]');
  return heap.length > 0 ? heap.reduce((end, r) => (r.end > end ? r.end : end), 0n) : BigInt(plan.state.mm.startBrk);
}

/** brk, the code/data/stack/arg/env fields, auxv and the exe link as at T (PR_SET_MM_MAP). */
export function setMmFields(b: Builder, plan: RestorePlan): void {
  const { mm, exe } = plan.state;
  const auxv = plan.process.auxv;
  const exeFd = openIn(b, exe!.path, O_RDONLY);
  try {
    const map = Buffer.alloc(104);
    const fields = [mm.startCode, mm.endCode, mm.startData, mm.endData, mm.startBrk, brkAtT(plan).toString(), mm.startStack, mm.argStart, mm.argEnd, mm.envStart, mm.envEnd];
    fields.forEach((v, i) => map.writeBigUInt64LE(BigInt(v), i * 8));
    const auxvAt = scratchWrite(b, 4096, auxv);
    map.writeBigUInt64LE(auxvAt, 88);
    map.writeUInt32LE(auxv.length, 96);
    map.writeUInt32LE(exeFd, 100);
    const at = scratchWrite(b, 1024, map);
    call(b, SYSCALL.prctl, [PR_SET_MM, PR_SET_MM_MAP, at, map.length, 0], 'prctl(PR_SET_MM_MAP)');
  } finally {
    call(b, SYSCALL.close, [exeFd], `close(${exeFd})`);
  }
}

