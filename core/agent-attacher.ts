// The attach through a cooperative agent (agent/wpsnap_agent.c): FREEZE over
// its socket holds every thread in the agent's signal handler and brings back
// their registers and a userfaultfd the agent made (and no longer holds); THAW
// lets them go. No ptrace, no injected call. The wire format is
// snapshot-format/FORMAT.md, "The agent protocol".
import { readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { WpsnapError, fromNative, type ErrorCode } from '../common/errors.js';
import type { Attacher, StoppedTarget, StoppedThread } from './attacher.js';
import type { AgentMessage } from './native/agent-binding.js';
import type { NativeBinding } from './native/binding.js';

/** How long the agent waits for its threads to reach the barrier (it answers ERROR after that). */
export const AGENT_FREEZE_TIMEOUT_MS = 2_000;
/** Beyond the agent's own wait, how long its answer may take before the stop fails. */
const ANSWER_MARGIN_MS = 1_000;
const SEND_TIMEOUT_MS = 1_000;

export interface AgentHello {
  pid: number;
  comm: string;
  linked: boolean;
}

/** The HELLO an agent opens its connection with; throws on anything else. */
export function parseHello(binding: NativeBinding, message: AgentMessage): AgentHello {
  if (message.fd >= 0) binding.closeFd(message.fd);
  const p = binding.agentProtocol;
  if (message.op !== p.ops.hello || message.payload.length < 24) throw new Error(`expected HELLO, got op ${message.op} of ${message.payload.length} bytes`);
  const comm = message.payload.subarray(8, 24);
  const end = comm.indexOf(0);
  return {
    pid: message.payload.readUInt32LE(0),
    linked: (message.payload.readUInt32LE(4) & p.helloLinked) !== 0,
    comm: comm.subarray(0, end < 0 ? comm.length : end).toString('utf8'),
  };
}

/** FROZEN's thread records (layout in FORMAT.md, "The agent protocol"); throws if they do not add up. */
export function parseFrozen(binding: NativeBinding, payload: Buffer): StoppedThread[] {
  const { regsBytes, fpregsBytes } = binding.agentProtocol;
  const bad = (why: string): never => {
    throw new WpsnapError('EPROTO', `the agent's FROZEN message is malformed: ${why}`);
  };
  if (payload.length < 8) bad('shorter than its head');
  const count = payload.readUInt32LE(0);
  const threads: StoppedThread[] = [];
  let at = 8;
  for (let i = 0; i < count; i++) {
    if (at + 16 + regsBytes + fpregsBytes > payload.length) bad(`thread ${i} of ${count} runs past the end`);
    const tid = payload.readUInt32LE(at);
    const xstateLen = payload.readUInt32LE(at + 4);
    const sigmask = payload.readBigUInt64LE(at + 8);
    at += 16;
    const regs = Buffer.from(payload.subarray(at, at + regsBytes));
    at += regsBytes;
    const fpregs = Buffer.from(payload.subarray(at, at + fpregsBytes));
    at += fpregsBytes;
    if (at + xstateLen > payload.length) bad(`thread ${tid}'s XSAVE area runs past the end`);
    const xstate = Buffer.from(payload.subarray(at, at + xstateLen));
    at += (xstateLen + 7) & ~7;
    threads.push({ tid, regs, fpregs, xstate, sigmask });
  }
  if (at !== payload.length) bad(`${payload.length - at} bytes after the last thread`);
  if (threads.length === 0) bad('no thread');
  return threads;
}

/** An ERROR's errno name and message. */
function describeError(payload: Buffer): { code: ErrorCode; text: string } {
  const errno = payload.length >= 4 ? payload.readInt32LE(0) : 0;
  const name = Object.entries(constants.errno).find(([, value]) => value === errno)?.[0];
  return { code: name === undefined ? `UNKNOWN_ERRNO_${errno}` : (name as ErrorCode), text: payload.subarray(8).toString('utf8') };
}

/** Whether pid has exited (no /proc entry, or a zombie). */
function processGone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state === 'Z' || state === 'X';
  } catch {
    return true;
  }
}

/** The connection an attacher speaks on; abort() closes it, which makes the agent let its threads go. */
export interface AgentConnectionHandle {
  fd: number;
  abort(): void;
}

/**
 * The attacher of the agent on a connection (the server's, which stays open:
 * AgentMember.close() ends it). stop() is synchronous like the pause, every wait
 * bounded: an agent that does not answer fails the stop (and its connection is
 * closed, which makes the agent let its threads go), it never hangs wpsnap.
 */
export function agentAttacher(
  connection: AgentConnectionHandle,
  options: { freezeTimeoutMs?: number } = {},
): (binding: NativeBinding, pid: number, pidfd: number) => Attacher {
  const { fd } = connection;
  const freezeTimeoutMs = options.freezeTimeoutMs ?? AGENT_FREEZE_TIMEOUT_MS;
  return (binding, pid) => {
    const ops = binding.agentProtocol.ops;
    let broken: string | null = null;
    const fail = (error: unknown, step: string): never => {
      // The conversation is out of step: no later message could be trusted. Closing it releases the threads.
      broken = step;
      connection.abort();
      // A connection that ended with its process is a target gone (ESRCH), as a ptrace attach would say.
      if (processGone(pid)) throw new WpsnapError('ESRCH', `agent of pid ${pid}: ${step}: the process has exited`, { cause: error });
      throw fromNative(error, `agent of pid ${pid}: ${step}`);
    };
    return {
      prepare(): void {},
      rearm(): void {},
      release(): void {},
      stop(): StoppedTarget {
        if (broken !== null) throw new WpsnapError('EPIPE', `agent of pid ${pid}: its connection failed earlier (${broken})`);
        const request = Buffer.alloc(8);
        request.writeUInt32LE(freezeTimeoutMs, 0);
        let reply: AgentMessage;
        try {
          binding.agentSend(fd, ops.freeze, request, SEND_TIMEOUT_MS);
          reply = binding.agentReceive(fd, freezeTimeoutMs + ANSWER_MARGIN_MS);
        } catch (error) {
          return fail(error, 'FREEZE');
        }
        if (reply.op === ops.error) {
          if (reply.fd >= 0) binding.closeFd(reply.fd);
          const { code, text } = describeError(reply.payload);
          throw new WpsnapError(code, `agent of pid ${pid} could not stop its threads: ${text} (${code}); they run on`);
        }
        let threads: StoppedThread[];
        try {
          if (reply.op !== ops.frozen) throw new WpsnapError('EPROTO', `expected FROZEN, got op ${reply.op}`);
          if (reply.fd < 0) throw new WpsnapError('EPROTO', 'FROZEN came without its userfaultfd');
          threads = parseFrozen(binding, reply.payload);
        } catch (error) {
          if (reply.fd >= 0) binding.closeFd(reply.fd);
          broken = 'FROZEN';
          // The threads are held until THAW or the connection's end: end it.
          connection.abort();
          throw error instanceof WpsnapError ? new WpsnapError(error.code, `agent of pid ${pid}: ${error.message}`) : error;
        }
        let uffd = reply.fd;
        let taken = false;
        let resumed = false;
        return {
          threads,
          obtainUffd: () => {
            taken = true;
            return { fd: uffd, method: 'agent' };
          },
          resume: () => {
            if (resumed) return;
            resumed = true;
            // A fd not taken is ours to close: only the controller may hold the context.
            if (!taken && uffd >= 0) binding.closeFd(uffd);
            uffd = -1;
            // No answer is awaited: the agent's own thread may be write-protected until the engine runs, after this.
            try {
              binding.agentSend(fd, ops.thaw, Buffer.alloc(0), SEND_TIMEOUT_MS);
            } catch (error) {
              fail(error, 'THAW');
            }
          },
        };
      },
    };
  };
}
