/* The userfaultfd message loop (see fault_loop.h). */
#include "fault_loop.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MSG_BATCH 64

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool queue_fault(fault_loop_t *l, unsigned source, const struct uffd_msg *m) {
  if (l->npending == l->pending_cap) {
    size_t cap = l->pending_cap ? l->pending_cap * 2 : 64;
    fault_loop_msg_t *grown = realloc(l->pending, cap * sizeof *grown);
    if (grown == NULL) return false;
    l->pending = grown;
    l->pending_cap = cap;
  }
  l->pending[l->npending++] = (fault_loop_msg_t){.msg = *m, .source = source};
  return true;
}

/* One read() of one userfaultfd. -1 when it had nothing (EAGAIN). */
static int read_one_locked(fault_loop_t *l, unsigned source);

static int read_one(fault_loop_t *l, unsigned source) {
  if (l->ops->lock != NULL) l->ops->lock(l->owner);
  int n = read_one_locked(l, source);
  if (l->ops->unlock != NULL) l->ops->unlock(l->owner);
  return n;
}

static int read_one_locked(fault_loop_t *l, unsigned source) {
  struct uffd_msg msgs[MSG_BATCH];
  ssize_t r = read(l->uffds[source], msgs, sizeof msgs);
  if (r < 0) {
    if (errno != EAGAIN && errno != EINTR) l->ops->fail(l->owner, errno, "read(userfaultfd)");
    return -1;
  }
  int n = (int)(r / (ssize_t)sizeof(struct uffd_msg));
  for (int i = 0; i < n; i++) {
    if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
      l->ops->event(l->owner, source, &msgs[i]);
    } else if (!queue_fault(l, source, &msgs[i])) {
      /* The faulting thread stays blocked until the owner closes the userfaultfd, which wakes it. */
      l->ops->fail(l->owner, ENOMEM, "queue a write fault");
    }
  }
  return n;
}

int fault_loop_read(fault_loop_t *l, bool wait) {
  int total = 0;
  for (unsigned i = 0; i < l->nuffds; i++) {
    int n = read_one(l, i);
    if (n > 0) total += n;
  }
  if (total == 0 && wait) {
    /* mmap_changing is raised just before the event is queued: give it a moment. */
    struct pollfd p[FAULT_LOOP_MAX_UFFDS];
    unsigned n = l->nuffds < FAULT_LOOP_MAX_UFFDS ? l->nuffds : FAULT_LOOP_MAX_UFFDS;
    for (unsigned i = 0; i < n; i++) p[i] = (struct pollfd){.fd = l->uffds[i], .events = POLLIN};
    poll(p, n, 1);
  }
  return total;
}

void fault_loop_drain(fault_loop_t *l) {
  for (;;) {
    while (l->npending > 0 && !l->ops->failed(l->owner)) {
      fault_loop_msg_t m = l->pending[0];
      memmove(l->pending, l->pending + 1, (l->npending - 1) * sizeof m);
      l->npending--;
      l->ops->fault(l->owner, m.source, &m.msg, now_ns());
    }
    if (l->ops->failed(l->owner)) return;
    /* Events are applied as they are read, in the kernel's order, before any
     * fault of the same read is handled (read() returns pending faults first):
     * a fault handler must never act on a page whose REMOVE was read already
     * (the zap follows the read), nor apply newer events it reads itself
     * before older ones still waiting in a local batch. */
    if (fault_loop_read(l, false) <= 0) return;
  }
}

bool fault_loop_run(fault_loop_t *l) {
  if (l->nuffds == 0 || l->nuffds > FAULT_LOOP_MAX_UFFDS) {
    l->ops->fail(l->owner, EINVAL, "run the fault loop (no userfaultfd, or too many)");
    return false;
  }
  /* The userfaultfds, then the wake eventfd, then the pidfd if any. */
  struct pollfd fds[FAULT_LOOP_MAX_UFFDS + 2];
  unsigned n = 0;
  for (unsigned i = 0; i < l->nuffds; i++) fds[n++] = (struct pollfd){.fd = l->uffds[i], .events = POLLIN};
  unsigned wake = n;
  fds[n++] = (struct pollfd){.fd = l->wake_fd, .events = POLLIN};
  unsigned pid = n;
  if (l->pidfd >= 0) fds[n++] = (struct pollfd){.fd = l->pidfd, .events = POLLIN};
  while (!atomic_load(l->stop) && !l->ops->failed(l->owner)) {
    fault_loop_drain(l);
    if (l->ops->failed(l->owner)) break;
    int wait_ms = -1;
    loop_work_t w = l->ops->work(l->owner, &wait_ms);
    if (w == LOOP_PROGRESS) continue;
    if (w == LOOP_DONE) {
      fault_loop_drain(l);
      return true;
    }
    int pr = poll(fds, n, wait_ms);
    if (pr > 0 && (fds[wake].revents & POLLIN)) {
      uint64_t v;
      ssize_t ignored = read(l->wake_fd, &v, sizeof v);
      (void)ignored;
    }
    if (pr > 0 && l->pidfd >= 0 && (fds[pid].revents & POLLIN)) l->ops->target_exited(l->owner);
  }
  return false;
}

void fault_loop_free(fault_loop_t *l) {
  free(l->pending);
  l->pending = NULL;
  l->npending = l->pending_cap = 0;
}
