/* The lazy-restore page server's state: which T pages are still unsettled in
 * which context, where each T range lives now, the faults reported to JS and
 * those the server answers itself (see lazy_server.h). Callers hold st->mu. */
#include "lazy_server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

uint64_t lz_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static size_t range_pages(const lz_state_t *st, size_t r) { return (st->ranges[2 * r + 1] - st->ranges[2 * r]) / LZ_PAGE; }
static size_t range_words(const lz_state_t *st, size_t r) { return (range_pages(st, r) + 63) / 64; }

/* The first range whose end is above t (st->nranges if none). */
static size_t range_from(const lz_state_t *st, uint64_t t) {
  size_t lo = 0, hi = st->nranges;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (st->ranges[2 * mid + 1] <= t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

static void ctx_free(lz_ctx_t *c, size_t nranges) {
  if (c == NULL) return;
  if (c->unsettled != NULL)
    for (size_t r = 0; r < nranges; r++) free(c->unsettled[r]);
  free(c->unsettled);
  free(c->segs);
  free(c);
}

/* A context with no segment and every bitmap clear (or a copy of `from`). */
static lz_ctx_t *ctx_new(const lz_state_t *st, const lz_ctx_t *from) {
  lz_ctx_t *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->unsettled = calloc(st->nranges ? st->nranges : 1, sizeof *c->unsettled);
  size_t cap = from ? from->nsegs + 2 : st->nranges + 2;
  c->segs = malloc(cap * sizeof *c->segs);
  if (c->unsettled == NULL || c->segs == NULL) goto fail;
  c->segcap = cap;
  for (size_t r = 0; r < st->nranges; r++) {
    c->unsettled[r] = calloc(range_words(st, r) ? range_words(st, r) : 1, sizeof(uint64_t));
    if (c->unsettled[r] == NULL) goto fail;
    if (from) memcpy(c->unsettled[r], from->unsettled[r], range_words(st, r) * sizeof(uint64_t));
  }
  if (from) {
    memcpy(c->segs, from->segs, from->nsegs * sizeof *c->segs);
    c->nsegs = from->nsegs;
    c->nunsettled = from->nunsettled;
  }
  return c;
fail:
  ctx_free(c, st->nranges);
  return NULL;
}

int lz_state_init(lz_state_t *st, const uint64_t *ranges, size_t n, int uffd) {
  for (size_t i = 0; i < n; i++) {
    uint64_t s = ranges[2 * i], e = ranges[2 * i + 1];
    if (s % LZ_PAGE || e % LZ_PAGE || e <= s || (i > 0 && s < ranges[2 * i - 1])) return EINVAL;
  }
  st->ranges = malloc((n ? n : 1) * 2 * sizeof(uint64_t));
  if (st->ranges == NULL) return ENOMEM;
  memcpy(st->ranges, ranges, n * 2 * sizeof(uint64_t));
  st->nranges = n;
  lz_ctx_t *c = ctx_new(st, NULL);
  if (c == NULL) return ENOMEM;
  c->fd = uffd;
  for (size_t r = 0; r < n; r++) {
    size_t pages = range_pages(st, r);
    for (size_t w = 0; w < range_words(st, r); w++)
      c->unsettled[r][w] = (pages - 64 * w >= 64) ? ~0ull : ((1ull << (pages - 64 * w)) - 1);
    c->nunsettled += pages;
    c->segs[c->nsegs++] = (lz_seg_t){.t = ranges[2 * r], .cur = ranges[2 * r], .len = ranges[2 * r + 1] - ranges[2 * r]};
  }
  st->ctxs[0] = c;
  st->nctxs = 1;
  return 0;
}

void lz_state_free(lz_state_t *st) {
  for (unsigned i = 0; i < st->nctxs; i++) ctx_free(st->ctxs[i], st->nranges);
  st->nctxs = 0;
  free(st->ranges);
  free(st->pend);
  free(st->zq);
  free(st->report);
  free(st->lat_ns);
  st->ranges = NULL;
  st->pend = NULL;
  st->zq = NULL;
  st->report = NULL;
  st->lat_ns = NULL;
}

uint64_t lz_total_unsettled(const lz_state_t *st) {
  uint64_t n = 0;
  for (unsigned i = 0; i < st->nctxs; i++)
    if (!st->ctxs[i]->dead) n += st->ctxs[i]->nunsettled;
  return n;
}

void lz_set_error(lz_state_t *st, int err, const char *what) {
  if (st->err[0] == '\0') snprintf(st->err, sizeof st->err, "%s: %s", what, strerror(err));
}

void lz_record_latency(lz_state_t *st, uint64_t read_ns) {
  uint64_t d = lz_now_ns() - read_ns;
  if (st->lat_ns == NULL) {
    st->lat_ns = malloc(LZ_LAT_CAP * sizeof *st->lat_ns);
    if (st->lat_ns == NULL) return;
  }
  st->lat_ns[st->nlat % LZ_LAT_CAP] = d;
  st->nlat++;
}

/* Drop every pending fault of context ci in current addresses [s, e); true if any was there. */
static bool drop_pending(lz_state_t *st, unsigned ci, uint64_t s, uint64_t e) {
  bool any = false;
  size_t k = 0;
  for (size_t i = 0; i < st->npend; i++) {
    lz_pending_t *p = &st->pend[i];
    if (p->ctx == ci && p->cur >= s && p->cur < e) any = true;
    else st->pend[k++] = *p;
  }
  st->npend = k;
  return any;
}

void lz_ctx_kill(lz_state_t *st, unsigned ci) {
  lz_ctx_t *c = st->ctxs[ci];
  c->dead = true;
  c->nunsettled = 0;
  for (size_t r = 0; r < st->nranges; r++) memset(c->unsettled[r], 0, range_words(st, r) * sizeof(uint64_t));
  drop_pending(st, ci, 0, UINT64_MAX);
}

bool lz_cur_to_t(const lz_ctx_t *c, uint64_t cur, uint64_t *t) {
  size_t lo = 0, hi = c->nsegs;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (c->segs[mid].cur + c->segs[mid].len <= cur) lo = mid + 1;
    else hi = mid;
  }
  if (lo == c->nsegs || c->segs[lo].cur > cur) return false;
  *t = c->segs[lo].t + (cur - c->segs[lo].cur);
  return true;
}

static const lz_seg_t *seg_of_t(const lz_ctx_t *c, uint64_t t) {
  for (size_t i = 0; i < c->nsegs; i++)
    if (t >= c->segs[i].t && t < c->segs[i].t + c->segs[i].len) return &c->segs[i];
  return NULL;
}

bool lz_is_unsettled(const lz_state_t *st, const lz_ctx_t *c, uint64_t t) {
  size_t r = range_from(st, t);
  if (c->dead || r == st->nranges || t < st->ranges[2 * r]) return false;
  uint64_t p = (t - st->ranges[2 * r]) / LZ_PAGE;
  return (c->unsettled[r][p / 64] >> (p % 64)) & 1;
}

uint64_t lz_settle(lz_state_t *st, lz_ctx_t *c, uint64_t t, uint64_t len) {
  uint64_t end = t + len, n = 0;
  for (size_t r = range_from(st, t); r < st->nranges && st->ranges[2 * r] < end; r++) {
    uint64_t rs = st->ranges[2 * r], re = st->ranges[2 * r + 1];
    uint64_t a = (t > rs ? t : rs), b = (end < re ? end : re);
    for (uint64_t p = (a - rs) / LZ_PAGE, q = (b - rs + LZ_PAGE - 1) / LZ_PAGE; p < q;) {
      uint64_t w = p / 64, lo = p % 64, hi = (q - 64 * w >= 64) ? 64 : q - 64 * w;
      uint64_t mask = (hi == 64 ? ~0ull : ((1ull << hi) - 1)) & ~((1ull << lo) - 1);
      n += (uint64_t)__builtin_popcountll(c->unsettled[r][w] & mask);
      c->unsettled[r][w] &= ~mask;
      p = 64 * w + hi;
    }
  }
  c->nunsettled -= n;
  return n;
}

/* Remove current addresses [s, e) from c's segments; the pieces removed are
 * appended to *cut (capacity c->nsegs). 0 or ENOMEM. */
static int cut_segs(lz_ctx_t *c, uint64_t s, uint64_t e, lz_seg_t *cut, size_t *ncut) {
  lz_seg_t *kept = malloc((c->nsegs + 2) * sizeof *kept);
  if (kept == NULL) return ENOMEM;
  size_t k = 0;
  *ncut = 0;
  for (size_t i = 0; i < c->nsegs; i++) {
    lz_seg_t g = c->segs[i];
    uint64_t ge = g.cur + g.len;
    if (ge <= s || g.cur >= e) {
      kept[k++] = g;
      continue;
    }
    if (g.cur < s) kept[k++] = (lz_seg_t){.t = g.t, .cur = g.cur, .len = s - g.cur};
    uint64_t a = g.cur > s ? g.cur : s, b = ge < e ? ge : e;
    cut[(*ncut)++] = (lz_seg_t){.t = g.t + (a - g.cur), .cur = a, .len = b - a};
    if (ge > e) kept[k++] = (lz_seg_t){.t = g.t + (e - g.cur), .cur = e, .len = ge - e};
  }
  free(c->segs);
  c->segs = kept;
  c->nsegs = k;
  c->segcap = c->nsegs + 2;
  return 0;
}

static int seg_cmp(const void *a, const void *b) {
  uint64_t x = ((const lz_seg_t *)a)->cur, y = ((const lz_seg_t *)b)->cur;
  return x < y ? -1 : x > y;
}

/* Queued zero pages of ci in [s, e) only wake their thread now: the range
 * changed under them, the refault is judged again. */
static void zq_to_wake(lz_state_t *st, unsigned ci, uint64_t s, uint64_t e) {
  for (size_t i = 0; i < st->nzq; i++)
    if (st->zq[i].ctx == ci && st->zq[i].cur >= s && st->zq[i].cur < e) st->zq[i].cur |= 1; /* bit 0: wake only */
}

static void wake(int fd, uint64_t s, uint64_t len) {
  struct uffdio_range r = {.start = s, .len = len};
  /* SAFETY: wakes the threads blocked on a missing fault in the range (none: no-op); no mm access. */
  ioctl(fd, UFFDIO_WAKE, &r);
}

static int add_ctx_from_fork(lz_state_t *st, unsigned parent, int fd) {
  if (st->nctxs == LZ_MAX_CTXS) return EMFILE;
  lz_ctx_t *c = ctx_new(st, st->ctxs[parent]);
  if (c == NULL) return ENOMEM;
  c->fd = fd;
  c->owned = true;
  st->ctxs[st->nctxs++] = c;
  return 0;
}

int lz_apply_event(lz_state_t *st, unsigned ci, const struct uffd_msg *m) {
  lz_ctx_t *c = st->ctxs[ci];
  st->events++;
  switch (m->event) {
  case UFFD_EVENT_FORK: {
    /* The child's mm is a copy of the parent's now: what is present here is
     * there too, what is missing here is missing there, same addresses. */
    int fd = (int)m->arg.fork.ufd;
    int err = add_ctx_from_fork(st, ci, fd);
    if (err != 0) return err; /* the caller closes fd: the child's context is released (unregistered) */
    return 0;
  }
  case UFFD_EVENT_REMOVE:
  case UFFD_EVENT_UNMAP: {
    uint64_t s = m->arg.remove.start, e = m->arg.remove.end;
    zq_to_wake(st, ci, s, e);
    bool pending = drop_pending(st, ci, s, e);
    if (m->event == UFFD_EVENT_REMOVE) {
      /* Zapped right after this read: those pages read zero from now on. */
      for (size_t i = 0; i < c->nsegs; i++) {
        lz_seg_t g = c->segs[i];
        uint64_t a = g.cur > s ? g.cur : s, b = g.cur + g.len < e ? g.cur + g.len : e;
        if (a < b) lz_settle(st, c, g.t + (a - g.cur), b - a);
      }
    } else {
      lz_seg_t *cut = malloc((c->nsegs + 1) * sizeof *cut);
      size_t ncut = 0;
      if (cut == NULL || cut_segs(c, s, e, cut, &ncut) != 0) {
        free(cut);
        return ENOMEM;
      }
      for (size_t i = 0; i < ncut; i++) st->gone += lz_settle(st, c, cut[i].t, cut[i].len);
      free(cut);
    }
    if (pending) wake(c->fd, s, e - s);
    return 0;
  }
  case UFFD_EVENT_REMAP: {
    uint64_t from = m->arg.remap.from, to = m->arg.remap.to, len = m->arg.remap.len;
    zq_to_wake(st, ci, from, from + len);
    zq_to_wake(st, ci, to, to + len);
    bool pending = drop_pending(st, ci, from, from + len);
    lz_seg_t *cut = malloc((c->nsegs + 1) * sizeof *cut);
    size_t ncut = 0;
    if (cut == NULL || cut_segs(c, from, from + len, cut, &ncut) != 0) {
      free(cut);
      return ENOMEM;
    }
    if (c->nsegs + ncut > c->segcap) {
      lz_seg_t *grown = realloc(c->segs, (c->nsegs + ncut) * sizeof *grown);
      if (grown == NULL) {
        free(cut);
        return ENOMEM;
      }
      c->segs = grown;
      c->segcap = c->nsegs + ncut;
    }
    for (size_t i = 0; i < ncut; i++) c->segs[c->nsegs++] = (lz_seg_t){.t = cut[i].t, .cur = to + (cut[i].cur - from), .len = cut[i].len};
    free(cut);
    qsort(c->segs, c->nsegs, sizeof *c->segs, seg_cmp);
    if (pending) wake(c->fd, from, len);
    return 0;
  }
  default:
    st->events--;
    return 0;
  }
}

static int push_zero(lz_state_t *st, unsigned ci, uint64_t cur, uint64_t read_ns) {
  if (st->nzq == st->zqcap) {
    size_t cap = st->zqcap ? 2 * st->zqcap : 64;
    lz_zero_t *grown = realloc(st->zq, cap * sizeof *grown);
    if (grown == NULL) return ENOMEM;
    st->zq = grown;
    st->zqcap = cap;
  }
  st->zq[st->nzq++] = (lz_zero_t){.ctx = ci, .cur = cur, .read_ns = read_ns};
  return 0;
}

int lz_take_fault(lz_state_t *st, unsigned ci, const struct uffd_msg *m, uint64_t read_ns) {
  lz_ctx_t *c = st->ctxs[ci];
  uint64_t cur = m->arg.pagefault.address & ~(LZ_PAGE - 1), t;
  st->faults++;
  if (!lz_cur_to_t(c, cur, &t) || !lz_is_unsettled(st, c, t)) return push_zero(st, ci, cur, read_ns);
  for (size_t i = 0; i < st->npend; i++)
    if (st->pend[i].ctx == ci && st->pend[i].t == t) return 0; /* reported already; its fill wakes this one too */
  if (st->npend == st->pendcap) {
    size_t cap = st->pendcap ? 2 * st->pendcap : 64;
    lz_pending_t *grown = realloc(st->pend, cap * sizeof *grown);
    if (grown == NULL) return ENOMEM;
    st->pend = grown;
    st->pendcap = cap;
  }
  st->pend[st->npend++] = (lz_pending_t){.ctx = ci, .t = t, .cur = cur, .read_ns = read_ns};
  for (size_t i = 0; i < st->nreport; i++)
    if (st->report[i] == t) return 0;
  if (st->nreport == st->reportcap) {
    size_t cap = st->reportcap ? 2 * st->reportcap : 64;
    uint64_t *grown = realloc(st->report, cap * sizeof *grown);
    if (grown == NULL) return ENOMEM;
    st->report = grown;
    st->reportcap = cap;
  }
  st->report[st->nreport++] = t;
  return 0;
}

size_t lz_serve_zero_queue(lz_state_t *st) {
  size_t k = 0;
  for (size_t i = 0; i < st->nzq; i++) {
    lz_zero_t z = st->zq[i];
    lz_ctx_t *c = st->ctxs[z.ctx];
    uint64_t page = z.cur & ~(LZ_PAGE - 1);
    if (c->dead) continue;
    if (z.cur & 1) {
      wake(c->fd, page, LZ_PAGE);
      continue;
    }
    struct uffdio_zeropage zp = {.range = {.start = page, .len = LZ_PAGE}, .mode = 0};
    /* SAFETY: maps the zero page at a missing page of a registered anonymous
     * vma and wakes its waiters; EEXIST if a page is there already, ENOENT if
     * no registered vma covers it, EAGAIN while the mm is changing. */
    if (ioctl(c->fd, UFFDIO_ZEROPAGE, &zp) == 0) {
      st->zeroed++;
      lz_record_latency(st, z.read_ns);
      continue;
    }
    int err = errno;
    if (err == EAGAIN) {
      st->zq[k++] = z;
    } else if (err == ESRCH) {
      lz_ctx_kill(st, z.ctx);
    } else {
      if (err != EEXIST && err != ENOENT) lz_set_error(st, err, "ioctl(UFFDIO_ZEROPAGE) for a settled page");
      wake(c->fd, page, LZ_PAGE);
      lz_record_latency(st, z.read_ns);
    }
  }
  st->nzq = k;
  return k;
}

/* The first unsettled page of c at or after pos, below end. */
static bool first_unsettled(const lz_state_t *st, const lz_ctx_t *c, uint64_t pos, uint64_t end, uint64_t *out) {
  for (size_t r = range_from(st, pos); r < st->nranges && st->ranges[2 * r] < end; r++) {
    uint64_t rs = st->ranges[2 * r];
    uint64_t p = pos > rs ? (pos - rs) / LZ_PAGE : 0, pages = range_pages(st, r);
    while (p < pages) {
      uint64_t bits = c->unsettled[r][p / 64] >> (p % 64);
      if (bits == 0) {
        p = (p / 64 + 1) * 64;
        continue;
      }
      p += (uint64_t)__builtin_ctzll(bits);
      if (p >= pages || rs + p * LZ_PAGE >= end) return false;
      *out = rs + p * LZ_PAGE;
      return true;
    }
  }
  return false;
}

bool lz_next_run(const lz_state_t *st, const lz_ctx_t *c, uint64_t pos, uint64_t end, uint64_t max, uint64_t *t, uint64_t *cur, uint64_t *len) {
  uint64_t a;
  while (first_unsettled(st, c, pos, end, &a)) {
    const lz_seg_t *g = seg_of_t(c, a);
    if (g == NULL) {
      /* Unsettled with nowhere to live cannot happen (an unmap settles); never fill it. */
      lz_settle((lz_state_t *)st, (lz_ctx_t *)c, a, LZ_PAGE);
      pos = a + LZ_PAGE;
      continue;
    }
    uint64_t b = a + LZ_PAGE, limit = g->t + g->len;
    if (limit > end) limit = end;
    while (b < limit && b - a < max && lz_is_unsettled(st, c, b)) b += LZ_PAGE;
    *t = a;
    *cur = g->cur + (a - g->t);
    *len = b - a;
    return true;
  }
  return false;
}

uint64_t lz_filled(lz_state_t *st, unsigned ci, uint64_t t, uint64_t len) {
  uint64_t matched = 0;
  size_t k = 0;
  for (size_t i = 0; i < st->npend; i++) {
    lz_pending_t p = st->pend[i];
    if (p.ctx == ci && p.t >= t && p.t < t + len) {
      matched++;
      lz_record_latency(st, p.read_ns);
    } else {
      st->pend[k++] = p;
    }
  }
  st->npend = k;
  uint64_t n = lz_settle(st, st->ctxs[ci], t, len);
  st->on_demand += matched;
  st->prefetched += n > matched ? n - matched : 0;
  return n;
}

void lz_unfillable(lz_state_t *st, unsigned ci, uint64_t t, bool gone) {
  lz_ctx_t *c = st->ctxs[ci];
  bool any = false;
  uint64_t cur = 0;
  size_t k = 0;
  for (size_t i = 0; i < st->npend; i++) {
    lz_pending_t p = st->pend[i];
    if (p.ctx == ci && p.t == t) {
      any = true;
      cur = p.cur;
      lz_record_latency(st, p.read_ns);
    } else {
      st->pend[k++] = p;
    }
  }
  st->npend = k;
  uint64_t n = lz_settle(st, c, t, LZ_PAGE);
  if (gone) st->gone += n;
  if (any) wake(c->fd, cur, LZ_PAGE);
}

void lz_probe_contexts(lz_state_t *st, bool all) {
  for (unsigned i = 0; i < st->nctxs; i++) {
    lz_ctx_t *c = st->ctxs[i];
    if (c->dead || (!all && c->nunsettled == 0) || c->nsegs == 0) continue;
    struct uffdio_continue probe = {.range = {.start = c->segs[0].cur, .len = LZ_PAGE}, .mode = UFFDIO_CONTINUE_MODE_DONTWAKE};
    /* SAFETY: CONTINUE is refused (EINVAL) on an anonymous vma and ENOENT
     * without one, so it changes nothing; ESRCH means the mm is gone. */
    if (ioctl(c->fd, UFFDIO_CONTINUE, &probe) != 0 && errno == ESRCH) lz_ctx_kill(st, i);
  }
}

int lz_pending_runs(const lz_state_t *st, uint64_t start, uint64_t end, uint64_t **out, size_t *npairs) {
  uint64_t *pairs = NULL;
  size_t n = 0, cap = 0;
  for (size_t r = range_from(st, start); r < st->nranges && st->ranges[2 * r] < end; r++) {
    uint64_t rs = st->ranges[2 * r];
    uint64_t pages = range_pages(st, r);
    uint64_t p0 = start > rs ? (start - rs) / LZ_PAGE : 0;
    uint64_t p1 = (end - rs + LZ_PAGE - 1) / LZ_PAGE;
    if (p1 > pages) p1 = pages;
    for (uint64_t p = p0; p < p1;) {
      uint64_t w = p / 64, bits = 0;
      for (unsigned i = 0; i < st->nctxs; i++)
        if (!st->ctxs[i]->dead) bits |= st->ctxs[i]->unsettled[r][w];
      bits >>= p % 64;
      if (bits == 0) {
        p = (w + 1) * 64;
        continue;
      }
      uint64_t adv = (uint64_t)__builtin_ctzll(bits);
      p += adv;
      if (p >= p1) break;
      uint64_t a = rs + p * LZ_PAGE;
      if (n > 0 && pairs[2 * n - 2] + pairs[2 * n - 1] == a) {
        pairs[2 * n - 1] += LZ_PAGE;
      } else {
        if (n == cap) {
          cap = cap ? 2 * cap : 64;
          uint64_t *grown = realloc(pairs, cap * 2 * sizeof *grown);
          if (grown == NULL) {
            free(pairs);
            return ENOMEM;
          }
          pairs = grown;
        }
        pairs[2 * n] = a;
        pairs[2 * n + 1] = LZ_PAGE;
        n++;
      }
      p++;
    }
  }
  *out = pairs;
  *npairs = n;
  return 0;
}
