// Tracking that outlives the command: `snapshot --track` leaves a keeper
// process holding the snapshot's own userfaultfd; the next `snapshot
// --parent` takes it over and reads only the pages written since; `status`,
// `untrack`; a keeper killed with -9 releases the target; a target that
// exits ends its keeper; strangers are refused (SO_PEERCRED). Real snapshots
// of fixtures/dirtywriter, whose writes between two instants are known.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Store } from '../store/store.js';
import { writerScope } from './support/writer-scope.js';
import { generationPages as recordedPages, pageWords, storedPages, within } from './support/generation-pages.js';
import { PAGE, type Writer } from './support/dirtywriter.js';
import { runCli } from './support/cli.js';
import { isAlive, sleep, uffdWpPages } from './support/proc.js';
import { launchFixture } from '../fixtures/launch.js';
import { checkSnapshot, parseLayout } from '../fixtures/oracle.js';

const scope = writerScope('wpsnap-keeper-');
const { cleanups, writer, cli } = scope;
let dir: string;
let store: string;
let runtime: string;
const savedRuntime = process.env['WPSNAP_RUNTIME_DIR'];
beforeEach(() => {
  ({ dir, store } = scope);
  runtime = join(dir, 'run');
  process.env['WPSNAP_RUNTIME_DIR'] = runtime;
});
// Runs before the scope's own afterEach (vitest runs after-hooks last registered first), so the
// targets are still there: keepers of this test's targets untracked, or ended with their target.
afterEach(async () => {
  for (const name of existsSync(runtime) ? execFileSync('ls', [runtime], { encoding: 'utf8' }).split('\n') : []) {
    const m = /^(\d+)\.sock$/.exec(name);
    if (m) await runCli(['untrack', m[1]!]);
  }
  if (savedRuntime === undefined) delete process.env['WPSNAP_RUNTIME_DIR'];
  else process.env['WPSNAP_RUNTIME_DIR'] = savedRuntime;
});

const snapshot = (w: Writer, name: string, ...more: string[]): Promise<Record<string, unknown>> =>
  cli('snapshot', String(w.fixture.pid), '--name', name, ...more);

async function status(): Promise<Array<Record<string, unknown>>> {
  const run = await runCli(['status', '--json']);
  expect(run.code).toBe(0);
  return (JSON.parse(run.stdout) as { tracking: Array<Record<string, unknown>> }).tracking;
}

const words = (ref: string, base: bigint, pages: number): bigint[] => pageWords(store, ref, base, pages);
const ownPages = (ref: string): bigint[] => storedPages(store, ref);
const generationPages = (ref: string, kind: 'dirty' | 'zeroed'): bigint[] => recordedPages(store, ref, kind);
const pageList = (base: bigint, ...indices: number[]): bigint[] => indices.map((i) => base + BigInt(i) * PAGE);
const filledAnon = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(i + 1));
const filledShm = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(65 + i));

async function waitFor(what: string, check: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

describe('snapshot --track and a tracked generation', () => {
  it('keeps the target tracked; the next --parent reads only the pages written since, exactly', async () => {
    const w = await writer();
    const base = await snapshot(w, 'base', '--track');
    expect(base['tracking']).toMatchObject({ keeperPid: expect.any(Number) });
    const keeperPid = (base['tracking'] as { keeperPid: number }).keeperPid;
    // Every anon page is protected again after the snapshot: its first write is seen.
    expect(uffdWpPages(w.fixture.pid, w.anon, 64)).toBe(64);
    const listed = await status();
    expect(listed).toEqual([expect.objectContaining({ pid: w.fixture.pid, keeperPid, base: base['id'], store, state: 'tracking' })]);

    await w.send('write anon 3'); // 4 -> 129
    await w.send('same anon 7'); // written back unchanged
    await w.send('write anon 40 41'); // 130, 131
    await w.send('write shm 10'); // 75 -> 132
    await w.send('dontneed anon 20 1'); // 21 -> 0
    await w.send('read anon 50'); // read only: not written
    const mapped = BigInt((await w.send('map 4'))['addr'] as string); // 133..136
    expect(uffdWpPages(w.fixture.pid, w.anon, 64)).toBe(64 - 5); // 3, 7, 40, 41 let through, 20 zapped

    const g1 = await snapshot(w, 'g1', '--parent', 'base', '--track');
    expect(g1).toMatchObject({ parent: base['id'], incremental: 'tracked', tookOverFrom: { keeperPid, base: base['id'] }, tracking: { keeperPid } });
    expect(g1['lostPages']).toEqual([]);
    // The dirty set of the anon region: exactly the pages written (the one written back unchanged
    // too) and the zapped one; never the page only read.
    const dirty = generationPages('g1', 'dirty');
    expect(within(dirty, w.anon, 64)).toEqual(pageList(w.anon, 3, 7, 20, 40, 41));
    // Shared memory is written through fds without a fault: it counts as written whole.
    expect(within(dirty, w.shm, 64)).toHaveLength(64);
    expect(within(dirty, mapped, 4)).toEqual(pageList(mapped, 0, 1, 2, 3));
    // Stored by g1 itself: only what changed; the page written back unchanged is not stored.
    const own = ownPages('g1');
    expect(within(own, w.anon, 64)).toEqual(pageList(w.anon, 3, 40, 41));
    expect(within(own, w.shm, 64)).toEqual(pageList(w.shm, 10));
    expect(within(generationPages('g1', 'zeroed'), w.anon, 64)).toEqual(pageList(w.anon, 20));
    expect(g1['writtenUnchangedPages']).toBeGreaterThanOrEqual(1 + 63); // anon 7, the unchanged shm pages
    // Read through the chain: every page as it was at g1's instant.
    const anon = filledAnon(64);
    anon[3] = 129n;
    anon[40] = 130n;
    anon[41] = 131n;
    anon[20] = 0n;
    expect(words('g1', w.anon, 64)).toEqual(anon);
    const shm = filledShm(64);
    shm[10] = 132n;
    expect(words('g1', w.shm, 64)).toEqual(shm);
    expect(words('g1', mapped, 4)).toEqual([133n, 134n, 135n, 136n]);
    expect(words('base', w.anon, 64)).toEqual(filledAnon(64));

    // The same keeper tracks on from g1's instant.
    expect(await status()).toEqual([expect.objectContaining({ pid: w.fixture.pid, keeperPid, base: g1['id'], state: 'tracking' })]);
    await w.send('write anon 5'); // 137
    // A full snapshot of the tracked target (no --parent) takes the context over and, without
    // --track, ends the tracking; with nothing written in between it equals g2 page for page.
    const g2 = await snapshot(w, 'g2', '--parent', 'g1');
    expect(g2).toMatchObject({ incremental: 'tracked', tookOverFrom: { keeperPid, base: g1['id'] } });
    expect(g2['tracking']).toBeUndefined();
    expect(within(generationPages('g2', 'dirty'), w.anon, 64)).toEqual(pageList(w.anon, 5));
    await waitFor('the keeper to end', () => !isAlive(keeperPid));
    expect(await status()).toEqual([]);
    await waitFor('the target to be unprotected', () => uffdWpPages(w.fixture.pid, w.anon, 64) === 0);
    const full = await snapshot(w, 'full');
    expect(full['incremental']).toBeUndefined();
    anon[5] = 137n;
    expect(words('g2', w.anon, 64)).toEqual(anon);
    expect(words('full', w.anon, 64)).toEqual(anon);
    // Every other page too, but one the kernel itself writes whenever the thread changes CPU:
    // the rseq area's cpu ids (in the static TLS, the anonymous mapping right below libc).
    const diff = JSON.parse((await runCli(['diff', 'g2', 'full', '--json', '--store', store])).stdout) as {
      regions: Array<{ start: string; end: string; changedPages: number; changedBytes: number }>;
    };
    const changed = diff.regions.filter((r) => r.changedPages > 0);
    expect(changed.length).toBeLessThanOrEqual(1);
    for (const r of changed) {
      expect(r).toMatchObject({ changedPages: 1, changedBytes: expect.any(Number) });
      expect(r.changedBytes).toBeLessThanOrEqual(8);
      expect(BigInt(r.start) <= w.anon && w.anon < BigInt(r.end)).toBe(true); // the anon mapping merged with the TLS one
    }
  });

  it('is exact at each instant for a target writing at full speed (the oracle), kernel writes included', async () => {
    const fixture = await launchFixture('pagewriter', ['--threads', '2', '--pages', '2048', '--memfd-pages', '512', '--untouched-mib', '16']);
    cleanups.push(() => fixture.kill());
    const layout = parseLayout(fixture.readyLine);
    const pid = String(fixture.pid);
    const base = await cli('snapshot', pid, '--name', 'base', '--track');
    await sleep(300);
    const g1 = await cli('snapshot', pid, '--name', 'g1', '--parent', 'base', '--track');
    expect(g1).toMatchObject({ incremental: 'tracked', tookOverFrom: { base: base['id'] } });
    await sleep(300);
    const g2 = await cli('snapshot', pid, '--name', 'g2', '--parent', 'g1');
    expect(g2).toMatchObject({ incremental: 'tracked', tookOverFrom: { base: g1['id'] } });
    const s = Store.open(store, { readonly: true, onWarning: () => undefined });
    try {
      for (const ref of ['base', 'g1', 'g2']) {
        const processId = s.processes(s.find(ref).id)[0]!.processId;
        const report = checkSnapshot(layout, (address) => s.readPage(processId, address));
        expect(report.mismatches, ref).toEqual([]);
        expect(report.pagesChecked).toBe(layout.writers.reduce((n, w) => n + w.pages, 0) + layout.untouched.bytes / 4096);
        expect((await s.verify(s.find(ref).id)).problems).toEqual([]);
      }
    } finally {
      await s.close();
    }
    // The generations read only what was written: far less than the whole.
    expect(g1['pagesSaved'] as number).toBeLessThan(base['pagesSaved'] as number);
  });

  it('follows mappings moved and unmapped while tracked', async () => {
    const w = await writer();
    const mapped = BigInt((await w.send('map 8'))['addr'] as string); // 129..136
    await snapshot(w, 'base', '--track');
    await w.send(`unmap 0x${(mapped + 6n * PAGE).toString(16)} 2`);
    const moved = BigInt((await w.send(`move 0x${mapped.toString(16)} 2`))['addr'] as string);
    await w.send(`write 0x${(mapped + 3n * PAGE).toString(16)} 0`); // 137 on page 3
    const g1 = await snapshot(w, 'g1', '--parent', 'base');
    expect(g1).toMatchObject({ incremental: 'tracked', lostPages: [] });
    const dirty = generationPages('g1', 'dirty');
    expect(within(dirty, moved, 2)).toEqual(pageList(moved, 0, 1)); // moved: written whole at its new place
    expect(within(dirty, mapped + 2n * PAGE, 4)).toEqual(pageList(mapped, 3));
    expect(words('g1', moved, 2)).toEqual([129n, 130n]);
    expect(words('g1', mapped + 2n * PAGE, 4)).toEqual([131n, 137n, 133n, 134n]);
  });
});

describe('the keeper', () => {
  it('is private, listed by status, ended by untrack, which unprotects the target', async () => {
    const w = await writer();
    const old = process.umask(0);
    let base: Record<string, unknown>;
    try {
      base = await snapshot(w, 'base', '--track');
    } finally {
      process.umask(old);
    }
    expect(statSync(runtime).mode & 0o777).toBe(0o700);
    expect(statSync(join(runtime, `${w.fixture.pid}.sock`)).mode & 0o777).toBe(0o600);
    expect(statSync(join(runtime, `${w.fixture.pid}.log`)).mode & 0o777).toBe(0o600);
    await w.send('write anon 1 2');
    const [entry] = await status();
    expect(entry).toMatchObject({ pid: w.fixture.pid, base: base['id'], state: 'tracking', since: expect.stringMatching(/^\d{4}-\d\d-\d\dT/) });
    expect(entry!['writtenPages']).toBeGreaterThanOrEqual(2);
    const human = await runCli(['status']);
    expect(human.stdout).toContain(`snapshot ${base['id']}`);
    const keeperPid = entry!['keeperPid'] as number;

    const untracked = await runCli(['untrack', String(w.fixture.pid), '--json']);
    expect(untracked.code).toBe(0);
    expect(JSON.parse(untracked.stdout)).toMatchObject({ pid: w.fixture.pid, base: base['id'], keeperPid });
    await waitFor('the keeper to end', () => !isAlive(keeperPid));
    await waitFor('the target to be unprotected', () => uffdWpPages(w.fixture.pid, w.anon, 64) === 0);
    expect(existsSync(join(runtime, `${w.fixture.pid}.sock`))).toBe(false);
    await w.send('write anon 9'); // the target runs on

    // No tracking: untrack refuses, --parent falls back to a compared generation.
    const again = await runCli(['untrack', String(w.fixture.pid)]);
    expect(again.code).toBe(2);
    expect(again.stderr).toBe(`wpsnap: pid ${w.fixture.pid} is not tracked (wpsnap status lists what is)\n`);
    const g1 = await snapshot(w, 'g1', '--parent', 'base');
    expect(g1['incremental']).toBe('compared');
  });

  it('killed with -9, releases the target: no protection left, and the next --parent compares', async () => {
    const w = await writer();
    const base = await snapshot(w, 'base', '--track');
    const keeperPid = (base['tracking'] as { keeperPid: number }).keeperPid;
    expect(uffdWpPages(w.fixture.pid, w.anon, 64)).toBe(64);
    process.kill(keeperPid, 'SIGKILL');
    await waitFor('the keeper to die', () => !isAlive(keeperPid));
    // The kernel clears the protection as it releases the context (its last fd closes as the keeper exits).
    await waitFor('the target to be unprotected', () => uffdWpPages(w.fixture.pid, w.anon, 64) === 0);
    await w.send('write anon 4'); // 129: the target is not held
    expect(await status()).toEqual([]); // the stale socket is cleaned up
    expect(existsSync(join(runtime, `${w.fixture.pid}.sock`))).toBe(false);
    const g1 = await snapshot(w, 'g1', '--parent', 'base', '--track');
    expect(g1).toMatchObject({ incremental: 'compared', tracking: { keeperPid: expect.any(Number) } });
    expect(within(generationPages('g1', 'dirty'), w.anon, 64)).toEqual(pageList(w.anon, 4));
  });

  it('ends when its target exits', async () => {
    const w = await writer();
    const base = await snapshot(w, 'base', '--track');
    const keeperPid = (base['tracking'] as { keeperPid: number }).keeperPid;
    w.fixture.kill('SIGKILL');
    await w.fixture.exited;
    await waitFor('the keeper to end', () => !isAlive(keeperPid));
    expect(existsSync(join(runtime, `${w.fixture.pid}.sock`))).toBe(false);
    expect(existsSync(join(runtime, `${w.fixture.pid}.log`))).toBe(false);
  });

  it('is the only tracker of its target: track and precopy are refused with the way out', async () => {
    const w = await writer();
    const base = await snapshot(w, 'base', '--track');
    const keeperPid = (base['tracking'] as { keeperPid: number }).keeperPid;
    const pid = String(w.fixture.pid);
    for (const argv of [['track', pid, '--duration', '1s'], ['precopy', pid, '--store', store]]) {
      const run = await runCli(argv);
      expect(run.code).toBe(2);
      expect(run.stderr).toBe(
        `wpsnap: pid ${pid} is tracked since snapshot ${base['id']} by keeper ${keeperPid}: ${argv[0]} needs it untracked (wpsnap untrack ${pid}), or take a snapshot --parent ${base['id']} instead\n`,
      );
    }
    // A second snapshot --track takes the tracking over: still one keeper, the same one.
    const again = await snapshot(w, 'again', '--track');
    expect(again['tracking']).toMatchObject({ keeperPid });
    expect(await status()).toEqual([expect.objectContaining({ base: again['id'] })]);
  });

  it('refuses a peer of another user (SO_PEERCRED) and logs it', async () => {
    const w = await writer();
    const base = await snapshot(w, 'base', '--track');
    // A client whose effective uid is nobody's, looking paths up as root (fsuid 0) so that it
    // reaches the socket in the private directory: only the peer check can stop it.
    const client = [
      'import ctypes, os, socket, sys',
      'libc = ctypes.CDLL(None, use_errno=True)',
      'os.seteuid(65534)',
      'libc.setfsuid(0)',
      's = socket.socket(socket.AF_UNIX)',
      's.connect(sys.argv[1])',
      'try:',
      '    s.sendall(b\'{"op":"status"}\\n\')',
      '    print(repr(s.recv(4096)))',
      'except (ConnectionResetError, BrokenPipeError):',
      '    print(repr(b""))',
    ].join('\n');
    const run = spawnSync('python3', ['-c', client, join(runtime, `${w.fixture.pid}.sock`)], { encoding: 'utf8' });
    expect(run.stderr).toBe('');
    expect(run.stdout.trim()).toBe("b''"); // closed without an answer
    const log = readFileSync(join(runtime, `${w.fixture.pid}.log`), 'utf8');
    expect(log).toMatch(new RegExp(`refused a connection from pid ${run.pid} uid 65534`));
    // Its own user is answered.
    expect(await status()).toEqual([expect.objectContaining({ base: base['id'] })]);
  });
});
