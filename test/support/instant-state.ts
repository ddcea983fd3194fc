// A process's state at an instant, as a snapshot holds it or as the live
// process has it while frozen: its regions, every page of content, every
// thread's registers. Compared with another instant, it lists every
// difference (region, byte range, register), so that a rollback can be
// checked to have put back all of it, not a sample.
import { closeSync, openSync, readSync } from 'node:fs';
import { readAll } from '../../snapshot-format/export-dir.js';
import { formatAddress, PAGE_SIZE, type RegionRecord } from '../../snapshot-format/model.js';
import { Store } from '../../store/store.js';
import { freeze } from '../../core/attach.js';
import { loadBinding } from '../../core/binding.js';
import { readMaps } from '../../core/procfs.js';

export interface RegionShape {
  start: bigint;
  end: bigint;
  perms: string;
  path: string;
}

export interface ThreadState {
  tid: number;
  regs: Buffer;
  fpregs: Buffer;
  xstate: Buffer;
}

export interface InstantState {
  regions: RegionShape[];
  threads: ThreadState[];
  /** The content of [start, end) (a range of one of the regions with content at T), or a reason it cannot be read. */
  content(start: bigint, end: bigint): Buffer | string;
}

/** Regions whose content a snapshot holds: the others are the file's ([vvar] and file references) or not captured. */
export function hasContent(r: RegionRecord): boolean {
  return r.capture === 'protected' || r.capture === 'copied' || r.capture === 'file-private';
}

const shape = (r: { start: bigint; end: bigint; perms: string; path: string }): RegionShape => ({ start: r.start, end: r.end, perms: r.perms, path: r.path });

/**
 * Snapshot `ref` as stored, read whole now (the store is closed on return).
 * A page not stored reads zero, or the file's content in a private file
 * mapping (its copy-on-write pages are the ones stored).
 */
export function snapshotState(storePath: string, ref: string): InstantState & { records: RegionRecord[] } {
  const store = Store.open(storePath, { readonly: true, onWarning: () => undefined });
  try {
    const proc = store.processes(store.find(ref).id)[0]!;
    const records = store.regions(proc.processId);
    const contents = new Map<bigint, Buffer>();
    for (const r of records.filter(hasContent)) {
      const data = Buffer.alloc(Number(r.end - r.start));
      if (r.capture === 'file-private' && r.file !== undefined) {
        const fd = openSync(r.file.path, 'r');
        try {
          const fileEnd = BigInt(r.file.size);
          if (r.offset < fileEnd) readAll(fd, data.subarray(0, Number(fileEnd - r.offset < r.end - r.start ? fileEnd - r.offset : r.end - r.start)), r.offset);
        } finally {
          closeSync(fd);
        }
      }
      for (const page of store.pagesInRange(proc.processId, r.start, r.end)) page.data.copy(data, Number(page.address - r.start));
      contents.set(r.start, data);
    }
    const threads = store.threads(proc.processId).map((t) => ({ tid: t.tid, regs: t.regs, fpregs: t.fpregs, xstate: t.xstate }));
    return {
      records,
      regions: records.map(shape),
      threads,
      content(start, end) {
        // Assembled from the regions with content that cover [start, end): all of it, or a reason.
        const out = Buffer.alloc(Number(end - start));
        let covered = 0n;
        for (const r of records) {
          const data = contents.get(r.start);
          const s = r.start > start ? r.start : start;
          const e = r.end < end ? r.end : end;
          if (data === undefined || s >= e) continue;
          data.copy(out, Number(s - start), Number(s - r.start), Number(e - r.start));
          covered += e - s;
        }
        return covered === end - start ? out : `regions with content cover ${covered} of the ${end - start} bytes of ${formatAddress(start)}-${formatAddress(end)}`;
      },
    };
  } finally {
    void store.close();
  }
}

/**
 * The live process `pid`, frozen with ptrace while its maps, registers and
 * the content of `ranges` are read (through /proc/PID/mem, which reads
 * PROT_NONE pages too), then let go.
 */
export function liveState(pid: number, ranges: Array<[bigint, bigint]>): InstantState {
  const binding = loadBinding();
  binding.prepareFreeze();
  const frozen = freeze(binding, pid);
  const contents = new Map<bigint, Buffer | string>();
  let regions: RegionShape[];
  try {
    regions = readMaps(pid).map(shape);
    const mem = openSync(`/proc/${pid}/mem`, 'r');
    try {
      for (const [start, end] of ranges) {
        const data = Buffer.alloc(Number(end - start));
        try {
          const n = readSync(mem, data, 0, data.length, Number(start)); // user addresses are below 2^47: exact as numbers
          contents.set(start, n === data.length ? data : `read ${n} of ${data.length} bytes at ${formatAddress(start)}`);
        } catch (error) {
          contents.set(start, `read at ${formatAddress(start)}: ${(error as Error).message}`);
        }
      }
    } finally {
      closeSync(mem);
    }
  } finally {
    binding.thaw(frozen.handle);
  }
  const threads = frozen.threads.map((t) => ({ tid: t.tid, regs: t.regs, fpregs: t.fpregs, xstate: t.xstate })).sort((a, b) => a.tid - b.tid);
  return {
    regions,
    threads,
    content(start, end) {
      for (const [s, data] of contents) {
        if (s <= start && typeof data !== 'string' && end - s <= BigInt(data.length)) return data.subarray(Number(start - s), Number(end - s));
        if (s === start && typeof data === 'string') return data;
      }
      return `${formatAddress(start)}-${formatAddress(end)} was not read`;
    },
  };
}

/**
 * Adjacent anonymous regions (and heap) of the same protection as one: the
 * layout as the program can see it through its addresses and protections,
 * without the kernel's VMA boundaries (which follow the mappings' history:
 * two VMAs with different anon_vmas are never merged).
 */
export function coalesced(regions: RegionShape[]): RegionShape[] {
  const out: RegionShape[] = [];
  for (const r of regions) {
    const prev = out[out.length - 1];
    if (prev !== undefined && prev.end === r.start && prev.perms === r.perms && prev.path === r.path && (r.path === '' || r.path === '[heap]')) prev.end = r.end;
    else out.push({ ...r });
  }
  return out;
}

/** struct user_regs_struct (x86_64), 8 bytes each. */
const REGS = ['r15', 'r14', 'r13', 'r12', 'rbp', 'rbx', 'r11', 'r10', 'r9', 'r8', 'rax', 'rcx', 'rdx', 'rsi', 'rdi', 'orig_rax', 'rip', 'cs', 'eflags', 'rsp', 'ss', 'fs_base', 'gs_base', 'ds', 'es', 'fs', 'gs'];

const reg = (regs: Buffer, name: string): bigint => regs.readBigUInt64LE(REGS.indexOf(name) * 8);
/** -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK as rax holds them. */
const RESTART = new Set([-512n, -513n, -514n, -516n].map((e) => BigInt.asUintN(64, e)));

/**
 * One thread seen at the same point of its program twice, once blocked in a
 * syscall the stop interrupted (rax -ERESTART*, rip after the syscall
 * instruction) and once a step away, on its way back into it: the kernel has
 * applied the restart (rip back 2 bytes to the syscall instruction, rax =
 * orig_rax) and the thread was stopped before it entered the syscall again
 * (orig_rax still the syscall's, or -1 when an interrupt stopped it in user
 * mode there). Either side may be T's: the snapshot at T can catch the thread
 * between two reads too. Only rip, rax and orig_rax tell the two apart.
 */
function sameSyscallRestart(a: Buffer, b: Buffer): boolean {
  const pending = (blocked: Buffer, other: Buffer): boolean =>
    RESTART.has(reg(blocked, 'rax')) &&
    reg(other, 'rip') === reg(blocked, 'rip') - 2n &&
    reg(other, 'rax') === reg(blocked, 'orig_rax') &&
    (reg(other, 'orig_rax') === 0xffffffffffffffffn || reg(other, 'orig_rax') === reg(blocked, 'orig_rax'));
  return pending(a, b) || pending(b, a);
}

/** [from, to) byte runs where a and b differ, a run ending at the first equal byte. */
function differingRuns(a: Buffer, b: Buffer): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  const n = Math.max(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] === b[i]) continue;
    const from = i;
    while (i < n && a[i] !== b[i]) i++;
    runs.push([from, i]);
  }
  return runs;
}

const hex = (b: Buffer): string => b.toString('hex');

/**
 * Every difference between the state at T and now, one line each: the region
 * list (start, end, perms, path), each run of differing bytes in T's regions
 * with content (except bytes inside `allowed`, [start, end) addresses),
 * the thread set, and each thread's registers, FXSAVE area and XSAVE area.
 */
export function differences(
  atT: InstantState & { records: RegionRecord[] },
  now: InstantState,
  options: { allowed?: Array<[bigint, bigint]>; coalesce?: boolean } = {},
): string[] {
  const out: string[] = [];
  const allowed = options.allowed ?? [];
  const line = (r: RegionShape): string => `${formatAddress(r.start)}-${formatAddress(r.end)} ${r.perms} ${r.path}`;
  const layout = (regions: RegionShape[]): string[] => (options.coalesce === true ? coalesced(regions) : regions).map(line);
  const tRegions = layout(atT.regions);
  const nowRegions = layout(now.regions);
  for (const r of tRegions) if (!nowRegions.includes(r)) out.push(`region of T missing now: ${r}`);
  for (const r of nowRegions) if (!tRegions.includes(r)) out.push(`region not there at T: ${r}`);
  const isAllowed = (address: bigint): boolean => allowed.some(([s, e]) => s <= address && address < e);
  for (const r of atT.records.filter(hasContent)) {
    const then = atT.content(r.start, r.end);
    const current = now.content(r.start, r.end);
    if (typeof then === 'string' || typeof current === 'string') {
      out.push(`${line(r)}: ${typeof then === 'string' ? `at T ${then}` : `now ${current as string}`}`);
      continue;
    }
    // One line per page: how many bytes differ, the first and last of them.
    for (let page = 0; page < then.length; page += PAGE_SIZE) {
      let count = 0;
      let first = -1;
      let last = -1;
      for (let k = page; k < page + PAGE_SIZE; k++) {
        if (then[k] === current[k] || isAllowed(r.start + BigInt(k))) continue;
        count++;
        if (first < 0) first = k;
        last = k;
      }
      if (count === 0) continue;
      const at = (k: number): string => formatAddress(r.start + BigInt(k));
      out.push(`${line(r)}: page ${at(page)}: ${count} bytes differ, ${at(first)}..${at(last)}: T ${hex(then.subarray(first, Math.min(last + 1, first + 16)))} now ${hex(current.subarray(first, Math.min(last + 1, first + 16)))}`);
    }
  }
  const tids = (s: InstantState): string => s.threads.map((t) => t.tid).join(',');
  if (tids(atT) !== tids(now)) out.push(`threads: T ${tids(atT)} now ${tids(now)}`);
  for (const t of atT.threads) {
    const n = now.threads.find((x) => x.tid === t.tid);
    if (n === undefined) continue;
    const restarted = sameSyscallRestart(t.regs, n.regs);
    for (let i = 0; i < REGS.length; i++) {
      if (restarted && (REGS[i] === 'rip' || REGS[i] === 'rax' || REGS[i] === 'orig_rax')) continue;
      const a = t.regs.readBigUInt64LE(i * 8);
      const b = n.regs.readBigUInt64LE(i * 8);
      if (a !== b) out.push(`thread ${t.tid} ${REGS[i]}: T ${formatAddress(a)} now ${formatAddress(b)}`);
    }
    for (const [what, a, b] of [['fpregs', t.fpregs, n.fpregs], ['xstate', t.xstate, n.xstate]] as const) {
      for (const [from, to] of differingRuns(a, b)) out.push(`thread ${t.tid} ${what} bytes ${from}-${to}: T ${hex(a.subarray(from, to))} now ${hex(b.subarray(from, to))}`);
    }
  }
  return out;
}
