// `wpsnap snapshot` of several processes at once (pids, --tree, --cgroup): one
// instant for all of them, shared memory saved once (core/group.ts).
import type { Ora } from 'ora';
import { snapshotGroup, type GroupMember, type GroupSnapshotOptions, type GroupSnapshotResult } from '../../core/group.js';
import type { NativeBinding } from '../../core/binding.js';
import type { SnapshotTarget } from '../../core/sink.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes, micros, millis } from '../format.js';
import { progressLine } from './snapshot.js';

export function groupSummary(r: GroupSnapshotResult): string[] {
  const pids = r.processes.map((p) => p.pid);
  const lines = [
    `snapshot ${r.id}${r.name ? ` (${r.name})` : ''} of ${pids.length} processes (${pids.join(', ')}) complete, at one instant`,
    `  paused ${micros(r.pauseMicros)} (every member), then protected for ${millis(r.protectWindowMillis)}; took ${millis(r.durationMillis)}`,
    `  ${r.pagesSaved} pages saved, ${r.zeroPages} zero pages, ${bytes(r.bytesRaw)} raw -> ${bytes(r.bytesStored)} stored`,
    `  ${r.shared.objects} shared memory object${r.shared.objects === 1 ? '' : 's'} saved once; ${r.shared.pagesAliased} of their pages indexed for the other members that map them`,
  ];
  for (const p of r.processes) {
    const lost = p.lostPages.reduce((a, l) => a + l.pages, 0);
    lines.push(`  pid ${p.pid}: ${p.threads} threads, ${p.pagesSaved} pages saved by its engine, ${p.faults} faults${lost > 0 ? `, ${lost} pages lost` : ''}${p.exited ? ', EXITED during the snapshot' : ''}`);
  }
  if (r.lostPages.length === 0) {
    lines.push(r.warnings.length === 0 ? '  exact: no page lost' : '  no page listed lost, but see the warnings');
  } else {
    lines.push(`  ${r.lostPages.reduce((a, l) => a + l.pages, 0)} pages NOT captured (see wpsnap show ${r.id}):`);
    for (const l of r.lostPages.slice(0, 5)) lines.push(`    pid ${l.pid} ${l.address} +${l.pages} pages: ${l.reason}`);
    if (r.lostPages.length > 5) lines.push(`    … ${r.lostPages.length - 5} more ranges`);
  }
  for (const w of r.warnings) lines.push(`  WARNING: ${w}`);
  return lines;
}

/** Snapshot the members together and print the result (JSON, or a summary). */
export async function runGroupSnapshot(
  ctx: CommandContext,
  binding: NativeBinding,
  store: SnapshotTarget,
  members: GroupMember[],
  options: GroupSnapshotOptions & { json: boolean; rateMBps?: number | undefined },
  spinner: Ora | null,
): Promise<GroupSnapshotResult> {
  let lastLine = 0;
  const label = `${members.length} processes`;
  const result = await snapshotGroup(binding, store, members, {
    ...options,
    onProgress: (p) => {
      const line = `${label}: ${progressLine(p, options.rateMBps)}`;
      if (spinner) spinner.text = line;
      else if (!options.json && p.elapsedMillis - lastLine >= 1000) {
        lastLine = p.elapsedMillis;
        println(ctx.stderr, line);
      }
    },
  });
  spinner?.stop();
  if (options.json) printJson(ctx, result);
  else for (const line of groupSummary(result)) println(ctx.stdout, line);
  return result;
}
