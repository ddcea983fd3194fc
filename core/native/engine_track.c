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

static void track_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) { track_on_fault(&((engine_t *)owner)->track, m); }
static void track_event(void *owner, unsigned source, const struct uffd_msg *m) { track_on_event(&((engine_t *)owner)->track, m); }

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
  e->track.uffd = e->uffd;
  e->track.pagemap_fd = e->pagemap_fd;
  e->track.loop = &e->loop;
  e->loop = (fault_loop_t){.uffds = &e->uffd, .nuffds = 1, .wake_fd = e->wake_fd, .pidfd = e->pidfd, .ops = &track_loop_ops, .owner = e, .stop = &never_stop};
  fault_loop_run(&e->loop);
  fault_loop_free(&e->loop);
}
