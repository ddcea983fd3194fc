import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { exportRaw } from '../../snapshot-format/export-raw.js';
import { WpsnapError } from '../../common/errors.js';
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

export const exportCommand = defineCommand({
  command: 'export <snapshot>',
  describe: 'Write a snapshot out: --format raw gives one file per memory region plus manifest.json',
  builder: (y) =>
    y
      .positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true })
      .option('format', { type: 'string', choices: ['raw'], default: 'raw', describe: 'output format' })
      .option('out', { type: 'string', describe: 'output directory (created; must be empty)', demandOption: 'export needs --out DIR' })
      .option('allow-incomplete', { type: 'boolean', default: false, describe: 'export an incomplete snapshot (unsaved pages read as zero)' }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store, { readonly: true });
    const existed = existsSync(args.out);
    try {
      const result = await exportRaw(store, args.snapshot, args.out, { allowIncomplete: args.allowIncomplete, signal: ctx.signal });
      if (args.json) printJson(ctx, result);
      else println(ctx.stdout, `snapshot ${result.snapshot} exported to ${result.outDir}: ${result.files} region files, ${bytes(result.bytes)}`);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === 'INTERRUPTED') removePartialExport(args.out, existed);
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
