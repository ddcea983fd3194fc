// The lazy-restore page server (core/native/lazy_server.c) against a real
// process (fixtures/lazytouch.c) whose anonymous pages are registered MISSING
// with its own userfaultfd: every page it reads has T's content or zero exactly
// where the kernel's semantics say so, whether it was filled on demand, by the
// background pass, after an mremap, in a forked child, or removed first.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import type { NativeHandle } from '../core/native/binding.js';
import type { LazyServerBinding, LazyServerMessage } from '../core/native/lazy-binding.js';
import { buildFixtures, FIXTURES_BUILD_DIR } from './support/spawn.js';
import { join } from 'node:path';

const binding = loadBinding() as NativeBinding & LazyServerBinding;
const PAGE = 4096n;

/** T's content: every word of page i is TAG | i. */
const TAG = 0xa5a5_0000_0000_0000n;
const tWord = (i: number): string => `0x${(TAG | BigInt(i)).toString(16)}`;
function tPages(first: number, count: number): Buffer {
  const b = Buffer.alloc(count * 4096);
  for (let p = 0; p < count; p++) for (let w = 0; w < 512; w++) b.writeBigUInt64LE(TAG | BigInt(first + p), p * 4096 + w * 8);
  return b;
}

interface Reply {
  ok: boolean;
  values?: string[];
  uniform?: boolean;
  micros?: number[];
  addr?: string;
  child?: number;
  [k: string]: unknown;
}

class Touch {
  private readonly waiting: Array<(line: Reply) => void> = [];
  private readonly lines: Reply[] = [];
  pid = 0;
  uffd = 0;
  addr = 0n;
  pages = 0;
  private constructor(private readonly proc: ChildProcessWithoutNullStreams) {
    createInterface({ input: proc.stdout }).on('line', (l) => {
      const j = JSON.parse(l) as Reply;
      const w = this.waiting.shift();
      if (w) w(j);
      else this.lines.push(j);
    });
  }
  static async start(pages: number, ...args: string[]): Promise<Touch> {
    buildFixtures();
    const t = new Touch(spawn(join(FIXTURES_BUILD_DIR, 'lazytouch'), [String(pages), ...args]));
    const ready = await t.next();
    t.pid = ready['pid'] as number;
    t.uffd = ready['uffd'] as number;
    t.addr = BigInt(ready['addr'] as string);
    t.pages = pages;
    return t;
  }
  next(timeoutMs = 20_000): Promise<Reply> {
    const l = this.lines.shift();
    if (l) return Promise.resolve(l);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('lazytouch: no answer')), timeoutMs);
      this.waiting.push((j) => {
        clearTimeout(timer);
        resolve(j);
      });
    });
  }
  async send(command: string): Promise<Reply> {
    this.proc.stdin.write(`${command}\n`);
    const r = await this.next();
    if (!r.ok) throw new Error(`lazytouch ${command}: ${JSON.stringify(r)}`);
    return r;
  }
  at(page: number): string {
    return `0x${(this.addr + BigInt(page) * PAGE).toString(16)}`;
  }
  read(page: number, count: number, base = this.addr): Promise<Reply> {
    return this.send(`read ${(base + BigInt(page) * PAGE).toString(16)} ${count.toString(16)}`);
  }
  exited(): Promise<void> {
    return new Promise((resolve) => {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) resolve();
      else this.proc.once('exit', () => resolve());
    });
  }
  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) process.kill(this.pid, 'SIGKILL');
  }
}

interface Served {
  handle: NativeHandle;
  messages: LazyServerMessage[];
  /** T addresses reported in faults messages, in order. */
  faults: bigint[];
  /** Fill every page of [0, pages) still pending, as the background pass does (chunk: pages per fill call). */
  background(chunk?: number): number;
  pageIndex(t: bigint): number;
}

const cleanups: Array<() => void> = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

async function target(pages: number, ...args: string[]): Promise<Touch> {
  const t = await Touch.start(pages, ...args);
  cleanups.push(() => t.kill());
  return t;
}

/** Take the fixture's userfaultfd and serve it: faults are answered with T's content unless autoFill is false. */
function serve(t: Touch, autoFill = true, prepare?: (uffd: number) => void): Served {
  const pidfd = binding.pidfdOpen(t.pid);
  const uffd = binding.pidfdGetfd(pidfd, t.uffd);
  prepare?.(uffd);
  const end = t.addr + BigInt(t.pages) * PAGE;
  const pageIndex = (a: bigint): number => Number((a - t.addr) / PAGE);
  const image = tPages(0, t.pages); // T's memory, as a store would hand it over
  const s: Served = {
    handle: undefined as unknown as NativeHandle,
    messages: [],
    faults: [],
    pageIndex,
    background(chunk = 1 << 20) {
      let filled = 0;
      const runs = binding.lazyServerPending(s.handle, t.addr, end);
      for (let i = 0; i < runs.length; i += 2) {
        const first = pageIndex(runs[i]!);
        const count = Number(runs[i + 1]! / PAGE);
        for (let p = 0; p < count; p += chunk) {
          const n = Math.min(chunk, count - p);
          filled += binding.lazyServerFill(s.handle, runs[i]! + BigInt(p) * PAGE, image.subarray((first + p) * 4096, (first + p + n) * 4096));
        }
      }
      return filled;
    },
  };
  s.handle = binding.lazyServerStart({ uffd, pidfd, ranges: new BigUint64Array([t.addr, end]) }, (m) => {
    s.messages.push(m);
    if (m.type !== 'faults') return;
    for (const a of m.addresses) {
      s.faults.push(a);
      if (autoFill) binding.lazyServerFill(s.handle, a, image.subarray(pageIndex(a) * 4096, (pageIndex(a) + 1) * 4096));
    }
  });
  cleanups.push(() => {
    binding.lazyServerStop(s.handle);
    binding.closeFd(uffd);
    binding.closeFd(pidfd);
  });
  return s;
}

const range = (first: number, count: number): string[] => Array.from({ length: count }, (_, i) => tWord(first + i));
const zeros = (count: number): string[] => Array.from({ length: count }, () => '0x0');
const until = async (cond: () => boolean, ms = 5000): Promise<void> => {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 5));
  }
};

describe('lazy page server', () => {
  it('exports the features the caller must request', () => {
    expect(binding.lazyUffdFeatures).toBe(0x4en);
  });

  it('lazyUffdApi sets up a context the target created without its API call', async () => {
    const t = await target(8, 'noapi');
    let api: { features: bigint; ioctls: bigint } | undefined;
    const s = serve(t, true, (uffd) => {
      api = binding.lazyUffdApi(uffd);
      expect(() => binding.lazyUffdApi(uffd)).toThrow(expect.objectContaining({ code: 'EINVAL' })); // once per context
    });
    expect(api!.features & binding.lazyUffdFeatures).toBe(binding.lazyUffdFeatures);
    await t.send('register');
    expect((await t.read(0, 8)).values).toEqual(range(0, 8));
    const child = await t.send(`fork ${t.at(0).slice(2)} 8`);
    expect(child.values).toEqual(range(0, 8));
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ contexts: 2, pagesOnDemand: 8, settled: true });
    binding.lazyServerFinish(s.handle);
  });

  it('fills touched pages on demand, the rest in the background, then unregisters on finish', async () => {
    const t = await target(64);
    const s = serve(t);
    const first = await t.read(0, 8);
    expect(first.values).toEqual(range(0, 8));
    expect(first.uniform).toBe(true);
    expect(s.faults.map(s.pageIndex)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(() => binding.lazyServerFinish(s.handle)).toThrow(/still unsettled/);

    expect(s.background()).toBe(56);
    await until(() => s.messages.some((m) => m.type === 'settled'));
    const all = await t.read(0, 64);
    expect(all.values).toEqual(range(0, 64));
    expect(all.uniform).toBe(true);
    const st = binding.lazyServerStats(s.handle);
    expect(st).toMatchObject({ faults: 8, pagesOnDemand: 8, pagesPrefetched: 56, pagesZeroed: 0, contexts: 1, events: 0, settled: true, exited: false });
    expect(binding.lazyServerPending(s.handle, t.addr, t.addr + 64n * PAGE)).toEqual(new BigUint64Array([]));
    expect(binding.lazyServerFill(s.handle, t.addr, tPages(0, 4))).toBe(0);

    binding.lazyServerFinish(s.handle);
    // Unregistered: MADV_DONTNEED then a read is the kernel's own zero fill, no fault reported.
    const before = s.messages.length;
    await t.send(`dontneed ${t.at(5).slice(2)} 2`);
    expect((await t.read(4, 3)).values).toEqual([tWord(4), '0x0', '0x0']);
    await t.send(`write ${t.at(6).slice(2)} 77`);
    expect((await t.read(6, 1)).values).toEqual(['0x77']);
    expect(s.messages.length).toBe(before);
    expect(binding.lazyServerStats(s.handle).faults).toBe(8);
  });

  it('a page removed with MADV_DONTNEED before it was filled reads zero; one removed after a fill reads zero natively', async () => {
    const t = await target(32);
    const s = serve(t);
    expect((await t.read(2, 2)).values).toEqual(range(2, 2));
    await t.send(`dontneed ${t.at(2).slice(2)} 1`); // filled, then removed
    await t.send(`dontneed ${t.at(10).slice(2)} 3`); // removed before any fill
    const pending = binding.lazyServerPending(s.handle, t.addr, t.addr + 32n * PAGE);
    expect(Array.from(pending)).toEqual([t.addr, 2n * PAGE, t.addr + 4n * PAGE, 6n * PAGE, t.addr + 13n * PAGE, 19n * PAGE]);
    expect(s.background()).toBe(32 - 2 - 3);
    const all = await t.read(0, 32);
    expect(all.values).toEqual([...range(0, 2), '0x0', tWord(3), ...range(4, 6), ...zeros(3), ...range(13, 19)]);
    const st = binding.lazyServerStats(s.handle);
    expect(st.events).toBe(2);
    expect(st.pagesZeroed).toBe(4); // page 2 and 10..12 refaulted: settled, zero page at once
    expect(s.faults.map(s.pageIndex)).toEqual([2, 3]); // never reported again
    expect(st.settled).toBe(true);
    binding.lazyServerFinish(s.handle);
  });

  it('a range moved with mremap before being filled reads T content at its new address', async () => {
    const t = await target(32);
    const s = serve(t);
    expect((await t.read(8, 1)).values).toEqual([tWord(8)]); // filled before the move
    const moved = BigInt((await t.send(`mremap ${t.at(8).slice(2)} 8`)).addr!);
    expect(moved).not.toBe(t.addr + 8n * PAGE);
    // On demand at the new address: reported in T addresses.
    expect((await t.read(0, 3, moved)).values).toEqual(range(8, 3));
    expect(s.faults.map(s.pageIndex)).toEqual([8, 9, 10]);
    // The background pass fills the rest where it lives now.
    expect(s.background()).toBe(32 - 3);
    expect((await t.read(0, 8, moved)).values).toEqual(range(8, 8));
    const rest = await t.read(0, 8);
    expect(rest.values).toEqual(range(0, 8));
    expect((await t.read(16, 16)).values).toEqual(range(16, 16));
    const st = binding.lazyServerStats(s.handle);
    expect(st).toMatchObject({ faults: 3, pagesOnDemand: 3, pagesPrefetched: 29, settled: true });
    expect(st.events).toBeGreaterThanOrEqual(1); // REMAP, then (6.18) an UNMAP of the old range, which holds no T page any more
    binding.lazyServerFinish(s.handle);
    // The moved part is unregistered too: removed, it reads zero without a fault.
    await t.send(`dontneed ${moved.toString(16)} 1`);
    expect((await t.read(0, 2, moved)).values).toEqual(['0x0', tWord(9)]);
    expect(binding.lazyServerStats(s.handle).faults).toBe(3);
  });

  it('a forked child reads T content for pages never filled before the fork, zero for removed ones', async () => {
    const t = await target(32);
    const s = serve(t);
    expect((await t.read(0, 4)).values).toEqual(range(0, 4));
    await t.send(`dontneed ${t.at(6).slice(2)} 1`);
    const child = await t.send(`fork ${t.at(0).slice(2)} a`);
    expect(child.values).toEqual([...range(0, 6), '0x0', ...range(7, 3)]);
    expect(child.uniform).toBe(true);
    // Pages 4, 5, 7, 8, 9 faulted in the child and were filled in both contexts.
    expect(s.faults.map(s.pageIndex)).toEqual([0, 1, 2, 3, 4, 5, 7, 8, 9]);
    let st = binding.lazyServerStats(s.handle);
    expect(st.contexts).toBe(2);
    expect(st.pagesOnDemand).toBe(4 + 5);
    // The child is gone (its mm with it): it counts as settled; the parent gets the rest.
    s.background();
    await until(() => s.messages.some((m) => m.type === 'settled'));
    st = binding.lazyServerStats(s.handle);
    expect(st).toMatchObject({ settled: true, liveContexts: 1 });
    expect((await t.read(0, 32)).values).toEqual([...range(0, 6), '0x0', ...range(7, 25)]);
    binding.lazyServerFinish(s.handle);
  });

  it('a child forked after every page was filled has them all and never faults', async () => {
    const t = await target(16);
    const s = serve(t, false);
    // Fill everything in the parent, then fork: the child has it all (copied page tables).
    s.background();
    const child = await t.send(`fork ${t.at(0).slice(2)} a`);
    expect(child.values).toEqual(range(0, 10));
    expect(s.faults).toEqual([]);
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ contexts: 2, settled: true });
    binding.lazyServerFinish(s.handle);
  });

  it('a child that lives on is served by the background pass too: fills reach both contexts, the child never faults', async () => {
    const t = await target(32);
    const s = serve(t);
    expect((await t.read(0, 4)).values).toEqual(range(0, 4));
    await t.send(`dontneed ${t.at(9).slice(2)} 1`);
    await t.send(`spawn ${t.at(0).slice(2)} 20`); // the child waits
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ contexts: 2, liveContexts: 2 });
    // Pending: what either context lacks (both lack 4..8, 10..31).
    expect(Array.from(binding.lazyServerPending(s.handle, t.addr, t.addr + 32n * PAGE))).toEqual([t.addr + 4n * PAGE, 5n * PAGE, t.addr + 10n * PAGE, 22n * PAGE]);
    expect(s.background()).toBe(2 * (32 - 4 - 1));
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ settled: true, pagesPrefetched: 54 });
    const child = await t.send('reap');
    expect(child.values).toEqual([...range(0, 9), '0x0', ...range(10, 22)]);
    expect(child.uniform).toBe(true);
    expect(s.faults.map(s.pageIndex)).toEqual([0, 1, 2, 3]);
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ faults: 5, pagesZeroed: 1 }); // the child's page 9
    binding.lazyServerFinish(s.handle);
    expect((await t.read(0, 32)).values).toEqual([...range(0, 9), '0x0', ...range(10, 22)]);
  });

  it('zero fills count as fills; a vma grown by mremap reads zero beyond T, and finish releases all of it', async () => {
    const t = await target(16);
    const s = serve(t);
    expect(binding.lazyServerZero(s.handle, t.addr + 2n * PAGE, 2n * PAGE)).toBe(2);
    const grown = BigInt((await t.send(`grow ${t.at(0).slice(2)} 10 18`)).addr!); // 16 pages to 24
    const r = await t.read(0, 24, grown);
    expect(r.values).toEqual([...range(0, 2), '0x0', '0x0', ...range(4, 12), ...zeros(8)]);
    expect(r.uniform).toBe(true);
    const st = binding.lazyServerStats(s.handle);
    expect(st).toMatchObject({ faults: 14 + 8, pagesOnDemand: 14, pagesPrefetched: 2, pagesZeroed: 8, settled: true });
    binding.lazyServerFinish(s.handle);
    await t.send(`dontneed ${grown.toString(16)} 18`);
    await t.send(`write ${(grown + 20n * PAGE).toString(16)} 5`);
    expect((await t.read(0, 24, grown)).values).toEqual([...zeros(20), '0x5', ...zeros(3)]);
    expect(binding.lazyServerStats(s.handle).faults).toBe(22);
  });

  it('many threads faulting on the same pages while the background pass runs all see T content', async () => {
    const pages = 1024;
    const t = await target(pages);
    const s = serve(t);
    const reply = t.send(`threads 8 ${t.at(0).slice(2)} ${pages.toString(16)}`);
    let done = false;
    void reply.finally(() => (done = true));
    while (!done) {
      s.background(16);
      await new Promise((r) => setImmediate(r));
    }
    const r = await reply;
    expect(r['same']).toBe(true);
    expect(r.uniform).toBe(true);
    expect(r.values).toEqual(range(0, pages));
    const st = binding.lazyServerStats(s.handle);
    expect(st.pagesOnDemand + st.pagesPrefetched).toBe(pages);
    expect(st.settled).toBe(true);
    binding.lazyServerFinish(s.handle);
  });

  it('fills go on while another thread keeps removing pages (EAGAIN: the mm changing), and removed pages read zero', async () => {
    const pages = 8192;
    const t = await target(pages);
    const s = serve(t);
    await t.send(`churn ${t.at(0).slice(2)} 4`);
    s.background(16); // 512 fill calls of 16 pages against a stream of REMOVE events
    const rounds = (await t.send('wait'))['rounds'] as number;
    expect(rounds).toBeGreaterThan(0);
    expect(binding.lazyServerPending(s.handle, t.addr, t.addr + BigInt(pages) * PAGE)).toEqual(new BigUint64Array([]));
    const r = await t.read(0, pages);
    expect(r.values).toEqual([...zeros(4), ...range(4, pages - 4)]);
    const st = binding.lazyServerStats(s.handle);
    expect(st.settled).toBe(true);
    expect(st.events).toBeGreaterThan(0);
    console.log(`churn: ${rounds} rounds of 4 MADV_DONTNEED, ${st.events} events read, ${st.fillWaits} fill waits on EAGAIN, ${st.pagesPrefetched} pages prefetched`);
    binding.lazyServerFinish(s.handle);
  });

  it('reports the target exit, refuses to finish while pages are unsettled, and stops', async () => {
    const t = await target(8);
    const s = serve(t);
    expect((await t.read(0, 1)).values).toEqual([tWord(0)]);
    expect(() => binding.lazyServerFinish(s.handle)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
    await t.send('exit').catch(() => undefined);
    await t.exited();
    await until(() => s.messages.some((m) => m.type === 'exit'));
    await until(() => s.messages.some((m) => m.type === 'settled'));
    expect(binding.lazyServerStats(s.handle)).toMatchObject({ exited: true, settled: true, liveContexts: 0 });
    binding.lazyServerStop(s.handle);
    binding.lazyServerStop(s.handle);
    expect(() => binding.lazyServerFill(s.handle, t.addr, Buffer.alloc(4096))).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });

  it('measures the fault service time as the target sees it', async () => {
    const pages = 2048;
    const t = await target(pages);
    const s = serve(t);
    const r = await t.read(0, pages);
    expect(r.values).toEqual(range(0, pages));
    const micros = [...r.micros!].sort((a, b) => a - b);
    const pct = (p: number): number => micros[Math.min(micros.length - 1, Math.floor(micros.length * p))]!;
    const st = binding.lazyServerStats(s.handle);
    expect(st.pagesOnDemand).toBe(pages);
    console.log(
      `lazy fault latency over ${pages} first touches (fill from the JS thread): target p50 ${pct(0.5).toFixed(1)} µs, p99 ${pct(0.99).toFixed(1)} µs;` +
        ` server (read to wake) p50 ${st.faultServiceP50Micros.toFixed(1)} µs, p99 ${st.faultServiceP99Micros.toFixed(1)} µs`,
    );
    expect(pct(0.5)).toBeLessThan(5000);
    // Settled pages (removed after their fill) are answered natively with the zero page.
    await t.send(`dontneed ${t.at(0).slice(2)} ${pages.toString(16)}`);
    const z = await t.read(0, pages);
    expect(z.values).toEqual(zeros(pages));
    const zm = [...z.micros!].sort((a, b) => a - b);
    const zp = (p: number): number => zm[Math.min(zm.length - 1, Math.floor(zm.length * p))]!;
    expect(binding.lazyServerStats(s.handle).pagesZeroed).toBe(pages);
    console.log(`native zero-page answers over ${pages} faults on settled pages: target p50 ${zp(0.5).toFixed(1)} µs, p99 ${zp(0.99).toFixed(1)} µs`);
  });
});
