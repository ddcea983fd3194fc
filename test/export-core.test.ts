// wpsnap export --format core, read back by the real gdb: a fixture with known
// globals, heap data and threads blocked in named functions is snapshotted
// with the CLI, exported, and gdb on the core must print the values as they
// were at T, every expected function in each thread's backtrace and the
// thread count; gcore of the same process (which no longer changes) must give
// the same answers. Then the filter, the file's mode and atomic creation, the
// bad inputs, several processes, an interrupted export, and a core of a real
// program (python3).
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launch, type Launched } from '../fixtures/launch.js';
import { exportCore } from '../snapshot-format/export-core.js';
import { exportRaw, readRawManifest } from '../snapshot-format/export-raw.js';
import { PAGE_SIZE, type FileReference, type PageBatch } from '../snapshot-format/model.js';
import type { SnapshotReader } from '../snapshot-format/reader.js';
import { Store } from '../store/store.js';
import { fakeProcess, fakeRegion, fakeThread, heapBatch } from '../store/testing.js';
import { FIXTURES_BUILD_DIR } from './support/oracle.js';
import { runCli } from './support/cli.js';
import { isAlive, procStatus } from './support/proc.js';
import { killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const EXE = join(FIXTURES_BUILD_DIR, 'corefixture');
const HEAP_COUNT = 64;
/** What gdb is asked of every core of the fixture. */
const FIXTURE_COMMANDS = [
  'info threads',
  'thread apply all bt',
  'print global_x',
  `print *heap_ptr@${HEAP_COUNT}`,
  'print heap_text',
  'print global_point',
  'print global_name',
  'info proc mappings',
];
/** The functions each thread must be in, innermost first (libc frames in between are allowed). */
const STACKS: Record<string, string[]> = {
  main: ['main_wait', 'main'],
  alpha: ['alpha_block', 'alpha_middle', 'alpha_entry', 'start_thread'],
  beta: ['beta_block', 'beta_entry', 'start_thread'],
  gamma: ['gamma_block', 'gamma_middle', 'gamma_entry', 'start_thread'],
};

let dir: string;
let store: string;
let fixture: DetachedFixture;
let tids: Record<string, number>;
let snapshotId: number;
let core: string;
let exported: Record<string, unknown>;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-core-'));
  store = join(dir, 'store.db');
  fixture = await startDetached('corefixture');
  tids = { main: fixture.pid, ...(fixture.ready['tids'] as Record<string, number>) };
  const snap = await runCli(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'fixture']);
  expect(snap.stderr).toBe('');
  expect(snap.code).toBe(0);
  snapshotId = (JSON.parse(snap.stdout) as { id: number }).id;
  core = join(dir, 'fixture.core');
  const run = await runCli(['export', 'fixture', '--format', 'core', '--out', core, '--json', '--store', store]);
  expect(run.code).toBe(0);
  exported = JSON.parse(run.stdout) as Record<string, unknown>;
});

afterAll(() => {
  killDetached();
  rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- gdb

interface GdbRun {
  status: number | null;
  output: string;
}

function gdb(exe: string | null, corePath: string, commands: string[]): GdbRun {
  const args = ['-batch', '-nx', '-iex', 'set debuginfod enabled off', '-iex', 'set pagination off', '-iex', 'set width 0'];
  for (const c of commands) args.push('-ex', c);
  if (exe !== null) args.push(exe, corePath);
  else args.push('-c', corePath);
  const r = spawnSync('gdb', args, { encoding: 'utf8', timeout: 120_000 });
  if (r.error) throw r.error;
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

interface GdbView {
  /** LWPs in `info threads`. */
  threads: number[];
  /** Function names of each LWP's backtrace, innermost first. */
  functions: Map<number, string[]>;
  /** The `$N = …` answers, in order. */
  values: string[];
  /** `info proc mappings`: its table (from NT_FILE). */
  mappings: string;
  warnings: string[];
}

function parseGdb(output: string, corePath: string): GdbView {
  const threads = [...output.matchAll(/^\*?\s+\d+\s+(?:Thread 0x[0-9a-f]+ \()?LWP (\d+)\)?/gm)].map((m) => Number(m[1]));
  const functions = new Map<number, string[]>();
  let current: string[] | null = null;
  for (const line of output.split('\n')) {
    const head = /^Thread \d+ \((?:Thread 0x[0-9a-f]+ \()?LWP (\d+)\)?\)?:$/.exec(line);
    if (head) {
      current = [];
      functions.set(Number(head[1]), current);
      continue;
    }
    const frame = /^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(/.exec(line);
    if (frame && current) current.push(frame[1]!);
  }
  const values = [...output.matchAll(/^\$\d+ = (.*)$/gm)].map((m) => m[1]!);
  const table = output.indexOf('Start Addr');
  const mappings = table < 0 ? '' : output.slice(table).split('\n').filter((l) => /^\s+0x/.test(l) || l.includes('Start Addr')).join('\n');
  const warnings = output
    .split('\n')
    .filter((l) => /warning/i.test(l))
    .map((l) => l.split(corePath).join('CORE'));
  return { threads, functions, values, mappings, warnings };
}

/** `expected` appears in `actual` in this order (other frames may sit between). */
function inOrder(actual: string[], expected: string[]): boolean {
  let at = 0;
  for (const name of actual) if (name === expected[at]) at++;
  return at === expected.length;
}

function expectFixtureView(view: GdbView, what: string): void {
  expect(view.threads.sort((a, b) => a - b), `${what}: info threads`).toEqual(Object.values(tids).sort((a, b) => a - b));
  for (const [name, stack] of Object.entries(STACKS)) {
    const frames = view.functions.get(tids[name]!);
    expect(frames, `${what}: a backtrace of thread ${name} (LWP ${tids[name]})`).toBeDefined();
    expect(inOrder(frames!, stack), `${what}: ${name}'s backtrace ${JSON.stringify(frames)} holds ${stack.join(' <- ')}`).toBe(true);
  }
  const heap = Array.from({ length: HEAP_COUNT }, (_, i) => i * i + 7).join(', ');
  expect(view.values, `${what}: the printed values`).toEqual([
    String(0x5eed1234abcd),
    `{${heap}}`,
    expect.stringMatching(/^0x[0-9a-f]+ "heap text reached through a global"$/),
    '{x = 3, y = -4, scale = 1.5}',
    `"wpsnap core fixture", '\\000' <repeats 12 times>`,
  ]);
}

// ---------------------------------------------------------------- ELF program headers, read by readelf

interface Phdr {
  type: string;
  offset: number;
  vaddr: bigint;
  filesz: number;
  memsz: number;
  flags: string;
}

function programHeaders(path: string): Phdr[] {
  const r = spawnSync('readelf', ['-lW', path], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  expect(r.stdout).toMatch(/Elf file type is CORE/);
  return [...r.stdout.matchAll(/^\s+(LOAD|NOTE)\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x[0-9a-f]+ 0x([0-9a-f]+) 0x([0-9a-f]+) (.{3})/gm)].map((m) => ({
    type: m[1]!,
    offset: parseInt(m[2]!, 16),
    vaddr: BigInt(`0x${m[3]}`),
    filesz: parseInt(m[4]!, 16),
    memsz: parseInt(m[5]!, 16),
    flags: m[6]!.trim(),
  }));
}

interface ShownRegion {
  start: string;
  end: string;
  perms: string;
  offset: string;
  path: string;
  capture: string;
}

async function shownRegions(): Promise<ShownRegion[]> {
  const show = await runCli(['show', String(snapshotId), '--json', '--store', store]);
  expect(show.code).toBe(0);
  return (JSON.parse(show.stdout) as { processes: Array<{ regions: ShownRegion[] }> }).processes[0]!.regions;
}

function readAt(path: string, position: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const got = readSync(fd, out, done, length - done, position + done);
      if (got === 0) break;
      done += got;
    }
    return out.subarray(0, done);
  } finally {
    closeSync(fd);
  }
}

/**
 * Every LOAD segment with content in `corePath` holds, byte for byte, what the
 * raw export (an exporter of its own) of the same snapshot holds for that
 * region; returns how many segments were compared.
 */
function expectSameAsRaw(corePath: string, rawDir: string, pid: number): number {
  const manifest = readRawManifest(rawDir);
  const regions = manifest.processes.find((p) => p.pid === pid)!.regions;
  let compared = 0;
  for (const ph of programHeaders(corePath).filter((p) => p.type === 'LOAD' && p.filesz > 0)) {
    const region = regions.find((r) => BigInt(r.start) === ph.vaddr)!;
    expect(region.file, `region ${region.start} has a raw file`).not.toBeNull();
    const raw = readFileSync(join(rawDir, region.file!)).subarray(0, ph.filesz);
    // Lost pages read as zero in the core (FORMAT.md); the raw export writes a lost page's stored copy if there is one.
    for (const l of region.lost) {
      const at = Number(BigInt(l.address) - ph.vaddr);
      raw.fill(0, Math.min(at, raw.length), Math.min(at + l.pages * 4096, raw.length));
    }
    expect(readAt(corePath, ph.offset, ph.filesz).equals(raw), `segment ${region.start} ${region.path} equals the raw export`).toBe(true);
    compared++;
  }
  return compared;
}

function oneLine(text: string): string {
  const lines = text.trimEnd().split('\n');
  expect(lines, `exactly one line: ${JSON.stringify(text)}`).toHaveLength(1);
  return lines[0]!;
}

/** The fixture is running, not traced, and not stopped (every thread asleep in its blocking call). */
function expectUntouched(pid: number): void {
  expect(isAlive(pid)).toBe(true);
  expect(procStatus(pid)['TracerPid']).toBe('0');
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    expect(stat.charAt(stat.lastIndexOf(')') + 2), `thread ${tid}'s state`).toBe('S');
  }
}

// ---------------------------------------------------------------- the fixture

describe('export --format core of a process with known memory and call stacks', () => {
  it('prints one JSON document with the documented fields', () => {
    expect(exported).toMatchObject({ id: snapshotId, pid: fixture.pid, path: core, threads: 4, exe: EXE, lostPages: 0, state: 'complete' });
    expect(exported['bytes']).toBe(statSync(core).size);
    const loads = programHeaders(core).filter((p) => p.type === 'LOAD');
    expect(exported['segments']).toBe(loads.length);
    expect(exported['segmentsWithContent']).toBe(loads.filter((p) => p.filesz > 0).length);
  });

  it('gdb prints the values at T, every thread with its call stack, and the thread count', () => {
    const run = gdb(EXE, core, FIXTURE_COMMANDS);
    expect(run.status, run.output).toBe(0);
    const view = parseGdb(run.output, core);
    expectFixtureView(view, 'wpsnap core');
    // No signal made this core: gdb names none.
    expect(run.output).not.toMatch(/terminated with signal/);
    expect(run.output).toMatch(/Core was generated by `.*corefixture'/);
    // NT_FILE: gdb lists the fixture's and libc's mappings from it.
    expect(view.mappings).toMatch(/corefixture$/m);
    expect(view.mappings).toMatch(/libc\.so\.6$/m);
  });

  it('gcore of the same process at the same point gives the same answers', () => {
    const prefix = join(dir, 'gcore');
    const r = spawnSync('gcore', ['-o', prefix, String(fixture.pid)], { encoding: 'utf8', timeout: 120_000 });
    const gcoreFile = `${prefix}.${fixture.pid}`;
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
    expect(existsSync(gcoreFile)).toBe(true);
    const theirs = parseGdb(gdb(EXE, gcoreFile, FIXTURE_COMMANDS).output, gcoreFile);
    expectFixtureView(theirs, 'gcore core');
    const ours = parseGdb(gdb(EXE, core, FIXTURE_COMMANDS).output, core);
    expect(ours.values).toEqual(theirs.values);
    expect(ours.threads.sort()).toEqual(theirs.threads.sort());
    for (const tid of Object.values(tids)) expect(ours.functions.get(tid), `LWP ${tid}'s functions`).toEqual(theirs.functions.get(tid));
    expect(ours.mappings).toEqual(theirs.mappings);
    // gdb finds nothing in our core to warn about that it does not find in gcore's.
    expect(ours.warnings.filter((w) => !theirs.warnings.includes(w))).toEqual([]);
    rmSync(gcoreFile);
  });

  it("keeps what the kernel's default coredump_filter keeps; --all keeps everything, and the file's text where it has none", async () => {
    const regions = await shownRegions();
    const loads = programHeaders(core).filter((p) => p.type === 'LOAD');
    expect(loads.map((p) => `0x${p.vaddr.toString(16)}`)).toEqual(regions.map((r) => r.start));
    const segment = (r: ShownRegion): Phdr => loads.find((p) => `0x${p.vaddr.toString(16)}` === r.start)!;
    const size = (r: ShownRegion): number => Number(BigInt(r.end) - BigInt(r.start));
    const exeRegions = regions.filter((r) => r.path === EXE);
    // The fixture's unmodified text: left out; its first page (the ELF header): kept.
    expect(segment(exeRegions.find((r) => r.perms === 'r-xp')!).filesz).toBe(0);
    expect(segment(exeRegions.find((r) => r.offset === '0x0')!).filesz).toBe(4096);
    // Its data (written at run time: copy-on-write pages), the heap and the stack: whole.
    expect(segment(exeRegions.find((r) => r.perms === 'rw-p')!).filesz).toBe(size(exeRegions.find((r) => r.perms === 'rw-p')!));
    for (const name of ['[heap]', '[stack]', '[vdso]']) {
      const r = regions.find((x) => x.path === name)!;
      expect(segment(r).filesz, name).toBe(size(r));
    }
    // Not captured ([vvar], [vsyscall]): no content.
    for (const r of regions.filter((x) => x.capture === 'skipped')) expect(segment(r).filesz, r.path).toBe(0);
    const libcText = regions.find((r) => r.path.includes('libc.so') && r.perms === 'r-xp')!;
    expect(segment(libcText).filesz).toBe(0);
    expect(segment(libcText).flags).toBe('R E');

    const all = join(dir, 'all.core');
    const run = await runCli(['export', 'fixture', '--format', 'core', '--all', '--out', all, '--json', '--store', store]);
    expect(run.code).toBe(0);
    const allLoads = programHeaders(all).filter((p) => p.type === 'LOAD');
    const allSegment = (r: ShownRegion): Phdr => allLoads.find((p) => `0x${p.vaddr.toString(16)}` === r.start)!;
    for (const r of regions) expect(allSegment(r).filesz, `${r.path} ${r.perms}`).toBe(r.capture === 'skipped' ? 0 : size(r));
    // libc's text in the core is libc's file at the mapping's offset.
    const text = readAt(all, allSegment(libcText).offset, size(libcText));
    const file = readAt(libcText.path, Number(BigInt(libcText.offset)), size(libcText));
    expect(text.equals(Buffer.concat([file, Buffer.alloc(size(libcText) - file.length)]))).toBe(true);
    expectFixtureView(parseGdb(gdb(EXE, all, FIXTURE_COMMANDS).output, all), 'wpsnap --all core');
    // Every segment, byte for byte, as the raw export has the region; the default core's segments too.
    const rawDir = join(dir, 'fixture-raw');
    const opened = Store.open(store, { readonly: true });
    try {
      await exportRaw(opened, 'fixture', rawDir);
    } finally {
      await opened.close();
    }
    expect(expectSameAsRaw(all, rawDir, fixture.pid)).toBe(regions.filter((r) => r.capture !== 'skipped').length);
    const whole = loads.filter((p) => p.filesz > 0 && p.filesz === p.memsz).length;
    const compared = expectSameAsRaw(core, rawDir, fixture.pid);
    expect(compared).toBe(loads.filter((p) => p.filesz > 0).length);
    expect(compared).toBeGreaterThan(whole - 1);
  });

  it('creates the file 0600 under umask 0, through a temporary name that is gone after', async () => {
    const out = join(dir, 'umask', 'private.core');
    mkdirSync(join(dir, 'umask'));
    const old = process.umask(0);
    let run;
    try {
      run = await runCli(['export', 'fixture', '--format', 'core', '--out', out, '--store', store]);
    } finally {
      process.umask(old);
    }
    expect(run.code).toBe(0);
    expect(oneLine(run.stdout)).toBe(
      `snapshot ${snapshotId}, pid ${fixture.pid}: core written to ${out} (${(statSync(out).size / 2 ** 20).toFixed(1)} MiB, ${exported['segments'] as number} segments, 4 threads); open it with: gdb ${EXE} ${out}`,
    );
    expect(statSync(out).mode & 0o777).toBe(0o600);
    expect(readdirSync(join(dir, 'umask'))).toEqual(['private.core']);
  });

  it('refuses bad destinations and pids in one line, exit 2, leaving the target untouched', async () => {
    const existing = join(dir, 'existing.core');
    writeFileSync(existing, 'not a core');
    const cases: Array<[string[], string]> = [
      [['--out', existing], `${existing} exists: add --force to replace it`],
      [['--out', join(dir, 'no-such-dir', 'x.core')], `cannot create ${join(dir, 'no-such-dir', 'x.core')}: its directory ${join(dir, 'no-such-dir')} does not exist`],
      [['--out', dir], `${dir} is a directory: a core export writes a file`],
      [['--out', join(dir, 'p.core'), '--pid', '1'], `snapshot ${snapshotId} holds no pid 1: its process is ${fixture.pid}`],
      [['--out', join(dir, 'p.core'), '--pid', 'x'], 'not a pid: "x"'],
    ];
    const before = readdirSync(dir).sort();
    for (const [args, message] of cases) {
      const run = await runCli(['export', 'fixture', '--format', 'core', ...args, '--store', store]);
      expect(run.code, message).toBe(2);
      expect(run.stdout).toBe('');
      expect(oneLine(run.stderr)).toBe(`wpsnap: ${message}`);
      expect(readdirSync(dir).sort()).toEqual(before);
      expectUntouched(fixture.pid);
    }
    expect(readFileSync(existing, 'utf8')).toBe('not a core');
    const json = await runCli(['export', 'fixture', '--format', 'core', '--out', existing, '--json', '--store', store]);
    expect(json.code).toBe(2);
    expect(JSON.parse(oneLine(json.stderr))).toMatchObject({ error: { code: 'EXPORT_EXISTS', exitCode: 2 } });
    // --force replaces it, with a core.
    const forced = await runCli(['export', 'fixture', '--format', 'core', '--out', existing, '--force', '--store', store]);
    expect(forced.code).toBe(0);
    expect(readFileSync(existing).equals(readFileSync(core))).toBe(true);
    // The options of the core format are refused with the raw one.
    const raw = await runCli(['export', 'fixture', '--out', join(dir, 'raw'), '--pid', String(fixture.pid), '--store', store]);
    expect(raw.code).toBe(2);
    expect(oneLine(raw.stderr)).toBe('wpsnap: --pid applies to --format core only');
    expect(existsSync(join(dir, 'raw'))).toBe(false);
  });

  it('an interrupted export (SIGINT/SIGTERM) exits 130 and leaves nothing, at its start or halfway', async () => {
    const out = join(dir, 'interrupted', 'x.core');
    mkdirSync(join(dir, 'interrupted'));
    const run = await runCli(['export', 'fixture', '--format', 'core', '--out', out, '--store', store], { signal: AbortSignal.abort() });
    expect(run.code).toBe(130);
    expect(oneLine(run.stderr)).toBe(`wpsnap: export of snapshot ${snapshotId} to ${out} interrupted; nothing of it was left`);
    expect(readdirSync(join(dir, 'interrupted'))).toEqual([]);

    // Halfway: aborted once the pages of the third region have been read.
    const opened = Store.open(store, { readonly: true });
    try {
      const controller = new AbortController();
      let ranges = 0;
      const reader: SnapshotReader = {
        find: (ref) => opened.find(ref),
        list: () => opened.list(),
        processes: (id) => opened.processes(id),
        threads: (id) => opened.threads(id),
        regions: (id) => opened.regions(id),
        lost: (id) => opened.lost(id),
        readPage: (id, address) => opened.readPage(id, address),
        pagesInRange: (id, start, end) => opened.pagesInRange(id, start, end),
        pageViewsInRange: (id, start, end) => {
          if (++ranges === 3) controller.abort();
          return opened.pageViewsInRange(id, start, end);
        },
      };
      await expect(exportCore(reader, 'fixture', out, { signal: controller.signal })).rejects.toMatchObject({ code: 'INTERRUPTED' });
      expect(ranges).toBe(3);
      expect(readdirSync(join(dir, 'interrupted'))).toEqual([]);
    } finally {
      await opened.close();
    }
  });

  it('a failed export (the filesystem fills up: a real tmpfs) exits 1 in one line and leaves nothing', async () => {
    const small = join(dir, 'small');
    mkdirSync(small);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', small]);
    try {
      const out = join(small, 'x.core');
      // --all: libc's text alone is more than the 256 KiB the filesystem has.
      const run = await runCli(['export', 'fixture', '--format', 'core', '--all', '--out', out, '--store', store]);
      expect(run.code).toBe(1);
      expect(oneLine(run.stderr)).toBe('wpsnap: write the core file: write: ENOSPC');
      expect(readdirSync(small)).toEqual([]);
      expectUntouched(fixture.pid);
    } finally {
      execFileSync('umount', [small]);
    }
  });

  it('is made from the store alone: once the target has exited, the same core again', async () => {
    expectUntouched(fixture.pid);
    const { done, exit } = await fixture.stop();
    // The fixture checked its own memory: nothing changed it (neither wpsnap nor gcore).
    expect(done).toMatchObject({ done: true, ok: true });
    expect(exit.code).toBe(0);
    const again = join(dir, 'after-exit.core');
    const run = await runCli(['export', 'fixture', '--format', 'core', '--out', again, '--store', store]);
    expect(run.code).toBe(0);
    expect(readFileSync(again).equals(readFileSync(core))).toBe(true);
    expectFixtureView(parseGdb(gdb(EXE, again, FIXTURE_COMMANDS).output, again), 'wpsnap core after exit');
  });
});

// ---------------------------------------------------------------- stores without a live target

describe('export --format core of stores made without a target', () => {
  it('a snapshot of several processes needs --pid, which picks one', async () => {
    const path = join(dir, 'group.db');
    const s = Store.open(path);
    const writer = s.beginSnapshot({ name: 'group' });
    for (const pid of [100, 200]) {
      const p = writer.addProcess(fakeProcess(pid, { cmdline: [`prog-${pid}`, '--flag'], comm: `prog-${pid}` }));
      writer.addThreads(p, [fakeThread(pid), fakeThread(pid + 1)]);
      writer.addRegions(p, [fakeRegion(0x10000000n, 0x10004000n, { path: '[heap]' })]);
      await writer.addPages(p, heapBatch(0x10000000n, 4, ['random'], pid));
    }
    await writer.complete({ pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });
    await s.close();

    const out = join(dir, 'group.core');
    const ambiguous = await runCli(['export', 'group', '--format', 'core', '--out', out, '--store', path]);
    expect(ambiguous.code).toBe(2);
    expect(oneLine(ambiguous.stderr)).toBe(`wpsnap: snapshot ${writer.id} holds 2 processes (pids 100, 200): name one with --pid`);
    const missing = await runCli(['export', 'group', '--format', 'core', '--pid', '300', '--out', out, '--store', path]);
    expect(missing.code).toBe(2);
    expect(oneLine(missing.stderr)).toBe(`wpsnap: snapshot ${writer.id} holds no pid 300: its processes are 100, 200`);
    expect(existsSync(out)).toBe(false);

    const picked = await runCli(['export', 'group', '--format', 'core', '--pid', '200', '--out', out, '--json', '--store', path]);
    expect(picked.code).toBe(0);
    const doc = JSON.parse(picked.stdout) as { warnings: string[] };
    expect(doc).toMatchObject({ pid: 200, threads: 2, segments: 1, segmentsWithContent: 1 });
    // fakeThread's xstate is filler bytes: its XCR0 names no layout gdb knows, and such a note would make gdb refuse the core.
    expect(doc.warnings).toEqual(['the XSAVE state of threads 200, 201 is not one gdb can lay out (its XCR0): left out, the FXSAVE registers stand']);
    // gdb takes its command line from NT_PRPSINFO and its threads from NT_PRSTATUS, the main one first.
    const run = gdb(null, out, ['info threads', 'x/2gx 0x10000000']);
    expect(run.output).toMatch(/Core was generated by `prog-200 --flag'/);
    expect([...run.output.matchAll(/LWP (\d+)/g)].map((m) => Number(m[1]))).toEqual(expect.arrayContaining([200, 201]));
    expect(run.output).toMatch(/^\* 1\s+LWP 200\b/m);
    const page = heapBatch(0x10000000n, 1, ['random'], 200).data;
    const words = [0, 8].map((at) => `0x${Buffer.from(page).readBigUInt64LE(at).toString(16).padStart(16, '0')}`);
    expect(run.output).toMatch(new RegExp(`0x10000000:\\s+${words[0]}\\s+${words[1]}`));
  });

  it('holds each page as the raw export does: stored pages, zeros, lost pages zeroed, file content, holes', async () => {
    const sub = join(dir, 'content');
    mkdirSync(sub);
    const libFile = join(sub, 'libfake.so');
    const libBytes = Buffer.alloc(22_528);
    for (let i = 0; i < libBytes.length; i += 8) libBytes.writeUInt32LE(0xc0de0000 + i, i);
    libBytes.write('\x7fELF', 0, 'latin1');
    writeFileSync(libFile, libBytes, { mode: 0o644 });
    const reference = (path: string): FileReference => {
      const st = statSync(path, { bigint: true });
      return { path, dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: st.mtimeNs.toString() };
    };
    const batch = (entries: Array<[bigint, number]>): PageBatch => {
      const data = new Uint8Array(entries.length * PAGE_SIZE);
      entries.forEach(([, seed], i) => data.set(heapBatch(0n, 1, ['random'], seed).data, i * PAGE_SIZE));
      return { addresses: BigUint64Array.from(entries.map(([a]) => a)), data };
    };
    const HEAP = 0x5555a0000000n;
    const BIG = 0x7f1000000000n;
    const LIB = 0x7f3300000000n;
    const HDR = 0x7f3400000000n;
    const path = join(sub, 'content.db');
    const s = Store.open(path);
    const writer = s.beginSnapshot({ name: 'content' });
    const p = writer.addProcess(fakeProcess(777));
    writer.addThreads(p, [{ ...fakeThread(777), xstate: Buffer.alloc(0) }]);
    const lib = { capture: 'file-private' as const, path: libFile, inode: Number(statSync(libFile).ino), file: reference(libFile) };
    writer.addRegions(p, [
      fakeRegion(HEAP, HEAP + 16n * 4096n, { path: '[heap]' }),
      // 700 pages: windows with nothing stored are skipped (holes).
      fakeRegion(BIG, BIG + 700n * 4096n),
      // 8 pages of the file from offset 4096 (4.5 pages of file, then zeros); page 2 copied on write.
      fakeRegion(LIB, LIB + 8n * 4096n, { ...lib, perms: 'rw-p', offset: 4096n }),
      // Never written, offset 0 of an ELF file: only its header page.
      fakeRegion(HDR, HDR + 4n * 4096n, { ...lib, perms: 'r--p', offset: 0n }),
    ]);
    await writer.addPages(p, batch([[HEAP + 4096n, 1], [HEAP + 2n * 4096n, 1], [HEAP + 9n * 4096n, 9], [HEAP + 12n * 4096n, 12], [LIB + 2n * 4096n, 1234]]));
    await writer.addPages(p, batch([[BIG, 50], [BIG + 300n * 4096n, 51], [BIG + 301n * 4096n, 52], [BIG + 699n * 4096n, 53]]));
    writer.addLost(p, [{ address: HEAP + 12n * 4096n, pages: 2, reason: 'unmapped-before-saved' }]);
    await writer.complete({ pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 });

    const rawDir = join(sub, 'raw');
    await exportRaw(s, 'content', rawDir);
    const out = join(sub, 'content.core');
    const result = await exportCore(s, 'content', out);
    expect(result).toMatchObject({ segments: 4, segmentsWithContent: 4, lostPages: 2 });
    expect(result.warnings).toEqual(['2 pages read as zero in the core: their content at T is not in the snapshot (unmapped-before-saved)']);
    const loads = programHeaders(out).filter((ph) => ph.type === 'LOAD');
    expect(loads.map((ph) => [ph.filesz, ph.memsz, ph.flags])).toEqual([
      [16 * 4096, 16 * 4096, 'RW'],
      [700 * 4096, 700 * 4096, 'RW'],
      [8 * 4096, 8 * 4096, 'RW'],
      [4096, 4 * 4096, 'R'],
    ]);
    expect(expectSameAsRaw(out, rawDir, 777)).toBe(4);
    // The lost page kept in the store (12) reads as zero; the file's bytes are there; the big region is mostly holes.
    expect(readAt(out, loads[0]!.offset + 12 * 4096, 4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(readAt(out, loads[2]!.offset, 4096).equals(libBytes.subarray(4096, 8192))).toBe(true);
    expect(readAt(out, loads[3]!.offset, 4096).equals(libBytes.subarray(0, 4096))).toBe(true);
    expect(statSync(out).blocks * 512).toBeLessThan(400 * 4096);

    // The file changed since T: its pages that were not copied on write read as zero, and the export says so.
    utimesSync(libFile, new Date(), new Date(Date.now() + 5000));
    const changed = await exportCore(s, 'content', join(sub, 'changed.core'));
    // 4.5 pages of file in the 8-page mapping: 5 pages, one of them stored (page 2).
    expect(changed.lostPages).toBe(2 + 4);
    expect(changed.warnings).toEqual([`6 pages read as zero in the core: their content at T is not in the snapshot (unmapped-before-saved); changed since T: ${libFile}`]);
    const changedLoads = programHeaders(join(sub, 'changed.core')).filter((ph) => ph.type === 'LOAD');
    expect(changedLoads.map((ph) => ph.filesz)).toEqual([16 * 4096, 700 * 4096, 8 * 4096, 0]);
    const libSegment = readAt(join(sub, 'changed.core'), changedLoads[2]!.offset, 8 * 4096);
    const expected = Buffer.alloc(8 * 4096);
    Buffer.from(heapBatch(0n, 1, ['random'], 1234).data).copy(expected, 2 * 4096);
    expect(libSegment.equals(expected)).toBe(true);
    await s.close();
  });

  it('an incomplete snapshot is exported only with --allow-incomplete', async () => {
    const path = join(dir, 'incomplete.db');
    const s = Store.open(path);
    const writer = s.beginSnapshot({ name: 'partial' });
    const p = writer.addProcess(fakeProcess(4242));
    writer.addThreads(p, [fakeThread(4242)]);
    writer.addRegions(p, [fakeRegion(0x20000000n, 0x20002000n)]);
    await writer.addPages(p, heapBatch(0x20000000n, 1, ['random'], 1));
    await writer.abort('test interruption');
    await s.close();
    const out = join(dir, 'partial.core');
    const refused = await runCli(['export', 'partial', '--format', 'core', '--out', out, '--store', path]);
    expect(refused.code).toBe(2);
    expect(oneLine(refused.stderr)).toBe(`wpsnap: snapshot ${writer.id} is incomplete, not complete: add --allow-incomplete to export it anyway (unsaved pages read as zero)`);
    expect(existsSync(out)).toBe(false);
    const allowed = await runCli(['export', 'partial', '--format', 'core', '--allow-incomplete', '--out', out, '--json', '--store', path]);
    expect(allowed.code).toBe(0);
    expect(JSON.parse(allowed.stdout)).toMatchObject({ state: 'incomplete', segments: 1 });
    expect(programHeaders(out).filter((ph) => ph.type === 'LOAD')).toMatchObject([{ filesz: 0x2000, memsz: 0x2000 }]);
  });
});

// ---------------------------------------------------------------- a real program

const PYTHON_TARGET = `
import json, os, time
blobs = [bytes([i % 251]) * 4096 for i in range(4000)]
def wpsnap_sleeper():
    time.sleep(3600)
print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
wpsnap_sleeper()
`;

describe('a core of python3', () => {
  let python: Launched;
  afterAll(() => {
    python?.signal('SIGKILL');
  });

  it('gdb gives its native backtrace and, through its debug info, the Python functions it is in', async () => {
    python = await launch(['python3', '-c', PYTHON_TARGET]);
    const path = join(dir, 'python.db');
    const snap = await runCli(['snapshot', String(python.pid), '--store', path]);
    expect(snap.code, snap.stderr).toBe(0);
    const out = join(dir, 'python.core');
    const run = await runCli(['export', '1', '--format', 'core', '--out', out, '--json', '--store', path]);
    expect(run.code).toBe(0);
    const { exe } = JSON.parse(run.stdout) as { exe: string };
    expect(exe).toMatch(/python3/);
    const frame = '_PyRuntime.interpreters.main->threads.head->cframe->current_frame';
    const name = (f: string): string => `print (char*)(((PyASCIIObject*)${f}->f_code->co_name)+1)`;
    const g = gdb(exe, out, ['bt', name(frame), name(`${frame}->previous`)]);
    expect(g.status, g.output).toBe(0);
    const functions = [...g.output.matchAll(/^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(/gm)].map((m) => m[1]!);
    // The native stack from the sleep down to main (libpython here has symbols; python3-dbg is not needed).
    expect(inOrder(functions, ['time_sleep', '_PyEval_EvalFrameDefault', 'Py_RunMain', '__libc_start_main_impl']), JSON.stringify(functions)).toBe(true);
    expect(functions[0]).toMatch(/clock_nanosleep|select|nanosleep/);
    const hasPyDebugInfo = !/No symbol "_PyRuntime"|No struct type named|There is no member/.test(g.output);
    if (hasPyDebugInfo) {
      // The Python frames, read from the interpreter's heap in the core: py-bt's answer without python-gdb.py.
      expect([...g.output.matchAll(/^\$\d+ = 0x[0-9a-f]+(?: <[^>]+>)? "(.*)"$/gm)].map((m) => m[1])).toEqual(['wpsnap_sleeper', '<module>']);
    }
    expect(isAlive(python.pid)).toBe(true);
    expect(procStatus(python.pid)['TracerPid']).toBe('0');
  });
});
