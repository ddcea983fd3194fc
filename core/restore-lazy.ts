// restore --lazy: the process runs as soon as its layout, threads and
// registers are in place; its anonymous private memory is registered with a
// userfaultfd (missing pages) and served from the store by the native page
// server (core/native/lazy_server.c): a page the process touches first is
// read from the store and copied in at once, the others by a background pass.
// The guardian holds a copy of the userfaultfd: if the server dies before
// every page is in, the registration stays (the process blocks on a missing
// page rather than read zero) and the guardian kills the process.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { packageRoot } from '../common/package-root.js';
import { WpsnapError } from '../common/errors.js';
import type { RegionRecord } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';
import type { NativeBinding, NativeHandle } from './native/binding.js';
import type { LazyServerStats } from './native/lazy-binding.js';
import { buildProcess, type RestoreResult } from './restore.js';
import { faultPoint } from './fault.js';
import { restorablePlan, type RestoreOptions } from './restore-plan.js';

/** Pages read and copied in per fill: a fault brings its neighbours (the store decompresses whole blobs anyway). */
const FAULT_CHUNK = 64 * 1024;
const BACKGROUND_CHUNK = 256 * 1024;

export interface LazyFigures {
  /** From the start until the process ran its first instruction (its threads released). */
  firstInstructionMillis: number;
  pagesOnDemand: number;
  pagesPrefetched: number;
  /** Fault service, from the fault read to the wake (the process waited about this, plus its own kernel entry). */
  faultP50Micros: number;
  faultP99Micros: number;
  /** From the start until every page was in (null: served in the background, --detach). */
  allInMillis: number | null;
  /** --detach: the process serving the pages. */
  serverPid?: number;
}

export interface LazyRestoreResult extends RestoreResult {
  lazy: LazyFigures;
}

export interface ServeTarget {
  pid: number;
  uffd: number;
  processId: number;
  regions: RegionRecord[];
}

/**
 * Serve the pages until every one is in (or the process exits): faults
 * first, a background pass in between. Resolves with the server's figures;
 * the caller closes the userfaultfd.
 */
export async function servePages(binding: NativeBinding, store: Store, target: ServeTarget): Promise<LazyServerStats> {
  const pidfd = binding.pidfdOpen(target.pid);
  const ranges = BigUint64Array.from(target.regions.flatMap((r) => [r.start, r.end]));
  const regionOf = (address: bigint): RegionRecord | undefined => target.regions.find((r) => address >= r.start && address < r.end);
  const buffer = Buffer.alloc(BACKGROUND_CHUNK);
  let handle: NativeHandle | undefined;
  let finished = false;
  let failure: string | undefined;
  // Pages T stored are copied in; the others were zero at T and get the zero page (no memory).
  const fill = (start: bigint, end: bigint): void => {
    const pages = Number(end - start) / 4096;
    const into = buffer.subarray(0, pages * 4096);
    const stored = new Uint8Array(pages);
    store.readRangeInto(target.processId, start, into, stored);
    for (let i = 0; i < pages; ) {
      let j = i + 1;
      while (j < pages && stored[j] === stored[i]) j++;
      const at = start + BigInt(i * 4096);
      if (stored[i]) binding.lazyServerFill(handle!, at, into.subarray(i * 4096, j * 4096));
      else binding.lazyServerZero(handle!, at, BigInt((j - i) * 4096));
      i = j;
    }
  };
  let wake: (() => void) | undefined;
  const pendingFaults: bigint[] = [];
  let serveFaults = (): void => {};
  try {
    handle = binding.lazyServerStart({ uffd: target.uffd, pidfd, ranges }, (message) => {
      // Faults are served here and now: the faulting thread waits on this.
      if (message.type === 'faults') {
        pendingFaults.push(...message.addresses);
        serveFaults();
      }
      else if (message.type === 'settled' || message.type === 'exit') finished = true;
      else if (message.type === 'error') failure = message.message;
      wake?.();
    });
    serveFaults = (): void => {
      while (pendingFaults.length > 0) {
        const address = pendingFaults.shift()!;
        const r = regionOf(address);
        if (r === undefined) continue;
        const chunk = BigInt(FAULT_CHUNK);
        const start = address - ((address - r.start) % chunk);
        fill(start, start + chunk < r.end ? start + chunk : r.end);
      }
    };
    // The background pass, a chunk per turn of the event loop: faults that arrive meanwhile go first.
    for (const r of target.regions) {
      for (let start = r.start; start < r.end && !finished && failure === undefined; start += BigInt(BACKGROUND_CHUNK)) {
        serveFaults();
        const end = start + BigInt(BACKGROUND_CHUNK) < r.end ? start + BigInt(BACKGROUND_CHUNK) : r.end;
        const pending = binding.lazyServerPending(handle, start, end);
        if (pending.length > 0) faultPoint('restore-lazy-serving');
        if (pending.length > 0) fill(pending[0]!, pending[pending.length - 2]! + pending[pending.length - 1]!);
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    }
    // Every page is in, or the process exited, or a fault or an event is still being settled.
    while (!finished && failure === undefined && !binding.lazyServerStats(handle).settled) {
      serveFaults();
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, 20);
      });
      wake = undefined;
    }
    if (failure !== undefined) throw new WpsnapError('RESTORE_FAILED', `the page server failed: ${failure}`);
    const stats = binding.lazyServerStats(handle);
    if (stats.settled) binding.lazyServerFinish(handle);
    else binding.lazyServerStop(handle);
    return stats;
  } catch (error) {
    if (handle !== undefined) binding.lazyServerStop(handle);
    throw error;
  } finally {
    binding.closeFd(pidfd);
  }
}

/** The background server's entry point, built (also when this module runs from source, as in the tests). */
function serverMainPath(): string {
  return join(packageRoot(), 'dist', 'core', 'restore-lazy-main.js');
}

/** Restore lazily; resolves once every page is in (or, detached, once the background server took over). */
export interface LazyOptions extends RestoreOptions {
  /** Hand the serving to a background process and return at once. */
  detach?: boolean;
  /** Called once the process runs, pages still missing (benchmarks: touch them now). */
  onRunning?: (pid: number) => void;
}

export async function restoreLazy(binding: NativeBinding, store: Store, ref: string, options: LazyOptions = {}): Promise<LazyRestoreResult> {
  const started = performance.now();
  const plan = restorablePlan(store, ref, options);
  const planMillis = performance.now() - started;
  const built = await buildProcess(binding, store, plan, options, true);
  const firstInstructionMillis = Math.round(performance.now() - started);
  const lazy = built.lazy!;
  built.control.send('commit-lazy\n');
  options.onRunning?.(built.pid);
  const base = {
    id: plan.snapshotId,
    pid: built.pid,
    nsPid: built.nsPid,
    pidNamespace: options.newIds !== true,
    millis: firstInstructionMillis,
    fds: plan.fds,
    warnings: [...plan.warnings, ...built.warnings],
    pagesWritten: built.pagesWritten,
    threads: plan.threads.length,
    phasesMillis: { plan: planMillis, ...built.phasesMillis },
  };
  if (options.detach === true) {
    // The server gets the userfaultfd as its fd 3 and the guardian's control socket as its fd 4.
    const server = spawn(process.execPath, [serverMainPath(), store.path, String(plan.processId), String(built.pid), JSON.stringify(lazy.regions.map((r) => [r.start.toString(), r.end.toString()]))], {
      stdio: ['ignore', 'ignore', 'inherit', lazy.uffd, built.control.socket],
      detached: true,
    });
    server.unref();
    binding.closeFd(lazy.uffd);
    built.control.socket.destroy();
    return { ...base, lazy: { firstInstructionMillis, pagesOnDemand: 0, pagesPrefetched: 0, faultP50Micros: 0, faultP99Micros: 0, allInMillis: null, ...(server.pid === undefined ? {} : { serverPid: server.pid }) } };
  }
  let stats: LazyServerStats;
  try {
    stats = await servePages(binding, store, { pid: built.pid, uffd: lazy.uffd, processId: plan.processId, regions: lazy.regions });
  } finally {
    binding.closeFd(lazy.uffd);
  }
  built.control.send('served\n');
  built.control.end();
  return {
    ...base,
    lazy: {
      firstInstructionMillis,
      pagesOnDemand: stats.pagesOnDemand,
      pagesPrefetched: stats.pagesPrefetched,
      faultP50Micros: stats.faultServiceP50Micros,
      faultP99Micros: stats.faultServiceP99Micros,
      allInMillis: Math.round(performance.now() - started),
    },
  };
}
