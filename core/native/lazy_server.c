/* The lazy-restore page server: one thread per server reads the restored
 * process's userfaultfd (and those of its forked children), applies events
 * to the state (lazy_state.c), answers faults on settled pages with the zero
 * page and reports the others to JS, which answers with lazyServerFill /
 * lazyServerZero from its own thread. See lazy_server.h for the model and
 * core/native/lazy-binding.d.ts for the JS surface. */
#include "addon.h"
#include "lazy_server.h"
#include "napi_util.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MSG_BATCH 64

enum { M_FAULTS, M_SETTLED, M_EXIT, M_ERROR };
typedef struct {
  int type;
  uint64_t *addrs;
  size_t n;
  char text[256];
} lz_msg_t;


static const napi_type_tag LAZY_TAG = {0x7770737061677331ULL, 0x9b1e5c3a2f4d6e10ULL};

static void post(lz_server_t *s, int type, uint64_t *addrs, size_t n, const char *text) {
  lz_msg_t *m = calloc(1, sizeof *m);
  if (m == NULL) {
    free(addrs);
    return;
  }
  *m = (lz_msg_t){.type = type, .addrs = addrs, .n = n};
  if (text) snprintf(m->text, sizeof m->text, "%s", text);
  if (napi_call_threadsafe_function(s->tsfn, m, napi_tsfn_nonblocking) != napi_ok) {
    free(m->addrs);
    free(m);
  }
}

static void call_js(napi_env env, napi_value callback, void *context, void *data) {
  lz_msg_t *m = data;
  if (env == NULL) {
    free(m->addrs);
    free(m);
    return;
  }
  static const char *const names[] = {"faults", "settled", "exit", "error"};
  napi_value msg, undefined;
  napi_create_object(env, &msg);
  set_prop(env, msg, "type", make_string(env, names[m->type]));
  if (m->type == M_FAULTS) {
    napi_value ab, arr;
    void *bytes = NULL;
    if (napi_create_arraybuffer(env, m->n * 8, &bytes, &ab) == napi_ok) {
      memcpy(bytes, m->addrs, m->n * 8);
      napi_create_typedarray(env, napi_biguint64_array, m->n, ab, 0, &arr);
      set_prop(env, msg, "addresses", arr);
    }
  } else if (m->type == M_ERROR) {
    set_prop(env, msg, "message", make_string(env, m->text));
  }
  free(m->addrs);
  free(m);
  napi_get_undefined(env, &undefined);
  napi_call_function(env, undefined, callback, 1, &msg, NULL);
}

static void lock_server(lz_server_t *s) {
  atomic_store(&s->server_wants, true);
  pthread_mutex_lock(&s->st.mu);
  atomic_store(&s->server_wants, false);
}

/* Between two ioctls of a fill: let the server thread take the lock if it waits for it. */
void lz_yield_to_server(lz_server_t *s) {
  if (!atomic_load(&s->server_wants)) return;
  pthread_mutex_unlock(&s->st.mu);
  for (int i = 0; i < 1000 && atomic_load(&s->server_wants); i++) sched_yield();
  pthread_mutex_lock(&s->st.mu);
}

/* Read everything each live context has, in the kernel's order: events are
 * applied and faults judged as they are read. Lock held. Returns messages read. */
static size_t read_all(lz_server_t *s) {
  lz_state_t *st = &s->st;
  size_t total = 0;
  for (unsigned ci = 0; ci < st->nctxs; ci++) { /* nctxs grows as forks are read: their contexts are read too */
    while (!st->ctxs[ci]->dead) {
      struct uffd_msg msgs[MSG_BATCH];
      ssize_t r = read(st->ctxs[ci]->fd, msgs, sizeof msgs);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) {
          lz_set_error(st, errno, "read(userfaultfd)");
          lz_ctx_kill(st, ci);
        }
        break;
      }
      size_t n = (size_t)r / sizeof msgs[0];
      uint64_t now = lz_now_ns();
      for (size_t i = 0; i < n; i++) {
        int err;
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
          err = lz_take_fault(st, ci, &msgs[i], now);
          if (err != 0) lz_set_error(st, err, "record a missing fault");
          continue;
        }
        if (msgs[i].event == UFFD_EVENT_FORK) {
          int fd = (int)msgs[i].arg.fork.ufd;
          int fl = fcntl(fd, F_GETFL);
          /* The child's context is ours now: non-blocking (POLLIN may precede nothing to read), closed on exec. */
          if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
          fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
        err = lz_apply_event(st, ci, &msgs[i]);
        if (err != 0) {
          lz_set_error(st, err, "apply a userfaultfd event");
          if (msgs[i].event == UFFD_EVENT_FORK) close((int)msgs[i].arg.fork.ufd);
        }
      }
      total += n;
      if (n == 0) break;
    }
  }
  return total;
}

static void *server_thread(void *arg) {
  lz_server_t *s = arg;
  lz_state_t *st = &s->st;
  prctl(PR_SET_NAME, "wpsnap-lazy");
  bool watch_pid = s->pidfd >= 0;
  for (;;) {
    bool stopping = atomic_load(&s->stop);
    lock_server(s);
    size_t nread = read_all(s);
    size_t left = lz_serve_zero_queue(st);
    if (nread > 0) {
      st->read_seq++;
      pthread_cond_broadcast(&st->read_cv);
    }
    uint64_t *addrs = NULL;
    size_t naddrs = st->nreport;
    if (naddrs > 0) {
      addrs = st->report;
      st->report = NULL;
      st->nreport = st->reportcap = 0;
    }
    bool settled = !s->settled_posted && lz_total_unsettled(st) == 0;
    char err[256] = "";
    if (!s->error_posted && st->err[0] != '\0') snprintf(err, sizeof err, "%s", st->err);
    struct pollfd fds[LZ_MAX_CTXS + 2];
    unsigned owner[LZ_MAX_CTXS];
    unsigned n = 0;
    for (unsigned i = 0; i < st->nctxs; i++) {
      if (st->ctxs[i]->dead) continue;
      owner[n] = i;
      fds[n++] = (struct pollfd){.fd = st->ctxs[i]->fd, .events = POLLIN};
    }
    pthread_mutex_unlock(&st->mu);

    if (naddrs > 0) post(s, M_FAULTS, addrs, naddrs, NULL);
    if (settled) {
      s->settled_posted = true;
      post(s, M_SETTLED, NULL, 0, NULL);
    }
    if (err[0] != '\0') {
      s->error_posted = true;
      post(s, M_ERROR, NULL, 0, err);
    }
    if (stopping) break; /* the last pass read what was pending: no event sender is left waiting */

    unsigned nuffd = n, wake = n;
    fds[n++] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
    unsigned pid = n;
    if (watch_pid) fds[n++] = (struct pollfd){.fd = s->pidfd, .events = POLLIN};
    int pr = poll(fds, n, left > 0 ? 1 : -1);
    if (pr <= 0) continue;
    if (fds[wake].revents & POLLIN) {
      uint64_t v;
      ssize_t ignored = read(s->wake_fd, &v, sizeof v);
      (void)ignored;
    }
    bool died = watch_pid && (fds[pid].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL));
    bool broken = false;
    for (unsigned i = 0; i < nuffd; i++) broken |= (fds[i].revents & (POLLERR | POLLNVAL)) != 0;
    if (died || broken) {
      lock_server(s);
      if (died) lz_ctx_kill(st, 0); /* the target's mm is gone with it */
      for (unsigned i = 0; i < nuffd; i++) {
        if (!(fds[i].revents & (POLLERR | POLLNVAL))) continue;
        lz_set_error(st, EBADF, "poll(userfaultfd): the descriptor is closed or broken");
        lz_ctx_kill(st, owner[i]);
      }
      pthread_mutex_unlock(&st->mu);
    }
    if (died) {
      watch_pid = false;
      atomic_store(&s->exited, true);
      if (!s->exit_posted) {
        s->exit_posted = true;
        post(s, M_EXIT, NULL, 0, NULL);
      }
    }
  }
  return NULL;
}

void lz_kick(lz_server_t *s) {
  uint64_t one = 1;
  ssize_t ignored = write(s->wake_fd, &one, sizeof one);
  (void)ignored;
}

/* Stop and join the thread (after its last read), close the child contexts, release the callback. Idempotent. */
static void server_end(lz_server_t *s, bool abort_tsfn) {
  if (s->started) {
    atomic_store(&s->stop, true);
    lz_kick(s);
    pthread_join(s->thread, NULL);
    s->started = false;
  }
  for (unsigned i = 0; i < s->st.nctxs; i++) {
    lz_ctx_t *c = s->st.ctxs[i];
    if (c->owned && c->fd >= 0) {
      close(c->fd); /* the last reference: the kernel unregisters the child's ranges and wakes its waiters */
      c->fd = -1;
      c->dead = true;
    }
  }
  if (s->tsfn_live) {
    napi_release_threadsafe_function(s->tsfn, abort_tsfn ? napi_tsfn_abort : napi_tsfn_release);
    s->tsfn_live = false;
  }
}

static void server_free(lz_server_t *s) {
  server_end(s, true);
  lz_state_free(&s->st);
  pthread_mutex_destroy(&s->st.mu);
  pthread_cond_destroy(&s->st.read_cv);
  if (s->wake_fd >= 0) close(s->wake_fd);
  free(s);
}

static void server_finalize(napi_env env, void *data, void *hint) { server_free(data); }

lz_server_t *lz_get_server(napi_env env, napi_value v) {
  napi_valuetype type;
  bool ok = false;
  void *data = NULL;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external) return NULL;
  if (napi_check_object_type_tag(env, v, &LAZY_TAG, &ok) != napi_ok || !ok) return NULL;
  if (napi_get_value_external(env, v, &data) != napi_ok) return NULL;
  return data;
}

static pid_t pid_of_pidfd(int pidfd) {
  char path[64], line[128];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
  FILE *f = fopen(path, "re");
  pid_t pid = 0;
  if (f == NULL) return 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "Pid: %d", &pid) == 1) break;
  fclose(f);
  return pid > 0 ? pid : 0;
}

/* lazyServerStart({uffd, pidfd, ranges}, onMessage) -> handle */
static napi_value js_start(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], rv;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t uffd, pidfd = -1;
  const uint64_t *ranges;
  size_t n;
  bool has_pidfd = false;
  napi_valuetype cbtype = napi_undefined;
  if (argc >= 2) napi_typeof(env, argv[1], &cbtype);
  if (argc < 2 || cbtype != napi_function || !prop_int32(env, argv[0], "uffd", &uffd) ||
      napi_get_named_property(env, argv[0], "ranges", &rv) != napi_ok || !arg_u64_groups(env, rv, 2, &ranges, &n) ||
      napi_has_named_property(env, argv[0], "pidfd", &has_pidfd) != napi_ok || (has_pidfd && !prop_int32(env, argv[0], "pidfd", &pidfd)))
    return throw_type(env, "lazyServerStart({uffd, pidfd, ranges: BigUint64Array of [start, end) pairs}, onMessage)");
  lz_server_t *s = calloc(1, sizeof *s);
  if (s == NULL) return throw_errno(env, ENOMEM, "calloc", "start the lazy page server");
  pthread_mutex_init(&s->st.mu, NULL);
  pthread_cond_init(&s->st.read_cv, NULL);
  s->pidfd = pidfd;
  s->pid = pidfd >= 0 ? pid_of_pidfd(pidfd) : 0;
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->wake_fd < 0) {
    int err = errno;
    server_free(s);
    return throw_errno(env, err, "eventfd", "start the lazy page server");
  }
  int err = lz_state_init(&s->st, ranges, n, uffd);
  if (err != 0) {
    server_free(s);
    if (err == EINVAL) return throw_type(env, "lazyServerStart: ranges must be sorted, disjoint, page-aligned [start, end) pairs");
    return throw_errno(env, err, "malloc", "the lazy page server's page state");
  }
  int fl = fcntl(uffd, F_GETFL);
  /* SAFETY: O_NONBLOCK on the shared file description: a POLLIN may be followed by nothing to read (seed 003). */
  if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) != 0) {
    err = errno;
    server_free(s);
    return throw_errno(env, err, "fcntl", "fcntl(userfaultfd %d, F_SETFL, O_NONBLOCK)", uffd);
  }
  napi_value name;
  napi_create_string_utf8(env, "wpsnap-lazy", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[1], NULL, name, 0, 1, NULL, NULL, s, call_js, &s->tsfn) != napi_ok) {
    server_free(s);
    return throw_type(env, "lazyServerStart: onMessage must be a function");
  }
  s->tsfn_live = true;
  err = pthread_create(&s->thread, NULL, server_thread, s);
  if (err != 0) {
    server_free(s);
    return throw_errno(env, err, "pthread_create", "start the lazy page server thread");
  }
  s->started = true;
  napi_value handle;
  if (napi_create_external(env, s, server_finalize, NULL, &handle) != napi_ok || napi_type_tag_object(env, handle, &LAZY_TAG) != napi_ok) {
    server_free(s);
    return throw_errno(env, ENOMEM, "napi_create_external", "lazy page server handle");
  }
  return handle;
}


/* The extents of the target's vmas that hold a part of a segment of context 0
 * (a vma grown in place holds registered pages beyond T's range), appended to runs. */
static void target_vmas(lz_server_t *s, page_runs_t *runs) {
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/%d/maps", (int)s->pid);
  FILE *f = s->pid > 0 ? fopen(path, "re") : NULL;
  if (f == NULL) return;
  const lz_ctx_t *c = s->st.ctxs[0];
  while (fgets(line, sizeof line, f)) {
    unsigned long long a, b;
    if (sscanf(line, "%llx-%llx", &a, &b) != 2) continue;
    for (size_t i = 0; i < c->nsegs; i++) {
      if (c->segs[i].cur < b && c->segs[i].cur + c->segs[i].len > a) {
        (void)page_runs_push(runs, a, b); /* no memory: this vma is left out, as before */
        break;
      }
    }
  }
  fclose(f);
}

static int unregister(int fd, uint64_t a, uint64_t b) {
  struct uffdio_range r = {.start = a, .len = b - a};
  /* SAFETY: drops the registration of every vma part in [a, b) (splitting
   * vmas at the ends) and wakes their waiters; later missing faults are the
   * kernel's own. ESRCH once the mm is gone. */
  return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : errno;
}

static napi_value js_finish(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lz_server_t *s = argc >= 1 ? lz_get_server(env, argv[0]) : NULL;
  if (s == NULL) return throw_type(env, "lazyServerFinish(handle)");
  if (!s->started) return NULL;
  lz_state_t *st = &s->st;
  pthread_mutex_lock(&st->mu);
  lz_probe_contexts(st, true);
  uint64_t left = lz_total_unsettled(st);
  if (left > 0) {
    pthread_mutex_unlock(&st->mu);
    return throw_errno(env, EBUSY, "lazyServerFinish", "finish the lazy page server: %llu pages still unsettled", (unsigned long long)left);
  }
  int first = 0;
  uint64_t at = 0;
  page_runs_t vmas = {0};
  if (!st->ctxs[0]->dead) target_vmas(s, &vmas);
  for (unsigned i = 0; i < st->nctxs; i++) {
    lz_ctx_t *c = st->ctxs[i];
    for (size_t k = 0; !c->dead && k < c->nsegs + (i == 0 ? vmas.n : 0); k++) {
      uint64_t a = k < c->nsegs ? c->segs[k].cur : vmas.pairs[2 * (k - c->nsegs)];
      uint64_t b = k < c->nsegs ? a + c->segs[k].len : vmas.pairs[2 * (k - c->nsegs) + 1];
      int err = unregister(c->fd, a, b);
      if (err == ESRCH) lz_ctx_kill(st, i);
      else if (err != 0 && err != ENOENT && first == 0) {
        first = err;
        at = a;
      }
    }
  }
  free(vmas.pairs);
  pthread_mutex_unlock(&st->mu);
  server_end(s, false);
  if (first != 0) return throw_errno(env, first, "ioctl", "ioctl(UFFDIO_UNREGISTER) at 0x%llx", (unsigned long long)at);
  return NULL;
}

static napi_value js_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lz_server_t *s = argc >= 1 ? lz_get_server(env, argv[0]) : NULL;
  if (s == NULL) return throw_type(env, "lazyServerStop(handle)");
  server_end(s, false);
  return NULL;
}

/* lazyUffdApi(uffd) -> {features, ioctls}: UFFDIO_API with the features the server needs. */
static napi_value js_uffd_api(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  if (argc < 1 || !arg_int32(env, argv[0], &fd)) return throw_type(env, "lazyUffdApi(uffd)");
  struct uffdio_api api = {.api = UFFD_API, .features = LZ_UFFD_FEATURES};
  /* SAFETY: the first ioctl on a new context; EINVAL if a feature is unknown or the API was set already. */
  if (ioctl(fd, UFFDIO_API, &api) != 0)
    return throw_errno(env, errno, "ioctl", "ioctl(UFFDIO_API, features=0x%llx)", (unsigned long long)LZ_UFFD_FEATURES);
  if ((api.features & LZ_UFFD_FEATURES) != LZ_UFFD_FEATURES)
    return throw_errno(env, ENOTSUP, "ioctl", "ioctl(UFFDIO_API): features 0x%llx missing", (unsigned long long)(LZ_UFFD_FEATURES & ~api.features));
  napi_value out;
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "features", make_bigint(env, api.features));
  set_prop(env, out, "ioctls", make_bigint(env, api.ioctls));
  return out;
}

void register_lazy_server_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"lazyServerStart", NULL, js_start, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerFill", NULL, lz_js_fill, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerZero", NULL, lz_js_zero, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerPending", NULL, lz_js_pending, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerStats", NULL, lz_js_stats, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerFinish", NULL, js_finish, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyServerStop", NULL, js_stop, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyUffdApi", NULL, js_uffd_api, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"lazyUffdFeatures", NULL, NULL, NULL, NULL, make_bigint(env, LZ_UFFD_FEATURES), napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
