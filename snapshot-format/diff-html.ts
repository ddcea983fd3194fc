// `wpsnap diff --html`: the diff model (diff.ts) as ONE self-contained HTML
// page: inline CSS and JS only, no network (a Content-Security-Policy with the
// hashes of the page's own <style> and <script> forbids anything else), so it
// opens from file:// anywhere. Holds:
//   - a header naming A and B, the totals and the comparison method;
//   - one zoomable heat strip per region in address order, drawn on a <canvas>
//     by diff-html-script.ts from a JSON block (changed pages as run lengths);
//   - the regions table with the totals.
// Everything from the snapshot (paths, names, perms) is HTML-escaped in markup
// and \u-escaped in the JSON block, so no text can close a tag. The report
// shows addresses and page positions of a process's memory: whoever writes it
// to disk creates the file 0600.
import { createHash } from 'node:crypto';
import type { DiffRegion, DiffSide, DiffStatus, SnapshotDiff } from './diff.js';
import { DIFF_HTML_SCRIPT } from './diff-html-script.js';
import { formatAddress, PAGE_SIZE } from './model.js';

/** The report's colours: a neutral base per region status, changed pages in red. */
export const DIFF_HTML_COLORS: Readonly<Record<DiffStatus | 'page' | 'oneSide', string>> = {
  same: '#e4e4e4',
  changed: '#f2e6cc',
  added: '#cdeacd',
  removed: '#d3dbea',
  resized: '#e4d4ee',
  /** A changed page (or, in an added or removed region, a page with data). */
  page: '#d62728',
  /** The part of a resized region that only one of A and B maps. */
  oneSide: '#b9aac4',
};

/** The id of the JSON block the inline script reads. */
export const DIFF_HTML_DATA_ID = 'wpsnap-diff-data';

/** One region as the inline script reads it (bigints as "0x…" strings). */
export interface DiffHtmlRegion {
  /** start, end (B's; A's for a removed region), A's end for a resized one. */
  s: string;
  e: string;
  a?: string;
  st: DiffStatus;
  path: string;
  perms: string;
  /** Pages the strip spans: start .. max(end, endInA), rounded up to a page. */
  n: number;
  /** Pages from start that both A and B map (n unless resized). */
  k: number;
  c: number;
  cb: number;
  u: number;
  /** Changed pages as run lengths of page offsets from `s`: [gap, length, gap, length, …], the
   * first gap from offset 0, each next from the end of the run before; null when the diff
   * did not record page positions (then the strip shows their density spread evenly). */
  r: number[] | null;
}

export interface DiffHtmlData {
  pageSize: number;
  colors: typeof DIFF_HTML_COLORS;
  regions: DiffHtmlRegion[];
}

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/** Text for HTML content and quoted attribute values. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]!);
}

/** JSON safe inside a <script> element: no `<`, `>`, `&` or line separators appear raw. */
export function jsonForScript(value: unknown): string {
  return JSON.stringify(value).replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

const PAGE = BigInt(PAGE_SIZE);

function pagesBetween(start: bigint, end: bigint): number {
  return end <= start ? 0 : Number((end - start + PAGE - 1n) / PAGE);
}

/**
 * A region's changed pages as [gap, length, …] run lengths of page offsets
 * from its start (see DiffHtmlRegion.r). Pages outside the strip, unaligned
 * repeats and disorder are tolerated: offsets are sorted and deduplicated.
 */
export function pageRuns(region: DiffRegion): number[] | null {
  if (region.pages === undefined) return null;
  const n = pagesBetween(region.start, stripEnd(region));
  let offsets = region.pages.filter((p) => p >= region.start).map((p) => Number((p - region.start) / PAGE)).filter((o) => o < n);
  for (let i = 1; i < offsets.length; i++) {
    if (offsets[i]! <= offsets[i - 1]!) {
      offsets = [...new Set(offsets)].sort((x, y) => x - y);
      break;
    }
  }
  const runs: number[] = [];
  let next = 0; // the offset after the last run
  for (let i = 0; i < offsets.length; ) {
    let j = i + 1;
    while (j < offsets.length && offsets[j] === offsets[j - 1]! + 1) j++;
    runs.push(offsets[i]! - next, j - i);
    next = offsets[j - 1]! + 1;
    i = j;
  }
  return runs;
}

function stripEnd(region: DiffRegion): bigint {
  return region.endInA !== undefined && region.endInA > region.end ? region.endInA : region.end;
}

function htmlRegion(region: DiffRegion): DiffHtmlRegion {
  const commonEnd = region.endInA !== undefined && region.endInA < region.end ? region.endInA : region.end;
  const out: DiffHtmlRegion = {
    s: formatAddress(region.start),
    e: formatAddress(region.end),
    st: region.status,
    path: region.path,
    perms: region.perms,
    n: Math.max(1, pagesBetween(region.start, stripEnd(region))),
    k: pagesBetween(region.start, commonEnd),
    c: region.changedPages,
    cb: region.changedBytes,
    u: region.unknownPages,
    r: pageRuns(region),
  };
  if (region.endInA !== undefined) out.a = formatAddress(region.endInA);
  return out;
}

/** The data block the inline script draws from (exported for tests). */
export function diffHtmlData(diff: SnapshotDiff): DiffHtmlData {
  return { pageSize: PAGE_SIZE, colors: DIFF_HTML_COLORS, regions: diff.regions.map(htmlRegion) };
}

function count(n: number): string {
  return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** 1536 → "1.5 KiB". */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value >= 100 ? value.toFixed(0) : value.toFixed(1).replace(/\.0$/, '')} ${units[unit]}`;
}

function side(label: string, s: DiffSide): string {
  const name = s.name === null ? '<span class="muted">(unnamed)</span>' : `“${escapeHtml(s.name)}”`;
  return `<tr><th>${label}</th><td>snapshot #${s.id} ${name}, pid ${s.pid}, taken ${escapeHtml(s.createdAt)}</td></tr>`;
}

const METHOD: Record<SnapshotDiff['method'], string> = {
  hashes: 'content hashes of every page of both snapshots',
  'dirty-sets': 'the dirty sets stored along a generation chain',
};

function tableRow(region: DiffRegion): string {
  const size = formatSize(Number(region.end - region.start));
  const status = region.status === 'resized' && region.endInA !== undefined
    ? `resized <span class="muted">(A: to ${formatAddress(region.endInA)})</span>`
    : region.status;
  const path = region.path === '' ? '<span class="muted">(anonymous)</span>' : escapeHtml(region.path);
  return `<tr class="st-${region.status}"><td class="addr">${formatAddress(region.start)}</td><td class="addr">${formatAddress(region.end)}</td>`
    + `<td class="num">${size}</td><td class="path">${path}</td><td>${escapeHtml(region.perms)}</td><td class="status">${status}</td>`
    + `<td class="num">${count(region.changedPages)}</td><td class="num">${count(region.changedBytes)}</td><td class="num">${count(region.unknownPages)}</td></tr>`;
}

function css(): string {
  const statuses: DiffStatus[] = ['same', 'changed', 'added', 'removed', 'resized'];
  const status = statuses.map((k) => `.st-${k} td.status{background:${DIFF_HTML_COLORS[k]}}`).join('\n');
  return `
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:12px 16px;color:#222;background:#fafafa}
h1{font-size:17px;margin:0 0 6px}h2{font-size:15px;margin:14px 0 6px}
.muted{color:#777}.addr,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
table.sides th{text-align:left;padding-right:10px;font-weight:600}table.sides td{padding:1px 0}
.totals{margin:6px 0}.totals b{font-size:14px}
#legend{display:flex;flex-wrap:wrap;gap:12px;margin:4px 0 8px}#legend span.sw{display:inline-block;width:14px;height:10px;border:1px solid #999;margin-right:4px;vertical-align:-1px}
.strip{margin:0 0 6px}.strip .lab{display:flex;gap:8px;align-items:baseline;white-space:nowrap;overflow:hidden}
.strip .lab .text{overflow:hidden;text-overflow:ellipsis;flex:1}.strip .lab button{font-size:11px;padding:0 5px}
.strip canvas{display:block;width:100%;height:22px;border:1px solid #bbb;box-sizing:border-box;cursor:zoom-in;background:#fff}
.strip .view{display:flex;justify-content:space-between;color:#666;font-size:11px}.strip .info{color:#333}
table.regions{border-collapse:collapse;width:100%}table.regions th,table.regions td{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left}
table.regions td.num,table.regions th.num{text-align:right;white-space:nowrap}table.regions td.path{word-break:break-all}table.regions tfoot td{font-weight:600;border-top:2px solid #999}
${status}`;
}

function sha256(text: string): string {
  return `'sha256-${createHash('sha256').update(text, 'utf8').digest('base64')}'`;
}

/** The whole report: one HTML page that needs nothing but a browser. */
export function diffHtml(diff: SnapshotDiff): string {
  const style = css();
  const script = DIFF_HTML_SCRIPT;
  const policy = `default-src 'none'; style-src ${sha256(style)}; script-src ${sha256(script)}; img-src 'none'; form-action 'none'; base-uri 'none'`;
  const t = diff.totals;
  const title = `wpsnap diff #${diff.a.id} → #${diff.b.id}`;
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${policy}">
<meta name="referrer" content="no-referrer">
<title>${escapeHtml(title)}</title>
<style>${style}</style>
</head>
<body>
<h1>${escapeHtml(title)}</h1>
<table class="sides">
${side('A', diff.a)}
${side('B', diff.b)}
<tr><th>Method</th><td>${escapeHtml(diff.method)}: ${METHOD[diff.method]}</td></tr>
</table>
<p class="totals"><b>${count(t.changedPages)}</b> changed pages (${formatSize(t.changedPages * PAGE_SIZE)}),
<b>${count(t.changedBytes)}</b> changed bytes, <b>${count(t.unknownPages)}</b> unknown pages, in ${count(diff.regions.length)} regions.</p>
<h2>Address space</h2>
<p class="muted">One strip per region of A or B, in address order; red marks changed pages (darker where a pixel holds more of them).
Click a strip to zoom in ×8 there, drag across it to zoom to that range (down to single pages); − zooms out, reset goes back.</p>
<div id="legend"></div>
<div id="strips"><noscript>The strips are drawn by the page's inline script; the table below holds the same figures.</noscript></div>
<h2>Regions</h2>
<table class="regions">
<thead><tr><th>start</th><th>end</th><th class="num">size</th><th>path</th><th>perms</th><th>status</th><th class="num">changed pages</th><th class="num">changed bytes</th><th class="num">unknown pages</th></tr></thead>
<tbody>
${diff.regions.map(tableRow).join('\n')}
</tbody>
<tfoot><tr><td colspan="6">total</td><td class="num">${count(t.changedPages)}</td><td class="num">${count(t.changedBytes)}</td><td class="num">${count(t.unknownPages)}</td></tr></tfoot>
</table>
<script type="application/json" id="${DIFF_HTML_DATA_ID}">${jsonForScript(diffHtmlData(diff))}</script>
<script>${script}</script>
</body>
</html>
`;
}
