import ora from 'ora';
import { snapshotProcess, type SnapshotProgress, type SnapshotResult } from '../../core/snapshot.js';
import { usageError } from '../../common/errors.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes, micros, millis } from '../format.js';
import { defineCommand } from './types.js';
import { numberOption, positiveInteger, snapshotName } from '../args.js';
import { STORE_PRIORITIES, type StorePriority } from '../../store/priority.js';
import { resolveGroup } from '../../core/group-members.js';
import { runGroupSnapshot } from './snapshot-group.js';

/**
 * The percentage counts pages with data only: zero pages are found in bulk
 * (and cost nothing), so counting them put the line at 90% at once and then
 * held it at 99% while the pages with data were copied.
 */
export function progressLine(p: SnapshotProgress, rateMBps?: number): string {
  if (p.phase === 'compressing') {
    const staged = p.stagingBytes > 0 ? ` (${bytes(p.stagingBytes)} staged)` : '';
    return `compressing: every page saved and unprotected (the target runs freely), ${p.batchesPending} batch${p.batchesPending === 1 ? '' : 'es'} left to store${staged}`;
  }
  const withData = p.totalPages - p.zeroPages;
  const saved = p.pagesDone - p.zeroPages;
  const pct = withData > 0 ? Math.floor((100 * saved) / withData) : 100;
  const rate = p.elapsedMillis > 0 ? (p.bytesCopied / 1e6 / (p.elapsedMillis / 1000)).toFixed(0) : '0';
  const limit = rateMBps === undefined ? '' : ` (sweep limited to ${rateMBps} MB/s; faults are not rate-limited)`;
  return `saving: ${pct}% ${saved}/${withData} pages with data (${p.zeroPages} zero of ${p.totalPages}), ${rate} MB/s${limit}, ${p.faults} faults`;
}

/** $WPSNAP_PRIORITY when it names a priority, else idle. */
export function defaultPriority(env: string | undefined): StorePriority {
  if (env === undefined || env === '') return 'idle';
  if ((STORE_PRIORITIES as readonly string[]).includes(env)) return env as StorePriority;
  throw usageError(`WPSNAP_PRIORITY must be one of ${STORE_PRIORITIES.join(', ')}, not "${env}"`);
}

export function summary(r: SnapshotResult): string[] {
  const lines = [
    `snapshot ${r.id}${r.name ? ` (${r.name})` : ''} of pid ${r.pid} complete`,
    `  paused ${micros(r.pauseMicros)}, then protected for ${millis(r.protectWindowMillis)}; durable after ${millis(r.durableMillis)}, took ${millis(r.durationMillis)}`,
    `  ${r.pagesSaved} pages saved, ${r.zeroPages} zero pages, ${bytes(r.bytesRaw)} raw -> ${bytes(r.bytesStored)} stored`,
    `  ${r.faults} write faults served (p50 ${micros(r.faultP50Micros)}, p99 ${micros(r.faultP99Micros)})`,
    `  ${bytes(r.stagingBytesPeak)} waited for the store at most (${bytes(r.staging.spillBytesPeak)} of it on disk)`,
    `  the target used ${r.targetCpu.before} CPUs before, ${r.targetCpu.window} while protected, ${r.targetCpu.compressing} while the store compressed (at ${r.priority} priority)`,
  ];
  if (r.parent !== undefined) {
    const unchanged = r.writtenUnchangedPages == null ? '' : `, ${r.writtenUnchangedPages} written back unchanged`;
    lines.push(
      `  generation of snapshot ${r.parent} (${r.incremental === 'compared' ? 'not tracked since it: every page captured and compared with it' : `tracked since it: ${r.dirtyPages} pages written since read`}): ${r.changedPages} pages changed${unchanged}, ${r.pagesStored} stored`,
    );
  }
  if (r.tookOverFrom !== undefined) {
    lines.push(`  took the tracking since snapshot ${r.tookOverFrom.base} (${r.tookOverFrom.since}) over from keeper ${r.tookOverFrom.keeperPid}`);
  }
  if (r.tracking) lines.push(`  tracked from this instant on by keeper ${r.tracking.keeperPid}: next, wpsnap snapshot ${r.pid} --parent ${r.id}; stop with wpsnap untrack ${r.pid}`);
  if (r.staging.fallback !== null) lines.push(`  staging fell back to memory: ${r.staging.fallback}`);
  if (r.priorityRaised) lines.push(`  staging filled up: the store ran at normal priority until every page was saved`);
  if (r.lostPages.length === 0) {
    lines.push(r.warnings.length === 0 ? '  exact: no page lost' : '  no page listed lost, but see the warnings');
  } else {
    const total = r.lostPages.reduce((n, l) => n + l.pages, 0);
    lines.push(`  ${total} pages NOT captured (see wpsnap show ${r.id}):`);
    for (const l of r.lostPages.slice(0, 5)) lines.push(`    ${l.address} +${l.pages} pages: ${l.reason}`);
    if (r.lostPages.length > 5) lines.push(`    … ${r.lostPages.length - 5} more ranges`);
  }
  for (const w of r.warnings) lines.push(`  WARNING: ${w}`);
  return lines;
}

export const snapshotCommand = defineCommand({
  command: 'snapshot [pid..]',
  describe: 'Snapshot the memory of running processes (one, or several at one instant); they are stopped only while their memory is write-protected',
  builder: (y) =>
    y
      .positional('pid', {
        type: 'string',
        array: true,
        describe: 'process(es) to snapshot; several are snapshotted at one instant, their shared memory saved once',
        coerce: (raw: string[]) => raw.map(positiveInteger('a pid')),
      })
      .option('tree', { type: 'boolean', default: false, describe: 'also every descendant of the named processes (one instant for all)' })
      .option('cgroup', { type: 'string', describe: 'every process of this cgroup v2 directory (e.g. /sys/fs/cgroup/app), one instant for all' })
      .option('name', { type: 'string', describe: 'a unique name to refer to the snapshot by', coerce: snapshotName })
      .option('parent', {
        type: 'string',
        describe: 'an earlier snapshot of this process (id or name): take the next generation, storing only the pages that changed since',
      })
      .option('track', {
        type: 'boolean',
        default: false,
        describe: 'keep the target tracked after the snapshot (a keeper process holds it; see wpsnap status, wpsnap untrack): the next --parent of this snapshot reads only the pages written since',
      })
      .option('rate', {
        type: 'string',
        describe: 'limit the background sweep to this many MB/s (default: unlimited; faults are never limited)',
        coerce: numberOption('rate', 'MB/s'),
      })
      .option('max-shared-copy', {
        type: 'string',
        coerce: numberOption('max-shared-copy', 'MiB', { allowZero: true }),
        describe: 'MiB of shared memory uffd-wp cannot protect (SysV segments) to copy during the pause (default 512); beyond it is listed as lost',
      })
      .option('priority', {
        choices: ['idle', 'nice', 'normal'] as const,
        describe: "the store's CPU priority once the target runs again: idle (SCHED_IDLE: only CPUs the target leaves), nice (nice 19), normal (done sooner, the target slower). Default: $WPSNAP_PRIORITY, else idle",
      })
      .option('pre-protect', {
        type: 'boolean',
        default: true,
        describe: 'write-protect the target while it runs, so the pause only protects what it wrote since (--no-pre-protect: all in the pause)',
      })
      .option('staging-dir', {
        type: 'string',
        describe: "where copied pages wait on disk for the store when the memory pool is full (default: the store's directory); the file is private and unlinked",
      })
      .option('staging-max', {
        type: 'string',
        coerce: numberOption('staging-max', 'MiB', { allowZero: true }),
        describe: 'MiB of spill file in use at most (default: half the free space there; 0: no spill file, the memory pool only)',
      })
      .option('staging-memory', {
        type: 'string',
        coerce: numberOption('staging-memory', 'MiB'),
        describe: 'MiB of memory for copied pages waiting for the store (default: the target\'s resident size, at most a quarter of the available memory and 4 GiB)',
      }),
  async handler(args, ctx: CommandContext) {
    const named = args.pid ?? [];
    const asGroup = named.length > 1 || args.tree || args.cgroup !== undefined;
    if (!asGroup && named.length === 0) throw usageError('name the process to snapshot: wpsnap snapshot <pid> (or several pids, --tree, --cgroup DIR)');
    if (asGroup && (args.parent !== undefined || args.track)) throw usageError('--parent and --track take one process: a group snapshot (several pids, --tree, --cgroup) has no generations yet');
    // Members are read before the store is opened: a bad pid or cgroup costs nothing.
    const members = asGroup ? resolveGroup({ pids: args.tree ? [] : named, ...(args.tree ? { tree: named } : {}), ...(args.cgroup === undefined ? {} : { cgroup: args.cgroup }) }) : named;
    const binding = ctx.binding();
    const store = await ctx.openStore(args.store);
    const pid = members[0]!;
    const spinner = !args.json && ctx.stderr.isTTY ? ora({ stream: ctx.stderr, text: asGroup ? `stopping ${members.length} processes (the pause)` : `protecting pid ${pid} (the pause)` }).start() : null;
    let lastLine = 0;
    // What a snapshot of one process and of a group take alike.
    const common = {
      ...(args.name === undefined ? {} : { name: args.name }),
      ...(args.rate === undefined ? {} : { rateBytesPerSec: args.rate * 1e6 }),
      ...(args.maxSharedCopy === undefined ? {} : { maxSharedCopyBytes: args.maxSharedCopy * 1024 * 1024 }),
      preProtect: args.preProtect,
      priority: args.priority ?? defaultPriority(process.env['WPSNAP_PRIORITY']),
      staging: {
        dir: args.stagingDir,
        maxBytes: args.stagingMax === undefined ? undefined : args.stagingMax * 1024 * 1024,
        memoryBytes: args.stagingMemory === undefined ? undefined : args.stagingMemory * 1024 * 1024,
      },
      signal: ctx.signal,
    };
    try {
      if (asGroup) {
        await runGroupSnapshot(ctx, binding, store, members.map((m) => ({ pid: m })), { ...common, rateMBps: args.rate, json: args.json }, spinner);
        return;
      }
      const result = await snapshotProcess(binding, store, pid, {
        ...common,
        ...(args.parent === undefined ? {} : { parent: args.parent }),
        track: args.track,
        onProgress: (p) => {
          if (spinner) {
            spinner.text = `pid ${pid}: ${progressLine(p, args.rate)}`;
          } else if (!args.json && p.elapsedMillis - lastLine >= 1000) {
            lastLine = p.elapsedMillis;
            println(ctx.stderr, `pid ${pid}: ${progressLine(p, args.rate)}`);
          }
        },
      });
      spinner?.stop();
      if (args.json) {
        const { engine: _engine, ...rest } = result;
        printJson(ctx, { ...rest, engine: result.engine });
      } else {
        for (const line of summary(result)) println(ctx.stdout, line);
      }
    } finally {
      spinner?.stop();
      await store.close();
    }
  },
});
