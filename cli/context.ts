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
  openStore: (option: string | undefined, options?: { readonly?: boolean }) => Promise<Store>;
  /** Aborted on SIGINT/SIGTERM while a long command runs. */
  signal: AbortSignal;
}

export function defaultContext(signal: AbortSignal): CommandContext {
  return {
    stdout: process.stdout,
    stderr: process.stderr,
    env: process.env,
    binding: loadBinding,
    openStore: (option, options = {}) => openStore(resolveStorePath(option, process.env), options, process.stderr),
    signal,
  };
}

/**
 * Open the store. A read-only open of a store from an older wpsnap upgrades it
 * first (a read-write open runs the migrations), saying so on stderr, so that
 * `ls`/`show`/`verify`/`export` work on it; if it cannot be opened for writing,
 * the read-only error (STORE_NEEDS_UPGRADE) stands.
 */
export async function openStore(path: string, readOptions: { readonly?: boolean }, stderr: Writable): Promise<Store> {
  // A warning about the store (other users can read it) goes where the command's messages go.
  const options = { ...readOptions, onWarning: (line: string) => stderr.write(`wpsnap: warning: ${line}\n`) };
  try {
    return Store.open(path, options);
  } catch (error) {
    if (!options.readonly || (error as { code?: string }).code !== 'STORE_NEEDS_UPGRADE') throw error;
    let upgraded: Store;
    try {
      upgraded = Store.open(path, { onWarning: options.onWarning });
    } catch {
      throw error;
    }
    await upgraded.close();
    stderr.write(`wpsnap: upgraded ${path} to the current store schema\n`);
    return Store.open(path, options);
  }
}

/** Writes one line; `--json` commands print exactly one document through printJson. */
export function println(stream: Writable, line = ''): void {
  stream.write(line + '\n');
}

/** JSON with bigints (addresses) as "0x…" strings; indented unless compact (one line, for errors). */
export function toJson(value: unknown, { compact = false } = {}): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v), compact ? undefined : 2);
}

export function printJson(ctx: CommandContext, value: unknown): void {
  ctx.stdout.write(toJson(value) + '\n');
}
