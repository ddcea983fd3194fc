// Write faults on transparent huge pages: node dist/bench/thp-faults.js [--runs N] [--mib M] [--rate STEPS]
// Snapshots fixtures/thp (one writer over M MiB of PMD-mapped THP, writing
// random 4 KiB pages at --rate steps/s) in this process, N times, a fresh
// target each time, and prints per run: the faults, the engine's fault
// service p50/p99 (read of the fault to unprotect), the target's own p50/p99
// of the writes that took more than 2 µs (the ones that faulted), and the
// target's AnonHugePages before and after. Medians at the end.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { loadBinding } from '../core/binding.js';
import { snapshotProcess } from '../core/snapshot.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { Store } from '../store/store.js';

interface Run {
  faults: number;
  engineP50Us: number;
  engineP99Us: number;
  targetFaulted: number;
  targetP50Us: number;
  targetP99Us: number;
  hugeBeforeKiB: number;
  hugeAfterKiB: number;
  millis: number;
}

function anonHugeKiB(pid: number): number {
  const m = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

async function lineWith(fixture: LaunchedFixture, key: string): Promise<Record<string, unknown>> {
  for (;;) {
    const text = await fixture.nextLine();
    if (text === null) throw new Error(`thp fixture ended before a "${key}" line`);
    const line = JSON.parse(text) as Record<string, unknown>;
    if (line[key] === true) return line;
  }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { runs: { type: 'string' }, mib: { type: 'string' }, rate: { type: 'string' } } });
  const runs = Number(values.runs ?? 5);
  const mib = values.mib ?? '128';
  const rate = values.rate ?? '2000';
  const binding = loadBinding();
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-thp-'));
  const results: Run[] = [];
  try {
    for (let i = 0; i < runs; i++) {
      const store = Store.open(join(dir, `run${i}.db`));
      const fixture = await launchFixture('thp', ['--threads', '1', '--mib', mib, '--rate', rate, '--seed', String(40 + i)]);
      try {
        const hugeBeforeKiB = anonHugeKiB(fixture.pid);
        fixture.kill('SIGUSR1');
        await lineWith(fixture, 'window');
        const result = await snapshotProcess(binding, store, fixture.pid);
        fixture.kill('SIGUSR2');
        const report = (await lineWith(fixture, 'report')) as { faulted: { count: number; p50Nanos: number; p99Nanos: number } };
        const run: Run = {
          faults: result.faults,
          engineP50Us: Math.round(result.engine.faultServiceP50Micros),
          engineP99Us: Math.round(result.engine.faultServiceP99Micros),
          targetFaulted: report.faulted.count,
          targetP50Us: Math.round(report.faulted.p50Nanos / 1000),
          targetP99Us: Math.round(report.faulted.p99Nanos / 1000),
          hugeBeforeKiB,
          hugeAfterKiB: anonHugeKiB(fixture.pid),
          millis: result.durationMillis,
        };
        results.push(run);
        console.log(JSON.stringify(run));
      } finally {
        fixture.kill();
        await store.close();
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const keys = Object.keys(results[0]!) as Array<keyof Run>;
  console.log(`median of ${runs}: ${JSON.stringify(Object.fromEntries(keys.map((k) => [k, median(results.map((r) => r[k]))])))}`);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
