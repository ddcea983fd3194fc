// Invariant 5 under attack: every page of a snapshot is exactly its content at
// T, or is listed lost with the reason — never silently wrong. One hostile
// fixture mode per attack surface (fixtures/hostile/, one file per mode); each test snapshots it
// while it runs, reads the fixture's own state at T from the snapshot, derives
// the content of every page at T from it (test/support/hostile.ts) and demands
// exact content, or a lost listing with the reason that surface allows. Each
// test also checks the target ran on (its counters advanced after the
// snapshot) and ended clean (its done line and its own self-check).
//
// Four of these fail against core/native/engine.c as of this writing, on real
// bugs (each test's comment names the code path): dontneed (pages silently
// zero or post-T), dontneed in a loop (snapshot aborts: "fault handling did not
// settle"), mremap (moved pages listed lost; silently post-T once the first bug
// is fixed) and fork with shared memory (post-T content of another process).
// With the fixes described there, applied to a private build, all ten pass.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { snapshotProcess, type SnapshotOptions, type SnapshotResult } from '../core/snapshot.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { Store } from '../store/store.js';
import {
  checkDontneed,
  checkForkShared,
  checkMremap,
  checkMunmap,
  checkPage,
  checkStriders,
  content,
  Content,
  exactly,
  newVerdict,
  parseReady,
  SnapshotView,
  striders,
  type DoneLine,
  type HostileReady,
  type Verdict,
} from './support/hostile.js';
import { sleep } from './support/proc.js';

const binding = loadBinding();
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-races-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

// A write by the target to a memfd page not present at T sets the file's
// times before its write-protect fault reaches wpsnap (do_shared_fault ->
// fault_dirty_shared_page), exactly as a write through an fd does (issue 7
// item 2): the memfd's pages not yet saved then cannot be proven and are
// listed file-changed-before-saved. Allowed for the memfd striders, never
// stored wrong (checkStriders still demands exact content for every other page).
const SHMEM_TIMES_LOSS: readonly string[] = ['file-changed-before-saved'];

interface Hostile {
  fixture: LaunchedFixture;
  ready: HostileReady;
  oracle: Content;
}

async function hostile(args: string[]): Promise<Hostile> {
  const fixture = await launchFixture('hostile', args);
  const ready = parseReady(fixture.readyLine);
  return { fixture, ready, oracle: new Content(ready.seed) };
}

/** Progress counters of every thread of the fixture, read live. */
function opsNow(h: Hostile): number[] {
  const buf = binding.processVmRead(h.fixture.pid, h.ready.control, h.ready.opsSlots * 64);
  return Array.from({ length: h.ready.opsSlots }, (_, i) => Number(buf.readBigUInt64LE(i * 64)));
}

function opsAtT(h: Hostile, view: SnapshotView): number[] {
  return Array.from({ length: h.ready.opsSlots }, (_, i) => view.num(h.ready.control + BigInt(i * 64)));
}

/**
 * Pre-protected for 150 ms before the pause: every attack also runs while the
 * target's bulk is protected and its writes only tracked (core/preprotect.ts),
 * so the pause must protect again exactly what changed meanwhile.
 */
async function snap(store: Store, h: Hostile, options: SnapshotOptions = {}): Promise<{ result: SnapshotResult; view: SnapshotView }> {
  const result = await snapshotProcess(binding, store, h.fixture.pid, { preProtectHoldMillis: 150, ...options });
  expect(store.find(String(result.id)).state).toBe('complete');
  const processId = store.processes(result.id)[0]!.processId;
  return { result, view: new SnapshotView(store, processId) };
}

/** The target kept running: every thread's counter moved on from its value at T. */
async function expectRanOn(h: Hostile, view: SnapshotView): Promise<void> {
  const atT = opsAtT(h, view);
  await sleep(30);
  const after = opsNow(h);
  for (let i = 0; i < atT.length; i++) expect(after[i], `thread ${i} made no progress after the snapshot`).toBeGreaterThan(atT[i]!);
}

async function finish(h: Hostile): Promise<DoneLine> {
  h.fixture.kill('SIGTERM');
  const line = await Promise.race([h.fixture.nextLine(), sleep(30_000).then(() => null)]);
  expect(line, 'the fixture printed no done line within 30 s').not.toBeNull();
  const done = JSON.parse(line!) as DoneLine;
  expect(done).toMatchObject({ done: true, errors: 0, selfCheck: 'ok', childFailures: 0 });
  return done;
}

function expectClean(v: Verdict): void {
  const first = v.mismatches.slice(0, 3).join('\n  ');
  expect(v.mismatchCount, `${v.silentlyWrong} page(s) silently wrong, ${v.wrongReason} lost with a reason that cannot happen here; first:\n  ${first}\n`).toBe(0);
}

function summary(mode: string, v: Verdict, extra = ''): void {
  console.log(`[races] ${mode}: ${v.checked} pages checked, ${v.exact} exact, lost ${JSON.stringify(v.lost)}, ${v.mismatchCount} mismatches${extra}`);
}

interface Round<B> {
  index: number;
  result: SnapshotResult;
  view: SnapshotView;
  /** To be filled by the round's check. */
  verdict: Verdict;
  /** What beforeSnapshot returned for this round. */
  before: B;
}

interface Attack<B> {
  /** Store file name under the test directory. */
  store: string;
  /** hostile's arguments. */
  args: string[];
  rounds: number;
  /** Let the fixture run this long before the first snapshot. */
  settleMs: number;
  /** Pause between rounds. */
  betweenMs?: number;
  snapshot?: SnapshotOptions;
  /** Checks of the running fixture before the first snapshot. */
  start?: (h: Hostile) => void;
  /** Runs right before each snapshot; its value reaches the check as round.before. */
  beforeSnapshot?: (h: Hostile) => B;
}

/**
 * Snapshot a hostile fixture `rounds` times while it runs. Each round's check
 * fills the verdict and returns the extra text of its summary line; the
 * verdict must then be clean and every thread must have run on. Ends with the
 * fixture's done line (which must say it ended clean).
 */
async function underAttack<B = undefined>(
  name: string,
  attack: Attack<B>,
  check: (round: Round<B>, h: Hostile) => string,
): Promise<{ done: DoneLine; verdicts: Verdict[] }> {
  const store = Store.open(join(dir, attack.store));
  const h = await hostile(attack.args);
  try {
    await sleep(attack.settleMs);
    attack.start?.(h);
    const verdicts: Verdict[] = [];
    for (let index = 0; index < attack.rounds; index++) {
      const before = attack.beforeSnapshot?.(h) as B;
      const { result, view } = await snap(store, h, attack.snapshot);
      const verdict = newVerdict();
      const extra = check({ index, result, view, verdict, before }, h);
      // How the engine knew each zero page without reading it: if a round ever
      // finds a page silently zero, this names the path that recorded it.
      const zero = Object.entries(result.engine.zeroPagesBy).filter(([, n]) => n > 0).map(([why, n]) => `${why} ${n}`).join(', ');
      summary(attack.rounds > 1 ? `${name} #${index}` : name, verdict, `${extra}; zero pages: ${zero || 'none'}`);
      expectClean(verdict);
      await expectRanOn(h, view);
      verdicts.push(verdict);
      if (attack.betweenMs !== undefined) await sleep(attack.betweenMs);
    }
    return { done: await finish(h), verdicts };
  } finally {
    h.fixture.kill();
    await store.close();
  }
}

describe('invariant 5 under hostile targets', () => {
  // Catches (content; fails on the engine as of this writing):
  //  - drain() handling a read batch in order: the kernel returns pending faults
  //    before events, so [fault on p, REMOVE of p] is handled fault first; the
  //    REMOVE has been read, so its DONTNEED zaps p while the fault path copies
  //    it, and the UFFDIO_WRITEPROTECT that validates the copy succeeds (the
  //    event is read): p is stored as zeros, silently. The cross discarder
  //    DONTNEEDs the page a writer is blocked on, which produces that batch.
  //  - handle_remove() validating by pfn only: a page zapped and faulted in
  //    again (anonymous memory keeps no marker) before its pagemap is read, or
  //    given back the same pfn, is taken for the page of T: post-T content,
  //    silently. Writers rewrite the first page of each range they discard.
  //  - handle_remove() a no-op (zapped pages saved as zeros or as later content).
  it('dontneed: pages discarded while being snapshotted are exact or listed discarded-before-saved', async () => {
    const args = ['--mode', 'dontneed', '--threads', '2', '--pages', '2048', '--rate', '100000', '--discard-every', '256', '--max-range', '4'];
    const { verdicts } = await underAttack('dontneed', { store: 'dontneed.db', args: [...args, '--cross', '1', '--seed', '11'], rounds: 4, settleMs: 200 }, (r, h) => {
      checkDontneed(r.verdict, r.view, h.oracle, h.ready);
      expect(r.verdict.checked).toBe(2 * 2048);
      return `, ${r.result.faults} faults, ${r.result.engine.events} events`;
    });
    // Most pages survive: a snapshot that listed everything lost would pass the rounds.
    const exact = verdicts.reduce((sum, v) => sum + v.exact, 0);
    const checked = verdicts.reduce((sum, v) => sum + v.checked, 0);
    expect(exact).toBeGreaterThan(checked * 0.8);
  });

  // Catches (liveness; fails on the engine as of this writing): handle_fault()
  // retrying UFFDIO_WRITEPROTECT right after reading the events that made it
  // fail with EAGAIN, and giving up after 1000 attempts. The thread whose event
  // was just read has not lowered mmap_changing yet, so every retry fails again
  // while another thread keeps calling madvise(DONTNEED); the snapshot then
  // aborts with "fault handling did not settle".
  it('dontneed: a thread discarding memory in a loop does not make the snapshot fail', async () => {
    const args = ['--mode', 'dontneed', '--threads', '2', '--pages', '2048', '--discard-every', '16', '--cross', '0', '--seed', '21'];
    // A slowed sweep keeps faults coming for a while (the lockstep needs a
    // fault to meet the discard loop; a quick snapshot may slip through).
    await underAttack('dontneed-loop', { store: 'dontneed-loop.db', args, rounds: 1, settleMs: 200, snapshot: { rateBytesPerSec: 16 << 20 } }, (r, h) => {
      checkDontneed(r.verdict, r.view, h.oracle, h.ready);
      const { faults, engine } = r.result;
      return `, ${faults} faults, ${engine.events} events, fault max ${Math.round(engine.faultServiceMaxMicros)} us`;
    });
  });

  // Catches: the sweep keeping a copy whose unprotect failed with ENOENT while
  // handle_unmap() misses the unmap (a chunk replaced by MAP_FIXED or re-mmapped
  // at the same address is then saved with the new chunk's content: checked by
  // mutating a private build of engine.c, 89-148 silent pages per snapshot);
  // unmapped pages listed with a reason other than unmapped-before-saved.
  // handle_unmap() alone being a no-op is masked by the sweep's ENOENT check.
  it('munmap: chunks unmapped or replaced after T are exact or listed unmapped-before-saved, never the new content', async () => {
    const args = ['--mode', 'munmap', '--threads', '2', '--slots', '32', '--chunk-pages', '8', '--seed', '12'];
    const { verdicts } = await underAttack('munmap', { store: 'munmap.db', args, rounds: 4, settleMs: 200 }, (r, h) => {
      const chunks = checkMunmap(r.verdict, r.view, h.oracle, h.ready);
      expect(chunks).toBeGreaterThan(0);
      return `, ${chunks} chunks live at T`;
    });
    expect(verdicts.reduce((sum, v) => sum + v.exact, 0)).toBeGreaterThan(0);
  });

  // Catches (fails on the engine as of this writing):
  //  - drain() applying a batch's events after newer ones a fault handler read
  //    (read_more): [fault, UNMAP(dest)] then REMAP(src -> dest) read inside the
  //    fault handler is applied first, and the stale UNMAP(dest) then marks the
  //    moved region's unsaved pages lost ("unmapped-before-saved", though nothing
  //    was destroyed) and lets writes to them through.
  //  - handle_unmap() leaving the unmapped segment at its address: a later REMAP
  //    from that address moves it along with the live segment, and seg_by_cur()
  //    may resolve a fault against the stale one (state lost/saved), unprotecting
  //    the live page unsaved: post-T content, silently (seen once the ordering
  //    above is fixed in a private build).
  //  - handle_remap() not re-addressing segments, or not splitting them.
  // Regions move with MREMAP_FIXED onto PROT_NONE placeholders (a reservation
  // pattern), so a T-era placeholder is unmapped and the region takes its
  // address. The sweep is slowed down so that moves overtake it. Nothing is
  // destroyed here: no page of a region may be lost at all.
  it('mremap: content at T is found at its address at T, nothing of the moved regions lost', async () => {
    const args = ['--mode', 'mremap', '--threads', '2', '--pages', '2048', '--seed', '13'];
    await underAttack('mremap', { store: 'mremap.db', args, rounds: 3, settleMs: 200, snapshot: { rateBytesPerSec: 96 << 20 } }, (r, h) => {
      const skipped = checkMremap(r.verdict, r.view, h.oracle, h.ready);
      expect(skipped).toBeLessThan(2);
      return `, ${skipped} region(s) mid-move at T, ${r.result.engine.events} events, ${r.result.durationMillis} ms`;
    });
  });

  // Catches: a fork child's memory still write-protected (EVENT_FORK not
  // requested: the child's ranges must be unregistered, or the child would
  // block or be resolved against the parent's state), the parent's COW-shared
  // pages copied after a write landed. The children check their own copy and
  // writes; their failures reach the done line.
  it('fork: the parent snapshot is exact and the children are unaffected', async () => {
    const args = ['--mode', 'fork', '--threads', '2', '--pages', '4096', '--rate', '20000', '--fork-interval-us', '500', '--seed', '14'];
    const { done } = await underAttack('fork', { store: 'fork.db', args, rounds: 3, settleMs: 200 }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready));
      const st = h.ready.raw['static'] as { start: string; pages: number; stream: number; step: number };
      for (let p = 0; p < st.pages; p++) {
        const address = BigInt(st.start) + BigInt(p * 4096);
        checkPage(r.verdict, r.view, h.oracle, address, exactly(content(st.stream, st.step, p)), [], () => `static page ${p}`);
      }
      expect(r.result.lostPages).toEqual([]);
      return `, ${r.result.faults} faults`;
    });
    expect(done.childrenStarted).toBeGreaterThan(10);
  });

  // Catches (fails as of this writing): MAP_SHARED memory that another process
  // (here a fork child) writes after T. The target's uffd-wp protection lives
  // in its own page tables; the child's writes do not fault, and the sweep
  // reads the shmem file later, so it stores what the children wrote after T.
  // Such pages must be listed lost (or every process mapping them snapshotted
  // together, seed 004), never stored as the content at T.
  it('fork: memory shared with children is not silently replaced by what they write after T', async () => {
    const args = ['--mode', 'fork', '--threads', '1', '--pages', '1024', '--rate', '20000', '--shared-pages', '2048', '--fork-interval-us', '200', '--seed', '15'];
    // A slow sweep reaches the shared pages long after T: children forked
    // after T have rewritten them by then.
    await underAttack('fork-shared', { store: 'fork-shared.db', args, rounds: 2, settleMs: 200, snapshot: { rateBytesPerSec: 8 << 20 } }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready));
      const { startedAtT, newest } = checkForkShared(r.verdict, r.view, h.oracle, h.ready);
      return `, ${startedAtT} children started at T, newest child in the snapshot ${newest}`;
    });
  });

  // Catches: registering only mappings writable at T (a PROT_READ or PROT_NONE
  // region opened with mprotect after T would be written before being saved);
  // the sweep failing on PROT_NONE pages (process_vm_readv refuses them, only
  // /proc/PID/mem with FOLL_FORCE reads them) and listing them read-failed.
  it('mprotect: regions read-only or PROT_NONE at T and written after mprotect(RW) are exact', async () => {
    const args = ['--mode', 'mprotect', '--pages', '2048', '--sealed-us', '1500', '--open-pages', '32', '--seed', '16'];
    await underAttack('mprotect', { store: 'mprotect.db', args, rounds: 4, settleMs: 100, betweenMs: 37 }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready), SHMEM_TIMES_LOSS);
      expect(r.result.lostPages.filter((l) => !SHMEM_TIMES_LOSS.includes(l.reason))).toEqual([]);
      return `, ${r.result.faults} faults`;
    });
  });

  // Catches: the sparse path (regions.sparse) protecting a never-touched page
  // that is then read after T (a page first written after T must read as zero),
  // or marking a populated page zero: 64 MiB regions, 1/32 populated at T, in
  // scattered runs, sealed PROT_READ/PROT_NONE and written after mprotect(RW).
  it('mprotect, sparse: regions mostly never touched at T, protected only where populated, are exact', async () => {
    const args = ['--mode', 'mprotect', '--pages', '16384', '--prefill', '512', '--sealed-us', '20000', '--open-pages', '8', '--seed', '17'];
    await underAttack('mprotect sparse', { store: 'mprotect-sparse.db', args, rounds: 3, settleMs: 100, betweenMs: 37 }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready), SHMEM_TIMES_LOSS);
      // The two anonymous strider regions at least (malloc arenas may add more).
      expect(r.result.regions.sparse).toBeGreaterThanOrEqual(2);
      expect(r.result.lostPages.filter((l) => !SHMEM_TIMES_LOSS.includes(l.reason))).toEqual([]);
      return `, ${r.result.faults} faults, ${r.result.regions.sparse} sparse regions`;
    });
  });

  // Catches: huge PMDs protected or unprotected wrongly (the engine saves a
  // PMD-mapped block whole before unprotecting all 2 MiB of it; unprotecting
  // it with pages still unsaved would let writes to them through), and a
  // MADV_COLLAPSE that rebuilds a huge page from uffd-wp PTEs and drops their
  // protection (the kernel must refuse; writes after it would go unseen).
  it('thp: huge pages written 4 KiB at a time and collapsed while snapshotted are exact', async () => {
    const args = ['--mode', 'thp', '--threads', '2', '--huge', '8', '--rate', '50000', '--seed', '17'];
    let thpKiB = 0;
    const start = (h: Hostile): void => {
      thpKiB = anonHugeKiB(h.fixture.pid);
      expect(thpKiB, 'no transparent huge pages backed the fixture: the test would not test THP').toBeGreaterThan(0);
    };
    const { done } = await underAttack('thp', { store: 'thp.db', args, rounds: 3, settleMs: 100, start }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready));
      expect(r.result.lostPages).toEqual([]);
      return `, ${r.result.faults} faults, AnonHugePages ${anonHugeKiB(h.fixture.pid)} KiB (${thpKiB} before)`;
    });
    console.log(`[races] thp: MADV_COLLAPSE ok ${done.aux[0]}, refused ${done.aux[1]}`);
  });
});

/** A field (in KiB) of the /proc/PID/smaps entry of the mapping that starts at `start`. */
function smapsField(pid: number, start: bigint, field: string): number {
  const text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  const head = `${start.toString(16)}-`;
  const at = text.split('\n').findIndex((line) => line.startsWith(head));
  if (at < 0) return 0;
  for (const line of text.split('\n').slice(at + 1)) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) break;
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`).exec(line);
    if (m) return Number(m[1]);
  }
  return 0;
}

function anonHugeKiB(pid: number): number {
  const m = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

describe('hugetlb', () => {
  const NR = '/proc/sys/vm/nr_hugepages';
  let previous: string | undefined;
  beforeAll(() => {
    previous = readFileSync(NR, 'utf8').trim();
    writeFileSync(NR, String(Number(previous) + 12));
  });
  afterAll(() => {
    if (previous !== undefined) writeFileSync(NR, previous);
  });

  // Catches: hugetlb pages copied or unprotected in 4 KiB pieces (a fault must
  // save and unprotect the whole 2 MiB page), shared hugetlbfs read from the
  // wrong file offset, hugetlb PTE markers taken for data or data for markers.
  it('hugetlb: private MAP_HUGETLB and shared hugetlbfs memory written while snapshotted are exact', async () => {
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    expect(free, 'the kernel could not reserve 8 huge pages').toBeGreaterThanOrEqual(8);
    const args = ['--mode', 'hugetlb', '--huge', '4', '--huge-shared', '4', '--seed', '18'];
    await underAttack('hugetlb', { store: 'hugetlb.db', args, rounds: 3, settleMs: 100 }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready));
      expect(r.result.lostPages).toEqual([]);
      return `, ${r.result.faults} faults`;
    });
  });
});

describe('swap', () => {
  let swapDir: string | undefined;
  let swapFile: string | undefined;
  let swapOn = false;
  beforeAll(() => {
    // A swap file on the root filesystem (ext4 on /dev/vda supports them).
    swapDir = mkdtempSync(join(tmpdir(), 'wpsnap-swap-'));
    swapFile = join(swapDir, 'swapfile');
    execFileSync('dd', ['if=/dev/zero', `of=${swapFile}`, 'bs=1M', 'count=256', 'status=none']);
    execFileSync('chmod', ['600', swapFile]);
    execFileSync('mkswap', [swapFile], { stdio: 'ignore' });
    execFileSync('swapon', [swapFile]);
    swapOn = true;
  }, 60_000);
  afterAll(() => {
    try {
      if (swapOn && swapFile) execFileSync('swapoff', [swapFile]);
    } finally {
      if (swapDir) rmSync(swapDir, { recursive: true, force: true });
    }
  }, 60_000);

  // Catches: swap entries taken for never-touched pages (PTE markers) and
  // saved as zero, uffd-wp lost across swap-out/swap-in (anonymous: the swap
  // PTE's uffd-wp bit; shmem: the PTE marker left when the page is reclaimed),
  // which would let a write to a swapped-in page through unsaved.
  it('swap: anonymous and memfd pages pushed to swap before and during the snapshot are exact', async () => {
    const args = ['--mode', 'swap', '--pages', '8192', '--memfd-pages', '2048', '--rate', '4000', '--seed', '19'];
    // What is on swap right before each snapshot, per region (smaps "Swap:"
    // counts anonymous swap entries and swapped-out shmem of the mapping).
    const beforeSnapshot = (h: Hostile): number[] => {
      const swappedKiB = striders(h.ready).map((w) => smapsField(h.fixture.pid, w.start, 'Swap'));
      expect(swappedKiB[0], 'no anonymous page was on swap before the snapshot').toBeGreaterThan(4096);
      expect(swappedKiB[1], 'no memfd page was on swap before the snapshot').toBeGreaterThan(1024);
      return swappedKiB;
    };
    await underAttack('swap', { store: 'swap.db', args, rounds: 2, settleMs: 150, betweenMs: 100, beforeSnapshot }, (r, h) => {
      checkStriders(r.verdict, r.view, h.oracle, striders(h.ready), SHMEM_TIMES_LOSS);
      expect(r.result.lostPages.filter((l) => !SHMEM_TIMES_LOSS.includes(l.reason))).toEqual([]);
      return `, ${r.result.faults} faults; on swap before it: ${r.before.join(' / ')} KiB (anon / memfd)`;
    });
  });
});
