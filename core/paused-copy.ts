// The pages copied while the target is stopped, because uffd-wp cannot
// protect their mappings: copy-on-write pages of private file mappings and
// [vdso], and shared memory the kernel will not register (SysV segments).
import { PAGE_SIZE, type PageBatch } from '../snapshot-format/model.js';
import { fromNative } from '../common/errors.js';
import type { NativeBinding } from './native/binding.js';
import type { RegionPlan } from './regions.js';

/** [start, end, allPresent] of the mappings whose pages are copied in the pause because uffd-wp cannot protect them. */
function privateCopyRanges(plans: Iterable<RegionPlan>): BigUint64Array {
  const ranges: bigint[] = [];
  for (const plan of plans) {
    if (plan.pausedCopy === 'cow' || plan.pausedCopy === 'all-present') {
      ranges.push(plan.record.start, plan.record.end, plan.pausedCopy === 'all-present' ? 1n : 0n);
    }
  }
  return BigUint64Array.from(ranges);
}

/**
 * Memory for the pages copied in the pause, touched now, before the freeze:
 * on this kind of VM the first touch of fresh memory costs as much as the
 * copy (about 2.5 µs a page), and a JVM copies ~3,000 pages of its CDS
 * archive. Sized from a count taken now, with room for pages copied on write
 * before the freeze; if more turn up, the copy takes a new buffer.
 */
export function privateCopyBuffer(binding: NativeBinding, pid: number, plans: Iterable<RegionPlan>): Buffer | undefined {
  const ranges = privateCopyRanges(plans);
  if (ranges.length === 0) return undefined;
  let pages: number;
  try {
    pages = binding.countPrivatePages(pid, ranges);
  } catch (error) {
    throw fromNative(error, 'count the copied-on-write pages of private file mappings');
  }
  if (pages === 0) return undefined;
  return Buffer.allocUnsafeSlow((Math.ceil(pages * 1.25) + 256) * PAGE_SIZE).fill(0);
}

/** Copy, with the target stopped, every page the plans mark for a paused copy. */
export function copyInPause(binding: NativeBinding, pid: number, plans: RegionPlan[], copyBuffer: Buffer | undefined): PageBatch[] {
  const pausedPages: PageBatch[] = [];
  for (const plan of plans) {
    const { start, end, offset } = plan.record;
    if (plan.pausedCopy === 'file') {
      const copy = binding.copyFilePages(plan.openedFd!, offset, end - start, start);
      if (copy.addresses.length > 0) pausedPages.push({ addresses: copy.addresses, data: copy.data });
    }
  }
  const privateRanges = privateCopyRanges(plans);
  if (privateRanges.length > 0) {
    const copy = binding.copyPrivatePages(pid, privateRanges, copyBuffer);
    const pages = copy.addresses.length;
    if (pages > 0) pausedPages.push({ addresses: copy.addresses, data: copy.data.subarray(0, pages * PAGE_SIZE) });
  }
  return pausedPages;
}
