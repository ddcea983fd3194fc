// Values the controller shares with its C code. TypeScript needs them at
// compile time (literal types); the addon exports the C side's (`constants`)
// and test/constants.test.ts fails if the two disagree.

/** x86_64 system call numbers wpsnap injects into a target. */
export const SYSCALL = {
  ioctl: 16,
  close: 3,
  openat: 257,
  userfaultfd: 323,
  pidfd_open: 434,
  pidfd_getfd: 438,
  // a rollback's layout repairs, and the exit of threads started since T
  mmap: 9,
  mprotect: 10,
  munmap: 11,
  brk: 12,
  mremap: 25,
  exit: 60,
  // a restore's building of the new process (core/restore-memory.ts, core/restore.ts)
  prctl: 157,
  set_tid_address: 218,
  set_robust_list: 273,
  rseq: 334,
  rt_sigaction: 13,
  setresuid: 117,
  setresgid: 119,
  setgroups: 116,
  memfd_create: 319,
  ftruncate: 77,
  clone3: 435,
} as const;

/** _IO(0xAA, 0x00) from linux/userfaultfd.h (6.1+): a new context from /dev/userfaultfd. */
export const USERFAULTFD_IOC_NEW = 0xaa00;

/** How the engine reads a region (EngineRegion.kind). */
export const REGION_KIND = {
  /** Anonymous: process_vm_readv; pagemap finds never-touched pages. */
  anon: 0,
  /** Shared file (shmem, memfd, hugetlbfs): pread from an fd, holes skipped. */
  file: 1,
  /** Other private memory: process_vm_readv. */
  private: 2,
} as const;
export type RegionKind = (typeof REGION_KIND)[keyof typeof REGION_KIND];
