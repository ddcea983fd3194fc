// End to end against the real kernel: snapshots of fixtures that write at full
// speed while being snapshotted, checked page by page against their oracle.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { snapshotProcess } from '../core/snapshot.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { checkSnapshot, parseLayout, type PagewriterLayout } from '../fixtures/oracle.js';
import { exportRaw } from '../snapshot-format/export-raw.js';
import { Store } from '../store/store.js';
import { CLI_JS } from './support/cli.js';
import { isAlive, procStatus, rssKiB, sleep } from './support/proc.js';
import { killPrograms, startProgram } from './support/realprog/program.js';

const binding = loadBinding();
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-snapshot-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

function counters(layout: PagewriterLayout, pid: number): bigint[] {
  return layout.writers.map((w) => binding.processVmRead(pid, w.counter, 8).readBigUInt64LE(0));
}

async function pagewriter(args: string[]): Promise<{ fixture: LaunchedFixture; layout: PagewriterLayout }> {
  const fixture = await launchFixture('pagewriter', args);
  return { fixture, layout: parseLayout(fixture.readyLine) };
}

describe('snapshot of a process writing at full speed', () => {
  it('holds every page exactly as it was at T: anonymous, memfd and kernel-written memory', async () => {
    const store = Store.open(join(dir, 'exact.db'));
    const { fixture, layout } = await pagewriter([
      '--threads', '2', '--pages', '16384', '--memfd-pages', '4096', '--kernel-pages', '1024', '--untouched-mib', '512',
    ]);
    try {
      await sleep(300);
      const before = counters(layout, fixture.pid);
      const result = await snapshotProcess(binding, store, fixture.pid);
      expect(result.lostPages).toEqual([]);
      // The writers kept writing during the snapshot: faults were served.
      expect(result.faults).toBeGreaterThan(0);
      expect(result.threads).toBeGreaterThanOrEqual(layout.writers.length + 3);
      const processId = store.processes(result.id)[0]!.processId;
      const report = checkSnapshot(layout, (address) => store.readPage(processId, address));
      expect(report.mismatches).toEqual([]);
      const writerPages = layout.writers.reduce((n, w) => n + w.pages, 0);
      expect(report.pagesChecked).toBe(writerPages + layout.untouched.bytes / 4096);
      // The counters at T lie between those seen before and after.
      const atT = layout.writers.map((w) => store.readPage(processId, w.counter & ~4095n).readBigUInt64LE(Number(w.counter & 4095n)));
      const after = counters(layout, fixture.pid);
      for (let i = 0; i < atT.length; i++) {
        expect(atT[i]!).toBeGreaterThanOrEqual(before[i]!);
        expect(after[i]!).toBeGreaterThan(atT[i]!);
      }
      expect(store.find(String(result.id)).state).toBe('complete');
      const verify = await store.verify(result.id);
      expect(verify.problems).toEqual([]);
      fixture.kill('SIGTERM');
      const done = JSON.parse((await fixture.nextLine()) ?? '{}') as { errors: number };
      expect(done.errors).toBe(0);
    } finally {
      fixture.kill();
      await store.close();
    }
  });

  it('leaves never-touched memory unpopulated and the target unprotected afterwards', async () => {
    const store = Store.open(join(dir, 'rss.db'));
    const { fixture, layout } = await pagewriter(['--threads', '1', '--pages', '2048', '--memfd-pages', '0', '--kernel-pages', '0', '--untouched-mib', '1024']);
    try {
      await sleep(200);
      const rssBefore = rssKiB(fixture.pid);
      const pteBefore = Number.parseInt(procStatus(fixture.pid)['VmPTE'] ?? '', 10);
      const result = await snapshotProcess(binding, store, fixture.pid);
      expect(result.lostPages).toEqual([]);
      const rssAfter = rssKiB(fixture.pid);
      // 1 GiB untouched: reading it would have mapped pages; allow 8 MiB of noise.
      expect(rssAfter - rssBefore).toBeLessThan(8 * 1024);
      // Nor are page tables built for it: write-protect markers on its 262,144
      // never-touched pages would take 2 MiB of PTE pages, which stay after the
      // snapshot. It is protected only where populated (nowhere).
      const pteAfter = Number.parseInt(procStatus(fixture.pid)['VmPTE'] ?? '', 10);
      expect(pteAfter - pteBefore).toBeLessThan(256);
      expect(result.regions.sparse).toBeGreaterThanOrEqual(1);
      const entries = binding.readPagemap(fixture.pid, layout.untouched.start, layout.untouched.bytes / 4096);
      const present = entries.filter((e) => (e >> 63n) & 1n).length;
      expect(present).toBe(0);
      // After the snapshot nothing is write-protected or registered any more:
      // no pagemap entry of the writer region carries the uffd-wp bit.
      const w = layout.writers[0]!;
      const wEntries = binding.readPagemap(fixture.pid, w.start, w.pages);
      expect(wEntries.filter((e) => (e >> 57n) & 1n).length).toBe(0);
      expect(procStatus(fixture.pid)['TracerPid']).toBe('0');
      expect(result.zeroPages).toBeGreaterThanOrEqual(layout.untouched.bytes / 4096);
    } finally {
      fixture.kill();
      await store.close();
    }
  });

  it('builds no page tables for the untouched part of thread stacks (64 threads, 8 MiB stacks)', async () => {
    const store = Store.open(join(dir, 'stacks.db'));
    const script = [
      'import json, os, signal, threading',
      'threading.stack_size(8 << 20)',
      'stop = threading.Event()',
      'threads = [threading.Thread(target=stop.wait) for _ in range(64)]',
      'for t in threads: t.start()',
      'signal.signal(signal.SIGTERM, lambda *_: stop.set())',
      'print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)',
      'stop.wait()',
      'for t in threads: t.join()',
      'print(json.dumps({"done": True}), flush=True)',
    ].join('\n');
    const prog = await startProgram(['python3', '-c', script]);
    try {
      const pteBefore = Number.parseInt(procStatus(prog.pid)['VmPTE'] ?? '', 10);
      const result = await snapshotProcess(binding, store, prog.pid);
      expect(result.lostPages).toEqual([]);
      expect(result.threads).toBe(65);
      // Markers on the stacks' never-touched pages would take 64 × 8 MiB / 2 MiB
      // page-table pages of 4 KiB: 1 MiB, left in the target after the snapshot.
      expect(result.regions.sparse).toBeGreaterThanOrEqual(64);
      const pteAfter = Number.parseInt(procStatus(prog.pid)['VmPTE'] ?? '', 10);
      expect(pteAfter - pteBefore).toBeLessThan(128);
      const exit = await prog.stop();
      expect(exit.code).toBe(0);
      expect(exit.lines).toEqual([{ done: true }]);
    } finally {
      killPrograms();
      await store.close();
    }
  });

  it('does not change what the target computes', async () => {
    const args = ['--threads', '2', '--pages', '4096', '--memfd-pages', '1024', '--kernel-pages', '256', '--untouched-mib', '64', '--steps', '300000', '--seed', '7', '--self-check-on-exit'];
    const plain = await launchFixture('pagewriter', args);
    const plainDone = JSON.parse((await plain.nextLine()) ?? '{}') as { checksum: string; errors: number; selfCheck: string };
    const store = Store.open(join(dir, 'result.db'));
    const snapped = await launchFixture('pagewriter', args);
    try {
      await sleep(50);
      const result = await snapshotProcess(binding, store, snapped.pid);
      expect(result.lostPages).toEqual([]);
      const snappedDone = JSON.parse((await snapped.nextLine()) ?? '{}') as { checksum: string; errors: number; selfCheck: string };
      expect(plainDone.errors).toBe(0);
      expect(snappedDone).toMatchObject({ checksum: plainDone.checksum, errors: 0, selfCheck: 'ok' });
    } finally {
      snapped.kill();
      plain.kill();
      await store.close();
    }
  });

  it('keeps threads sleeping in nanosleep, read, futex and poll working', async () => {
    const store = Store.open(join(dir, 'sleeper.db'));
    const fixture = await launchFixture('sleeper', []);
    try {
      for (let i = 0; i < 5; i++) {
        const result = await snapshotProcess(binding, store, fixture.pid);
        expect(result.lostPages).toEqual([]);
        await sleep(120);
      }
      fixture.kill('SIGTERM');
      const done = JSON.parse((await fixture.nextLine()) ?? '{}') as { errors: number; eintr: number; sleeps: number; reads: number };
      expect(done.errors).toBe(0);
      expect(done.eintr).toBe(0);
      expect(done.sleeps).toBeGreaterThan(0);
      expect(done.reads).toBeGreaterThan(0);
      // It exits on its own right after its done line.
      for (let waited = 0; waited < 2000 && isAlive(fixture.pid); waited += 20) await sleep(20);
      expect(isAlive(fixture.pid)).toBe(false);
    } finally {
      fixture.kill();
      await store.close();
    }
  });
});

// A writable MAP_PRIVATE file mapping (python's ACCESS_COPY): pages it wrote
// before T are copy-on-write copies, copied while the target is stopped;
// the others are the file's and recorded as a reference to it.
const PRIVATE_FILE_TARGET = `
import ctypes, json, mmap, os, signal, sys
path, pages, written = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = open(path, 'r+b')
m = mmap.mmap(f.fileno(), pages * 4096, access=mmap.ACCESS_COPY)
def fill(i, tag):
    m[i * 4096:(i + 1) * 4096] = (f'{tag} {i}|'.encode() * 4096)[:4096]
for i in range(written): fill(i, 'before')
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
start = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(json.dumps({'ready': True, 'pid': os.getpid(), 'start': hex(start)}), flush=True)
signal.sigwait({signal.SIGUSR1})
for i in range(pages): fill(i, 'after')
print(json.dumps({'written': True}), flush=True)
signal.sigwait({signal.SIGUSR1})
`;

function textPage(tag: string, i: number): Buffer {
  return Buffer.from(`${tag} ${i}|`.repeat(4096)).subarray(0, 4096);
}

describe('private file mappings (uffd-wp cannot protect them)', () => {
  it('hold the pages written before T as they were at T and the rest as the file, whatever is written after T', async () => {
    const PAGES = 64;
    const WRITTEN = 24;
    const file = join(dir, 'private.dat');
    writeFileSync(file, Buffer.concat(Array.from({ length: PAGES }, (_, i) => textPage('file', i))));
    const prog = await startProgram(['python3', '-c', PRIVATE_FILE_TARGET, file, String(PAGES), String(WRITTEN)]);
    const store = Store.open(join(dir, 'private-file.db'));
    try {
      const start = BigInt(prog.ready['start'] as string);
      const end = start + BigInt(PAGES * 4096);
      const pid = prog.pid;

      // The copy goes into memory touched before the pause when the pages fit,
      // and into a buffer of its own when more were copied on write than counted.
      const ranges = BigUint64Array.from([start, end, 0n]);
      expect(binding.countPrivatePages(pid, ranges)).toBe(WRITTEN);
      const roomy = Buffer.alloc((WRITTEN + 1) * 4096);
      const intoRoomy = binding.copyPrivatePages(pid, ranges, roomy);
      expect(intoRoomy.data).toBe(roomy);
      const tooSmall = Buffer.alloc((WRITTEN - 1) * 4096);
      const intoOwn = binding.copyPrivatePages(pid, ranges, tooSmall);
      expect(intoOwn.data).not.toBe(tooSmall);
      expect(intoOwn.data.length).toBe(WRITTEN * 4096);
      const expectedCopies = Buffer.concat(Array.from({ length: WRITTEN }, (_, i) => textPage('before', i)));
      expect(intoOwn.data.equals(expectedCopies)).toBe(true);
      expect(roomy.subarray(0, WRITTEN * 4096).equals(expectedCopies)).toBe(true);
      expect([...intoOwn.addresses]).toEqual(Array.from({ length: WRITTEN }, (_, i) => start + BigInt(i * 4096)));

      const result = await snapshotProcess(binding, store, pid);
      expect(result.lostPages).toEqual([]);
      prog.signal('SIGUSR1');
      await prog.waitFor((l) => l['written'] === true);

      const out = join(dir, 'private-file-export');
      const exported = await exportRaw(store, String(result.id), out);
      const region = exported.manifest.processes[0]!.regions.find((r) => BigInt(r.start) === start);
      expect(region).toMatchObject({ end: `0x${end.toString(16)}`, capture: 'file-private', path: file, lost: [] });
      const image = readFileSync(join(out, region!.file!));
      expect(image.length).toBe(PAGES * 4096);
      for (let i = 0; i < PAGES; i++) {
        const expected = i < WRITTEN ? textPage('before', i) : textPage('file', i);
        expect(image.subarray(i * 4096, (i + 1) * 4096).equals(expected), `page ${i}`).toBe(true);
      }
    } finally {
      killPrograms();
      await store.close();
    }
  });
});

// A hardened service may run under a seccomp filter that kills it on a
// syscall outside its list (systemd's SystemCallFilter= does by default, and
// userfaultfd is outside @system-service). The injected userfaultfd() once
// killed such a target with SIGSYS; the tracer now suspends the filter for
// the injected calls, in the stopped thread only.
describe('a target under a seccomp filter that kills it on userfaultfd()', () => {
  it('is snapshotted exactly, runs on, and its filter still holds afterwards', async () => {
    const store = Store.open(join(dir, 'seccomp.db'));
    const fixture = await launchFixture('sandboxed', ['--pages', '256']);
    try {
      const ready = JSON.parse(fixture.readyLine) as { counter: string; start: string; pages: number };
      expect(procStatus(fixture.pid)['Seccomp']).toBe('2');
      await sleep(50);
      const result = await snapshotProcess(binding, store, fixture.pid);
      expect(result.lostPages).toEqual([]);
      await sleep(50);
      expect(isAlive(fixture.pid)).toBe(true);
      expect(procStatus(fixture.pid)['Seccomp']).toBe('2');

      // Each pass writes its number into every page, then into the counter:
      // at T a prefix of the pages holds the pass under way, the rest the one before.
      const processId = store.processes(result.id)[0]!.processId;
      const passAtT = store.readPage(processId, BigInt(ready.counter)).readBigUInt64LE(0);
      const words = Array.from({ length: ready.pages }, (_, i) => store.readPage(processId, BigInt(ready.start) + BigInt(i * 4096)).readBigUInt64LE(0));
      const ahead = words.findIndex((w) => w !== passAtT + 1n);
      const prefix = ahead < 0 ? words.length : ahead;
      expect(words.slice(prefix).every((w) => w === passAtT), `pages after ${prefix}: ${words.slice(prefix, prefix + 4).join(', ')}…`).toBe(true);
      expect(passAtT).toBeGreaterThan(0n);

      // The filter is in force again: a child that calls userfaultfd() dies of SIGSYS (31).
      fixture.kill('SIGUSR1');
      expect(JSON.parse((await fixture.nextLine()) ?? '{}')).toEqual({ probe: true, childSignal: 31 });
      fixture.kill('SIGTERM');
      const done = JSON.parse((await fixture.nextLine()) ?? '{}') as { done: boolean; passes: number };
      expect(done.done).toBe(true);
      expect(BigInt(done.passes)).toBeGreaterThan(passAtT);
    } finally {
      fixture.kill();
      await store.close();
    }
  });

  // Suspending a filter needs CAP_SYS_ADMIN; without it the injection would
  // go through the filter, so wpsnap stops there (capsh drops the capability
  // from the CLI's bounding set).
  const capsh = spawnSync('sh', ['-c', 'command -v capsh'], { encoding: 'utf8' }).stdout.trim();
  it.runIf(capsh !== '')('without CAP_SYS_ADMIN is refused in one line, and left running and untraced (needs capsh)', async () => {
    const storePath = join(dir, 'seccomp-nocap.db');
    const fixture = await launchFixture('sandboxed', ['--pages', '64']);
    try {
      const command = `exec "${process.execPath}" "${CLI_JS}" snapshot ${fixture.pid} --store "${storePath}"`;
      const r = spawnSync(capsh, ['--drop=cap_sys_admin', '--', '-c', command], { encoding: 'utf8', timeout: 30_000 });
      expect(r.status).not.toBe(0);
      expect(r.stdout).toBe('');
      const lines = r.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(new RegExp(`pid ${fixture.pid} runs under seccomp \\(filter mode\\).*CAP_SYS_ADMIN`));
      expect(isAlive(fixture.pid)).toBe(true);
      expect(procStatus(fixture.pid)['TracerPid']).toBe('0');
      const store = Store.open(storePath);
      try {
        expect(store.list().map((x) => x.state)).toEqual(['incomplete']);
      } finally {
        await store.close();
      }
      fixture.kill('SIGTERM');
      expect(JSON.parse((await fixture.nextLine()) ?? '{}')).toMatchObject({ done: true });
    } finally {
      fixture.kill();
    }
  });
});
