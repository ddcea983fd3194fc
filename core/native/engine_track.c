/* Pre-protection: the engine thread's first mode, before the pause.
 *
 * The target's mappings are write-protected while it runs (JS protects them;
 * this thread serves what follows). A write fault is let through at once
 * (unprotect + wake) and its page remembered as written; events remember the
 * ranges they change. In the pause, only what was written since (and what
 * changed) needs protecting again: the pause grows with what the target
 * writes, not with its size.
 *
 * Ordering (what makes a page protected at T exact): a written page is
 * recorded only once its unprotect returned. JS protects again what it took
 * from the log; a page whose unprotect was still running when JS took the log
 * is recorded after the take and goes to the next take. So no page is left
 * unprotected without being in the log: at T, every page of a pre-protected
 * range not in the final log has been protected, unwritten, since its last
 * protection. */
#include "engine_internal.h"

static void log_add(engine_t *e, track_log_t *log, uint64_t start, uint64_t len) {
  pthread_mutex_lock(&e->track_lock);
  if (log->n > 0 && log->pairs[2 * (log->n - 1)] + log->pairs[2 * (log->n - 1) + 1] == start) {
    log->pairs[2 * (log->n - 1) + 1] += len; /* extends the last run */
  } else {
    if (log->n == log->cap) {
      size_t cap = log->cap ? log->cap * 2 : 1024;
      uint64_t *grown = realloc(log->pairs, cap * 2 * sizeof(uint64_t));
      if (grown == NULL) {
        /* Nothing recorded is not safe: JS must protect everything again. */
        log->overflowed = true;
        pthread_mutex_unlock(&e->track_lock);
        return;
      }
      log->pairs = grown;
      log->cap = cap;
    }
    log->pairs[2 * log->n] = start;
    log->pairs[2 * log->n + 1] = len;
    log->n++;
  }
  pthread_mutex_unlock(&e->track_lock);
}

/* The protection unit of the page at addr: the hugetlb page size in a hugetlb range, else 4 KiB. */
static uint64_t unit_of(engine_t *e, uint64_t addr) {
  size_t lo = 0, hi = e->ntrack_ranges;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const uint64_t *r = &e->track_ranges[3 * mid];
    if (addr < r[0]) hi = mid;
    else if (addr >= r[1]) lo = mid + 1;
    else return r[2];
  }
  return PG;
}

static void track_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) {
  engine_t *e = owner;
  uint64_t addr = m->arg.pagefault.address;
  uint64_t unit = unit_of(e, addr);
  /* A transparent huge page is let through whole: unprotecting 4 KiB of it
   * would split its PMD mapping, and the target would lose the huge page. */
  struct wpsnap_page_region huge;
  uint64_t block = addr & ~(THP_BYTES - 1);
  if (unit == PG && find_huge(e, block, block + THP_BYTES, &huge) && huge.start <= addr && addr < huge.end) unit = THP_BYTES;
  uint64_t start = addr & ~(unit - 1);
  for (;;) {
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = unit}, .mode = 0};
    if (ioctl(e->uffd, UFFDIO_WRITEPROTECT, &wp) == 0) break;
    if (errno == EAGAIN) { /* an event is pending: read it (it is applied as read), then again */
      fault_loop_read(&e->loop, true);
      continue;
    }
    /* The range changed under the fault (unmapped, moved): wake the thread, it faults again if it must. */
    struct uffdio_range r = {.start = start, .len = unit};
    (void)ioctl(e->uffd, UFFDIO_WAKE, &r);
    break;
  }
  log_add(e, &e->track_dirty, start, unit); /* after the unprotect: see the top of this file */
  atomic_fetch_add(&e->track_faults, 1);
}

static void track_event(void *owner, unsigned source, const struct uffd_msg *m) {
  engine_t *e = owner;
  switch (m->event) {
  case UFFD_EVENT_REMOVE: /* zapped: empty now, its markers may be gone */
    log_add(e, &e->track_dirty, m->arg.remove.start, m->arg.remove.end - m->arg.remove.start);
    break;
  case UFFD_EVENT_UNMAP:
    log_add(e, &e->track_invalid, m->arg.remove.start, m->arg.remove.end - m->arg.remove.start);
    break;
  case UFFD_EVENT_REMAP: /* moved: the old range is gone, the new one is protected again whole */
    log_add(e, &e->track_invalid, m->arg.remap.from, m->arg.remap.len);
    log_add(e, &e->track_dirty, m->arg.remap.to, m->arg.remap.len);
    break;
  case UFFD_EVENT_FORK:
    /* The child may now write shared memory without faulting here: JS
     * protects shared ranges again whole. Closing the child's context
     * releases the child. */
    atomic_fetch_add(&e->track_forks, 1);
    close((int)m->arg.fork.ufd);
    break;
  default:
    break;
  }
}

static loop_work_t track_work(void *owner, int *wait_ms) {
  engine_t *e = owner;
  if (atomic_load(&e->track_stop)) return LOOP_DONE; /* fault_loop_run drains what is pending first */
  *wait_ms = -1;
  return LOOP_WAIT;
}

static void track_target_exited(void *owner) { set_fatal(owner, ESRCH, "target exited before the snapshot's instant"); }
static void track_fail(void *owner, int err, const char *what) { set_fatal(owner, err, what); }
static bool track_failed(void *owner) { return ((engine_t *)owner)->fatal_err != 0; }

static const fault_loop_ops_t track_loop_ops = {
    .fault = track_fault,
    .event = track_event,
    .work = track_work,
    .target_exited = track_target_exited,
    .fail = track_fail,
    .failed = track_failed,
};

/* Tracking ends only through track_work (LOOP_DONE, after a last drain):
 * an interrupt (engineStop) must not leave the target's writes to
 * pre-protected pages unserved until the pause; the engine's run after the
 * pause ends at once instead. */
static _Atomic bool never_stop = false;

/* The engine thread in tracking mode, until engineTrackTake(stop). */
void track_main(engine_t *e) {
  e->loop = (fault_loop_t){.uffds = &e->uffd, .nuffds = 1, .wake_fd = e->wake_fd, .pidfd = e->pidfd, .ops = &track_loop_ops, .owner = e, .stop = &never_stop};
  fault_loop_run(&e->loop);
  fault_loop_free(&e->loop);
}

/* Hand the logs over and start new ones. */
void track_take(engine_t *e, track_log_t *dirty, track_log_t *invalid) {
  pthread_mutex_lock(&e->track_lock);
  *dirty = e->track_dirty;
  *invalid = e->track_invalid;
  e->track_dirty = (track_log_t){0};
  e->track_invalid = (track_log_t){0};
  pthread_mutex_unlock(&e->track_lock);
}
