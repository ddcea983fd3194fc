{
  "targets": [
    {
      "target_name": "wpsnap_native",
      "sources": [
        "core/native/addon.c",
        "core/native/napi_util.c",
        "core/native/uffd.c",
        "core/native/protect_parallel.c",
        "core/native/procmem.c",
        "core/native/pagemap.c",
        "core/native/file_pages.c",
        "core/native/ptrace_client.c",
        "core/native/engine.c",
        "core/native/engine_state.c",
        "core/native/engine_pool.c",
        "core/native/engine_stage.c",
        "core/native/engine_track.c",
        "core/native/engine_keep.c",
        "core/native/engine_regions.c",
        "core/native/dirty_log.c",
        "core/native/tracker.c",
        "core/native/engine_segments.c",
        "core/native/engine_thp.c",
        "core/native/engine_fault.c",
        "core/native/engine_sweep.c",
        "core/native/fault_loop.c",
        "core/native/constants.c",
        "core/native/memory_runs.c",
        "core/native/pipe_peek.c",
        "core/native/lazy_server.c",
        "core/native/lazy_state.c",
        "core/native/lazy_fill.c",
        "core/native/agent_socket.c",
        "core/native/engine_group.c"
      ],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FORTIFY_SOURCE=2", "-D_GNU_SOURCE", "-fvisibility=hidden"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "wpsnap_pagehash",
      "sources": ["store/native/pagehash.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FORTIFY_SOURCE=2", "-D_GNU_SOURCE"],
      "defines": ["NAPI_VERSION=8"]
    },
    {
      "target_name": "wpsnap_demo_writer",
      "type": "executable",
      "sources": ["core/demo/pagewriter.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-D_FORTIFY_SOURCE=2", "-D_GNU_SOURCE", "-pthread"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "wpsnap_tracer",
      "type": "executable",
      "sources": ["core/native/tracer_main.c", "core/native/ptrace_freeze.c", "core/native/ptrace_x86_64.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FORTIFY_SOURCE=2", "-D_GNU_SOURCE"]
    },
    {
      "target_name": "wpsnap_restorer",
      "type": "executable",
      "sources": ["core/native/restorer_main.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"],
      "ldflags": ["-static"]
    },
    {
      "target_name": "wpsnap_agent",
      "product_name": "libwpsnap-agent",
      "type": "shared_library",
      "sources": ["agent/wpsnap_agent.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_FORTIFY_SOURCE=2", "-D_GNU_SOURCE", "-fPIC", "-pthread"],
      "ldflags": ["-pthread"]
    }
  ]
}
