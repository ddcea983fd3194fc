// Scenario "snapshot-1gib": one faultlat target (1 GiB of heap-like 4 KiB
// pages, every page written once per pass, continuously) snapshotted by each
// peer in turn, in one run: nothing (baseline), fork() (the target forks a
// child that holds the copy-on-write image for 3 s, like Redis BGSAVE),
// gcore, wpsnap, wpsnap --rate, and a diagnostic: wpsnap's engine with no
// store (engine-only). wpsnap's pause, step by step, is its own
// pauseBreakdownMicros (wpsnap.pause.*).
// Every measurement is repeated `runs` times, the order of peers rotating
// from run to run, after one unmeasured warm-up of each. Before the target
// starts: the kernel's minimal uffd-wp round trip (uffd_roundtrip) and the
// single-core cost of each store stage (pipeline.ts).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { runPipeline, type PipelineResult } from './pipeline.js';
import { Faultlat, log, machineInfo, repoRoot, sleep, treeState } from './lib.js';
import { measure, measureRoundtrip } from './snapshot-1gib-peers.js';
import { describe, rtName, summarize } from './snapshot-1gib-report.js';
import { DEFAULTS, type PeerName, type RoundtripResult, type RunResult, type Snapshot1GiBOptions, type Snapshot1GiBResult } from './snapshot-1gib-types.js';

export { DEFAULTS, PEERS, type PeerName, type Snapshot1GiBResult } from './snapshot-1gib-types.js';
export { printTable, summarize } from './snapshot-1gib-report.js';

// ---- the scenario -----------------------------------------------------------

function preflight(): void {
  const root = repoRoot();
  for (const f of ['fixtures/build/faultlat', 'fixtures/build/uffd_roundtrip', 'dist/fixtures/launch.js']) {
    if (!existsSync(join(root, f))) {
      throw new Error(`${f} is missing: build first (npm run build:native && make -C fixtures && npx tsc -p tsconfig.json)`);
    }
  }
  if (process.getuid?.() !== 0) throw new Error('run as root: wpsnap and gcore attach to the target with ptrace');
}

export async function runSnapshot1GiB(partial: Partial<Snapshot1GiBOptions> = {}): Promise<Snapshot1GiBResult> {
  const o: Snapshot1GiBOptions = { ...DEFAULTS, ...partial };
  preflight();
  if (!existsSync(resolve(repoRoot(), o.cli))) throw new Error(`${o.cli} is missing: build first (npx tsc -p tsconfig.json)`);
  const startedAt = new Date().toISOString();
  const atStart = machineInfo();
  const tree = await treeState();
  const dir = mkdtempSync(join(tmpdir(), 'wpsnap-bench-'));
  log(`tree ${tree.head ?? '?'}${tree.modified.length > 0 ? ` + modified: ${tree.modified.join(', ')}` : ''}`);
  log(`snapshot-1gib: ${o.runs} runs, ${o.mib} MiB target, peers ${o.peers.join(', ')}; scratch ${dir}`);

  // The floor, measured while the machine does not also run the target.
  const roundtrip: RoundtripResult[] = [];
  for (let i = 0; i < o.runs; i++) {
    for (const [copy, spin] of [
      [false, false],
      [true, false],
      [true, true],
    ] as const) {
      try {
        const rt = await measureRoundtrip(copy, spin);
        roundtrip.push(rt);
        log(`${rtName(rt)}: same CPU p50 ${rt.sameCpuP50Micros} µs, cross CPU p50 ${rt.crossCpuP50Micros} µs`);
      } catch (error) {
        log(`uffd_roundtrip failed: ${String(error)}`);
      }
    }
  }

  let pipeline: PipelineResult | { error: string } | null = null;
  if (o.pipelineMib > 0) {
    try {
      pipeline = await runPipeline(o.pipelineMib);
      for (const st of pipeline.stages) log(`pipeline ${st.stage}: ${st.MBps} MB/s (${st.secondsPerGiB} s/GiB on one core)`);
    } catch (error) {
      pipeline = { error: String(error) };
      log(`pipeline measurement failed: ${String(error)}`);
    }
  }

  const targetArgs = ['--mib', String(o.mib), '--fork-hold-ms', String(o.forkHoldMs)];
  let target: Faultlat | undefined;
  const runs: RunResult[] = [];
  try {
    log(`launching faultlat ${targetArgs.join(' ')}`);
    target = await Faultlat.launch(targetArgs);
    log(`target pid ${target.pid}, filled in ${String(target.ready['fillMillis'])} ms`);
    await sleep(o.settleMs);

    // Warm-up: one unmeasured pass of each peer (the first copy-on-write, the
    // first core file, the first store are each slower than the steady state).
    for (const peer of o.peers) {
      const r = await measure(peer, target, o, dir, `warmup-${peer}`);
      log(`warm-up ${describe(peer, r)}`);
      await sleep(o.settleMs);
    }

    for (let i = 0; i < o.runs; i++) {
      // Rotate the order each run, and reverse it every other run.
      const rotated = o.peers.map((_, k) => o.peers[(k + i) % o.peers.length] as PeerName);
      const order = i % 2 === 1 ? rotated.reverse() : rotated;
      const run: RunResult = { index: i, order };
      for (const peer of order) {
        const r = await measure(peer, target, o, dir, `run${i}-${peer}`);
        (run as unknown as Record<string, unknown>)[peer] = r;
        log(`run ${i + 1}/${o.runs} ${describe(peer, r)}`);
        await sleep(o.settleMs);
      }
      runs.push(run);
    }
  } finally {
    if (target) await target.stop();
    rmSync(dir, { recursive: true, force: true });
  }

  return {
    scenario: 'snapshot-1gib',
    startedAt,
    finishedAt: new Date().toISOString(),
    machine: { atStart, loadavgAtEnd: machineInfo().loadavg },
    tree,
    options: o,
    target: { args: targetArgs, fillMillis: typeof target?.ready['fillMillis'] === 'number' ? target.ready['fillMillis'] : null },
    roundtrip,
    pipeline,
    runs,
    ...summarize({ runs, roundtrip }),
  };
}
