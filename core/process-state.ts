// The process state a restore will need (issue 13), read from /proc: every
// fd with its kind, offset and flags and, for the special ones, what fdinfo
// and the target's /proc/PID/net tables say (epoll registrations, eventfd
// counts, timers, signalfd masks, sockets); cwd, root, umask, credentials,
// personality, rlimits, the mm fields, the executable's identity.
import { readFileSync, readdirSync, readlinkSync, statSync, type BigIntStats } from 'node:fs';
import { endianness } from 'node:os';
import { formatSigmask } from '../snapshot-format/model.js';
import type { FdKind, FdRecord, MmFields, ProcessState, RlimitRecord, SocketState, Timespec } from '../snapshot-format/model.js';
import { WpsnapError, externalCode } from '../common/errors.js';
import { readProc } from './procfs.js';

/** Errors of a /proc/PID/fd/N read that mean the fd closed meanwhile. */
const FD_GONE = new Set(['ENOENT', 'ESRCH', 'EBADF']);

function fdGone(error: unknown): boolean {
  return FD_GONE.has((error as NodeJS.ErrnoException).code ?? '');
}

/** The kind of an fd from its link text and the stat through it. */
export function fdKind(target: string, mode: number): FdKind {
  const type = mode & 0o170000;
  if (target.startsWith('pipe:') || type === 0o010000) return 'pipe';
  if (target.startsWith('socket:') || type === 0o140000) return 'socket';
  if (target.startsWith('anon_inode:')) {
    const name = target.slice('anon_inode:'.length).replace(/^\[(.*)\]$/, '$1');
    if (name === 'eventfd') return 'eventfd';
    if (name === 'timerfd') return 'timerfd';
    if (name === 'signalfd') return 'signalfd';
    if (name === 'eventpoll') return 'epoll';
    return 'anon';
  }
  if (target.startsWith('/memfd:')) return 'memfd';
  if (type === 0o040000) return 'directory';
  if (type === 0o100000) return 'file';
  if (type === 0o020000 || type === 0o060000) return 'device';
  return 'other';
}

type FdDetails = Pick<FdRecord, 'epoll' | 'eventfd' | 'timerfd' | 'signalfd'>;

/**
 * The details of an epoll, eventfd, timerfd or signalfd from its fdinfo text
 * (fs/eventpoll.c, fs/eventfd.c, fs/timerfd.c, fs/signalfd.c); {} for other
 * kinds, and a detail whose lines are missing is left out.
 */
export function parseFdDetails(kind: FdKind, info: string): FdDetails {
  const field = (key: string, value = '[0-9a-f]+'): string | undefined => new RegExp(`^${key}:\\s*(${value})`, 'm').exec(info)?.[1];
  const hex = (v: string): bigint => BigInt(`0x${v}`);
  switch (kind) {
    case 'epoll': {
      const lines = info.matchAll(/^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)/gm);
      return { epoll: [...lines].map((m) => ({ fd: Number(m[1]), events: parseInt(m[2]!, 16), data: hex(m[3]!).toString() })) };
    }
    case 'eventfd': {
      const count = field('eventfd-count');
      const semaphore = field('eventfd-semaphore', '[01]');
      return count === undefined ? {} : { eventfd: { count: hex(count).toString(), ...(semaphore === undefined ? {} : { semaphore: semaphore === '1' }) } };
    }
    case 'signalfd': {
      const mask = field('sigmask');
      return mask === undefined ? {} : { signalfd: { sigmask: formatSigmask(hex(mask))! } };
    }
    case 'timerfd': {
      const pair = (key: string): Timespec | undefined => {
        const m = new RegExp(`^${key}:\\s*\\((-?\\d+),\\s*(-?\\d+)\\)`, 'm').exec(info);
        return m ? { sec: Number(m[1]), nsec: Number(m[2]) } : undefined;
      };
      const [clockid, ticks, flags, value, interval] = [field('clockid', '\\d+'), field('ticks', '\\d+'), field('settime flags', '[0-7]+'), pair('it_value'), pair('it_interval')];
      if (clockid === undefined || ticks === undefined || flags === undefined || !value || !interval) return {};
      return { timerfd: { clockid: Number(clockid), ticks: BigInt(ticks).toString(), settimeFlags: parseInt(flags, 8), value, interval } };
    }
    default:
      return {};
  }
}

const UNIX_TYPES: Record<number, SocketState['type']> = { 1: 'stream', 2: 'dgram', 5: 'seqpacket' };
/** socket_state of include/uapi/linux/net.h, by the St column of /proc/net/unix. */
const UNIX_STATES = ['free', 'unconnected', 'connecting', 'connected', 'disconnecting'];
/** __SO_ACCEPTCON in the Flags column of /proc/net/unix: a listening socket. */
const SO_ACCEPTCON = 0x10000;
/** TCP states (include/net/tcp_states.h) by the st column of /proc/net/{tcp,udp}[6]; UDP uses ESTABLISHED and CLOSE. */
const INET_STATES = ['', 'connected', 'syn_sent', 'syn_recv', 'fin_wait1', 'fin_wait2', 'time_wait', 'unconnected', 'close_wait', 'last_ack', 'listen', 'closing', 'new_syn_recv'];

/** The sockets of a /proc/PID/net/unix text, by inode (decimal string). */
export function parseNetUnix(text: string): Map<string, SocketState> {
  const sockets = new Map<string, SocketState>();
  for (const line of text.split('\n').slice(1)) {
    // "%pK: %08X %08X %08X %04X %02X %5lu" then " path" when bound (net/unix/af_unix.c).
    const m = /^\s*[0-9a-f]+:\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+(\d+)(?: (.*))?$/i.exec(line);
    const type = m ? UNIX_TYPES[parseInt(m[2]!, 16)] : undefined;
    if (!m || !type) continue;
    const st = parseInt(m[3]!, 16);
    const state = parseInt(m[1]!, 16) & SO_ACCEPTCON ? 'listen' : (UNIX_STATES[st] ?? `state_${st}`);
    sockets.set(m[4]!, { family: 'unix', type, state, local: m[5] ?? '' });
  }
  return sockets;
}

/** An address of /proc/net/{tcp,udp}[6]: 32-bit words printed as host-order hex, then ":" and the port in hex. */
function inetAddress(text: string): { address: string; port: number } {
  const [hexAddress = '', hexPort = '0'] = text.split(':');
  const bytes = Buffer.alloc(hexAddress.length / 2);
  for (let i = 0; i < bytes.length; i += 4) {
    const word = parseInt(hexAddress.slice(i * 2, i * 2 + 8), 16);
    if (endianness() === 'LE') bytes.writeUInt32LE(word, i);
    else bytes.writeUInt32BE(word, i);
  }
  const port = parseInt(hexPort, 16);
  if (bytes.length === 4) return { address: `${[...bytes].join('.')}:${port}`, port };
  const groups = Array.from({ length: 8 }, (_, i) => bytes.readUInt16BE(i * 2).toString(16));
  // The WHATWG URL parser writes an IPv6 host in its canonical compressed form, in brackets.
  return { address: `${new URL(`http://[${groups.join(':')}]/`).hostname}:${port}`, port };
}

/** The sockets of a /proc/PID/net/{tcp,tcp6,udp,udp6} text, by inode (decimal string). */
export function parseNetInet(text: string, family: 'inet' | 'inet6', type: 'stream' | 'dgram'): Map<string, SocketState> {
  const sockets = new Map<string, SocketState>();
  for (const line of text.split('\n').slice(1)) {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …
    const cols = line.trim().split(/\s+/);
    const inode = cols[9];
    if (cols.length < 10 || !/^[1-9]\d*$/.test(inode!)) continue;
    const st = parseInt(cols[3]!, 16);
    const local = inetAddress(cols[1]!);
    const remote = inetAddress(cols[2]!);
    sockets.set(inode!, {
      family,
      type,
      state: INET_STATES[st] || `state_${st}`,
      local: local.address,
      ...(remote.port !== 0 ? { remote: remote.address } : {}),
    });
  }
  return sockets;
}

/** A socket's state by inode, from the target's /proc/PID/net files, each read once, on the first lookup. */
type SocketLookup = (inode: string) => SocketState | undefined;

function socketLookup(pid: number): SocketLookup {
  let sockets: Map<string, SocketState> | undefined;
  return (inode) => {
    if (!sockets) {
      const read = (name: string): string => {
        try {
          return readFileSync(`/proc/${pid}/net/${name}`, 'utf8');
        } catch {
          return '';
        }
      };
      sockets = new Map([
        ...parseNetUnix(read('unix')),
        ...parseNetInet(read('tcp'), 'inet', 'stream'),
        ...parseNetInet(read('tcp6'), 'inet6', 'stream'),
        ...parseNetInet(read('udp'), 'inet', 'dgram'),
        ...parseNetInet(read('udp6'), 'inet6', 'dgram'),
      ]);
    }
    return sockets.get(inode);
  };
}

/** The details of an fd of this kind; {} when they cannot be read (they never fail the snapshot). */
function fdDetails(kind: FdKind, target: string, info: string, sockets: SocketLookup): FdDetails & Pick<FdRecord, 'socket'> {
  try {
    if (kind !== 'socket') return parseFdDetails(kind, info);
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    const socket = inode === undefined ? undefined : sockets(inode);
    return socket ? { socket } : {};
  } catch {
    return {};
  }
}

/** A field of /proc/PID/fdinfo/N ("pos:", "flags:", …): its first word, or undefined. */
function fdinfoField(info: string, key: string): string | undefined {
  return new RegExp(`^${key}:\\s*(\\S+)`, 'm').exec(info)?.[1];
}

/** One fd of /proc/PID/fd; undefined when it closed (or was replaced) while being read. */
function readFd(pid: number, fd: number, sockets: SocketLookup): FdRecord | undefined {
  // An fd closed and reopened between the reads shows another inode in fdinfo than in the stat: read again.
  for (let attempt = 0; attempt < 3; attempt++) {
    let target: string;
    let st: BigIntStats;
    let info: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      st = statSync(`/proc/${pid}/fd/${fd}`, { bigint: true });
      info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    } catch (error) {
      if (fdGone(error)) return undefined;
      throw new WpsnapError(externalCode((error as NodeJS.ErrnoException).code, 'EIO'), `read fd ${fd} of process ${pid}: ${(error as Error).message}`);
    }
    const field = (key: string): string | undefined => fdinfoField(info, key);
    const ino = field('ino');
    if (ino !== undefined && BigInt(ino) !== st.ino) continue;
    const mode = Number(st.mode);
    const kind = fdKind(target, mode);
    const regular = (mode & 0o170000) === 0o100000;
    return {
      fd,
      kind,
      target,
      pos: BigInt(field('pos') ?? '0').toString(),
      flags: parseInt(field('flags') ?? '0', 8),
      mntId: Number(field('mnt_id') ?? '0'),
      dev: Number(st.dev),
      ino: Number(st.ino),
      mode,
      ...(regular ? { size: Number(st.size), mtimeNs: st.mtimeNs.toString() } : {}),
      ...fdDetails(kind, target, info, sockets),
    };
  }
  return undefined;
}

/** Every line of /proc/PID/limits after the header ("%-25s %-20s %-20s %-10s" per line). */
export function parseLimits(text: string): RlimitRecord[] {
  const value = (v: string | undefined): string | null => (v === undefined || v === 'unlimited' ? null : BigInt(v).toString());
  return text
    .split('\n')
    .slice(1)
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [soft, hard, units] = line.slice(25).trim().split(/\s+/);
      return { name: line.slice(0, 25).trim(), soft: value(soft), hard: value(hard), units: units ?? '' };
    });
}

/** Fields 26-28 and 45-51 of /proc/PID/stat (man 5 proc numbering, pid is 1), as decimal strings. */
export function parseMmFields(stat: string): MmFields {
  // comm may contain spaces and parentheses: field 3 starts after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).trimEnd().split(' ');
  const at = (n: number): string => BigInt(fields[n - 3] ?? '0').toString();
  return {
    startCode: at(26),
    endCode: at(27),
    startStack: at(28),
    startData: at(45),
    endData: at(46),
    startBrk: at(47),
    argStart: at(48),
    argEnd: at(49),
    envStart: at(50),
    envEnd: at(51),
  };
}

/**
 * The process state a restore will need (ProcessState, issue 13), all from
 * /proc. Nothing here needs the target stopped: it is read before the pause,
 * which would otherwise grow by a readlink, a stat and an fdinfo read per fd.
 * What a running target can change between this read and T (an fd opened or
 * closed, a file offset, its umask or limits) is as it was just before T.
 */
export function readProcessState(pid: number): ProcessState {
  const status = readProc(pid, 'status').toString('utf8');
  const line = (key: string): string => new RegExp(`^${key}:[ \\t]*(.*)$`, 'm').exec(status)?.[1]?.trim() ?? '';
  const numbers = (key: string): number[] => line(key).split(/\s+/).filter((v) => v !== '').map(Number);
  const link = (name: string): string => {
    try {
      return readlinkSync(`/proc/${pid}/${name}`);
    } catch {
      return '';
    }
  };
  let entries: number[];
  try {
    entries = readdirSync(`/proc/${pid}/fd`).map(Number).sort((a, b) => a - b);
  } catch (error) {
    readProc(pid, 'stat'); // TARGET_NOT_FOUND when it is gone
    throw new WpsnapError(externalCode((error as NodeJS.ErrnoException).code, 'EIO'), `list /proc/${pid}/fd: ${(error as Error).message}`);
  }
  const sockets = socketLookup(pid);
  const fds = entries.flatMap((fd) => readFd(pid, fd, sockets) ?? []);
  let exe: ProcessState['exe'] = null;
  try {
    const st = statSync(`/proc/${pid}/exe`, { bigint: true });
    exe = { path: link('exe'), dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: st.mtimeNs.toString() };
  } catch {
    exe = null;
  }
  return {
    fds,
    cwd: link('cwd'),
    root: link('root'),
    umask: parseInt(line('Umask') || '0', 8),
    credentials: { uid: numbers('Uid'), gid: numbers('Gid'), groups: numbers('Groups') },
    personality: parseInt(readProc(pid, 'personality').toString('utf8').trim(), 16),
    rlimits: parseLimits(readProc(pid, 'limits').toString('utf8')),
    mm: parseMmFields(readProc(pid, 'stat').toString('utf8')),
    exe,
  };
}

/** Signals whose disposition is not the default (SigIgn | SigCgt of /proc/PID/status), ascending, and the two sets as read. */
export function nonDefaultSignalSets(pid: number): { sets: string; signals: number[] } {
  const status = readProc(pid, 'status').toString('utf8');
  const hex = (key: string): string => new RegExp(`^${key}:\\s*([0-9a-f]+)`, 'm').exec(status)?.[1] ?? '0';
  const set = BigInt(`0x${hex('SigIgn')}`) | BigInt(`0x${hex('SigCgt')}`);
  const signals: number[] = [];
  for (let s = 1; s <= 64; s++) if ((set >> BigInt(s - 1)) & 1n) signals.push(s);
  return { sets: `${hex('SigIgn')}/${hex('SigCgt')}`, signals };
}

/** The read end of every pipe both ends of which the process holds (a self-pipe): its bytes are read in the pause. */
export function selfPipeReadEnds(fds: FdRecord[]): number[] {
  const O_ACCMODE = 3;
  const O_WRONLY = 1;
  const ends = new Map<number, { read?: number; write?: number }>();
  for (const f of fds) {
    if (f.kind !== 'pipe') continue;
    const e = ends.get(f.ino) ?? {};
    if ((f.flags & O_ACCMODE) === O_WRONLY) e.write ??= f.fd;
    else e.read ??= f.fd;
    ends.set(f.ino, e);
  }
  return [...ends.values()].flatMap((e) => (e.read !== undefined && e.write !== undefined ? [e.read] : []));
}

/**
 * The fd table again, in the pause: the program opens and closes fds and
 * moves file offsets while it runs, so the list read before the pause is
 * brought to T. One readdir; an fd whose link text changed, or that is new,
 * is read whole; regular files and directories get their offset and flags
 * again (an fdinfo read each); the rest is kept from before.
 */
export function refreshFds(pid: number, before: FdRecord[]): FdRecord[] {
  let entries: number[];
  try {
    entries = readdirSync(`/proc/${pid}/fd`).map(Number).sort((a, b) => a - b);
  } catch {
    return before;
  }
  const known = new Map(before.map((f) => [f.fd, f]));
  const sockets = socketLookup(pid);
  const out: FdRecord[] = [];
  for (const fd of entries) {
    const old = known.get(fd);
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    if (old === undefined || old.target !== target) {
      const fresh = readFd(pid, fd, sockets);
      if (fresh !== undefined) out.push(fresh);
      continue;
    }
    if (old.kind === 'file' || old.kind === 'directory' || old.kind === 'device') {
      try {
        const info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
        const field = (key: string): string | undefined => fdinfoField(info, key);
        out.push({ ...old, pos: BigInt(field('pos') ?? old.pos).toString(), flags: parseInt(field('flags') ?? old.flags.toString(8), 8) });
      } catch {
        // closed meanwhile
      }
      continue;
    }
    out.push(old);
  }
  return out;
}

/**
 * The options of every socket a restore may re-create (bound or listening),
 * read through a copy of its fd (`socketOptions`, pidfd_getfd + getsockopt):
 * before the pause, as the rest of the state; one that cannot be read is left
 * without (a restore then sets what it can infer).
 */
export function withSocketOptions(fds: FdRecord[], options: (fd: number) => { reuseAddr: number; reusePort: number; keepAlive: number; v6Only?: number; noDelay?: number }): FdRecord[] {
  return fds.map((f) => {
    if (f.socket === undefined || f.socket.state === 'connected') return f;
    try {
      const o = options(f.fd);
      const flag = (v: number | undefined): boolean | undefined => (v === undefined || v < 0 ? undefined : v === 1);
      const read = { reuseAddr: o.reuseAddr === 1, reusePort: o.reusePort === 1, keepAlive: o.keepAlive === 1, ...(flag(o.v6Only) === undefined ? {} : { v6Only: flag(o.v6Only)! }), ...(flag(o.noDelay) === undefined ? {} : { noDelay: flag(o.noDelay)! }) };
      return { ...f, socket: { ...f.socket, options: read } };
    } catch {
      return f;
    }
  });
}
