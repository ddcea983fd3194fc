import { WpsnapError } from '../../common/errors.js';
import { printJson, println, type CommandContext } from '../context.js';
import { defineCommand } from './types.js';
import { unlessAborted } from '../interrupt.js';

export const verifyCommand = defineCommand({
  command: 'verify <snapshot>',
  describe: 'Re-read every stored page of a snapshot and check it against its content hash',
  builder: (y) => y.positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      const snap = store.find(args.snapshot);
      const report = await unlessAborted(ctx.signal, `verify of snapshot ${snap.id}`, () => store.verify(snap.id));
      const problems = [...report.problems];
      if (snap.state !== 'complete') problems.unshift(`snapshot ${snap.id} is ${snap.state}, not complete`);
      const ok = report.ok && snap.state === 'complete';
      if (args.json) {
        printJson(ctx, { snapshot: snap.id, state: snap.state, ok, pagesChecked: report.pagesChecked, problems });
      } else {
        println(ctx.stdout, `snapshot ${snap.id}: ${report.pagesChecked} stored pages checked, ${ok ? 'all good' : `${problems.length} problem(s)`}`);
        for (const p of problems.slice(0, 50)) println(ctx.stdout, `  ${p}`);
        if (problems.length > 50) println(ctx.stdout, `  … ${problems.length - 50} more`);
      }
      if (!ok) {
        throw new WpsnapError('VERIFY_FAILED', `snapshot ${snap.id} failed verification: ${problems[0] ?? 'unknown problem'}`);
      }
    } finally {
      await store.close();
    }
  },
});
