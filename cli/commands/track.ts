import { refuseIfTracked } from '../../core/keeper.js';
// wpsnap track <pid>: which pages a running process writes, round after round,
// copying nothing (core/tracker.ts). A top-like table on a terminal; JSON lines
// with --json, one object per interval, for a migration tool or a script.
import { DirtyTracker, TRACKER_KINDS, type DirtyRound, type TrackerKind } from '../../core/tracker.js';
import { normalize, pagesIn, type Intervals } from '../../core/intervals.js';
import { toJson, println, type CommandContext } from '../context.js';
import { bytes, table } from '../format.js';
import { durationOption, positiveInteger } from '../args.js';
import { interruptedError } from '../interrupt.js';
import { defineCommand } from './types.js';

const PAGE = 4096;

/** The JSON line of one interval (docs/cli.md, "track --json"). */
export function roundJson(round: DirtyRound, workingSetPages: number, withRanges: boolean): Record<string, unknown> {
  const line: Record<string, unknown> = {
    t: Math.round(round.atMillis),
    intervalMillis: Math.round(round.intervalMillis),
    dirtyPages: round.dirtyPages,
    dirtyBytesPerSec: round.intervalMillis > 0 ? Math.round((round.dirtyPages * PAGE * 1000) / round.intervalMillis) : 0,
    workingSetPages,
    regions: round.mappings.filter((m) => m.dirtyPages > 0).map((m) => ({ start: m.start, end: m.end, path: m.path, dirtyPages: m.dirtyPages })),
  };
  if (withRanges) {
    line['ranges'] = round.dirty.map(([s, e]) => [s, e]);
    line['added'] = round.added.map(([s, e]) => [s, e]);
  }
  if (round.untracked.length > 0) line['untracked'] = round.untracked;
  if (round.exited) line['exited'] = true;
  return line;
}


/** The terminal view: the busiest mappings first. */
export function roundTable(pid: number, kind: TrackerKind, round: DirtyRound, workingSetPages: number, top: number): string[] {
  const secs = round.intervalMillis / 1000;
  const rate = secs > 0 ? (round.dirtyPages * PAGE) / secs : 0;
  const lines = [
    `pid ${pid} · ${kind} tracker · round ${round.round} after ${(round.atMillis / 1000).toFixed(1)} s`,
    `written: ${round.dirtyPages} pages in ${round.intervalMillis.toFixed(0)} ms (${bytes(rate)}/s) · written since the start: ${workingSetPages} pages (${bytes(workingSetPages * PAGE)})`,
    '',
  ];
  const busy = round.mappings.filter((m) => m.dirtyPages > 0).sort((a, b) => b.dirtyPages - a.dirtyPages);
  const rows = [['RANGE', 'SIZE', 'WRITTEN', 'RATE', 'MAPPING']];
  for (const m of busy.slice(0, top)) {
    rows.push([
      `${m.start.toString(16)}-${m.end.toString(16)}`,
      bytes(Number(m.end - m.start)),
      `${m.dirtyPages} pages`,
      `${bytes(secs > 0 ? (m.dirtyPages * PAGE) / secs : 0)}/s`,
      m.path || '[anon]',
    ]);
  }
  lines.push(busy.length === 0 ? 'no page written in this interval' : table(rows));
  if (busy.length > top) lines.push(`… ${busy.length - top} more mappings written`);
  if (round.untracked.length > 0) lines.push('', `not tracked (${round.untracked.length} mappings): ${round.untracked[0]!.why}${round.untracked.length > 1 ? ', …' : ''}`);
  return lines;
}

/** Resolves after ms, or at once when the signal aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}

export const trackCommand = defineCommand({
  command: 'track <pid>',
  describe: 'Show which pages a running process writes, interval by interval (copies nothing)',
  builder: (y) =>
    y
      .positional('pid', { type: 'string', describe: 'process to track', demandOption: true, coerce: positiveInteger('a pid') })
      .option('interval', { type: 'string', default: '1s', describe: 'time between rounds (500ms, 1s, 2m…)', coerce: durationOption('interval') })
      .option('duration', { type: 'string', describe: 'stop after this long (default: until Ctrl-C or the target exits)', coerce: durationOption('duration') })
      .option('tracker', {
        choices: TRACKER_KINDS,
        default: 'async' as TrackerKind,
        describe: 'async: uffd-wp with WP_ASYNC and PAGEMAP_SCAN; sync: write faults served by wpsnap (kernels without WP_ASYNC); soft-dirty: only where the kernel has it',
      })
      .option('ranges', { type: 'boolean', default: false, describe: 'with --json: each line also lists the written page ranges' })
      .option('top', { type: 'string', default: '20', describe: 'mappings shown on a terminal', coerce: positiveInteger('a count for --top') }),
  async handler(args, ctx: CommandContext) {
    const binding = ctx.binding();
    await refuseIfTracked(args.pid, 'track');
    const tracker = DirtyTracker.start(binding, args.pid, { tracker: args.tracker });
    const started = performance.now();
    const live = !args.json && ctx.stdout.isTTY === true;
    let written: Intervals = [];
    try {
      tracker.take(); // writes before the start are not the first interval's
      for (;;) {
        const left = args.duration === undefined ? Infinity : args.duration - (performance.now() - started);
        if (left <= 0) break;
        await sleep(Math.min(args.interval, left), ctx.signal);
        const round = tracker.take();
        written = normalize([...written, ...round.dirty]);
        const workingSetPages = pagesIn(written);
        if (args.json) {
          ctx.stdout.write(toJson(roundJson(round, workingSetPages, args.ranges), { compact: true }) + '\n');
        } else {
          if (live) ctx.stdout.write('\x1b[H\x1b[2J');
          for (const line of roundTable(args.pid, args.tracker, round, workingSetPages, args.top)) println(ctx.stdout, line);
          if (!live) println(ctx.stdout);
        }
        if (round.exited) {
          if (!args.json) println(ctx.stderr, `wpsnap: pid ${args.pid} exited`);
          return;
        }
        if (ctx.signal.aborted) throw interruptedError('track');
      }
    } finally {
      // The target is unprotected whatever ended the command.
      tracker.stop();
    }
  },
});
