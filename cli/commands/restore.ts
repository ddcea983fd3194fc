import { WpsnapError } from '../../common/errors.js';
import { restore } from '../../core/restore.js';
import { restoreLazy } from '../../core/restore-lazy.js';
import { planRestore, type FdFate, type StdioChoice } from '../../core/restore-plan.js';
import { positiveInteger } from '../args.js';
import { printJson, println, type CommandContext } from '../context.js';
import { defineCommand } from './types.js';

function stdioChoice(raw: string | undefined, isTty: boolean): StdioChoice {
  if (raw === undefined) return isTty ? 'inherit' : 'null';
  if (raw === 'inherit' || raw === 'null') return raw;
  if (raw === '') throw new WpsnapError('USAGE', '--stdio takes inherit, null or a file path');
  return { file: raw };
}

function fdLine(f: FdFate): string {
  return `  fd ${String(f.fd).padStart(3)} ${f.kind.padEnd(8)} ${f.restored ? 'restored' : 'NOT restored'}: ${f.note}`;
}

export const restoreCommand = defineCommand({
  command: 'restore <snapshot>',
  describe: 'Run a snapshot again as a new process, from its instant (by default at its pid of then, in a new PID namespace)',
  builder: (y) =>
    y
      .positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true })
      .option('lazy', { type: 'boolean', default: false, describe: 'start at once; anonymous memory is filled from the store on first touch (userfaultfd), the rest in the background' })
      .option('detach', { type: 'boolean', default: false, describe: 'with --lazy: hand the page serving to a background process and return at once' })
      .option('stdio', { type: 'string', describe: 'what the process\'s stdio (pipes, terminals and sockets to other processes) becomes: inherit, null or a file (default: inherit on a terminal, else null)' })
      .option('dry-run', { type: 'boolean', default: false, describe: 'say what would be restored and what cannot be; start nothing' })
      .option('new-ids', { type: 'boolean', default: false, describe: 'no new PID namespace: the process gets a new pid and tids (what relies on them may break)' })
      .option('skip-fd', { type: 'array', string: true, default: [] as string[], describe: 'do not re-create this fd (closed in the restored process); repeatable' })
      .option('close-unsupported', { type: 'boolean', default: false, describe: 'close the fds that cannot be restored instead of refusing' }),
  async handler(args, ctx: CommandContext) {
    const skipFds = (args.skipFd as string[]).map((v) => positiveInteger('an fd number')(v === '0' ? '0' : v));
    if (args.detach && !args.lazy) throw new WpsnapError('USAGE', '--detach goes with --lazy (an eager restore returns once the process runs)');
    const options = {
      newIds: args.newIds,
      skipFds,
      closeUnsupported: args.closeUnsupported,
      stdio: stdioChoice(args.stdio, process.stdout.isTTY === true && process.stdin.isTTY === true),
      lazy: args.lazy,
    };
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      if (args.dryRun) {
        const plan = planRestore(store, args.snapshot, options);
        if (args.json) {
          printJson(ctx, { id: plan.snapshotId, pid: plan.process.pid, restorable: plan.refusals.length === 0, refusals: plan.refusals, fds: plan.fds, warnings: plan.warnings, threads: plan.threads.length, regions: plan.regions.length });
        } else {
          println(ctx.stdout, `snapshot ${plan.snapshotId}: pid ${plan.process.pid} (${plan.process.exe}), ${plan.threads.length} thread${plan.threads.length === 1 ? '' : 's'}, ${plan.regions.length} mappings`);
          for (const f of plan.fds) println(ctx.stdout, fdLine(f));
          for (const w of plan.warnings) println(ctx.stdout, `  WARNING: ${w}`);
          for (const r of plan.refusals) println(ctx.stdout, `  CANNOT: ${r}`);
          println(ctx.stdout, plan.refusals.length === 0 ? 'it can be restored' : 'it cannot be restored as it is');
        }
        if (plan.refusals.length > 0) throw new WpsnapError('RESTORE_REFUSED', `snapshot ${plan.snapshotId} cannot be restored: ${plan.refusals[0]}`);
        return;
      }
      const binding = ctx.binding();
      if (args.lazy) {
        const result = await restoreLazy(binding, store, args.snapshot, { ...options, detach: args.detach });
        if (args.json) {
          printJson(ctx, result);
          return;
        }
        println(ctx.stdout, `restored snapshot ${result.id} lazily as pid ${result.pid}${result.pidNamespace ? ` (pid ${result.nsPid} in its own PID namespace)` : ''}: running after ${result.lazy.firstInstructionMillis} ms`);
        if (result.lazy.allInMillis !== null) {
          println(ctx.stdout, `  every page in after ${result.lazy.allInMillis} ms: ${result.lazy.pagesOnDemand} on demand (fault p50 ${result.lazy.faultP50Micros} µs, p99 ${result.lazy.faultP99Micros} µs), ${result.lazy.pagesPrefetched} in the background`);
        } else {
          println(ctx.stdout, `  pages are served in the background by pid ${result.lazy.serverPid ?? '?'}`);
        }
        for (const f of result.fds.filter((x) => !x.restored)) println(ctx.stdout, fdLine(f));
        for (const w of result.warnings) println(ctx.stdout, `  WARNING: ${w}`);
        return;
      }
      const result = await restore(binding, store, args.snapshot, options);
      if (args.json) {
        printJson(ctx, result);
        return;
      }
      println(ctx.stdout, `restored snapshot ${result.id} as pid ${result.pid}${result.pidNamespace ? ` (pid ${result.nsPid} in its own PID namespace)` : ''}: ${result.threads} thread${result.threads === 1 ? '' : 's'}, ${result.pagesWritten} pages, running after ${result.millis} ms`);
      for (const f of result.fds.filter((x) => !x.restored || x.note.includes('replaced') || x.note.includes('--stdio'))) println(ctx.stdout, fdLine(f));
      for (const w of result.warnings) println(ctx.stdout, `  WARNING: ${w}`);
    } finally {
      await store.close();
    }
  },
});
