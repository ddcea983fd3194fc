// node dist/bench/freeze-threads.js [--runs N] [--threads 1,100,500] [--addon DIR] [--no-snapshot] [--out FILE]
//
// What the pause costs per thread: freeze + thaw of fixtures/build/manythreads
// targets (attach.ts freeze(), the one the snapshot's pause calls, with the
// helper started ahead as the snapshot does), and the pause of a first and of
// a second snapshot of a fresh target (snapshotProcess, store replaced by a
// sink). Peer in the same run: the cgroup v2 freezer freezing and thawing the
// same target (write cgroup.freeze, poll cgroup.events until it says so).
// --addon DIR loads wpsnap_native.node (and its wpsnap_tracer) from DIR, to
// measure another build (the code before a change) with the same script.
import { mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { freeze } from '../core/attach.js';
import { loadBinding, type NativeBinding } from '../core/binding.js';
import { snapshotProcess } from '../core/snapshot.js';
import type { Store } from '../store/store.js';
import { launch, type Launched } from '../fixtures/launch.js';
import { log, machineInfo, median, repoRoot, sleep } from './lib.js';

const CGROUP_ROOT = '/sys/fs/cgroup/unified';

interface Row {
  threads: number;
  freezeMicros: number[];
  thawMicros: number[];
  firstPauseMicros: number[];
  firstFreezeMicros: number[];
  laterPauseMicros: number[];
  laterFreezeMicros: number[];
  /** pauseBreakdownMicros of every first and later snapshot. */
  firstBreakdowns: Array<Record<string, number>>;
  laterBreakdowns: Array<Record<string, number>>;
  /** The target's VmPTE (kB) before the first snapshot, after it, after the second. */
  vmPteKiB: number[][];
  cgroupFreezeMicros: number[];
  cgroupThawMicros: number[];
}

function nullStore(): Store {
  const known: Record<string, unknown> = {
    id: 0,
    addProcess: () => 1,
    addPages: () => Promise.resolve(),
    complete: () => Promise.resolve({ pagesSaved: 0, zeroPages: 0, pagesNew: 0, bytesRaw: 0, bytesStored: 0 }),
    abort: () => Promise.resolve(),
  };
  const writer = new Proxy(known, { get: (t, k) => (typeof k === 'string' && k in t ? t[k] : () => undefined) });
  return { beginSnapshot: () => writer } as unknown as Store;
}

async function start(threads: number): Promise<Launched> {
  const target = await launch([join(repoRoot(), 'fixtures', 'build', 'manythreads'), String(threads)], { name: 'manythreads', readyTimeoutMs: 30_000 });
  await sleep(300); // every worker past its first sleep
  return target;
}

const micros = (from: bigint): number => Number(process.hrtime.bigint() - from) / 1000;

function freezeThaw(binding: NativeBinding, pid: number, row: Row): void {
  binding.prepareFreeze();
  const t0 = process.hrtime.bigint();
  const frozen = freeze(binding, pid);
  row.freezeMicros.push(micros(t0));
  const t1 = process.hrtime.bigint();
  binding.thaw(frozen.handle);
  row.thawMicros.push(micros(t1));
  if (frozen.threads.length !== readdirCount(pid)) throw new Error(`froze ${frozen.threads.length} threads of ${readdirCount(pid)}`);
}

function readdirCount(pid: number): number {
  return Number(/^Threads:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

function vmPte(pid: number): number {
  return Number(/^VmPTE:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

function waitEvent(dir: string, frozen: 0 | 1): void {
  const want = `frozen ${frozen}`;
  for (const deadline = Date.now() + 5000; Date.now() < deadline; ) if (readFileSync(join(dir, 'cgroup.events'), 'utf8').includes(want)) return;
  throw new Error(`${dir}: not ${want} within 5 s`);
}

function cgroupFreezeThaw(pid: number, row: Row, runs: number): void {
  const dir = join(CGROUP_ROOT, `wpsnap-bench-${pid}`);
  mkdirSync(dir);
  try {
    writeFileSync(join(dir, 'cgroup.procs'), String(pid));
    for (let i = 0; i < runs; i++) {
      const t0 = process.hrtime.bigint();
      writeFileSync(join(dir, 'cgroup.freeze'), '1');
      waitEvent(dir, 1);
      row.cgroupFreezeMicros.push(micros(t0));
      const t1 = process.hrtime.bigint();
      writeFileSync(join(dir, 'cgroup.freeze'), '0');
      waitEvent(dir, 0);
      row.cgroupThawMicros.push(micros(t1));
    }
  } finally {
    writeFileSync(join(dir, 'cgroup.freeze'), '0');
    writeFileSync(join(CGROUP_ROOT, 'cgroup.procs'), String(pid));
    rmdirSync(dir);
  }
}

async function snapshotPause(binding: NativeBinding, pid: number): Promise<{ pause: number; freeze: number; breakdown: Record<string, number> }> {
  const r = await snapshotProcess(binding, nullStore(), pid, {});
  return { pause: r.pauseMicros, freeze: r.pauseBreakdownMicros.freeze, breakdown: { ...r.pauseBreakdownMicros } };
}

async function measure(binding: NativeBinding, threads: number, runs: number, snapshots: boolean): Promise<Row> {
  const row: Row = { threads, freezeMicros: [], thawMicros: [], firstPauseMicros: [], firstFreezeMicros: [], laterPauseMicros: [], laterFreezeMicros: [], firstBreakdowns: [], laterBreakdowns: [], vmPteKiB: [], cgroupFreezeMicros: [], cgroupThawMicros: [] };
  const target = await start(threads);
  try {
    freezeThaw(binding, target.pid, { ...row, freezeMicros: [], thawMicros: [] }); // warm-up, not counted
    for (let i = 0; i < runs; i++) freezeThaw(binding, target.pid, row);
    cgroupFreezeThaw(target.pid, row, runs);
  } finally {
    await target.stop(10_000);
  }
  if (!snapshots) return row;
  for (let i = 0; i < runs; i++) {
    const fresh = await start(threads);
    try {
      const pte0 = vmPte(fresh.pid);
      const first = await snapshotPause(binding, fresh.pid);
      const pte1 = vmPte(fresh.pid);
      const later = await snapshotPause(binding, fresh.pid);
      row.vmPteKiB.push([pte0, pte1, vmPte(fresh.pid)]);
      row.firstPauseMicros.push(first.pause);
      row.firstFreezeMicros.push(first.freeze);
      row.laterPauseMicros.push(later.pause);
      row.laterFreezeMicros.push(later.freeze);
      row.firstBreakdowns.push(first.breakdown);
      row.laterBreakdowns.push(later.breakdown);
    } finally {
      await fresh.stop(10_000);
    }
  }
  return row;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '7' },
      threads: { type: 'string', default: '1,100,500' },
      addon: { type: 'string' },
      'no-snapshot': { type: 'boolean' },
      out: { type: 'string' },
    },
  });
  const binding: NativeBinding =
    values.addon === undefined ? loadBinding() : (createRequire(import.meta.url)(join(values.addon, 'wpsnap_native.node')) as NativeBinding);
  const runs = Number(values.runs);
  const rows: Row[] = [];
  for (const n of values.threads.split(',').map(Number)) {
    log(`${n} threads`);
    rows.push(await measure(binding, n, runs, !values['no-snapshot']));
  }
  const ms = (v: number[]): string => (v.length ? (median(v)! / 1000).toFixed(2) : '-');
  process.stdout.write('threads  freeze  thaw  | first pause (freeze)  later pause (freeze) | cgroup freeze  thaw   (ms, medians)\n');
  for (const r of rows) {
    process.stdout.write(
      `${String(r.threads).padStart(7)}  ${ms(r.freezeMicros).padStart(6)} ${ms(r.thawMicros).padStart(5)}  | ${ms(r.firstPauseMicros).padStart(8)} (${ms(r.firstFreezeMicros)})` +
        `  ${ms(r.laterPauseMicros).padStart(12)} (${ms(r.laterFreezeMicros)}) | ${ms(r.cgroupFreezeMicros).padStart(12)} ${ms(r.cgroupThawMicros).padStart(6)}\n`,
    );
  }
  const phases = (list: Array<Record<string, number>>): string =>
    Object.keys(list[0] ?? {})
      .map((k) => `${k} ${ms(list.map((b) => b[k]!))}`)
      .join(', ');
  for (const r of rows) {
    if (r.firstBreakdowns.length === 0) continue;
    process.stdout.write(`${r.threads} threads, first snapshot: ${phases(r.firstBreakdowns)}\n`);
    process.stdout.write(`${r.threads} threads, later snapshot: ${phases(r.laterBreakdowns)}\n`);
    const pte = (k: number): string => String(median(r.vmPteKiB.map((v) => v[k]!)));
    process.stdout.write(`${r.threads} threads, VmPTE kB before / after the first / after the second snapshot: ${pte(0)} / ${pte(1)} / ${pte(2)}\n`);
  }
  const out = values.out ?? join(repoRoot(), 'bench', 'results', `freeze-threads-${new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}.json`);
  writeFileSync(out, `${JSON.stringify({ machine: machineInfo(), addon: values.addon ?? 'build/Release', runs, rows })}\n`);
  log(`wrote ${out}`);
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`);
  process.exit(1);
});
