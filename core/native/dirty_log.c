/* The write-tracking log and handlers (see dirty_log.h). */
#include "dirty_log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define PG 4096ULL
#define THP_BYTES (2ull << 20)

void track_state_init(track_state_t *t, int uffd, int pagemap_fd, fault_loop_t *loop) {
  memset(t, 0, sizeof *t);
  t->uffd = uffd;
  t->pagemap_fd = pagemap_fd;
  t->loop = loop;
  pthread_mutex_init(&t->lock, NULL);
}

void track_state_free(track_state_t *t) {
  free(t->ranges);
  free(t->dirty.pairs);
  free(t->invalid.pairs);
  t->ranges = t->dirty.pairs = t->invalid.pairs = NULL;
  pthread_mutex_destroy(&t->lock);
}

int track_set_ranges(track_state_t *t, const uint64_t *triples, size_t n) {
  uint64_t *copy = malloc((n ? n : 1) * 3 * sizeof(uint64_t));
  if (copy == NULL) return ENOMEM;
  if (n) memcpy(copy, triples, n * 3 * sizeof(uint64_t));
  pthread_mutex_lock(&t->lock);
  free(t->ranges);
  t->ranges = copy;
  t->nranges = n;
  pthread_mutex_unlock(&t->lock);
  return 0;
}

static void log_add(track_state_t *t, track_log_t *log, uint64_t start, uint64_t len) {
  pthread_mutex_lock(&t->lock);
  if (log->n > 0 && log->pairs[2 * (log->n - 1)] + log->pairs[2 * (log->n - 1) + 1] == start) {
    log->pairs[2 * (log->n - 1) + 1] += len; /* extends the last run */
  } else {
    if (log->n == log->cap) {
      size_t cap = log->cap ? log->cap * 2 : 1024;
      uint64_t *grown = realloc(log->pairs, cap * 2 * sizeof(uint64_t));
      if (grown == NULL) {
        /* Nothing recorded is not safe: the reader must count everything as written. */
        log->overflowed = true;
        pthread_mutex_unlock(&t->lock);
        return;
      }
      log->pairs = grown;
      log->cap = cap;
    }
    log->pairs[2 * log->n] = start;
    log->pairs[2 * log->n + 1] = len;
    log->n++;
  }
  pthread_mutex_unlock(&t->lock);
}

/* The protection unit of the page at addr: the hugetlb page size in a hugetlb range, else 4 KiB. */
static uint64_t unit_of(track_state_t *t, uint64_t addr) {
  pthread_mutex_lock(&t->lock);
  uint64_t unit = PG;
  size_t lo = 0, hi = t->nranges;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const uint64_t *r = &t->ranges[3 * mid];
    if (addr < r[0]) hi = mid;
    else if (addr >= r[1]) lo = mid + 1;
    else {
      unit = r[2];
      break;
    }
  }
  pthread_mutex_unlock(&t->lock);
  return unit;
}

bool pagemap_find_huge(int pagemap_fd, uint64_t addr, uint64_t end, struct wpsnap_page_region *r) {
  struct wpsnap_pm_scan_arg arg = {
      .size = sizeof arg,
      .start = addr,
      .end = end,
      .vec = (uint64_t)(uintptr_t)r,
      .vec_len = 1,
      .category_anyof_mask = PAGE_IS_HUGE,
      .return_mask = PAGE_IS_HUGE | PAGE_IS_PFNZERO,
  };
  /* SAFETY: a read-only walk of the target's page tables; EINVAL/ENOTTY on a
   * kernel without PAGEMAP_SCAN leaves everything in 4 KiB units. */
  return ioctl(pagemap_fd, PAGEMAP_SCAN, &arg) == 1;
}

void track_on_fault(track_state_t *t, const struct uffd_msg *m) {
  uint64_t addr = m->arg.pagefault.address;
  uint64_t unit = unit_of(t, addr);
  /* A transparent huge page is let through whole: unprotecting 4 KiB of it
   * would split its PMD mapping, and the target would lose the huge page. */
  struct wpsnap_page_region huge;
  uint64_t block = addr & ~(THP_BYTES - 1);
  if (unit == PG && pagemap_find_huge(t->pagemap_fd, block, block + THP_BYTES, &huge) && huge.start <= addr && addr < huge.end) unit = THP_BYTES;
  uint64_t start = addr & ~(unit - 1);
  for (;;) {
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = unit}, .mode = 0};
    if (ioctl(t->uffd, UFFDIO_WRITEPROTECT, &wp) == 0) break;
    if (errno == EAGAIN) { /* an event is pending: read it (it is applied as read), then again */
      fault_loop_read(t->loop, true);
      continue;
    }
    /* The range changed under the fault (unmapped, moved): wake the thread, it faults again if it must. */
    struct uffdio_range r = {.start = start, .len = unit};
    (void)ioctl(t->uffd, UFFDIO_WAKE, &r);
    break;
  }
  /* Logged after the unprotect returned: a reader that protects again what it
   * took can never leave a page unprotected and unlogged. */
  log_add(t, &t->dirty, start, unit);
  atomic_fetch_add(&t->faults, 1);
}

void track_log_written(track_state_t *t, uint64_t start, uint64_t len) { log_add(t, &t->dirty, start, len); }

void track_log_event(track_state_t *t, const struct uffd_msg *m) {
  switch (m->event) {
  case UFFD_EVENT_REMOVE: /* zapped: empty now, its markers may be gone */
    log_add(t, &t->dirty, m->arg.remove.start, m->arg.remove.end - m->arg.remove.start);
    break;
  case UFFD_EVENT_UNMAP:
    log_add(t, &t->invalid, m->arg.remove.start, m->arg.remove.end - m->arg.remove.start);
    break;
  case UFFD_EVENT_REMAP: /* moved: the old range is gone, the new one counts as written whole */
    log_add(t, &t->invalid, m->arg.remap.from, m->arg.remap.len);
    log_add(t, &t->dirty, m->arg.remap.to, m->arg.remap.len);
    break;
  default:
    break;
  }
}

void track_on_event(track_state_t *t, const struct uffd_msg *m) {
  if (m->event != UFFD_EVENT_FORK) {
    track_log_event(t, m);
    return;
  }
  /* The child may now write shared memory without faulting here: shared
   * ranges count as written whole. Closing the child's context releases the child. */
  atomic_fetch_add(&t->forks, 1);
  close((int)m->arg.fork.ufd);
}

void track_take(track_state_t *t, track_log_t *dirty, track_log_t *invalid) {
  pthread_mutex_lock(&t->lock);
  *dirty = t->dirty;
  *invalid = t->invalid;
  t->dirty = (track_log_t){0};
  t->invalid = (track_log_t){0};
  pthread_mutex_unlock(&t->lock);
}

napi_value track_take_object(napi_env env, track_state_t *t) {
  track_log_t dirty, invalid;
  track_take(t, &dirty, &invalid);
  napi_value o, overflowed;
  napi_create_object(env, &o);
  set_prop(env, o, "written", track_log_array(env, &dirty));
  set_prop(env, o, "invalid", track_log_array(env, &invalid));
  napi_get_boolean(env, dirty.overflowed || invalid.overflowed, &overflowed);
  set_prop(env, o, "overflowed", overflowed);
  set_prop(env, o, "faults", make_double(env, (double)atomic_load(&t->faults)));
  set_prop(env, o, "forks", make_double(env, (double)atomic_load(&t->forks)));
  free(dirty.pairs);
  free(invalid.pairs);
  return o;
}

napi_value track_log_array(napi_env env, const track_log_t *log) {
  napi_value ab, arr;
  void *data;
  napi_create_arraybuffer(env, log->n * 2 * sizeof(uint64_t), &data, &ab);
  if (log->n) memcpy(data, log->pairs, log->n * 2 * sizeof(uint64_t));
  napi_create_typedarray(env, napi_biguint64_array, log->n * 2, ab, 0, &arr);
  return arr;
}
