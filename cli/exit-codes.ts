// Exit codes of the CLI, decided by the category of the error (docs/cli.md
// documents them). Only cli/main.ts's entry point calls process.exit.
import type { ErrorCategory, WpsnapError } from '../common/errors.js';

export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  unsupported: 3,
  targetGone: 4,
  interrupted: 130,
} as const satisfies Record<ErrorCategory | 'ok', number>;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

export function exitCodeFor(error: WpsnapError): ExitCode {
  return ExitCode[error.kind];
}
