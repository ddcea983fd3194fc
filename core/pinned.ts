// Memory the kernel writes through a long-term pin (FOLL_LONGTERM) instead of
// the target's page tables: io_uring registered buffers, RDMA memory regions,
// vfio/DMA mappings. uffd-wp never sees those writes, so the engine would copy
// such a page with whatever the kernel wrote after T. This module finds them:
// the addresses where the kernel lists them (io_uring's fdinfo), and a warning
// for every pin it cannot place (VmPin beyond what it found, RDMA, vfio).
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { PAGE_SIZE, type LostRange, type PageBatch } from '../snapshot-format/model.js';
import { fromNative } from '../common/errors.js';
import type { NativeBinding } from './native/binding.js';
import type { RegionPlan } from './regions.js';

const IO_URING = 'anon_inode:[io_uring]';
/** fdinfo omits the buffer list while the ring's lock is held (io_uring/fdinfo.c uses mutex_trylock). */
const FDINFO_ATTEMPTS = 20;
const FDINFO_RETRY_MS = 1;

/** What the fd table shows, read before the freeze (a /proc readlink per fd is too slow for the pause). */
export interface PinSources {
  ioUringFds: number[];
  /** One line per fd the kernel pins memory for without listing its addresses. */
  deviceWarnings: string[];
}

export interface PinnedRange {
  start: bigint;
  end: bigint;
  /** Names the kind of pin, for lost listings and warnings. */
  kind: string;
}

export interface PinnedScan {
  ranges: PinnedRange[];
  /** Pins whose addresses are not known: reported with the snapshot, never silent. */
  warnings: string[];
}

export function scanPinSources(pid: number): PinSources {
  const ioUringFds: number[] = [];
  const deviceWarnings: string[] = [];
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return { ioUringFds, deviceWarnings };
  }
  for (const name of names) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${name}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target === IO_URING) ioUringFds.push(Number(name));
    else if (target.startsWith('/dev/infiniband/'))
      deviceWarnings.push(`fd ${name} is ${target} (RDMA): memory regions it registered are written by the device without a fault; wpsnap cannot list their addresses, so such pages may hold content from after T`);
    else if (target.startsWith('/dev/vfio/'))
      deviceWarnings.push(`fd ${name} is ${target} (vfio): DMA-mapped memory is written by the device without a fault; wpsnap cannot list its addresses, so such pages may hold content from after T`);
  }
  return { ioUringFds, deviceWarnings };
}

interface RingInfo {
  ino: string;
  /** [address, length] of each registered buffer; undefined while the kernel omits the list. */
  buffers: Array<[bigint, bigint]> | undefined;
}

/** Parse /proc/.../fdinfo of an io_uring fd: `ino:` and the `UserBufs:` section ("%5u: 0x%llx/%u" or "<none>"). */
export function parseRingFdinfo(text: string): RingInfo {
  const ino = /^ino:\s*(\d+)$/m.exec(text)?.[1] ?? '?';
  const lines = text.split('\n');
  const at = lines.findIndex((l) => l.startsWith('UserBufs:'));
  if (at < 0) return { ino, buffers: undefined };
  const count = Number(lines[at]!.slice('UserBufs:'.length).trim());
  const buffers: Array<[bigint, bigint]> = [];
  let listed = 0;
  for (const line of lines.slice(at + 1, at + 1 + count)) {
    const entry = /^\s*\d+: (?:0x([0-9a-f]+)\/(\d+)|<none>)$/.exec(line);
    if (!entry) break;
    listed++;
    if (entry[1] !== undefined) buffers.push([BigInt(`0x${entry[1]}`), BigInt(entry[2]!)]);
  }
  return { ino, buffers: listed === count ? buffers : undefined };
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** fdinfo of a ring, retried while its buffer list is omitted. */
function readRing(fdinfoPath: string): RingInfo | undefined {
  let info: RingInfo | undefined;
  for (let attempt = 0; attempt < FDINFO_ATTEMPTS; attempt++) {
    try {
      info = parseRingFdinfo(readFileSync(fdinfoPath, 'utf8'));
    } catch {
      return info; // the fd was closed
    }
    if (info.buffers !== undefined) return info;
    sleepMs(FDINFO_RETRY_MS);
  }
  return info;
}

/** Pinned pages accounted to the process (mm->pinned_vm), in bytes. */
export function readVmPinBytes(pid: number): number {
  const kb = /^VmPin:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  return kb === undefined ? 0 : Number(kb) * 1024;
}

/**
 * Run during the pause: every pinned range wpsnap can place, and a warning for
 * each pin it cannot. A ring whose fd was closed (IORING_REGISTER_RING_FDS)
 * lists its buffers nowhere (its mappings cannot be reopened through
 * map_files: ENXIO), and one set up with IORING_SETUP_NO_MMAP shows no
 * mapping at all: only VmPin reveals their buffers.
 */
export function findPinned(pid: number, sources: PinSources): PinnedScan {
  const warnings = [...sources.deviceWarnings];
  const ranges: PinnedRange[] = [];
  const vmPin = readVmPinBytes(pid);
  if (vmPin === 0 && sources.ioUringFds.length === 0) return { ranges, warnings };
  let explained = 0n;
  const seen = new Set<string>();
  const visit = (fdinfo: string, label: string): void => {
    const ring = readRing(fdinfo);
    if (ring === undefined) return;
    if (seen.has(ring.ino) && ring.ino !== '?') return;
    seen.add(ring.ino);
    if (ring.buffers === undefined) {
      warnings.push(`${label}: its registered buffers could not be listed (the ring stayed busy); pages the kernel writes through them may hold content from after T`);
      return;
    }
    for (const [address, length] of ring.buffers) {
      const start = address & ~BigInt(PAGE_SIZE - 1);
      const end = (address + length + BigInt(PAGE_SIZE - 1)) & ~BigInt(PAGE_SIZE - 1);
      explained += end - start;
      ranges.push({ start, end, kind: `io_uring registered buffer (${label})` });
    }
  };
  for (const fd of sources.ioUringFds) visit(`/proc/${pid}/fdinfo/${fd}`, `io_uring fd ${fd}`);
  if (BigInt(vmPin) > explained) {
    warnings.push(
      `VmPin is ${vmPin / 1024} kB but the io_uring buffers wpsnap found explain ${explained / 1024n} kB: the kernel may write the rest ` +
        `(a hidden io_uring ring, RDMA, a driver) without a fault, so some pages may hold content from after T`,
    );
  }
  return { ranges, warnings };
}

/** Copying pinned pages lengthens the pause (~2.5 µs a page here); beyond this they are listed lost instead (SnapshotOptions.maxPinnedCopyBytes). */
export const PINNED_COPY_MAX_BYTES = 64 * 1024 * 1024;

export interface PinnedSave {
  /** The pinned pages, copied now: their content at T. */
  pages: PageBatch | undefined;
  lost: LostRange[];
  warnings: string[];
  pagesCopied: number;
}

function overlap(plan: RegionPlan, r: PinnedRange): [bigint, bigint] | undefined {
  // A hugetlb page is saved and unprotected whole: settle whole units.
  const unit = BigInt(plan.engine!.pageSize);
  const start = (r.start > plan.record.start ? r.start : plan.record.start) & ~(unit - 1n);
  const rawEnd = r.end < plan.record.end ? r.end : plan.record.end;
  const end = (rawEnd + unit - 1n) & ~(unit - 1n);
  return start < end ? [start, end] : undefined;
}

function appendSaved(plan: RegionPlan, runs: bigint[]): void {
  if (runs.length === 0) return;
  const old = plan.engine!.savedRanges;
  plan.engine!.savedRanges = BigUint64Array.from([...(old ?? []), ...runs]);
}

/**
 * During the pause, after the write-protect: copy the pinned pages of the
 * regions the engine sweeps (exact at T: the target is stopped) and tell the
 * engine they are settled, since a later copy would hold what the kernel wrote
 * after T. Past PINNED_COPY_MAX_BYTES they are listed lost instead
 * (`pinned-kernel-writable`), and settled too. Regions copied whole in the
 * pause need nothing more; skipped ones are already listed lost.
 */
export function savePinned(
  binding: NativeBinding,
  pid: number,
  plans: RegionPlan[],
  scan: PinnedScan,
  maxCopyBytes = PINNED_COPY_MAX_BYTES,
): PinnedSave {
  const result: PinnedSave = { pages: undefined, lost: [], warnings: [...scan.warnings], pagesCopied: 0 };
  const copy: Array<{ plan: RegionPlan; start: bigint; end: bigint }> = [];
  let budget = BigInt(maxCopyBytes);
  for (const r of scan.ranges) {
    for (const plan of plans) {
      if (plan.engine === undefined) continue;
      const piece = overlap(plan, r);
      if (piece === undefined) continue;
      const [start, end] = piece;
      if (end - start <= budget) {
        budget -= end - start;
        copy.push({ plan, start, end });
        continue;
      }
      const pages = Number((end - start) / BigInt(PAGE_SIZE));
      result.lost.push({ address: start, pages, reason: 'pinned-kernel-writable' });
      result.warnings.push(`${pages} pages of an ${r.kind} at 0x${start.toString(16)} listed lost pinned-kernel-writable: over the ${maxCopyBytes} bytes the pause copies`);
      appendSaved(plan, [start, end]);
    }
  }
  if (copy.length === 0) return result;
  let copied: { addresses: BigUint64Array; data: Buffer };
  try {
    copied = binding.copyPrivatePages(pid, BigUint64Array.from(copy.flatMap((c) => [c.start, c.end, 1n])));
  } catch (error) {
    throw fromNative(error, 'copy the pinned pages');
  }
  // Settle exactly the pages copied (a pinned page is always present).
  for (const c of copy) {
    const runs: bigint[] = [];
    for (const address of copied.addresses) {
      if (address < c.start || address >= c.end) continue;
      const last = runs.length - 1;
      if (last > 0 && runs[last] === address) runs[last] = address + BigInt(PAGE_SIZE);
      else runs.push(address, address + BigInt(PAGE_SIZE));
    }
    appendSaved(c.plan, runs);
  }
  result.pagesCopied = copied.addresses.length;
  if (result.pagesCopied > 0) result.pages = { addresses: copied.addresses, data: copied.data.subarray(0, result.pagesCopied * PAGE_SIZE) };
  return result;
}
