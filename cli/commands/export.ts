import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { exportCore } from '../../snapshot-format/export-core.js';
import { exportRaw } from '../../snapshot-format/export-raw.js';
import { usageError, WpsnapError } from '../../common/errors.js';
import { positiveInteger } from '../args.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes } from '../format.js';
import { defineCommand } from './types.js';

/** An interrupted export leaves no partial files: the directory as export found it (gone, or emptied). */
function removePartialExport(out: string, existed: boolean): void {
  if (!existed) {
    rmSync(out, { recursive: true, force: true });
    return;
  }
  for (const name of readdirSync(out)) rmSync(join(out, name), { recursive: true, force: true });
}

/** A word for a shell command line: as is when it is plain, else single-quoted. */
function shellWord(word: string): string {
  return /^[\w./:@%+=,-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

export const exportCommand = defineCommand({
  command: 'export <snapshot>',
  describe: 'Write a snapshot out: --format raw gives one file per memory region plus manifest.json; --format core an ELF core file of one process for gdb',
  builder: (y) =>
    y
      .positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true })
      .option('format', { type: 'string', choices: ['raw', 'core'], default: 'raw', describe: 'output format' })
      .option('out', {
        type: 'string',
        describe: 'raw: a new or empty directory; core: a new file',
        demandOption: 'export needs --out DIR',
      })
      .option('pid', { type: 'string', describe: 'core: the process (when the snapshot holds several)', coerce: positiveInteger('a pid') })
      .option('all', { type: 'boolean', default: false, describe: "core: every region's content, unfiltered" })
      .option('force', { type: 'boolean', default: false, describe: 'core: replace an existing --out file' })
      .option('allow-incomplete', { type: 'boolean', default: false, describe: 'export an incomplete snapshot (unsaved pages read as zero)' }),
  async handler(args, ctx: CommandContext) {
    if (args.format !== 'core') {
      const coreOnly = [args.pid !== undefined ? '--pid' : null, args.all ? '--all' : null, args.force ? '--force' : null].filter((o) => o !== null);
      if (coreOnly.length > 0) throw usageError(`${coreOnly.join(', ')} ${coreOnly.length === 1 ? 'applies' : 'apply'} to --format core only`);
    }
    const store = await ctx.openStore(args.store, { readonly: true });
    const existed = existsSync(args.out);
    try {
      if (args.format === 'core') {
        const result = await exportCore(store, args.snapshot, args.out, {
          ...(args.pid === undefined ? {} : { pid: args.pid }),
          all: args.all,
          force: args.force,
          allowIncomplete: args.allowIncomplete,
          signal: ctx.signal,
        });
        if (args.json) printJson(ctx, result);
        else {
          for (const warning of result.warnings) ctx.stderr.write(`wpsnap: warning: ${warning}\n`);
          println(
            ctx.stdout,
            `snapshot ${result.id}, pid ${result.pid}: core written to ${result.path} (${bytes(result.bytes)}, ${result.segments} segments, ${result.threads} threads); open it with: gdb ${shellWord(result.exe)} ${shellWord(result.path)}`,
          );
        }
        return;
      }
      const result = await exportRaw(store, args.snapshot, args.out, { allowIncomplete: args.allowIncomplete, signal: ctx.signal });
      if (args.json) printJson(ctx, result);
      else println(ctx.stdout, `snapshot ${result.snapshot} exported to ${result.outDir}: ${result.files} region files, ${bytes(result.bytes)}`);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === 'INTERRUPTED' && args.format === 'raw') removePartialExport(args.out, existed);
      if (code === 'SNAPSHOT_INCOMPLETE') {
        const snap = store.find(args.snapshot);
        throw new WpsnapError('SNAPSHOT_INCOMPLETE', `snapshot ${snap.id} is ${snap.state}, not complete: add --allow-incomplete to export it anyway (unsaved pages read as zero)`, {
          cause: error,
        });
      }
      throw error;
    } finally {
      await store.close();
    }
  },
});
