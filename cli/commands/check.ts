import { checkEnvironment } from '../../core/check.js';
import { WpsnapError } from '../../common/errors.js';
import { printJson, println, type CommandContext } from '../context.js';
import { defineCommand } from './types.js';

export const checkCommand = defineCommand({
  command: 'check',
  describe: 'Show what this kernel and these privileges allow, and why not where they do not',
  builder: (y) => y,
  async handler(args, ctx: CommandContext) {
    const report = checkEnvironment(ctx.binding);
    if (args.json) {
      printJson(ctx, report);
    } else {
      println(ctx.stdout, `kernel ${report.kernel}`);
      for (const item of report.items) {
        const mark = item.ok ? 'ok  ' : item.required ? 'FAIL' : 'no  ';
        println(ctx.stdout, `  ${mark} ${item.name}: ${item.detail}`);
      }
      println(ctx.stdout, report.canSnapshot ? 'wpsnap can snapshot processes here' : 'wpsnap cannot snapshot processes here');
    }
    if (!report.canSnapshot) {
      const failed = report.items.filter((i) => !i.ok && i.required).map((i) => `${i.name} (${i.detail})`);
      throw new WpsnapError('UNSUPPORTED_ENVIRONMENT', `cannot snapshot here: ${failed.join('; ')}`);
    }
  },
});
