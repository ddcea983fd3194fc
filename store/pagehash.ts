// The store's own small addon (store/native/pagehash.c, built by npm install as
// build/Release/wpsnap_pagehash.node): the per-batch zero test and SHA-256/128
// its workers run. The store loads nothing of the controller's addon.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { packageRoot } from '../common/package-root.js';

export interface PagehashAddon {
  /**
   * For each 4 KiB page of data: zero[i] = 1 if it is all zero bytes, else
   * hashes[HASH_BYTES i ..] = the first HASH_BYTES bytes of its SHA-256. With
   * zero = null every page is hashed.
   */
  scanPages(data: Uint8Array, zero: Uint8Array | null, hashes: Uint8Array): void;
  /** Bytes of the digest kept per page (16). */
  readonly HASH_BYTES: number;
  /** The calling thread's scheduling (store/priority.ts); 0 or the errno. */
  setThreadPriority(mode: 'idle' | 'nice' | 'normal'): number;
}

/** Where npm install builds the store's addon: build/Release under the package root. */
export function pagehashAddonPath(): string {
  const path = join(packageRoot(), 'build', 'Release', 'wpsnap_pagehash.node');
  if (!existsSync(path)) {
    throw new WpsnapError('NATIVE_MISSING', `store addon not built: ${path} is missing (run npm install)`);
  }
  return path;
}
