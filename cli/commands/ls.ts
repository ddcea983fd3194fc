import { printJson, println, type CommandContext } from '../context.js';
import { bytes, table } from '../format.js';
import { defineCommand } from './types.js';

export const lsCommand = defineCommand({
  command: 'ls',
  describe: 'List the snapshots in the store',
  builder: (y) => y,
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      const snapshots = store.list();
      if (args.json) {
        printJson(ctx, { store: store.path, snapshots });
        return;
      }
      if (snapshots.length === 0) {
        println(ctx.stdout, `no snapshots in ${store.path}`);
        return;
      }
      const rows = [['ID', 'NAME', 'STATE', 'CREATED', 'PIDS', 'PAUSE', 'PAGES', 'STORED']];
      for (const s of snapshots) {
        // Recorded right after the pause, so an incomplete snapshot has it too; older stores have it in stats only.
        const pauseMicros = s.pauseMicros ?? s.stats?.pauseMicros;
        rows.push([
          String(s.id),
          s.name ?? '-',
          s.state,
          s.createdAt.replace('T', ' ').replace(/\.\d+Z$/, 'Z'),
          s.pids.join(','),
          pauseMicros === undefined ? '-' : `${(pauseMicros / 1000).toFixed(1)}ms`,
          s.stats ? String(s.stats.pagesSaved) : '-',
          s.stats ? bytes(s.stats.bytesStored) : '-',
        ]);
      }
      println(ctx.stdout, table(rows));
    } finally {
      await store.close();
    }
  },
});
