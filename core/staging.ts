// Staging: where copied pages wait for the store, so that the target is
// protected only while its memory is copied, not while it is compressed
// (the engine's side is core/native/engine_stage.c). A pool of memory first,
// then a spill file on disk: next to the store unless --staging-dir says
// elsewhere, at most --staging-max bytes of it in use.
//
// The spill file holds a memory image: it is created 0600 inside a directory
// of its own created 0700, whatever the umask, and unlinked from the start
// (O_TMPFILE, else unlinked right after it is created), so nothing of it
// outlives wpsnap, whatever happens to wpsnap. What a crash can leave is the
// empty directory; the next snapshot into the same place removes those of
// processes no longer running.
import { closeSync, constants as fsConstants, fchmodSync, mkdirSync, chmodSync, openSync, readdirSync, readFileSync, rmSync, statSync, statfsSync, unlinkSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../store/private-files.js';

/** Bytes per engine batch: 512 pages, one 2 MiB huge page of the pool. */
export const BATCH_BYTES = 512 * 4096;
/** The pool by default is never smaller than this many batches (what the engine always had). */
const MIN_POOL_BATCHES = 16;
/** Nor, when --staging-memory says, than this: half for the store, half staged. */
const MIN_POOL_BATCHES_GIVEN = 8;
/** Share of MemAvailable the pool may take by default. */
const DEFAULT_POOL_SHARE = 0.25;
/** And at most this much: the pool is touched before the attach, up to ~1.6 s per GiB on a VM. */
const DEFAULT_POOL_MAX = 4 * 1024 ** 3;
/** Share of the staging filesystem's free space the spill file may take by default. */
const DEFAULT_SPILL_SHARE = 0.5;
/** Linux x86_64: __O_TMPFILE | O_DIRECTORY (node has no constant for it). */
const O_TMPFILE = 0o20200000;
const DIR_PREFIX = 'wpsnap-staging-';

export interface StagingOptions {
  /** Directory for the spill file (default: the store's). */
  dir?: string | undefined;
  /** Bytes of spill file in use at most; 0: no spill file (the pool only). */
  maxBytes?: number | undefined;
  /** Bytes of memory for the pool (default: what the target holds, at most a quarter of MemAvailable and 4 GiB). */
  memoryBytes?: number | undefined;
}

export interface Staging {
  poolBatches: number;
  /** -1: no spill file. */
  spillFd: number;
  spillMaxBytes: number;
  /** The directory holding the spill file (removed by close), or undefined. */
  dir: string | undefined;
  close(): void;
}

/** What the target holds in memory or swap now (VmRSS + VmSwap): the most the engine may copy, nearly. */
export function residentBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? 0);
  return (kib('VmRSS') + kib('VmSwap')) * 1024;
}

/** MemAvailable from /proc/meminfo, in bytes. */
export function memAvailable(): number {
  const m = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Remove the staging directories that processes no longer running left in `dir` (a crash). */
export function removeStaleStaging(dir: string): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    const m = new RegExp(`^${DIR_PREFIX}(\\d+)-[0-9a-f]+$`).exec(name);
    if (!m || alive(Number(m[1]))) continue;
    rmSync(join(dir, name), { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/** Open an unnamed private file in `dir`: O_TMPFILE where the filesystem has it, else created and unlinked at once. */
function openUnlinked(dir: string): number {
  let fd: number;
  try {
    fd = openSync(dir, O_TMPFILE | fsConstants.O_RDWR, PRIVATE_FILE_MODE);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'EOPNOTSUPP' && code !== 'EISDIR' && code !== 'EINVAL') throw error;
    const file = join(dir, 'spill');
    fd = openSync(file, 'wx+', PRIVATE_FILE_MODE);
    unlinkSync(file);
  }
  fchmodSync(fd, PRIVATE_FILE_MODE); // the umask may have taken bits away; never more than 0600
  return fd;
}

/**
 * Set staging up for one snapshot of `copyBytes` bytes (what the engine may
 * copy). `defaultDir` is the store's directory.
 */
export function openStaging(defaultDir: string | undefined, options: StagingOptions, copyBytes: number): Staging {
  // Room for what the target holds, and a little: what it populates after the
  // pause is zero at T and never copied.
  const memoryBytes = options.memoryBytes ?? Math.min(memAvailable() * DEFAULT_POOL_SHARE, DEFAULT_POOL_MAX, copyBytes + MIN_POOL_BATCHES * BATCH_BYTES);
  const poolBatches = Math.max(options.memoryBytes === undefined ? MIN_POOL_BATCHES : MIN_POOL_BATCHES_GIVEN, Math.floor(memoryBytes / BATCH_BYTES));
  const none: Staging = { poolBatches, spillFd: -1, spillMaxBytes: 0, dir: undefined, close: () => undefined };
  const parent = options.dir ?? defaultDir;
  if (parent === undefined || options.maxBytes === 0) return none;
  let isDir = false;
  try {
    isDir = statSync(parent).isDirectory();
  } catch {
    // reported below
  }
  if (!isDir) throw new WpsnapError('STAGING_DIR', `staging directory ${parent} does not exist or is not a directory`);
  removeStaleStaging(parent);
  const fs = statfsSync(parent);
  const free = Number(fs.bavail) * Number(fs.bsize);
  const spillMaxBytes = Math.floor(options.maxBytes ?? free * DEFAULT_SPILL_SHARE);
  if (spillMaxBytes < BATCH_BYTES) return none;
  const dir = join(parent, `${DIR_PREFIX}${process.pid}-${randomBytes(4).toString('hex')}`);
  try {
    mkdirSync(dir, PRIVATE_DIR_MODE);
    chmodSync(dir, PRIVATE_DIR_MODE); // mkdir's mode is masked by the umask
  } catch (error) {
    throw new WpsnapError('STAGING_DIR', `cannot create a staging directory in ${parent}: ${(error as Error).message}`);
  }
  let spillFd: number;
  try {
    spillFd = openUnlinked(dir);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw new WpsnapError('STAGING_DIR', `cannot create the spill file in ${parent}: ${(error as Error).message}`);
  }
  let closed = false;
  return {
    poolBatches,
    spillFd,
    spillMaxBytes,
    dir,
    close(): void {
      if (closed) return;
      closed = true;
      closeSync(spillFd);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
