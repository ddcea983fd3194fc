// Each peer of the snapshot-1gib scenario measured once against the running
// faultlat target: baseline, fork(), gcore, wpsnap (with and without --rate),
// the engine alone, and the kernel's uffd-wp round trip.
import { existsSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { snapshotEngineOnly } from './engine-only.js';
import { Faultlat, isAlive, repoRoot, round, runCommand, sleep, snapshotDocument, zstdSize, type FaultlatReport } from './lib.js';
import type {
  BaselineResult,
  EngineOnlyPeerResult,
  ForkResult,
  GcoreResult,
  Outcome,
  PeerName,
  RoundtripResult,
  Snapshot1GiBOptions,
  TargetWindow,
  WpsnapResult,
} from './snapshot-1gib-types.js';

function startStall(w: TargetWindow, pauseMicros: number, notBefore: number): number | null {
  const g = w.gaps.find(([ms, at]) => ms * 1e3 >= 0.8 * pauseMicros && at >= notBefore);
  return g ? g[0] : null;
}

function toWindow(r: FaultlatReport): TargetWindow {
  const slices = r.perWindow.counts;
  return {
    windowMillis: round(r.windowMillis, 1) as number,
    writesPerSec: r.writesPerSec,
    minSliceWritesPerSec: slices.length > 0 ? Math.min(...slices) * (1000 / r.perWindow.millis) : null,
    faultedCount: r.faulted.count,
    faultedP50Micros: round(r.faulted.p50Nanos / 1e3, 1) as number,
    faultedP90Micros: round(r.faulted.p90Nanos / 1e3, 1) as number,
    faultedP99Micros: round(r.faulted.p99Nanos / 1e3, 1) as number,
    faultedMaxMicros: round(r.faulted.maxNanos / 1e3, 1) as number,
    maxGapMillis: round(r.maxGapNanos / 1e6, 2) as number,
    maxGapAtMillis: round(r.maxGapAtMillis, 1) as number,
    cpuShare: r.cpuMillis === null || r.windowMillis <= 0 ? null : round(r.cpuMillis / r.windowMillis, 2),
    runqueueShare: r.runqueueWaitMillis === null || r.windowMillis <= 0 ? null : round(r.runqueueWaitMillis / r.windowMillis, 2),
    gaps: r.gaps
      .slice()
      .sort((a, b) => a.atMillis - b.atMillis)
      .map((g): [number, number] => [round(g.nanos / 1e6, 2) as number, round(g.atMillis, 1) as number]),
  };
}

export const ok = <T>(o: Outcome<T> | undefined): T | undefined => (o !== undefined && !('error' in (o as object)) ? (o as T) : undefined);

// ---- the measurements -----------------------------------------------------

async function measureBaseline(t: Faultlat, o: Snapshot1GiBOptions): Promise<BaselineResult> {
  await t.startWindow();
  await sleep(o.baselineMs);
  return { window: toWindow(await t.report()) };
}

async function measureFork(t: Faultlat, o: Snapshot1GiBOptions): Promise<ForkResult> {
  await t.startWindow();
  const f = await t.fork();
  if (!f.fork) throw new Error(`the target's fork() failed: ${f.error ?? '?'}`);
  const exit = await t.forkChildExit(f.childPid, o.forkHoldMs + 30_000);
  // The window covers the child's life (and the few ms the reap took).
  const report = await t.report();
  return { forkMicros: f.forkMicros, childLivedMillis: round(exit.livedMillis, 1) as number, window: toWindow(report) };
}

async function measureGcore(t: Faultlat, o: Snapshot1GiBOptions, dir: string): Promise<GcoreResult> {
  const prefix = join(dir, 'core');
  const file = `${prefix}.${t.pid}`;
  try {
    await t.startWindow();
    const r = await runCommand('gcore', ['-o', prefix, String(t.pid)], { timeoutMs: o.timeoutMs });
    const report = await t.report();
    if (r.code !== 0 || !existsSync(file)) {
      throw new Error(`gcore exited ${r.code ?? r.signal}${r.timedOut ? ' (timed out)' : ''}: ${r.stderr.trim().slice(-400)}`);
    }
    const coreBytes = statSync(file).size;
    // Compressed size of the same memory with the reference compressor, measured outside the window.
    const z = await zstdSize(file, 1);
    return {
      wallMillis: round(r.wallMillis, 1) as number,
      cpuUserMillis: r.cpuUserMillis,
      cpuSysMillis: r.cpuSysMillis,
      minorFaults: r.minorFaults,
      coreBytes,
      zstd1Bytes: z.bytes,
      zstd1Millis: round(z.wallMillis, 1) as number,
      window: toWindow(report),
    };
  } finally {
    rmSync(file, { force: true });
  }
}

async function measureWpsnap(t: Faultlat, o: Snapshot1GiBOptions, dir: string, rateMBps: number | null, tag: string): Promise<WpsnapResult> {
  const store = join(dir, `${tag}.db`);
  const args = [o.cli, 'snapshot', String(t.pid), '--json', '--store', store];
  if (rateMBps !== null) args.push('--rate', String(rateMBps));
  try {
    await t.startWindow();
    const r = await runCommand(process.execPath, args, { timeoutMs: o.timeoutMs, sampleThreads: true });
    const report = await t.report();
    const doc = snapshotDocument(r);
    const lost = (doc['lostPages'] as Array<{ pages: number }>).reduce((n, l) => n + l.pages, 0);
    const window = toWindow(report);
    return {
      rateMBps,
      wallMillis: round(r.wallMillis, 1) as number,
      cpuUserMillis: r.cpuUserMillis,
      cpuSysMillis: r.cpuSysMillis,
      minorFaults: r.minorFaults,
      threads: r.threads ?? null,
      pauseMicros: doc['pauseMicros'] as number,
      durationMillis: doc['durationMillis'] as number,
      pagesSaved: doc['pagesSaved'] as number,
      zeroPages: doc['zeroPages'] as number,
      bytesRaw: doc['bytesRaw'] as number,
      bytesStored: doc['bytesStored'] as number,
      faults: doc['faults'] as number,
      faultP50Micros: doc['faultP50Micros'] as number,
      faultP99Micros: doc['faultP99Micros'] as number,
      lostPages: lost,
      engine: doc['engine'] as Record<string, unknown>,
      window,
      // durationMillis starts shortly before the freeze; the command's startup precedes it.
      pauseBreakdownMicros: (doc['pauseBreakdownMicros'] as Record<string, number> | undefined) ?? null,
      startStallMillis: startStall(window, doc['pauseMicros'] as number, r.wallMillis - (doc['durationMillis'] as number) - 500),
    };
  } finally {
    for (const suffix of ['', '-wal', '-shm', '-journal']) rmSync(store + suffix, { force: true });
  }
}

async function measureEngineOnly(t: Faultlat): Promise<EngineOnlyPeerResult> {
  await t.startWindow();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const r = await snapshotEngineOnly(t.pid);
  const wallMillis = Number(process.hrtime.bigint() - t0) / 1e6;
  const cpu = process.cpuUsage(cpu0);
  const report = await t.report();
  const window = toWindow(report);
  return {
    ...r,
    wallMillis: round(wallMillis, 1) as number,
    startStallMillis: startStall(window, r.pauseMicros, 0),
    cpuUserMillis: Math.round(cpu.user / 1e3),
    cpuSysMillis: Math.round(cpu.system / 1e3),
    window,
  };
}

export async function measureRoundtrip(copy: boolean, spin: boolean): Promise<RoundtripResult> {
  const bin = join(repoRoot(), 'fixtures', 'build', 'uffd_roundtrip');
  const args = ['--pages', '4096', '--rounds', '5', ...(copy ? ['--copy'] : []), ...(spin ? ['--spin'] : [])];
  const r = await runCommand(bin, args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`uffd_roundtrip exited ${r.code}: ${r.stderr.trim()}`);
  const doc = JSON.parse(r.stdout) as {
    sameCpu: { p50Nanos: number; p99Nanos: number };
    crossCpu: { p50Nanos: number; p99Nanos: number } | null;
  };
  const us = (n: number | undefined): number | null => (n === undefined ? null : (round(n / 1e3, 2) as number));
  return {
    copy,
    spin,
    sameCpuP50Micros: us(doc.sameCpu.p50Nanos) as number,
    sameCpuP99Micros: us(doc.sameCpu.p99Nanos) as number,
    crossCpuP50Micros: us(doc.crossCpu?.p50Nanos),
    crossCpuP99Micros: us(doc.crossCpu?.p99Nanos),
  };
}

export async function measure(
  peer: PeerName,
  t: Faultlat,
  o: Snapshot1GiBOptions,
  dir: string,
  tag: string,
): Promise<Outcome<BaselineResult | ForkResult | GcoreResult | WpsnapResult | EngineOnlyPeerResult>> {
  try {
    switch (peer) {
      case 'baseline':
        return await measureBaseline(t, o);
      case 'fork':
        return await measureFork(t, o);
      case 'gcore':
        return await measureGcore(t, o, dir);
      case 'wpsnap':
        return await measureWpsnap(t, o, dir, null, tag);
      case 'wpsnap-rate':
        return await measureWpsnap(t, o, dir, o.rateMBps, tag);
      case 'engine-only':
        return await measureEngineOnly(t);
    }
  } catch (error) {
    if (!isAlive(t.pid)) throw new Error(`the target ${t.pid} died during ${peer}: ${String(error)}`);
    return { error: (error instanceof Error ? error.message : String(error)).replace(/\s+/g, ' ') };
  }
}

