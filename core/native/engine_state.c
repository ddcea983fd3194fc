/* The engine's bookkeeping: clocks, the fatal error, the lost list. */
#include "engine_internal.h"

const char *const lost_reason_names[LOST_REASON_COUNT] = {
    [LOST_UNMAPPED] = "unmapped-before-saved",
    [LOST_DISCARDED] = "discarded-before-saved",
    [LOST_READ_FAILED] = "read-failed",
    [LOST_INTERRUPTED] = "interrupted",
    [LOST_SHARED] = "shared-with-other-process",
    [LOST_FILE_CHANGED] = "file-changed-before-saved",
    [LOST_TARGET_EXITED] = "target-exited",
    [LOST_TARGET_EXEC] = "target-exec",
    [LOST_VANISHED] = "vanished-before-saved",
};

const char *const zero_reason_names[ZERO_REASON_COUNT] = {
    [ZERO_MARKER] = "marker",
    [ZERO_SHARED_ZERO_PAGE] = "sharedZeroPage",
    [ZERO_HUGE_ZERO_PAGE] = "hugeZeroPage",
    [ZERO_FILE_HOLE] = "fileHole",
    [ZERO_SPARSE] = "sparse",
};

/* n pages found zero at T, and how (the stats' zeroPagesBy). */
void count_zero(engine_t *e, int why, uint64_t n) {
  atomic_fetch_add(&e->pages_zero, n);
  atomic_fetch_add(&e->zero_by[why], n);
}

double mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

uint64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void set_fatal(engine_t *e, int err, const char *what) {
  if (e->fatal_err) return;
  e->fatal_err = err;
  snprintf(e->fatal_what, sizeof e->fatal_what, "%s", what);
}

/* ---------- lost ranges ---------- */

void add_lost(engine_t *e, uint64_t t_addr, uint64_t pages, int reason) {
  if (pages == 0) return;
  atomic_fetch_add(&e->pages_lost, pages);
  if (e->nlost > 0) {
    lost_t *last = &e->lost[e->nlost - 1];
    if (last->reason == reason && last->address + last->pages * PG == t_addr) {
      last->pages += pages;
      return;
    }
  }
  if (e->nlost == e->lost_cap) {
    size_t cap = e->lost_cap ? e->lost_cap * 2 : 64;
    lost_t *grown = realloc(e->lost, cap * sizeof(lost_t));
    if (grown == NULL) {
      /* The pages stay counted lost; the snapshot fails, so none is taken as saved. */
      set_fatal(e, ENOMEM, "grow the lost list");
      return;
    }
    e->lost = grown;
    e->lost_cap = cap;
  }
  e->lost[e->nlost++] = (lost_t){t_addr, pages, reason};
}

/* Every page of a segment not saved yet is lost, for this reason. */
void lose_unsaved(engine_t *e, segment_t *s, int reason) {
  uint64_t run_start = 0, run = 0;
  for (uint64_t o = 0; o < s->len; o += PG) {
    if (s->state[o / PG] == PAGE_UNSAVED) {
      s->state[o / PG] = PAGE_LOST;
      if (run == 0) run_start = s->t_start + o;
      run++;
    } else if (run) {
      add_lost(e, run_start, run, reason);
      run = 0;
    }
  }
  if (run) add_lost(e, run_start, run, reason);
}

/* The engine's threads serve the target's write faults: they run as normal
 * threads at ENGINE_NICE whatever the thread that started them runs as (the
 * store's threads run at idle priority, SCHED_IDLE, and a new thread inherits
 * its creator's policy). Per-thread on Linux; without the privilege to raise
 * its priority a thread stays at the process's nice. */
void engine_thread_priority(void) {
  struct sched_param none = {0};
  (void)sched_setscheduler(0, SCHED_OTHER, &none);
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), ENGINE_NICE);
}

/* The engine thread's nice now (engine thread only): only a change costs a syscall. */
void engine_nice(engine_t *e, int nice) {
  if (e->cur_nice == nice) return;
  if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) == 0) e->cur_nice = nice;
}
