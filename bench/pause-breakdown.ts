// Where wpsnap's pause goes: the steps of core/snapshot.ts's pause phase
// (freeze, inject userfaultfd, UFFDIO_API, re-read the maps and plan what
// changed since they were planned before the freeze, register +
// write-protect, copy the private pages of file mappings, thaw), each timed,
// on a live target. Nothing is stored and no engine runs: the userfaultfd is
// closed before the thaw (which drops every registration and protection), so
// the target never blocks on a protected page. Diagnostic only; it mirrors
// pausePhase() and must follow it if that changes.
import { closeSync } from 'node:fs';
import { freeze, findSyscallInstruction, injectUserfaultfd, prepareDeviceNode, targetMayCallUserfaultfd, type DeviceNode } from '../core/attach.js';
import { loadBinding } from '../core/binding.js';
import { UFFD_FEATURES_FOR_SNAPSHOT, UFFDIO_REGISTER_MODE_WP } from '../core/features.js';
import { readMaps } from '../core/procfs.js';
import { RegionPlanner } from '../core/regions.js';

export interface PauseBreakdown {
  /** freeze → thaw, as wpsnap's pauseMicros counts it, minus the uffd close (not part of a real pause). */
  pauseMicros: number;
  freezeMicros: number;
  injectMicros: number;
  uffdApiMicros: number;
  mapsMicros: number;
  protectMicros: number;
  /** Of protectMicros: UFFDIO_REGISTER calls only (the rest is UFFDIO_WRITEPROTECT). */
  registerMicros: number;
  /** The single largest register + write-protect (the 1 GiB region). */
  protectLargestMicros: number;
  protectLargestMiB: number;
  copyPrivateMicros: number;
  copyPrivatePages: number;
  thawMicros: number;
  regions: number;
  protectedRegions: number;
}

const us = (a: bigint, b: bigint): number => Math.round(Number(b - a) / 100) / 10;

export function pauseBreakdown(pid: number): PauseBreakdown {
  const binding = loadBinding();
  const insn = findSyscallInstruction(binding, pid);
  const pidfd = binding.pidfdOpen(pid);
  let deviceNode: DeviceNode | null = null;
  const opened: number[] = [];
  const planner = new RegionPlanner(pid);
  try {
    deviceNode = targetMayCallUserfaultfd(pid) ? null : prepareDeviceNode(binding, pid);
    planner.prepare(readMaps(pid)); // planned ahead, as snapshotProcess does
    const t0 = process.hrtime.bigint();
    const frozen = freeze(binding, pid);
    const t1 = process.hrtime.bigint();
    let uffd = -1;
    let t2 = t1;
    let t3 = t1;
    let t4 = t1;
    let t5 = t1;
    let t6 = t1;
    let registerNs = 0;
    let largest = 0;
    let largestBytes = 0n;
    let privatePages = 0;
    let regions = 0;
    let protectedRegions = 0;
    let closeNs = 0n;
    let closedAt = t1;
    let t7 = t1;
    try {
      uffd = injectUserfaultfd(binding, pid, frozen, insn, pidfd, deviceNode).fd;
      t2 = process.hrtime.bigint();
      binding.uffdApi(uffd, UFFD_FEATURES_FOR_SNAPSHOT);
      t3 = process.hrtime.bigint();
      const plans = planner.plan(readMaps(pid));
      for (const p of plans) if (p.openedFd !== undefined) opened.push(p.openedFd);
      regions = plans.length;
      t4 = process.hrtime.bigint();
      for (const plan of plans) {
        if (plan.engine === undefined) continue;
        const { start, end } = plan.record;
        const a = process.hrtime.bigint();
        try {
          binding.uffdRegister(uffd, start, end - start, UFFDIO_REGISTER_MODE_WP);
        } catch {
          continue; // not protectable (pausePhase copies it instead; rare)
        }
        registerNs += Number(process.hrtime.bigint() - a);
        binding.uffdWriteProtect(uffd, start, end - start, true);
        protectedRegions++;
        const d = Number(process.hrtime.bigint() - a);
        if (d > largest) {
          largest = d;
          largestBytes = end - start;
        }
      }
      t5 = process.hrtime.bigint();
      for (const plan of plans) {
        if (plan.pausedCopy === 'none') continue;
        const copy = binding.copyPrivatePages(pid, plan.record.start, plan.record.end, plan.pausedCopy === 'all-present');
        privatePages += copy.addresses.length;
      }
      t6 = process.hrtime.bigint();
    } finally {
      // Release every registration and protection before the target runs.
      const closeAt = process.hrtime.bigint();
      if (uffd >= 0) binding.closeFd(uffd);
      closedAt = process.hrtime.bigint();
      closeNs = closedAt - closeAt;
      binding.thaw(frozen.handle);
      t7 = process.hrtime.bigint();
    }
    return {
      pauseMicros: us(t0, t7 - closeNs),
      freezeMicros: us(t0, t1),
      injectMicros: us(t1, t2),
      uffdApiMicros: us(t2, t3),
      mapsMicros: us(t3, t4),
      protectMicros: us(t4, t5),
      registerMicros: Math.round(registerNs / 100) / 10,
      protectLargestMicros: Math.round(largest / 100) / 10,
      protectLargestMiB: Number(largestBytes >> 20n),
      copyPrivateMicros: us(t5, t6),
      copyPrivatePages: privatePages,
      thawMicros: us(closedAt, t7),
      regions,
      protectedRegions,
    };
  } finally {
    deviceNode?.remove();
    planner.release();
    for (const fd of opened) closeSync(fd);
    binding.closeFd(pidfd);
  }
}
