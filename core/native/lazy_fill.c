/* The lazy page server's fills from JS, its pending runs and statistics
 * (the JS thread's side; lazy_server.c has the server thread). */
#include "addon.h"
#include "lazy_server.h"
#include "napi_util.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define MAX_RUN (256 * LZ_PAGE) /* one fill ioctl: the server thread gets the lock between two */
#define EAGAIN_NS 5000000000ull /* a page still EAGAIN after 5 s of waiting for the server to read events: an error */

/* Fill T pages [t, t + len) in every context where they are unsettled: with
 * data (COPY) or zeros (data NULL: ZEROPAGE). Returns 0 or an errno with *what set. */
static int fill(lz_server_t *s, uint64_t t, const uint8_t *data, uint64_t len, uint64_t *filled, const char **what, uint64_t *where) {
  lz_state_t *st = &s->st;
  uint64_t end = t + len;
  int result = 0;
  pthread_mutex_lock(&st->mu);
  for (unsigned ci = 0; ci < st->nctxs && result == 0; ci++) {
    uint64_t pos = t;
    uint64_t stuck_since = 0; /* the first EAGAIN of the current run (0: none) */
    uint64_t a, cur, n;
    while (!st->ctxs[ci]->dead && lz_next_run(st, st->ctxs[ci], pos, end, MAX_RUN, &a, &cur, &n)) {
      int fd = st->ctxs[ci]->fd, rc;
      int64_t done;
      if (data != NULL) {
        struct uffdio_copy cp = {.dst = cur, .src = (uint64_t)(uintptr_t)(data + (a - t)), .len = n, .mode = 0};
        /* SAFETY: copies into missing pages of a registered anonymous vma of
         * the context's mm and wakes the range's waiters; stops at a present
         * page (EEXIST) and reports the bytes copied before it in .copy. */
        rc = ioctl(fd, UFFDIO_COPY, &cp);
        done = cp.copy;
      } else {
        struct uffdio_zeropage zp = {.range = {.start = cur, .len = n}, .mode = 0};
        /* SAFETY: as UFFDIO_COPY, with the zero page. */
        rc = ioctl(fd, UFFDIO_ZEROPAGE, &zp);
        done = zp.zeropage;
      }
      int err = rc == 0 ? 0 : errno;
      if (rc == 0) {
        *filled += lz_filled(st, ci, a, n);
        pos = a + n;
      } else if (done > 0) { /* partial: the rest is retried */
        *filled += lz_filled(st, ci, a, (uint64_t)done & ~(LZ_PAGE - 1));
        pos = a + ((uint64_t)done & ~(LZ_PAGE - 1));
      } else if (err == EAGAIN) {
        /* The mm is changing: an event is queued or about to be. Wait (lock
         * released) until the server thread has read one, 1 ms at most, then retry. */
        uint64_t now = lz_now_ns();
        if (stuck_since == 0) stuck_since = now;
        if (now - stuck_since > EAGAIN_NS) {
          result = EAGAIN;
          *what = data ? "ioctl(UFFDIO_COPY): the target's mm kept changing" : "ioctl(UFFDIO_ZEROPAGE): the target's mm kept changing";
          *where = cur;
          break;
        }
        st->fill_waits++;
        uint64_t seq = st->read_seq;
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 1000000;
        if (until.tv_nsec >= 1000000000) {
          until.tv_sec++;
          until.tv_nsec -= 1000000000;
        }
        while (st->read_seq == seq)
          if (pthread_cond_timedwait(&st->read_cv, &st->mu, &until) != 0) break;
        continue;
      } else if (err == EEXIST || err == ENOENT) {
        lz_unfillable(st, ci, a, err == ENOENT);
        pos = a + LZ_PAGE;
      } else if (err == ESRCH) {
        lz_ctx_kill(st, ci);
      } else {
        result = err;
        *what = data ? "ioctl(UFFDIO_COPY)" : "ioctl(UFFDIO_ZEROPAGE)";
        *where = cur;
        break;
      }
      stuck_since = 0;
      lz_yield_to_server(s);
    }
  }
  bool all = lz_total_unsettled(st) == 0;
  pthread_mutex_unlock(&st->mu);
  if (all) lz_kick(s); /* the server thread posts 'settled' */
  return result;
}

/* lazyServerFill (data: a Buffer of whole pages) and lazyServerZero (a length): the same path, zero without data. */
static napi_value fill_or_zero(napi_env env, napi_callback_info info, bool zero) {
  const char *name = zero ? "lazyServerZero" : "lazyServerFill";
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lz_server_t *s = argc >= 3 ? lz_get_server(env, argv[0]) : NULL;
  uint64_t t, len = 0;
  void *data = NULL;
  size_t data_len = 0;
  bool ok = s != NULL && arg_uint64(env, argv[1], &t) && (zero ? arg_uint64(env, argv[2], &len) : arg_buffer(env, argv[2], &data, &data_len));
  if (!zero) len = data_len;
  if (!ok || t % LZ_PAGE || len % LZ_PAGE)
    return throw_type(env, zero ? "lazyServerZero(handle, tAddress: page-aligned bigint, length: whole pages)"
                                : "lazyServerFill(handle, tAddress: page-aligned bigint, data: Buffer of whole pages)");
  if (!s->started) return throw_errno(env, EBADF, name, "%s: the server has ended (finish or stop)", name);
  uint64_t filled = 0, where = 0;
  const char *what = NULL;
  int err = len ? fill(s, t, zero ? NULL : data, len, &filled, &what, &where) : 0;
  if (err != 0) return throw_errno(env, err, "ioctl", "%s at 0x%llx", what, (unsigned long long)where);
  return make_int(env, (int64_t)filled);
}

napi_value lz_js_fill(napi_env env, napi_callback_info info) { return fill_or_zero(env, info, false); }

napi_value lz_js_zero(napi_env env, napi_callback_info info) { return fill_or_zero(env, info, true); }

napi_value lz_js_pending(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lz_server_t *s = argc >= 3 ? lz_get_server(env, argv[0]) : NULL;
  uint64_t start, end;
  if (s == NULL || !arg_uint64(env, argv[1], &start) || !arg_uint64(env, argv[2], &end) || end < start)
    return throw_type(env, "lazyServerPending(handle, start, end)");
  uint64_t *pairs = NULL;
  size_t n = 0;
  pthread_mutex_lock(&s->st.mu);
  lz_probe_contexts(&s->st, false);
  int err = lz_pending_runs(&s->st, start, end, &pairs, &n);
  bool all = lz_total_unsettled(&s->st) == 0;
  pthread_mutex_unlock(&s->st.mu);
  if (all) lz_kick(s);
  if (err != 0) return throw_errno(env, err, "malloc", "pending runs");
  napi_value ab, arr;
  void *bytes;
  if (napi_create_arraybuffer(env, n * 16, &bytes, &ab) != napi_ok) {
    free(pairs);
    return throw_errno(env, ENOMEM, "napi_create_arraybuffer", "pending runs");
  }
  if (n) memcpy(bytes, pairs, n * 16);
  free(pairs);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, n * 2, ab, 0, &arr));
  return arr;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

napi_value lz_js_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lz_server_t *s = argc >= 1 ? lz_get_server(env, argv[0]) : NULL;
  if (s == NULL) return throw_type(env, "lazyServerStats(handle)");
  lz_state_t *st = &s->st;
  pthread_mutex_lock(&st->mu);
  if (s->started) lz_probe_contexts(st, false);
  size_t nl = st->nlat < LZ_LAT_CAP ? st->nlat : LZ_LAT_CAP;
  uint64_t *lat = nl ? malloc(nl * sizeof *lat) : NULL;
  if (lat) memcpy(lat, st->lat_ns, nl * sizeof *lat);
  else nl = 0;
  lz_state_t c = *st; /* the counters */
  unsigned live = 0;
  for (unsigned i = 0; i < st->nctxs; i++) live += !st->ctxs[i]->dead;
  uint64_t unsettled = lz_total_unsettled(st);
  char err[256];
  snprintf(err, sizeof err, "%s", st->err);
  pthread_mutex_unlock(&st->mu);
  double p50 = 0, p99 = 0;
  if (nl > 0) {
    qsort(lat, nl, sizeof *lat, cmp_u64);
    p50 = (double)lat[(nl - 1) / 2] / 1000.0;
    size_t i99 = (size_t)((double)nl * 0.99);
    p99 = (double)lat[i99 >= nl ? nl - 1 : i99] / 1000.0;
  }
  free(lat);
  napi_value o, b;
  NAPI_CALL(env, napi_create_object(env, &o));
  set_prop(env, o, "faults", make_int(env, (int64_t)c.faults));
  set_prop(env, o, "pagesOnDemand", make_int(env, (int64_t)c.on_demand));
  set_prop(env, o, "pagesPrefetched", make_int(env, (int64_t)c.prefetched));
  set_prop(env, o, "pagesZeroed", make_int(env, (int64_t)c.zeroed));
  set_prop(env, o, "pagesGone", make_int(env, (int64_t)c.gone));
  set_prop(env, o, "faultServiceP50Micros", make_double(env, p50));
  set_prop(env, o, "faultServiceP99Micros", make_double(env, p99));
  set_prop(env, o, "faultsServed", make_int(env, (int64_t)c.nlat));
  set_prop(env, o, "contexts", make_int(env, c.nctxs));
  set_prop(env, o, "liveContexts", make_int(env, live));
  set_prop(env, o, "events", make_int(env, (int64_t)c.events));
  set_prop(env, o, "fillWaits", make_int(env, (int64_t)c.fill_waits));
  set_prop(env, o, "unsettledPages", make_int(env, (int64_t)unsettled));
  napi_get_boolean(env, unsettled == 0, &b);
  set_prop(env, o, "settled", b);
  napi_get_boolean(env, atomic_load(&s->exited), &b);
  set_prop(env, o, "exited", b);
  if (err[0] != '\0') set_prop(env, o, "error", make_string(env, err));
  return o;
}
