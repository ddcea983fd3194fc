// The file a core export writes: private (0600, whatever the umask), made
// under a temporary name in its destination's directory, and given the
// destination's name only once complete (a rename with force; else a link,
// which fails if the name was taken meanwhile); removed on failure. Page data
// is written by libuv's pool while the caller prepares the next (FileWriter).
import { closeSync, fchmodSync, ftruncateSync, linkSync, lstatSync, openSync, renameSync, statSync, unlinkSync, write, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { WpsnapError } from '../common/errors.js';
import { ioError } from './export-dir.js';

const FILE_MODE = 0o600;
/** Bytes of data a file lets wait in libuv's pool for their write. */
const MAX_IN_FLIGHT = 32 * 2 ** 20;

export class CoreFile {
  private closed = false;

  private constructor(
    /** The destination (absolute). */
    readonly path: string,
    private readonly temp: string,
    private readonly force: boolean,
    readonly writer: FileWriter,
  ) {}

  /**
   * Check the destination (its directory exists; an existing file there only
   * with force; never a directory) and create the temporary file.
   */
  static create(path: string, force: boolean, chunkBytes: number): CoreFile {
    checkDestination(path, force);
    const temp = join(dirname(path), `.${basename(path)}.wpsnap-${process.pid}-${Date.now().toString(36)}.tmp`);
    let fd: number;
    try {
      // O_EXCL: never write through something already there; the mode is fixed below whatever the umask.
      fd = openSync(temp, 'wx', FILE_MODE);
    } catch (error) {
      throw ioError(error, `create ${temp}`);
    }
    try {
      fchmodSync(fd, FILE_MODE);
    } catch (error) {
      closeSync(fd);
      unlinkSync(temp);
      throw ioError(error, `chmod ${temp}`);
    }
    return new CoreFile(path, temp, force, new FileWriter(fd, chunkBytes));
  }

  /** Write now, on this thread (headers, once the data is out). */
  writeAt(data: Buffer, position: number): void {
    try {
      let done = 0;
      while (done < data.length) done += writeSync(this.writer.fd, data, done, data.length - done, position + done);
    } catch (error) {
      throw ioError(error, 'write the core file');
    }
  }

  truncate(size: number): void {
    try {
      ftruncateSync(this.writer.fd, size);
    } catch (error) {
      throw ioError(error, 'ftruncate the core file');
    }
  }

  /** Every write done, the file closed and given its name. */
  async commit(): Promise<void> {
    await this.writer.drain();
    this.close();
    publish(this.temp, this.path, this.force);
  }

  /** The temporary file removed, once no write is on its way to it. */
  async discard(): Promise<void> {
    await this.writer.settle();
    this.close();
    try {
      unlinkSync(this.temp);
    } catch {
      // already gone (or already given its name: then the failure came after)
    }
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.writer.fd);
  }
}

/** The destination's directory must exist; an existing file there is replaced only with force; never a directory. */
function checkDestination(path: string, force: boolean): void {
  const parent = dirname(path);
  let parentIsDir: boolean;
  try {
    parentIsDir = statSync(parent).isDirectory();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new WpsnapError('EXPORT_PARENT_MISSING', `cannot create ${path}: its directory ${parent} does not exist`);
    }
    throw ioError(error, `stat ${parent}`);
  }
  if (!parentIsDir) throw new WpsnapError('EXPORT_PARENT_MISSING', `cannot create ${path}: ${parent} is not a directory`);
  let existing;
  try {
    existing = lstatSync(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw ioError(error, `stat ${path}`);
  }
  if (existing.isDirectory()) throw new WpsnapError('EXPORT_NOT_A_FILE', `${path} is a directory: a core export writes a file`);
  if (!force) throw new WpsnapError('EXPORT_EXISTS', `${path} exists: add --force to replace it`);
}

/** The finished temporary file takes its name: a rename with force; else a link, which fails if the name was taken meanwhile. */
function publish(temp: string, path: string, force: boolean): void {
  try {
    if (force) {
      renameSync(temp, path);
      return;
    }
    linkSync(temp, path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw new WpsnapError('EXPORT_EXISTS', `${path} exists: add --force to replace it`);
    throw ioError(error, `rename ${temp} to ${path}`);
  }
  unlinkSync(temp);
}

/**
 * Positioned writes to the core file, done in libuv's thread pool while this
 * thread reads and decompresses the next pages; at most MAX_IN_FLIGHT bytes
 * wait at once (pace()). Its chunk buffers are reused once written. A failed
 * write is thrown by the next pace() or drain().
 */
export class FileWriter {
  private readonly inFlight = new Set<Promise<void>>();
  private readonly free: Buffer[] = [];
  private bytes = 0;
  private failure: unknown = null;

  constructor(
    readonly fd: number,
    /** The size of the buffers take() hands out. */
    private readonly chunkBytes: number,
  ) {}

  get busy(): boolean {
    return this.bytes > MAX_IN_FLIGHT || this.failure !== null;
  }

  /** A chunk buffer (chunkBytes) to fill, then pass to write() or give() back. */
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafe(this.chunkBytes);
  }

  give(buf: Buffer): void {
    this.free.push(buf);
  }

  /** Write buf[from, to) at `position`; buf comes back to take() once written. */
  write(buf: Buffer, from: number, to: number, position: number): void {
    const size = to - from;
    this.bytes += size;
    const tracked: Promise<void> = writeAllAsync(this.fd, buf.subarray(from, to), position)
      .catch((error: unknown) => {
        this.failure ??= error;
      })
      .finally(() => {
        this.bytes -= size;
        this.inFlight.delete(tracked);
        this.free.push(buf);
      });
    this.inFlight.add(tracked);
  }

  /** Wait until no more than MAX_IN_FLIGHT bytes are in flight. */
  async pace(): Promise<void> {
    while (this.bytes > MAX_IN_FLIGHT && this.failure === null) await Promise.race(this.inFlight);
    this.check();
  }

  /** Wait for every write. */
  async drain(): Promise<void> {
    await this.settle();
    this.check();
  }

  /** Wait for every write, whatever became of them. */
  async settle(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all(this.inFlight);
  }

  private check(): void {
    if (this.failure !== null) throw ioError(this.failure, 'write the core file');
  }
}

/** write at `position` until every byte is written (a short write goes on with the rest). */
async function writeAllAsync(fd: number, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    done += await new Promise<number>((resolve, reject) =>
      write(fd, data, done, data.length - done, position + done, (error, written) => (error ? reject(error) : resolve(written))),
    );
  }
}
