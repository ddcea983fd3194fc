// Validates the pagewriter oracle without wpsnap: against synthetic memory, and
// against a live pagewriter stopped with SIGSTOP and read through /proc/PID/mem.
import { describe, it, expect, beforeAll } from 'vitest';
import {
  PAGE_SIZE,
  buildFixtures,
  checkSnapshot,
  expectedPage,
  mix64,
  openProcMem,
  parseLayout,
  startPagewriter,
  stepContent,
  waitStopped,
  type PagewriterLayout,
} from './support/oracle.js';

const SMALL = ['--threads', '2', '--pages', '1024', '--memfd-pages', '256', '--kernel-pages', '128', '--untouched-mib', '4'];

/** A layout at made-up addresses, with every writer's counter in one control page. */
function synthLayout(opts: { anon: number; pages: number; memfd: number; kernel: number; untouchedBytes: number; seed: bigint }): PagewriterLayout {
  const control = 0x10000000n;
  const writers: PagewriterLayout['writers'] = [];
  let next = 0x20000000n;
  const add = (kind: 'anon' | 'memfd' | 'kernel', pages: number): void => {
    const index = writers.length;
    writers.push({ index, kind, tid: 1000 + index, start: next, pages, counter: control + BigInt(64 * index) });
    next += BigInt(pages * PAGE_SIZE) + 0x100000n;
  };
  for (let i = 0; i < opts.anon; i++) add('anon', opts.pages);
  if (opts.memfd) add('memfd', opts.memfd);
  if (opts.kernel) add('kernel', opts.kernel);
  return {
    pid: 1, seed: opts.seed, pageSize: PAGE_SIZE, control, writers,
    untouched: { start: next, bytes: opts.untouchedBytes }, sleeperCounter: control + 64n * 60n,
  };
}

/** Memory exactly as pagewriter leaves it after `counters[t]` steps of each writer. */
function synthMemory(layout: PagewriterLayout, counters: bigint[]): Map<bigint, Buffer> {
  const mem = new Map<bigint, Buffer>();
  const control = Buffer.alloc(PAGE_SIZE);
  for (const w of layout.writers) {
    control.writeBigUInt64LE(counters[w.index]!, Number(w.counter - layout.control));
    for (let p = 0; p < w.pages; p++) mem.set(w.start + BigInt(p * PAGE_SIZE), expectedPage(layout, w.index, p, counters[w.index]!));
  }
  mem.set(layout.control, control);
  return mem;
}

const reader = (mem: Map<bigint, Buffer>) => (address: bigint): Buffer => mem.get(address) ?? Buffer.alloc(PAGE_SIZE);

/** The page step `c` writes: the only one whose content changes between counters c and c+1. */
function pageOfStep(layout: PagewriterLayout, writer: number, c: bigint): number {
  const w = layout.writers[writer]!;
  for (let p = 0; p < w.pages; p++) {
    if (!expectedPage(layout, writer, p, c).equals(expectedPage(layout, writer, p, c + 1n))) return p;
  }
  throw new Error('no page changes');
}

/** FNV-1a 64 over the bytes, as pagewriter's checksum (32-bit halves, exact). */
function fnv1a64(bufs: Buffer[]): string {
  let lo = 0x84222325;
  let hi = 0xcbf29ce4;
  for (const b of bufs) {
    for (let i = 0; i < b.length; i++) {
      lo = (lo ^ b[i]!) >>> 0;
      // h * (2^40 + 0x1b3) mod 2^64: the 2^40 term moves lo << 8 into the high half.
      const t = lo * 0x1b3;
      hi = (hi * 0x1b3 + Math.floor(t / 0x100000000) + lo * 256) >>> 0;
      lo = t >>> 0;
    }
  }
  return hi.toString(16).padStart(8, '0') + lo.toString(16).padStart(8, '0');
}

beforeAll(() => buildFixtures());

describe('oracle on synthetic memory', () => {
  const layout = synthLayout({ anon: 1, pages: 64, memfd: 16, kernel: 8, untouchedBytes: 8 * PAGE_SIZE, seed: 42n });
  const counters = [3n * 64n + 5n, 17n, 0n];

  it('accepts memory that matches the counters', () => {
    const r = checkSnapshot(layout, reader(synthMemory(layout, counters)));
    expect(r.mismatches).toEqual([]);
    expect(r.pagesChecked).toBe(64 + 16 + 8 + 8);
    expect(r.midWritePages).toBe(0);
  });

  it('encodes writer, page and step in the first two words', () => {
    const b = stepContent(layout, 1, 77n, 9);
    expect(b.readBigUInt64LE(0)).toBe((0x5750n << 48n) | (1n << 40n) | 9n);
    expect(b.readBigUInt64LE(8)).toBe(77n);
    // Words >= 2 against a plain BigInt rendering of the C formula, steps past 2^32 included.
    const M = 2n ** 64n - 1n;
    const G = 0x9e3779b97f4a7c15n;
    for (const s of [0n, 77n, 4097n, 2n ** 40n + 12345n, 2n ** 52n + 3n]) {
      const h = mix64(mix64(42n ^ (2n << 56n)) ^ ((s << 20n) & M) ^ 9n);
      const page = stepContent(layout, 1, s, 9);
      expect(page.readBigUInt64LE(8)).toBe(s);
      for (const w of [2, 3, 300, 511]) expect(page.readBigUInt64LE(w * 8)).toBe(h ^ ((BigInt(w) * G) & M));
    }
  });

  it('tolerates the page of step c as new prefix + old suffix, nothing else', () => {
    const c = counters[0]!;
    const p = pageOfStep(layout, 0, c);
    const addr = layout.writers[0]!.start + BigInt(p * PAGE_SIZE);
    const oldC = expectedPage(layout, 0, p, c);
    const newC = stepContent(layout, 0, c, p);

    // (1 new word equals the old word 0: same writer and page, so it is not mid-write.)
    for (const words of [2, 100, 512]) {
      const mem = synthMemory(layout, counters);
      mem.set(addr, Buffer.concat([newC.subarray(0, words * 8), oldC.subarray(words * 8)]));
      const r = checkSnapshot(layout, reader(mem));
      expect(r.mismatches).toEqual([]);
      expect(r.midWritePages).toBe(1);
    }

    const mem = synthMemory(layout, counters);
    mem.set(addr, Buffer.concat([oldC.subarray(0, 800), newC.subarray(800)])); // wrong shape
    const r = checkSnapshot(layout, reader(mem));
    expect(r.mismatches.map((m) => m.address)).toEqual([addr]);
    expect(r.midWritePages).toBe(0);
  });

  it('reports a page saved after a later write landed', () => {
    const c = counters[0]!;
    const p = pageOfStep(layout, 0, c + 1n); // written by step c+1, after T
    const addr = layout.writers[0]!.start + BigInt(p * PAGE_SIZE);
    const mem = synthMemory(layout, counters);
    mem.set(addr, expectedPage(layout, 0, p, c + 2n));
    const r = checkSnapshot(layout, reader(mem));
    expect(r.mismatches).toHaveLength(1);
    expect(r.mismatches[0]).toMatchObject({ address: addr, writer: 0, page: p, counter: c });
    expect(r.mismatches[0]!.detail).toContain(`step ${c + 1n}`);
  });

  it('reports a non-zero untouched page and a never-written page that is not zero', () => {
    const mem = synthMemory(layout, counters);
    const bad = Buffer.alloc(PAGE_SIZE);
    bad[4095] = 1;
    const untouched = layout.untouched.start + 3n * BigInt(PAGE_SIZE);
    mem.set(untouched, bad);
    const kernel = layout.writers[2]!; // counter 0: every page must be zero
    mem.set(kernel.start + 5n * BigInt(PAGE_SIZE), stepContent(layout, 2, 0n, 5));
    const r = checkSnapshot(layout, reader(mem));
    expect(r.mismatches.map((m) => [m.writer, m.page])).toEqual([[2, 5], [-1, 3]]);
  });

  it('checks ~20k pages well under a second', () => {
    const big = synthLayout({ anon: 4, pages: 4096, memfd: 1024, kernel: 256, untouchedBytes: 16 << 20, seed: 9n });
    const cs = big.writers.map((w) => BigInt(w.pages) * 7n + 123n);
    const mem = synthMemory(big, cs);
    const t0 = performance.now();
    const r = checkSnapshot(big, reader(mem));
    const ms = performance.now() - t0;
    console.log(`checkSnapshot: ${r.pagesChecked} pages in ${ms.toFixed(0)} ms`);
    expect(r.mismatches).toEqual([]);
    expect(r.pagesChecked).toBe(4 * 4096 + 1024 + 256 + 4096);
    expect(ms).toBeLessThan(1000);
  });

  it('parses a ready line', () => {
    const l = parseLayout('{"ready":true,"pid":5,"seed":"18446744073709551615","pageSize":4096,"control":"0x7f00","writers":[{"index":0,"kind":"kernel","tid":6,"start":"0x1000","pages":2,"counter":"0x7f00"}],"untouched":{"start":"0x9000","bytes":4096},"sleeperCounter":"0x7f40"}');
    expect(l.seed).toBe(2n ** 64n - 1n);
    expect(l.writers[0]).toEqual({ index: 0, kind: 'kernel', tid: 6, start: 0x1000n, pages: 2, counter: 0x7f00n });
    expect(() => parseLayout('{"ready":true}')).toThrow();
  });
});

describe('oracle on a live pagewriter (SIGSTOP + /proc/PID/mem)', () => {
  it('finds no mismatch in a stopped process, and finds each corrupted page', async () => {
    const pw = await startPagewriter([...SMALL, '--seed', '12345', '--self-check-on-exit']);
    const pid = pw.child.pid!;
    const { layout } = pw;
    let stopped = false;
    try {
      expect(layout.writers.map((w) => w.kind)).toEqual(['anon', 'anon', 'memfd', 'kernel']);
      await new Promise((r) => setTimeout(r, 300));
      // Negative control: reading a running process is not a point-in-time copy
      // (pages move past the counters read first), and the oracle must say so.
      const live = openProcMem(pid);
      try {
        expect(checkSnapshot(layout, live.readPage).mismatches.length).toBeGreaterThan(0);
      } finally {
        live.close();
      }
      process.kill(pid, 'SIGSTOP');
      stopped = true;
      await waitStopped(pid);

      const mem = openProcMem(pid);
      try {
        const r = checkSnapshot(layout, mem.readPage);
        const writerPages = layout.writers.reduce((n, w) => n + w.pages, 0);
        expect(r.mismatches).toEqual([]);
        expect(r.pagesChecked).toBe(writerPages + layout.untouched.bytes / PAGE_SIZE);
        expect(r.midWritePages).toBeLessThanOrEqual(layout.writers.length);

        const control = mem.readPage(layout.control);
        const counters = layout.writers.map((w) => control.readBigUInt64LE(Number(w.counter - layout.control)));
        console.log(`counters at T: ${counters.join(' ')}, mid-write pages: ${r.midWritePages}`);
        for (const c of counters) expect(c).toBeGreaterThan(0n);

        // Corrupt one byte in one page of an anon writer, the kernel writer and the untouched region.
        const pick = (t: number): bigint => {
          const w = layout.writers[t]!;
          for (let p = 0; ; p++) {
            const a = w.start + BigInt(p * PAGE_SIZE);
            if (mem.readPage(a).equals(expectedPage(layout, t, p, counters[t]!))) return a; // not mid-write
          }
        };
        const targets = [pick(1), pick(3), layout.untouched.start + 17n * BigInt(PAGE_SIZE)];
        const corrupted = checkSnapshot(layout, (a) => {
          const b = mem.readPage(a);
          if (targets.includes(a)) b[100] = b[100]! ^ 0x40;
          return b;
        });
        expect(corrupted.mismatches.map((m) => m.address)).toEqual(targets);
        expect(corrupted.mismatches.map((m) => m.writer)).toEqual([1, 3, -1]);
        expect(corrupted.mismatches[0]!.detail).toMatch(/first differing word 12$/);
      } finally {
        mem.close();
      }
    } finally {
      if (stopped) process.kill(pid, 'SIGCONT');
      process.kill(pid, 'SIGTERM');
    }
    const done = await pw.done;
    expect(done).toMatchObject({ errors: 0, exitCode: 0, selfCheck: 'ok' });
    expect(done.sleeps).toBeGreaterThan(5);
    expect(done.reads).toBeGreaterThan(0);
  }, 60_000);
});

describe('pagewriter --steps', () => {
  const run = async (seed: string) => {
    const pw = await startPagewriter(['--steps', '5000', '--threads', '2', '--pages', '256', '--memfd-pages', '64', '--kernel-pages', '32', '--untouched-mib', '1', '--seed', seed, '--self-check-on-exit']);
    const done = await pw.done;
    expect(done).toMatchObject({ errors: 0, exitCode: 0, selfCheck: 'ok', counters: [5000, 5000, 5000, 5000] });
    expect(done.checksum).toMatch(/^[0-9a-f]{16}$/);
    return { layout: pw.layout, done };
  };

  it('prints the same checksum for the same seed, another for another seed, and the oracle agrees', async () => {
    const a = await run('7');
    const b = await run('7');
    const c = await run('8');
    expect(b.done.checksum).toBe(a.done.checksum);
    expect(c.done.checksum).not.toBe(a.done.checksum);
    // The TypeScript model of the final memory hashes to the C program's checksum.
    const pages = a.layout.writers.flatMap((w) => Array.from({ length: w.pages }, (_, p) => expectedPage(a.layout, w.index, p, 5000n)));
    expect(fnv1a64(pages)).toBe(a.done.checksum);
  }, 60_000);
});
