// The HTML report of `wpsnap diff` (snapshot-format/diff-html.ts): one
// self-contained page, escaped against hostile paths, whose inline script
// really draws in a real browser. The browser part runs Debian's chromium
// headless twice (a screenshot, decoded here with node:zlib, and a DOM dump)
// on a report written 0600 into a private temp directory.
import { spawn } from 'node:child_process';
import { accessSync, constants, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { crc32, inflateSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DiffRegion, SnapshotDiff } from '../snapshot-format/diff.js';
import { DIFF_HTML_COLORS, DIFF_HTML_DATA_ID, diffHtml, diffHtmlData, pageRuns } from '../snapshot-format/diff-html.js';

const HOSTILE = '</script><img src=x onerror=alert(1)>';
const P = 4096n;
const HEAP = 0x5555_5600_0000n;
const HEAP_PAGES = 200_000;

/** 200 runs of 300 changed pages, one every 1000 pages: 60,000 changed pages. */
function heapPages(): bigint[] {
  const pages: bigint[] = [];
  for (let run = 0; run < 200; run++) for (let i = 0; i < 300; i++) pages.push(HEAP + BigInt(run * 1000 + 100 + i) * P);
  return pages;
}

function region(start: bigint, pages: number, path: string, perms: string, status: DiffRegion['status'], changed: bigint[] | undefined, extra: Partial<DiffRegion> = {}): DiffRegion {
  const r: DiffRegion = { start, end: start + BigInt(pages) * P, path, perms, status, changedPages: changed?.length ?? 0, changedBytes: (changed?.length ?? 0) * 1000, unknownPages: 0, ...extra };
  if (changed !== undefined) r.pages = changed;
  return r;
}

function sampleDiff(): SnapshotDiff {
  const regions: DiffRegion[] = [
    region(0x5555_5555_4000n, 4, '/usr/bin/app', 'r--p', 'same', []),
    region(0x5555_5555_8000n, 16, '/usr/bin/app', 'rw-p', 'changed', [0x5555_5555_8000n + 3n * P]),
    region(HEAP, HEAP_PAGES, '[heap]', 'rw-p', 'changed', heapPages(), { unknownPages: 12 }),
    region(0x7f00_0000_0000n, 2048, '', 'rw-p', 'added', Array.from({ length: 512 }, (_, i) => 0x7f00_0000_0000n + BigInt(i) * P)),
    region(0x7f00_1000_0000n, 64, HOSTILE, 'r--s', 'removed', [0x7f00_1000_0000n + 10n * P, 0x7f00_1000_0000n + 11n * P]),
    region(0x7f00_2000_0000n, 1024, '/dev/shm/buf (deleted)', 'rw-s', 'resized', Array.from({ length: 100 }, (_, i) => 0x7f00_2000_0000n + BigInt(900 + i) * P), { endInA: 0x7f00_2000_0000n + 512n * P }),
    { ...region(0x7f00_3000_0000n, 4096, '/tmp/cache', 'rw-p', 'changed', undefined), changedPages: 700, changedBytes: 2_000_000 },
    region(0x7ffc_0000_0000n, 33, '[stack]', 'rw-p', 'changed', [0x7ffc_0000_0000n + 32n * P]),
    region(0xffff_ffff_ff60_0000n, 1, '[vsyscall]', '--xp', 'same', []),
  ];
  const totals = { changedPages: 0, changedBytes: 0, unknownPages: 0 };
  for (const r of regions) {
    totals.changedPages += r.changedPages;
    totals.changedBytes += r.changedBytes;
    totals.unknownPages += r.unknownPages;
  }
  return {
    a: { id: 3, name: '<b>before</b>', pid: 4242, createdAt: '2025-01-02T03:04:05.000Z' },
    b: { id: 7, name: null, pid: 4242, createdAt: '2025-01-02T03:09:00.000Z' },
    regions,
    totals,
    method: 'hashes',
  };
}

/** The page offsets a [gap, length, …] run list names. */
function expand(runs: number[]): number[] {
  const out: number[] = [];
  let pos = 0;
  for (let i = 0; i < runs.length; i += 2) {
    pos += runs[i]!;
    for (let j = 0; j < runs[i + 1]!; j++) out.push(pos + j);
    pos += runs[i + 1]!;
  }
  return out;
}

describe('diffHtml: the page itself', () => {
  const diff = sampleDiff();
  const html = diffHtml(diff);

  it('is self-contained: no external reference, no external script, stylesheet, font or image', () => {
    expect(html).not.toMatch(/\b(?:src|href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:|\/\/)/i);
    expect(html).not.toMatch(/<script[^>]*\ssrc\s*=/i);
    expect(html).not.toMatch(/<link\b/i);
    expect(html).not.toMatch(/@import|url\(/i);
    expect(html).not.toMatch(/https?:\/\//i);
    expect(html).toMatch(/<meta http-equiv="Content-Security-Policy" content="default-src 'none';/);
  });

  it('escapes the hostile path and names everywhere', () => {
    expect(html).not.toContain(HOSTILE);
    expect(html).not.toMatch(/<img/i);
    expect(html).not.toContain('<b>before');
    expect(html).toContain('&lt;b&gt;before&lt;/b&gt;');
    expect(html).toContain('&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;');
    // The only "</script" are the two closing tags: the JSON block and the inline script.
    expect(html.match(/<\/script/gi)).toHaveLength(2);
    const json = new RegExp(`<script type="application/json" id="${DIFF_HTML_DATA_ID}">([^<]*)</script>`).exec(html);
    expect(json).not.toBeNull();
    expect(json![1]).toContain('\\u003c/script\\u003e\\u003cimg');
    const data = JSON.parse(json![1]!) as ReturnType<typeof diffHtmlData>;
    expect(data.regions.map((r) => r.path)).toContain(HOSTILE);
    expect(data.regions.at(-1)!.s).toBe('0xffffffffff600000');
  });

  it('names A, B, the totals and the method, and has a row per region', () => {
    expect(html).toContain('snapshot #3');
    expect(html).toContain('snapshot #7 <span class="muted">(unnamed)</span>, pid 4242, taken 2025-01-02T03:09:00.000Z');
    expect(html).toContain(`<b>${diff.totals.changedPages.toLocaleString('en-US')}</b> changed pages`);
    expect(html).toContain('hashes: content hashes');
    expect(html.match(/<tr class="st-/g)).toHaveLength(diff.regions.length);
    expect(html).toContain('<td class="addr">0x555556000000</td>');
  });

  it('encodes changed pages as run lengths, compactly and losslessly', () => {
    const heap = diff.regions[2]!;
    const runs = pageRuns(heap)!;
    expect(runs).toHaveLength(400);
    expect(expand(runs)).toEqual(heap.pages!.map((p) => Number((p - HEAP) / P)));
    expect(html.length).toBeLessThan(64 * 1024);
    // Disorder, repeats and pages outside the region are tolerated.
    const messy = region(0x1000n, 10, '', 'rw-p', 'changed', [0x5000n, 0x3000n, 0x3000n, 0x4000n, 0x0n, 0xb000n, 0x1000n]);
    expect(pageRuns(messy)).toEqual([0, 1, 1, 3]);
    expect(pageRuns(region(0x1000n, 10, '', 'rw-p', 'changed', undefined))).toBeNull();
    // A resized region that shrank: its strip spans A's longer range.
    expect(diffHtmlData(diff).regions[5]).toMatchObject({ st: 'resized', n: 1024, k: 512, a: '0x7f0020200000' });
  });
});

// ---- the browser part ---------------------------------------------------

/** .ci/run's line that installs chromium when it is missing (quoted in the failure message). */
function installLine(): string {
  const run = readFileSync(new URL('../.ci/run', import.meta.url), 'utf8');
  return run.split('\n').find((line) => line.includes('command -v chromium')) ?? '(the chromium line of .ci/run)';
}

function chromiumPath(): string {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    const candidate = join(dir, 'chromium');
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  throw new Error(`chromium is not installed: the browser test needs Debian's chromium. Run .ci/run's install line as root:\n  ${installLine()}`);
}

interface Run { code: number | null; stdout: string; stderr: string }

/** Runs chromium headless with its own profile; killed (by its process group, which it leads) after 90 s. */
function chromium(dir: string, profile: string, args: string[]): Promise<Run> {
  const flags = ['--headless=new', '--no-sandbox', '--disable-gpu', `--user-data-dir=${join(dir, profile)}`, '--no-first-run', '--no-default-browser-check',
    '--disable-background-networking', '--disable-component-update', '--disable-extensions', '--disable-sync', '--no-pings', '--hide-scrollbars',
    '--force-device-scale-factor=1', '--window-size=1200,900'];
  return new Promise((resolve, reject) => {
    const child = spawn(chromiumPath(), [...flags, ...args], { cwd: dir, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    }, 90_000);
    child.on('error', (err) => { clearTimeout(timer); reject(err); });
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
  });
}

interface Image { width: number; height: number; channels: number; pixels: Buffer }

/** A minimal PNG decoder: 8-bit RGB or RGBA, not interlaced; CRCs checked. */
function decodePng(png: Buffer): Image {
  expect(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), 'PNG signature').toBe(true);
  let width = 0;
  let height = 0;
  let channels = 0;
  const idat: Buffer[] = [];
  for (let at = 8; at < png.length; ) {
    const length = png.readUInt32BE(at);
    const type = png.toString('latin1', at + 4, at + 8);
    const body = png.subarray(at + 8, at + 8 + length);
    expect(crc32(png.subarray(at + 4, at + 8 + length)) >>> 0, `CRC of ${type}`).toBe(png.readUInt32BE(at + 8 + length));
    if (type === 'IHDR') {
      width = body.readUInt32BE(0);
      height = body.readUInt32BE(4);
      const [depth, colour, , , interlace] = [body[8], body[9], body[10], body[11], body[12]];
      expect({ depth, interlace }).toEqual({ depth: 8, interlace: 0 });
      expect([2, 6]).toContain(colour);
      channels = colour === 6 ? 4 : 3;
    } else if (type === 'IDAT') idat.push(body);
    else if (type === 'IEND') break;
    at += 12 + length;
  }
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  expect(raw.length).toBe(height * (stride + 1));
  const pixels = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)]!;
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const out = y * stride;
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? pixels[out + i - channels]! : 0; // left
      const b = y > 0 ? pixels[out - stride + i]! : 0; // up
      const c = y > 0 && i >= channels ? pixels[out - stride + i - channels]! : 0; // up-left
      let predicted: number;
      switch (filter) {
        case 0: predicted = 0; break;
        case 1: predicted = a; break;
        case 2: predicted = b; break;
        case 3: predicted = (a + b) >> 1; break;
        case 4: {
          const p = a + b - c;
          const pa = Math.abs(p - a);
          const pb = Math.abs(p - b);
          const pc = Math.abs(p - c);
          predicted = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
          break;
        }
        default: throw new Error(`PNG filter ${filter} on line ${y}`);
      }
      pixels[out + i] = (line[i]! + predicted) & 0xff;
    }
  }
  return { width, height, channels, pixels };
}

describe('diffHtml in a real browser (headless chromium)', () => {
  let dir = '';
  let report = '';
  const diff = sampleDiff();

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'wpsnap-diff-html-'));
    report = join(dir, 'report.html');
    // A report shows a process's memory layout: created 0600, like the CLI must.
    writeFileSync(report, diffHtml(diff), { mode: 0o600, flag: 'wx' });
  });
  afterAll(() => {
    if (dir !== '') rmSync(dir, { recursive: true, force: true });
  });

  it('is private: the temp directory is 0700 and the report 0600', () => {
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(statSync(report).mode & 0o777).toBe(0o600);
  });

  it('draws the strips (a screenshot with changed-page red and many colours), and the script runs to its end, zoom included', async () => {
    chromiumPath(); // fails with the install line when chromium is missing
    const url = pathToFileURL(report).href;
    const heapIndex = 2;
    const [shot, dom] = await Promise.all([
      chromium(dir, 'profile-shot', [`--screenshot=${join(dir, 'shot.png')}`, url]),
      chromium(dir, 'profile-dom', ['--dump-dom', `${url}#zoom=${heapIndex}:1395-1411`]),
    ]);
    expect(shot.code, shot.stderr.slice(-2000)).toBe(0);
    expect(dom.code, dom.stderr.slice(-2000)).toBe(0);

    const img = decodePng(readFileSync(join(dir, 'shot.png')));
    expect([img.width, img.height]).toEqual([1200, 900]);
    const red = [DIFF_HTML_COLORS.page.slice(1, 3), DIFF_HTML_COLORS.page.slice(3, 5), DIFF_HTML_COLORS.page.slice(5, 7)].map((h) => parseInt(h, 16));
    const colours = new Set<number>();
    let redPixels = 0;
    for (let i = 0; i < img.pixels.length; i += img.channels) {
      const [r, g, b] = [img.pixels[i]!, img.pixels[i + 1]!, img.pixels[i + 2]!];
      colours.add((r << 16) | (g << 8) | b);
      if (Math.abs(r - red[0]!) <= 4 && Math.abs(g - red[1]!) <= 4 && Math.abs(b - red[2]!) <= 4) redPixels++;
    }
    // The heap strip alone has 200 runs of 300 pages at ~180 pages a pixel: ≥ 1 full red column each, 20 px high.
    expect(redPixels).toBeGreaterThan(200 * 15);
    expect(colours.size).toBeGreaterThan(20);

    const html = dom.stdout;
    expect(html).toMatch(/<body[^>]* data-rendered="ok"/);
    expect(html).toContain(`data-regions="${diff.regions.length}"`);
    const located = diff.regions.reduce((sum, r) => sum + (r.pages?.length ?? 0), 0);
    expect(html).toContain(`data-changed-pages-drawn="${located}"`);
    expect(html.match(/<canvas data-region="\d+" width="\d+" height="22">/g)).toHaveLength(diff.regions.length);
    // The hostile path is text in the strip label the script built, never markup.
    expect(html).toContain('&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;');
    expect(html).not.toMatch(/<img/i);
    // The fragment zoomed the heap strip to 16 single pages, 1395..1411 (a run ends at 1400).
    expect(html).toContain('data-view="1395-1411"');
    expect(html).toContain(`<span class="addr">0x${(HEAP + 1395n * P).toString(16)}</span>`);
    expect(html).toContain(`16 of ${HEAP_PAGES.toLocaleString('en-US')} pages (×12500)`);
  });
});
