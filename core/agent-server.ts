// The controller's side of the agent socket (snapshot-format/FORMAT.md, "The agent protocol"):
// listen, take agents as they connect (only this user's processes and root's),
// and hand each one out as a member a snapshot can stop through its attacher.
import { rmSync } from 'node:fs';
import { setTimeout as delay } from 'node:timers/promises';
import { WpsnapError, fromNative } from '../common/errors.js';
import { agentAttacher, parseHello, type AgentHello } from './agent-attacher.js';
import type { Attacher } from './attacher.js';
import type { NativeBinding } from './native/binding.js';

/** How long a connected agent may take to say HELLO. */
const HELLO_TIMEOUT_MS = 2_000;
/** How often waitForAgents looks for a new connection (it never blocks the event loop longer). */
const ACCEPT_POLL_MS = 20;

export interface AgentMember {
  pid: number;
  uid: number;
  /** Its comm, as its HELLO said. */
  comm: string;
  /** Linked in (wpsnap_agent_start), not preloaded. */
  linked: boolean;
  /** Stops the process through the agent (core/agent-attacher.ts). */
  attacher: (binding: NativeBinding, pid: number, pidfd: number) => Attacher;
  /** Tell the agent the session is over (DONE) and close the connection; idempotent. */
  close(): void;
}

export class AgentServer {
  private listenFd: number;
  private readonly joined = new Map<number, AgentMember>();

  private constructor(
    private readonly binding: NativeBinding,
    readonly path: string,
    listenFd: number,
  ) {
    this.listenFd = listenFd;
  }

  /** Listen at path: its directory private (created 0700 when missing), the socket 0600. */
  static listen(binding: NativeBinding, path: string): AgentServer {
    try {
      return new AgentServer(binding, path, binding.agentListen(path));
    } catch (error) {
      throw fromNative(error, `listen for agents at ${path}`);
    }
  }

  /**
   * Wait until n agents have joined (or the timeout passes: ETIMEDOUT, and the
   * ones that joined are let go). A peer whose uid is neither this process's
   * euid nor root's is refused: its connection is closed and onRefused gets a
   * line naming its pid and uid. onJoined is told of each agent that joins; an
   * abort of signal lets them go too (INTERRUPTED).
   */
  async waitForAgents(
    n: number,
    timeoutMs: number,
    onRefused?: (line: string) => void,
    options: { onJoined?: (member: AgentMember) => void; signal?: AbortSignal } = {},
  ): Promise<AgentMember[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.joined.size < n) {
      if (options.signal?.aborted === true) {
        this.releaseAll();
        throw new WpsnapError('INTERRUPTED', `interrupted while waiting for agents at ${this.path}`);
      }
      if (Date.now() >= deadline) {
        const got = this.joined.size;
        this.releaseAll();
        throw new WpsnapError('ETIMEDOUT', `${got} of ${n} agent${n === 1 ? '' : 's'} joined at ${this.path} within ${Math.round(timeoutMs / 1000)} s`);
      }
      let connection;
      try {
        connection = this.binding.agentAccept(this.listenFd, 0);
      } catch (error) {
        throw fromNative(error, `accept an agent at ${this.path}`);
      }
      if (connection === null) {
        await delay(ACCEPT_POLL_MS);
        continue;
      }
      const refusal = this.admit(connection.fd, connection.pid, connection.uid);
      if (refusal !== null) {
        this.binding.closeFd(connection.fd);
        onRefused?.(refusal);
      } else {
        options.onJoined?.(this.joined.get(connection.pid)!);
      }
    }
    return [...this.joined.values()];
  }

  /** Let every agent go (DONE), stop listening and remove the socket. */
  close(): void {
    this.releaseAll();
    if (this.listenFd >= 0) {
      this.binding.closeFd(this.listenFd);
      this.listenFd = -1;
      rmSync(this.path, { force: true });
    }
  }

  /** null when the agent joined; else why it was refused (its connection is the caller's to close). */
  private admit(fd: number, pid: number, uid: number): string | null {
    const euid = process.geteuid?.() ?? -1;
    // Its memory and threads are handed to us: only a process we could ptrace ourselves may join.
    if (uid !== euid && uid !== 0) return `refused an agent: pid ${pid} uid ${uid} (only uid ${euid} and root may join)`;
    let hello: AgentHello;
    try {
      hello = parseHello(this.binding, this.binding.agentReceive(fd, HELLO_TIMEOUT_MS));
    } catch (error) {
      return `refused an agent: pid ${pid} uid ${uid}: ${(error as Error).message}`;
    }
    if (hello.pid !== pid) return `refused an agent: pid ${pid} uid ${uid} said it was pid ${hello.pid}`;
    if (this.joined.has(pid)) return `refused an agent: pid ${pid} uid ${uid} joined already`;
    let open = true;
    const end = (sayDone: boolean): void => {
      if (!open) return;
      open = false;
      if (sayDone) {
        try {
          this.binding.agentSend(fd, this.binding.agentProtocol.ops.done, Buffer.alloc(0), 1_000);
        } catch {
          // gone already: its end of the connection is closed too
        }
      }
      this.binding.closeFd(fd);
      this.joined.delete(pid);
    };
    const member: AgentMember = {
      pid,
      uid,
      comm: hello.comm,
      linked: hello.linked,
      attacher: agentAttacher({ fd, abort: () => end(false) }),
      close: () => end(true),
    };
    this.joined.set(pid, member);
    return null;
  }

  private releaseAll(): void {
    for (const member of [...this.joined.values()]) member.close();
  }
}
