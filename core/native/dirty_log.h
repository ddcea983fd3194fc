/* Write tracking shared by the snapshot's pre-protection (engine_track.c) and
 * the standalone dirty tracker (tracker.c): a log of written ranges and of
 * ranges that went away, filled by the fault loop's handlers.
 *
 * With a synchronous context a write fault is let through at once (unprotect
 * + wake) and its page logged only once the unprotect returned; with an
 * asynchronous one (UFFD_FEATURE_WP_ASYNC) the kernel lets writes through
 * itself and PAGEMAP_SCAN reports them, so only events reach the log. Events:
 * REMOVE (zapped: its content changed, its markers may be gone) and the
 * destination of REMAP are logged written; UNMAP and the source of REMAP
 * invalid; FORK's child context is closed, which releases the child. */
#ifndef WPSNAP_DIRTY_LOG_H
#define WPSNAP_DIRTY_LOG_H

#include "fault_loop.h"
#include "kernel_compat.h"
#include "napi_util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Ranges recorded while tracking: [start, len] pairs. */
typedef struct {
  uint64_t *pairs;
  size_t n, cap;
  bool overflowed; /* a range could not be recorded: everything must count as written */
} track_log_t;

typedef struct {
  int uffd;
  int pagemap_fd;     /* finds transparent huge pages: let through whole */
  fault_loop_t *loop; /* read on EAGAIN: the pending event first */
  pthread_mutex_t lock; /* the logs and the ranges */
  uint64_t *ranges;   /* [start, end, unit] triples, sorted: the protection unit of each range */
  size_t nranges;
  track_log_t dirty, invalid;
  _Atomic uint64_t faults, forks;
} track_state_t;

void track_state_init(track_state_t *t, int uffd, int pagemap_fd, fault_loop_t *loop);
void track_state_free(track_state_t *t);
/* Replace the ranges (a copy is kept); 0 or ENOMEM. */
int track_set_ranges(track_state_t *t, const uint64_t *triples, size_t n);
void track_on_fault(track_state_t *t, const struct uffd_msg *m);
void track_on_event(track_state_t *t, const struct uffd_msg *m);
/* Log a range written (the snapshot engine's faults while it keeps the target tracked). */
void track_log_written(track_state_t *t, uint64_t start, uint64_t len);
/* Log what a REMOVE, UNMAP or REMAP changes; other events are left to the caller. */
void track_log_event(track_state_t *t, const struct uffd_msg *m);
/* Hand the logs over (the caller frees their pairs) and start new ones. */
void track_take(track_state_t *t, track_log_t *dirty, track_log_t *invalid);
/* Take the logs as {written, invalid (BigUint64Array [start, len] pairs), overflowed, faults, forks}. */
napi_value track_take_object(napi_env env, track_state_t *t);
/* A log as a BigUint64Array of [start, len] pairs. */
napi_value track_log_array(napi_env env, const track_log_t *log);
/* The first huge (PMD-mapped) run in [addr, end) of the process whose pagemap is open as fd. */
bool pagemap_find_huge(int pagemap_fd, uint64_t addr, uint64_t end, struct wpsnap_page_region *r);

#endif
