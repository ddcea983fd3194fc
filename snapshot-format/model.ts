// The data model shared by the controller, the store, the CLI and the exporters.
// Addresses are bigint: x86_64 user addresses exceed 2^53.

export const PAGE_SIZE = 4096;

/** How the content of a region at the snapshot instant T is captured. */
export type RegionCapture =
  /** Registered with uffd-wp: every page saved before its first write after T. */
  | 'protected'
  /** Copied whole while the target was stopped ([vdso], SysV segments, a
   * private file mapping whose file cannot be referenced): every page with data
   * was stored, and a page not stored is zero. */
  | 'copied'
  /** A private file mapping: its privately modified (copy-on-write) pages were
   * copied while the target was stopped; every other page is the file's
   * content, kept as a FileReference. */
  | 'file-private'
  /** Read-only shared file mapping: the content is the file's; kept as a FileReference. */
  | 'file-reference'
  /** Not captured; skipReason says why (e.g. [vvar], [vsyscall], device or PFN maps). */
  | 'skipped';

/** Identity of a file whose content stands in for unmodified pages of a mapping. */
export interface FileReference {
  path: string;
  dev: number;
  ino: number;
  size: number;
  /** st_mtime in nanoseconds since the epoch, as a decimal string (exceeds 2^53). */
  mtimeNs: string;
}

export interface RegionRecord {
  start: bigint;
  end: bigint;
  /** As in /proc/PID/maps, e.g. "rw-p". */
  perms: string;
  /** File offset of `start`, bytes. */
  offset: bigint;
  /** "major:minor" as in /proc/PID/maps. */
  dev: string;
  inode: number;
  /** Path or pseudo-path ("[heap]", "[stack]", "/memfd:x (deleted)"), "" for anonymous. */
  path: string;
  /** Kernel page size of the mapping (4096, or the hugetlb page size). */
  pageSize: number;
  capture: RegionCapture;
  skipReason?: string;
  file?: FileReference;
}

export interface ThreadRecord {
  tid: number;
  /** /proc/PID/task/TID/comm */
  name: string;
  /** struct user_regs_struct (x86_64: 27 × u64, 216 bytes) as captured at T. */
  regs: Buffer;
  /** struct user_fpregs_struct (x86_64: 512 bytes, the FXSAVE area). */
  fpregs: Buffer;
  /** NT_X86_XSTATE register set (variable size), empty if unavailable. */
  xstate: Buffer;
  /**
   * Blocked signals at T (PTRACE_GETSIGMASK; /proc's SigBlk): bit n-1 set when signal n is
   * blocked, 0 ..= 2^64-1. Undefined: not recorded (a snapshot of a store before schema 5).
   */
  sigmask?: bigint;
  /**
   * What a restore gives the thread again (schema 7; undefined when not recorded): the address the
   * kernel clears and futex-wakes at its exit (set_tid_address), its robust futex list
   * (set_robust_list) and its registered rseq area with the signature its abort handlers carry.
   */
  clearChildTid?: bigint;
  robustList?: { head: bigint; len: number };
  rseq?: { area: bigint; size: number; signature: number };
}

export interface ProcessRecord {
  pid: number;
  ppid: number;
  uid: number;
  gid: number;
  /** readlink /proc/PID/exe */
  exe: string;
  cmdline: string[];
  comm: string;
  /** Field 22 of /proc/PID/stat: start time in clock ticks after boot. */
  startTimeTicks: number;
  /** Start time as an ISO 8601 date, derived from boot time. */
  startedAt: string;
  /** /proc/PID/auxv, raw. */
  auxv: Buffer;
  /** Its pid in each PID namespace it is in, outermost (wpsnap's) first: NSpid
   * of /proc/PID/status. Absent when not recorded (stores before schema 3). */
  nsPids?: number[];
  /** What a restore will need besides memory and threads (schema 6), read from
   * /proc just before the pause. Written with the process; a store gives it
   * back through Store.processState(processId), never in processes(). */
  state?: ProcessState;
}

/** What an fd refers to, from its /proc/PID/fd link and a stat through it. */
export type FdKind =
  | 'file'
  | 'directory'
  | 'pipe'
  | 'socket'
  | 'eventfd'
  | 'timerfd'
  | 'signalfd'
  | 'epoll'
  | 'memfd'
  /** A character or block device. */
  | 'device'
  /** Another anon_inode:… (pidfd, inotify, userfaultfd, io_uring, …). */
  | 'anon'
  | 'other';

/** One open file descriptor of the process. */
export interface FdRecord {
  fd: number;
  kind: FdKind;
  /** readlink /proc/PID/fd/N: a path, or a pseudo-path such as "pipe:[1234]", "anon_inode:[eventfd]". */
  target: string;
  /** pos of /proc/PID/fdinfo/N: the file offset, as a decimal string (up to 2^63-1). */
  pos: string;
  /** flags of /proc/PID/fdinfo/N (octal there): the open flags, O_CLOEXEC included. */
  flags: number;
  /** mnt_id of /proc/PID/fdinfo/N: the mount it was opened on (/proc/PID/mountinfo). */
  mntId: number;
  /** stat through /proc/PID/fd/N. */
  dev: number;
  ino: number;
  /** st_mode: file type and permission bits. */
  mode: number;
  /** Regular files (memfds included) only: st_size and st_mtime (ns since the epoch, a decimal string). */
  size?: number;
  mtimeNs?: string;
  // The kind's details a restore needs, from /proc/PID/fdinfo/N (sockets:
  // /proc/PID/net/*). Each is present only on its kind, and left out when it
  // cannot be read.
  /** epoll: one entry per registered fd ("tfd:" lines). */
  epoll?: EpollTarget[];
  /** eventfd: "eventfd-count:" (hex there), as a decimal string, and "eventfd-semaphore:" (EFD_SEMAPHORE) where the kernel shows it. */
  eventfd?: { count: string; semaphore?: boolean };
  /** pipe, on its read end: the bytes it held at T, as hex (read during the pause without consuming them), when both ends are the process's. */
  pipeBytes?: string;
  timerfd?: TimerfdState;
  /** signalfd: "sigmask:" as 0x and 16 hex digits (as formatSigmask). */
  signalfd?: { sigmask: string };
  socket?: SocketState;
}

/** One fd registered in an epoll fd: a "tfd:" line of its fdinfo. */
export interface EpollTarget {
  /** The registered fd number (in the target's table). */
  fd: number;
  /** The event mask (hex there) as the kernel holds it: EPOLLERR|EPOLLHUP are always added. */
  events: number;
  /** epoll_event.data (hex there, 64 bits) as a decimal string. */
  data: string;
}

/** A second and nanosecond pair of a timerfd's fdinfo, e.g. "(6, 994027858)". */
export interface Timespec {
  sec: number;
  nsec: number;
}

/** A timerfd's fdinfo. */
export interface TimerfdState {
  /** "clockid:": CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, CLOCK_BOOTTIME 7, … */
  clockid: number;
  /** "ticks:": expirations not yet read, decimal string. */
  ticks: string;
  /** "settime flags:" (octal there): TFD_TIMER_ABSTIME 1, TFD_TIMER_CANCEL_ON_SET 2. */
  settimeFlags: number;
  /** "it_value:": time left until the next expiration (0, 0 when disarmed). */
  value: Timespec;
  /** "it_interval:": the period (0, 0 for a one-shot timer). */
  interval: Timespec;
}

/** A socket as /proc/PID/net/{unix,tcp,tcp6,udp,udp6} shows it (found by inode). */
export interface SocketState {
  family: 'unix' | 'inet' | 'inet6';
  type: 'stream' | 'dgram' | 'seqpacket';
  /**
   * 'listen', 'connected' (unix SS_CONNECTED, TCP/UDP ESTABLISHED),
   * 'unconnected' (unix SS_UNCONNECTED, TCP/UDP CLOSE), otherwise the state's
   * name in lower case ('connecting', 'syn_sent', 'time_wait', …).
   */
  state: string;
  /** unix: the bound path ("@…" abstract, "" unbound); inet: "a.b.c.d:port"; inet6: "[addr]:port". */
  local: string;
  /** inet, inet6: the peer, when it has one (a port other than 0). */
  remote?: string;
  /** Options a restore sets again (getsockopt through a copy of the fd, just before the pause): 1 on, 0 off. Absent: not read. */
  options?: { reuseAddr: boolean; reusePort: boolean; keepAlive: boolean; v6Only?: boolean; noDelay?: boolean };
}

/** One line of /proc/PID/limits. Values are decimal strings (up to 2^64-2); null is "unlimited". */
export interface RlimitRecord {
  /** As /proc shows it, e.g. "Max open files". */
  name: string;
  soft: string | null;
  hard: string | null;
  /** "bytes", "files", …; "" when /proc shows none. */
  units: string;
}

/** Address-space fields of /proc/PID/stat (man 5 proc), decimal strings. */
export interface MmFields {
  /** Fields 26-28. */
  startCode: string;
  endCode: string;
  startStack: string;
  /** Fields 45-51. */
  startData: string;
  endData: string;
  startBrk: string;
  argStart: string;
  argEnd: string;
  envStart: string;
  envEnd: string;
}

/**
 * The process state a restore will need besides memory, threads and
 * registers (issue 13), stored as one JSON document per process (FORMAT.md,
 * "process_state"). Read from /proc just before the pause.
 */
export interface ProcessState {
  /** Every entry of /proc/PID/fd, by fd number; one that closed while being read is left out. */
  fds: FdRecord[];
  /** readlink /proc/PID/cwd and /proc/PID/root. */
  cwd: string;
  root: string;
  /** Umask of /proc/PID/status (e.g. 0o027 = 23). */
  umask: number;
  /** Uid and Gid of /proc/PID/status: [real, effective, saved, filesystem]; Groups: supplementary groups. */
  credentials: { uid: number[]; gid: number[]; groups: number[] };
  /** /proc/PID/personality (hex there). */
  personality: number;
  /** Every line of /proc/PID/limits, in its order. */
  rlimits: RlimitRecord[];
  mm: MmFields;
  /** stat /proc/PID/exe (the file, through the link); null when it cannot be read (no mm, or gone). */
  exe: { path: string; dev: number; ino: number; size: number; mtimeNs: string } | null;
  /**
   * Signal dispositions at T other than the default, by signal number (read in the pause; absent
   * when not recorded): the handler (1: SIG_IGN), sa_flags, sa_restorer and sa_mask, as decimal strings.
   */
  signals?: SignalAction[];
}

/** One signal's disposition (struct kernel_sigaction of rt_sigaction(2), x86_64). */
export interface SignalAction {
  signal: number;
  handler: string;
  flags: string;
  restorer: string;
  mask: string;
}

/** Why a page's content at T is not in the snapshot. */
export const LOST_REASONS = [
  /** munmap'ed (or replaced by a new mapping) after T before the page was saved. */
  'unmapped-before-saved',
  /** Discarded by MADV_DONTNEED/MADV_REMOVE (or reclaimed after MADV_FREE) after T before the page was saved. */
  'discarded-before-saved',
  /** A writable MAP_SHARED file mapping: uffd-wp cannot protect it, so its content at T is unknown. */
  'shared-file-not-protectable',
  /** The kernel refused to read the page (process_vm_readv/pread error). */
  'read-failed',
  /** The snapshot was interrupted before the page was saved. */
  'interrupted',
  /** The referenced file changed after T (export only): its pages at T are unknown. */
  'file-changed',
  /** A hugetlb mapping with pages larger than 2 MiB: the engine copies at most 2 MiB per fault. */
  'unsupported-page-size',
  /** Shared memory other processes also map writable: their writes do not fault in the target, so it has no single instant T. */
  'shared-with-other-process',
  /** Pinned by the kernel (an io_uring registered buffer, FOLL_LONGTERM) and too much to copy in the pause: the kernel writes it without a fault. */
  'pinned-kernel-writable',
  /** Shared memory uffd-wp cannot protect (a SysV segment), beyond what --max-shared-copy lets the pause copy. */
  'shared-copy-limit',
  /** A shared file (memfd, /dev/shm, shmem) was changed through an fd (write, fallocate, truncate,
   * copy_file_range, splice; by the target or another process) after T before the page was saved. */
  'file-changed-before-saved',
  /** The target exited during the snapshot before the page was saved. */
  'target-exited',
  /** The target called exec during the snapshot: its address space at T is gone. */
  'target-exec',
  /** Gone from the target's page tables (no data, no marker) after T before it was saved, with no
   * event that explains it: its content at T is unknown. Never expected; listed rather than taken for zero. */
  'vanished-before-saved',
] as const;
export type LostReason = (typeof LOST_REASONS)[number];

/** A run of pages whose content at T is not in the snapshot, and why. */
export interface LostRange {
  address: bigint;
  pages: number;
  reason: LostReason;
}

export type SnapshotState =
  /** Being written; visible to `ls` as running while its writer lives. */
  | 'running'
  /** Final transaction committed: every page is exact or listed as lost. */
  | 'complete'
  /** Interrupted (writer died or failed) before the final commit. */
  | 'incomplete';

export interface SnapshotStats {
  pauseMicros: number;
  durationMillis: number;
  /** From the end of the pause until the last page was saved and unprotected (absent before this field existed). */
  protectWindowMillis?: number;
  /** Pages whose content was stored (non-zero), including deduplicated ones. */
  pagesSaved: number;
  /** Pages found all-zero (not stored). */
  zeroPages: number;
  /** Pages stored as new content in the store (after dedup). */
  pagesNew: number;
  bytesRaw: number;
  bytesStored: number;
  faults: number;
  faultP50Micros: number;
  faultP99Micros: number;
  /** What the snapshot may hold wrong without knowing where (pinned memory it could not place); absent when none. */
  warnings?: string[];
  /** A generation (taken with a parent): what changed since the parent; absent otherwise. */
  generation?: GenerationStats;
}

/** How a generation differs from its parent. */
export interface GenerationStats {
  parent: number;
  /** compared: every page captured and compared with the parent's; tracked: only pages written since. */
  incremental: 'compared' | 'tracked';
  /** Pages written (or zapped, or mapped anew) since the parent's instant; with 'compared', the changed ones (writes are not known). */
  dirtyPages: number;
  /** Pages whose content differs from the parent's (stored, or turned zero). */
  changedPages: number;
  /** Written since the parent, content unchanged; null when not known ('compared'). */
  writtenUnchangedPages: number | null;
  /** Index entries this generation stores itself (changed pages with data). */
  pagesStored: number;
}

export interface SnapshotSummary {
  id: number;
  name: string | null;
  state: SnapshotState;
  createdAt: string;
  completedAt: string | null;
  pids: number[];
  stats: SnapshotStats | null;
  /** The pause, recorded as soon as it is over (so also for an incomplete
   * snapshot); null if it never ended or the store predates schema 3. */
  pauseMicros: number | null;
  /** Where the pause went, per phase (see the snapshot result's pauseBreakdownMicros). */
  pauseBreakdownMicros: Record<string, number> | null;
  /** The snapshot this one is a generation of (its pages not stored here are the parent's); null for a full one. */
  parentId: number | null;
  incremental: 'compared' | 'tracked' | null;
}

/** Result of re-reading every stored page of a snapshot (Store.verify). */
export interface VerifyReport {
  ok: boolean;
  snapshot: number;
  state: SnapshotState;
  /** Page index entries whose content was decompressed and re-hashed. */
  pagesChecked: number;
  /** One line per problem, naming the process, page and blob; empty when ok. */
  problems: string[];
}

/** A batch of 4 KiB pages handed from the engine to the store. */
export interface PageBatch {
  /** Address at T of each page (4 KiB aligned). */
  addresses: BigUint64Array;
  /** addresses.length × PAGE_SIZE bytes, page i at i × PAGE_SIZE. */
  data: Uint8Array;
}

export function formatAddress(address: bigint): string {
  return `0x${address.toString(16)}`;
}

/** A signal mask as 0x and 16 hex digits (as /proc's SigBlk), or null when not recorded. */
export function formatSigmask(mask: bigint | undefined): string | null {
  return mask === undefined ? null : `0x${mask.toString(16).padStart(16, '0')}`;
}

export function parseAddress(text: string): bigint {
  if (!/^0x[0-9a-f]+$/i.test(text)) throw new Error(`not a hex address: ${JSON.stringify(text)}`);
  return BigInt(text);
}
