import { listKeepers } from '../../core/keeper.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes, table } from '../format.js';
import { defineCommand } from './types.js';

export const statusCommand = defineCommand({
  command: 'status',
  describe: 'The processes kept tracked after a snapshot --track: since which snapshot, how much they wrote since, and their keepers',
  builder: (y) => y,
  async handler(args, ctx: CommandContext) {
    const keepers = await listKeepers();
    if (args.json) {
      printJson(ctx, { tracking: keepers });
      return;
    }
    if (keepers.length === 0) {
      println(ctx.stdout, 'no process is tracked (wpsnap snapshot PID --track tracks one)');
      return;
    }
    const rows = [['PID', 'SINCE', 'BASE', 'STORE', 'WRITTEN', 'STATE', 'KEEPER', 'KEEPER RSS']];
    for (const k of keepers) {
      rows.push([
        String(k.pid),
        k.since === null ? '-' : k.since.replace('T', ' ').replace(/\.\d+Z$/, 'Z'),
        k.base === null ? '-' : `snapshot ${k.base}`,
        k.store ?? '-',
        `${k.writtenPages} pages`,
        k.state,
        String(k.keeperPid),
        bytes(k.keeperRssBytes),
      ]);
    }
    println(ctx.stdout, table(rows));
  },
});
