// What a restore (core/restore.ts) will do, decided before anything starts:
// every check that can refuse it (an incomplete snapshot, a changed
// executable or file, a mapping or an fd that cannot be made again, a port
// in use), each fd's fate, and the plan the restorer process
// (core/native/restorer_main.c) follows to re-create the fds. `restore
// --dry-run` prints this and stops.
import { readFileSync, statSync } from 'node:fs';
import { WpsnapError } from '../common/errors.js';
import { fileUnchanged } from '../snapshot-format/export-raw.js';
import { formatAddress, type FdRecord, type ProcessRecord, type ProcessState, type RegionRecord, type ThreadRecord } from '../snapshot-format/model.js';
import type { Store } from '../store/store.js';

export type StdioChoice = 'inherit' | 'null' | { file: string };

export interface RestoreOptions {
  /** Restore without a new PID namespace: the process gets new ids (what uses its pid or tids may break). */
  newIds?: boolean;
  /** Fds not to re-create (closed in the restored process). */
  skipFds?: number[];
  /** Close the fds that cannot be restored instead of refusing. */
  closeUnsupported?: boolean;
  /** What the process's stdio (fds that were pipes, sockets or terminals shared with other processes) becomes; default null. */
  stdio?: StdioChoice;
  /** Fill anonymous memory on first touch (userfaultfd), not before the process runs. */
  lazy?: boolean;
}

export interface FdFate {
  fd: number;
  /** The kind at T ('pipe', 'socket', 'file'…). */
  kind: string;
  restored: boolean;
  note: string;
}

export interface RestorePlan {
  snapshotId: number;
  processId: number;
  process: ProcessRecord;
  state: ProcessState;
  regions: RegionRecord[];
  threads: ThreadRecord[];
  fds: FdFate[];
  /** The restorer's plan lines (without "ns" and "go"). */
  lines: string[];
  /** Why the restore cannot go ahead, each naming its object; empty when it can. */
  refusals: string[];
  warnings: string[];
}

const O_ACCMODE = 3;
const O_WRONLY = 1;
const AF = { unix: 1, inet: 2, inet6: 10 } as const;
const SOCK = { stream: 1, dgram: 2, seqpacket: 5 } as const;
/** The restorer's socket option bits: SO_REUSEADDR. */
const OPT_REUSEADDR = 1;
const OPT_REUSEPORT = 2;
/** IPV6_V6ONLY. */
const OPT_V6ONLY = 4;
const OPT_KEEPALIVE = 8;
/** TCP_NODELAY (accepted connections inherit it from their listener). */
const OPT_NODELAY = 16;

const hex = (s: string | Buffer): string => (typeof s === 'string' ? Buffer.from(s) : s).toString('hex');

/** Regions the kernel makes itself: moved into place, never mapped. */
export const SPECIAL_REGIONS = new Set(['[vdso]', '[vvar]', '[vvar_vclock]', '[vsyscall]']);

/** Ports listening now in this network namespace ("tcp 6379", "tcp6 8080"). */
function listeningNow(): Set<string> {
  const inUse = new Set<string>();
  for (const name of ['tcp', 'tcp6'] as const) {
    let text = '';
    try {
      text = readFileSync(`/proc/net/${name}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length > 3 && cols[3] === '0A') inUse.add(`${name === 'tcp' ? 'inet' : 'inet6'} ${parseInt(cols[1]!.split(':')[1]!, 16)}`);
    }
  }
  return inUse;
}

function sameFile(path: string, dev: number, ino: number): boolean {
  try {
    const st = statSync(path, { bigint: true });
    return st.dev === BigInt(dev) && st.ino === BigInt(ino);
  } catch {
    return false;
  }
}

/** Why a region cannot be mapped again, or undefined when it can. */
function regionRefusal(r: RegionRecord): string | undefined {
  const where = `mapping ${formatAddress(r.start)}-${formatAddress(r.end)} ${r.path || '(anonymous)'}`;
  if (SPECIAL_REGIONS.has(r.path)) return undefined;
  if (r.capture === 'skipped') return `${where}: not captured (${r.skipReason ?? 'skipped'})`;
  if (r.pageSize !== 4096) return `${where}: hugetlb pages are not restored yet`;
  if (r.path.startsWith('/SYSV')) return `${where}: a System V shared memory segment is not restored`;
  if (r.path.startsWith('/memfd:')) return undefined; // through the fd the process holds, or a memfd made for it
  if (r.capture === 'file-private' || r.capture === 'file-reference') {
    if (!fileUnchanged(r)) return `${where}: ${r.file?.path ?? r.path} changed since T (device, inode, size or mtime)`;
    return undefined;
  }
  if (r.perms[3] === 's' && r.path !== '' && !r.path.startsWith('/dev/zero')) {
    if (r.path.endsWith(' (deleted)')) return `${where}: a deleted shared file`;
    return r.perms[1] === 'w' ? `${where}: a writable shared file mapping (its content at T is not known)` : undefined;
  }
  return undefined;
}

/** Each fd's fate and its restorer line. */
function planFds(state: ProcessState, pid: number, options: RestoreOptions): { fds: FdFate[]; lines: string[]; refusals: string[]; warnings: string[] } {
  const fds: FdFate[] = [];
  const lines: string[] = [];
  const refusals: string[] = [];
  const warnings: string[] = [];
  const skip = new Set(options.skipFds ?? []);
  const inUse = listeningNow();
  const byIno = new Map<number, FdRecord[]>();
  for (const f of state.fds) if (f.kind === 'pipe') byIno.set(f.ino, [...(byIno.get(f.ino) ?? []), f]);
  const made = new Set<number>();
  const unsupported = (f: FdRecord, why: string): void => {
    if (options.closeUnsupported === true) {
      fds.push({ fd: f.fd, kind: f.kind, restored: false, note: `closed (--close-unsupported): ${why}` });
    } else {
      refusals.push(`fd ${f.fd} (${f.kind} ${f.target}): ${why} (--skip-fd ${f.fd} or --close-unsupported to restore without it)`);
      fds.push({ fd: f.fd, kind: f.kind, restored: false, note: why });
    }
  };
  const done = (f: FdRecord, line: string, note: string): void => {
    lines.push(line);
    made.add(f.fd);
    fds.push({ fd: f.fd, kind: f.kind, restored: true, note });
  };
  /** An fd shared with another process: what --stdio gives, by its direction. */
  const toStdio = (f: FdRecord, what: string): void => {
    const writes = (f.flags & O_ACCMODE) === O_WRONLY || f.fd === 1 || f.fd === 2;
    const which = f.fd <= 2 ? f.fd : writes ? 1 : 0;
    done(f, `stdio ${f.fd} ${which} ${f.flags}`, `${what}: connected to --stdio ${options.stdio === undefined || options.stdio === 'null' ? 'null' : options.stdio === 'inherit' ? 'inherit' : 'file'}`);
  };
  const pipesDone = new Set<number>();
  const ownProc = new RegExp(`^/proc/${pid}(?=/|$)`);
  for (const f of state.fds) {
    if (skip.has(f.fd)) {
      fds.push({ fd: f.fd, kind: f.kind, restored: false, note: 'closed (--skip-fd)' });
      continue;
    }
    switch (f.kind) {
      case 'file':
      case 'directory':
      case 'device': {
        if (f.target.endsWith(' (deleted)') || !f.target.startsWith('/')) {
          unsupported(f, 'its file was deleted');
        } else if (f.kind === 'device' && f.fd <= 2 && /^\/dev\/(pts\/|tty)/.test(f.target)) {
          toStdio(f, 'a terminal');
        } else if (ownProc.test(f.target)) {
          // Its own /proc files (/proc/PID/status…): the same files of the restored process, which is PID in its namespace.
          const path = f.target.replace(ownProc, '/proc/self');
          done(f, `file ${f.fd} ${f.flags} ${f.pos} 0 0 ${hex(path)}`, `${f.target}: its own, opened again as ${path} at offset ${f.pos}`);
        } else if (!sameFile(f.target, f.dev, f.ino)) {
          unsupported(f, `${f.target} is not the file it was at T (gone, or another device or inode)`);
        } else {
          done(f, `file ${f.fd} ${f.flags} ${f.pos} ${f.dev} ${f.ino} ${hex(f.target)}`, `${f.target} at offset ${f.pos}`);
        }
        break;
      }
      case 'pipe': {
        if (pipesDone.has(f.ino)) break;
        const ends = byIno.get(f.ino) ?? [f];
        const reader = ends.find((e) => (e.flags & O_ACCMODE) !== O_WRONLY && !skip.has(e.fd));
        const writer = ends.find((e) => (e.flags & O_ACCMODE) === O_WRONLY && !skip.has(e.fd));
        if (reader && writer) {
          pipesDone.add(f.ino);
          const bytes = reader.pipeBytes;
          lines.push(`pipe ${reader.fd} ${writer.fd} ${reader.flags} ${writer.flags} ${bytes === undefined || bytes === '' ? '-' : bytes}`);
          made.add(reader.fd).add(writer.fd);
          const held = bytes === undefined ? 'the bytes it held are not recorded (snapshot before pipe contents were)' : `${bytes.length / 2} bytes held`;
          for (const e of [reader, writer]) fds.push({ fd: e.fd, kind: 'pipe', restored: true, note: `a pipe within the process (fds ${reader.fd}, ${writer.fd}), re-created; ${held}` });
          for (const e of ends) if (e !== reader && e !== writer && !skip.has(e.fd)) done(e, `dup ${e.fd} ${(e.flags & O_ACCMODE) === O_WRONLY ? writer.fd : reader.fd} ${e.flags}`, `the same pipe as fd ${(e.flags & O_ACCMODE) === O_WRONLY ? writer.fd : reader.fd}`);
        } else {
          toStdio(f, 'a pipe to another process');
        }
        break;
      }
      case 'socket': {
        const s = f.socket;
        if (s === undefined) {
          unsupported(f, 'a socket of a family wpsnap does not restore (netlink, packet…)');
        } else if (s.state === 'listen' || (s.type === 'dgram' && s.state === 'unconnected') || (s.family === 'unix' && s.state === 'unconnected' && s.local !== '')) {
          const port = s.family === 'unix' ? undefined : Number(s.local.slice(s.local.lastIndexOf(':') + 1));
          if (s.state === 'listen' && port !== undefined && inUse.has(`${s.family} ${port}`)) {
            unsupported(f, `${s.local} is in use now (the original still runs?)`);
          } else {
            // Two wildcard sockets on one port, inet and inet6: the inet6 one was IPV6_V6ONLY, or the kernel would have refused the pair.
            const v6only = s.family === 'inet6' && state.fds.some((o) => o.socket?.family === 'inet' && o.socket.type === s.type && o.socket.local.endsWith(`:${port}`));
            // As recorded; for a snapshot from before wpsnap read them, SO_REUSEADDR (what servers set) and the inference above.
            const o = s.options;
            const options =
              o !== undefined
                ? (o.reuseAddr ? OPT_REUSEADDR : 0) | (o.reusePort ? OPT_REUSEPORT : 0) | (o.v6Only === true ? OPT_V6ONLY : 0) | (o.keepAlive ? OPT_KEEPALIVE : 0) | (o.noDelay === true ? OPT_NODELAY : 0)
                : (s.family === 'unix' ? 0 : OPT_REUSEADDR) | (v6only ? OPT_V6ONLY : 0);
            done(f, `socket ${f.fd} ${f.flags} ${AF[s.family]} ${SOCK[s.type]} ${s.state === 'listen' ? 1 : 0} ${hex(s.local)} ${options}`, `${s.family} ${s.type} ${s.state === 'listen' ? 'listening on' : 'bound to'} ${s.local || '(unbound)'}`);
          }
        } else if (f.fd <= 2) {
          toStdio(f, `a ${s.family} socket to another process`);
        } else if (s.state === 'connected' || s.family === 'unix') {
          done(f, `reset ${f.fd} ${f.flags}`, `a connected ${s.family} socket${s.remote ? ` to ${s.remote}` : ''}: its peer is gone, replaced by a socket that reports the connection reset`);
        } else {
          unsupported(f, `a ${s.family} socket in state ${s.state}`);
        }
        break;
      }
      case 'eventfd':
        if (f.eventfd === undefined) unsupported(f, 'its count was not recorded');
        else done(f, `eventfd ${f.fd} ${f.eventfd.count} ${f.flags} ${f.eventfd.semaphore === true ? 1 : 0}`, `count ${f.eventfd.count}`);
        break;
      case 'timerfd': {
        const t = f.timerfd;
        if (t === undefined) unsupported(f, 'its timer was not recorded');
        else done(f, `timerfd ${f.fd} ${f.flags} ${t.clockid} ${t.value.sec} ${t.value.nsec} ${t.interval.sec} ${t.interval.nsec} ${t.ticks}`, `clock ${t.clockid}, ${t.value.sec}.${String(t.value.nsec).padStart(9, '0')} s left at T`);
        break;
      }
      case 'signalfd':
        if (f.signalfd === undefined) unsupported(f, 'its mask was not recorded');
        else done(f, `signalfd ${f.fd} ${f.flags} ${f.signalfd.sigmask}`, `mask ${f.signalfd.sigmask}`);
        break;
      case 'epoll':
        done(f, `epoll ${f.fd} ${f.flags}`, `${f.epoll?.length ?? 0} fds registered`);
        break;
      case 'memfd':
        done(f, `memfd ${f.fd} ${f.flags} ${f.size ?? 0} ${hex(f.target.replace(/^\/memfd:/, '').replace(/ \(deleted\)$/, ''))}`, `a memfd of ${f.size ?? 0} bytes: its pages mapped at T are restored, the others are zero`);
        break;
      default:
        unsupported(f, `an fd of kind ${f.kind} (${f.target}) is not restored`);
    }
  }
  // Registrations last, on fds that exist.
  for (const f of state.fds) {
    if (f.kind !== 'epoll' || !made.has(f.fd)) continue;
    for (const e of f.epoll ?? []) {
      if (made.has(e.fd)) lines.push(`epollctl ${f.fd} ${e.fd} ${e.events} ${e.data}`);
      else warnings.push(`epoll fd ${f.fd}: fd ${e.fd} it watched is not restored, nor its registration`);
    }
  }
  fds.sort((a, b) => a.fd - b.fd);
  return { fds, lines, refusals, warnings };
}

/** Every check, and the plan; refusals are collected, not thrown (--dry-run lists them all). */
export function planRestore(store: Store, ref: string, options: RestoreOptions = {}): RestorePlan {
  const snap = store.find(ref);
  if (snap.state !== 'complete') throw new WpsnapError('RESTORE_REFUSED', `snapshot ${snap.id} is ${snap.state}: only a complete snapshot can be restored`);
  const processes = store.processes(snap.id);
  if (processes.length !== 1) throw new WpsnapError('RESTORE_REFUSED', `snapshot ${snap.id} holds ${processes.length} processes: restore takes a snapshot of one`);
  const proc = processes[0]!;
  const state = store.processState(proc.processId);
  if (state === undefined) {
    throw new WpsnapError('RESTORE_REFUSED', `snapshot ${snap.id} does not record the process state (fds, cwd, limits): it was taken by a wpsnap before restore existed and cannot be restored`);
  }
  const refusals: string[] = [];
  const warnings: string[] = [];
  const lost = store.lost(proc.processId);
  if (lost.length > 0) refusals.push(`snapshot ${snap.id} lost ${lost.reduce((n, l) => n + l.pages, 0)} pages at T (wpsnap show ${snap.id}): it is incomplete`);
  const exe = state.exe;
  if (exe === null) {
    refusals.push('the executable was not recorded');
  } else {
    try {
      const st = statSync(exe.path, { bigint: true });
      if (st.dev !== BigInt(exe.dev) || st.ino !== BigInt(exe.ino) || st.size !== BigInt(exe.size) || st.mtimeNs.toString() !== exe.mtimeNs) {
        refusals.push(`the executable ${exe.path} changed since T (device, inode, size or mtime)`);
      }
    } catch {
      refusals.push(`the executable ${exe.path} is gone`);
    }
  }
  const regions = store.regions(proc.processId);
  for (const r of regions) {
    const why = regionRefusal(r);
    if (why !== undefined) refusals.push(why);
  }
  const threads = store.threads(proc.processId);
  const fdPlan = planFds(state, proc.pid, options);
  refusals.push(...fdPlan.refusals);
  warnings.push(...fdPlan.warnings);
  const lines = [...fdPlan.lines];
  lines.push(`cwd ${hex(state.cwd)}`, `root ${hex(state.root)}`, `umask ${state.umask}`, `personality ${state.personality}`);
  for (const [resource, limit] of state.rlimits.entries()) lines.push(`rlimit ${resource} ${limit.soft ?? 'inf'} ${limit.hard ?? 'inf'}`);
  if (options.newIds === true) warnings.push(`restored with new ids (--new-ids): the process is not pid ${proc.pid} any more; what it kept of its pid or tids (lock files, /proc paths, tgkill) may break`);
  if (process.getuid?.() !== 0) refusals.unshift('restore needs root (a new PID namespace, PR_SET_MM and the process\'s credentials)');
  return { snapshotId: snap.id, processId: proc.processId, process: proc, state, regions, threads, fds: fdPlan.fds, lines, refusals, warnings };
}

/** planRestore, and its first refusal thrown (RESTORE_REFUSED) when there is one. */
export function restorablePlan(store: Store, ref: string, options: RestoreOptions): RestorePlan {
  const plan = planRestore(store, ref, options);
  if (plan.refusals.length > 0) {
    const more = plan.refusals.length > 1 ? ` (and ${plan.refusals.length - 1} more: wpsnap restore --dry-run)` : '';
    throw new WpsnapError('RESTORE_REFUSED', `snapshot ${plan.snapshotId} cannot be restored: ${plan.refusals[0]}${more}`);
  }
  return plan;
}
