// What a command handler gets: output streams, the environment, and factories
// for the binding and the store, so that tests can run main() in-process.
import type { Writable } from 'node:stream';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import { Store } from '../store/store.js';
import { resolveStorePath } from '../store/location.js';

export interface CommandContext {
  stdout: Writable & { isTTY?: boolean };
  stderr: Writable & { isTTY?: boolean };
  env: NodeJS.ProcessEnv;
  binding: () => NativeBinding;
  openStore: (option: string | undefined, options?: { readonly?: boolean }) => Store;
  /** Aborted on SIGINT/SIGTERM while a long command runs. */
  signal: AbortSignal;
}

export function defaultContext(signal: AbortSignal): CommandContext {
  return {
    stdout: process.stdout,
    stderr: process.stderr,
    env: process.env,
    binding: loadBinding,
    openStore: (option, options = {}) => Store.open(resolveStorePath(option, process.env), options),
    signal,
  };
}

/** Writes one line; `--json` commands print exactly one document through printJson. */
export function println(stream: Writable, line = ''): void {
  stream.write(line + '\n');
}

/** JSON with bigints (addresses) as "0x…" strings. */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v), 2);
}

export function printJson(ctx: CommandContext, value: unknown): void {
  ctx.stdout.write(toJson(value) + '\n');
}
