// Registering the target's mappings with its userfaultfd and write-protecting
// them: done inside the pause, on the context the attach obtained.
import { WpsnapError, fromNative } from '../common/errors.js';
import { UFFDIO_REGISTER_MODE_WP } from './features.js';
import type { NativeBinding } from './native/binding.js';
import type { RegionPlan } from './regions.js';

/** Register one region for write-protect faults; false if the kernel refuses the mapping type. */
function register(binding: NativeBinding, uffd: number, plan: RegionPlan): boolean {
  const { start, end } = plan.record;
  try {
    binding.uffdRegister(uffd, start, end - start, UFFDIO_REGISTER_MODE_WP);
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === 'EINVAL' || code === 'EPERM') return false;
    const range = `0x${start.toString(16)}-0x${end.toString(16)}`;
    if (code === 'EBUSY') {
      // A mapping belongs to one userfaultfd context at a time.
      throw new WpsnapError(
        'EBUSY',
        `${range} is already registered with another userfaultfd: another snapshot of this process is still running, or the program uses userfaultfd itself`,
        { errno: 16, syscall: 'ioctl' },
      );
    }
    throw fromNative(error, `register ${range}`);
  }
  return true;
}

/**
 * Register every region the engine is to save. A region the kernel will not
 * register (a SysV segment) is copied whole in the pause instead, while the
 * target, its only writer, is stopped, up to maxSharedCopyBytes in all;
 * shared memory another process writes is listed lost. Returns the
 * registered plans; the others are re-planned in place.
 */
export function registerRegions(binding: NativeBinding, uffd: number, plans: RegionPlan[], maxSharedCopyBytes: number): RegionPlan[] {
  let sharedCopyBytes = 0;
  const registered: RegionPlan[] = [];
  for (const plan of plans) {
    if (plan.engine === undefined) continue;
    const bytes = Number(plan.record.end - plan.record.start);
    if (plan.sharedWith !== undefined) {
      // uffd-wp only sees writes through this process's mapping: memory other
      // processes write is not capturable at one instant without freezing them.
      delete plan.engine;
      plan.record.capture = 'skipped';
      plan.record.skipReason = `shared memory also mapped writable by pid ${plan.sharedWith.join(', ')}: snapshot those processes together to capture it`;
      plan.lost = { address: plan.record.start, pages: bytes / 4096, reason: 'shared-with-other-process' };
      continue;
    }
    if (register(binding, uffd, plan)) {
      registered.push(plan);
      continue;
    }
    delete plan.engine;
    plan.record.capture = 'copied';
    if (plan.openedFd === undefined) {
      plan.pausedCopy = 'all-present';
    } else if (sharedCopyBytes + bytes <= maxSharedCopyBytes) {
      sharedCopyBytes += bytes;
      plan.pausedCopy = 'file';
    } else {
      plan.record.capture = 'skipped';
      plan.record.skipReason = 'shared memory uffd-wp cannot protect, larger than --max-shared-copy';
      plan.lost = { address: plan.record.start, pages: bytes / 4096, reason: 'shared-copy-limit' };
    }
  }
  return registered;
}

/** Write-protect every range ([start, len, …]) in one call, spread over the CPUs: the target is stopped meanwhile. */
export function writeProtectAll(binding: NativeBinding, uffd: number, ranges: bigint[]): void {
  try {
    binding.uffdWriteProtectRanges(uffd, BigUint64Array.from(ranges), true);
  } catch (error) {
    throw fromNative(error, 'write-protect');
  }
}
