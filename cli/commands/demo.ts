import ora from 'ora';
import { snapshotProcess } from '../../core/snapshot.js';
import { WpsnapError } from '../../common/errors.js';
import { checkSnapshot, parseLayout } from '../../core/demo/oracle.js';
import { launchDemoWorkload } from '../../core/demo/workload.js';
import { printJson, println, type CommandContext } from '../context.js';
import { millis } from '../format.js';
import { progressLine, summary } from './snapshot.js';
import { defineCommand } from './types.js';
import { numberOption } from '../args.js';
import { sequentialPageReader } from '../page-cursor.js';
import { throwIfAborted, unlessAborted } from '../interrupt.js';

/** Progress on stderr: a spinner on a terminal, else one plain line per step (none under --json). */
function progress(ctx: CommandContext, json: boolean): { step: (text: string) => void; update: (text: string) => void; stop: () => void } {
  const spinner = !json && ctx.stderr.isTTY ? ora({ stream: ctx.stderr }).start() : null;
  let started = Date.now();
  let current = '';
  const finishStep = (): void => {
    if (current && spinner) spinner.succeed(`${current} (${millis(Date.now() - started)})`);
    else if (current && !json) println(ctx.stderr, `demo: ${current} done in ${millis(Date.now() - started)}`);
  };
  return {
    step(text) {
      finishStep();
      current = text;
      started = Date.now();
      if (spinner) spinner.start(text);
      else if (!json) println(ctx.stderr, `demo: ${text}`);
    },
    update(text) {
      if (spinner) spinner.text = `${current}: ${text}`;
    },
    stop() {
      finishStep();
      current = '';
      spinner?.stop();
    },
  };
}

/**
 * Starts the bundled pagewriter (threads writing step-coded pages at full
 * speed into anonymous, memfd and kernel-written memory), snapshots it while
 * it runs, verifies the store, and checks every page against what the
 * writers' counters at T say it must hold.
 */
export const demoCommand = defineCommand({
  command: 'demo',
  describe: 'Snapshot a bundled workload while it writes, verify every page against its oracle, print the stats',
  builder: (y) => y.option('mib', { type: 'string', default: '64', describe: 'MiB written by each of the two writer threads', coerce: numberOption('mib', 'MiB') }),
  async handler(args, ctx: CommandContext) {
    const binding = ctx.binding();
    const store = await ctx.openStore(args.store);
    const pagesPerWriter = Math.max(16, Math.floor(args.mib * 256));
    const steps = progress(ctx, args.json);
    steps.step(`starting the pagewriter (${args.mib} MiB x 2 writer threads + memfd + kernel-written pages)`);
    const fixture = await launchDemoWorkload([
      '--threads', '2',
      '--pages', String(pagesPerWriter),
      '--memfd-pages', '2048',
      '--kernel-pages', '256',
      '--untouched-mib', '256',
    ]);
    try {
      const layout = parseLayout(fixture.readyLine);
      await new Promise((resolve) => setTimeout(resolve, 300));
      throwIfAborted(ctx.signal, 'demo');
      steps.step(`snapshotting pid ${fixture.pid} while it writes`);
      let lastLine = 0;
      const result = await snapshotProcess(binding, store, fixture.pid, {
        signal: ctx.signal,
        onProgress: (p) => {
          steps.update(progressLine(p));
          if (!args.json && !ctx.stderr.isTTY && p.elapsedMillis - lastLine >= 1000) {
            lastLine = p.elapsedMillis;
            println(ctx.stderr, `demo: ${progressLine(p)}`);
          }
        },
      });
      steps.step(`re-reading and re-hashing the ${result.pagesSaved} stored pages`);
      const verify = await unlessAborted(ctx.signal, 'demo', () => store.verify(result.id));
      steps.step(`checking every page against the writers' counters at T`);
      const processId = store.processes(result.id)[0]!.processId;
      const oracle = checkSnapshot(layout, sequentialPageReader(store, processId));
      throwIfAborted(ctx.signal, 'demo');
      steps.step('stopping the pagewriter, which checks its own pages');
      fixture.kill('SIGTERM');
      const doneLine = await unlessAborted(ctx.signal, 'demo', () => fixture.nextLine());
      steps.stop();
      const done = doneLine ? (JSON.parse(doneLine) as { errors?: number }) : { errors: -1 };
      const ok = verify.ok && oracle.mismatches.length === 0 && result.lostPages.length === 0 && done.errors === 0;
      const report = {
        ok,
        snapshot: result,
        verify: { ok: verify.ok, pagesChecked: verify.pagesChecked, problems: verify.problems.slice(0, 10) },
        oracle: { pagesChecked: oracle.pagesChecked, midWritePages: oracle.midWritePages, mismatches: oracle.mismatches.slice(0, 10) },
        target: { pid: fixture.pid, errorsAfterSnapshot: done.errors },
      };
      if (args.json) {
        printJson(ctx, report);
      } else {
        for (const line of summary(result)) println(ctx.stdout, line);
        println(ctx.stdout, `  store verify: ${verify.ok ? 'ok' : 'FAILED'} (${verify.pagesChecked} stored pages re-read and re-hashed)`);
        println(
          ctx.stdout,
          `  oracle: ${oracle.pagesChecked} pages checked against the writers' counters at T, ${oracle.mismatches.length} wrong, ${oracle.midWritePages} caught mid-write`,
        );
        println(ctx.stdout, `  target after the snapshot: ${done.errors === 0 ? 'ran on with no errors' : `${String(done.errors)} errors`}`);
      }
      if (!ok) throw new WpsnapError('DEMO_FAILED', 'demo snapshot did not match its oracle (see report above)');
    } finally {
      steps.stop();
      fixture.kill('SIGKILL');
      await store.close();
    }
  },
});
