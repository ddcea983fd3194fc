import { rollback } from '../../core/rollback.js';
import { positiveInteger } from '../args.js';
import { printJson, println, type CommandContext } from '../context.js';
import { micros } from '../format.js';
import { defineCommand } from './types.js';

export const rollbackCommand = defineCommand({
  command: 'rollback <snapshot>',
  describe: 'Roll the live process of a snapshot (or --pid another of the same program) back to the snapshot\'s instant, in place',
  builder: (y) =>
    y
      .positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true })
      .option('pid', { type: 'string', describe: 'roll this live process back instead (the same program and layout)', coerce: positiveInteger('a pid') })
      .option('incremental', {
        type: 'boolean',
        default: false,
        describe: 'rewrite only the pages written since the snapshot (or the last rollback), as tracked since a snapshot --track of it, and keep tracking',
      }),
  async handler(args, ctx: CommandContext) {
    const binding = ctx.binding();
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      const result = await rollback(binding, store, args.snapshot, { incremental: args.incremental, ...(args.pid === undefined ? {} : { pid: args.pid }) });
      if (args.json) {
        printJson(ctx, result);
        return;
      }
      println(
        ctx.stdout,
        `pid ${result.pid} rolled back to snapshot ${result.id}${result.incremental ? ' (incremental)' : ''}: ${result.pagesWritten} of ${result.pagesCompared} pages written back, ` +
          `${result.mappingsRepaired} mappings repaired, ${result.threadsRestored} threads restored, ${result.threadsExited} exited; stopped ${micros(result.micros)}`,
      );
      for (const w of result.warnings) println(ctx.stdout, `  WARNING: ${w}`);
    } finally {
      await store.close();
    }
  },
});
