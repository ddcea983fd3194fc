// Each peer of the impact scenario measured once against a running faultlat
// target (started with --heartbeat --fork-child zstd): nothing (baseline),
// fork() with the child compressing its copy (fork-zstd), gcore then zstd -1
// of its core (gcore-zstd: one measurement gives the "gcore" and the
// "gcore + zstd" figures), and wpsnap snapshot (at the CLI's default priority
// or a given --priority).
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { CpuAccountSampler, Faultlat, isAlive, procKiB, round, runCommand, sleep, snapshotDocument, TaskSampler, type FaultlatReport } from './lib.js';
import type {
  BaselineResult,
  HeartbeatGap,
  ForkZstdResult,
  GcoreZstdResult,
  ImpactOptions,
  ImpactWindow,
  Outcome,
  PeerName,
  PeerResult,
  Phase,
  Priority,
  WpsnapResult,
} from './impact-types.js';

/** Phases shorter than this get no CPU share: schedstat is sampled every 50 ms. */
const MIN_PHASE_MS = 100;

interface OpenWindow {
  /** performance.now() just before the window was opened: window ms = performance.now() - t0. */
  t0: number;
  sched: TaskSampler;
  /** The machine's CPU, ours (the bench, the target, the peer) and the target's own threads, every 100 ms. */
  cpu: CpuAccountSampler;
}

async function openWindow(t: Faultlat): Promise<OpenWindow> {
  const sched = new TaskSampler(t.pid, 10);
  const cpu = new CpuAccountSampler(t.pid);
  const t0 = performance.now();
  await t.startWindow();
  return { t0, sched, cpu };
}

/** Stop sampling (the samplers keep what they have). */
function closeWindow(w: OpenWindow): void {
  w.sched.stop();
  w.cpu.stop();
}

/** CPUs used in [fromMs, toMs] of the window by the target's threads, the peer (a fork child and its zstd, gcore, zstd, wpsnap; with the bench) and unrelated processes. */
function cpusDuring(w: OpenWindow, fromMs: number, toMs: number): { target: number | null; peer: number | null; others: number | null } {
  const c = w.cpu.during(w.t0 + fromMs, w.t0 + toMs);
  if (c === null) return { target: null, peer: null, others: null };
  return { target: round(c.own, 2), peer: round(c.tree - c.own, 2), others: round(c.others, 2) };
}

const windowMs = (w: OpenWindow): number => performance.now() - w.t0;

function phase(w: OpenWindow, name: string, fromMs: number, toMs: number): Phase {
  const long = toMs - fromMs >= MIN_PHASE_MS;
  const s = long ? w.sched.shares(w.t0 + fromMs, w.t0 + toMs) : null;
  const c = long ? cpusDuring(w, fromMs, toMs) : null;
  return {
    name,
    fromMs: round(fromMs, 1) as number,
    toMs: round(toMs, 1) as number,
    cpuShare: s === null ? null : round(s.cpu, 3),
    runqueueShare: s === null ? null : round(s.runqueue, 3),
    peerCpus: c?.peer ?? null,
    othersCpus: c?.others ?? null,
  };
}

/** The heartbeat's gaps, each with what its thread did meanwhile. */
function heartbeatGaps(w: OpenWindow, gaps: Array<{ nanos: number; atMillis: number }>): HeartbeatGap[] {
  const tid = w.sched.others()[0];
  return gaps
    .slice()
    .sort((a, b) => a.atMillis - b.atMillis)
    .map((g) => {
      const ms = g.nanos / 1e6;
      const d = tid === undefined ? null : w.sched.during(w.t0 + g.atMillis - ms, w.t0 + g.atMillis, tid);
      const c = cpusDuring(w, g.atMillis - ms, g.atMillis);
      return {
        ms: round(ms, 2) as number,
        at: round(g.atMillis, 1) as number,
        waitMs: d === null ? null : round(Math.min(d.waitMs, ms), 2),
        runMs: d === null ? null : round(d.runMs, 2),
        states: d?.states ?? {},
        targetCpus: c.target,
        peerCpus: c.peer,
        othersCpus: c.others,
      };
    });
}

function toWindow(w: OpenWindow, r: FaultlatReport, phases: Phase[]): ImpactWindow {
  const hb = r.heartbeat ?? null;
  const hbGaps = hb === null ? [] : heartbeatGaps(w, hb.gaps);
  const stops = hbGaps.filter((g) => g.waitMs !== null).map((g) => g.ms - (g.waitMs as number));
  const c = cpusDuring(w, 0, r.windowMillis);
  const whole: Phase = {
    name: 'window',
    fromMs: 0,
    toMs: round(r.windowMillis, 1) as number,
    cpuShare: r.cpuMillis === null || r.windowMillis <= 0 ? null : round(r.cpuMillis / r.windowMillis, 3),
    runqueueShare: r.runqueueWaitMillis === null || r.windowMillis <= 0 ? null : round(r.runqueueWaitMillis / r.windowMillis, 3),
    peerCpus: c.peer,
    othersCpus: c.others,
  };
  return {
    windowMillis: round(r.windowMillis, 1) as number,
    writes: r.writes,
    writesPerSec: r.writesPerSec,
    sliceMillis: r.perWindow.millis,
    slices: r.perWindow.counts,
    tail: r.tail ?? { writes: 0, millis: 0 },
    maxGapMillis: round(r.maxGapNanos / 1e6, 2) as number,
    maxGapAtMillis: round(r.maxGapAtMillis, 1) as number,
    faultedCount: r.faulted.count,
    faultedP50Micros: round(r.faulted.p50Nanos / 1e3, 1) as number,
    faultedP99Micros: round(r.faulted.p99Nanos / 1e3, 1) as number,
    firstWriteCount: r.firstWrite.count,
    heartbeat:
      hb === null
        ? null
        : {
            beats: hb.beats,
            maxGapMillis: round(hb.maxGapNanos / 1e6, 2) as number,
            atMillis: round(hb.atMillis, 1) as number,
            p50GapMicros: round(hb.p50GapNanos / 1e3, 1) as number,
            p99GapMicros: round(hb.p99GapNanos / 1e3, 1) as number,
            gaps: hbGaps,
            maxStopMillis: stops.length > 0 ? round(Math.max(...stops), 2) : null,
          },
    cache: r.cache ? { writeRate: r.cache.writeRate, scheduled: r.cache.scheduled, missed: r.cache.missed } : null,
    phases: [whole, ...phases],
  };
}

function fsyncFile(file: string): void {
  const fd = openSync(file, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

// ---- the measurements -----------------------------------------------------

async function measureBaseline(t: Faultlat, o: ImpactOptions): Promise<BaselineResult> {
  const w = await openWindow(t);
  try {
    await sleep(o.baselineMs);
    const report = await t.report();
    closeWindow(w);
    return { kind: 'baseline', window: toWindow(w, report, []) };
  } finally {
    closeWindow(w);
  }
}

async function measureForkZstd(t: Faultlat, forkOut: string, timeoutMs: number): Promise<ForkZstdResult> {
  const w = await openWindow(t);
  let sampler: NodeJS.Timeout | undefined;
  try {
    const f = await t.fork();
    if (!f.fork) throw new Error(`the target's fork() failed: ${f.error ?? '?'}`);
    if (f.child !== 'zstd') throw new Error('the target was not started with --fork-child zstd');
    // The child's Private_Dirty grows with every page the parent copies away from it: keep the last (largest) reading.
    let privateDirty: number | null = null;
    let samples = 0;
    sampler = setInterval(() => {
      const v = procKiB(`/proc/${f.childPid}/smaps_rollup`, 'Private_Dirty');
      if (v === null) return;
      samples++;
      privateDirty = Math.max(privateDirty ?? 0, v);
    }, 1000);
    const exit = await t.forkChildExit(f.childPid, timeoutMs);
    clearInterval(sampler);
    const report = await t.report();
    closeWindow(w);
    if (exit.status !== 0) throw new Error(`the fork child exited with status ${exit.status} (faultlat: 10-15 = a step of its compression failed)`);
    const forkMs = f.forkMicros / 1e3;
    const end = f.atMillis + forkMs + exit.livedMillis;
    return {
      kind: 'fork-zstd',
      forkMicros: f.forkMicros,
      childLivedMillis: round(exit.livedMillis, 1) as number,
      childStatus: exit.status,
      wallMillis: round(forkMs + exit.livedMillis, 1) as number,
      storedBytes: statSync(forkOut).size,
      childPrivateDirtyKiB: privateDirty,
      childSamples: samples,
      window: toWindow(w, report, [phase(w, 'fork+child', f.atMillis, end)]),
    };
  } finally {
    if (sampler) clearInterval(sampler);
    closeWindow(w);
    rmSync(forkOut, { force: true });
  }
}

async function measureGcoreZstd(t: Faultlat, dir: string, timeoutMs: number): Promise<GcoreZstdResult> {
  const prefix = join(dir, 'core');
  const core = `${prefix}.${t.pid}`;
  const zfile = join(dir, 'core.zst');
  const w = await openWindow(t);
  try {
    const gStart = windowMs(w);
    const g = await runCommand('gcore', ['-o', prefix, String(t.pid)], { timeoutMs });
    const gEnd = windowMs(w);
    // The window goes on: this report is "gcore" alone, the next one "gcore + zstd".
    const gReport = await t.report();
    if (g.code !== 0 || !existsSync(core)) {
      throw new Error(`gcore exited ${g.code ?? g.signal}${g.timedOut ? ' (timed out)' : ''}: ${g.stderr.trim().slice(-400)}`);
    }
    const zStart = performance.now();
    const z = await runCommand('zstd', ['-1', '-T1', '-q', '-f', '-o', zfile, core], { timeoutMs });
    if (z.code !== 0) throw new Error(`zstd exited ${z.code ?? z.signal}: ${z.stderr.trim().slice(-400)}`);
    fsyncFile(zfile);
    const zMillis = performance.now() - zStart;
    const zEnd = windowMs(w);
    const report = await t.report();
    closeWindow(w);
    const gPhase = phase(w, 'gcore', gStart, gEnd);
    return {
      kind: 'gcore-zstd',
      gcoreWallMillis: round(g.wallMillis, 1) as number,
      gcoreCpuMillis: g.cpuUserMillis + g.cpuSysMillis,
      coreBytes: statSync(core).size,
      zstdWallMillis: round(zMillis, 1) as number,
      zstdBytes: statSync(zfile).size,
      wallMillis: round(g.wallMillis + zMillis, 1) as number,
      gcoreWindow: toWindow(w, gReport, [gPhase]),
      window: toWindow(w, report, [gPhase, phase(w, 'zstd', zEnd - zMillis, zEnd)]),
    };
  } finally {
    closeWindow(w);
    rmSync(core, { force: true });
    rmSync(zfile, { force: true });
  }
}

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/** Where the pause ended, in window ms (see WpsnapResult.resumeFrom). */
function findResume(w: OpenWindow, r: FaultlatReport, pauseMs: number, cliStart: number, estimate: number): { at: number; from: WpsnapResult['resumeFrom'] } {
  const stopped = w.sched.lastInState('t', w.t0 + cliStart, w.t0 + estimate + 300);
  if (stopped !== null) return { at: (stopped.at + stopped.nextAt) / 2 - w.t0, from: 'ptrace' };
  const near = (gaps: Array<{ nanos: number; atMillis: number }> | undefined): number | null => {
    let best: number | null = null;
    for (const g of gaps ?? []) {
      if (g.nanos / 1e6 < 0.8 * pauseMs || Math.abs(g.atMillis - estimate) > 300) continue;
      if (best === null || Math.abs(g.atMillis - estimate) < Math.abs(best - estimate)) best = g.atMillis;
    }
    return best;
  };
  const hb = near(r.heartbeat?.gaps);
  if (hb !== null) return { at: hb, from: 'heartbeat' };
  const wr = near(r.gaps);
  if (wr !== null) return { at: wr, from: 'writer' };
  return { at: estimate, from: 'durable' };
}

async function measureWpsnap(t: Faultlat, o: ImpactOptions, dir: string, priority: Priority | null, timeoutMs: number): Promise<WpsnapResult> {
  const storeDir = mkdtempSync(join(dir, 'store-'));
  const args = [o.cli, 'snapshot', String(t.pid), '--json', '--store', join(storeDir, 'store.db')];
  if (priority !== null) args.push('--priority', priority);
  const w = await openWindow(t);
  try {
    const cliStart = windowMs(w);
    const r = await runCommand(process.execPath, args, { timeoutMs, sampleThreads: true, sampleMemory: true });
    const cliEnd = windowMs(w);
    const report = await t.report();
    closeWindow(w);
    const doc = snapshotDocument(r);
    const pauseMs = (doc['pauseMicros'] as number) / 1e3;
    const durable = num(doc['durableMillis']);
    const window = num(doc['protectWindowMillis']);
    const estimate = cliEnd - (durable ?? (doc['durationMillis'] as number));
    const resume = findResume(w, report, pauseMs, cliStart, estimate);
    const pauseStart = resume.at - pauseMs;
    const protectedEnd = resume.at + (window ?? 0);
    const phases = [phase(w, 'startup', cliStart, pauseStart), phase(w, 'pause', pauseStart, resume.at)];
    if (window !== null) phases.push(phase(w, 'protected', resume.at, protectedEnd));
    phases.push(phase(w, 'after', window === null ? resume.at : protectedEnd, cliEnd));
    const lost = ((doc['lostPages'] as Array<{ pages: number }> | undefined) ?? []).reduce((n, l) => n + l.pages, 0);
    return {
      kind: 'wpsnap',
      priority,
      wallMillis: round(r.wallMillis, 1) as number,
      cpuUserMillis: r.cpuUserMillis,
      cpuSysMillis: r.cpuSysMillis,
      vmHwmKiB: r.vmHwmKiB ?? null,
      threads: r.threads ?? null,
      pauseMicros: doc['pauseMicros'] as number,
      durationMillis: doc['durationMillis'] as number,
      protectWindowMillis: window,
      durableMillis: durable,
      bytesRaw: doc['bytesRaw'] as number,
      bytesStored: doc['bytesStored'] as number,
      faults: doc['faults'] as number,
      faultP50Micros: doc['faultP50Micros'] as number,
      faultP99Micros: doc['faultP99Micros'] as number,
      lostPages: lost,
      pauseBreakdownMicros: (doc['pauseBreakdownMicros'] as Record<string, number> | undefined) ?? null,
      stagingBytesPeak: num(doc['stagingBytesPeak']),
      stops: doc['stops'] ?? null,
      targetCpuShare: doc['targetCpuShare'] ?? null,
      cliStartMs: round(cliStart, 1) as number,
      cliEndMs: round(cliEnd, 1) as number,
      resumeAtMs: round(resume.at, 1) as number,
      resumeEstimateMs: round(estimate, 1) as number,
      resumeFrom: resume.from,
      window: toWindow(w, report, phases),
    };
  } finally {
    closeWindow(w);
    rmSync(storeDir, { recursive: true, force: true });
  }
}

export async function measure(
  peer: PeerName,
  t: Faultlat,
  o: ImpactOptions,
  dir: string,
  forkOut: string,
  mib: number,
): Promise<Outcome<PeerResult>> {
  const timeoutMs = o.timeoutMs + (o.timeoutMsPerGiB * mib) / 1024;
  try {
    if (peer === 'baseline') return await measureBaseline(t, o);
    if (peer === 'fork-zstd') return await measureForkZstd(t, forkOut, timeoutMs);
    if (peer === 'gcore-zstd') return await measureGcoreZstd(t, dir, timeoutMs);
    if (peer === 'wpsnap') return await measureWpsnap(t, o, dir, null, timeoutMs);
    return await measureWpsnap(t, o, dir, peer.slice('wpsnap-'.length) as Priority, timeoutMs);
  } catch (error) {
    if (!isAlive(t.pid)) throw new Error(`the target ${t.pid} died during ${peer}: ${String(error)}`);
    return { error: (error instanceof Error ? error.message : String(error)).replace(/\s+/g, ' ') };
  }
}
