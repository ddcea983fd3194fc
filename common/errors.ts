// The one error class wpsnap reports, shared by every layer. A leaf module: it
// imports nothing, so the store and the format layer can use it without
// depending on the controller. The CLI maps an error's category to its exit
// code (cli/exit-codes.ts). The native addon throws plain Errors carrying
// `code`, `errno` and `syscall`; fromNative() wraps them.

/** What kind of failure an error is; the CLI's exit code follows from it. */
export type ErrorCategory = 'failure' | 'usage' | 'unsupported' | 'targetGone' | 'interrupted';

export interface WpsnapErrorOptions {
  kind?: ErrorCategory;
  errno?: number;
  syscall?: string;
  cause?: unknown;
}

export class WpsnapError extends Error {
  /** A stable string such as "EPERM", "TARGET_NOT_FOUND", "NOT_A_STORE". */
  readonly code: string;
  readonly kind: ErrorCategory;
  readonly errno: number | undefined;
  readonly syscall: string | undefined;

  constructor(code: string, message: string, options: WpsnapErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'WpsnapError';
    this.code = code;
    this.kind = options.kind ?? 'failure';
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
  const code = error.code ?? `UNKNOWN_ERRNO_${error.errno ?? 0}`;
  const kind: ErrorCategory = code === 'ESRCH' ? 'targetGone' : 'failure';
  return new WpsnapError(code, `${step}: ${error.message}`, {
    kind,
    ...(error.errno === undefined ? {} : { errno: error.errno }),
    ...(error.syscall === undefined ? {} : { syscall: error.syscall }),
    cause: error,
  });
}

export function usageError(message: string): WpsnapError {
  return new WpsnapError('USAGE', message, { kind: 'usage' });
}

export function unsupported(code: string, message: string): WpsnapError {
  return new WpsnapError(code, message, { kind: 'unsupported' });
}
