/* fault_loop.c used by an owner other than the snapshot engine: a page server
 * (what lazy restore needs) over two userfaultfds, as a group's controller
 * holds one per process. Each half of a region is registered for MISSING
 * faults with its own userfaultfd and filled on first touch with UFFDIO_COPY
 * from a pattern; a thread touches every page, and discards some with
 * MADV_DONTNEED (REMOVE events) before touching them again. Checks: every
 * fault served exactly once per population and read from the userfaultfd of
 * its half, each REMOVE seen before the fault it explains, the pattern
 * everywhere, the loop ends when the owner's work says so. Prints one JSON line; exit 0
 * only if everything held. Built and run by test/fault-loop.test.ts. */
#define _GNU_SOURCE
#include "fault_loop.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGES 256
#define PG 4096
#define DISCARD_FIRST 96 /* pages 96..159, across both halves, are discarded once and touched again */
#define DISCARDED 64

typedef struct {
  int uffds[2]; /* the first half of the region, the second half */
  uint8_t *base;
  uint8_t *pattern;
  unsigned served[PAGES];  /* UFFDIO_COPY per page */
  unsigned removed[PAGES]; /* REMOVE events per page */
  unsigned order_errors;   /* a second fault on a page with no REMOVE before it */
  unsigned source_errors;  /* a message read from the other half's userfaultfd */
  unsigned events, faults;
  _Atomic bool toucher_done;
  int err;
  char what[128];
} server_t;

static void fill_pattern(uint8_t *page, unsigned p, unsigned generation) {
  for (unsigned i = 0; i < PG / 8; i++) ((uint64_t *)page)[i] = ((uint64_t)generation << 48) | ((uint64_t)p << 16) | i;
}

static void on_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) {
  server_t *s = owner;
  (void)read_ns;
  uint64_t addr = m->arg.pagefault.address & ~(uint64_t)(PG - 1);
  unsigned p = (unsigned)((addr - (uint64_t)(uintptr_t)s->base) / PG);
  s->faults++;
  if (source != p / (PAGES / 2)) s->source_errors++;
  if (s->served[p] > s->removed[p]) s->order_errors++; /* served already and never discarded since */
  fill_pattern(s->pattern, p, s->served[p]);
  struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)s->pattern, .len = PG, .mode = 0};
  if (ioctl(s->uffds[source], UFFDIO_COPY, &c) != 0 && errno != EEXIST) {
    s->err = errno;
    snprintf(s->what, sizeof s->what, "UFFDIO_COPY at page %u", p);
    return;
  }
  s->served[p]++;
}

static void on_event(void *owner, unsigned source, const struct uffd_msg *m) {
  server_t *s = owner;
  s->events++;
  if (m->event != UFFD_EVENT_REMOVE) return;
  for (uint64_t a = m->arg.remove.start; a < m->arg.remove.end; a += PG) {
    unsigned p = (unsigned)((a - (uint64_t)(uintptr_t)s->base) / PG);
    if (source != p / (PAGES / 2)) s->source_errors++;
    s->removed[p]++;
  }
}

static loop_work_t work(void *owner, int *wait_ms) {
  server_t *s = owner;
  if (s->toucher_done) return LOOP_DONE;
  *wait_ms = 10;
  return LOOP_WAIT;
}

static void on_exit_(void *owner) { (void)owner; }
static void on_fail(void *owner, int err, const char *what) {
  server_t *s = owner;
  s->err = err;
  snprintf(s->what, sizeof s->what, "%s", what);
}
static bool failed(void *owner) { return ((server_t *)owner)->err != 0; }

static volatile uint64_t sink;

static void *toucher(void *arg) {
  server_t *s = arg;
  for (unsigned p = 0; p < PAGES; p++) sink += ((volatile uint64_t *)(s->base + (size_t)p * PG))[1];
  madvise(s->base + (size_t)DISCARD_FIRST * PG, DISCARDED * PG, MADV_DONTNEED);
  for (unsigned p = DISCARD_FIRST; p < DISCARD_FIRST + DISCARDED; p++) sink += ((volatile uint64_t *)(s->base + (size_t)p * PG))[1];
  s->toucher_done = true;
  return NULL;
}

int main(void) {
  static server_t s;
  s.base = mmap(NULL, PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  s.pattern = aligned_alloc(PG, PG);
  if (s.base == MAP_FAILED || s.pattern == NULL) {
    printf("{\"ok\":false,\"error\":\"setup: %s\"}\n", strerror(errno));
    return 1;
  }
  for (unsigned h = 0; h < 2; h++) {
    s.uffds[h] = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    struct uffdio_register reg = {.range = {.start = (uint64_t)(uintptr_t)(s.base + (size_t)h * (PAGES / 2) * PG), .len = (PAGES / 2) * PG},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (s.uffds[h] < 0 || ioctl(s.uffds[h], UFFDIO_API, &api) != 0 || ioctl(s.uffds[h], UFFDIO_REGISTER, &reg) != 0) {
      printf("{\"ok\":false,\"error\":\"userfaultfd %u: %s\"}\n", h, strerror(errno));
      return 1;
    }
  }
  static const fault_loop_ops_t ops = {.fault = on_fault, .event = on_event, .work = work, .target_exited = on_exit_, .fail = on_fail, .failed = failed};
  static _Atomic bool stop;
  fault_loop_t loop = {.uffds = s.uffds, .nuffds = 2, .wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), .pidfd = -1, .ops = &ops, .owner = &s, .stop = &stop};
  pthread_t t;
  pthread_create(&t, NULL, toucher, &s);
  bool done = fault_loop_run(&loop);
  pthread_join(t, NULL);
  fault_loop_free(&loop);

  unsigned wrong = 0, unserved = 0, removed_pages = 0;
  for (unsigned p = 0; p < PAGES; p++) {
    unsigned generations = p >= DISCARD_FIRST && p < DISCARD_FIRST + DISCARDED ? 2 : 1;
    if (s.served[p] != generations) unserved++;
    removed_pages += s.removed[p] != 0;
    uint8_t expect[PG];
    fill_pattern(expect, p, generations - 1);
    if (memcmp(s.base + (size_t)p * PG, expect, PG) != 0) wrong++;
  }
  bool ok = done && s.err == 0 && wrong == 0 && unserved == 0 && s.order_errors == 0 && s.source_errors == 0 && removed_pages == DISCARDED &&
            s.faults == PAGES + DISCARDED;
  printf("{\"ok\":%s,\"done\":%s,\"faults\":%u,\"events\":%u,\"removedPages\":%u,\"wrongPages\":%u,\"unservedPages\":%u,\"orderErrors\":%u,\"sourceErrors\":%u,\"error\":\"%s\"}\n",
         ok ? "true" : "false", done ? "true" : "false", s.faults, s.events, removed_pages, wrong, unserved, s.order_errors, s.source_errors, s.what);
  return ok ? 0 : 1;
}
