// Scenario "rollback" (issue 11): resetting a process to a saved point,
// `node dist/bench/run.js rollback [--runs N] [--mib M] [--touch P]`.
//
//   incremental   fixtures/dirtywriter (M MiB of private anonymous memory);
//                 `snapshot --name base --track`; then, run after run, the
//                 target writes P pages spread over its memory and is rolled
//                 back with the library API (`rollback(store, 'base',
//                 {incremental: true})`, in this process) — its wall, and the
//                 target's stop (`micros`); the same through a session that
//                 keeps the store open (`rollbackSession`); and the CLI
//   full          the same writes, rolled back without --incremental
//   fork server   fixtures/forkserver: the AFL++ way, a parent at the saved
//                 point forks a child per run that writes the same P pages
//                 of the same M MiB and exits
//   full-mib G    (optional) a second dirtywriter of G MiB, every 10th page
//                 written between full rollbacks (3 runs), against a fork
//                 server run writing the same 10% of G MiB
//
// Prints a table and writes bench/results/rollback-<UTC timestamp>.json.
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { rollback, rollbackSession } from '../core/api.js';
import { launchFixture } from '../fixtures/launch.js';
import { log, machineInfo, median, minMax, repoRoot, runCommand } from './lib.js';

interface Sample {
  wallMillis: number;
  stopMicros: number;
  pagesWritten: number;
  pagesCompared: number;
}

const summary = (xs: number[]): { median: number | null; range: [number, number] | null } => ({ median: median(xs), range: minMax(xs) });

export async function rollbackMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { runs: { type: 'string' }, mib: { type: 'string' }, touch: { type: 'string' }, 'full-mib': { type: 'string' }, 'no-write': { type: 'boolean' } } });
  const runs = Number(values.runs ?? 20);
  const mib = Number(values.mib ?? 64);
  const touch = Number(values.touch ?? 100);
  if (![runs, mib, touch].every((n) => Number.isInteger(n) && n > 0)) {
    process.stderr.write('usage: node dist/bench/run.js rollback [--runs N] [--mib M] [--touch P] [--no-write]\n');
    return 2;
  }
  const pages = (mib * 1024 * 1024) / 4096;
  const root = repoRoot();
  const cli = join(root, 'dist', 'cli', 'main.js');
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-rollback-'));
  process.env['WPSNAP_RUNTIME_DIR'] = join(dir, 'run');
  const store = join(dir, 'store.db');
  const fifo = join(dir, 'commands');
  execFileSync('mkfifo', ['-m', '0600', fifo]);
  const started = new Date().toISOString();
  // One shared page only: shared memory is compared whole by any rollback (no fault tells about its writes).
  const target = await launchFixture('dirtywriter', ['-p', String(pages), '-s', '1', '-c', fifo]);
  const commands = openSync(fifo, 'w');
  const anon = BigInt((JSON.parse(target.readyLine) as { anon: string }).anon);
  const send = async (line: string): Promise<void> => {
    writeSync(commands, `${line}\n`);
    const reply = await target.nextLine();
    if (reply === null || !reply.includes('"ok":true')) throw new Error(`dirtywriter: ${line}: ${reply}`);
  };
  const spread = Array.from({ length: touch }, (_, k) => Math.floor((k * pages) / touch));
  const writeTouched = (): Promise<void> => send(`write 0x${anon.toString(16)} ${spread.join(' ')}`);
  const results: { incremental: Sample[]; session: Sample[]; incrementalCli: Sample[]; full: Sample[] } = { incremental: [], session: [], incrementalCli: [], full: [] };
  try {
    const base = await runCommand(process.execPath, [cli, 'snapshot', String(target.pid), '--name', 'base', '--track', '--json', '--store', store], { timeoutMs: 600_000 });
    if (base.code !== 0) throw new Error(`snapshot --track: ${base.stderr}`);
    for (let i = 0; i < runs; i++) {
      await writeTouched();
      const t0 = performance.now();
      const r = await rollback(store, 'base', { incremental: true });
      results.incremental.push({ wallMillis: performance.now() - t0, stopMicros: r.micros, pagesWritten: r.pagesWritten, pagesCompared: r.pagesCompared });
    }
    const session = rollbackSession(store, 'base', { incremental: true });
    try {
      for (let i = 0; i < runs; i++) {
        await writeTouched();
        const t0 = performance.now();
        const r = await session.rollback();
        results.session.push({ wallMillis: performance.now() - t0, stopMicros: r.micros, pagesWritten: r.pagesWritten, pagesCompared: r.pagesCompared });
      }
    } finally {
      await session.close();
    }
    for (let i = 0; i < Math.min(runs, 5); i++) {
      await writeTouched();
      const c = await runCommand(process.execPath, [cli, 'rollback', 'base', '--incremental', '--json', '--store', store], { timeoutMs: 600_000 });
      if (c.code !== 0) throw new Error(`rollback --incremental: ${c.stderr}`);
      const doc = JSON.parse(c.stdout) as { micros: number; pagesWritten: number; pagesCompared: number };
      results.incrementalCli.push({ wallMillis: c.wallMillis, stopMicros: doc.micros, pagesWritten: doc.pagesWritten, pagesCompared: doc.pagesCompared });
    }
    await runCommand(process.execPath, [cli, 'untrack', String(target.pid)], { timeoutMs: 60_000 });
    for (let i = 0; i < Math.min(runs, 5); i++) {
      await writeTouched();
      const t0 = performance.now();
      const r = await rollback(store, 'base');
      results.full.push({ wallMillis: performance.now() - t0, stopMicros: r.micros, pagesWritten: r.pagesWritten, pagesCompared: r.pagesCompared });
    }
  } finally {
    closeSync(commands);
    target.kill();
  }
  const fullMib = values['full-mib'] === undefined ? undefined : Number(values['full-mib']);
  const bigFull: Sample[] = [];
  let bigFork: { perRunMicros: number } | undefined;
  if (fullMib !== undefined) {
    if (!Number.isInteger(fullMib) || fullMib <= 0) throw new Error('--full-mib: a whole number of MiB');
    const bigPages = (fullMib * 1024 * 1024) / 4096;
    const bigFifo = join(dir, 'commands-big');
    execFileSync('mkfifo', ['-m', '0600', bigFifo]);
    const big = await launchFixture('dirtywriter', ['-p', String(bigPages), '-s', '1', '-c', bigFifo]);
    const bigCommands = openSync(bigFifo, 'w');
    try {
      const snap = await runCommand(process.execPath, [cli, 'snapshot', String(big.pid), '--name', 'big', '--json', '--store', store], { timeoutMs: 600_000 });
      if (snap.code !== 0) throw new Error(`snapshot: ${snap.stderr}`);
      for (let i = 0; i < 3; i++) {
        writeSync(bigCommands, 'writeevery anon 10\n');
        const reply = await big.nextLine();
        if (reply === null || !reply.includes('"ok":true')) throw new Error(`dirtywriter: writeevery: ${reply}`);
        const t0 = performance.now();
        const r = await rollback(store, 'big');
        bigFull.push({ wallMillis: performance.now() - t0, stopMicros: r.micros, pagesWritten: r.pagesWritten, pagesCompared: r.pagesCompared });
      }
    } finally {
      closeSync(bigCommands);
      big.kill();
    }
    bigFork = JSON.parse(execFileSync(join(root, 'fixtures', 'build', 'forkserver'), ['--pages', String(bigPages), '--touch', String(bigPages / 10), '--runs', '10'], { encoding: 'utf8' })) as { perRunMicros: number };
  }
  const forkRuns = Math.max(100, runs * 10);
  const fork = JSON.parse(execFileSync(join(root, 'fixtures', 'build', 'forkserver'), ['--pages', String(pages), '--touch', String(touch), '--runs', String(forkRuns)], { encoding: 'utf8' })) as { perRunMicros: number };
  rmSync(dir, { recursive: true, force: true });
  const doc = {
    scenario: 'rollback',
    startedAt: started,
    options: { runs, mib, touch },
    machine: machineInfo(),
    incremental: { wallMillis: summary(results.incremental.map((s) => s.wallMillis)), stopMicros: summary(results.incremental.map((s) => s.stopMicros)), pagesWritten: summary(results.incremental.map((s) => s.pagesWritten)), pagesCompared: summary(results.incremental.map((s) => s.pagesCompared)) },
    session: { wallMillis: summary(results.session.map((s) => s.wallMillis)), stopMicros: summary(results.session.map((s) => s.stopMicros)) },
    incrementalCli: { wallMillis: summary(results.incrementalCli.map((s) => s.wallMillis)), stopMicros: summary(results.incrementalCli.map((s) => s.stopMicros)) },
    full: { wallMillis: summary(results.full.map((s) => s.wallMillis)), stopMicros: summary(results.full.map((s) => s.stopMicros)), pagesCompared: summary(results.full.map((s) => s.pagesCompared)) },
    forkServer: { runs: forkRuns, perRunMicros: fork.perRunMicros },
    fullLarge: fullMib === undefined ? null : { mib: fullMib, wallMillis: summary(bigFull.map((s) => s.wallMillis)), stopMicros: summary(bigFull.map((s) => s.stopMicros)), pagesWritten: summary(bigFull.map((s) => s.pagesWritten)), samples: bigFull, forkServerPerRunMicros: bigFork?.perRunMicros ?? null },
    samples: results,
  };
  const f = (v: number | null, d = 1): string => (v === null ? '–' : v.toFixed(d));
  const line = (name: string, s: { median: number | null; range: [number, number] | null }, unit: string): string =>
    `  ${name.padEnd(46)} ${f(s.median)} ${unit} [${s.range ? `${f(s.range[0])}–${f(s.range[1])}` : '–'}]`;
  const out = [
    `rollback: dirtywriter ${mib} MiB (${pages} pages), ${touch} pages written between rollbacks, ${runs} runs`,
    line('incremental, API: wall per rollback', doc.incremental.wallMillis, 'ms'),
    line('incremental, API: the target stopped', { median: doc.incremental.stopMicros.median === null ? null : doc.incremental.stopMicros.median / 1000, range: doc.incremental.stopMicros.range ? [doc.incremental.stopMicros.range[0] / 1000, doc.incremental.stopMicros.range[1] / 1000] : null }, 'ms'),
    line('incremental: pages rewritten or compared', doc.incremental.pagesCompared, 'pages'),
    line('incremental, API session (store kept open): wall', doc.session.wallMillis, 'ms'),
    line('incremental, API session: the target stopped', { median: doc.session.stopMicros.median === null ? null : doc.session.stopMicros.median / 1000, range: doc.session.stopMicros.range ? [doc.session.stopMicros.range[0] / 1000, doc.session.stopMicros.range[1] / 1000] : null }, 'ms'),
    line('incremental, CLI: wall per rollback', doc.incrementalCli.wallMillis, 'ms'),
    line('full (every page compared), API: wall', doc.full.wallMillis, 'ms'),
    `  ${'fork server: per run (fork, child writes, exit, wait)'.padEnd(46)} ${(fork.perRunMicros / 1000).toFixed(2)} ms (${forkRuns} runs)`,
    `  ${'incremental API wall / fork server per run'.padEnd(46)} ${doc.incremental.wallMillis.median === null ? '–' : (doc.incremental.wallMillis.median / (fork.perRunMicros / 1000)).toFixed(1)}×`,
    `  ${'session wall / fork server per run'.padEnd(46)} ${doc.session.wallMillis.median === null ? '–' : (doc.session.wallMillis.median / (fork.perRunMicros / 1000)).toFixed(1)}×`,
  ];
  if (doc.fullLarge !== null) {
    out.push(line(`full rollback of ${doc.fullLarge.mib} MiB, 10% written: wall`, doc.fullLarge.wallMillis, 'ms'));
    out.push(`  ${'  pages written back'.padEnd(46)} ${doc.fullLarge.pagesWritten.median ?? '–'}`);
    if (bigFork !== undefined) out.push(`  ${`fork server, ${doc.fullLarge.mib} MiB, 10% written: per run`.padEnd(46)} ${(bigFork.perRunMicros / 1000).toFixed(1)} ms`);
  }
  process.stdout.write(out.join('\n') + '\n');
  if (!values['no-write']) {
    const file = join(root, 'bench', 'results', `rollback-${started.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}.json`);
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, JSON.stringify(doc) + '\n');
    log(`wrote ${file}`);
  }
  return 0;
}
