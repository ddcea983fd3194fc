// The real CLI, run in-process through main(argv) (or as a child process when
// a test kills it), against real processes and real store files.
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadBinding } from '../core/binding.js';
import { FAULT_POINTS } from '../core/fault.js';
import { UFFD_FEATURE } from '../core/features.js';
import { launchFixture, type LaunchedFixture } from '../fixtures/launch.js';
import { checkSnapshot, parseLayout, type PagewriterLayout } from '../fixtures/oracle.js';
import { Store } from '../store/store.js';
import { bindingWithFeatures, CLI_JS, ROOT, runCli, runCliProcess } from './support/cli.js';
import { isAlive, procStatus, sleep, uffdWpPages, untraced } from './support/proc.js';

const binding = loadBinding();
let dir: string;
let fixture: LaunchedFixture;
let layout: PagewriterLayout;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-cli-'));
  fixture = await launchFixture('pagewriter', ['--threads', '2', '--pages', '4096', '--memfd-pages', '1024', '--kernel-pages', '256', '--untouched-mib', '128']);
  layout = parseLayout(fixture.readyLine);
});
afterAll(() => {
  fixture.kill();
  rmSync(dir, { recursive: true, force: true });
});

function counters(pid: number, of: PagewriterLayout): bigint[] {
  return of.writers.map((w) => binding.processVmRead(pid, w.counter, 8).readBigUInt64LE(0));
}

/** The target is running and writing: every writer's counter advances (within 2 s on a loaded machine). */
async function expectWriting(pid: number, of: PagewriterLayout = layout): Promise<void> {
  const before = counters(pid, of);
  let after = before;
  for (let waited = 0; waited < 2000; waited += 50) {
    await sleep(50);
    after = counters(pid, of);
    if (after.every((c, i) => c > before[i]!)) return;
  }
  for (let i = 0; i < before.length; i++) expect(after[i]!, `writer ${i} advances`).toBeGreaterThan(before[i]!);
}

/** The target was let go: untraced, writing again, and no uffd-wp bit left on any writer's pages. */
async function expectReleased(pid: number, of: PagewriterLayout = layout): Promise<void> {
  await untraced(pid);
  expect(procStatus(pid)['TracerPid']).toBe('0');
  await expectWriting(pid, of);
  for (const w of of.writers) {
    expect(uffdWpPages(pid, w.start, w.pages), `no uffd-wp bit left in writer ${w.index}`).toBe(0);
  }
}

function oneLine(text: string): string {
  const lines = text.trimEnd().split('\n');
  expect(lines, `exactly one line: ${JSON.stringify(text)}`).toHaveLength(1);
  return lines[0]!;
}

describe('wpsnap snapshot / ls / show / verify / export', () => {
  it('prints one JSON document with the documented fields and an exact snapshot', async () => {
    const store = join(dir, 'json.db');
    const run = await runCli(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'first']);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
    const doc = JSON.parse(run.stdout) as Record<string, unknown>;
    for (const key of ['id', 'pid', 'pauseMicros', 'stops', 'preProtection', 'protectWindowMillis', 'durableMillis', 'stagingBytesPeak', 'staging', 'durationMillis', 'pagesSaved', 'zeroPages', 'bytesRaw', 'bytesStored', 'faults', 'faultP50Micros', 'faultP99Micros', 'lostPages']) {
      expect(doc, key).toHaveProperty(key);
    }
    // The windows nest: protected (end of pause -> last page unprotected) within
    // durable (-> final commit) within the whole command's duration; the
    // engine's own window starts in the pause, before the resume.
    const windowMillis = doc['protectWindowMillis'] as number;
    expect(windowMillis).toBeGreaterThan(0);
    expect(windowMillis).toBeLessThanOrEqual(Math.ceil((doc['engine'] as { windowMicros: number }).windowMicros / 1000));
    // The pause is the longest stop: the attach's or the instant's.
    const stops = doc['stops'] as { attach: number; instant: number };
    expect(doc['pauseMicros']).toBe(Math.max(stops.attach, stops.instant));
    expect((doc['preProtection'] as { rounds: number[] }).rounds.length).toBeGreaterThan(0);
    expect(doc['stagingBytesPeak'] as number).toBeGreaterThan(0);
    expect(doc['durableMillis'] as number).toBeGreaterThanOrEqual(windowMillis);
    expect(doc['durableMillis'] as number).toBeLessThanOrEqual(doc['durationMillis'] as number);
    expect(doc['pid']).toBe(fixture.pid);
    expect(doc['lostPages']).toEqual([]);
    expect(doc['name']).toBe('first');
    expect(doc['bytesRaw']).toBe((doc['pagesSaved'] as number) * 4096);

    const ls = await runCli(['ls', '--json', '--store', store]);
    const listed = JSON.parse(ls.stdout) as { snapshots: Array<{ id: number; name: string; state: string; pids: number[] }> };
    expect(listed.snapshots.map((s) => ({ id: s.id, name: s.name, state: s.state, pids: s.pids }))).toEqual([
      { id: doc['id'], name: 'first', state: 'complete', pids: [fixture.pid] },
    ]);

    const show = await runCli(['show', 'first', '--json', '--store', store]);
    const shown = JSON.parse(show.stdout) as {
      processes: Array<{ pid: number; cmdline: string[]; exe: string; threads: Array<{ tid: number; name: string }>; regions: Array<{ start: string; end: string; perms: string; capture: string; path: string }> }>;
    };
    const p = shown.processes[0]!;
    expect(p.pid).toBe(fixture.pid);
    expect(p.exe).toBe(join(ROOT, 'fixtures', 'build', 'pagewriter'));
    expect(p.cmdline[0]).toBe(p.exe);
    const tids = readdirSync(`/proc/${fixture.pid}/task`).map(Number);
    expect(p.threads.map((t) => t.tid).sort()).toEqual(tids.sort());
    for (const t of p.threads) expect(t.name).toBe(readFileSync(`/proc/${fixture.pid}/task/${t.tid}/comm`, 'utf8').trimEnd());
    // Adjacent anonymous mmaps merge into one vma: find the region holding each address.
    const regionOf = (address: bigint) => p.regions.find((r) => BigInt(r.start) <= address && address < BigInt(r.end))!;
    const writerRegion = regionOf(layout.writers[0]!.start);
    expect(writerRegion.capture).toBe('protected');
    const memfdRegion = regionOf(layout.writers.find((w) => w.kind === 'memfd')!.start);
    expect(memfdRegion.capture).toBe('protected');
    expect(memfdRegion.path).toMatch(/^\/memfd:/);
    expect(p.regions.find((r) => r.path === '[vvar]')?.capture).toBe('skipped');
    // [vdso] is copied whole during the pause; libraries are referenced to their files.
    expect(p.regions.find((r) => r.path === '[vdso]')?.capture).toBe('copied');
    const libc = p.regions.find((r) => r.path.includes('libc.so') && r.perms === 'r--p');
    expect(libc?.capture).toBe('file-private');

    const verify = await runCli(['verify', 'first', '--json', '--store', store]);
    expect(verify.code).toBe(0);
    expect(JSON.parse(verify.stdout)).toMatchObject({ ok: true, problems: [] });

    // The raw export holds, at each address, what the oracle says was there at T.
    const out = join(dir, 'export');
    const exp = await runCli(['export', 'first', '--format', 'raw', '--out', out, '--store', store]);
    expect(exp.code).toBe(0);
    const manifest = JSON.parse(readFileSync(join(out, 'manifest.json'), 'utf8')) as {
      snapshot: number;
      processes: Array<{ pid: number; regions: Array<{ start: string; end: string; perms: string; offset: number; path: string; file: string | null }> }>;
    };
    expect(manifest.snapshot).toBe(doc['id']);
    const regions = manifest.processes[0]!.regions;
    for (const r of regions) {
      if (r.file === null) continue;
      expect(statSync(join(out, r.file)).size, r.start).toBe(Number(BigInt(r.end) - BigInt(r.start)));
    }
    const images = regions.filter((r) => r.file !== null).map((r) => ({ start: BigInt(r.start), end: BigInt(r.end), bytes: readFileSync(join(out, r.file!)) }));
    const readPage = (address: bigint): Buffer => {
      const image = images.find((i) => address >= i.start && address < i.end);
      if (!image) throw new Error(`0x${address.toString(16)} not in the export`);
      const offset = Number(address - image.start);
      return image.bytes.subarray(offset, offset + 4096);
    };
    const report = checkSnapshot(layout, readPage);
    expect(report.mismatches).toEqual([]);
    expect(report.pagesChecked).toBe(layout.writers.reduce((n, w) => n + w.pages, 0) + layout.untouched.bytes / 4096);
    // Text of the executable comes from the file: its first page is the ELF header.
    const text = regions.find((r) => r.path === p.exe && r.offset === 0)!;
    expect(readPage(BigInt(text.start)).subarray(0, 4)).toEqual(Buffer.from([0x7f, 0x45, 0x4c, 0x46]));
  });

  it('rm deletes a snapshot and the pages only it holds; the other snapshots stay whole', async () => {
    const store = join(dir, 'rm.db');
    const older = await runCli(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'older']);
    const newer = await runCli(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'newer']);
    expect([older.code, newer.code]).toEqual([0, 0]);
    const newerId = (JSON.parse(newer.stdout) as { id: number }).id;
    const olderId = (JSON.parse(older.stdout) as { id: number }).id;

    const rm = await runCli(['rm', 'older', '--json', '--store', store]);
    expect(rm.code).toBe(0);
    const removed = JSON.parse(rm.stdout) as { snapshot: number; name: string; state: string; blobsDeleted: number };
    // The writers rewrote their pages between the two: the older snapshot had pages of its own.
    expect(removed).toMatchObject({ snapshot: olderId, name: 'older', state: 'complete' });
    expect(removed.blobsDeleted).toBeGreaterThan(0);
    const ls = JSON.parse((await runCli(['ls', '--json', '--store', store])).stdout) as { snapshots: Array<{ id: number }> };
    expect(ls.snapshots.map((s) => s.id)).toEqual([newerId]);
    const verify = await runCli(['verify', 'newer', '--json', '--store', store]);
    expect(verify.code).toBe(0);
    expect(JSON.parse(verify.stdout)).toMatchObject({ snapshot: newerId, ok: true, problems: [] });

    const plain = await runCli(['rm', String(newerId), '--store', store]);
    expect(plain.code).toBe(0);
    expect(oneLine(plain.stdout)).toMatch(new RegExp(`^deleted snapshot ${newerId} \\(newer\\), complete; \\d+ blob\\(s\\) of pages no other snapshot uses dropped \\([0-9.]+ [KMG]?i?B\\)$`));
    const again = await runCli(['rm', 'newer', '--store', store]);
    expect(again.code).not.toBe(0);
    expect(oneLine(again.stderr)).toMatch(/newer/);
  });

  it('prints human-readable output without --json', async () => {
    const store = join(dir, 'human.db');
    const run = await runCli(['snapshot', String(fixture.pid), '--store', store]);
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(/^snapshot 1 of pid \d+ complete\n {2}paused [\d.]+ (ms|µs), then protected for [\d.]+ (ms|s); durable after [\d.]+ (ms|s), took/);
    expect(run.stdout).toContain('exact: no page lost');
    const ls = await runCli(['ls', '--store', store]);
    expect(ls.stdout.split('\n')[0]).toMatch(/^ID\s+NAME\s+STATE\s+CREATED\s+PIDS/);
    const show = await runCli(['show', '1', '--store', store]);
    expect(show.stdout).toContain(`process ${fixture.pid} (pagewriter)`);
    expect(show.stdout).toContain('lost pages: none');
  });
});

describe('bad input: one line, a non-zero exit, nothing half-written', () => {
  it('a pid that does not exist', async () => {
    const gone = spawnSync('sh', ['-c', 'echo $$']);
    const pid = Number(gone.stdout.toString().trim());
    expect(isAlive(pid)).toBe(false);
    const store = join(dir, 'missing.db');
    const run = await runCli(['snapshot', String(pid), '--store', store]);
    expect(run.code).toBe(4);
    expect(oneLine(run.stderr)).toBe(`wpsnap: no process with pid ${pid}`);
    expect(run.stdout).toBe('');
  });

  it('a pid that may not be traced (another tracer holds it)', async () => {
    const store = join(dir, 'eperm.db');
    const target = await launchFixture('pagewriter', ['--threads', '1', '--pages', '256', '--memfd-pages', '0', '--kernel-pages', '0', '--untouched-mib', '1']);
    const holder = spawn(join(ROOT, 'fixtures', 'build', 'holdtrace'), [String(target.pid)], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
      const run = await runCli(['snapshot', String(target.pid), '--store', store]);
      expect(run.code).toBe(1);
      expect(oneLine(run.stderr)).toMatch(
        new RegExp(`^wpsnap: freeze pid ${target.pid}: ptrace\\(PTRACE_SEIZE\\) on tid \\d+: EPERM .* already traced by pid ${holder.pid}`),
      );
      const ls = await runCli(['ls', '--json', '--store', store]);
      const states = (JSON.parse(ls.stdout) as { snapshots: Array<{ state: string }> }).snapshots.map((s) => s.state);
      expect(states).not.toContain('complete');
      expect(isAlive(target.pid)).toBe(true);
    } finally {
      holder.stdin.end();
      target.kill();
    }
  });

  it('a kernel without a needed feature', async () => {
    const real = loadBinding();
    const features = real.probeUffd().features & ~UFFD_FEATURE.WP_UNPOPULATED;
    const run = await runCli(['snapshot', String(fixture.pid), '--store', join(dir, 'nofeature.db')], { binding: () => bindingWithFeatures(real, features) });
    expect(run.code).toBe(3);
    expect(oneLine(run.stderr)).toMatch(/^wpsnap: kernel \S+ lacks userfaultfd feature WP_UNPOPULATED \(protect never-touched memory without populating it\)$/);
    const check = await runCli(['check', '--json'], { binding: () => bindingWithFeatures(real, features) });
    expect(check.code).toBe(3);
    const report = JSON.parse(check.stdout) as { canSnapshot: boolean; items: Array<{ name: string; ok: boolean }> };
    expect(report.canSnapshot).toBe(false);
    expect(report.items.find((i) => i.name === 'UFFD_FEATURE_WP_UNPOPULATED')?.ok).toBe(false);
  });

  it('check on this machine says a snapshot is possible', async () => {
    const run = await runCli(['check']);
    expect(run.code).toBe(0);
    expect(run.stdout).toContain('ok   UFFD_FEATURE_WP_UNPOPULATED');
    expect(run.stdout.trimEnd().split('\n').at(-1)).toBe('wpsnap can snapshot processes here');
  });

  it('a store path that is a directory, or not a wpsnap store', async () => {
    const asDir = join(dir, 'a-directory');
    mkdirSync(asDir);
    const r1 = await runCli(['snapshot', String(fixture.pid), '--store', asDir]);
    expect(r1.code).toBe(1);
    expect(oneLine(r1.stderr)).toContain(asDir);
    expect(r1.stderr).toMatch(/directory/);

    const text = join(dir, 'notes.txt');
    writeFileSync(text, 'my notes, not a store\n');
    const r2 = await runCli(['ls', '--store', text]);
    expect(r2.code).toBe(1);
    expect(oneLine(r2.stderr)).toMatch(/not a wpsnap store/);
    expect(readFileSync(text, 'utf8')).toBe('my notes, not a store\n');
    expect(existsSync(text + '-wal')).toBe(false);

    const r3 = await runCli(['snapshot', String(fixture.pid), '--store', text, '--json']);
    expect(r3.code).toBe(1);
    expect(r3.stdout).toBe('');
    expect(JSON.parse(r3.stderr)).toMatchObject({ error: { code: 'NOT_A_STORE', exitCode: 1 } });
  });

  it('usage errors exit 2', async () => {
    const r1 = await runCli(['snapshot', 'abc']);
    expect(r1.code).toBe(2);
    expect(oneLine(r1.stderr)).toMatch(/^wpsnap: /);
    const r2 = await runCli(['frobnicate']);
    expect(r2.code).toBe(2);
    const r3 = await runCli(['export', '1', '--store', join(dir, 'json.db')]);
    expect(r3.code).toBe(2);
    expect(oneLine(r3.stderr)).toBe('wpsnap: export needs --out DIR');
    const r4 = await runCli(['show', 'no-such-name', '--store', join(dir, 'json.db')]);
    expect(r4.code).toBe(1);
    expect(oneLine(r4.stderr)).toMatch(/no-such-name/);
  });
});

describe('killing wpsnap at any point', () => {
  it.each(FAULT_POINTS)('SIGKILL at %s leaves the target running unprotected and the store intact', async (point) => {
    const store = join(dir, `kill-${point}.db`);
    const first = await runCli(['snapshot', String(fixture.pid), '--store', store, '--name', 'before', '--json']);
    expect(first.code).toBe(0);
    // A pool of 8 batches (16 MiB) for this 20 MiB target: batches go to the spill file.
    const staging = point === 'mid-spill' ? ['--staging-memory', '16'] : [];
    const killed = await runCliProcess(['snapshot', String(fixture.pid), '--store', store, ...staging], { WPSNAP_FAULT: point });
    expect(killed.signal).toBe('SIGKILL');
    // The kernel released the userfaultfd with the process; the tracer helper
    // (wpsnap-tracer) saw it die, finished what it was doing and let the target go.
    await expectReleased(fixture.pid);
    // The store opens; the earlier snapshot is intact; the killed one is not complete.
    const s = Store.open(store);
    try {
      const list = s.list();
      expect(list[0]).toMatchObject({ name: 'before', state: 'complete' });
      expect((await s.verify(list[0]!.id)).problems).toEqual([]);
      expect(list.slice(1).map((x) => x.state)).toEqual(['incomplete']);
    } finally {
      await s.close();
    }
  });

  it('an allocation that fails in the engine thread (WPSNAP_FAULT=engine-alloc) ends the snapshot in one line, incomplete, the target released', async () => {
    const store = join(dir, 'engine-alloc.db');
    const r = await runCliProcess(['snapshot', String(fixture.pid), '--store', store], { WPSNAP_FAULT: 'engine-alloc' });
    expect(r.signal).toBeNull();
    expect(r.code).toBe(1);
    // The error is one line (progress lines, "pid N: …", may precede it: stderr is not a terminal).
    const errors = r.stderr.trim().split('\n').filter((line) => !/^pid \d+: /.test(line));
    expect(errors, r.stderr).toHaveLength(1);
    expect(errors[0]).toMatch(/^wpsnap: snapshot of pid \d+: allocate a page batch \(WPSNAP_FAULT=engine-alloc\).*ENOMEM/);
    await expectReleased(fixture.pid);
    const s = Store.open(store, { readonly: true });
    try {
      expect(s.list().map((x) => x.state)).toEqual(['incomplete']);
    } finally {
      await s.close();
    }
  });

  // The engine's guard against a page that loses its content at T with no
  // event (no kernel path should): it is listed lost, never stored as zero.
  // WPSNAP_FAULT=engine-vanish makes the sweep read its first anonymous
  // chunk's first page as neither present, swapped nor marked.
  it('a page gone from the page tables with no event (WPSNAP_FAULT=engine-vanish) is listed lost vanished-before-saved, never stored as zero', async () => {
    const store = join(dir, 'engine-vanish.db');
    const r = await runCliProcess(['snapshot', String(fixture.pid), '--store', store, '--json'], { WPSNAP_FAULT: 'engine-vanish' });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const doc = JSON.parse(r.stdout) as { id: number; lostPages: Array<{ address: string; pages: number; reason: string }> };
    expect(doc.lostPages).toEqual([{ address: expect.stringMatching(/^0x[0-9a-f]+000$/) as unknown as string, pages: 1, reason: 'vanished-before-saved' }]);
    const address = BigInt(doc.lostPages[0]!.address);
    const s = Store.open(store, { readonly: true });
    try {
      const [proc] = s.processes(doc.id);
      expect(s.lost(proc!.processId)).toEqual([{ address, pages: 1, reason: 'vanished-before-saved' }]);
      expect([...s.pagesInRange(proc!.processId, address, address + 4096n)]).toEqual([]);
    } finally {
      await s.close();
    }
    const human = await runCli(['show', String(doc.id), '--store', store]);
    expect(human.stdout).toContain('vanished-before-saved');
  });

  it('SIGINT stops a snapshot: exit 130, recorded incomplete, target released; a second snapshot meanwhile is refused', async () => {
    const store = join(dir, 'sigint.db');
    // Its own target: 64 MiB written slowly (1000 pages/s per thread), so that
    // the sweep at --rate 0.25 (MB/s) has a minute of work or more and faults
    // save little of it: the interrupt lands mid-sweep, even when a loaded
    // machine makes the second snapshot below take tens of seconds.
    const slow = await launchFixture('pagewriter', ['--threads', '2', '--pages', '8192', '--memfd-pages', '0', '--kernel-pages', '0', '--rate', '1000']);
    try {
      const slowLayout = parseLayout(slow.readyLine);
      const child = spawn(process.execPath, [CLI_JS, 'snapshot', String(slow.pid), '--store', store, '--rate', '0.25'], { stdio: ['ignore', 'pipe', 'pipe'] });
      const closed = once(child, 'close');
      let stderr = '';
      const sweeping = new Promise<void>((resolve) =>
        child.stderr.on('data', (d: Buffer) => {
          stderr += d.toString();
          // The plain progress line (stderr is not a TTY): the sweep is under way.
          if (/pages with data .*, \d+ MB\/s/.test(stderr)) resolve();
        }),
      );
      await Promise.race([sweeping, closed]);
      expect(child.exitCode, `the snapshot ended before the interrupt: ${stderr}`).toBeNull();
      // A second snapshot of the same process meanwhile is refused in one line:
      // its memory belongs to the first one's userfaultfd until that one ends.
      const second = await runCliProcess(['snapshot', String(slow.pid), '--store', join(dir, 'second.db')]);
      expect(second.code).not.toBe(0);
      expect(second.stdout).toBe('');
      expect(second.stderr.trim().split('\n')).toHaveLength(1);
      expect(second.stderr).toMatch(/already registered with another userfaultfd: another snapshot of this process is still running/);
      child.kill('SIGINT');
      const [code] = (await closed) as [number | null];
      expect(code).toBe(130);
      expect(stderr.trimEnd().split('\n').at(-1)).toMatch(/^wpsnap: snapshot of pid \d+ interrupted; recorded as incomplete$/);
      expect(stderr).toMatch(/^pid \d+: saving: \d+% \d+\/\d+ pages with data \(\d+ zero of \d+\), \d+ MB\/s \(sweep limited to 0.25 MB\/s; faults are not rate-limited\), \d+ faults$/m);
      await expectReleased(slow.pid, slowLayout);
      const s = Store.open(store, { readonly: true });
      try {
        const [snap] = s.list();
        expect(snap!.state).toBe('incomplete');
        const lost = s.lost(s.processes(snap!.id)[0]!.processId);
        expect(lost.length).toBeGreaterThan(0);
        expect(new Set(lost.map((l) => l.reason))).toEqual(new Set(['interrupted']));
      } finally {
        await s.close();
      }
    } finally {
      slow.kill();
    }
  });

  it('the target is healthy after all of it', async () => {
    await expectWriting(fixture.pid);
    fixture.kill('SIGTERM');
    const done = JSON.parse((await fixture.nextLine()) ?? '{}') as { errors: number };
    expect(done.errors).toBe(0);
  });
});
