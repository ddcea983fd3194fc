import { refuseIfTracked } from '../../core/keeper.js';
// wpsnap precopy <pid>: copy a running process round after round until the
// rest fits --max-pause, then take that rest with every thread stopped
// (core/precopy.ts). The result is a generation chain; its last one is exact.
import { precopy, DEFAULT_MAX_ROUNDS, type PrecopyRound } from '../../core/precopy.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes } from '../format.js';
import { durationOption, positiveInteger } from '../args.js';
import { defineCommand } from './types.js';

function roundLine(r: PrecopyRound): string {
  const rate = r.round === 0 ? '' : `, written meanwhile at ${r.dirtyPagesPerSec} pages/s`;
  return `round ${r.round}: ${r.pages} pages (${bytes(r.bytes)}) in ${r.millis} ms${rate} -> generation ${r.generation}`;
}

export const precopyCommand = defineCommand({
  command: 'precopy <pid>',
  describe: 'Copy a running process in rounds (only what it wrote since, each time), then stop it once for the rest',
  builder: (y) =>
    y
      .positional('pid', { type: 'string', describe: 'process to copy', demandOption: true, coerce: positiveInteger('a pid') })
      .option('max-pause', { type: 'string', default: '20ms', describe: 'the final stop must fit this (500us, 20ms, 1s…)', coerce: durationOption('max-pause') })
      .option('max-rounds', { type: 'string', default: String(DEFAULT_MAX_ROUNDS), describe: 'rounds at most before the final stop', coerce: positiveInteger('a count for --max-rounds') })
      .option('tracker', { choices: ['async', 'sync'] as const, default: 'async' as const, describe: 'how writes are tracked between rounds (see wpsnap track)' })
      .option('name', { type: 'string', describe: 'a name for the last generation' }),
  async handler(args, ctx: CommandContext) {
    const binding = ctx.binding();
    await refuseIfTracked(args.pid, 'precopy');
    const store = await ctx.openStore(args.store);
    try {
      const result = await precopy(binding, store, args.pid, {
        maxPauseMicros: args.maxPause * 1000,
        maxRounds: args.maxRounds,
        tracker: args.tracker,
        ...(args.name === undefined ? {} : { name: args.name }),
        signal: ctx.signal,
        onRound: (r) => {
          if (!args.json) println(ctx.stderr, `pid ${args.pid}: ${roundLine(r)}`);
        },
        onWarning: (line) => {
          if (!args.json) println(ctx.stderr, `wpsnap: warning: ${line}`);
        },
      });
      if (args.json) {
        printJson(ctx, {
          id: result.id,
          rounds: result.rounds.map((r) => ({ round: r.round, pages: r.pages, bytes: r.bytes, millis: r.millis, dirtyPagesPerSec: r.dirtyPagesPerSec })),
          finalPauseMicros: result.finalPauseMicros,
          generations: result.generations,
          converged: result.converged,
          warnings: result.warnings,
        });
        return;
      }
      println(
        ctx.stdout,
        `pre-copy of pid ${args.pid}: ${result.rounds.length - 1} round(s) while it ran, then a final stop of ${(result.finalPauseMicros / 1000).toFixed(1)} ms`,
      );
      println(ctx.stdout, `  generations ${result.generations.join(' -> ')}; the last, ${result.id}, is exact at the final stop (wpsnap log ${result.id})`);
    } finally {
      await store.close();
    }
  },
});
