// Single-thread cost of each stage of wpsnap's store pipeline on faultlat's
// heap-like content, measured in-process without a target: the worker's scan
// (zero test + SHA-256 per page, one addon call per batch), its pack (zstd -1 of 64-page blobs), the
// SQLite insert of the compressed blobs (WAL, synchronous=NORMAL, 16 KiB pages,
// as the store opens it), and a plain memcpy for scale. Figures are CPU-bound
// throughputs on one core; a snapshot of M MiB costs about M / MBps seconds of
// CPU per stage, spread over wpsnap's threads (engine, main, 2 workers).
import { createHash, hash as cryptoHash } from 'node:crypto';
import { mkdtempSync, openSync, readSync, closeSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as ZstdBinding from 'zstd-napi/binding.js';
import type BetterSqlite3 from 'better-sqlite3';
import { pagehashAddonPath, type PagehashAddon } from '../store/pagehash.js';
import { repoRoot, round, runCommand } from './lib.js';

const require = createRequire(import.meta.url);
const zstd = require('zstd-napi/binding.js') as typeof ZstdBinding;
const Database = require('better-sqlite3') as typeof BetterSqlite3;

const PAGE = 4096;
const BATCH_PAGES = 512; // the engine's batch: 2 MiB
const BLOB_PAGES = 64; // the store's blob

export interface StageResult {
  stage: string;
  MBps: number;
  secondsPerGiB: number;
}

export interface PipelineResult {
  mib: number;
  zstd1Ratio: number;
  stages: StageResult[];
}

const sha256: (b: Buffer) => Buffer =
  typeof cryptoHash === 'function' ? (b) => cryptoHash('sha256', b, 'buffer') : (b) => createHash('sha256').update(b).digest();

function stage(name: string, bytes: number, ms: number): StageResult {
  const MBps = bytes / 1e6 / (ms / 1e3);
  return { stage: name, MBps: round(MBps, 0) as number, secondsPerGiB: round(2 ** 30 / 1e6 / MBps, 2) as number };
}

function timed(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/** faultlat's content (same generator, same seed) for `mib` MiB, read into memory. */
async function content(mib: number, dir: string): Promise<Buffer> {
  const file = join(dir, 'content.img');
  const r = await runCommand(join(repoRoot(), 'fixtures', 'build', 'faultlat'), ['--mib', String(mib), '--dump', file]);
  if (r.code !== 0) throw new Error(`faultlat --dump failed: ${r.stderr}`);
  const data = Buffer.allocUnsafeSlow(mib << 20);
  const fd = openSync(file, 'r');
  try {
    for (let off = 0; off < data.length; ) {
      const n = readSync(fd, data, off, data.length - off, off);
      if (n <= 0) throw new Error('short read of the content image');
      off += n;
    }
  } finally {
    closeSync(fd);
  }
  rmSync(file, { force: true });
  // The write loop of a live target sets word 0 of every page; do the same.
  for (let p = 0; p < data.length / PAGE; p++) data.writeBigUInt64LE(BigInt(p + 1), p * PAGE);
  return data;
}

export async function runPipeline(mib = 256): Promise<PipelineResult> {
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-pipeline-'));
  try {
    const data = await content(mib, dir);
    const pages = data.length / PAGE;
    const stages: StageResult[] = [];

    const copyDst = Buffer.allocUnsafeSlow(BATCH_PAGES * PAGE);
    copyDst.fill(0); // touched once: fresh memory is slow here
    stages.push(
      stage(
        'memcpy (2 MiB batches)',
        data.length,
        timed(() => {
          for (let b = 0; b < pages; b += BATCH_PAGES) data.copy(copyDst, 0, b * PAGE, (b + BATCH_PAGES) * PAGE);
        }),
      ),
    );

    // What the store's workers run: one addon call per 2 MiB batch.
    const binding = require(pagehashAddonPath()) as PagehashAddon;
    const zeroFlags = new Uint8Array(BATCH_PAGES);
    const batchHashes = new Uint8Array(BATCH_PAGES * 16);
    stages.push(
      stage(
        'scan: zero test + SHA-256, one addon call per 2 MiB batch',
        data.length,
        timed(() => {
          for (let b = 0; b < pages; b += BATCH_PAGES) binding.scanPages(data.subarray(b * PAGE, (b + BATCH_PAGES) * PAGE), zeroFlags, batchHashes);
        }),
      ),
    );
    // For scale: the same through node:crypto, one call per page (the store before it moved to the addon).
    const ZERO = Buffer.alloc(PAGE);
    let zeros = 0;
    stages.push(
      stage(
        'scan through node:crypto, one call per page (for scale)',
        data.length,
        timed(() => {
          for (let p = 0; p < pages; p++) {
            const page = data.subarray(p * PAGE, (p + 1) * PAGE);
            if (page.equals(ZERO)) zeros++;
            else sha256(page);
          }
        }),
      ),
    );

    const cctx = new zstd.CCtx();
    const scratch = Buffer.allocUnsafeSlow(zstd.compressBound(BLOB_PAGES * PAGE));
    const blobs: Buffer[] = [];
    let compressed = 0;
    stages.push(
      stage(
        'pack: zstd -1 per 64-page blob',
        data.length,
        timed(() => {
          for (let b = 0; b < pages; b += BLOB_PAGES) {
            const size = cctx.compress(scratch, data.subarray(b * PAGE, (b + BLOB_PAGES) * PAGE), 1);
            compressed += size;
            blobs.push(Buffer.from(scratch.subarray(0, size)));
          }
        }),
      ),
    );

    const db = new Database(join(dir, 'pipeline.db'));
    db.pragma('page_size = 16384');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.exec('CREATE TABLE blobs (id INTEGER PRIMARY KEY, pages INTEGER NOT NULL, codec INTEGER NOT NULL, hashes BLOB NOT NULL, data BLOB NOT NULL)');
    const insert = db.prepare('INSERT INTO blobs (pages, codec, hashes, data) VALUES (?, 1, ?, ?)');
    const hashes = Buffer.alloc(BLOB_PAGES * 16);
    const perTx = BATCH_PAGES / BLOB_PAGES; // one transaction per engine batch
    const tx = db.transaction((first: number) => {
      for (let i = first; i < Math.min(first + perTx, blobs.length); i++) insert.run(BLOB_PAGES, hashes, blobs[i]);
    });
    stages.push(
      stage(
        'SQLite: insert the compressed blobs (1 tx per 2 MiB batch)',
        data.length,
        timed(() => {
          for (let i = 0; i < blobs.length; i += perTx) tx(i);
        }),
      ),
    );
    db.close();
    return { mib, zstd1Ratio: round(data.length / compressed, 2) as number, stages };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
