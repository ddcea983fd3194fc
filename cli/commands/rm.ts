import { printJson, println, type CommandContext } from '../context.js';
import { defineCommand } from './types.js';

export const rmCommand = defineCommand({
  command: 'rm <snapshot>',
  describe: 'Delete a snapshot and the stored pages no other snapshot shares',
  builder: (y) => y.positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store);
    try {
      const snap = store.find(args.snapshot);
      const { blobsDeleted } = store.delete(snap.id);
      if (args.json) {
        printJson(ctx, { snapshot: snap.id, name: snap.name, state: snap.state, blobsDeleted });
      } else {
        const named = snap.name === null ? '' : ` (${snap.name})`;
        println(ctx.stdout, `deleted snapshot ${snap.id}${named}, ${snap.state}; ${blobsDeleted} blob(s) of pages no other snapshot uses dropped`);
      }
    } finally {
      await store.close();
    }
  },
});
