import { removeStaleStaging } from '../../core/staging.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes } from '../format.js';
import { defineCommand } from './types.js';

export const gcCommand = defineCommand({
  command: 'gc',
  describe: 'Reclaim stored pages no snapshot uses, and staging left by wpsnap runs that died',
  builder: (y) => y,
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store);
    try {
      const freed = store.gc();
      const staging = removeStaleStaging(store.stagingDir);
      if (args.json) {
        printJson(ctx, { store: store.path, ...freed, stagingRemoved: staging });
        return;
      }
      if (freed.skipped !== null) println(ctx.stdout, `no page data collected: ${freed.skipped}`);
      else println(ctx.stdout, `${freed.blobsDeleted} blob(s) of pages no snapshot uses dropped (${bytes(freed.bytesFreed)}); the file keeps the space for later snapshots`);
      for (const dir of staging) println(ctx.stdout, `removed staging left by a wpsnap that died: ${dir}`);
    } finally {
      await store.close();
    }
  },
});
