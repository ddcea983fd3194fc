// Throughput of the page store's write path, without a target or the engine:
// `npm run bench:store` (node dist/bench/store-throughput.js). A benchmark,
// not a test: the figure depends on the machine and on what else runs on it.
//   WPSNAP_BENCH_MIB=256   volume per workload (default 64)
//   WPSNAP_BENCH_BUSY=1    keep one core busy with a spinning process meanwhile
// Two workloads: a synthetic heap mix, and the real memory (rw-p mappings) of
// a node process that built a heap of objects, read through /proc/PID/mem.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PAGE_SIZE, type PageBatch } from '../snapshot-format/model.js';
import { Store } from '../store/index.js';
import { fakeProcess, fillPage, type PageKind } from '../store/testing.js';

const MIB = Number(process.env['WPSNAP_BENCH_MIB'] ?? 64);
const BATCH_PAGES = 256;
const IN_FLIGHT = 8;
// Per 16 pages: 6 zero, 4 repetitive (drawn from 64 distinct pages: mostly duplicates),
// 4 pointer-rich (unique, compressible), 2 random (unique, incompressible).
const MIX: PageKind[] = ['zero', 'pointers', 'repetitive', 'zero', 'random', 'pointers', 'zero', 'repetitive',
  'zero', 'pointers', 'repetitive', 'zero', 'random', 'pointers', 'zero', 'repetitive'];

function syntheticBatches(totalPages: number): PageBatch[] {
  const batches: PageBatch[] = [];
  for (let first = 0; first < totalPages; first += BATCH_PAGES) {
    const n = Math.min(BATCH_PAGES, totalPages - first);
    const data = new Uint8Array(n * PAGE_SIZE);
    const addresses = new BigUint64Array(n);
    for (let i = 0; i < n; i++) {
      const page = first + i;
      addresses[i] = 0x7f0000000000n + BigInt(page) * 4096n;
      const kind = MIX[page % MIX.length] as PageKind;
      fillPage(data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), kind, kind === 'repetitive' ? page % 64 : page);
    }
    batches.push({ addresses, data });
  }
  return batches;
}

const HEAP_CHILD = `
const junk = [];
for (let i = 0; i < 1.5e6; i++) junk.push({ id: i, name: 'item-' + i, tags: [i % 7, i % 13], when: new Date(1e12 + i * 1000) });
const text = []; for (let i = 0; i < 2e5; i++) text.push(JSON.stringify({ user: 'u' + (i % 5000), path: '/api/v1/items/' + i, status: 200 }));
const arena = Buffer.alloc(48 << 20); for (let i = 0; i < arena.length; i += 512) arena.writeDoubleLE(Math.sqrt(i), i);
process.stdout.write('ready\\n');
setInterval(() => junk.length + text.length + arena.length, 1000);
`;

/** The rw-p pages of another process, as batches (up to maxBytes). */
async function processHeapBatches(maxBytes: number): Promise<PageBatch[]> {
  const child: ChildProcess = spawn(process.execPath, ['-e', HEAP_CHILD], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await new Promise((ready) => child.stdout?.once('data', ready));
    const fd = openSync(`/proc/${child.pid}/mem`, 'r');
    const batches: PageBatch[] = [];
    let total = 0;
    try {
      for (const line of readFileSync(`/proc/${child.pid}/maps`, 'utf8').split('\n')) {
        const m = /^([0-9a-f]+)-([0-9a-f]+) rw-p/.exec(line);
        if (m === null) continue;
        for (let at = parseInt(m[1] as string, 16), end = parseInt(m[2] as string, 16); at < end && total < maxBytes; at += BATCH_PAGES * PAGE_SIZE) {
          const length = Math.min(BATCH_PAGES * PAGE_SIZE, end - at, maxBytes - total);
          const data = Buffer.alloc(length);
          let got = 0;
          try {
            got = readSync(fd, data, 0, length, at);
          } catch {
            break;
          }
          const n = Math.floor(got / PAGE_SIZE);
          if (n === 0) break;
          const addresses = new BigUint64Array(n);
          for (let i = 0; i < n; i++) addresses[i] = BigInt(at + i * PAGE_SIZE);
          batches.push({ addresses, data: data.subarray(0, n * PAGE_SIZE) });
          total += n * PAGE_SIZE;
        }
      }
    } finally {
      closeSync(fd);
    }
    return batches;
  } finally {
    child.kill('SIGKILL');
  }
}

async function measure(label: string, batches: PageBatch[]): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-'));
  const busy = process.env['WPSNAP_BENCH_BUSY'] === '1' ? spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }) : undefined;
  try {
    const store = Store.open(join(dir, 'store.db'));
    const warm = store.beginSnapshot({ name: 'warm-up' }); // starts the workers
    await warm.addPages(warm.addProcess(fakeProcess(1)), batches[0] as PageBatch);
    await warm.abort('warm-up');
    const writer = store.beginSnapshot({ name: 'bench' });
    const pid = writer.addProcess(fakeProcess(2));
    const cpu = process.cpuUsage();
    const started = process.hrtime.bigint();
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < batches.length) await writer.addPages(pid, batches[next++] as PageBatch);
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, lane));
    const stats = await writer.complete({ pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const used = process.cpuUsage(cpu);
    const cpuSeconds = (used.user + used.system) / 1e6;
    await store.close();
    const mb = stats.bytesRaw / 1e6;
    console.log(
      `${label}: ${mb.toFixed(0)} MB in ${seconds.toFixed(2)} s = ${(mb / seconds).toFixed(0)} MB/s` +
        ` (${busy === undefined ? 'no extra load' : 'one core kept busy'}); ${(mb / cpuSeconds).toFixed(0)} MB per CPU-second;` +
        ` zero ${stats.zeroPages}, stored ${stats.pagesSaved} (new ${stats.pagesNew}) pages,` +
        ` ${(stats.bytesStored / 1e6).toFixed(1)} MB compressed`,
    );
  } finally {
    busy?.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  await measure(`synthetic heap mix, ${MIB} MiB`, syntheticBatches((MIB * 1024 * 1024) / PAGE_SIZE));
  await measure(`a node process's real memory, up to ${MIB} MiB`, await processHeapBatches(MIB * 1024 * 1024));
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
