// The one error class wpsnap reports, shared by every layer. A leaf module: it
// imports nothing, so the store and the format layer can use it without
// depending on the controller. The CLI maps an error's category to its exit
// code (cli/exit-codes.ts). The native addon throws plain Errors carrying
// `code`, `errno` and `syscall`; fromNative() wraps them.

/** What kind of failure an error is; the CLI's exit code follows from it. */
export type ErrorCategory = 'failure' | 'usage' | 'unsupported' | 'targetGone' | 'interrupted';

/** Every code wpsnap itself names, with its category. */
const CODE_CATEGORY = {
  // The user asked for something that cannot be (exit 2).
  USAGE: 'usage',
  INVALID_ADDRESS: 'usage',
  INVALID_NAME: 'usage',
  SNAPSHOT_INCOMPLETE: 'usage',
  EXPORT_DIR_NOT_EMPTY: 'usage',
  EXPORT_PARENT_MISSING: 'usage',
  // A core export's --out names an existing file (without --force), or a directory.
  EXPORT_EXISTS: 'usage',
  EXPORT_NOT_A_FILE: 'usage',
  // --pid names no process of the snapshot, or the snapshot holds several and none was named.
  PROCESS_NOT_IN_SNAPSHOT: 'usage',
  PROCESS_AMBIGUOUS: 'usage',
  // --staging-dir names no directory, or one wpsnap cannot create its private directory in.
  STAGING_DIR: 'usage',
  // wpsnap itself, its tracer helper or its debugger: freezing it would deadlock.
  TARGET_IS_WPSNAP: 'usage',
  // --parent names an incomplete snapshot, or one of another process.
  PARENT_INVALID: 'usage',
  // rm of a snapshot other generations depend on, without --force.
  HAS_GENERATIONS: 'usage',
  // A rollback that could not be done whole, refused before anything changed.
  ROLLBACK_REFUSED: 'usage',
  RESTORE_REFUSED: 'usage',
  // untrack of a process no keeper tracks.
  NOT_TRACKED: 'usage',
  // The process is tracked by a keeper: track/precopy cannot register it too.
  TRACKED_BY_KEEPER: 'usage',
  // The keepers' directory is not private to this user.
  KEEPER_DIR: 'usage',
  // This machine, kernel or build cannot do it (exit 3).
  UNSUPPORTED_ENVIRONMENT: 'unsupported',
  UNSUPPORTED_PLATFORM: 'unsupported',
  NATIVE_MISSING: 'unsupported',
  NO_VDSO: 'unsupported',
  NO_SYSCALL_INSN: 'unsupported',
  NO_DEV_USERFAULTFD: 'unsupported',
  NO_USERFAULTFD: 'unsupported',
  USERFAULTFD_NOT_PERMITTED: 'unsupported',
  KERNEL_FEATURE_MISSING: 'unsupported',
  // --tracker soft-dirty on a kernel where one round trip shows the bit is never set.
  SOFT_DIRTY_UNAVAILABLE: 'unsupported',
  // The target is gone (exit 4).
  TARGET_NOT_FOUND: 'targetGone',
  // SIGINT/SIGTERM (exit 130).
  INTERRUPTED: 'interrupted',
  // Everything else that failed (exit 1).
  INTERNAL: 'failure',
  // A rollback failed after it began changing the target (it is partly rolled back).
  ROLLBACK_FAILED: 'failure',
  RESTORE_FAILED: 'failure',
  // A keeper did not start or answer as it must.
  KEEPER_FAILED: 'failure',
  DEMO_FAILED: 'failure',
  VERIFY_FAILED: 'failure',
  DUPLICATE_PROCESS: 'failure',
  EXPORT_DIR_INVALID: 'failure',
  EXPORT_IO: 'failure',
  INVALID_BATCH: 'failure',
  INVALID_COUNT: 'failure',
  INVALID_LOST: 'failure',
  INVALID_PAUSE: 'failure',
  INVALID_PROCESS: 'failure',
  INVALID_REGION: 'failure',
  NAME_TAKEN: 'failure',
  NOT_A_RAW_EXPORT: 'failure',
  NOT_A_STORE: 'failure',
  SNAPSHOT_NOT_FOUND: 'failure',
  SNAPSHOT_NOT_RUNNING: 'failure',
  SNAPSHOT_RUNNING: 'failure',
  SNAPSHOT_WRITE_FAILED: 'failure',
  STORE_CLOSED: 'failure',
  STORE_CORRUPT: 'failure',
  STORE_IO: 'failure',
  STORE_IS_DIRECTORY: 'failure',
  STORE_NEEDS_UPGRADE: 'failure',
  STORE_NOT_FOUND: 'failure',
  STORE_READ: 'failure',
  STORE_READONLY: 'failure',
  STORE_READ_ONLY_FS: 'failure',
  STORE_TOO_NEW: 'failure',
  STORE_WORKER: 'failure',
  STORE_WRITE: 'failure',
  UNKNOWN_PROCESS: 'failure',
  WRITER_CLOSED: 'failure',
} as const satisfies Record<string, ErrorCategory>;

export type NamedCode = keyof typeof CODE_CATEGORY;
/** An errno name from the kernel ("EPERM"; ESRCH means the target is gone), one without a name, or SQLite's. */
export type SystemCode = `E${string}` | `UNKNOWN_ERRNO_${number}` | `SQLITE_${string}`;
export type ErrorCode = NamedCode | SystemCode;

export function categoryOf(code: ErrorCode): ErrorCategory {
  if (Object.hasOwn(CODE_CATEGORY, code)) return CODE_CATEGORY[code as NamedCode];
  return code === 'ESRCH' ? 'targetGone' : 'failure';
}

/** A code from outside (an errno name, SQLite's) when it is one, else the fallback. */
export function externalCode(code: string | undefined, fallback: ErrorCode): ErrorCode {
  return code !== undefined && /^(E[A-Z0-9_]+|SQLITE_[A-Z0-9_]+|UNKNOWN_ERRNO_\d+)$/.test(code) ? (code as SystemCode) : fallback;
}

/** Every named code and its category (for docs/cli.md and tests). */
export function namedCodes(): ReadonlyArray<[NamedCode, ErrorCategory]> {
  return Object.entries(CODE_CATEGORY) as Array<[NamedCode, ErrorCategory]>;
}

export interface WpsnapErrorOptions {
  errno?: number;
  syscall?: string;
  cause?: unknown;
}

export class WpsnapError extends Error {
  /** A stable string such as "EPERM", "TARGET_NOT_FOUND", "NOT_A_STORE". */
  readonly code: ErrorCode;
  /** Follows from the code (categoryOf). */
  readonly kind: ErrorCategory;
  readonly errno: number | undefined;
  readonly syscall: string | undefined;

  constructor(code: ErrorCode, message: string, options: WpsnapErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'WpsnapError';
    this.code = code;
    this.kind = categoryOf(code);
    this.errno = options.errno;
    this.syscall = options.syscall;
  }
}

interface NativeErrorShape {
  message: string;
  code?: string;
  errno?: number;
  syscall?: string;
}

function isNativeError(error: unknown): error is Error & NativeErrorShape {
  return error instanceof Error && typeof (error as NativeErrorShape).errno === 'number';
}

/**
 * Wrap an error thrown by the native addon, prefixing the step that failed:
 * "attach to 1234: ptrace(PTRACE_SEIZE) on tid 1234: EPERM (Operation not permitted)".
 * ESRCH means the target is gone; EPERM/EACCES mean we may not touch it.
 */
export function fromNative(error: unknown, step: string): WpsnapError {
  if (error instanceof WpsnapError) return error;
  if (!isNativeError(error)) {
    const message = error instanceof Error ? error.message : String(error);
    return new WpsnapError('INTERNAL', `${step}: ${message}`, { cause: error });
  }
  const code = (error.code ?? `UNKNOWN_ERRNO_${error.errno ?? 0}`) as SystemCode;
  return new WpsnapError(code, `${step}: ${error.message}`, {
    ...(error.errno === undefined ? {} : { errno: error.errno }),
    ...(error.syscall === undefined ? {} : { syscall: error.syscall }),
    cause: error,
  });
}

export function usageError(message: string): WpsnapError {
  return new WpsnapError('USAGE', message);
}

export function unsupported(code: NamedCode, message: string): WpsnapError {
  return new WpsnapError(code, message);
}
