// wpsnap diff <a> <b>: what changed between two snapshots (store/diff.ts), as
// a table, JSON, one page's bytes side by side, or a self-contained HTML page.
import { closeSync, fchmodSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { WpsnapError, usageError } from '../../common/errors.js';
import type { SnapshotDiff } from '../../snapshot-format/diff.js';
import { diffHtml } from '../../snapshot-format/diff-html.js';
import { diffSnapshots, pagesAt } from '../../store/diff.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes, table } from '../format.js';
import { defineCommand } from './types.js';

const hex = (v: bigint): string => `0x${v.toString(16)}`;

function side(s: SnapshotDiff['a']): string {
  return `snapshot ${s.id}${s.name ? ` (${s.name})` : ''} of pid ${s.pid}, ${s.createdAt}`;
}

export function diffLines(diff: SnapshotDiff, withPages: boolean): string[] {
  const lines = [`A: ${side(diff.a)}`, `B: ${side(diff.b)}`, ''];
  const shown = diff.regions.filter((r) => r.status !== 'same');
  if (shown.length === 0) {
    lines.push('no difference: every page compared is the same');
  } else {
    const rows = [['RANGE', 'STATUS', 'CHANGED', 'BYTES', 'UNKNOWN', 'MAPPING']];
    for (const r of shown) {
      const range = r.status === 'resized' ? `${r.start.toString(16)}-${r.endInA!.toString(16)}→${r.end.toString(16)}` : `${r.start.toString(16)}-${r.end.toString(16)}`;
      rows.push([range, r.status, `${r.changedPages} pages`, bytes(r.changedBytes), r.unknownPages ? `${r.unknownPages} pages` : '-', r.path || '[anon]']);
    }
    lines.push(table(rows));
    if (withPages) {
      for (const r of shown) {
        if (!r.pages?.length) continue;
        lines.push('', `${r.start.toString(16)}-${r.end.toString(16)} ${r.path || '[anon]'}: ${r.pages.length} changed pages`);
        for (let i = 0; i < r.pages.length; i += 4) lines.push('  ' + r.pages.slice(i, i + 4).map(hex).join('  '));
      }
    }
  }
  const same = diff.regions.length - shown.length;
  lines.push(
    '',
    `total: ${diff.totals.changedPages} pages changed, ${bytes(diff.totals.changedBytes)} of bytes differ` +
      (diff.totals.unknownPages ? `, ${diff.totals.unknownPages} pages not known in one of them (lost, or a file changed since)` : '') +
      `; ${same} region${same === 1 ? '' : 's'} the same`,
  );
  return lines;
}

/** The 16-byte rows of one page that differ: offset, A's bytes, B's bytes. */
export function byteRows(a: Buffer, b: Buffer): Array<{ offset: number; a: string; b: string }> {
  const rows: Array<{ offset: number; a: string; b: string }> = [];
  for (let off = 0; off < a.length; off += 16) {
    const ra = a.subarray(off, off + 16);
    const rb = b.subarray(off, off + 16);
    if (!ra.equals(rb)) rows.push({ offset: off, a: ra.toString('hex').replace(/(..)/g, '$1 ').trim(), b: rb.toString('hex').replace(/(..)/g, '$1 ').trim() });
  }
  return rows;
}

function parseAddress(raw: string): bigint {
  const text = raw.trim();
  if (!/^(0x[0-9a-f]+|\d+)$/i.test(text)) throw usageError(`--bytes must be a page address such as 0x7f0000001000, not ${JSON.stringify(raw)}`);
  return BigInt(text);
}

/** Write `content` to `file` 0600, replacing it whole: a temporary file next to it, renamed over it. */
function writePrivate(file: string, content: string): void {
  const temp = join(dirname(file), `.${basename(file)}.${process.pid}.tmp`);
  let fd: number;
  try {
    fd = openSync(temp, 'wx', 0o600);
  } catch (error) {
    throw new WpsnapError('EXPORT_IO', `create ${temp}: ${(error as Error).message}`);
  }
  try {
    fchmodSync(fd, 0o600);
    writeSync(fd, content);
    closeSync(fd);
    renameSync(temp, file);
  } catch (error) {
    rmSync(temp, { force: true });
    throw new WpsnapError('EXPORT_IO', `write ${file}: ${(error as Error).message}`);
  }
}

export const diffCommand = defineCommand({
  command: 'diff <a> <b>',
  describe: 'What changed between two snapshots: regions added, removed, resized, changed pages and bytes',
  builder: (y) =>
    y
      .positional('a', { type: 'string', describe: 'the earlier snapshot (id or name)', demandOption: true })
      .positional('b', { type: 'string', describe: 'the later snapshot (id or name)', demandOption: true })
      .option('pages', { type: 'boolean', default: false, describe: 'list the changed pages of each region' })
      .option('bytes', { type: 'string', describe: 'show the bytes of one page (ADDR) that differ, A beside B' })
      .option('html', { type: 'string', describe: 'also write a self-contained HTML report to FILE (private, 0600)' }),
  async handler(args, ctx: CommandContext) {
    const address = args.bytes === undefined ? undefined : parseAddress(args.bytes);
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      if (address !== undefined) {
        const pages = pagesAt(store, args.a, args.b, address);
        const rows = byteRows(pages.a, pages.b);
        if (args.json) {
          printJson(ctx, { a: store.find(args.a).id, b: store.find(args.b).id, address, differingBytes: rows.length === 0 ? 0 : [...pages.a].filter((v, i) => v !== pages.b[i]).length, rows });
          return;
        }
        println(ctx.stdout, `page 0x${address.toString(16)}: ${rows.length === 0 ? 'the same in both' : `${rows.length} of 256 rows differ`}`);
        for (const r of rows) {
          println(ctx.stdout, `  +${r.offset.toString(16).padStart(3, '0')}  A ${r.a}`);
          println(ctx.stdout, `        B ${r.b}`);
        }
        return;
      }
      const diff = diffSnapshots(store, args.a, args.b, { pages: args.pages || args.html !== undefined });
      if (args.html !== undefined) writePrivate(args.html, diffHtml(diff));
      if (args.json) {
        const regions = diff.regions.map((r) => (args.pages ? r : (({ pages: _p, ...rest }) => rest)(r)));
        printJson(ctx, { ...diff, regions });
        return;
      }
      for (const line of diffLines(diff, args.pages)) println(ctx.stdout, line);
      if (args.html !== undefined) println(ctx.stdout, `report: ${args.html}`);
    } finally {
      await store.close();
    }
  },
});
