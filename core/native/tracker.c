/* The standalone dirty tracker (core/tracker.ts): a thread reading one
 * userfaultfd of the target for as long as it is tracked, and the
 * PAGEMAP_SCAN round of the asynchronous tracker.
 *
 * Asynchronous (UFFD_FEATURE_WP_ASYNC, the default): the kernel resolves the
 * target's write faults itself; a round is one PAGEMAP_SCAN per range that
 * returns the pages written since the last one and protects them again, in
 * one atomic walk. The thread only reads events (a REMOVE, UNMAP or REMAP
 * waits for its read: nobody reading would stall the target).
 * Synchronous: the thread lets each write fault through at once and logs it
 * (dirty_log.c); a round takes the log and protects those ranges again. */
#include "addon.h"
#include "dirty_log.h"
#include "fault_loop.h"
#include "napi_util.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  track_state_t track;
  fault_loop_t loop;
  int uffd;       /* owned by JS */
  int pidfd;      /* owned by JS */
  int pagemap_fd; /* ours */
  int wake_fd;    /* ours */
  _Atomic bool stop;
  _Atomic bool exited; /* the target exited */
  _Atomic int err;     /* the loop failed: an errno */
  char what[160];
  pthread_t thread;
  bool started;
  bool running; /* guarded by sync_lock: the loop has not returned */
  /* A take waits until the thread has handled everything it read before the
   * take asked: a message read (its sender released) but not yet logged
   * belongs to the round being taken. */
  pthread_mutex_t sync_lock;
  pthread_cond_t synced;
  uint64_t sync_asked, sync_done; /* guarded by sync_lock */
} tracker_t;

static void on_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) { track_on_fault(&((tracker_t *)owner)->track, m); }
static void on_event(void *owner, unsigned source, const struct uffd_msg *m) { track_on_event(&((tracker_t *)owner)->track, m); }

/* Called after every drain: whatever was read before now is logged. */
static void mark_synced(tracker_t *t) {
  pthread_mutex_lock(&t->sync_lock);
  t->sync_done = t->sync_asked;
  pthread_cond_broadcast(&t->synced);
  pthread_mutex_unlock(&t->sync_lock);
}

static loop_work_t on_work(void *owner, int *wait_ms) {
  tracker_t *t = owner;
  mark_synced(t);
  if (atomic_load(&t->stop) || atomic_load(&t->exited)) return LOOP_DONE;
  *wait_ms = -1;
  return LOOP_WAIT;
}

static void on_exit_seen(void *owner) { atomic_store(&((tracker_t *)owner)->exited, true); }

static void on_fail(void *owner, int err, const char *what) {
  tracker_t *t = owner;
  int none = 0;
  if (atomic_compare_exchange_strong(&t->err, &none, err)) snprintf(t->what, sizeof t->what, "%s", what);
}

static bool has_failed(void *owner) { return atomic_load(&((tracker_t *)owner)->err) != 0; }

static const fault_loop_ops_t tracker_ops = {
    .fault = on_fault,
    .event = on_event,
    .work = on_work,
    .target_exited = on_exit_seen,
    .fail = on_fail,
    .failed = has_failed,
};

static void *tracker_thread(void *arg) {
  tracker_t *t = arg;
  prctl(PR_SET_NAME, "wpsnap-track");
  fault_loop_run(&t->loop);
  pthread_mutex_lock(&t->sync_lock);
  t->running = false;
  pthread_cond_broadcast(&t->synced);
  pthread_mutex_unlock(&t->sync_lock);
  return NULL;
}

/* Wait until the thread has handled every message it read before this call
 * (at most 1 s: a thread stuck in a fault's ioctl must not hang JS). */
static void tracker_sync(tracker_t *t) {
  pthread_mutex_lock(&t->sync_lock);
  uint64_t ticket = ++t->sync_asked;
  uint64_t one = 1;
  ssize_t ignored = write(t->wake_fd, &one, sizeof one);
  (void)ignored;
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 1;
  while (t->running && t->sync_done < ticket) {
    if (pthread_cond_timedwait(&t->synced, &t->sync_lock, &until) != 0) break;
  }
  pthread_mutex_unlock(&t->sync_lock);
}

static void tracker_join(tracker_t *t) {
  if (!t->started) return;
  atomic_store(&t->stop, true);
  uint64_t one = 1;
  ssize_t ignored = write(t->wake_fd, &one, sizeof one);
  (void)ignored;
  pthread_join(t->thread, NULL);
  t->started = false;
}

static void tracker_free(tracker_t *t) {
  tracker_join(t);
  fault_loop_free(&t->loop);
  track_state_free(&t->track);
  pthread_mutex_destroy(&t->sync_lock);
  pthread_cond_destroy(&t->synced);
  if (t->pagemap_fd >= 0) close(t->pagemap_fd);
  if (t->wake_fd >= 0) close(t->wake_fd);
  free(t);
}

static void tracker_finalize(napi_env env, void *data, void *hint) { tracker_free(data); }

static tracker_t *get_tracker(napi_env env, napi_value v) { return handle_data(env, v, HANDLE_TRACKER); }

/* trackerStart({uffd, pid, pidfd, ranges}) -> handle: start reading the
 * userfaultfd (after UFFDIO_API; ranges: BigUint64Array of [start, end, unit]
 * triples, sorted, for the synchronous tracker's protection units). */
static napi_value js_tracker_start(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t uffd, pid, pidfd;
  napi_value rv;
  const uint64_t *ranges;
  size_t n;
  if (argc < 1 || !prop_int32(env, argv[0], "uffd", &uffd) || !prop_int32(env, argv[0], "pid", &pid) ||
      !prop_int32(env, argv[0], "pidfd", &pidfd) || napi_get_named_property(env, argv[0], "ranges", &rv) != napi_ok ||
      !arg_u64_groups(env, rv, 3, &ranges, &n))
    return throw_type(env, "trackerStart({uffd, pid, pidfd, ranges: BigUint64Array of start, end, unit triples})");
  tracker_t *t = calloc(1, sizeof *t);
  if (t == NULL) return throw_errno(env, ENOMEM, "calloc", "start the tracker");
  t->uffd = uffd;
  t->pidfd = pidfd;
  pthread_mutex_init(&t->sync_lock, NULL);
  pthread_cond_init(&t->synced, NULL);
  t->running = true;
  t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
  t->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
  track_state_init(&t->track, uffd, t->pagemap_fd, &t->loop);
  int err = t->wake_fd < 0 || t->pagemap_fd < 0 ? errno : track_set_ranges(&t->track, ranges, n);
  if (err != 0) {
    tracker_free(t);
    return throw_errno(env, err, "open", "start the tracker (%s)", path);
  }
  t->loop = (fault_loop_t){.uffds = &t->uffd, .nuffds = 1, .wake_fd = t->wake_fd, .pidfd = pidfd, .ops = &tracker_ops, .owner = t, .stop = &t->stop};
  err = pthread_create(&t->thread, NULL, tracker_thread, t);
  if (err != 0) {
    tracker_free(t);
    return throw_errno(env, err, "pthread_create", "start the tracker thread");
  }
  t->started = true;
  napi_value handle;
  if (make_handle(env, t, tracker_finalize, HANDLE_TRACKER, &handle) != napi_ok) {
    tracker_free(t);
    return throw_errno(env, ENOMEM, "napi_wrap", "tracker handle");
  }
  return handle;
}

/* trackerSetRanges(handle, ranges): the ranges now registered ([start, end, unit] triples, sorted). */
static napi_value js_tracker_set_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  tracker_t *t = argc >= 2 ? get_tracker(env, argv[0]) : NULL;
  const uint64_t *ranges;
  size_t n;
  if (t == NULL || !arg_u64_groups(env, argv[1], 3, &ranges, &n)) return throw_type(env, "trackerSetRanges(handle, ranges)");
  int err = track_set_ranges(&t->track, ranges, n);
  if (err != 0) return throw_errno(env, err, "malloc", "tracked ranges");
  return NULL;
}

/* trackerTake(handle) -> {written, invalid, overflowed, faults, forks, exited, error?}: the logs since the last take. */
static napi_value js_tracker_take(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  tracker_t *t = argc >= 1 ? get_tracker(env, argv[0]) : NULL;
  if (t == NULL) return throw_type(env, "trackerTake(handle)");
  if (t->started) tracker_sync(t);
  napi_value o = track_take_object(env, &t->track);
  napi_value exited;
  napi_get_boolean(env, atomic_load(&t->exited), &exited);
  set_prop(env, o, "exited", exited);
  if (atomic_load(&t->err) != 0) {
    char msg[256];
    snprintf(msg, sizeof msg, "%s: %s (%s)", t->what, strerror(atomic_load(&t->err)), errno_name(atomic_load(&t->err)));
    set_prop(env, o, "error", make_string(env, msg));
  }
  return o;
}

/* trackerStop(handle): the thread ends (after handling what it read); the
 * userfaultfd stays open, JS closes it. Idempotent. */
static napi_value js_tracker_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  tracker_t *t = argc >= 1 ? get_tracker(env, argv[0]) : NULL;
  if (t == NULL) return throw_type(env, "trackerStop(handle)");
  tracker_join(t);
  return NULL;
}

/* trackerScan(handle, start, end, reset) -> BigUint64Array of [start, len]
 * pairs: the pages of [start, end) written since they were last protected
 * (PAGE_IS_WRITTEN: a present page or swap entry without the uffd-wp bit).
 * reset: protect them again in the same walk (PM_SCAN_WP_MATCHING), which is
 * a round of the asynchronous tracker. The range must be registered with the
 * asynchronous context (PM_SCAN_CHECK_WPASYNC: EPERM otherwise). */
static napi_value js_tracker_scan(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  tracker_t *t = argc >= 4 ? get_tracker(env, argv[0]) : NULL;
  uint64_t start, end;
  bool reset;
  if (t == NULL || !arg_uint64(env, argv[1], &start) || !arg_uint64(env, argv[2], &end) || !arg_bool(env, argv[3], &reset) || end < start)
    return throw_type(env, "trackerScan(handle, start, end, reset)");
  page_runs_t runs = {0};
  const struct wpsnap_pm_scan_arg query = {
      .flags = PM_SCAN_CHECK_WPASYNC | (reset ? PM_SCAN_WP_MATCHING : 0),
      .category_mask = PAGE_IS_WRITTEN,
      .return_mask = PAGE_IS_WRITTEN,
  };
  int err = pagemap_scan_runs(t->pagemap_fd, start, end, &query, &runs);
  if (err != 0) {
    free(runs.pairs);
    return throw_errno(env, err, "ioctl", "PAGEMAP_SCAN of 0x%llx-0x%llx", (unsigned long long)start, (unsigned long long)end);
  }
  /* [start, end) to the log's [start, len]. */
  for (size_t i = 0; i < runs.n; i++) runs.pairs[2 * i + 1] -= runs.pairs[2 * i];
  uint64_t *pairs = runs.pairs;
  size_t n = runs.n;
  track_log_t log = {.pairs = pairs, .n = n};
  napi_value out = track_log_array(env, &log);
  free(pairs);
  return out;
}

/* probeSoftDirty() -> {works, why}: one round trip of soft-dirty on a page of
 * our own: clear_refs 4, a write, then bit 55 of its pagemap entry. A kernel
 * built without CONFIG_MEM_SOFT_DIRTY accepts the clear_refs write and never
 * sets the bit. */
static napi_value js_probe_soft_dirty(napi_env env, napi_callback_info info) {
  const char *why = NULL;
  bool works = false;
  volatile uint8_t *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  int cr = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (page == MAP_FAILED || pm < 0 || cr < 0) {
    why = "cannot open /proc/self/pagemap or /proc/self/clear_refs";
  } else {
    page[0] = 1;
    uint64_t before = 0, after = 0;
    if (write(cr, "4", 1) != 1) {
      why = "writing 4 to /proc/self/clear_refs failed";
    } else if (read_pagemap(pm, (uint64_t)(uintptr_t)page, 1, &before) != 0) {
      why = "reading /proc/self/pagemap failed";
    } else {
      page[0] = 2;
      if (read_pagemap(pm, (uint64_t)(uintptr_t)page, 1, &after) != 0) why = "reading /proc/self/pagemap failed";
      else if (before & PM_SOFT_DIRTY) why = "clear_refs 4 did not clear the soft-dirty bit";
      else if (!(after & PM_SOFT_DIRTY)) why = "a written page never gets the soft-dirty bit (CONFIG_MEM_SOFT_DIRTY=n: clear_refs 4 is accepted and does nothing)";
      else works = true;
    }
  }
  if (page != MAP_FAILED) munmap((void *)page, 4096);
  if (pm >= 0) close(pm);
  if (cr >= 0) close(cr);
  napi_value o, w;
  napi_create_object(env, &o);
  napi_get_boolean(env, works, &w);
  set_prop(env, o, "works", w);
  if (why != NULL) set_prop(env, o, "why", make_string(env, why));
  return o;
}

void register_tracker_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"trackerStart", NULL, js_tracker_start, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"trackerSetRanges", NULL, js_tracker_set_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"trackerTake", NULL, js_tracker_take, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"trackerStop", NULL, js_tracker_stop, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"trackerScan", NULL, js_tracker_scan, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"probeSoftDirty", NULL, js_probe_soft_dirty, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
