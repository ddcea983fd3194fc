// Roll a live process back to a snapshot, in place: every thread stopped; the
// layout compared with the snapshot's and repaired with syscalls injected into
// the target (mappings created since T unmapped, anonymous ones removed since
// re-created, brk and protections restored); every page whose content differs
// from T's written back through /proc/PID/mem (which writes read-only pages
// too); every thread's registers and FP/vector state put back; threads
// created since T made to exit; then every thread resumes, at T.
//
// Everything that could make it refuse is checked before anything changes:
// a thread of T that is gone, a mapping of T that cannot be re-created, pages
// the snapshot lost, a file a private mapping reads that changed since T.
// What a rollback cannot undo (file descriptors, file offsets, children,
// data sent) is listed in its warnings.
import { closeSync, openSync, readdirSync, readSync, writeSync } from 'node:fs';
import { WpsnapError, fromNative } from '../common/errors.js';
import { fileUnchanged } from '../snapshot-format/export-raw.js';
import { PAGE_SIZE, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';
import { findSyscallInstruction, freeze, inject, type Frozen } from './attach.js';
import { intersect, normalize, subtract, type Intervals } from './intervals.js';
import type { NativeBinding } from './native/binding.js';
import { assertProcessExists, readMaps, readProcessRecord, type MapsEntry } from './procfs.js';
import { refuseSelfFreeze } from './target-guard.js';

const SYS_MPROTECT = 10;
const SYS_MMAP = 9;
const SYS_MUNMAP = 11;
const SYS_BRK = 12;
const SYS_EXIT = 60;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
/** Offsets in struct user_regs_struct (x86_64). */
const REG = { rax: 80, rip: 128, origRax: 120, rdi: 112 } as const;
/** Mappings the kernel makes and no program changes. */
const SPECIAL = new Set(['[vvar]', '[vvar_vclock]', '[vdso]', '[vsyscall]']);
/** Bytes of the target read (and compared) at a time. */
const CHUNK = 1 << 20;

/** What a rollback cannot undo, always said. */
const CANNOT_UNDO = [
  'file descriptors opened or closed since T, and file offsets, are as they are now',
  'child processes started since T, and data sent or received on pipes and sockets, are not undone',
  'signal masks and pending signals are as they are now (snapshots do not record them yet)',
];

export interface RollbackOptions {
  /** Roll this live process back instead (the same program, started apart): default the snapshot's own process. */
  pid?: number;
}

export interface RollbackResult {
  id: number;
  pid: number;
  incremental: false;
  /** Pages whose content differed from T's, written back. */
  pagesWritten: number;
  /** Pages compared with T's. */
  pagesCompared: number;
  /** Mappings unmapped, re-created, resized (brk) or re-protected. */
  mappingsRepaired: number;
  threadsRestored: number;
  /** Threads created since T, made to exit. */
  threadsExited: number;
  /** How long the target was stopped for the rollback proper, µs (ending the threads started since T stops it briefly before). */
  micros: number;
  warnings: string[];
}

/** The protection bits of a maps/regions perms string. */
function protOf(perms: string): number {
  return (perms[0] === 'r' ? 1 : 0) | (perms[1] === 'w' ? 2 : 0) | (perms[2] === 'x' ? 4 : 0);
}

const hex = (a: bigint): string => `0x${a.toString(16)}`;

interface Plan {
  brk: { from: bigint; to: bigint } | null;
  unmap: Intervals;
  create: RegionRecord[];
  reprotect: RegionRecord[];
}

/** The layout repairs, or a refusal naming what cannot be repaired. */
function planLayout(regions: RegionRecord[], maps: MapsEntry[], pid: number): Plan {
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
        `pid ${pid}: ${hex(parts[0]![0])}-${hex(parts[0]![1])} of ${r.path || 'a mapping'} (${r.perms}) was mapped at T and is not now, and only private anonymous memory can be re-created: nothing changed`,
      );
    }
    for (const [start, end] of parts) create.push({ ...r, start, end });
  }
  const reprotect: RegionRecord[] = [];
  for (const r of regions) {
    if (SPECIAL.has(r.path)) continue;
    const differs = maps.some((m) => m.start < r.end && r.start < m.end && m.perms.slice(0, 3) !== r.perms.slice(0, 3));
    const kindChanged = maps.some((m) => m.start < r.end && r.start < m.end && (m.inode !== r.inode || m.perms[3] !== r.perms[3]));
    if (kindChanged) {
      throw new WpsnapError(
        'ROLLBACK_REFUSED',
        `pid ${pid}: ${hex(r.start)}-${hex(r.end)} holds another mapping than at T (${r.path || 'anonymous'}, ${r.perms}): nothing changed`,
      );
    }
    if (differs) reprotect.push(r);
  }
  return { brk, unmap, create, reprotect };
}

/** A region's content at T, a chunk at a time: its stored pages, the file's (file-private), or zero. */
class ContentAtT {
  private fileFd: number | undefined;

  constructor(
    private readonly store: Store,
    private readonly processId: number,
    private readonly region: RegionRecord,
  ) {
    if (region.capture === 'file-private' && region.file !== undefined) this.fileFd = openSync(region.file.path, 'r');
  }

  /** T's content of [start, start + into.length) into `into`. */
  fill(start: bigint, into: Buffer): void {
    into.fill(0);
    const r = this.region;
    if (this.fileFd !== undefined && r.file !== undefined) {
      const fileOffset = r.offset + (start - r.start);
      const fileEnd = BigInt(r.file.size);
      if (fileOffset < fileEnd) {
        const want = Number(fileEnd - fileOffset < BigInt(into.length) ? fileEnd - fileOffset : BigInt(into.length));
        let done = 0;
        while (done < want) {
          const got = readSync(this.fileFd, into, done, want - done, fileOffset + BigInt(done));
          if (got === 0) break;
          done += got;
        }
      }
    }
    for (const page of this.store.pagesInRange(this.processId, start, start + BigInt(into.length))) page.data.copy(into, Number(page.address - start));
  }

  close(): void {
    if (this.fileFd !== undefined) closeSync(this.fileFd);
  }
}

/** Threads created since T resume at a syscall instruction calling exit(0). */
function exitRegisters(regs: Buffer, insn: bigint): Buffer {
  const out = Buffer.from(regs);
  out.writeBigUInt64LE(insn, REG.rip);
  out.writeBigUInt64LE(BigInt(SYS_EXIT), REG.rax);
  out.writeBigUInt64LE(0xffffffffffffffffn, REG.origRax); // no syscall restart
  out.writeBigUInt64LE(0n, REG.rdi);
  return out;
}

const taskTids = (pid: number): Set<number> => new Set(readdirSync(`/proc/${pid}/task`).map(Number));

/**
 * Make the threads created since T exit, before the rollback proper: each
 * must exit with its own stack still mapped (the kernel writes its rseq area
 * and clear_child_tid there on the way out, and a thread whose rseq area is
 * gone takes the whole process down with SIGSEGV), and that stack is a
 * mapping made since T, which the rollback unmaps. The other threads run for
 * the moment it takes; the rollback puts them back at T anyway.
 */
async function endThreadsSinceT(binding: NativeBinding, pid: number, insn: bigint, atT: Set<number>): Promise<number> {
  const tids = [...taskTids(pid)].filter((t) => !atT.has(t));
  if (tids.length === 0) return 0;
  binding.prepareFreeze();
  const frozen = freeze(binding, pid);
  let ending: number[];
  try {
    const gone = [...atT].filter((t) => !frozen.threads.some((f) => f.tid === t));
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.join(', ')} of T exited since; nothing changed`);
    }
    const fresh = frozen.threads.filter((t) => !atT.has(t.tid));
    for (const t of fresh) binding.setThreadState(frozen.handle, t.tid, { regs: exitRegisters(t.regs, insn), fpregs: t.fpregs, xstate: t.xstate });
    ending = fresh.map((t) => t.tid);
  } finally {
    binding.thaw(frozen.handle);
  }
  const until = Date.now() + 5000;
  while (ending.some((t) => taskTids(pid).has(t))) {
    if (Date.now() > until) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: threads ${ending.join(', ')}, started since T, did not exit`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return ending.length;
}

/** Which regions' content is compared and written back. */
function hasContent(r: RegionRecord): boolean {
  return (r.capture === 'protected' || r.capture === 'copied' || r.capture === 'file-private') && r.perms[0] === 'r';
}

export async function rollback(binding: NativeBinding, store: Store, ref: string, options: RollbackOptions = {}): Promise<RollbackResult> {
  const snap = store.find(ref);
  if (snap.state !== 'complete') {
    throw new WpsnapError('SNAPSHOT_INCOMPLETE', `snapshot ${snap.id} is ${snap.state}: only a complete snapshot can be rolled back to`);
  }
  const processes = store.processes(snap.id);
  if (processes.length !== 1) {
    throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} holds ${processes.length} processes: rollback takes a snapshot of one`);
  }
  const proc = processes[0]!;
  const pid = options.pid ?? proc.pid;
  assertProcessExists(pid);
  refuseSelfFreeze(pid);
  const live = readProcessRecord(pid);
  if (options.pid === undefined && live.startTimeTicks !== proc.startTimeTicks) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} is not the process of snapshot ${snap.id} (the pid was reused): give --pid of a live process of ${proc.exe}`);
  }
  if (live.exe !== proc.exe) {
    throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} runs ${live.exe}, not ${proc.exe} as in snapshot ${snap.id}: nothing changed`);
  }
  const lost = store.lost(proc.processId);
  if (lost.length > 0) {
    const pages = lost.reduce((n, l) => n + l.pages, 0);
    throw new WpsnapError('ROLLBACK_REFUSED', `snapshot ${snap.id} lost ${pages} pages (wpsnap show ${snap.id}): a rollback would leave them as they are now; nothing changed`);
  }
  const regions = store.regions(proc.processId);
  for (const r of regions) {
    if (r.capture === 'file-private' && !fileUnchanged(r)) {
      throw new WpsnapError('ROLLBACK_REFUSED', `${r.file?.path ?? r.path} changed since snapshot ${snap.id}: its pages at T are not known; nothing changed`);
    }
  }
  const threadsAtT: ThreadRecord[] = store.threads(proc.processId);
  const tidsAtT = new Set(threadsAtT.map((t) => t.tid));
  const insn = findSyscallInstruction(binding, pid);
  const warnings = [...CANNOT_UNDO];
  let threadsExited = 0;
  let frozen: Frozen | undefined;
  // Threads keep starting (a thread pool)? A few tries, then the rollback proper with none left.
  for (let attempt = 0; frozen === undefined; attempt++) {
    try {
      threadsExited += await endThreadsSinceT(binding, pid, insn, tidsAtT);
      binding.prepareFreeze();
    } catch (error) {
      throw error instanceof WpsnapError ? error : fromNative(error, `end the threads of pid ${pid} started since T`);
    }
    const candidate = freeze(binding, pid);
    if (candidate.threads.every((t) => tidsAtT.has(t.tid)) || attempt >= 3) frozen = candidate;
    else binding.thaw(candidate.handle);
  }
  let pagesWritten = 0;
  let pagesCompared = 0;
  let mappingsRepaired = 0;
  try {
    // Every check first: a refusal changes nothing.
    const frozenTids = new Set(frozen.threads.map((t) => t.tid));
    const gone = threadsAtT.filter((t) => !frozenTids.has(t.tid));
    const fresh = frozen.threads.filter((t) => !tidsAtT.has(t.tid));
    if (fresh.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid} keeps starting threads (${fresh.map((t) => t.tid).join(', ')}): they could not all be ended before the rollback; nothing else changed`);
    }
    if (gone.length > 0) {
      throw new WpsnapError('ROLLBACK_REFUSED', `pid ${pid}: thread${gone.length > 1 ? 's' : ''} ${gone.map((t) => t.tid).join(', ')} of T exited since; nothing changed`);
    }
    const plan = planLayout(regions, readMaps(pid), pid);
    const call = (nr: number, args: Array<number | bigint>, what: string): void => {
      const result = inject(binding, frozen, insn, nr, args, what);
      if (result < 0 && !(nr === SYS_BRK)) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: ${what} failed in the target (errno ${-result}); it is stopped no more, partly rolled back`);
    };
    if (plan.brk !== null) {
      call(SYS_BRK, [plan.brk.to], `brk(${hex(plan.brk.to)})`);
      mappingsRepaired++;
    }
    for (const [s, e] of plan.unmap) {
      call(SYS_MUNMAP, [s, e - s], `munmap(${hex(s)}, ${e - s})`);
      mappingsRepaired++;
    }
    for (const r of plan.create) {
      const created = inject(binding, frozen, insn, SYS_MMAP, [r.start, r.end - r.start, protOf(r.perms) | 2, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0], `mmap(${hex(r.start)})`);
      if (BigInt.asUintN(64, BigInt(created)) !== r.start) throw new WpsnapError('ROLLBACK_FAILED', `pid ${pid}: mmap at ${hex(r.start)} failed in the target (${created}); it is partly rolled back`);
      mappingsRepaired++;
    }
    // Content: compared chunk by chunk, written back where it differs.
    const mem = openSync(`/proc/${pid}/mem`, 'r+');
    try {
      const now = Buffer.alloc(CHUNK);
      const then = Buffer.alloc(CHUNK);
      for (const r of regions.filter(hasContent)) {
        const content = new ContentAtT(store, proc.processId, r);
        try {
          for (let at = r.start; at < r.end; at += BigInt(CHUNK)) {
            const len = Number(r.end - at < BigInt(CHUNK) ? r.end - at : BigInt(CHUNK));
            const current = now.subarray(0, len);
            const wanted = then.subarray(0, len);
            readSync(mem, current, 0, len, at);
            content.fill(at, wanted);
            for (let off = 0; off < len; off += PAGE_SIZE) {
              pagesCompared++;
              const a = current.subarray(off, off + PAGE_SIZE);
              const b = wanted.subarray(off, off + PAGE_SIZE);
              if (a.equals(b)) continue;
              writeSync(mem, b, 0, PAGE_SIZE, Number(at) + off); // user addresses are below 2^47: exact as numbers
              pagesWritten++;
            }
          }
        } finally {
          content.close();
        }
      }
    } finally {
      closeSync(mem);
    }
    for (const r of plan.create.filter((c) => c.perms[1] !== 'w')) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${hex(r.start)})`);
    }
    for (const r of plan.reprotect) {
      call(SYS_MPROTECT, [r.start, r.end - r.start, protOf(r.perms)], `mprotect(${hex(r.start)}, ${r.perms})`);
      mappingsRepaired++;
    }
    // Registers last: injections run in one of these threads and put its registers back after each.
    for (const t of threadsAtT) binding.setThreadState(frozen.handle, t.tid, { regs: t.regs, fpregs: t.fpregs, xstate: t.xstate });
  } finally {
    binding.thaw(frozen.handle);
  }
  const micros = Number(process.hrtime.bigint() - frozen.frozenAt) / 1000;
  if (regions.some((r) => r.perms[3] === 's' && hasContent(r))) warnings.push('shared memory was written back: other processes that map it see its content at T too');
  return {
    id: snap.id,
    pid,
    incremental: false,
    pagesWritten,
    pagesCompared,
    mappingsRepaired,
    threadsRestored: threadsAtT.length,
    threadsExited,
    micros: Math.round(micros),
    warnings,
  };
}
