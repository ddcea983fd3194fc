// Hashing, zero-page detection and zstd run in worker threads (store/page-worker.ts),
// never on the thread that calls the store. The hashing is the store addon's
// scanPages (SHA-256 from the OpenSSL inside node, one call per batch).
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { WpsnapError } from '../common/errors.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';
import {
  BLOB_PAGES,
  CODEC_RAW,
  CODEC_ZSTD,
  HASH_BYTES,
  ZSTD_LEVEL,
  pageWorkerSource,
  type BlobToCheck,
  type CheckResult,
  type PageWorkerData,
  type PageWorkerReply,
  type PageWorkerRequest,
} from './page-worker.js';
import { pagehashAddonPath } from './pagehash.js';
import { storePriority } from './priority.js';

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

export { BLOB_PAGES, CODEC_RAW, CODEC_ZSTD, HASH_BYTES, ZSTD_LEVEL, type BlobToCheck, type CheckResult };
/** Recycled batch buffers kept at most. */
const MAX_SPARE = 16;

export interface ScanResult {
  /** Worker that holds the batch until pack() or release(). */
  worker: number;
  job: number;
  /** zero[i] = 1 if page i is all zero bytes. */
  zero: Uint8Array;
  /** HASH_BYTES per page (unset for zero pages). */
  hashes: Uint8Array;
}

export interface PackedBlob {
  codec: number;
  data: Uint8Array;
}

export interface Packed {
  /** In order; each a view into `output`. */
  blobs: PackedBlob[];
  /** Hand back with recycleOutput() once the blobs are written. */
  output: ArrayBuffer;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

interface Slot {
  worker: Worker;
  pending: Map<number, Pending>;
}

let zstdBindingPath: string | undefined;
function resolveZstdBinding(): string {
  zstdBindingPath ??= createRequire(import.meta.url).resolve('zstd-napi/binding.js');
  return zstdBindingPath;
}

/** A fixed pool of worker threads; a batch stays on the worker that scanned it. */
export class WorkerPool {
  private readonly slots: Array<Slot | undefined>;
  private nextJob = 1;
  /** Batch buffers handed back by the workers, for reuse. */
  private readonly spare: ArrayBuffer[] = [];
  /** Output buffers of pack(), handed back by the caller, for reuse. */
  private readonly spareOutput: ArrayBuffer[] = [];
  private closed = false;

  constructor(readonly size = 2) {
    this.slots = new Array<Slot | undefined>(size).fill(undefined);
  }

  /** The worker with the fewest jobs in flight. */
  pick(): number {
    let best = 0;
    let bestLoad = Infinity;
    for (let i = 0; i < this.size; i++) {
      const load = this.slots[i]?.pending.size ?? 0;
      if (load < bestLoad) {
        best = i;
        bestLoad = load;
      }
    }
    return best;
  }

  /** A buffer of `size` bytes for scan(): a recycled one if available (contents undefined). */
  buffer(size: number): ArrayBuffer {
    const i = this.spare.findIndex((buffer) => buffer.byteLength === size);
    if (i >= 0) return this.spare.splice(i, 1)[0] as ArrayBuffer;
    return Buffer.allocUnsafeSlow(size).buffer as ArrayBuffer;
  }

  /** Find zero pages and hash the others; the worker keeps `buffer` (transferred) for pack(). */
  async scan(worker: number, buffer: ArrayBuffer): Promise<ScanResult> {
    const job = this.nextJob++;
    const reply = (await this.request(worker, job, { op: 'scan', job, buffer }, [buffer])) as {
      zero: Uint8Array;
      hashes: Uint8Array;
    };
    return { worker, job, zero: reply.zero, hashes: reply.hashes };
  }

  /** Compress the listed pages of a scanned batch into blobs of up to BLOB_PAGES pages, in order. */
  async pack(scan: ScanResult, pages: Uint32Array, level = ZSTD_LEVEL): Promise<Packed> {
    const need = pages.length * PAGE_SIZE;
    const i = this.spareOutput.findIndex((buffer) => buffer.byteLength >= need);
    const out = i >= 0 ? (this.spareOutput.splice(i, 1)[0] as ArrayBuffer) : undefined;
    const transfer = [pages.buffer as ArrayBuffer];
    if (out !== undefined) transfer.push(out);
    const reply = (await this.request(scan.worker, scan.job, { op: 'pack', job: scan.job, pages, level, out }, transfer)) as {
      blobs: Array<{ codec: number; offset: number; length: number }>;
      out: ArrayBuffer;
    };
    return {
      blobs: reply.blobs.map((b) => ({ codec: b.codec, data: new Uint8Array(reply.out, b.offset, b.length) })),
      output: reply.out,
    };
  }

  /** Take back a pack() output buffer whose blobs are no longer needed. */
  recycleOutput(buffer: ArrayBuffer): void {
    if (this.spareOutput.length < MAX_SPARE) this.spareOutput.push(buffer);
  }

  /** Drop a scanned batch that needs no pack(). */
  release(scan: ScanResult): void {
    this.slots[scan.worker]?.worker.postMessage({ op: 'release', job: scan.job, priority: storePriority() } satisfies PageWorkerRequest);
  }

  /** Decompress and re-hash blobs, spread over the pool. */
  async check(blobs: BlobToCheck[]): Promise<CheckResult[]> {
    if (blobs.length === 0) return [];
    const share = Math.ceil(blobs.length / this.size);
    const parts: Array<Promise<CheckResult[]>> = [];
    for (let i = 0; i < this.size && i * share < blobs.length; i++) {
      const part = blobs.slice(i * share, (i + 1) * share);
      const job = this.nextJob++;
      parts.push(
        this.request(i, job, { op: 'check', job, blobs: part }, []).then(
          (reply) => (reply as { results: CheckResult[] }).results,
        ),
      );
    }
    return (await Promise.all(parts)).flat();
  }

  async close(): Promise<void> {
    this.closed = true;
    const running = this.slots.filter((slot): slot is Slot => slot !== undefined);
    this.slots.fill(undefined);
    await Promise.all(running.map((slot) => slot.worker.terminate()));
  }

  private request(index: number, job: number, message: DistributiveOmit<PageWorkerRequest, 'priority'>, transfer: ArrayBuffer[]): Promise<unknown> {
    const slot = this.slot(index);
    return new Promise((resolve, reject) => {
      slot.pending.set(job, { resolve, reject });
      if (slot.pending.size === 1) slot.worker.ref();
      slot.worker.postMessage({ ...message, priority: storePriority() }, transfer);
    });
  }

  private slot(index: number): Slot {
    if (this.closed) throw new WpsnapError('STORE_CLOSED', 'the store is closed');
    const existing = this.slots[index];
    if (existing !== undefined) return existing;
    const workerData: PageWorkerData = {
      zstdPath: resolveZstdBinding(),
      pagehashPath: pagehashAddonPath(),
      hashBytes: HASH_BYTES,
      blobPages: BLOB_PAGES,
      codecRaw: CODEC_RAW,
      codecZstd: CODEC_ZSTD,
    };
    const worker = new Worker(pageWorkerSource(), { eval: true, workerData });
    const slot: Slot = { worker, pending: new Map() };
    worker.unref();
    const fail = (error: Error): void => {
      if (this.slots[index] === slot) this.slots[index] = undefined;
      for (const pending of slot.pending.values()) pending.reject(error);
      slot.pending.clear();
    };
    worker.on('message', (reply: PageWorkerReply) => {
      if (reply.spare !== undefined && this.spare.length < MAX_SPARE) this.spare.push(reply.spare);
      const pending = slot.pending.get(reply.job);
      if (pending === undefined) return;
      slot.pending.delete(reply.job);
      if (slot.pending.size === 0) worker.unref();
      if (reply.error !== undefined) pending.reject(new WpsnapError('STORE_WORKER', `store worker: ${reply.error}`));
      else pending.resolve(reply);
    });
    worker.on('error', (error) => fail(new WpsnapError('STORE_WORKER', `store worker failed: ${error.message}`)));
    worker.on('exit', (code) => fail(new WpsnapError('STORE_WORKER', `store worker exited with code ${code}`)));
    this.slots[index] = slot;
    return slot;
  }
}
