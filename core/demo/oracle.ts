// The point-in-time oracle for fixtures/pagewriter.c, and helpers to run fixtures.
//
// pagewriter's writers overwrite whole pages with content that encodes
// (writer t, step s, page p) and publish a step counter after each page. Given
// the counters as a snapshot recorded them, every page's content at T follows:
// page p at permutation position k holds step k + P*floor((c-1-k)/P) if c > k,
// else zeros. The one page being written at T (perm[c mod P]) may be caught
// mid-write: a prefix of step c's words followed by the old words.
//
// Content encoding (must match the comment at the top of fixtures/pagewriter.c):
//   mix64(x)   = splitmix64 finaliser of x + GOLDEN (GOLDEN = 0x9E3779B97F4A7C15)
//   perm_t     = Fisher-Yates, state = seed ^ (0x7065726D << 32) ^ t,
//                for i = P-1..1: j = mix64(state) % (i+1), state += GOLDEN, swap(perm[i], perm[j])
//   word 0     = 0x5750 << 48 | t << 40 | p
//   word 1     = s
//   word w>=2  = h ^ (w * GOLDEN), h = mix64(mix64(seed ^ (t+1) << 56) ^ s << 20 ^ p)
import { endianness } from 'node:os';

if (endianness() !== 'LE') throw new Error('the oracle assumes a little-endian host (x86_64)');

export const PAGE_SIZE = 4096;
const WORDS = PAGE_SIZE / 8;
export const M64 = (1n << 64n) - 1n;
const GOLDEN = 0x9e3779b97f4a7c15n;
const WORD0_MAGIC_HI = 0x57500000; // high 32 bits of 0x5750 << 48

export type WriterKind = 'anon' | 'memfd' | 'kernel';

export interface PagewriterLayout {
  pid: number;
  seed: bigint;
  pageSize: number;
  control: bigint;
  writers: Array<{ index: number; kind: WriterKind; tid: number; start: bigint; pages: number; counter: bigint }>;
  untouched: { start: bigint; bytes: number };
  sleeperCounter: bigint;
}

export interface OracleMismatch {
  address: bigint;
  /** Writer index, or -1 for the untouched region. */
  writer: number;
  /** Page index inside the writer's (or untouched) region; -1 when the counter itself is wrong. */
  page: number;
  /** The writer's counter as read from the snapshot (0n for the untouched region). */
  counter: bigint;
  detail: string;
}

export interface OracleReport {
  /** Writer pages plus untouched pages compared (every page of both, mismatching or not). */
  pagesChecked: number;
  /** Pages caught mid-write at T (new prefix + old suffix, at least one new word). */
  midWritePages: number;
  mismatches: OracleMismatch[];
}

// ---------------------------------------------------------------- encoding

export function mix64(x: bigint): bigint {
  let z = (x + GOLDEN) & M64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
  return z ^ (z >> 31n);
}

// (w * GOLDEN) mod 2^64 for every word, split into 32-bit halves: words 2..511
// of a step-coded page are h ^ this, here and in the pages of fixtures/hostile/.
export const KEY_LO = new Uint32Array(WORDS);
export const KEY_HI = new Uint32Array(WORDS);
for (let w = 0; w < WORDS; w++) {
  const k = (BigInt(w) * GOLDEN) & M64;
  KEY_LO[w] = Number(k & 0xffffffffn);
  KEY_HI[w] = Number(k >> 32n);
}

// The same mix64 on 32-bit halves: the per-page hash without BigInt allocation
// (BigInt costs ~2 µs a page, this ~50 ns). Results go to MIX_OUT[0] (lo), [1] (hi).
const MIX_OUT = new Uint32Array(2);
const GOLDEN_LO = 0x7f4a7c15;
const GOLDEN_HI = 0x9e3779b9;

/** High 32 bits of the 64-bit product of two uint32. */
function mulhi32(a: number, b: number): number {
  const a0 = a & 0xffff, a1 = a >>> 16, b0 = b & 0xffff, b1 = b >>> 16;
  const p01 = a0 * b1, p10 = a1 * b0;
  const mid = ((a0 * b0) >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  return (a1 * b1 + (p01 >>> 16) + (p10 >>> 16) + (mid >>> 16)) >>> 0;
}

function mix64Halves(xlo: number, xhi: number): void {
  let lo = (xlo + GOLDEN_LO) >>> 0;
  let hi = (xhi + GOLDEN_HI + (lo < GOLDEN_LO ? 1 : 0)) >>> 0;
  // z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9
  let slo = ((lo >>> 30) | (hi << 2)) >>> 0, shi = hi >>> 30;
  lo = (lo ^ slo) >>> 0; hi = (hi ^ shi) >>> 0;
  let nlo = Math.imul(lo, 0x1ce4e5b9) >>> 0;
  let nhi = (mulhi32(lo, 0x1ce4e5b9) + Math.imul(lo, 0xbf58476d) + Math.imul(hi, 0x1ce4e5b9)) >>> 0;
  lo = nlo; hi = nhi;
  // z = (z ^ z >> 27) * 0x94D049BB133111EB
  slo = ((lo >>> 27) | (hi << 5)) >>> 0; shi = hi >>> 27;
  lo = (lo ^ slo) >>> 0; hi = (hi ^ shi) >>> 0;
  nlo = Math.imul(lo, 0x133111eb) >>> 0;
  nhi = (mulhi32(lo, 0x133111eb) + Math.imul(lo, 0x94d049bb) + Math.imul(hi, 0x133111eb)) >>> 0;
  lo = nlo; hi = nhi;
  // z ^ z >> 31
  MIX_OUT[0] = (lo ^ ((lo >>> 31) | (hi << 1))) >>> 0;
  MIX_OUT[1] = (hi ^ (hi >>> 31)) >>> 0;
}

interface WriterModel {
  index: number;
  pages: number;
  keyLo: number; // mix64(seed ^ (t+1) << 56), low and high halves
  keyHi: number;
  perm: Uint32Array; // step position -> page
  pos: Uint32Array; // page -> step position
}

const models = new WeakMap<PagewriterLayout, Map<number, WriterModel>>();

function buildModel(seed: bigint, index: number, pages: number): WriterModel {
  const perm = new Uint32Array(pages);
  for (let i = 0; i < pages; i++) perm[i] = i;
  let state = (seed ^ (0x7065726dn << 32n) ^ BigInt(index)) & M64;
  for (let i = pages - 1; i >= 1; i--) {
    const j = Number(mix64(state) % BigInt(i + 1));
    state = (state + GOLDEN) & M64;
    const tmp = perm[i]!;
    perm[i] = perm[j]!;
    perm[j] = tmp;
  }
  const pos = new Uint32Array(pages);
  for (let k = 0; k < pages; k++) pos[perm[k]!] = k;
  const key = mix64((seed ^ (BigInt(index + 1) << 56n)) & M64);
  return { index, pages, keyLo: Number(key & 0xffffffffn), keyHi: Number(key >> 32n), perm, pos };
}

function model(layout: PagewriterLayout, writerIndex: number): WriterModel {
  let byIndex = models.get(layout);
  if (!byIndex) {
    byIndex = new Map();
    models.set(layout, byIndex);
  }
  let m = byIndex.get(writerIndex);
  if (!m) {
    const w = layout.writers.find((x) => x.index === writerIndex);
    if (!w) throw new Error(`pagewriter layout has no writer ${writerIndex}`);
    m = buildModel(layout.seed, w.index, w.pages);
    byIndex.set(writerIndex, m);
  }
  return m;
}

/** The step whose content page `page` holds after steps 0..counter-1, or -1 for never written. */
function lastStep(m: WriterModel, page: number, counter: number): number {
  const k = m.pos[page]!;
  if (counter <= k) return -1;
  return k + m.pages * Math.floor((counter - 1 - k) / m.pages);
}

/** Fill `out` (4096 bytes, 8-aligned) with step `step`'s content of `page`, or zeros for step -1. */
function fillContent(out: Uint32Array, m: WriterModel, step: number, page: number): void {
  if (step < 0) {
    out.fill(0);
    return;
  }
  const sLo = step >>> 0; // step < 2^53
  const sHi = Math.floor(step / 0x100000000);
  // h = mix64(key ^ s << 20 ^ page), page < 2^32
  mix64Halves((m.keyLo ^ (sLo << 20) ^ page) >>> 0, (m.keyHi ^ ((sHi << 20) | (sLo >>> 12))) >>> 0);
  const hlo = MIX_OUT[0]!;
  const hhi = MIX_OUT[1]!;
  out[0] = page >>> 0; // page < 2^32, so the page bits sit in the low half
  out[1] = (WORD0_MAGIC_HI | (m.index << 8)) >>> 0;
  out[2] = sLo;
  out[3] = sHi;
  for (let w = 2; w < WORDS; w++) {
    out[2 * w] = (hlo ^ KEY_LO[w]!) >>> 0;
    out[2 * w + 1] = (hhi ^ KEY_HI[w]!) >>> 0;
  }
}

/** A Uint32Array over buf, copying it if it is not 4-byte aligned. */
export function words32(buf: Buffer): Uint32Array {
  if (buf.byteOffset % 4 === 0) return new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
  return new Uint32Array(Uint8Array.from(buf).buffer);
}

function counterNumber(c: bigint): number {
  if (c < 0n || c > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`implausible pagewriter counter ${c}`);
  return Number(c);
}

/** Content of step `step` of writer `writerIndex` on page `pageIndex` (what that step writes). */
export function stepContent(layout: PagewriterLayout, writerIndex: number, step: bigint, pageIndex: number): Buffer {
  const buf = Buffer.alloc(PAGE_SIZE);
  fillContent(words32(buf), model(layout, writerIndex), counterNumber(step), pageIndex);
  return buf;
}

/** Content of page `pageIndex` of writer `writerIndex` after all steps < counterAtT. */
export function expectedPage(layout: PagewriterLayout, writerIndex: number, pageIndex: number, counterAtT: bigint): Buffer {
  const m = model(layout, writerIndex);
  if (!Number.isInteger(pageIndex) || pageIndex < 0 || pageIndex >= m.pages) throw new RangeError(`page ${pageIndex} out of range`);
  const buf = Buffer.alloc(PAGE_SIZE);
  fillContent(words32(buf), m, lastStep(m, pageIndex, counterNumber(counterAtT)), pageIndex);
  return buf;
}

/** Human-readable description of what a page holds, for mismatch reports. */
export function describePage(buf: Buffer): string {
  if (buf.length !== PAGE_SIZE) return `${buf.length} bytes instead of ${PAGE_SIZE}`;
  const w0 = buf.readBigUInt64LE(0);
  if (w0 === 0n && buf.every((b) => b === 0)) return 'zero page';
  if (w0 >> 48n !== 0x5750n) return `no pagewriter content (word 0 = 0x${w0.toString(16)})`;
  return `content of writer ${Number((w0 >> 40n) & 0xffn)} page ${Number(w0 & 0xffffffffffn)} step ${buf.readBigUInt64LE(8)}`;
}

function firstDiff(a: Uint32Array, b: Uint32Array, from = 0): number {
  for (let i = from; i < a.length; i++) if (a[i] !== b[i]) return i >> 1;
  return -1;
}

// ---------------------------------------------------------------- checking

/** readPage(address) returns the 4096 bytes a snapshot says were at `address` at T. */
export function checkSnapshot(layout: PagewriterLayout, readPage: (address: bigint) => Buffer): OracleReport {
  const report: OracleReport = { pagesChecked: 0, midWritePages: 0, mismatches: [] };
  const pageMask = BigInt(PAGE_SIZE - 1);
  const controlPages = new Map<bigint, Buffer>();
  const counterAt = (addr: bigint): bigint => {
    const base = addr & ~pageMask;
    let page = controlPages.get(base);
    if (!page) {
      page = Buffer.from(readPage(base));
      controlPages.set(base, page);
    }
    return page.readBigUInt64LE(Number(addr & pageMask));
  };

  const expected = Buffer.alloc(PAGE_SIZE);
  const expected32 = words32(expected);
  const fresh = Buffer.alloc(PAGE_SIZE);
  const fresh32 = words32(fresh);

  for (const w of layout.writers) {
    const m = model(layout, w.index);
    const counter = counterAt(w.counter);
    if (counter > BigInt(Number.MAX_SAFE_INTEGER)) {
      report.mismatches.push({ address: w.counter, writer: w.index, page: -1, counter, detail: `implausible counter ${counter}; writer's pages not checked` });
      continue;
    }
    const c = Number(counter);
    const midPage = m.perm[c % m.pages]!; // the page step c writes
    const fail = (page: number, address: bigint, detail: string): void => {
      report.mismatches.push({ address, writer: w.index, page, counter, detail });
    };
    for (let p = 0; p < m.pages; p++) {
      const address = w.start + BigInt(p * PAGE_SIZE);
      const actual = readPage(address);
      report.pagesChecked++;
      const step = lastStep(m, p, c);
      if (actual.length !== PAGE_SIZE) {
        fail(p, address, `snapshot returned ${actual.length} bytes`);
        continue;
      }
      fillContent(expected32, m, step, p);
      if (actual.equals(expected)) continue;
      const actual32 = words32(actual);
      const want = step < 0 ? 'zero page' : `step ${step}`;
      if (p === midPage) {
        // Step c may have stored a prefix of its words (or all of them, with
        // the counter not yet published): new[0..L) followed by old[L..512).
        fillContent(fresh32, m, c, p);
        let prefixWords = firstDiff(actual32, fresh32);
        if (prefixWords < 0) prefixWords = WORDS;
        const suffixBad = firstDiff(actual32, expected32, prefixWords * 2);
        if (prefixWords > 0 && suffixBad < 0) {
          report.midWritePages++;
          continue;
        }
        fail(p, address, `expected ${want}, or step ${c} mid-write (new prefix then old words); ` +
          `found ${describePage(actual)}: ${prefixWords} new words, then word ${suffixBad} differs from ${want}`);
        continue;
      }
      fail(p, address, `expected ${want}, found ${describePage(actual)}; first differing word ${firstDiff(actual32, expected32)}`);
    }
  }

  const zero = Buffer.alloc(PAGE_SIZE);
  const untouchedPages = Math.floor(layout.untouched.bytes / PAGE_SIZE);
  for (let p = 0; p < untouchedPages; p++) {
    const address = layout.untouched.start + BigInt(p * PAGE_SIZE);
    const actual = readPage(address);
    report.pagesChecked++;
    if (!actual.equals(zero)) {
      report.mismatches.push({ address, writer: -1, page: p, counter: 0n, detail: `untouched page is not zero: ${describePage(actual)}` });
    }
  }
  return report;
}

// ---------------------------------------------------------------- parsing

function hex(v: unknown, what: string): bigint {
  if (typeof v !== 'string' || !/^0x[0-9a-f]+$/.test(v)) throw new Error(`pagewriter layout: ${what} is not a lowercase 0x hex string: ${JSON.stringify(v)}`);
  return BigInt(v);
}

function int(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new Error(`pagewriter layout: ${what} is not a non-negative integer: ${JSON.stringify(v)}`);
  return v;
}

function record(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`pagewriter layout: ${what} is not an object`);
  return v as Record<string, unknown>;
}

export function parseLayout(line: string): PagewriterLayout {
  const j = record(JSON.parse(line), 'ready line');
  if (j['ready'] !== true) throw new Error(`not a pagewriter ready line: ${line}`);
  const seed = j['seed'];
  if (!(typeof seed === 'string' && /^\d+$/.test(seed)) && !(typeof seed === 'number' && Number.isSafeInteger(seed))) {
    throw new Error(`pagewriter layout: bad seed ${JSON.stringify(seed)}`);
  }
  const pageSize = int(j['pageSize'], 'pageSize');
  if (pageSize !== PAGE_SIZE) throw new Error(`pagewriter layout: pageSize ${pageSize}, the oracle knows ${PAGE_SIZE}`);
  const writers = j['writers'];
  if (!Array.isArray(writers)) throw new Error('pagewriter layout: writers is not an array');
  const untouched = record(j['untouched'], 'untouched');
  return {
    pid: int(j['pid'], 'pid'),
    seed: BigInt(seed),
    pageSize,
    control: hex(j['control'], 'control'),
    writers: writers.map((x: unknown, i) => {
      const w = record(x, `writers[${i}]`);
      const kind = w['kind'];
      if (kind !== 'anon' && kind !== 'memfd' && kind !== 'kernel') throw new Error(`pagewriter layout: writers[${i}].kind ${JSON.stringify(kind)}`);
      return {
        index: int(w['index'], `writers[${i}].index`),
        kind,
        tid: int(w['tid'], `writers[${i}].tid`),
        start: hex(w['start'], `writers[${i}].start`),
        pages: int(w['pages'], `writers[${i}].pages`),
        counter: hex(w['counter'], `writers[${i}].counter`),
      };
    }),
    untouched: { start: hex(untouched['start'], 'untouched.start'), bytes: int(untouched['bytes'], 'untouched.bytes') },
    sleeperCounter: hex(j['sleeperCounter'], 'sleeperCounter'),
  };
}
