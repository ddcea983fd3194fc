// /proc/PID/maps read twice: the pause re-reads it, and must parse and plan
// only what changed since the read before the freeze.
import { describe, expect, it } from 'vitest';
import { MapsReader } from '../core/procfs.js';
import { RegionPlanner } from '../core/regions.js';

describe('maps read again during the pause', () => {
  it('returns the same entry for an unchanged line, a new one for a changed line', () => {
    const reader = new MapsReader(process.pid);
    const before = reader.read();
    // A 64 MiB ArrayBuffer is a fresh anonymous mapping.
    const big = new ArrayBuffer(64 << 20);
    const after = reader.read();
    const earlier = new Set(before);
    const reused = after.filter((m) => earlier.has(m));
    const fresh = after.filter((m) => !earlier.has(m));
    // Most mappings did not change; at least the new buffer's did.
    expect(reused.length).toBeGreaterThan(after.length / 2);
    expect(fresh.length).toBeGreaterThanOrEqual(1);
    expect(fresh.some((m) => m.inode === 0 && m.end - m.start >= BigInt(64 << 20))).toBe(true);
    // A reused entry is what a fresh parse of its line gives.
    const reparsed = new MapsReader(process.pid).read();
    for (const m of reused.slice(0, 20)) expect(reparsed).toContainEqual(m);
    expect(big.byteLength).toBe(64 << 20);
  });

  it('plans again only the mappings that changed between prepare and plan', () => {
    const planner = new RegionPlanner(process.pid);
    const before = planner.readMaps();
    planner.prepare(before);
    const preparedPlans = new Map(before.map((m, i) => [m, i]));
    const big = new ArrayBuffer(32 << 20);
    const during = planner.readMaps();
    const plans = planner.plan(during);
    expect(plans.length).toBe(during.length);
    // Each plan describes its own mapping, whether made ahead or now.
    during.forEach((m, i) => {
      expect(plans[i]!.record.start).toBe(m.start);
      expect(plans[i]!.record.end).toBe(m.end);
    });
    expect(during.filter((m) => preparedPlans.has(m)).length).toBeGreaterThan(during.length / 2);
    planner.release();
    expect(big.byteLength).toBe(32 << 20);
  });
});
