// In-place rollback: a live process rolled back to a snapshot's instant
// continues from its state at T (fixtures/dirtywriter: its counter restarts
// from T's value, its pages read T's values, a mapping made since is gone, a
// zapped page is back); what cannot be done whole is refused, changing
// nothing.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { Store } from '../store/store.js';
import { startDetached } from './support/spawn.js';
import { writerScope } from './support/writer-scope.js';
import { pageWords } from './support/generation-pages.js';
import { ROOT, runCli, runCliProcess } from './support/cli.js';
import { launchProgram } from '../fixtures/launch.js';
import { rollbackSession } from '../core/api.js';
import { loadBinding } from '../core/binding.js';
import { readMaps } from '../core/procfs.js';
import { tracerPids, uffdWpPages, untraced } from './support/proc.js';
import { ROLLBACK_FAULT_POINTS } from '../core/fault.js';

const scope = writerScope('wpsnap-rollback-');
const { cleanups, writer, cli } = scope;
let dir: string;
let store: string;
beforeEach(() => {
  ({ dir, store } = scope);
});

const words = (ref: string, base: bigint, pages: number): bigint[] => pageWords(store, ref, base, pages);

/** `wpsnap status --json`'s tracking entries for pid, once its keeper (if any) has ended: up to 5 s. */
async function waitForStatus(pid: number): Promise<unknown[]> {
  let tracking: Array<{ pid: number }> = [];
  for (let waited = 0; waited < 5000; waited += 50) {
    tracking = (JSON.parse((await runCli(['status', '--json'])).stdout) as { tracking: Array<{ pid: number }> }).tracking.filter((t) => t.pid === pid);
    if (tracking.length === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return tracking;
}
const filledAnon = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(i + 1));
const filledShm = (n: number): bigint[] => Array.from({ length: n }, (_, i) => BigInt(65 + i));

describe('wpsnap rollback', () => {
  it('puts memory, layout and the program counter back: the program continues from T', async () => {
    const w = await writer();
    const blocked = (): string => /^SigBlk:\s+([0-9a-f]+)$/m.exec(readFileSync(`/proc/${w.fixture.pid}/status`, 'utf8'))![1]!;
    const maskAtT = blocked();
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    await w.send('block 10'); // SIGUSR1 blocked since T
    expect(blocked()).not.toBe(maskAtT);
    await w.send('write anon 3 5'); // 129, 130
    await w.send('write shm 1'); // 131
    await w.send('dontneed anon 10 1');
    const mapped = BigInt((await w.send('map 4'))['addr'] as string); // 132..135
    const result = await cli('rollback', 'base');
    expect(result).toMatchObject({ id: 1, pid: w.fixture.pid, incremental: false, threadsRestored: 1, threadsExited: 0 });
    expect(result['pagesWritten'] as number).toBeGreaterThanOrEqual(4); // anon 3, 5, 10, shm 1 (and the program's own data)
    expect(result['mappingsRepaired'] as number).toBeGreaterThanOrEqual(1); // the mapping made since: unmapped
    expect(result['warnings']).toEqual(expect.arrayContaining([expect.stringMatching(/^file descriptors opened or closed since T/)]));
    expect(Object.values(tracerPids(w.fixture.pid)).every((t) => t === 0)).toBe(true);
    expect(readMaps(w.fixture.pid).some((m) => m.start <= mapped && mapped < m.end)).toBe(false);
    expect(blocked()).toBe(maskAtT); // the signal mask of T
    // The program runs on from T: its counter restarts at T's value (the next write takes 129 again).
    await w.send('write anon 7');
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    const anon = filledAnon(64);
    anon[7] = 129n;
    expect(words('after', w.anon, 64)).toEqual(anon);
    expect(words('after', w.shm, 64)).toEqual(filledShm(64));
  });

  it('repairs the layout: heap grown, memory unmapped and re-protected since T', async () => {
    const w = await writer();
    const heapAtT = readMaps(w.fixture.pid).find((m) => m.path === '[heap]');
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    const grown = BigInt((await w.send('grow 40'))['addr'] as string); // the heap grows by 40 pages: 129..168
    expect(readMaps(w.fixture.pid).find((m) => m.path === '[heap]')!.end).toBeGreaterThan(heapAtT?.end ?? 0n);
    await w.send(`unmap 0x${(w.anon + 10n * 4096n).toString(16)} 6`); // a hole in the middle of anon
    await w.send(`protect 0x${(w.anon + 30n * 4096n).toString(16)} 2 r`);
    const result = await cli('rollback', 'base');
    expect(result['mappingsRepaired'] as number).toBeGreaterThanOrEqual(3); // brk, the hole re-created, the protection
    const maps = readMaps(w.fixture.pid);
    expect(maps.find((m) => m.path === '[heap]')?.end).toBe(heapAtT?.end);
    expect(maps.some((m) => m.start <= grown + 39n * 4096n && grown + 39n * 4096n < m.end && m.path !== '[heap]')).toBe(false);
    const anonMaps = maps.filter((m) => m.start < w.anon + 64n * 4096n && w.anon < m.end);
    expect(anonMaps.every((m) => m.perms === 'rw-p')).toBe(true);
    expect(anonMaps.reduce((n, m) => n + ((m.end < w.anon + 64n * 4096n ? m.end : w.anon + 64n * 4096n) - (m.start > w.anon ? m.start : w.anon)), 0n)).toBe(64n * 4096n);
    // The program runs on from T: its writes land, its counter restarts at T's value.
    await w.send('write anon 12 31');
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    const anon = filledAnon(64);
    anon[12] = 129n;
    anon[31] = 130n;
    expect(words('after', w.anon, 64)).toEqual(anon);
  });

  it('maps again the file and shared mappings unmapped since T: a private file mapping with its copied page, a shared file mapping, a memfd', async () => {
    const w = await writer();
    const file = join(dir, 'data.bin');
    const data = Buffer.alloc(4 * 4096);
    for (let i = 0; i < 4; i++) data.writeBigUInt64LE(BigInt(1000 + i), i * 4096);
    writeFileSync(file, data, { mode: 0o600 });
    const privateMap = BigInt((await w.send(`mapfile ${file} private`))['addr'] as string); // page 0 copied: 129
    const sharedMap = BigInt((await w.send(`mapfile ${file} shared`))['addr'] as string);
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    const mapsAtT = readMaps(w.fixture.pid);
    await w.send(`unmap 0x${privateMap.toString(16)} 4`);
    await w.send(`unmap 0x${sharedMap.toString(16)} 2`);
    await w.send(`unmap 0x${w.shm.toString(16)} 64`);
    const result = await cli('rollback', 'base');
    expect(result['mappingsRepaired'] as number).toBeGreaterThanOrEqual(3);
    const mapsNow = readMaps(w.fixture.pid);
    // Mapped again from a new open of the file, a part does not merge with the rest (another struct file): compared coalesced.
    const described = (maps: typeof mapsNow, from: bigint, to: bigint): string[] => {
      const out: Array<{ start: bigint; end: bigint; perms: string; offset: bigint; inode: number; path: string }> = [];
      for (const m of maps.filter((x) => x.start < to && from < x.end)) {
        const last = out[out.length - 1];
        if (last && last.end === m.start && last.perms === m.perms && last.inode === m.inode && last.path === m.path && last.offset + (last.end - last.start) === m.offset) last.end = m.end;
        else out.push({ ...m });
      }
      return out.map((m) => `${m.start}-${m.end} ${m.perms} ${m.offset} ${m.inode} ${m.path}`);
    };
    for (const [from, pages] of [[privateMap, 4n], [sharedMap, 4n], [w.shm, 64n]] as const) {
      expect(described(mapsNow, from, from + pages * 4096n)).toEqual(described(mapsAtT, from, from + pages * 4096n));
    }
    const binding = loadBinding();
    const word = (address: bigint): bigint => binding.processVmRead(w.fixture.pid, address, 8).readBigUInt64LE(0);
    expect([0, 1, 2, 3].map((i) => word(privateMap + BigInt(i) * 4096n))).toEqual([129n, 1001n, 1002n, 1003n]);
    expect([0, 1, 2, 3].map((i) => word(sharedMap + BigInt(i) * 4096n))).toEqual([1000n, 1001n, 1002n, 1003n]);
    expect(words('base', w.shm, 64)).toEqual(filledShm(64));
    expect(Array.from({ length: 64 }, (_, i) => word(w.shm + BigInt(i) * 4096n))).toEqual(filledShm(64));
    // The program runs on from T, through the memfd mapped again too (its next value is 130).
    await w.send('write shm 3');
    expect(word(w.shm + 3n * 4096n)).toBe(130n);
    // A memfd the process no longer holds an fd on cannot be mapped again: refused, nothing changed.
    await w.send('closeshm');
    await cli('snapshot', String(w.fixture.pid), '--name', 'two');
    await w.send(`unmap 0x${w.shm.toString(16)} 64`);
    await w.send('write anon 2');
    const refused = await runCli(['rollback', 'two', '--store', store]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/^wpsnap: pid \d+: 0x[0-9a-f]+-0x[0-9a-f]+ of \/memfd:dirtywriter-shm \(deleted\) \(rw-s\) was mapped at T and is not now, and cannot be mapped again: the process holds no fd on it any more; nothing changed\n$/);
    expect(readMaps(w.fixture.pid).some((m) => m.start < w.shm + 4096n && w.shm < m.end)).toBe(false);
    expect(word(w.anon + 2n * 4096n)).toBe(131n);
  });

  it('rolls back again and again to the same instant', async () => {
    const w = await writer();
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    for (let round = 0; round < 3; round++) {
      await w.send('write anon 2 4 6');
      await cli('rollback', 'base');
    }
    await w.send('write anon 1');
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    const anon = filledAnon(64);
    anon[1] = 129n;
    expect(words('after', w.anon, 64)).toEqual(anon);
  });

  it('makes threads started since T exit, and refuses when a thread of T is gone', async () => {
    const w = await writer();
    await cli('snapshot', String(w.fixture.pid), '--name', 'one');
    await w.send('thread');
    await w.send('thread');
    expect((await w.send('threads'))['count']).toBe(3);
    const result = await cli('rollback', 'one');
    expect(result).toMatchObject({ threadsRestored: 1, threadsExited: 2 });
    expect((await w.send('threads'))['count']).toBe(1);
    // A thread of T that exited since: refused, and nothing changed.
    await w.send('thread');
    await cli('snapshot', String(w.fixture.pid), '--name', 'two');
    await w.send('write anon 3');
    await w.send('endthreads');
    const refused = await runCli(['rollback', 'two', '--store', store]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(new RegExp(`^wpsnap: pid ${w.fixture.pid}: thread \\d+ of T exited since; nothing changed\n$`));
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    expect(words('after', w.anon, 4)).toEqual([1n, 2n, 3n, 129n]);
  });

  it('--incremental rewrites only the pages written since T, again and again, and keeps tracking', async () => {
    const saved = process.env['WPSNAP_RUNTIME_DIR'];
    process.env['WPSNAP_RUNTIME_DIR'] = join(dir, 'run');
    cleanups.push(() => {
      if (saved === undefined) delete process.env['WPSNAP_RUNTIME_DIR'];
      else process.env['WPSNAP_RUNTIME_DIR'] = saved;
    });
    const w = await writer(1024);
    const base = await cli('snapshot', String(w.fixture.pid), '--name', 'base', '--track');
    const keeperPid = (base['tracking'] as { keeperPid: number }).keeperPid;
    cleanups.push(() => void runCli(['untrack', String(w.fixture.pid)]));
    for (let round = 0; round < 3; round++) {
      await w.send('write anon 3 100 900');
      await w.send('same anon 7');
      await w.send('dontneed anon 50 2');
      await w.send('write shm 5');
      await w.send(`unmap 0x${w.shm.toString(16)} 4`); // mapped again from the memfd's fd, untracked: compared
      const r = await cli('rollback', 'base', '--incremental');
      expect(r).toMatchObject({ incremental: true, threadsRestored: 1, threadsExited: 0 });
      // Of the 1024 tracked anon pages only the 6 touched are rewritten (plus the program's own stack, heap, data);
      // what no fault tells about (the 1024 shared pages, the libraries' private file mappings) is compared whole:
      // had the anon pages been compared too, more than 2048 pages would have been.
      expect(r['pagesWritten'] as number).toBeGreaterThanOrEqual(6 + 1);
      expect(r['pagesCompared'] as number).toBeGreaterThan(1024);
      expect(r['pagesCompared'] as number).toBeLessThan(2048);
      // Still tracked since base, by the same keeper.
      const status = JSON.parse((await runCli(['status', '--json'])).stdout) as { tracking: Array<Record<string, unknown>> };
      expect(status.tracking).toEqual([expect.objectContaining({ keeperPid, base: base['id'], state: 'tracking' })]);
    }
    // Continues from T: the counter restarts (anon 1..1024, shm 1025..2048 at the fill; the next write takes 2049).
    await w.send('write anon 9');
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    const anon = filledAnon(1024);
    anon[9] = 2049n;
    expect(words('after', w.anon, 1024)).toEqual(anon);
    expect(words('after', w.shm, 8)).toEqual([1025n, 1026n, 1027n, 1028n, 1029n, 1030n, 1031n, 1032n]);
  });

  it('--pid: rolls another live process of the same program and layout to the snapshot\'s instant', async () => {
    // Two dirtywriters with address-space randomization off: the same layout.
    const start = async (): Promise<{ pid: number; anon: bigint; send: (c: string) => Promise<Record<string, unknown>> }> => {
      const fifo = join(dir, `commands-${cleanups.length}`);
      execFileSync('mkfifo', ['-m', '0600', fifo]);
      const p = await launchProgram('/usr/bin/setarch', ['x86_64', '-R', join(ROOT, 'fixtures', 'build', 'dirtywriter'), '-p', '64', '-c', fifo]);
      const fd = openSync(fifo, 'w');
      cleanups.push(() => {
        closeSync(fd);
        p.kill();
      });
      const ready = JSON.parse(p.readyLine) as { anon: string };
      return {
        pid: p.pid,
        anon: BigInt(ready.anon),
        send: async (c) => {
          writeSync(fd, `${c}\n`);
          return JSON.parse((await p.nextLine())!) as Record<string, unknown>;
        },
      };
    };
    const a = await start();
    const b = await start();
    expect(b.anon).toBe(a.anon);
    await a.send('write anon 3 4 5'); // 129, 130, 131 in a
    await cli('snapshot', String(a.pid), '--name', 'a');
    await b.send('write anon 60'); // 129 in b
    await b.send('thread'); // b has a thread a had not
    const result = await cli('rollback', 'a', '--pid', String(b.pid));
    expect(result).toMatchObject({ pid: b.pid, threadsRestored: 1, threadsExited: 1 });
    // b goes on as a would from T: its next write takes a's next counter value.
    await b.send('write anon 7');
    expect((await b.send('threads'))['count']).toBe(1);
    await cli('snapshot', String(b.pid), '--name', 'b');
    const anon = filledAnon(64);
    anon[3] = 129n;
    anon[4] = 130n;
    anon[5] = 131n;
    anon[7] = 132n;
    expect(words('b', b.anon, 64)).toEqual(anon);
    // a is untouched.
    await cli('snapshot', String(a.pid), '--name', 'a2');
    const aNow = filledAnon(64);
    aNow[3] = 129n;
    aNow[4] = 130n;
    aNow[5] = 131n;
    expect(words('a2', a.anon, 64)).toEqual(aNow);
  });

  it('a library session rolls back again and again: pages written since T stay writable and are written back each time, past keepWritablePages they are protected again', async () => {
    const saved = process.env['WPSNAP_RUNTIME_DIR'];
    process.env['WPSNAP_RUNTIME_DIR'] = join(dir, 'run');
    cleanups.push(() => {
      if (saved === undefined) delete process.env['WPSNAP_RUNTIME_DIR'];
      else process.env['WPSNAP_RUNTIME_DIR'] = saved;
    });
    const w = await writer(256);
    const base = await cli('snapshot', String(w.fixture.pid), '--name', 'base', '--track');
    cleanups.push(() => void runCli(['untrack', String(w.fixture.pid)]));
    // The target's anonymous pages, read live: between commands it waits for the next one, its memory still.
    const binding = loadBinding();
    const live = (): bigint[] => {
      const bytes = binding.processVmRead(w.fixture.pid, w.anon, 256 * 4096);
      return Array.from({ length: 256 }, (_, i) => bytes.readBigUInt64LE(i * 4096));
    };
    const atT = filledAnon(256);
    const session = rollbackSession(store, 'base', { incremental: true, keepWritablePages: 64 });
    try {
      await w.send('write anon 1 2 3');
      const first = await session.rollback();
      expect(first).toMatchObject({ id: 1, pid: w.fixture.pid, incremental: true, threadsRestored: 1, threadsExited: 0 });
      expect(live()).toEqual(atT);
      // Pages 1, 2 and 3 stay writable: written back again although not written this time, with page 10.
      await w.send('write anon 1 10');
      const second = await session.rollback();
      expect(second.pagesWritten).toBeGreaterThanOrEqual(first.pagesWritten + 1);
      expect(live()).toEqual(atT);
      // 100 pages more: past 64 writable pages, all are protected again after being written back...
      await w.send(`write anon ${Array.from({ length: 100 }, (_, i) => 100 + i).join(' ')}`);
      const many = await session.rollback();
      expect(many.pagesWritten).toBeGreaterThanOrEqual(second.pagesWritten + 100);
      expect(live()).toEqual(atT);
      // ...so that the next rollback, with nothing written meanwhile, writes none of them back,
      const quiet = await session.rollback();
      expect(quiet.pagesWritten).toBeLessThan(first.pagesWritten + 3);
      expect(live()).toEqual(atT);
      // and a write to one of them is logged again and undone.
      await w.send('write anon 150 2');
      await session.rollback();
      expect(live()).toEqual(atT);
    } finally {
      await session.close();
    }
    // Handed back to the keeper, tracking since base.
    const status = JSON.parse((await runCli(['status', '--json'])).stdout) as { tracking: Array<Record<string, unknown>> };
    expect(status.tracking).toEqual([expect.objectContaining({ base: base['id'], state: 'tracking' })]);
    // The program runs on from T: its counter restarts (anon 1..256, shm 257..512; the next write takes 513).
    await w.send('write anon 4');
    await cli('snapshot', String(w.fixture.pid), '--name', 'after');
    const anon = filledAnon(256);
    anon[4] = 513n;
    expect(words('after', w.anon, 256)).toEqual(anon);
  });

  it('readRuns/writeRuns move many runs in one call, through /proc/PID/mem where a page is not writable or readable', async () => {
    const w = await writer();
    await w.send(`protect 0x${(w.anon + 5n * 4096n).toString(16)} 2 r`);
    await w.send(`protect 0x${(w.anon + 9n * 4096n).toString(16)} 1 none`);
    const binding = loadBinding();
    const mem = openSync(`/proc/${w.fixture.pid}/mem`, 'r+');
    cleanups.push(() => closeSync(mem));
    // Runs: page 1, pages 4-6 (5 and 6 read-only), page 9 (no access), pages 20-21; data in another order.
    const runs: Array<[number, number]> = [[1, 1], [4, 3], [9, 1], [20, 2]];
    let offset = 0;
    const triples = BigUint64Array.from(runs.flatMap(([page, n]) => {
      const t = [w.anon + BigInt(page) * 4096n, BigInt(n * 4096), BigInt(offset)];
      offset += n * 4096;
      return t;
    }));
    const data = Buffer.alloc(offset);
    for (let i = 0; i < offset / 4096; i++) data.writeBigUInt64LE(BigInt(7000 + i), i * 4096);
    binding.writeRuns(w.fixture.pid, mem, triples, data);
    const back = Buffer.alloc(offset);
    binding.readRuns(w.fixture.pid, mem, triples, back);
    expect(back.equals(data)).toBe(true);
    const bytes = binding.processVmRead(w.fixture.pid, w.anon, 4096); // page 0 untouched
    expect(bytes.readBigUInt64LE(0)).toBe(1n);
  });

  it.each(['mid-inject', ...ROLLBACK_FAULT_POINTS])('a rollback --incremental killed at %s leaves the target running, untraced, unprotected and untracked', async (point) => {
    const saved = process.env['WPSNAP_RUNTIME_DIR'];
    process.env['WPSNAP_RUNTIME_DIR'] = join(dir, 'run');
    cleanups.push(() => {
      if (saved === undefined) delete process.env['WPSNAP_RUNTIME_DIR'];
      else process.env['WPSNAP_RUNTIME_DIR'] = saved;
    });
    const w = await writer();
    await cli('snapshot', String(w.fixture.pid), '--name', 'base', '--track');
    cleanups.push(() => void runCli(['untrack', String(w.fixture.pid)]));
    await w.send('write anon 1 2 3');
    await w.send('map 4'); // a mapping to unmap: an injected call
    const killed = await runCliProcess(['rollback', 'base', '--incremental', '--store', store], { WPSNAP_FAULT: point, WPSNAP_RUNTIME_DIR: join(dir, 'run') });
    expect(killed.signal).toBe('SIGKILL');
    // The tracer helper saw wpsnap die and let every thread go; the keeper saw its context's holder die and ended.
    await untraced(w.fixture.pid);
    expect(Object.values(tracerPids(w.fixture.pid)).every((t) => t === 0)).toBe(true);
    const status = await waitForStatus(w.fixture.pid);
    expect(status).toEqual([]);
    // The keeper's socket goes before the keeper does; the kernel clears the protection once its last fd closes.
    for (let waited = 0; uffdWpPages(w.fixture.pid, w.anon, 64) !== 0 && waited < 3000; waited += 50) await new Promise((resolve) => setTimeout(resolve, 50));
    expect(uffdWpPages(w.fixture.pid, w.anon, 64)).toBe(0);
    // Running: its next command is answered, and its write lands.
    expect(await w.send('write anon 9')).toMatchObject({ ok: true });
  });

  it('--incremental without tracking is refused in one line saying how to get it', async () => {
    const w = await writer();
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    const run = await runCli(['rollback', 'base', '--incremental', '--store', store]);
    expect(run.code).toBe(2);
    expect(run.stderr).toBe(
      `wpsnap: rollback --incremental needs the writes since T tracked, and pid ${w.fixture.pid} is not tracked: take the snapshot with --track (wpsnap snapshot ${w.fixture.pid} --name base --track), then roll back to it\n`,
    );
  });

  it('refuses, changing nothing: another program, a target that is gone, an incomplete snapshot', async () => {
    const w = await writer();
    await cli('snapshot', String(w.fixture.pid), '--name', 'base');
    const other = await startDetached('sleeper');
    const wrong = await runCli(['rollback', 'base', '--pid', String(other.pid), '--store', store]);
    expect(wrong.code).toBe(2);
    expect(wrong.stderr).toMatch(new RegExp(`^wpsnap: pid ${other.pid} runs .*sleeper, not .*dirtywriter as in snapshot 1: nothing changed\\n$`));
    await w.send('write anon 3');
    w.fixture.kill('SIGKILL');
    await w.fixture.exited;
    const gone = await runCli(['rollback', 'base', '--store', store]);
    expect(gone.code).toBe(4);
    expect(gone.stderr).toBe(`wpsnap: no process with pid ${w.fixture.pid}\n`);
    const s = Store.open(store, { onWarning: () => undefined });
    await s.beginSnapshot({ name: 'broken' }).abort('a test');
    await s.close();
    const incomplete = await runCli(['rollback', 'broken', '--store', store]);
    expect(incomplete.code).toBe(2);
    expect(incomplete.stderr).toBe('wpsnap: snapshot 2 is incomplete: only a complete snapshot can be rolled back to\n');
  });
});

