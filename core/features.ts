// The userfaultfd features wpsnap needs, and probing them with clear answers.
import { readFileSync } from 'node:fs';
import { unsupported, fromNative } from '../common/errors.js';
import type { NativeBinding } from './native/binding.js';

export const UFFD_FEATURE = {
  PAGEFAULT_FLAG_WP: 1n << 0n,
  EVENT_FORK: 1n << 1n,
  EVENT_REMAP: 1n << 2n,
  EVENT_REMOVE: 1n << 3n,
  EVENT_UNMAP: 1n << 6n,
  THREAD_ID: 1n << 8n,
  WP_HUGETLBFS_SHMEM: 1n << 12n,
  WP_UNPOPULATED: 1n << 13n,
  WP_ASYNC: 1n << 15n,
} as const;

export const UFFDIO_REGISTER_MODE_WP = 1n << 1n;

/** What each feature is for, as `wpsnap check` explains it. */
export const FEATURE_PURPOSE: Record<keyof typeof UFFD_FEATURE, string> = {
  PAGEFAULT_FLAG_WP: 'write-protect faults (uffd-wp)',
  EVENT_FORK: 'a fork during a snapshot: the child is released unprotected and unsaved shared pages are listed lost',
  EVENT_REMAP: 'follow mremap of memory not yet saved',
  EVENT_REMOVE: 'save memory before MADV_DONTNEED discards it',
  EVENT_UNMAP: 'know memory unmapped before it was saved',
  THREAD_ID: 'faulting thread ids (requested; not used yet)',
  WP_HUGETLBFS_SHMEM: 'protect shmem/memfd and hugetlbfs memory',
  WP_UNPOPULATED: 'protect never-touched memory without populating it',
  WP_ASYNC: 'not used yet (dirty tracking with PAGEMAP_SCAN)',
};

/** Requested on the target's context for a snapshot. */
export const UFFD_FEATURES_FOR_SNAPSHOT =
  UFFD_FEATURE.EVENT_FORK |
  UFFD_FEATURE.EVENT_REMAP |
  UFFD_FEATURE.EVENT_REMOVE |
  UFFD_FEATURE.EVENT_UNMAP |
  UFFD_FEATURE.THREAD_ID |
  UFFD_FEATURE.WP_HUGETLBFS_SHMEM |
  UFFD_FEATURE.WP_UNPOPULATED;

const REQUIRED: Array<keyof typeof UFFD_FEATURE> = [
  'PAGEFAULT_FLAG_WP',
  'EVENT_REMAP',
  'EVENT_REMOVE',
  'EVENT_UNMAP',
  'WP_HUGETLBFS_SHMEM',
  'WP_UNPOPULATED',
];

export function kernelFeatures(binding: NativeBinding): bigint {
  try {
    return binding.probeUffd().features;
  } catch (error) {
    const wrapped = fromNative(error, 'probe userfaultfd');
    if (wrapped.code === 'ENOSYS') throw unsupported('NO_USERFAULTFD', 'this kernel has no userfaultfd (CONFIG_USERFAULTFD=n)');
    if (wrapped.code === 'EPERM') {
      throw unsupported('USERFAULTFD_NOT_PERMITTED', 'userfaultfd is not permitted here: run wpsnap as root (CAP_SYS_PTRACE)');
    }
    throw wrapped;
  }
}

export function missingFeatures(features: bigint): Array<keyof typeof UFFD_FEATURE> {
  return REQUIRED.filter((name) => (features & UFFD_FEATURE[name]) === 0n);
}

/** Throws an "unsupported environment" error naming what this kernel lacks. */
export function requireFeatures(binding: NativeBinding, features = kernelFeatures(binding)): void {
  const missing = missingFeatures(features);
  if (missing.length > 0) {
    const release = readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
    throw unsupported(
      'KERNEL_FEATURE_MISSING',
      `kernel ${release} lacks userfaultfd feature${missing.length > 1 ? 's' : ''} ${missing
        .map((m) => `${m} (${FEATURE_PURPOSE[m]})`)
        .join(', ')}`,
    );
  }
}
