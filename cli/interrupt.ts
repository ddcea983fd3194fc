// SIGINT/SIGTERM abort ctx.signal; a long command stops at its next await
// with INTERRUPTED (exit 130).
import { WpsnapError } from '../common/errors.js';

export function interruptedError(what: string): WpsnapError {
  return new WpsnapError('INTERRUPTED', `${what} interrupted`);
}

export function throwIfAborted(signal: AbortSignal, what: string): void {
  if (signal.aborted) throw interruptedError(what);
}

/** start()'s result, or INTERRUPTED as soon as `signal` aborts (for read-only work that needs no undoing); not started if already aborted. */
export async function unlessAborted<T>(signal: AbortSignal, what: string, start: () => Promise<T>): Promise<T> {
  throwIfAborted(signal, what);
  const work = start();
  let onAbort: (() => void) | undefined;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(interruptedError(what));
    signal.addEventListener('abort', onAbort, { once: true });
  });
  try {
    return await Promise.race([work, aborted]);
  } finally {
    signal.removeEventListener('abort', onAbort!);
    work.catch(() => undefined); // an abandoned verification's later failure is not unhandled
  }
}
