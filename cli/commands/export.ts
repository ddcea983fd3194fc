import { exportRaw } from '../../snapshot-format/export-raw.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes } from '../format.js';
import type { CommandSpec } from './types.js';

interface ExportArgs {
  snapshot: string;
  format: string;
  out: string;
  allowIncomplete: boolean;
}

export const exportCommand: CommandSpec<ExportArgs> = {
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
    try {
      const result = await exportRaw(store, args.snapshot, args.out, { allowIncomplete: args.allowIncomplete });
      if (args.json) printJson(ctx, result);
      else println(ctx.stdout, `snapshot ${result.snapshot} exported to ${result.outDir}: ${result.files} region files, ${bytes(result.bytes)}`);
    } finally {
      await store.close();
    }
  },
};
