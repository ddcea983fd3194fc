import { printJson, println, type CommandContext } from '../context.js';
import { bytes } from '../format.js';
import { defineCommand } from './types.js';

export const rmCommand = defineCommand({
  command: 'rm <snapshot>',
  describe: 'Delete a snapshot and the stored pages no other snapshot shares',
  builder: (y) =>
    y
      .positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true })
      .option('force', { type: 'boolean', default: false, describe: 'also when later generations depend on it: its pages are folded into them' }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store);
    try {
      const snap = store.find(args.snapshot);
      const { blobsDeleted, bytesFreed, folded } = store.delete(snap.id, { force: args.force });
      if (args.json) {
        printJson(ctx, { snapshot: snap.id, name: snap.name, state: snap.state, blobsDeleted, bytesFreed, folded });
      } else {
        const named = snap.name === null ? '' : ` (${snap.name})`;
        const into = folded.length === 0 ? '' : `, its pages folded into generation${folded.length > 1 ? 's' : ''} ${folded.join(', ')}`;
        println(ctx.stdout, `deleted snapshot ${snap.id}${named}, ${snap.state}${into}; ${blobsDeleted} blob(s) of pages no other snapshot uses dropped (${bytes(bytesFreed)})`);
      }
    } finally {
      await store.close();
    }
  },
});
