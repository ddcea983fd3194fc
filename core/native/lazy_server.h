/* The lazy-restore page server (lazy_server.c: thread and Node-API;
 * lazy_fill.c: the JS thread's fills, pending runs and statistics;
 * lazy_state.c: what is settled where).
 *
 * A restored process's anonymous private memory is registered with a
 * userfaultfd in MISSING mode. Every page of the registered ranges (in T
 * addresses: where they were at the restore's start) is "unsettled" in every
 * context (the process's userfaultfd, and one per forked child) until one of:
 *  - it is filled (UFFDIO_COPY / UFFDIO_ZEROPAGE from JS, or EEXIST: present),
 *  - a REMOVE event covers it (MADV_DONTNEED: it reads zero from now on),
 *  - an UNMAP event covers it (it is gone), or the context's mm is gone.
 * A missing fault on an unsettled page is reported to JS, which answers with a
 * fill; on a settled page (or outside T's ranges) the server answers it at once
 * with the zero page. Each context keeps a translation T address -> current
 * address, moved by REMAP events.
 *
 * Locking: one mutex guards the whole state. The server thread holds it while
 * it reads the userfaultfds and applies what it read (an event's sender goes
 * on the moment the event is read: a fill must never run between that read
 * and the event's effect on the state). JS holds it around each fill ioctl
 * and drops it between them. The server thread never waits for JS. */
#ifndef WPSNAP_LAZY_SERVER_H
#define WPSNAP_LAZY_SERVER_H

#include "kernel_compat.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LZ_PAGE 4096ull
#define LZ_MAX_CTXS 256

/* The features the caller requests with UFFDIO_API before registering. */
#define LZ_UFFD_FEATURES                                                                           \
  ((uint64_t)(UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | \
              UFFD_FEATURE_EVENT_UNMAP))

/* [t, t + len) of T lives at [cur, cur + len) in a context now. */
typedef struct {
  uint64_t t, cur, len;
} lz_seg_t;

typedef struct {
  int fd;
  bool owned; /* a forked child's userfaultfd: ours to close */
  bool dead;  /* its mm is gone: nothing to settle any more */
  lz_seg_t *segs; /* sorted by cur, disjoint */
  size_t nsegs, segcap;
  uint64_t **unsettled; /* one bitmap per range, a bit per page */
  uint64_t nunsettled;
} lz_ctx_t;

/* A fault reported to JS and not filled yet. */
typedef struct {
  unsigned ctx;
  uint64_t t, cur, read_ns;
} lz_pending_t;

/* A fault the server answers itself (zero page), kept until it succeeds (EAGAIN). */
typedef struct {
  unsigned ctx;
  uint64_t cur, read_ns;
} lz_zero_t;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t read_cv; /* read_seq moved: the server read events */
  uint64_t read_seq;
  uint64_t *ranges; /* [start, end) pairs, sorted, page-aligned, T */
  size_t nranges;
  lz_ctx_t *ctxs[LZ_MAX_CTXS];
  unsigned nctxs;
  lz_pending_t *pend;
  size_t npend, pendcap;
  lz_zero_t *zq;
  size_t nzq, zqcap;
  uint64_t *report; /* T addresses of new faults for JS, not posted yet */
  size_t nreport, reportcap;
  /* statistics */
  uint64_t faults, on_demand, prefetched, zeroed, events, gone;
  uint64_t fill_waits; /* a fill's ioctl met EAGAIN (the mm changing) and waited for the server's read */
  uint64_t *lat_ns; /* service times, a ring of LZ_LAT_CAP */
  size_t nlat;
  char err[256]; /* the first error the server thread met, for JS ('' if none) */
} lz_state_t;

#define LZ_LAT_CAP (1u << 20)

uint64_t lz_now_ns(void);
/* ranges: n [start, end) pairs (sorted, disjoint, page-aligned: checked). */
int lz_state_init(lz_state_t *st, const uint64_t *ranges, size_t n, int uffd);
void lz_state_free(lz_state_t *st);
uint64_t lz_total_unsettled(const lz_state_t *st);
void lz_ctx_kill(lz_state_t *st, unsigned ci);

/* Everything below with the mutex held. */
/* The T page at current address cur in context ci; false if none. */
bool lz_cur_to_t(const lz_ctx_t *c, uint64_t cur, uint64_t *t);
bool lz_is_unsettled(const lz_state_t *st, const lz_ctx_t *c, uint64_t t);
/* Settle [t, t + len) in context ci; returns how many pages were unsettled. */
uint64_t lz_settle(lz_state_t *st, lz_ctx_t *c, uint64_t t, uint64_t len);
/* Apply one non-cooperative event read from context ci: 0 or an errno. */
int lz_apply_event(lz_state_t *st, unsigned ci, const struct uffd_msg *m);
/* Handle one fault read from context ci at read_ns: report it or queue a zero page. 0 or an errno. */
int lz_take_fault(lz_state_t *st, unsigned ci, const struct uffd_msg *m, uint64_t read_ns);
/* Try every queued zero page; returns how many remain (EAGAIN). */
size_t lz_serve_zero_queue(lz_state_t *st);
/* The next run to fill in context ci at or after T address pos, below end: an
 * unsettled, contiguous run in one segment, at most max bytes. */
bool lz_next_run(const lz_state_t *st, const lz_ctx_t *c, uint64_t pos, uint64_t end, uint64_t max, uint64_t *t, uint64_t *cur, uint64_t *len);
/* Pages [t, t + len) of context ci were filled now: count them (on demand if a
 * fault for them is pending) and settle them. Returns the pages settled. */
uint64_t lz_filled(lz_state_t *st, unsigned ci, uint64_t t, uint64_t len);
/* Page t of context ci cannot be filled: present already (EEXIST) or without
 * a registered vma (ENOENT, gone): settle it and wake a fault pending on it. */
void lz_unfillable(lz_state_t *st, unsigned ci, uint64_t t, bool gone);
/* Probe each context with unsettled pages (all: every context) for a gone mm (ESRCH). */
void lz_probe_contexts(lz_state_t *st, bool all);
/* [start, len] pairs of T pages in [start, end) unsettled in any live context. */
int lz_pending_runs(const lz_state_t *st, uint64_t start, uint64_t end, uint64_t **out, size_t *npairs);
void lz_record_latency(lz_state_t *st, uint64_t read_ns);
void lz_set_error(lz_state_t *st, int err, const char *what);

/* The server (lazy_server.c: thread, start, finish; lazy_fill.c: the JS thread's calls). */
#include <node_api.h>
#include <sys/types.h>

typedef struct {
  lz_state_t st;
  int pidfd; /* owned by JS; -1 if none */
  pid_t pid; /* from the pidfd's fdinfo (0 if unknown): finish reads its maps */
  int wake_fd;
  napi_threadsafe_function tsfn;
  bool tsfn_live;
  pthread_t thread;
  bool started;
  _Atomic bool stop;
  _Atomic bool exited;
  _Atomic bool server_wants; /* the server thread waits for the lock: JS lets it in */
  bool settled_posted, exit_posted, error_posted; /* server thread only */
} lz_server_t;

/* The server of a handle, or NULL if v is not a lazy server handle. */
lz_server_t *lz_get_server(napi_env env, napi_value v);
/* Wake the server thread (it posts what changed: settled). */
void lz_kick(lz_server_t *s);
/* Between two ioctls of a fill (lock held): let the server thread take the lock if it waits for it. */
void lz_yield_to_server(lz_server_t *s);
napi_value lz_js_fill(napi_env env, napi_callback_info info);
napi_value lz_js_zero(napi_env env, napi_callback_info info);
napi_value lz_js_pending(napi_env env, napi_callback_info info);
napi_value lz_js_stats(napi_env env, napi_callback_info info);

#endif
