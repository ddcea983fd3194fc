// The oracle for fixtures/hostile/ (the program hostile): page content, what each mode's state at T
// (read from the snapshot itself) implies for every page, and a verdict that
// separates exact pages, pages listed lost (with an allowed reason) and
// mismatches (silently wrong pages: the bugs).
//
// Content encoding (the comment at the top of fixtures/hostile/hostile.h is the spec):
//   word 0 = 0x4854 << 48 | q << 40 | p,  word 1 = s,
//   word w >= 2 = h ^ (w * GOLDEN),  h = mix64(key_q ^ s << 20 ^ p),  key_q = mix64(seed ^ (q + 1) << 56)
import { KEY_HI, KEY_LO, M64, mix64, words32 } from '../../fixtures/oracle.js';
import type { RegionRecord } from '../../snapshot-format/model.js';
import type { Store } from '../../store/store.js';

export const PAGE = 4096;
const WORDS = PAGE / 8;
const MAGIC_HI = 0x48540000; // high 32 bits of 0x4854 << 48
const ZERO_PAGE = Buffer.alloc(PAGE);

// ---------------------------------------------------------------- content

export type Expect = { kind: 'zero' } | { kind: 'content'; stream: number; step: number; page: number };

export const ZERO: Expect = { kind: 'zero' };
export function content(stream: number, step: number, page: number): Expect {
  return { kind: 'content', stream, step, page };
}

/** What a page must hold: one of the candidates exactly, or (wordwise) each word from one of them. */
export interface PageExpectation {
  candidates: Expect[];
  /** A write or discard in progress at T: every 8-byte word is that of some candidate. */
  wordwise: boolean;
}

export function exactly(e: Expect): PageExpectation {
  return { candidates: [e], wordwise: false };
}

export class Content {
  private readonly keys = new Map<number, bigint>();
  constructor(readonly seed: bigint) {}

  private key(stream: number): bigint {
    let k = this.keys.get(stream);
    if (k === undefined) {
      k = mix64((this.seed ^ (BigInt(stream + 1) << 56n)) & M64);
      this.keys.set(stream, k);
    }
    return k;
  }

  /** Fill `out` (1024 uint32) with the page `e` describes. */
  fill(out: Uint32Array, e: Expect): void {
    if (e.kind === 'zero') {
      out.fill(0);
      return;
    }
    const s = BigInt(e.step);
    const h = mix64(this.key(e.stream) ^ ((s << 20n) & M64) ^ BigInt(e.page));
    const hlo = Number(h & 0xffffffffn);
    const hhi = Number(h >> 32n);
    out[0] = e.page >>> 0;
    out[1] = (MAGIC_HI | (e.stream << 8) | Math.floor(e.page / 0x100000000)) >>> 0;
    out[2] = e.step >>> 0;
    out[3] = Math.floor(e.step / 0x100000000) >>> 0;
    for (let w = 2; w < WORDS; w++) {
      out[2 * w] = (hlo ^ KEY_LO[w]!) >>> 0;
      out[2 * w + 1] = (hhi ^ KEY_HI[w]!) >>> 0;
    }
  }

  page(e: Expect): Buffer {
    const buf = Buffer.alloc(PAGE);
    this.fill(words32(buf), e);
    return buf;
  }

  private readonly scratch = [new Uint32Array(WORDS * 2), new Uint32Array(WORDS * 2), new Uint32Array(WORDS * 2), new Uint32Array(WORDS * 2)];

  matches(actual: Buffer, x: PageExpectation): boolean {
    const a = words32(actual);
    const n = x.candidates.length;
    if (n > this.scratch.length) throw new Error('too many candidates');
    for (let i = 0; i < n; i++) this.fill(this.scratch[i]!, x.candidates[i]!);
    if (!x.wordwise) {
      outer: for (let i = 0; i < n; i++) {
        const c = this.scratch[i]!;
        for (let w = 0; w < WORDS * 2; w++) if (a[w] !== c[w]) continue outer;
        return true;
      }
      return false;
    }
    for (let w = 0; w < WORDS; w++) {
      let ok = false;
      for (let i = 0; i < n && !ok; i++) {
        const c = this.scratch[i]!;
        ok = a[2 * w] === c[2 * w] && a[2 * w + 1] === c[2 * w + 1];
      }
      if (!ok) return false;
    }
    return true;
  }

  /** What a page holds, for mismatch reports. */
  describe(actual: Buffer): string {
    const a = words32(actual);
    if (a.every((v) => v === 0)) return 'zero page';
    const hi = a[1]!;
    if (hi >>> 16 !== 0x4854) return `foreign content (word 0 = 0x${actual.readBigUInt64LE(0).toString(16)})`;
    const stream = (hi >>> 8) & 0xff;
    const page = a[0]! + (hi & 0xff) * 0x100000000;
    const step = a[2]! + a[3]! * 0x100000000;
    const whole = this.matches(actual, exactly(content(stream, step, page)));
    return `${whole ? '' : 'partly '}content of stream ${stream} step ${step} page ${page}`;
  }
}

export function describeExpectation(x: PageExpectation): string {
  const parts = x.candidates.map((e) => (e.kind === 'zero' ? 'zero' : `stream ${e.stream} step ${e.step} page ${e.page}`));
  return (x.wordwise ? 'words of ' : '') + parts.join(' | ');
}

// ---------------------------------------------------------------- striders

/** A strider writes page (s * stride) mod P at step s; see fixtures/hostile/strider.c. */
export class StriderModel {
  private readonly pos: Uint32Array;
  constructor(
    readonly stream: number,
    readonly pages: number,
    readonly stride: number,
  ) {
    this.pos = new Uint32Array(pages);
    let p = 0;
    for (let k = 0; k < pages; k++) {
      this.pos[p] = k;
      p = (p + stride) % pages;
    }
  }

  /** Page p after `counter` completed steps, with step `counter` possibly in progress. */
  expect(p: number, counter: number): PageExpectation {
    const k = this.pos[p]!;
    const last: Expect = counter > k ? content(this.stream, k + this.pages * Math.floor((counter - 1 - k) / this.pages), p) : ZERO;
    if (this.pos[p] === counter % this.pages) {
      return { candidates: [last, content(this.stream, counter, p)], wordwise: true };
    }
    return exactly(last);
  }
}

// ---------------------------------------------------------------- the snapshot

/** Reading one process of a snapshot: pages, words, lost ranges, regions at T. */
export class SnapshotView {
  private readonly cache = new Map<bigint, Buffer>();
  private readonly loaded: Array<{ start: bigint; end: bigint; pages: Map<bigint, Buffer> }> = [];
  readonly lost: Array<{ start: bigint; end: bigint; reason: string }>;
  readonly regions: RegionRecord[];

  constructor(
    private readonly store: Store,
    readonly processId: number,
  ) {
    this.lost = store.lost(processId).map((l) => ({ start: l.address, end: l.address + BigInt(l.pages * PAGE), reason: l.reason }));
    this.regions = store.regions(processId);
  }

  /** Read [start, end) in one pass (stored pages in address order): much faster than page by page. */
  preload(start: bigint, end: bigint): void {
    const pages = new Map<bigint, Buffer>();
    for (const { address, data } of this.store.pagesInRange(this.processId, start, end)) pages.set(address, data);
    this.loaded.push({ start, end, pages });
  }

  page(address: bigint): Buffer {
    for (const l of this.loaded) if (address >= l.start && address < l.end) return l.pages.get(address) ?? ZERO_PAGE;
    let p = this.cache.get(address);
    if (!p) {
      p = Buffer.from(this.store.readPage(this.processId, address));
      if (this.cache.size > 4096) this.cache.clear();
      this.cache.set(address, p);
    }
    return p;
  }

  u64(address: bigint): bigint {
    const base = address & ~4095n;
    return this.page(base).readBigUInt64LE(Number(address - base));
  }

  num(address: bigint): number {
    const v = this.u64(address);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`implausible value ${v} at 0x${address.toString(16)}`);
    return Number(v);
  }

  lostReason(address: bigint): string | undefined {
    for (const l of this.lost) if (address >= l.start && address < l.end) return l.reason;
    return undefined;
  }

  /** The region (mapping at T) holding address, if any. */
  regionAt(address: bigint): RegionRecord | undefined {
    return this.regions.find((r) => address >= r.start && address < r.end);
  }
}

export interface Verdict {
  checked: number;
  exact: number;
  /** Pages listed lost, by reason. */
  lost: Record<string, number>;
  /** Silently wrong pages, or lost with a reason not allowed here. First 20 described. */
  mismatches: string[];
  mismatchCount: number;
  /** Of the mismatches: pages whose content is wrong and not listed lost (silently wrong). */
  silentlyWrong: number;
  /** Of the mismatches: pages listed lost with a reason this surface cannot produce. */
  wrongReason: number;
}

export function newVerdict(): Verdict {
  return { checked: 0, exact: 0, lost: {}, mismatches: [], mismatchCount: 0, silentlyWrong: 0, wrongReason: 0 };
}

/** Check one page: exact, or listed lost with an allowed reason; anything else is a mismatch. */
export function checkPage(
  verdict: Verdict,
  view: SnapshotView,
  oracle: Content,
  address: bigint,
  x: PageExpectation,
  allowedLost: readonly string[],
  what: () => string,
): void {
  verdict.checked++;
  const reason = view.lostReason(address);
  if (reason !== undefined) {
    if (allowedLost.includes(reason)) {
      verdict.lost[reason] = (verdict.lost[reason] ?? 0) + 1;
      return;
    }
    verdict.wrongReason++;
    fail(verdict, `${what()} at 0x${address.toString(16)}: listed lost as "${reason}", which cannot happen here`);
    return;
  }
  const actual = view.page(address);
  if (oracle.matches(actual, x)) {
    verdict.exact++;
    return;
  }
  verdict.silentlyWrong++;
  fail(verdict, `${what()} at 0x${address.toString(16)}: expected ${describeExpectation(x)}, snapshot holds ${oracle.describe(actual)} and does not list it lost`);
}

export function fail(verdict: Verdict, message: string): void {
  verdict.mismatchCount++;
  if (verdict.mismatches.length < 20) verdict.mismatches.push(message);
}

// ---------------------------------------------------------------- ready lines

export interface HostileReady {
  mode: string;
  pid: number;
  seed: bigint;
  control: bigint;
  meta: bigint;
  opsSlots: number;
  raw: Record<string, unknown>;
}

export function hex(v: unknown, what: string): bigint {
  if (typeof v !== 'string' || !/^0x[0-9a-f]+$/.test(v)) throw new Error(`hostile ready line: ${what} is not a 0x hex string: ${JSON.stringify(v)}`);
  return BigInt(v);
}

export function parseReady(line: string): HostileReady {
  const j = JSON.parse(line) as Record<string, unknown>;
  if (j['ready'] !== true) throw new Error(`not a hostile ready line: ${line}`);
  return {
    mode: String(j['mode']),
    pid: Number(j['pid']),
    seed: BigInt(String(j['seed'])),
    control: hex(j['control'], 'control'),
    meta: hex(j['meta'], 'meta'),
    opsSlots: Number(j['opsSlots']),
    raw: j,
  };
}

export interface StriderInfo {
  stream: number;
  kind: string;
  start: bigint;
  pages: number;
  stride: number;
  counter: bigint;
}

export function striders(ready: HostileReady): StriderInfo[] {
  const ws = ready.raw['writers'];
  if (!Array.isArray(ws)) throw new Error('hostile ready line has no writers');
  return ws.map((x: Record<string, unknown>) => ({
    stream: Number(x['stream']),
    kind: String(x['kind']),
    start: hex(x['start'], 'writers[].start'),
    pages: Number(x['pages']),
    stride: Number(x['stride']),
    counter: hex(x['counter'], 'writers[].counter'),
  }));
}

/** Every page of every strider, against its counter at T as the snapshot holds it. */
export function checkStriders(verdict: Verdict, view: SnapshotView, oracle: Content, list: StriderInfo[], allowedLost: readonly string[] = []): void {
  for (const w of list) {
    view.preload(w.start, w.start + BigInt(w.pages * PAGE));
    const model = new StriderModel(w.stream, w.pages, w.stride);
    const counter = view.num(w.counter);
    for (let p = 0; p < w.pages; p++) {
      checkPage(verdict, view, oracle, w.start + BigInt(p * PAGE), model.expect(p, counter), allowedLost, () => `${w.kind} writer ${w.stream} page ${p} (counter ${counter} at T)`);
    }
  }
}

export interface DoneLine {
  done: boolean;
  mode: string;
  errors: number;
  selfCheck: string;
  ops: number[];
  aux: number[];
  childrenStarted: number;
  childFailures: number;
}

// ---------------------------------------------------------------- per-mode oracles

const LOST_DISCARDED = 'discarded-before-saved';
const LOST_UNMAPPED = 'unmapped-before-saved';

/**
 * dontneed: per page, the tickets of its last write and of the last discards
 * by its owner and by the cross discarder (fixtures/hostile/dontneed.c, "dontneed meta").
 */
export function dontneedExpectation(view: SnapshotView, record: bigint, stream: number, page: number): PageExpectation {
  const w = (i: number): number => view.num(record + BigInt(i * 8));
  const wb = w(0), wcur = w(1), we = w(2), wdone = w(3);
  const writeInProgress = wb > we;
  const base: Expect[] = writeInProgress
    ? [wcur > 0 ? content(stream, wcur, page) : ZERO, wdone > 0 ? content(stream, wdone, page) : ZERO, ZERO]
    : [wcur > 0 ? content(stream, wcur, page) : ZERO];
  let zeroed = false; // a discard that began after the write ended and completed before T
  let maybeZero = false; // such a discard, in progress at T (madvise itself is atomic with respect to T)
  let overlap = false; // a discard that overlapped the write: each word old, new or zero
  for (const [db, de] of [[w(4), w(5)], [w(6), w(7)]] as const) {
    if (db === 0) continue;
    const discardInProgress = db > de;
    if (!discardInProgress && de < wb) continue; // over before the write began
    if (!writeInProgress && we < db) {
      if (discardInProgress) maybeZero = true;
      else zeroed = true;
    } else {
      overlap = true;
    }
  }
  if (zeroed) return exactly(ZERO);
  if (overlap) return { candidates: [...base, ZERO], wordwise: true };
  if (maybeZero) return { candidates: [...base, ZERO], wordwise: writeInProgress };
  return { candidates: base, wordwise: writeInProgress };
}

export function checkDontneed(verdict: Verdict, view: SnapshotView, oracle: Content, ready: HostileReady): void {
  const pages = Number(ready.raw['pages']);
  const writers = ready.raw['writers'] as Array<Record<string, unknown>>;
  view.preload(ready.meta, ready.meta + BigInt(writers.length * pages * 64));
  writers.forEach((wr, t) => {
    const start = hex(wr['start'], 'writers[].start');
    view.preload(start, start + BigInt(pages * PAGE));
    for (let p = 0; p < pages; p++) {
      const record = ready.meta + BigInt((t * pages + p) * 64);
      checkPage(verdict, view, oracle, start + BigInt(p * PAGE), dontneedExpectation(view, record, t, p), [LOST_DISCARDED], () => `dontneed writer ${t} page ${p}`);
    }
  });
}

/** munmap: every chunk filling or filled at T, page by page. Returns the number of chunks seen. */
export function checkMunmap(verdict: Verdict, view: SnapshotView, oracle: Content, ready: HostileReady): number {
  const threads = Number(ready.raw['threads']);
  const slots = Number(ready.raw['slots']);
  let chunks = 0;
  for (let t = 0; t < threads; t++) {
    for (let j = 0; j < slots; j++) {
      const record = ready.meta + BigInt((t * slots + j) * 64);
      const state = view.num(record);
      if (state !== 1 && state !== 2) continue; // empty, or being unmapped at T
      chunks++;
      const address = view.u64(record + 8n);
      const n = view.num(record + 16n);
      const id = view.num(record + 24n);
      const progress = view.num(record + 32n);
      for (let i = 0; i < n; i++) {
        const x: PageExpectation =
          state === 2 || i < progress
            ? exactly(content(t, id, i))
            : i === progress
              ? { candidates: [content(t, id, i), ZERO], wordwise: true }
              : exactly(ZERO);
        checkPage(verdict, view, oracle, address + BigInt(i * PAGE), x, [LOST_UNMAPPED], () => `munmap thread ${t} chunk ${id} (${state === 2 ? 'filled' : `filling, ${progress} done`}) page ${i}`);
      }
    }
  }
  return chunks;
}

/**
 * mremap: each region is checked at its address at T (the published base; while
 * a move was in progress at T, the one that is a read-write mapping at T), and
 * the placeholder home must read as zero or be listed unmapped-before-saved.
 * Returns the number of regions whose address at T was unknown (skipped).
 */
export function checkMremap(verdict: Verdict, view: SnapshotView, oracle: Content, ready: HostileReady): number {
  const pages = Number(ready.raw['pages']);
  const threads = ready.raw['threads'] as Array<Record<string, unknown>>;
  let skipped = 0;
  const rw = (a: bigint): boolean => {
    const r = view.regionAt(a);
    return r !== undefined && r.perms.startsWith('rw') && r.end - a >= BigInt(pages * PAGE);
  };
  threads.forEach((th, t) => {
    const record = ready.meta + BigInt(t * 64);
    const moving = view.num(record) === 1;
    const published = view.u64(record + 8n);
    const counter = view.num(record + 16n);
    const target = view.u64(record + 32n);
    let base: bigint | undefined = published;
    if (moving && !rw(published)) base = target !== 0n && rw(target) ? target : undefined;
    if (base === undefined) {
      skipped++;
      return;
    }
    if (!rw(base)) {
      fail(verdict, `mremap thread ${t}: no read-write mapping of ${pages} pages at 0x${base.toString(16)} at T`);
      return;
    }
    const model = new StriderModel(Number(th['stream']), pages, Number(th['stride']));
    view.preload(base, base + BigInt(pages * PAGE));
    for (let p = 0; p < pages; p++) {
      checkPage(verdict, view, oracle, base + BigInt(p * PAGE), model.expect(p, counter), [], () => `mremap region ${t} page ${p} (counter ${counter} at T, region at 0x${base!.toString(16)})`);
    }
    for (const key of ['home0', 'home1']) {
      const home = hex(th[key], key);
      if (home === base) continue;
      const r = view.regionAt(home);
      if (r === undefined || r.perms.startsWith('rw')) continue; // not a placeholder at T
      for (let p = 0; p < pages; p++) {
        checkPage(verdict, view, oracle, home + BigInt(p * PAGE), exactly(ZERO), [LOST_UNMAPPED], () => `mremap thread ${t} placeholder ${key} page ${p}`);
      }
    }
  });
  return skipped;
}

/**
 * fork with shared memory: each child k rewrites every page of the shared
 * region with step k. Children are numbered in fork order and the snapshot's
 * control page says how many had been started at T, so a page holding the
 * writes of child k >= that number holds content written after T.
 */
export function checkForkShared(verdict: Verdict, view: SnapshotView, oracle: Content, ready: HostileReady): { startedAtT: number; newest: number } {
  const shared = ready.raw['shared'] as Record<string, unknown>;
  const start = hex(shared['start'], 'shared.start');
  const pages = Number(shared['pages']);
  const stream = Number(shared['stream']);
  const startedAtT = view.num(hex(ready.raw['childrenStarted'], 'childrenStarted'));
  let newest = -1;
  for (let p = 0; p < pages; p++) {
    const address = start + BigInt(p * PAGE);
    verdict.checked++;
    const reason = view.lostReason(address);
    if (reason !== undefined) {
      verdict.lost[reason] = (verdict.lost[reason] ?? 0) + 1;
      continue;
    }
    const actual = view.page(address);
    const k = Number(actual.readBigUInt64LE(8));
    const x: PageExpectation = { candidates: [content(stream, k, p), k > 0 ? content(stream, k - 1, p) : ZERO, ZERO], wordwise: true };
    if (actual.every((b) => b === 0)) {
      verdict.exact++;
      continue;
    }
    if (!oracle.matches(actual, x)) {
      verdict.silentlyWrong++;
      fail(verdict, `shared page ${p} at 0x${address.toString(16)}: not the content of any child: ${oracle.describe(actual)}`);
      continue;
    }
    newest = Math.max(newest, k);
    if (k >= startedAtT) {
      verdict.silentlyWrong++;
      fail(verdict, `shared page ${p} at 0x${address.toString(16)}: holds the writes of child ${k}, forked after T ` +
        `(${startedAtT} children had been started at T), and is not listed lost`);
      continue;
    }
    verdict.exact++;
  }
  return { startedAtT, newest };
}
