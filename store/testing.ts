// Synthetic records and page contents for tests and benchmarks of the store,
// the exporters and the CLI. Nothing here touches a real process.
import { PAGE_SIZE, type PageBatch, type ProcessRecord, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';

export function fakeProcess(pid = 4242, overrides: Partial<ProcessRecord> = {}): ProcessRecord {
  return {
    pid,
    ppid: 1,
    uid: 1000,
    gid: 1000,
    exe: '/usr/bin/fake',
    cmdline: ['fake', '--flag', 'a b'],
    comm: 'fake',
    startTimeTicks: 123456,
    startedAt: '2025-01-01T00:00:00.000Z',
    auxv: Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]),
    ...overrides,
  };
}

export function fakeThread(tid: number): ThreadRecord {
  const fill = (size: number, seed: number): Buffer => Buffer.alloc(size, seed & 0xff);
  return { tid, name: `thread-${tid}`, regs: fill(216, tid), fpregs: fill(512, tid + 1), xstate: fill(2696, tid + 2) };
}

export function fakeRegion(start: bigint, end: bigint, overrides: Partial<RegionRecord> = {}): RegionRecord {
  return {
    start,
    end,
    perms: 'rw-p',
    offset: 0n,
    dev: '00:00',
    inode: 0,
    path: '',
    pageSize: PAGE_SIZE,
    capture: 'protected',
    ...overrides,
  };
}

export type PageKind = 'zero' | 'random' | 'repetitive' | 'pointers';

/** Fill one page with content of the given kind, a function of `seed`. */
export function fillPage(page: Uint8Array, kind: PageKind, seed: number): void {
  const view = Buffer.from(page.buffer, page.byteOffset, PAGE_SIZE);
  switch (kind) {
    case 'zero':
      view.fill(0);
      break;
    case 'random': {
      // Deterministic (xorshift32 from the seed) so a test can rebuild the page.
      let x = (seed * 2654435761 + 0x9e3779b9) >>> 0 || 1;
      for (let at = 0; at < PAGE_SIZE; at += 4) {
        x ^= x << 13;
        x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        view.writeUInt32LE(x, at);
      }
      break;
    }
    case 'repetitive': {
      const text = `key${seed % 977}=value-${seed};name=entry-${seed % 13};`;
      view.fill(text);
      break;
    }
    case 'pointers':
      for (let at = 0; at < PAGE_SIZE; at += 16) {
        view.writeBigUInt64LE(0x7f0000000000n + BigInt(seed) * 4096n + BigInt(at), at);
        view.writeUInt32LE((seed * 31 + at) >>> 0, at + 8);
        view.writeUInt32LE(0, at + 12);
      }
      break;
  }
}

/**
 * A heap-like batch: consecutive pages from `address`, with `kinds[i % kinds.length]`
 * choosing each page's kind.
 */
export function heapBatch(address: bigint, pages: number, kinds: readonly PageKind[], seed = 0): PageBatch {
  const data = new Uint8Array(pages * PAGE_SIZE);
  const addresses = new BigUint64Array(pages);
  for (let i = 0; i < pages; i++) {
    addresses[i] = address + BigInt(i * PAGE_SIZE);
    fillPage(data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), kinds[i % kinds.length] as PageKind, seed + i);
  }
  return { addresses, data };
}
