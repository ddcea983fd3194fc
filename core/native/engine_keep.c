/* Keeping the target tracked after the snapshot (snapshot --track).
 *
 * A range belongs to one userfaultfd at a time, WP_ASYNC is a property of the
 * whole context, and unregistering clears the protection: the snapshot's own
 * synchronous context is the only one that can know every write since T
 * without a gap. With keep, the window ends with every saved page still
 * protected (the sweep protects what it saved again) and every page written
 * since T logged (a write fault, before or after its page was saved, is let
 * through and logged once its unprotect returned). After the window this
 * thread goes on serving the context as a synchronous tracker (dirty_log.c)
 * until JS takes the log with engineTrackTake(stop) and hands the context,
 * still open, to a keeper process (core/keeper.ts), which goes on the same
 * way. Events are logged as the tracker logs them. */
#include "engine_internal.h"

static void keep_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) { track_on_fault(&((engine_t *)owner)->track, m); }
static void keep_event(void *owner, unsigned source, const struct uffd_msg *m) { track_on_event(&((engine_t *)owner)->track, m); }

static loop_work_t keep_work(void *owner, int *wait_ms) {
  engine_t *e = owner;
  if (atomic_load(&e->keep_stop) || atomic_load(&e->keep_exited)) return LOOP_DONE;
  *wait_ms = -1;
  return LOOP_WAIT;
}

static void keep_target_exited(void *owner) { atomic_store(&((engine_t *)owner)->keep_exited, true); }
static void keep_fail(void *owner, int err, const char *what) { set_fatal(owner, err, what); }
static bool keep_failed(void *owner) { return ((engine_t *)owner)->fatal_err != 0; }

static const fault_loop_ops_t keep_loop_ops = {
    .fault = keep_fault,
    .event = keep_event,
    .work = keep_work,
    .target_exited = keep_target_exited,
    .fail = keep_fail,
    .failed = keep_failed,
};

/* At the run's start: the log's ranges are the engine's segments, each in its protection unit. */
void keep_prepare(engine_t *e) {
  e->track.uffd = e->uffd;
  e->track.pagemap_fd = e->pagemap_fd;
  e->track.loop = &e->loop;
  uint64_t *triples = malloc((e->nsegs ? e->nsegs : 1) * 3 * sizeof(uint64_t));
  if (triples == NULL) {
    set_fatal(e, ENOMEM, "malloc the tracked ranges");
    return;
  }
  size_t n = 0;
  for (size_t i = 0; i < e->nsegs; i++) {
    triples[3 * n] = e->segs[i].cur_start;
    triples[3 * n + 1] = e->segs[i].cur_start + e->segs[i].len;
    triples[3 * n + 2] = e->segs[i].page_size;
    n++;
  }
  /* Sorted by address, as unit_of's search needs. */
  for (size_t i = 1; i < n; i++)
    for (size_t j = i; j > 0 && triples[3 * j] < triples[3 * (j - 1)]; j--)
      for (int k = 0; k < 3; k++) {
        uint64_t x = triples[3 * j + k];
        triples[3 * j + k] = triples[3 * (j - 1) + k];
        triples[3 * (j - 1) + k] = x;
      }
  if (track_set_ranges(&e->track, triples, n) != 0) set_fatal(e, ENOMEM, "malloc the tracked ranges");
  free(triples);
}

/* After the window, until engineTrackTake(stop), the target's exit or a failure. */
void keep_main(engine_t *e) {
  if (e->gone_reason >= 0) atomic_store(&e->keep_exited, true);
  if (!e->fatal_err && !atomic_load(&e->stop) && !atomic_load(&e->keep_exited)) {
    e->loop.ops = &keep_loop_ops;
    e->loop.pidfd = e->pidfd;
    fault_loop_run(&e->loop);
  }
  pthread_mutex_lock(&e->pool_lock);
  e->keep_stopped = true;
  pthread_cond_broadcast(&e->cmd_cond);
  pthread_mutex_unlock(&e->pool_lock);
}
