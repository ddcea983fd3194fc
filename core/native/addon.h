#ifndef WPSNAP_ADDON_H
#define WPSNAP_ADDON_H

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* uffd.c, procmem.c, pagemap.c */
int uffd_writeprotect(int uffd, uint64_t start, uint64_t len, bool protect);
int uffd_wake(int uffd, uint64_t start, uint64_t len);
int remote_read(pid_t pid, int memfd, uint64_t addr, void *dst, size_t len);
/* pread until len bytes are read: 0, the errno, or EIO at the end of the file. */
int pread_all(int fd, void *buf, size_t len, uint64_t off);
int read_pagemap(int pagemap_fd, uint64_t addr, size_t npages, uint64_t *out);
/* The kernel's shared zero page's pfn, confirmed by /proc/kpageflags; 0 if unknown. */
uint64_t shared_zero_pfn(void);
int pidfd_getfd_call(int pidfd, int targetfd);

/* Growable [start, end) pairs. */
typedef struct {
  uint64_t *pairs;
  size_t n, cap;
} page_runs_t;
/* Append [start, end) to runs, growing them: 0 or ENOMEM (the runs kept as they were). */
int page_runs_push(page_runs_t *runs, uint64_t start, uint64_t end);
struct wpsnap_pm_scan_arg;
/* Every run of [start, end) that PAGEMAP_SCAN reports for `query` (its flags
 * and masks; the rest is filled in), appended to runs, adjacent ones merged,
 * each reported once. 0 or an errno (the runs appended so far stay). */
int pagemap_scan_runs(int fd, uint64_t start, uint64_t end, const struct wpsnap_pm_scan_arg *query, page_runs_t *runs);

void register_uffd_exports(napi_env env, napi_value exports);
void register_protect_exports(napi_env env, napi_value exports);
void register_procmem_exports(napi_env env, napi_value exports);
void register_pagemap_exports(napi_env env, napi_value exports);
void register_file_pages_exports(napi_env env, napi_value exports);
void register_ptrace_exports(napi_env env, napi_value exports);
void register_engine_exports(napi_env env, napi_value exports);
void register_tracker_exports(napi_env env, napi_value exports);
void register_constants_exports(napi_env env, napi_value exports);
void register_memory_runs_exports(napi_env env, napi_value exports);
void register_pipe_peek_exports(napi_env env, napi_value exports);
void register_lazy_server_exports(napi_env env, napi_value exports);
void register_agent_socket_exports(napi_env env, napi_value exports);
void register_engine_group_exports(napi_env env, napi_value exports);

#endif
