// The directory a raw export writes into: private (0700 directories, 0600
// files, whatever the umask), never created under a missing parent, and
// emptied again (or removed, if the export created it) when the export fails.
import { chmodSync, fchmodSync, mkdirSync, openSync, readdirSync, readSync, rmSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { WpsnapError, externalCode } from '../common/errors.js';

const DIR_MODE = 0o700;
const FILE_MODE = 0o600;
const REGION_FILE = /^[0-9a-f]+-[0-9a-f]+\.bin$/;

export class ExportDir {
  /** Entries this export created inside an existing directory (removed by discard()). */
  private readonly written = new Set<string>();

  private constructor(
    readonly path: string,
    /** The export created the directory itself. */
    private readonly created: boolean,
  ) {}

  /**
   * Create `path` (its parent must exist), or empty it if it holds a previous
   * raw export; refuse anything else. One-line errors: EXPORT_PARENT_MISSING,
   * EXPORT_DIR_INVALID, EXPORT_DIR_NOT_EMPTY, or the errno code.
   */
  static prepare(path: string): ExportDir {
    let entries: string[];
    try {
      entries = readdirSync(path);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') {
        createDir(path);
        return new ExportDir(path, true);
      }
      if (code === 'ENOTDIR') throw new WpsnapError('EXPORT_DIR_INVALID', `${path} exists and is not a directory`);
      throw ioError(error, `read ${path}`);
    }
    const foreign = entries.find((name) => !isExportEntry(path, name));
    if (foreign !== undefined) {
      throw new WpsnapError(
        'EXPORT_DIR_NOT_EMPTY',
        `${path} is not empty and is not a previous raw export (it holds ${JSON.stringify(foreign)})`,
      );
    }
    for (const name of entries) rmSync(join(path, name), { recursive: true, force: true });
    return new ExportDir(path, false);
  }

  /** Create the subdirectory `name` (0700). */
  makeDir(name: string): void {
    this.written.add(name);
    try {
      mkdirSync(join(this.path, name), DIR_MODE);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(error, `create ${join(this.path, name)}`);
    }
    chmodSync(join(this.path, name), DIR_MODE);
  }

  /** Open `relative` for writing, truncated and exactly 0600; returns the fd. */
  openFile(relative: string): number {
    this.written.add(relative.split('/')[0]!);
    const file = join(this.path, relative);
    let fd: number;
    try {
      fd = openSync(file, 'w', FILE_MODE);
    } catch (error) {
      throw ioError(error, `create ${file}`);
    }
    fchmodSync(fd, FILE_MODE);
    return fd;
  }

  /**
   * Remove what this export wrote: the directory itself if the export created
   * it, else the entries written into it. Best effort: the export is failing
   * already, and without its manifest.json nothing left is taken for an export.
   */
  discard(): void {
    try {
      if (this.created) {
        rmSync(this.path, { recursive: true, force: true });
        return;
      }
      for (const name of this.written) rmSync(join(this.path, name), { recursive: true, force: true });
    } catch {
      // what remains has no manifest.json
    }
  }
}

/** mkdir of the export directory itself, 0700; its parent must already exist. */
function createDir(path: string): void {
  const parent = dirname(resolve(path));
  let parentIsDir: boolean;
  try {
    parentIsDir = statSync(parent).isDirectory();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new WpsnapError('EXPORT_PARENT_MISSING', `cannot create ${path}: its parent directory ${parent} does not exist`);
    }
    throw ioError(error, `stat ${parent}`);
  }
  if (!parentIsDir) throw new WpsnapError('EXPORT_DIR_INVALID', `cannot create ${path}: ${parent} is not a directory`);
  try {
    // Not recursive: Node's recursive mkdir retries forever where the kernel
    // answers ENOENT under an existing parent (/proc, /sys).
    mkdirSync(path, DIR_MODE);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const hint = code === 'ENOENT' ? ` (the filesystem of ${parent} does not allow new directories)` : '';
    throw ioError(error, `create the export directory ${path}`, hint);
  }
  chmodSync(path, DIR_MODE);
}

function isExportEntry(outDir: string, name: string): boolean {
  if (name === 'manifest.json' || name === 'manifest.json.tmp') return true;
  if (!/^\d+$/.test(name)) return false;
  try {
    if (!statSync(join(outDir, name)).isDirectory()) return false;
    return readdirSync(join(outDir, name)).every((file) => REGION_FILE.test(file));
  } catch {
    return false;
  }
}

/** One line: the step, the syscall and errno code (EROFS spelt out). */
export function ioError(error: unknown, step: string, hint = ''): WpsnapError {
  const e = error as NodeJS.ErrnoException;
  const code = externalCode(e.code, 'EXPORT_IO');
  const reason = e.code !== undefined && e.syscall !== undefined ? `${e.syscall}: ${e.code}` : (e.message ?? String(error));
  const readOnly = e.code === 'EROFS' ? ' (the filesystem is read-only)' : '';
  return new WpsnapError(code, `${step}: ${reason}${readOnly}${hint}`, {
    cause: error,
    ...(e.errno === undefined ? {} : { errno: Math.abs(e.errno) }),
    ...(e.syscall === undefined ? {} : { syscall: e.syscall }),
  });
}

/** pread until `into` is full or the file ends; returns the bytes read. */
export function readAll(fd: number, into: Buffer, position: bigint): number {
  let done = 0;
  while (done < into.length) {
    const got = readSync(fd, into, done, into.length - done, position + BigInt(done));
    if (got === 0) break;
    done += got;
  }
  return done;
}
