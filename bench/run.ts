// `npm run bench` → node dist/bench/run.js [options]: runs the snapshot-1gib
// scenario, prints its table and writes its JSON file under bench/results/.
// `node dist/bench/run.js impact [options]` runs the impact scenario instead
// (bench/impact.ts; its own options, see --help there); likewise restore, group, …
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { exportCoreMain } from './export-core.js';
import { groupMain } from './group.js';
import { impactMain } from './impact.js';
import { log, repoRoot } from './lib.js';
import { precopyMain } from './precopy.js';
import { rollbackMain } from './rollback.js';
import { restoreMain } from './restore.js';
import { trackMain } from './track.js';
import { DEFAULTS, PEERS, printTable, runSnapshot1GiB, summarize, type PeerName, type Snapshot1GiBResult } from './snapshot-1gib.js';

const USAGE = `usage: node dist/bench/run.js [options]
       node dist/bench/run.js impact [options]   (the impact scenario: impact --help)
       node dist/bench/run.js track [options]    (dirty-tracking costs: track --help)
       node dist/bench/run.js precopy [options]  (pre-copy and incremental generations: precopy --help)
       node dist/bench/run.js export-core [options]  (core export against gcore: export-core --help)
       node dist/bench/run.js rollback [--runs N] [--mib M] [--touch P]  (rollback against a fork server)
       node dist/bench/run.js restore [--runs N] [--mib M]  (restore, eager and lazy, against starting afresh)
       node dist/bench/run.js group [--runs N] [--mib M]  (a process group's snapshot against each member's fork: group --help)
  --runs N          measured repetitions of every peer (default ${DEFAULTS.runs})
  --mib M           target size in MiB (default ${DEFAULTS.mib})
  --rate MBPS       --rate of the rate-limited wpsnap peer (default ${DEFAULTS.rateMBps})
  --peers LIST      comma-separated subset of ${PEERS.join(',')}
  --settle-ms MS    pause between measurements (default ${DEFAULTS.settleMs})
  --pipeline-mib M  MiB for the offline pipeline-stage costs (default ${DEFAULTS.pipelineMib}; 0 skips)
  --cli PATH        the wpsnap CLI to benchmark (default dist/cli/main.js)
  --out FILE        result JSON (default bench/results/snapshot-1gib-<UTC timestamp>.json)
  --no-write        do not write a result file
  --summarize FILE  recompute medians and ratios of a saved result file, print them (and rewrite FILE, unless --no-write)`;

function positive(name: string, v: string | undefined, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) {
    process.stderr.write(`--${name} must be a positive number\n${USAGE}\n`);
    process.exit(2);
  }
  return n;
}

async function main(): Promise<void> {
  if (process.argv[2] === 'impact') {
    process.exitCode = await impactMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'restore') {
    process.exitCode = await restoreMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'group') {
    process.exitCode = await groupMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'track') {
    process.exitCode = await trackMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'precopy') {
    process.exitCode = await precopyMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'rollback') {
    process.exitCode = await rollbackMain(process.argv.slice(3));
    return;
  }
  if (process.argv[2] === 'export-core') {
    process.exitCode = await exportCoreMain(process.argv.slice(3));
    return;
  }
  const { values } = parseArgs({
    options: {
      runs: { type: 'string' },
      mib: { type: 'string' },
      rate: { type: 'string' },
      peers: { type: 'string' },
      'settle-ms': { type: 'string' },
      out: { type: 'string' },
      cli: { type: 'string' },
      'pipeline-mib': { type: 'string' },
      'no-write': { type: 'boolean' },
      summarize: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  if (values.summarize !== undefined) {
    const saved = JSON.parse(readFileSync(values.summarize, 'utf8')) as Snapshot1GiBResult;
    const result = { ...saved, ...summarize(saved) };
    printTable(result);
    if (!values['no-write']) writeFileSync(values.summarize, `${JSON.stringify(result)}\n`);
    return;
  }
  const peers = values.peers === undefined ? [...PEERS] : (values.peers.split(',').map((p) => p.trim()) as PeerName[]);
  for (const p of peers) {
    if (!(PEERS as readonly string[]).includes(p)) {
      process.stderr.write(`unknown peer ${p}\n${USAGE}\n`);
      process.exit(2);
    }
  }
  const result = await runSnapshot1GiB({
    runs: Math.floor(positive('runs', values.runs, DEFAULTS.runs)),
    mib: Math.floor(positive('mib', values.mib, DEFAULTS.mib)),
    rateMBps: positive('rate', values.rate, DEFAULTS.rateMBps),
    settleMs: positive('settle-ms', values['settle-ms'], DEFAULTS.settleMs),
    peers,
    pipelineMib: values['pipeline-mib'] === '0' ? 0 : Math.floor(positive('pipeline-mib', values['pipeline-mib'], DEFAULTS.pipelineMib)),
    ...(values.cli === undefined ? {} : { cli: values.cli }),
  });
  printTable(result);
  if (!values['no-write']) {
    const stamp = result.startedAt.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    const out = values.out ?? join(repoRoot(), 'bench', 'results', `snapshot-1gib-${stamp}.json`);
    mkdirSync(join(out, '..'), { recursive: true });
    writeFileSync(out, `${JSON.stringify(result)}\n`);
    log(`wrote ${out}`);
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
