// The process state a restore will need (issue 13): fds, cwd and root, umask,
// credentials, personality, rlimits, the mm fields and the executable's
// identity, read from /proc before the pause and stored (schema 6) as one JSON
// document per process. A fixture holding one fd of each kind, with a known
// cwd, umask and RLIMIT_NOFILE, is snapshotted with the CLI; a store of
// schema 5 reads its processes' state as not recorded.
import { mkdtempSync, readFileSync, realpathSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseFdDetails, parseLimits, parseMmFields, parseNetInet, parseNetUnix } from '../core/process-state.js';
import { readRawManifest } from '../snapshot-format/export-raw.js';
import type { FdRecord, ProcessState } from '../snapshot-format/model.js';
import { MIGRATIONS, Store } from '../store/index.js';
import { fakeProcess, fakeThread } from '../store/testing.js';
import { runCli, runCliProcess } from './support/cli.js';
import { FIXTURES_BUILD_DIR, killDetached, startDetached, type DetachedFixture } from './support/spawn.js';

const STATS = { pauseMicros: 0, durationMillis: 0, faults: 0, faultP50Micros: 0, faultP99Micros: 0 };
const O_ACCMODE = 0o3;
const O_WRONLY = 0o1;
const O_RDWR = 0o2;
const O_APPEND = 0o2000;
const O_DIRECTORY = 0o200000;

interface FixtureFds {
  file: number;
  dir: number;
  pipe_r: number;
  pipe_w: number;
  eventfd: number;
  timerfd: number;
  signalfd: number;
  epoll: number;
  socket: number;
  memfd: number;
  tcp: number;
}

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'wpsnap-state-'));
});

afterAll(() => {
  killDetached();
  rmSync(dir, { recursive: true, force: true });
});

describe('a snapshot records the process state a restore will need', () => {
  let fixture: DetachedFixture;
  let fds: FixtureFds;
  let work: string;
  let store: string;
  let state: ProcessState;
  let processId: number;

  beforeAll(async () => {
    work = realpathSync(mkdtempSync(join(dir, 'cwd-')));
    fixture = await startDetached('fdstate', [work]);
    fds = fixture.ready['fds'] as FixtureFds;
    store = join(dir, 'store.db');
    const snap = await runCliProcess(['snapshot', String(fixture.pid), '--json', '--store', store, '--name', 'state']);
    expect(snap.code, snap.stderr).toBe(0);
    const s = Store.open(store, { readonly: true });
    try {
      const [process] = s.processes(s.find('state').id);
      processId = process!.processId;
      const read = s.processState(processId);
      expect(read).toBeDefined();
      state = read!;
    } finally {
      await s.close();
    }
  });

  afterAll(async () => {
    await fixture.stop();
  });

  const fd = (n: number): FdRecord => {
    const found = state.fds.find((f) => f.fd === n);
    expect(found, `fd ${n}`).toBeDefined();
    return found!;
  };

  it('lists every fd of /proc/PID/fd, each of the fixture\'s of its kind', () => {
    expect(state.fds.map((f) => f.fd)).toEqual([...state.fds.map((f) => f.fd)].sort((a, b) => a - b));
    for (const f of state.fds) expect(f.fd).not.toBeNaN();
    expect(fd(fds.file).kind).toBe('file');
    expect(fd(fds.dir).kind).toBe('directory');
    expect(fd(fds.pipe_r).kind).toBe('pipe');
    expect(fd(fds.pipe_w).kind).toBe('pipe');
    expect(fd(fds.eventfd)).toMatchObject({ kind: 'eventfd', target: 'anon_inode:[eventfd]' });
    expect(fd(fds.timerfd)).toMatchObject({ kind: 'timerfd', target: 'anon_inode:[timerfd]' });
    expect(fd(fds.signalfd)).toMatchObject({ kind: 'signalfd', target: 'anon_inode:[signalfd]' });
    expect(fd(fds.epoll)).toMatchObject({ kind: 'epoll', target: 'anon_inode:[eventpoll]' });
    expect(fd(fds.socket).kind).toBe('socket');
    expect(fd(fds.socket).target).toMatch(/^socket:\[\d+\]$/);
    expect(fd(fds.socket).mode & 0o170000).toBe(0o140000);
    expect(fd(fds.memfd)).toMatchObject({ kind: 'memfd', target: '/memfd:fdstate (deleted)', size: 4096 });
    // Only regular files carry a size and an mtime.
    for (const n of [fds.dir, fds.pipe_r, fds.eventfd, fds.socket]) {
      expect(fd(n)).not.toHaveProperty('size');
      expect(fd(n)).not.toHaveProperty('mtimeNs');
    }
  });

  it('the regular file: its path, offset 123, O_RDWR|O_APPEND, and its identity', () => {
    const file = fd(fds.file);
    const path = join(work, 'data');
    const st = statSync(path, { bigint: true });
    expect(file.target).toBe(path);
    expect(file.pos).toBe('123');
    expect(file.flags & O_ACCMODE).toBe(O_RDWR);
    expect(file.flags & O_APPEND).toBe(O_APPEND);
    expect(file).toMatchObject({ dev: Number(st.dev), ino: Number(st.ino), mode: Number(st.mode), size: 1000, mtimeNs: st.mtimeNs.toString() });
    expect(file.mntId).toBeGreaterThan(0);
  });

  it('the directory, and the pipe as a pair: one inode, a read end and a write end', () => {
    const d = fd(fds.dir);
    expect(d.target).toBe(work);
    expect(d.ino).toBe(Number(statSync(work, { bigint: true }).ino));
    expect(d.flags & O_DIRECTORY).toBe(O_DIRECTORY);
    const r = fd(fds.pipe_r);
    const w = fd(fds.pipe_w);
    expect(r.target).toMatch(/^pipe:\[\d+\]$/);
    expect(w.target).toBe(r.target);
    expect(w.ino).toBe(r.ino);
    expect(r.flags & O_ACCMODE).toBe(0);
    expect(w.flags & O_ACCMODE).toBe(O_WRONLY);
  });

  it('the epoll fd lists the eventfd with its events and data; the eventfd its count; the signalfd its mask', () => {
    const EPOLLIN = 0x1;
    const EPOLLERR = 0x8;
    const EPOLLHUP = 0x10;
    const EPOLLET = 0x80000000;
    // The kernel adds EPOLLERR|EPOLLHUP to every registration.
    expect(fd(fds.epoll).epoll).toEqual([{ fd: fds.eventfd, events: (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLET) >>> 0, data: 0x1122334455667788n.toString() }]);
    expect(fd(fds.eventfd).eventfd).toEqual({ count: '5', semaphore: false });
    const SIGUSR1 = 10;
    const SIGUSR2 = 12;
    const mask = (1n << BigInt(SIGUSR1 - 1)) | (1n << BigInt(SIGUSR2 - 1));
    expect(fd(fds.signalfd).signalfd).toEqual({ sigmask: `0x${mask.toString(16).padStart(16, '0')}` });
    expect(fd(fds.signalfd).signalfd!.sigmask).toBe('0x0000000000000a00');
    // Details belong to their kind only.
    for (const n of [fds.file, fds.pipe_r, fds.memfd]) {
      for (const key of ['epoll', 'eventfd', 'timerfd', 'signalfd', 'socket']) expect(fd(n)).not.toHaveProperty(key);
    }
  });

  it('the timerfd: CLOCK_MONOTONIC, every 7 s, at most 7 s to go', () => {
    const timer = fd(fds.timerfd).timerfd!;
    expect(timer).toMatchObject({ clockid: 1, settimeFlags: 0, interval: { sec: 7, nsec: 0 } });
    expect(timer.ticks).toMatch(/^\d+$/);
    expect(timer.value.sec).toBeLessThanOrEqual(7);
    expect(timer.value.sec * 1e9 + timer.value.nsec).toBeGreaterThan(0);
    expect(timer.value.nsec).toBeLessThan(1e9);
  });

  it('the sockets: the unix one listening on "sock", the TCP one on 127.0.0.1 and its port', () => {
    // Options read through a copy of the fd (fdstate sets none): a restore sets them again.
    const off = { reuseAddr: false, reusePort: false, keepAlive: false };
    expect(fd(fds.socket).socket).toEqual({ family: 'unix', type: 'stream', state: 'listen', local: 'sock', options: off });
    const port = fixture.ready['tcp_port'] as number;
    expect(port).toBeGreaterThan(0);
    expect(fd(fds.tcp).socket).toEqual({ family: 'inet', type: 'stream', state: 'listen', local: `127.0.0.1:${port}`, options: { ...off, noDelay: false } });
  });

  it('cwd, root, umask 027, RLIMIT_NOFILE soft 512, credentials, personality', () => {
    expect(state.cwd).toBe(work);
    expect(state.root).toBe('/');
    expect(state.umask).toBe(0o027);
    const nofile = state.rlimits.find((l) => l.name === 'Max open files');
    expect(nofile).toMatchObject({ soft: '512', units: 'files' });
    expect(state.rlimits.map((l) => l.name)).toContain('Max stack size');
    expect(state.rlimits.find((l) => l.name === 'Max cpu time')).toMatchObject({ soft: null, hard: null });
    expect(state.rlimits).toHaveLength(16);
    const uid = process.getuid!();
    const gid = process.getgid!();
    expect(state.credentials.uid).toEqual([uid, uid, uid, uid]);
    expect(state.credentials.gid).toEqual([gid, gid, gid, gid]);
    expect(Array.isArray(state.credentials.groups)).toBe(true);
    expect(state.personality).toBe(parseInt(readFileSync(`/proc/${fixture.pid}/personality`, 'utf8'), 16));
  });

  it('the mm fields: argv and environ spans as long as /proc\'s cmdline and environ, the heap from start_brk', () => {
    const { mm } = state;
    const n = (v: string): bigint => BigInt(v);
    expect(n(mm.argEnd) - n(mm.argStart)).toBe(BigInt(readFileSync(`/proc/${fixture.pid}/cmdline`).length));
    expect(n(mm.envEnd) - n(mm.envStart)).toBe(BigInt(readFileSync(`/proc/${fixture.pid}/environ`).length));
    expect(n(mm.startCode)).toBeGreaterThan(0n);
    expect(n(mm.endCode)).toBeGreaterThan(n(mm.startCode));
    expect(n(mm.endData)).toBeGreaterThan(n(mm.startData));
    expect(n(mm.startStack)).toBeGreaterThan(n(mm.envEnd) - 0x100000n);
    const heap = /^([0-9a-f]+)-[0-9a-f]+ .*\[heap\]$/m.exec(readFileSync(`/proc/${fixture.pid}/maps`, 'utf8'));
    if (heap) expect(n(mm.startBrk)).toBe(BigInt(`0x${heap[1]!}`));
  });

  it('the executable\'s identity is the fixture binary\'s', () => {
    const binary = realpathSync(join(FIXTURES_BUILD_DIR, 'fdstate'));
    const st = statSync(binary, { bigint: true });
    expect(state.exe).toEqual({ path: binary, dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: st.mtimeNs.toString() });
  });

  it('is one JSON row of process_state', () => {
    const db = new Database(store, { readonly: true });
    try {
      const rows = db.prepare('SELECT process_id, state FROM process_state').all() as Array<{ process_id: number; state: string }>;
      expect(rows).toHaveLength(1);
      expect(rows[0]!.process_id).toBe(processId);
      expect(JSON.parse(rows[0]!.state)).toEqual(state);
    } finally {
      db.close();
    }
  });

  it('show prints a summary and --json the document; the raw export\'s manifest has it', async () => {
    const json = await runCli(['show', 'state', '--json', '--store', store]);
    expect(json.code, json.stderr).toBe(0);
    const doc = JSON.parse(json.stdout) as { processes: Array<{ state: ProcessState | null }> };
    expect(doc.processes[0]!.state).toEqual(state);
    const text = await runCli(['show', 'state', '--store', store]);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(new RegExp(`fds \\(${state.fds.length}\\): .*1 eventfd`));
    expect(text.stdout).toMatch(/fds .*\b1 memfd\b/);
    expect(text.stdout).toContain(`cwd:     ${work}, umask 0027`);
    const out = join(dir, 'raw');
    const raw = await runCli(['export', 'state', '--format', 'raw', '--out', out, '--json', '--store', store]);
    expect(raw.code, raw.stderr).toBe(0);
    expect(readRawManifest(out).processes[0]!.state).toEqual(state);
  });
});

describe('stores of schema 5', () => {
  it('read their processes\' state as not recorded (undefined, null), never as empty', async () => {
    const path = join(dir, 'v5.db');
    const v5 = Store.open(path, { migrations: MIGRATIONS.slice(0, 5) });
    const old = v5.beginSnapshot({ name: 'old' });
    const oldProcess = old.addProcess(fakeProcess(4242));
    old.addThreads(oldProcess, [fakeThread(4242)]);
    await old.complete(STATS);
    await v5.close();

    const v6 = Store.open(path);
    try {
      const db = (v6 as unknown as { db: Database.Database }).db;
      expect((db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string }).value).toBe(String(MIGRATIONS.length));
      expect(v6.processState(oldProcess)).toBeUndefined();

      // A new process with a state round-trips; deleting its snapshot drops the row.
      const recorded: ProcessState = {
        fds: [{ fd: 0, kind: 'device', target: '/dev/null', pos: '0', flags: 0o100000, mntId: 23, dev: 5, ino: 3, mode: 0o20666 }],
        cwd: '/',
        root: '/',
        umask: 0o022,
        credentials: { uid: [1, 2, 3, 4], gid: [5, 6, 7, 8], groups: [9] },
        personality: 0,
        rlimits: [{ name: 'Max open files', soft: '1024', hard: '18446744073709551614', units: 'files' }],
        mm: { startCode: '1', endCode: '2', startStack: '3', startData: '4', endData: '5', startBrk: '6', argStart: '7', argEnd: '8', envStart: '9', envEnd: '18446744073709551615' },
        exe: null,
      };
      const next = v6.beginSnapshot({ name: 'new' });
      const newProcess = next.addProcess({ ...fakeProcess(4243), state: recorded });
      await next.complete(STATS);
      expect(v6.processState(newProcess)).toEqual(recorded);
      expect(v6.processes(v6.find('new').id)[0]).not.toHaveProperty('state');
      v6.delete(v6.find('new').id);
      expect(db.prepare('SELECT COUNT(*) AS n FROM process_state').get()).toEqual({ n: 0 });
    } finally {
      await v6.close();
    }

    const shown = await runCli(['show', 'old', '--json', '--store', path]);
    expect(shown.code, shown.stderr).toBe(0);
    expect((JSON.parse(shown.stdout) as { processes: Array<{ state: unknown }> }).processes[0]!.state).toBeNull();
    const text = await runCli(['show', 'old', '--store', path]);
    expect(text.stdout).toContain('state:   not recorded');
    const out = join(dir, 'v5-raw');
    const raw = await runCli(['export', 'old', '--format', 'raw', '--out', out, '--json', '--store', path]);
    expect(raw.code, raw.stderr).toBe(0);
    expect(readRawManifest(out).processes[0]!.state).toBeNull();
  });
});

describe('parsing /proc', () => {
  it('fdinfo details: epoll, eventfd (hex count), signalfd, timerfd; missing lines leave the detail out', () => {
    const head = 'pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n';
    expect(
      parseFdDetails('epoll', `${head}tfd:        4 events: 80000019 data: 1122334455667788  pos:0 ino:40e sdev:10\ntfd:       12 events:       19 data:                5  pos:0 ino:40f sdev:10\n`),
    ).toEqual({
      epoll: [
        { fd: 4, events: 0x80000019, data: '1234605616436508552' },
        { fd: 12, events: 0x19, data: '5' },
      ],
    });
    expect(parseFdDetails('epoll', head)).toEqual({ epoll: [] });
    expect(parseFdDetails('eventfd', `${head}eventfd-count:               1f\neventfd-id: 1\n`)).toEqual({ eventfd: { count: '31' } });
    expect(parseFdDetails('eventfd', head)).toEqual({});
    expect(parseFdDetails('signalfd', `${head}sigmask:\t0000000000000a00\n`)).toEqual({ signalfd: { sigmask: '0x0000000000000a00' } });
    const timer = `${head}clockid: 0\nticks: 3\nsettime flags: 01\nit_value: (6, 994027858)\nit_interval: (7, 0)\n`;
    expect(parseFdDetails('timerfd', timer)).toEqual({
      timerfd: { clockid: 0, ticks: '3', settimeFlags: 1, value: { sec: 6, nsec: 994027858 }, interval: { sec: 7, nsec: 0 } },
    });
    expect(parseFdDetails('timerfd', timer.replace(/^it_interval.*$/m, ''))).toEqual({});
    expect(parseFdDetails('file', `${head}sigmask:\t1\n`)).toEqual({});
  });

  it('/proc/net/unix: type, listen from the flags, state from St, the path (abstract with @, none when unbound)', () => {
    const text = [
      'Num       RefCount Protocol Flags    Type St Inode Path',
      '0000000000000000: 00000002 00000000 00010000 0001 01 41001 /run/a b.sock',
      '0000000000000000: 00000003 00000000 00000000 0001 03 41002',
      '0000000000000000: 00000002 00000000 00000000 0002 01 41003 @abstract',
      '0000000000000000: 00000002 00000000 00000000 0005 01 41004 sock',
      '',
    ].join('\n');
    expect([...parseNetUnix(text)]).toEqual([
      ['41001', { family: 'unix', type: 'stream', state: 'listen', local: '/run/a b.sock' }],
      ['41002', { family: 'unix', type: 'stream', state: 'connected', local: '' }],
      ['41003', { family: 'unix', type: 'dgram', state: 'unconnected', local: '@abstract' }],
      ['41004', { family: 'unix', type: 'seqpacket', state: 'unconnected', local: 'sock' }],
    ]);
  });

  it('/proc/net/tcp and tcp6: little-endian words decoded, ports in hex, the peer when connected, inode 0 skipped', () => {
    const tcp = [
      '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5001 1 0000000000000000 100 0 0 10 0',
      '   1: 0201A8C0:D431 0101A8C0:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 5002 1 0000000000000000 20 4 30 10 -1',
      '   2: 0100007F:D432 0100007F:1F90 06 00000000:00000000 03:00000F5E 00000000     0        0 0 3 0000000000000000',
      '',
    ].join('\n');
    expect([...parseNetInet(tcp, 'inet', 'stream')]).toEqual([
      ['5001', { family: 'inet', type: 'stream', state: 'listen', local: '127.0.0.1:8080' }],
      ['5002', { family: 'inet', type: 'stream', state: 'connected', local: '192.168.1.2:54321', remote: '192.168.1.1:443' }],
    ]);
    const tcp6 = [
      '  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6001 1 0000000000000000 100 0 0 10 0',
      '   1: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6002 2 0000000000000000 0',
      '   2: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 6003 2 0000000000000000 0',
      '',
    ].join('\n');
    expect([...parseNetInet(tcp6, 'inet6', 'dgram')]).toEqual([
      ['6001', { family: 'inet6', type: 'dgram', state: 'listen', local: '[::1]:8080' }],
      ['6002', { family: 'inet6', type: 'dgram', state: 'unconnected', local: '[::ffff:7f00:1]:53' }],
      ['6003', { family: 'inet6', type: 'dgram', state: 'connected', local: '[2001:db8::1]:22', remote: '[2001:db8::2]:50000' }],
    ]);
  });

  it('mm fields by man 5 proc numbering, whatever the comm holds', () => {
    // Field n holds n; comm (field 2) has spaces and parentheses.
    const fields = Array.from({ length: 52 }, (_, i) => String(i + 1));
    fields[1] = '(a) b (c)';
    expect(parseMmFields(`${fields.join(' ')}\n`)).toEqual({
      startCode: '26',
      endCode: '27',
      startStack: '28',
      startData: '45',
      endData: '46',
      startBrk: '47',
      argStart: '48',
      argEnd: '49',
      envStart: '50',
      envEnd: '51',
    });
  });

  it('limits: every line, "unlimited" as null, values beyond 2^53 exact', () => {
    const text = [
      'Limit                     Soft Limit           Hard Limit           Units     ',
      'Max cpu time              unlimited            unlimited            seconds   ',
      'Max open files            512                  18446744073709551614 files     ',
      'Max nice priority         0                    0                    ',
      '',
    ].join('\n');
    expect(parseLimits(text)).toEqual([
      { name: 'Max cpu time', soft: null, hard: null, units: 'seconds' },
      { name: 'Max open files', soft: '512', hard: '18446744073709551614', units: 'files' },
      { name: 'Max nice priority', soft: '0', hard: '0', units: '' },
    ]);
  });
});
