// The values C and TypeScript share have one meaning: the addons export the
// C side's, and every TypeScript declaration must equal them. Loads the
// addons only (no root, no target).
import { createRequire } from 'node:module';
import { describe, expect, it } from 'vitest';
import { nativeAddonPath } from '../../core/binding.js';
import { REGION_KIND, SYSCALL, USERFAULTFD_IOC_NEW } from '../../core/constants.js';
import { FAILURE_POINTS, FAULT_POINTS } from '../../core/fault.js';
import { UFFD_FEATURE, UFFDIO_REGISTER_MODE_WP } from '../../core/features.js';
import type { NativeConstants } from '../../core/native/binding.js';
import { LOST_REASONS, PAGE_SIZE } from '../../snapshot-format/model.js';
import { pagehashAddonPath, type PagehashAddon } from '../../store/pagehash.js';
import { HASH_BYTES } from '../../store/worker-pool.js';

const require = createRequire(import.meta.url);
const native = (require(nativeAddonPath()) as { constants: NativeConstants }).constants;

describe('constants shared by C and TypeScript', () => {
  it('page size, syscall numbers and ioctls', () => {
    expect(native.pageSize).toBe(PAGE_SIZE);
    expect(native.syscalls).toEqual(SYSCALL);
    expect(native.ioctls).toEqual({ UFFDIO_REGISTER_MODE_WP: Number(UFFDIO_REGISTER_MODE_WP), USERFAULTFD_IOC_NEW });
  });

  it('userfaultfd feature bits', () => {
    expect(native.uffdFeatures).toEqual(UFFD_FEATURE);
  });

  it('engine region kinds', () => {
    expect(native.regionKinds).toEqual(REGION_KIND);
  });

  it('every lost reason the engine reports is one the data model knows', () => {
    expect(native.lostReasons.length).toBeGreaterThan(0);
    for (const reason of native.lostReasons) expect(LOST_REASONS).toContain(reason);
  });

  it('every fault point checked in C is one core/fault.ts lists', () => {
    for (const point of native.faultPoints) expect([...FAULT_POINTS, ...FAILURE_POINTS]).toContain(point);
    expect([...native.faultPoints].sort()).toEqual(['engine-alloc', 'engine-vanish', 'mid-inject', 'mid-spill']);
  });

  it("the store's hash length is the one its addon writes", () => {
    expect((require(pagehashAddonPath()) as PagehashAddon).HASH_BYTES).toBe(HASH_BYTES);
  });

  it('the exported constants cannot be changed from JavaScript', () => {
    expect(Object.isFrozen(native)).toBe(true);
  });
});
