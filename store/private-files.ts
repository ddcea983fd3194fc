// The store holds memory images, which hold secrets: its directories are
// created 0700 and its files 0600 whatever the umask, and a store that other
// users can open is pointed out. Also: is a path on a read-only filesystem?
import { accessSync, chmodSync, closeSync, constants, existsSync, fchmodSync, mkdirSync, openSync, statSync } from 'node:fs';
import { dirname } from 'node:path';

export const PRIVATE_DIR_MODE = 0o700;
export const PRIVATE_FILE_MODE = 0o600;
/** Permission bits that let anyone but the owner in. */
const OTHERS_BITS = 0o077;

/**
 * Create `dir` and its missing parents, each exactly 0700 (mkdir's mode is
 * masked by the umask, so each is chmod'ed after). Directories that already
 * exist, or that another process creates meanwhile, are left as they are.
 */
export function makePrivateDirs(dir: string): void {
  const missing: string[] = [];
  for (let d = dir; !existsSync(d) && dirname(d) !== d; d = dirname(d)) missing.push(d);
  for (const d of missing.reverse()) {
    try {
      mkdirSync(d, PRIVATE_DIR_MODE);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') continue;
      throw error;
    }
    chmodSync(d, PRIVATE_DIR_MODE);
  }
}

/** Create `file` empty and exactly 0600; fails if it exists. */
export function createPrivateFile(file: string): void {
  const fd = openSync(file, 'wx', PRIVATE_FILE_MODE);
  try {
    fchmodSync(fd, PRIVATE_FILE_MODE);
  } finally {
    closeSync(fd);
  }
}

/**
 * One line naming those of `files` (that exist) which users other than the
 * owner may access, with their modes; undefined if there is none.
 */
export function openToOthers(files: readonly string[]): string | undefined {
  const open: string[] = [];
  for (const file of files) {
    let mode: number;
    try {
      mode = statSync(file).mode & 0o777;
    } catch {
      continue;
    }
    if ((mode & OTHERS_BITS) !== 0) open.push(`${file} (mode ${mode.toString(8).padStart(4, '0')})`);
  }
  return open.length === 0 ? undefined : open.join(', ');
}

/** True when `path` (an existing file or directory) lies on a filesystem mounted read-only. */
export function onReadOnlyFilesystem(path: string): boolean {
  try {
    accessSync(path, constants.W_OK);
    return false;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EROFS';
  }
}
