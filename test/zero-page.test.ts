// The engine records a page as zero without reading it when its pagemap entry
// maps the kernel's shared zero page, so the pfn it compares with must be that
// page's. On this kernel a read fault on an untouched private anonymous page
// can allocate a real page instead of mapping the zero page; the engine used
// to take that page's pfn for the zero page, then freed it, and a target that
// reused it (a copy-on-write copy after a fork) had a page with data stored as
// zero and not listed lost (a rare failure of the fork race test, about one
// round in 45 with forks back to back; the round's zeroPagesBy named
// sharedZeroPage).
import { openSync, readSync, closeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';

const KPF_ZERO_PAGE = 24n;

function kpageflags(pfn: bigint): bigint {
  const fd = openSync('/proc/kpageflags', 'r');
  try {
    const buf = Buffer.alloc(8);
    expect(readSync(fd, buf, 0, 8, Number(pfn * 8n))).toBe(8);
    return buf.readBigUInt64LE(0);
  } finally {
    closeSync(fd);
  }
}

describe('the shared zero page the engine trusts', () => {
  it('is the kernel zero page (KPF_ZERO_PAGE), or none: never a page that can be freed and reused', () => {
    const binding = loadBinding();
    for (let i = 0; i < 20; i++) {
      const pfn = binding.zeroPagePfn();
      if (pfn === 0n) continue; // unknown: the engine then reads such pages instead
      expect((kpageflags(pfn) >> KPF_ZERO_PAGE) & 1n, `pfn 0x${pfn.toString(16)}`).toBe(1n);
    }
  });
});
