// The store's worker thread: zero test and hash of a batch (scan), zstd of the
// pages the store keeps (pack), re-hash of stored blobs (check). It is one
// self-contained, type-checked function whose source the pool evaluates in
// each worker (`pageWorkerSource()`), so it runs the same from tsc's output
// and under vitest; it may use only its argument and workerData, never this
// module's imports.
import type * as WorkerThreads from 'node:worker_threads';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import type { PagehashAddon } from './pagehash.js';

/** Bytes of the SHA-256 digest kept as the content hash (the store addon writes this many). */
export const HASH_BYTES = 16;
/** Pages per compressed blob, at most. */
export const BLOB_PAGES = 64;
/** zstd level for new blobs. */
export const ZSTD_LEVEL = 1;
export const CODEC_RAW = 0;
export const CODEC_ZSTD = 1;

export interface PageWorkerData {
  zstdPath: string;
  pagehashPath: string;
  hashBytes: number;
  blobPages: number;
  codecRaw: number;
  codecZstd: number;
}

export interface BlobToCheck {
  pages: number;
  codec: number;
  data: Uint8Array;
}

export type CheckResult = { hashes: Uint8Array; error?: undefined } | { hashes?: undefined; error: string };

/** Every request says the priority the worker is to run at (store/priority.ts). */
export type PageWorkerRequest = { priority: 'idle' | 'nice' | 'normal' } & (
  /** Find the zero pages of `buffer` and hash the others; the worker keeps the batch for pack or release. */
  | { op: 'scan'; job: number; buffer: ArrayBuffer }
  /** Compress the listed pages of a held batch, BLOB_PAGES to a blob, into `out` if it is big enough. */
  | { op: 'pack'; job: number; pages: Uint32Array; level: number; out: ArrayBuffer | undefined }
  /** Drop a held batch (its buffer comes back as `spare`). */
  | { op: 'release'; job: number }
  /** Decompress and re-hash stored blobs. */
  | { op: 'check'; job: number; blobs: BlobToCheck[] }
);

export interface PageWorkerReply {
  job: number;
  error?: string;
  /** A batch buffer handed back for reuse. */
  spare?: ArrayBuffer;
  zero?: Uint8Array;
  hashes?: Uint8Array;
  blobs?: Array<{ codec: number; offset: number; length: number }>;
  out?: ArrayBuffer;
  results?: CheckResult[];
}

/** The worker's body. Self-contained: it is run from its own source text. */
export function pageWorkerMain(require: NodeJS.Require): void {
  const { parentPort, workerData } = require('node:worker_threads') as typeof WorkerThreads;
  const data0 = workerData as PageWorkerData;
  const zstd = require(data0.zstdPath) as typeof ZstdBinding;
  const { scanPages, setThreadPriority } = require(data0.pagehashPath) as PagehashAddon;
  let priority = '';
  const port = parentPort!;
  const PAGE = 4096;
  const { hashBytes, blobPages, codecRaw, codecZstd } = data0;
  const cctx = new zstd.CCtx();
  const dctx = new zstd.DCtx();
  const scratch = Buffer.allocUnsafeSlow(zstd.compressBound(blobPages * PAGE));
  const gather = Buffer.allocUnsafeSlow(blobPages * PAGE);
  const held = new Map<number, Buffer>();
  const reply = (message: PageWorkerReply, transfer: ArrayBuffer[] = []): void => port.postMessage(message, transfer);

  function scan(m: Extract<PageWorkerRequest, { op: 'scan' }>): void {
    const data = Buffer.from(m.buffer);
    const n = data.length / PAGE;
    const zero = new Uint8Array(n);
    const hashes = new Uint8Array(n * hashBytes);
    scanPages(data, zero, hashes);
    held.set(m.job, data);
    reply({ job: m.job, zero, hashes }, [zero.buffer, hashes.buffer]);
  }

  function pack(m: Extract<PageWorkerRequest, { op: 'pack' }>): void {
    const data = held.get(m.job);
    held.delete(m.job);
    if (data === undefined) throw new Error(`pack: batch ${m.job} is not held by this worker`);
    const pages = m.pages;
    // Every blob goes into one output buffer (recycled by the caller), at most the raw size.
    const need = pages.length * PAGE;
    const out = m.out !== undefined && m.out.byteLength >= need ? new Uint8Array(m.out) : new Uint8Array(need);
    const blobs: Array<{ codec: number; offset: number; length: number }> = [];
    let at = 0;
    for (let first = 0; first < pages.length; first += blobPages) {
      const count = Math.min(blobPages, pages.length - first);
      const firstPage = pages[first]!;
      let raw: Buffer;
      if (pages[first + count - 1]! - firstPage === count - 1) {
        raw = data.subarray(firstPage * PAGE, (firstPage + count) * PAGE); // a run: no gathering
      } else {
        raw = gather.subarray(0, count * PAGE);
        for (let k = 0; k < count; k++) {
          const i = pages[first + k]!;
          data.copy(raw, k * PAGE, i * PAGE, (i + 1) * PAGE);
        }
      }
      const size = cctx.compress(scratch, raw, m.level);
      const stored = size < raw.length ? scratch.subarray(0, size) : raw;
      out.set(stored, at);
      blobs.push({ codec: size < raw.length ? codecZstd : codecRaw, offset: at, length: stored.length });
      at += stored.length;
    }
    // The batch's buffer goes back to the pool for the next batch (fresh memory is slow to touch here).
    const outBuffer = out.buffer as ArrayBuffer;
    const spare = data.buffer as ArrayBuffer;
    reply({ job: m.job, blobs, out: outBuffer, spare }, [outBuffer, spare]);
  }

  function release(m: Extract<PageWorkerRequest, { op: 'release' }>): void {
    const data = held.get(m.job);
    held.delete(m.job);
    if (data !== undefined) reply({ job: m.job, spare: data.buffer as ArrayBuffer }, [data.buffer as ArrayBuffer]);
  }

  function rehash(blob: BlobToCheck): Uint8Array {
    const size = blob.pages * PAGE;
    let raw: Buffer;
    if (blob.codec === codecRaw) {
      if (blob.data.length !== size) throw new Error(`raw blob holds ${blob.data.length} bytes, expected ${size}`);
      raw = Buffer.from(blob.data.buffer, blob.data.byteOffset, blob.data.length);
    } else if (blob.codec === codecZstd) {
      const declared = zstd.getFrameContentSize(blob.data);
      if (declared !== size) throw new Error(`zstd frame declares ${declared} bytes, expected ${size}`);
      raw = Buffer.allocUnsafe(size);
      const got = dctx.decompress(raw, blob.data);
      if (got !== size) throw new Error(`zstd frame decompressed to ${got} bytes, expected ${size}`);
    } else {
      throw new Error(`unknown codec ${blob.codec}`);
    }
    const hashes = new Uint8Array(blob.pages * hashBytes);
    scanPages(raw, null, hashes);
    return hashes;
  }

  function check(m: Extract<PageWorkerRequest, { op: 'check' }>): void {
    const results: CheckResult[] = m.blobs.map((blob) => {
      try {
        return { hashes: rehash(blob) };
      } catch (error) {
        return { error: error instanceof Error ? error.message : String(error) };
      }
    });
    reply({ job: m.job, results });
  }

  port.on('message', (m: PageWorkerRequest) => {
    if (m.priority !== priority) {
      setThreadPriority(m.priority);
      priority = m.priority;
    }
    try {
      if (m.op === 'scan') scan(m);
      else if (m.op === 'pack') pack(m);
      else if (m.op === 'release') release(m);
      else check(m);
    } catch (error) {
      held.delete(m.job);
      if (m.op !== 'release') reply({ job: m.job, error: error instanceof Error ? error.message : String(error) });
    }
  });
}

/** The source a worker evaluates: pageWorkerMain applied to the worker's require. */
export function pageWorkerSource(): string {
  return `'use strict';\n(${pageWorkerMain.toString()})(require);\n`;
}
