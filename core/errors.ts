// One error class for everything wpsnap reports. The native addon throws plain
// Errors carrying `code`, `errno` and `syscall`; fromNative() wraps them.

/** Exit codes of the CLI, decided by the error kind (docs/cli.md documents them). */
export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  unsupported: 3,
  targetGone: 4,
  interrupted: 130,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

export type ErrorKind = keyof typeof ExitCode;

export interface WpsnapErrorOptions {
  kind?: ErrorKind;
  errno?: number;
  syscall?: string;
  cause?: unknown;
}

export class WpsnapError extends Error {
  /** A stable string such as "EPERM", "TARGET_NOT_FOUND", "NOT_A_STORE". */
  readonly code: string;
  readonly kind: ErrorKind;
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

  get exitCode(): ExitCode {
    return ExitCode[this.kind];
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
  const kind: ErrorKind = code === 'ESRCH' ? 'targetGone' : 'failure';
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
