/* The userfaultfd message loop, for any owner of userfaultfds: the snapshot
 * engine today (one), dirty tracking, the lazy-restore page server and a
 * process group's controller (one per process) next. It knows
 * the kernel's rules and nothing of what the owner does with a fault:
 *  - read() returns pending faults before events, and an event's sender (the
 *    thread doing munmap, mremap, MADV_DONTNEED, fork) waits for the read,
 *    with the context's mmap_changing raised (our ioctls fail with EAGAIN)
 *    until it runs again. So events are applied the moment they are read,
 *    faults are queued and handled afterwards, in the order read.
 *  - POLLIN may be followed by nothing to read (seed 003): not an error.
 *  - Between messages the owner's background work runs (the snapshot's sweep).
 * Not thread-safe: one loop per thread; only `stop` and the wake eventfd are
 * touched from other threads. */
#ifndef WPSNAP_FAULT_LOOP_H
#define WPSNAP_FAULT_LOOP_H

#include "kernel_compat.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
  LOOP_PROGRESS, /* work was done: run again at once (after pending messages) */
  LOOP_DONE,     /* the work is finished: the loop ends */
  LOOP_WAIT,     /* nothing to do for *wait_ms (-1: until a message or a wake) */
} loop_work_t;

/* `source` below is the index, in the loop's uffds[], of the userfaultfd the
 * message was read from. */
typedef struct {
  /* A page fault, handled after every event read before it. */
  void (*fault)(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns);
  /* A non-cooperative event (REMOVE, UNMAP, REMAP, FORK): applied at once. */
  void (*event)(void *owner, unsigned source, const struct uffd_msg *m);
  /* Background work between messages. */
  loop_work_t (*work)(void *owner, int *wait_ms);
  /* The pidfd became readable: the target exited. */
  void (*target_exited)(void *owner);
  /* The loop could not go on (a read error, no memory): err is an errno. */
  void (*fail)(void *owner, int err, const char *what);
  /* Has the owner failed? The loop stops then. */
  bool (*failed)(void *owner);
  /* Optional: held around each read() and the events it returns. A process group's engines
   * (engine_group.c) take their lock: the read completes an event (a MADV_REMOVE then punches
   * its hole), so no other engine may be copying meanwhile. */
  void (*lock)(void *owner);
  void (*unlock)(void *owner);
} fault_loop_ops_t;

typedef struct {
  struct uffd_msg msg;
  unsigned source;
} fault_loop_msg_t;

/* The most userfaultfds one loop polls (a group's processes beyond it need another loop). */
#define FAULT_LOOP_MAX_UFFDS 256

typedef struct {
  const int *uffds; /* owned by the owner */
  unsigned nuffds;
  int wake_fd; /* eventfd: another thread wants the loop to look at `stop` or at released resources */
  int pidfd;   /* -1 if none */
  const fault_loop_ops_t *ops;
  void *owner;
  _Atomic bool *stop;
  fault_loop_msg_t *pending; /* faults read, not yet handled */
  size_t npending, pending_cap;
} fault_loop_t;

/* Read what each userfaultfd has (waiting at most 1 ms for a raised
 * mmap_changing to turn into an event when `wait` and nothing was there):
 * events are applied, faults queued. Returns the number of messages read. */
int fault_loop_read(fault_loop_t *l, bool wait);
/* Handle every queued fault, reading more until nothing is left. */
void fault_loop_drain(fault_loop_t *l);
/* Run until the work is done (true), or a stop request or a failure (false).
 * Fails (ops->fail, EINVAL) with no userfaultfd or more than FAULT_LOOP_MAX_UFFDS. */
bool fault_loop_run(fault_loop_t *l);
void fault_loop_free(fault_loop_t *l);

#endif
