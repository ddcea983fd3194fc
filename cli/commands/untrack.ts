import { KeeperLink, type KeeperStatus } from '../../core/keeper.js';
import { WpsnapError } from '../../common/errors.js';
import { positiveInteger } from '../args.js';
import { printJson, println, type CommandContext } from '../context.js';
import { defineCommand } from './types.js';

export const untrackCommand = defineCommand({
  command: 'untrack <pid>',
  describe: 'Stop tracking a process kept tracked by snapshot --track: its keeper unprotects it and ends',
  builder: (y) => y.positional('pid', { type: 'string', describe: 'the tracked process', demandOption: true, coerce: positiveInteger('a pid') }),
  async handler(args, ctx: CommandContext) {
    const link = await KeeperLink.connect(args.pid);
    if (link === undefined) throw new WpsnapError('NOT_TRACKED', `pid ${args.pid} is not tracked (wpsnap status lists what is)`);
    let reply: KeeperStatus;
    try {
      reply = (await link.request({ op: 'untrack' })) as unknown as KeeperStatus;
    } finally {
      link.close();
    }
    const result = { pid: args.pid, base: reply.base, since: reply.since, writtenPages: reply.writtenPages, keeperPid: reply.keeperPid };
    if (args.json) printJson(ctx, result);
    else println(ctx.stdout, `pid ${args.pid} untracked: ${reply.writtenPages} pages written since snapshot ${reply.base} (${reply.since}); keeper ${reply.keeperPid} ended`);
  },
});
