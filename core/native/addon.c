/* wpsnap native addon: userfaultfd, ptrace (through the tracer helper), the fault/sweep engine, and the constants it shares with TypeScript. */
#include "addon.h"

static napi_value init(napi_env env, napi_value exports) {
  register_uffd_exports(env, exports);
  register_protect_exports(env, exports);
  register_procmem_exports(env, exports);
  register_pagemap_exports(env, exports);
  register_file_pages_exports(env, exports);
  register_ptrace_exports(env, exports);
  register_engine_exports(env, exports);
  register_tracker_exports(env, exports);
  register_constants_exports(env, exports);
  register_memory_runs_exports(env, exports);
  register_pipe_peek_exports(env, exports);
  register_lazy_server_exports(env, exports);
  register_agent_socket_exports(env, exports);
  register_engine_group_exports(env, exports);
  return exports;
}

NAPI_MODULE_INIT() { return init(env, exports); }
