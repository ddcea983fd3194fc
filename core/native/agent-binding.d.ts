// Types of the agent socket's native exports (core/native/agent_socket.c).
// NativeBinding (binding.d.ts) extends AgentSocketBinding.

// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface AgentSocketBinding {}
