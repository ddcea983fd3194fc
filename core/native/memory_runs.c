/* readRuns / writeRuns: many runs of a stopped target's memory read or
 * written in one process_vm_readv / process_vm_writev each (up to IOV_MAX
 * runs a call), instead of a syscall per run: a rollback writes T's content
 * back to a hundred scattered pages at every run of a fuzzing loop. A run the
 * call cannot do (a read-only or PROT_NONE page: process_vm_*v honour the
 * protection) is done through /proc/PID/mem, which does not (FOLL_FORCE). */
#include "addon.h"
#include "napi_util.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define RUNS_PER_CALL 1024 /* IOV_MAX */

/* Run i: [runs[3i], +runs[3i+1]) of the target, at byte runs[3i+2] of data. */
typedef struct {
  const uint64_t *runs;
  size_t count;
  uint8_t *data;
  size_t data_len;
} runs_t;

/* pread/pwrite of one run's remainder through /proc/PID/mem. */
static int by_mem_file(int memfd, bool write_it, uint64_t address, uint8_t *data, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = write_it ? pwrite(memfd, data + done, len - done, (off_t)(address + done)) : pread(memfd, data + done, len - done, (off_t)(address + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EIO ? EFAULT : errno;
    if (n == 0) return EFAULT;
    done += (size_t)n;
  }
  return 0;
}

static int transfer(pid_t pid, int memfd, bool write_it, const runs_t *r) {
  struct iovec local[RUNS_PER_CALL], remote[RUNS_PER_CALL];
  size_t next = 0;
  while (next < r->count) {
    size_t batch = r->count - next < RUNS_PER_CALL ? r->count - next : RUNS_PER_CALL;
    size_t want = 0;
    for (size_t i = 0; i < batch; i++) {
      const uint64_t *run = r->runs + 3 * (next + i);
      local[i] = (struct iovec){.iov_base = r->data + run[2], .iov_len = (size_t)run[1]};
      remote[i] = (struct iovec){.iov_base = (void *)(uintptr_t)run[0], .iov_len = (size_t)run[1]};
      want += (size_t)run[1];
    }
    ssize_t n = write_it ? process_vm_writev(pid, local, batch, remote, batch, 0) : process_vm_readv(pid, local, batch, remote, batch, 0);
    if (n < 0 && errno == ESRCH) return ESRCH;
    size_t done = n > 0 ? (size_t)n : 0;
    if (done == want) {
      next += batch;
      continue;
    }
    /* Stopped in run k: finish it through the memory file, then go on with a call from k + 1. */
    size_t k = 0;
    while (k < batch && done >= remote[k].iov_len) done -= remote[k++].iov_len;
    const uint64_t *run = r->runs + 3 * (next + k);
    int err = by_mem_file(memfd, write_it, run[0] + done, r->data + run[2] + done, (size_t)run[1] - done);
    if (err != 0) return err;
    next += k + 1;
  }
  return 0;
}

/* (pid, memFd, runs, buffer): every run inside the buffer. */
static bool parse_runs(napi_env env, napi_value *argv, int32_t *pid, int32_t *memfd, runs_t *r) {
  void *data;
  if (!arg_int32(env, argv[0], pid) || !arg_int32(env, argv[1], memfd) || !arg_u64_groups(env, argv[2], 3, &r->runs, &r->count) ||
      !arg_buffer(env, argv[3], &data, &r->data_len))
    return false;
  r->data = data;
  for (size_t i = 0; i < r->count; i++) {
    const uint64_t *run = r->runs + 3 * i;
    if (run[1] > SSIZE_MAX || run[2] > r->data_len || run[1] > r->data_len - run[2]) return false;
  }
  return true;
}

/* readRuns(pid, memFd, runs, into) / writeRuns(pid, memFd, runs, data) */
static napi_value runs_call(napi_env env, napi_callback_info info, bool write_it) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid, memfd;
  runs_t r;
  if (argc < 4 || !parse_runs(env, argv, &pid, &memfd, &r))
    return throw_type(env, write_it ? "writeRuns(pid, memFd, runs: BigUint64Array of [address, length, offset], data)" : "readRuns(pid, memFd, runs: BigUint64Array of [address, length, offset], into)");
  int err = transfer(pid, memfd, write_it, &r);
  if (err != 0)
    return throw_errno(env, err, write_it ? "process_vm_writev" : "process_vm_readv", "%s %zu runs of pid %d", write_it ? "write" : "read", r.count, pid);
  return NULL;
}

/* differingPages(a, b, skip?) -> Uint32Array: the indices of the 4 KiB pages
 * where two buffers of the same length differ (memcmp), those with skip[i]
 * set left out: a full rollback compares a GiB a page at a time. */
static napi_value js_differing_pages(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *a, *b, *skip = NULL;
  size_t alen, blen, skip_len = 0;
  bool has_skip = false;
  if (argc >= 3) {
    napi_valuetype t;
    NAPI_CALL(env, napi_typeof(env, argv[2], &t));
    has_skip = t != napi_undefined && t != napi_null;
  }
  if (argc < 2 || !arg_buffer(env, argv[0], &a, &alen) || !arg_buffer(env, argv[1], &b, &blen) || alen != blen || alen % 4096 != 0 ||
      (has_skip && (!arg_buffer(env, argv[2], &skip, &skip_len) || skip_len < alen / 4096)))
    return throw_type(env, "differingPages(a, b, skip?): two buffers of the same whole number of pages, and a byte per page");
  size_t pages = alen / 4096, count = 0;
  uint32_t *found = malloc((pages ? pages : 1) * sizeof *found);
  if (found == NULL) return throw_errno(env, ENOMEM, "malloc", "differingPages");
  for (size_t i = 0; i < pages; i++) {
    if (has_skip && ((uint8_t *)skip)[i]) continue;
    if (memcmp((uint8_t *)a + i * 4096, (uint8_t *)b + i * 4096, 4096) != 0) found[count++] = (uint32_t)i;
  }
  void *data;
  napi_value ab, arr;
  napi_status st = napi_create_arraybuffer(env, count * sizeof *found, &data, &ab);
  if (st == napi_ok) memcpy(data, found, count * sizeof *found);
  free(found);
  NAPI_CALL(env, st);
  NAPI_CALL(env, napi_create_typedarray(env, napi_uint32_array, count, ab, 0, &arr));
  return arr;
}

/* readRunsAsync(pid, memFd, runs, into) -> Promise<void>: readRuns on a
 * thread of libuv's pool, so that a rollback reads the target's next chunk
 * while it fills T's content of this one from the store. The runs and the
 * buffer are held (references) until it settles. */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref runs_ref, into_ref;
  pid_t pid;
  int memfd;
  runs_t r;
  int err;
} async_read_t;

static void async_read_execute(napi_env env, void *data) {
  async_read_t *a = data;
  a->err = transfer(a->pid, a->memfd, false, &a->r);
}

static void async_read_complete(napi_env env, napi_status status, void *data) {
  async_read_t *a = data;
  if (status == napi_ok && a->err == 0) {
    napi_value undefined;
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, a->deferred, undefined);
  } else {
    napi_value message, error;
    char text[160];
    snprintf(text, sizeof text, "process_vm_readv: read %zu runs of pid %d: %s", a->r.count, a->pid, errno_name(a->err ? a->err : EINTR));
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &error);
    napi_value code;
    napi_create_string_utf8(env, errno_name(a->err ? a->err : EINTR), NAPI_AUTO_LENGTH, &code);
    napi_set_named_property(env, error, "code", code);
    napi_reject_deferred(env, a->deferred, error);
  }
  napi_delete_reference(env, a->runs_ref);
  napi_delete_reference(env, a->into_ref);
  napi_delete_async_work(env, a->work);
  free(a);
}

static napi_value js_read_runs_async(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid, memfd;
  runs_t r;
  if (argc < 4 || !parse_runs(env, argv, &pid, &memfd, &r)) return throw_type(env, "readRunsAsync(pid, memFd, runs: BigUint64Array of [address, length, offset], into)");
  async_read_t *a = calloc(1, sizeof *a);
  if (a == NULL) return throw_errno(env, ENOMEM, "calloc", "readRunsAsync");
  a->pid = pid;
  a->memfd = memfd;
  a->r = r;
  napi_value promise, name;
  NAPI_CALL(env, napi_create_promise(env, &a->deferred, &promise));
  NAPI_CALL(env, napi_create_reference(env, argv[2], 1, &a->runs_ref));
  NAPI_CALL(env, napi_create_reference(env, argv[3], 1, &a->into_ref));
  NAPI_CALL(env, napi_create_string_utf8(env, "wpsnap:readRuns", NAPI_AUTO_LENGTH, &name));
  NAPI_CALL(env, napi_create_async_work(env, NULL, name, async_read_execute, async_read_complete, a, &a->work));
  NAPI_CALL(env, napi_queue_async_work(env, a->work));
  return promise;
}

static napi_value js_read_runs(napi_env env, napi_callback_info info) { return runs_call(env, info, false); }
static napi_value js_write_runs(napi_env env, napi_callback_info info) { return runs_call(env, info, true); }

void register_memory_runs_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"readRuns", NULL, js_read_runs, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"writeRuns", NULL, js_write_runs, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"readRunsAsync", NULL, js_read_runs_async, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"differingPages", NULL, js_differing_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
