// Hashing, zero-page detection and zstd run here, in worker threads, never on
// the thread that calls the store. The hashing is the addon's scanPages (SHA-256
// from the OpenSSL inside node, one call per batch). The worker is plain JavaScript evaluated from
// a string so that it runs the same under tsc output (dist/) and under vitest.
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { nativeAddonPath } from '../core/binding.js';
import { WpsnapError } from '../core/errors.js';
import { PAGE_SIZE } from '../snapshot-format/model.js';

/** Bytes of the SHA-256 digest kept as the content hash. */
export const HASH_BYTES = 16;
/** Pages per compressed blob, at most. */
export const BLOB_PAGES = 64;
/** zstd level for new blobs. */
export const ZSTD_LEVEL = 1;
export const CODEC_RAW = 0;
export const CODEC_ZSTD = 1;
/** Recycled batch buffers kept at most. */
const MAX_SPARE = 16;

const WORKER_SOURCE = String.raw`
'use strict';
const { parentPort, workerData } = require('node:worker_threads');
const zstd = require(workerData.zstdPath);
const { scanPages } = require(workerData.addonPath);
const PAGE = 4096, HASH_BYTES = ${HASH_BYTES}, BLOB_PAGES = ${BLOB_PAGES};
const cctx = new zstd.CCtx();
const dctx = new zstd.DCtx();
const bound = zstd.compressBound(BLOB_PAGES * PAGE);
const scratch = Buffer.allocUnsafeSlow(bound);
const held = new Map();

function scan(m) {
  const data = Buffer.from(m.buffer);
  const n = data.length / PAGE;
  const zero = new Uint8Array(n);
  const hashes = new Uint8Array(n * HASH_BYTES);
  scanPages(data, zero, hashes);
  held.set(m.job, data);
  parentPort.postMessage({ job: m.job, zero, hashes }, [zero.buffer, hashes.buffer]);
}

const gather = Buffer.allocUnsafeSlow(BLOB_PAGES * PAGE);

function pack(m) {
  const data = held.get(m.job);
  held.delete(m.job);
  if (data === undefined) throw new Error('pack: batch ' + m.job + ' is not held by this worker');
  const pages = m.pages;
  // Every blob goes into one output buffer (recycled by the caller), at most the raw size.
  const need = pages.length * PAGE;
  const out = m.out !== undefined && m.out.byteLength >= need ? new Uint8Array(m.out) : new Uint8Array(need);
  const blobs = [];
  let at = 0;
  for (let first = 0; first < pages.length; first += BLOB_PAGES) {
    const count = Math.min(BLOB_PAGES, pages.length - first);
    let raw;
    if (pages[first + count - 1] - pages[first] === count - 1) {
      raw = data.subarray(pages[first] * PAGE, (pages[first] + count) * PAGE); // a run: no gathering
    } else {
      raw = gather.subarray(0, count * PAGE);
      for (let k = 0; k < count; k++) {
        const i = pages[first + k];
        data.copy(raw, k * PAGE, i * PAGE, (i + 1) * PAGE);
      }
    }
    const size = cctx.compress(scratch, raw, m.level);
    if (size < raw.length) {
      out.set(scratch.subarray(0, size), at);
      blobs.push({ codec: ${CODEC_ZSTD}, offset: at, length: size });
      at += size;
    } else {
      out.set(raw, at);
      blobs.push({ codec: ${CODEC_RAW}, offset: at, length: raw.length });
      at += raw.length;
    }
  }
  // The batch's buffer goes back to the pool for the next batch (fresh memory is slow to touch here).
  parentPort.postMessage({ job: m.job, blobs, out: out.buffer, spare: data.buffer }, [out.buffer, data.buffer]);
}

function release(m) {
  const data = held.get(m.job);
  held.delete(m.job);
  if (data !== undefined) parentPort.postMessage({ job: m.job, spare: data.buffer }, [data.buffer]);
}

function check(m) {
  const results = [];
  for (const blob of m.blobs) {
    try {
      const size = blob.pages * PAGE;
      let raw;
      if (blob.codec === ${CODEC_RAW}) {
        if (blob.data.length !== size) throw new Error('raw blob holds ' + blob.data.length + ' bytes, expected ' + size);
        raw = Buffer.from(blob.data.buffer, blob.data.byteOffset, blob.data.length);
      } else if (blob.codec === ${CODEC_ZSTD}) {
        const declared = zstd.getFrameContentSize(blob.data);
        if (declared !== size) throw new Error('zstd frame declares ' + declared + ' bytes, expected ' + size);
        raw = Buffer.allocUnsafe(size);
        const got = dctx.decompress(raw, blob.data);
        if (got !== size) throw new Error('zstd frame decompressed to ' + got + ' bytes, expected ' + size);
      } else {
        throw new Error('unknown codec ' + blob.codec);
      }
      const hashes = new Uint8Array(blob.pages * HASH_BYTES);
      scanPages(raw, null, hashes);
      results.push({ hashes });
    } catch (error) {
      results.push({ error: error instanceof Error ? error.message : String(error) });
    }
  }
  parentPort.postMessage({ job: m.job, results });
}

parentPort.on('message', (m) => {
  try {
    if (m.op === 'scan') scan(m);
    else if (m.op === 'pack') pack(m);
    else if (m.op === 'release') release(m);
    else if (m.op === 'check') check(m);
    else throw new Error('unknown op ' + m.op);
  } catch (error) {
    held.delete(m.job);
    if (m.op !== 'release') {
      parentPort.postMessage({ job: m.job, error: error instanceof Error ? error.message : String(error) });
    }
  }
});
`;

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

export interface BlobToCheck {
  pages: number;
  codec: number;
  data: Uint8Array;
}

export type CheckResult = { hashes: Uint8Array; error?: undefined } | { hashes?: undefined; error: string };

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
    this.slots[scan.worker]?.worker.postMessage({ op: 'release', job: scan.job });
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

  private request(index: number, job: number, message: unknown, transfer: ArrayBuffer[]): Promise<unknown> {
    const slot = this.slot(index);
    return new Promise((resolve, reject) => {
      slot.pending.set(job, { resolve, reject });
      if (slot.pending.size === 1) slot.worker.ref();
      slot.worker.postMessage(message, transfer);
    });
  }

  private slot(index: number): Slot {
    if (this.closed) throw new WpsnapError('STORE_CLOSED', 'the store is closed');
    const existing = this.slots[index];
    if (existing !== undefined) return existing;
    const worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { zstdPath: resolveZstdBinding(), addonPath: nativeAddonPath() },
    });
    const slot: Slot = { worker, pending: new Map() };
    worker.unref();
    const fail = (error: Error): void => {
      if (this.slots[index] === slot) this.slots[index] = undefined;
      for (const pending of slot.pending.values()) pending.reject(error);
      slot.pending.clear();
    };
    worker.on('message', (reply: { job: number; error?: string; spare?: ArrayBuffer }) => {
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
