// Types of the agent socket's native exports (core/native/agent_socket.c); the
// wire format is snapshot-format/FORMAT.md, "The agent protocol". NativeBinding (binding.d.ts)
// extends AgentSocketBinding. Each throws an Error with `code` (errno name),
// `errno` and `syscall` on failure; ETIMEDOUT when a deadline passed.

/** One accepted connection and its peer as SO_PEERCRED recorded it at connect(2). */
export interface AgentConnection {
  fd: number;
  pid: number;
  uid: number;
  gid: number;
}

export interface AgentMessage {
  op: number;
  payload: Buffer;
  /** The fd passed with it (SCM_RIGHTS, close-on-exec), -1 when none: the receiver owns it. */
  fd: number;
}

/** The protocol's constants, from agent/wpsnap_agent.h (their one source). */
export interface AgentProtocol {
  magic: number;
  version: number;
  headerBytes: number;
  maxPayload: number;
  regsBytes: number;
  fpregsBytes: number;
  /** HELLO's flag: the agent is linked in (not preloaded). */
  helloLinked: number;
  ops: { hello: number; freeze: number; frozen: number; thaw: number; done: number; error: number };
}

export interface AgentSocketBinding {
  /**
   * socket(AF_UNIX) + bind + chmod 0600 + listen: the listening fd (non-blocking,
   * close-on-exec). The directory is created 0700 when missing and must be owned by
   * this euid with no group/other bits (EACCES otherwise); a dead server's socket
   * is replaced, a live one's refused (EADDRINUSE).
   */
  agentListen(path: string): number;
  /** poll + accept4 + getsockopt(SO_PEERCRED): a connection, or null when none came within timeoutMs. */
  agentAccept(listenFd: number, timeoutMs: number): AgentConnection | null;
  /** One message (header + payload) within timeoutMs. */
  agentSend(fd: number, op: number, payload: Buffer, timeoutMs: number): void;
  /** One message within timeoutMs (recvmsg, MSG_CMSG_CLOEXEC); ECONNRESET when the agent closed the connection. */
  agentReceive(fd: number, timeoutMs: number): AgentMessage;
  readonly agentProtocol: AgentProtocol;
}
