// Scenario "restore" (issue 13): a snapshot run again as a new process,
// `node dist/bench/run.js restore [--runs N] [--mib M]`.
//
//   afresh   fixtures/touchbench M: exec until it has written its M MiB (its
//            ready line): what starting the program again and reaching the
//            same state costs
//   eager    `restore` (library API, in this process) of a snapshot of it:
//            wall until the process runs, and the restore's own `millis`
//   lazy     `restore --lazy`: until the process runs (firstInstructionMillis),
//            then it is sent SIGUSR1 at once and touches every page once in a
//            shuffled order, timing each first touch from the inside, while
//            the background pass fills the rest; until every page is in
//            (allInMillis); the server's own fault service p50/p99
//
// Each restored process checks every page's content (bad must be 0).
// Prints a table and writes bench/results/restore-<UTC timestamp>.json.
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { restore, restoreLazy } from '../core/api.js';
import { launchFixture } from '../fixtures/launch.js';
import { log, machineInfo, median, minMax, repoRoot, runCommand } from './lib.js';

interface Touch {
  touched: number;
  p50Micros: number;
  p99Micros: number;
  maxMicros: number;
  touchMillis: number;
  bad: number;
}

const summary = (xs: number[]): { median: number | null; range: [number, number] | null } => ({ median: median(xs), range: minMax(xs) });
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** The restored process's touch report in its stdio file (up to 120 s). */
async function touchReport(path: string): Promise<Touch> {
  for (let waited = 0; waited < 120_000; waited += 20) {
    const line = readFileSync(path, 'utf8').split('\n').find((l) => l.includes('"touched"'));
    if (line !== undefined) return JSON.parse(line) as Touch;
    await sleep(20);
  }
  throw new Error(`no touch report in ${path}`);
}

export async function restoreMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { runs: { type: 'string' }, mib: { type: 'string' } } });
  const runs = Number(values.runs ?? 3);
  const mib = Number(values.mib ?? 1024);
  if (![runs, mib].every((n) => Number.isInteger(n) && n > 0)) {
    process.stderr.write('usage: node dist/bench/run.js restore [--runs N] [--mib M]\n');
    return 2;
  }
  const root = repoRoot();
  const cli = join(root, 'dist', 'cli', 'main.js');
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-restore-'));
  process.env['WPSNAP_RUNTIME_DIR'] = join(dir, 'run');
  const store = join(dir, 'store.db');
  const started = new Date().toISOString();
  const afresh: number[] = [];
  const fill: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const f = await launchFixture('touchbench', [String(mib)], 300_000);
    afresh.push(performance.now() - t0);
    fill.push((JSON.parse(f.readyLine) as { fillMillis: number }).fillMillis);
    if (i < runs - 1) f.kill();
    else {
      log(`snapshot of ${mib} MiB`);
      const snap = await runCommand(process.execPath, [cli, 'snapshot', String(f.pid), '--name', 't', '--json', '--store', store], { timeoutMs: 900_000 });
      f.kill();
      if (snap.code !== 0) throw new Error(`snapshot: ${snap.stderr}`);
    }
  }
  const eager: Array<{ wallMillis: number; millis: number; pages: number; touch: Touch }> = [];
  const lazy: Array<{ firstInstructionMillis: number; allInMillis: number; onDemand: number; prefetched: number; serverP50Micros: number; serverP99Micros: number; touch: Touch }> = [];
  for (let i = 0; i < runs; i++) {
    const out = join(dir, `eager-${i}.txt`);
    closeSync(openSync(out, 'w', 0o600));
    const t0 = performance.now();
    const r = await restore(store, 't', { stdio: { file: out } });
    const wallMillis = performance.now() - t0;
    process.kill(r.pid, 'SIGUSR1');
    eager.push({ wallMillis, millis: r.millis, pages: r.pagesWritten, touch: await touchReport(out) });
    log(`eager ${i + 1}/${runs}: running after ${wallMillis.toFixed(0)} ms`);
  }
  for (let i = 0; i < runs; i++) {
    const out = join(dir, `lazy-${i}.txt`);
    closeSync(openSync(out, 'w', 0o600));
    const r = await restoreLazy(store, 't', { stdio: { file: out }, onRunning: (pid) => process.kill(pid, 'SIGUSR1') });
    lazy.push({
      firstInstructionMillis: r.lazy.firstInstructionMillis,
      allInMillis: r.lazy.allInMillis ?? NaN,
      onDemand: r.lazy.pagesOnDemand,
      prefetched: r.lazy.pagesPrefetched,
      serverP50Micros: r.lazy.faultP50Micros,
      serverP99Micros: r.lazy.faultP99Micros,
      touch: await touchReport(out),
    });
    log(`lazy ${i + 1}/${runs}: running after ${r.lazy.firstInstructionMillis} ms, every page in after ${r.lazy.allInMillis} ms`);
  }
  rmSync(dir, { recursive: true, force: true });
  const doc = {
    scenario: 'restore',
    startedAt: started,
    options: { runs, mib },
    machine: machineInfo(),
    afresh: { wallMillis: summary(afresh), fillMillis: summary(fill) },
    eager: { wallMillis: summary(eager.map((e) => e.wallMillis)), millis: summary(eager.map((e) => e.millis)), pages: eager[0]?.pages, insideTouchP50Micros: summary(eager.map((e) => e.touch.p50Micros)), bad: eager.map((e) => e.touch.bad) },
    lazy: {
      firstInstructionMillis: summary(lazy.map((l) => l.firstInstructionMillis)),
      allInMillis: summary(lazy.map((l) => l.allInMillis)),
      insideFaultP50Micros: summary(lazy.map((l) => l.touch.p50Micros)),
      insideFaultP99Micros: summary(lazy.map((l) => l.touch.p99Micros)),
      insideTouchAllMillis: summary(lazy.map((l) => l.touch.touchMillis)),
      serverP50Micros: summary(lazy.map((l) => l.serverP50Micros)),
      serverP99Micros: summary(lazy.map((l) => l.serverP99Micros)),
      pagesOnDemand: summary(lazy.map((l) => l.onDemand)),
      pagesPrefetched: summary(lazy.map((l) => l.prefetched)),
      bad: lazy.map((l) => l.touch.bad),
    },
    runs: { afresh, eager, lazy },
  };
  const file = join(root, 'bench', 'results', `restore-${started.replace(/[:.]/g, '-')}.json`);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(doc, null, 2) + '\n');
  const m = (x: { median: number | null }): string => (x.median === null ? '-' : x.median.toFixed(1));
  process.stdout.write(
    [
      `restore of ${mib} MiB, ${runs} runs (medians)`,
      `  afresh (exec until the state is reached)   ${m(doc.afresh.wallMillis)} ms`,
      `  eager restore until it runs              ${m(doc.eager.wallMillis)} ms  (ratio ${((doc.eager.wallMillis.median ?? 0) / (doc.afresh.wallMillis.median ?? 1)).toFixed(2)}x)`,
      `  lazy: first instruction                  ${m(doc.lazy.firstInstructionMillis)} ms`,
      `  lazy: fault p50 / p99 inside             ${m(doc.lazy.insideFaultP50Micros)} / ${m(doc.lazy.insideFaultP99Micros)} µs`,
      `  lazy: every page in                      ${m(doc.lazy.allInMillis)} ms`,
      `  pages wrong: eager ${doc.eager.bad.join(',')}  lazy ${doc.lazy.bad.join(',')}`,
      `  ${file}`,
      '',
    ].join('\n'),
  );
  return 0;
}
