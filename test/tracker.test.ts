// The dirty trackers on a real process whose writes between two rounds are
// known exactly (fixtures/dirtywriter.c): every written page is in the round,
// nothing else is, whatever the target does to its mappings meanwhile.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { DirtyTracker, type DirtyRound, type TrackerKind } from '../core/tracker.js';
import { intersect, normalize, type Intervals } from '../core/intervals.js';
import { killDetached } from './support/spawn.js';
import { uffdWpPages } from './support/proc.js';
import { pagesOf, startWriter as startSharedWriter, type Writer } from './support/dirtywriter.js';
import { CLI_JS, runCli } from './support/cli.js';
import { trackDirty } from '../core/api.js';

const binding = loadBinding();

const cleanups: Array<() => void> = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
  killDetached();
});

async function startWriter(pages = 64): Promise<Writer> {
  const w = await startSharedWriter(pages);
  cleanups.push(() => w.close());
  return w;
}

function track(pid: number, tracker: TrackerKind): DirtyTracker {
  const t = DirtyTracker.start(binding, pid, { tracker });
  cleanups.push(() => t.stop());
  return t;
}

/** The part of a round in the fixture's own regions (its stack, heap and stdio buffers are written too). */
function inRegions(w: Writer, dirty: Intervals, ...extra: Intervals): Intervals {
  const regions: Intervals = [...pagesOf(w.anon, [0, w.pages]), ...pagesOf(w.shm, [0, w.pages]), ...extra].sort((a, b) => (a[0] < b[0] ? -1 : 1));
  return intersect(dirty, regions);
}

function hex(intervals: Intervals): string[] {
  return intervals.map(([s, e]) => `0x${s.toString(16)}-0x${e.toString(16)}`);
}


describe.each<TrackerKind>(['async', 'sync'])('the %s tracker', (kind) => {
  it('reports exactly the pages written between two rounds, a page written back unchanged included, and nothing read', async () => {
    const w = await startWriter();
    const t = track(w.fixture.pid, kind);
    t.take(); // whatever happened before the start
    await w.send('write anon 1 7 8 63');
    await w.send('same anon 20');
    await w.send('read anon 30 31');
    await w.send('write shm 0 5');
    const round = t.take();
    expect(hex(inRegions(w, round.dirty))).toEqual(hex(normalize([...pagesOf(w.shm, [0, 1], [5, 1]), ...pagesOf(w.anon, [1, 1], [7, 2], [20, 1], [63, 1])])));
    expect(round.added).toEqual([]);
    // Every dirty page lies in a tracked mapping, and the mappings' counts add up.
    expect(round.mappings.reduce((n, m) => n + m.dirtyPages, 0)).toBe(round.dirtyPages);
    expect(round.mappings.find((m) => m.start <= w.shm && w.shm < m.end)!.dirtyPages).toBe(2);
    // Nothing written since: an empty round, and every page protected again.
    expect(inRegions(w, t.take().dirty)).toEqual([]);
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(w.pages);
  });

  it('counts pages zapped by MADV_DONTNEED as written, follows new, moved and unmapped mappings', async () => {
    const w = await startWriter();
    const t = track(w.fixture.pid, kind);
    t.take();
    await w.send('dontneed anon 10 3');
    const mapped = BigInt((await w.send('map 8'))['addr'] as string);
    let round = t.take();
    expect(hex(inRegions(w, round.dirty, ...pagesOf(mapped, [0, 8])))).toEqual(hex(normalize([...pagesOf(w.anon, [10, 3]), ...pagesOf(mapped, [0, 8])])));
    expect(hex(round.added)).toEqual(hex(pagesOf(mapped, [0, 8])));
    // The new mapping is tracked from now on, page by page.
    await w.send(`write 0x${mapped.toString(16)} 2`);
    round = t.take();
    expect(hex(inRegions(w, round.dirty, ...pagesOf(mapped, [0, 8])))).toEqual(hex(pagesOf(mapped, [2, 1])));
    // Moved: written whole at its new place; the old place is gone.
    const moved = BigInt((await w.send(`move 0x${mapped.toString(16)} 8`))['addr'] as string);
    round = t.take();
    expect(hex(inRegions(w, round.dirty, ...pagesOf(moved, [0, 8]), ...pagesOf(mapped, [0, 8])))).toEqual(hex(pagesOf(moved, [0, 8])));
    expect(round.mappings.some((m) => m.start === mapped)).toBe(false);
    await w.send(`write 0x${moved.toString(16)} 4`);
    await w.send(`unmap 0x${moved.toString(16)} 8`);
    await w.send('write anon 0');
    round = t.take();
    // The write to the moved mapping went with it: only what is still mapped is reported.
    expect(hex(inRegions(w, round.dirty, ...pagesOf(moved, [0, 8])))).toEqual(hex(pagesOf(w.anon, [0, 1])));
    expect(round.mappings.some((m) => m.start === moved)).toBe(false);
  });

  it('unprotects the target when stopped, and ends with the target', async () => {
    const w = await startWriter();
    const t = track(w.fixture.pid, kind);
    t.take();
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(w.pages);
    t.stop();
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(0);
    await w.send('write anon 3'); // runs on, unprotected
    const t2 = track(w.fixture.pid, kind);
    await w.send('exit').catch(() => undefined);
    await w.fixture.exited;
    const last = t2.take();
    expect(last.exited).toBe(true);
    expect(last.dirty).toEqual([]);
  });

  it('reports more written ranges than one PAGEMAP_SCAN vector holds, each once', async () => {
    const w = await startWriter(4096);
    const t = track(w.fixture.pid, kind);
    t.take();
    const pages = Array.from({ length: 2048 }, (_, i) => 2 * i);
    for (let i = 0; i < pages.length; i += 400) await w.send(`write anon ${pages.slice(i, i + 400).join(' ')}`);
    const round = t.take();
    expect(hex(inRegions(w, round.dirty))).toEqual(hex(pages.map((p) => pagesOf(w.anon, [p, 1])[0]!)));
  });

  it('lists the private file mappings it cannot see', async () => {
    const w = await startWriter();
    const t = track(w.fixture.pid, kind);
    const round = t.take();
    const exe = readFileSync(`/proc/${w.fixture.pid}/maps`, 'utf8').split('\n').find((l) => l.includes('dirtywriter') && l.includes('rw-p'));
    expect(exe).toBeDefined();
    const start = BigInt('0x' + exe!.split('-')[0]);
    expect(round.untracked.find((u) => u.start === start)?.why).toMatch(/private file mapping/);
  });
});

describe('the soft-dirty tracker', () => {
  it('is refused here with the reason (this kernel has no soft-dirty)', async () => {
    const w = await startWriter(8);
    expect(() => DirtyTracker.start(binding, w.fixture.pid, { tracker: 'soft-dirty' })).toThrow(
      expect.objectContaining({ code: 'SOFT_DIRTY_UNAVAILABLE', message: expect.stringMatching(/never gets the soft-dirty bit/) }),
    );
  });
});

export type { DirtyRound };

describe('wpsnap track', () => {
  it('prints one JSON line per interval whose ranges hold exactly the pages written', async () => {
    const w = await startWriter();
    const run = runCli(['track', String(w.fixture.pid), '--json', '--ranges', '--interval', '300ms', '--duration', '1500ms']);
    await new Promise((r) => setTimeout(r, 200));
    await w.send('write anon 2 3 4');
    await new Promise((r) => setTimeout(r, 400));
    await w.send('write shm 9');
    const { code, stdout, stderr } = await run;
    expect(stderr).toBe('');
    expect(code).toBe(0);
    const lines = stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.length).toBeGreaterThanOrEqual(4);
    for (const l of lines) {
      expect(Object.keys(l)).toEqual(expect.arrayContaining(['t', 'intervalMillis', 'dirtyPages', 'dirtyBytesPerSec', 'workingSetPages', 'regions', 'ranges']));
    }
    const ranges = normalize(lines.flatMap((l) => (l['ranges'] as string[][]).map(([s, e]) => [BigInt(s!), BigInt(e!)] as [bigint, bigint])));
    expect(hex(inRegions(w, ranges))).toEqual(hex(normalize([...pagesOf(w.anon, [2, 3]), ...pagesOf(w.shm, [9, 1])])));
    // The target is unprotected once the command is done.
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(0);
  });

  it('leaves the target unprotected on Ctrl-C (exit 130)', async () => {
    const w = await startWriter();
    const child = spawn(process.execPath, [CLI_JS, 'track', String(w.fixture.pid), '--interval', '200ms'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    while (!out.includes('round 1')) await new Promise((r) => setTimeout(r, 50));
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(w.pages);
    child.kill('SIGINT');
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    expect(code).toBe(130);
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(0);
    await w.send('write anon 1'); // still running
  });

  it('refuses bad input with one line and the right exit code', async () => {
    const w = await startWriter(8);
    const soft = await runCli(['track', String(w.fixture.pid), '--tracker', 'soft-dirty', '--duration', '1s']);
    expect(soft.code).toBe(3);
    expect(soft.stderr).toMatch(/^wpsnap: --tracker soft-dirty cannot work here: .*soft-dirty bit.*\n$/);
    const interval = await runCli(['track', String(w.fixture.pid), '--interval', 'soon']);
    expect(interval.code).toBe(2);
    expect(interval.stderr).toMatch(/^wpsnap: --interval must be a positive duration such as 500ms, 1s or 2m, not "soon"/);
    const gone = await runCli(['track', '999999999', '--duration', '1s']);
    expect(gone.code).toBe(4);
    expect(gone.stderr).toBe('wpsnap: no process with pid 999999999\n');
    // A second tracker of the same process: its mappings belong to the first one's context.
    const first = track(w.fixture.pid, 'async');
    const second = await runCli(['track', String(w.fixture.pid), '--duration', '1s']);
    expect(second.code).toBe(1);
    expect(second.stderr).toMatch(/^wpsnap: .*registered with another userfaultfd/);
    expect(second.stderr.split('\n').length).toBe(2);
    first.stop();
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(0);
  });
});

describe("the library API (import { trackDirty } from 'wpsnap')", () => {
  it('starts, takes rounds and stops', async () => {
    const w = await startWriter(16);
    const t = trackDirty(w.fixture.pid);
    cleanups.push(() => t.stop());
    t.take();
    await w.send('write anon 5');
    expect(hex(inRegions(w, t.take().dirty))).toEqual(hex(pagesOf(w.anon, [5, 1])));
    t.stop();
    expect(uffdWpPages(w.fixture.pid, w.anon, w.pages)).toBe(0);
  });
});
