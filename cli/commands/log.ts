import { printJson, println, type CommandContext } from '../context.js';
import { bytes, table } from '../format.js';
import { defineCommand } from './types.js';

export const logCommand = defineCommand({
  command: 'log <snapshot>',
  describe: 'The chain of generations a snapshot belongs to: its parents, itself and the generations taken from it',
  builder: (y) => y.positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      const snap = store.find(args.snapshot);
      const chain = store.chain(snap.id);
      if (args.json) {
        printJson(ctx, {
          snapshot: snap.id,
          chain: chain.map((s) => ({ id: s.id, name: s.name, state: s.state, createdAt: s.createdAt, parent: s.parentId, incremental: s.incremental, generation: s.stats?.generation ?? null })),
        });
        return;
      }
      const rows = [['', 'ID', 'NAME', 'STATE', 'CREATED', 'PARENT', 'KIND', 'CHANGED', 'STORED']];
      for (const s of chain) {
        const g = s.stats?.generation;
        rows.push([
          s.id === snap.id ? '*' : '',
          String(s.id),
          s.name ?? '-',
          s.state,
          s.createdAt.replace('T', ' ').replace(/\.\d+Z$/, 'Z'),
          s.parentId === null ? '-' : String(s.parentId),
          s.incremental ?? 'full',
          g ? `${g.changedPages} pages` : '-',
          g ? `${g.pagesStored} pages` : s.stats ? `${s.stats.pagesSaved} pages, ${bytes(s.stats.bytesStored)}` : '-',
        ]);
      }
      println(ctx.stdout, table(rows));
    } finally {
      await store.close();
    }
  },
});
