import { formatSigmask } from '../../snapshot-format/model.js';
import { pcAndSp } from '../../snapshot-format/regs-x86_64.js';
import { printJson, println, type CommandContext } from '../context.js';
import { bytes, micros, millis, table } from '../format.js';
import { defineCommand } from './types.js';

export const showCommand = defineCommand({
  command: 'show <snapshot>',
  describe: 'Show what a snapshot holds: process identity, threads, memory map, lost pages, statistics',
  builder: (y) => y.positional('snapshot', { type: 'string', describe: 'snapshot id or name', demandOption: true }),
  async handler(args, ctx: CommandContext) {
    const store = await ctx.openStore(args.store, { readonly: true });
    try {
      const snap = store.find(args.snapshot);
      const processes = store.processes(snap.id).map((p) => {
        // sigmask: the blocked signals at T, "0x…" (bit n-1: signal n), null when not recorded.
        const threads = store.threads(p.processId).map((t) => ({ tid: t.tid, name: t.name, ...pcAndSp(t), sigmask: formatSigmask(t.sigmask) }));
        return {
          pid: p.pid,
          // Its pid in each PID namespace, ours first; null when not recorded.
          nsPids: p.nsPids ?? null,
          ppid: p.ppid,
          uid: p.uid,
          gid: p.gid,
          exe: p.exe,
          cmdline: p.cmdline,
          comm: p.comm,
          startedAt: p.startedAt,
          threads,
          regions: store.regions(p.processId),
          lost: store.lost(p.processId),
          // What a restore will need (fds, cwd, umask, limits, …; FORMAT.md, "process_state"); null when not recorded.
          state: store.processState(p.processId) ?? null,
        };
      });
      if (args.json) {
        printJson(ctx, { ...snap, processes });
        return;
      }
      println(ctx.stdout, `snapshot ${snap.id}${snap.name ? ` (${snap.name})` : ''}: ${snap.state}, taken ${snap.createdAt}`);
      if (snap.parentId !== null) {
        const g = snap.stats?.generation;
        const changed = g ? `: ${g.changedPages} pages changed, ${g.pagesStored} stored here` : '';
        println(ctx.stdout, `generation of snapshot ${snap.parentId} (${snap.incremental})${changed}; its other pages are the parent's (wpsnap log ${snap.id})`);
      }
      if (snap.stats) {
        const s = snap.stats;
        const window = s.protectWindowMillis === undefined ? '' : `, then protected for ${millis(s.protectWindowMillis)}`;
        println(ctx.stdout, `  paused ${micros(s.pauseMicros)}${window}, took ${millis(s.durationMillis)}, ${s.faults} faults (p50 ${micros(s.faultP50Micros)}, p99 ${micros(s.faultP99Micros)})`);
        println(ctx.stdout, `  ${s.pagesSaved} pages saved (${s.pagesNew} new in the store), ${s.zeroPages} zero, ${bytes(s.bytesRaw)} raw -> ${bytes(s.bytesStored)} stored`);
        for (const w of s.warnings ?? []) println(ctx.stdout, `  WARNING: ${w}`);
      } else if (snap.pauseMicros !== null) {
        const phases = Object.entries(snap.pauseBreakdownMicros ?? {}).map(([phase, us]) => `${phase} ${micros(us)}`);
        println(ctx.stdout, `  paused ${micros(snap.pauseMicros)}${phases.length > 0 ? ` (${phases.join(', ')})` : ''}`);
      }
      for (const p of processes) {
        println(ctx.stdout, '');
        println(ctx.stdout, `process ${p.pid} (${p.comm}), uid ${p.uid}, started ${p.startedAt}`);
        if (p.nsPids !== null && p.nsPids.length > 1) {
          println(ctx.stdout, `  pid ${p.nsPids.at(-1)} in its own PID namespace (NSpid, ours first: ${p.nsPids.join(' ')})`);
        }
        println(ctx.stdout, `  exe:     ${p.exe}`);
        println(ctx.stdout, `  cmdline: ${p.cmdline.map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ')}`);
        if (p.state === null) {
          println(ctx.stdout, '  state:   not recorded');
        } else {
          const kinds = new Map<string, number>();
          for (const fd of p.state.fds) kinds.set(fd.kind, (kinds.get(fd.kind) ?? 0) + 1);
          const byKind = [...kinds].map(([kind, n]) => `${n} ${kind}`).join(', ');
          println(ctx.stdout, `  fds (${p.state.fds.length}): ${byKind === '' ? 'none' : byKind}`);
          println(ctx.stdout, `  cwd:     ${p.state.cwd}, umask ${p.state.umask.toString(8).padStart(4, '0')}`);
        }
        println(ctx.stdout, `  threads (${p.threads.length}):`);
        for (const t of p.threads) {
          const blocked = t.sigmask === null ? '' : ` blocked ${t.sigmask}`;
          println(ctx.stdout, `    ${t.tid} ${t.name}  rip 0x${t.rip.toString(16)} rsp 0x${t.rsp.toString(16)}${blocked}`);
        }
        println(ctx.stdout, `  regions (${p.regions.length}):`);
        const rows = p.regions.map((r) => [
          `    ${r.start.toString(16)}-${r.end.toString(16)}`,
          r.perms,
          bytes(Number(r.end - r.start)),
          r.capture + (r.skipReason ? ` (${r.skipReason})` : ''),
          r.path,
        ]);
        if (rows.length > 0) println(ctx.stdout, table(rows));
        if (p.lost.length === 0) {
          println(ctx.stdout, '  lost pages: none');
        } else {
          println(ctx.stdout, `  lost pages (${p.lost.reduce((n, l) => n + l.pages, 0)}):`);
          for (const l of p.lost) println(ctx.stdout, `    0x${l.address.toString(16)} +${l.pages} pages: ${l.reason}`);
        }
      }
    } finally {
      await store.close();
    }
  },
});
