/* The background sweep of unsaved pages, and the engine thread's loop. */
#include "engine_internal.h"

/* ---------- sweep ---------- */


void rate_refill(engine_t *e) {
  if (e->rate <= 0) return;
  double now = mono_us();
  e->tokens += (now - e->tokens_at) * e->rate / 1e6;
  if (e->tokens > e->rate / 10 + SWEEP_CHUNK_BYTES) e->tokens = e->rate / 10 + SWEEP_CHUNK_BYTES;
  e->tokens_at = now;
}

/* Which of the npg pages (at most 512) from `off` hold data at T? Anonymous
 * pages never touched (pte marker or the shared zero page) are zero at T;
 * holes of a shared file likewise. Fills need[] (1: copy it) and, for the
 * others, how each is known zero (why[]: a ZERO_* reason, or WHY_VANISHED);
 * returns how many need a copy.
 *
 * An unsaved anonymous page whose entry shows neither data nor a marker has
 * lost its content at T without the event that must precede every way of
 * losing it (REMOVE for DONTNEED/FREE/REMOVE, UNMAP, REMAP): at T the pause
 * write-protected every page, installing markers on the empty ones
 * (WP_UNPOPULATED), and only a zap drops a marker. Such a page is listed lost
 * (vanished-before-saved), never taken for zero. */
uint32_t pages_with_data(engine_t *e, segment_t *s, uint64_t off, uint32_t npg, uint8_t *need, uint8_t *why) {
  memset(why, ZERO_MARKER, npg);
  if (s->kind == KIND_ANON) {
    uint64_t pm[512];
    int err = read_pagemap(e->pagemap_fd, s->cur_start + off, npg, pm);
    if (err != 0) {
      if (err == ESRCH) target_gone(e);
      for (uint32_t i = 0; i < npg; i++) pm[i] = PM_PRESENT;
    }
    if (e->fault_vanish) { /* WPSNAP_FAULT=engine-vanish: the first chunk's first page */
      e->fault_vanish = false;
      pm[0] = 0;
    }
    for (uint32_t i = 0; i < npg; i++) {
      need[i] = entry_has_data(e, pm[i]);
      if (need[i]) continue;
      if (is_zero_page_entry(e, pm[i])) why[i] = ZERO_SHARED_ZERO_PAGE;
      else if (!(pm[i] & (PM_PRESENT | PM_SWAP | PM_UFFD_WP)) && s->state[off / PG + i] == PAGE_UNSAVED) why[i] = WHY_VANISHED;
    }
  } else if (s->kind == KIND_FILE) {
    memset(why, ZERO_FILE_HOLE, npg);
    /* Holes of a shared file read as zero and cost nothing to skip. */
    off_t p = (off_t)(s->file_off + off);
    uint32_t i = 0;
    while (i < npg) {
      off_t data = lseek(s->fd, p, SEEK_DATA);
      if (data < 0) { /* ENXIO: no data from p on */
        while (i < npg) need[i++] = 0;
        break;
      }
      while (i < npg && p + (off_t)PG <= data) {
        need[i++] = 0;
        p += (off_t)PG;
      }
      if (i >= npg) break;
      off_t hole = lseek(s->fd, p, SEEK_HOLE);
      if (hole < 0) hole = p + (off_t)PG;
      do {
        need[i++] = 1;
        p += (off_t)PG;
      } while (i < npg && p < hole);
    }
    /* Its holes at T were marked saved when the run began: a hole among unsaved pages was punched since. */
    if (s->no_fd_writers)
      for (uint32_t k = 0; k < npg; k++)
        if (!need[k]) why[k] = WHY_PUNCHED;
  } else {
    for (uint32_t i = 0; i < npg; i++) need[i] = 1;
  }
  if (s->hugetlb) { /* a huge page is copied whole if any part holds data */
    uint32_t per = s->page_size / (uint32_t)PG;
    for (uint32_t u = 0; u < npg; u += per) {
      uint8_t any = 0;
      for (uint32_t i = 0; i < per; i++) any |= need[u + i];
      for (uint32_t i = 0; i < per; i++) need[u + i] = any;
    }
  }
  uint32_t ncopy = 0;
  for (uint32_t i = 0; i < npg; i++) ncopy += need[i];
  return ncopy;
}

/* The sweep's step over a PMD-mapped block: the whole 2 MiB in one unit.
 * Returns a SWEEP_* code, or -1 when a page of it could not be read. */
int sweep_thp(engine_t *e, segment_t *s, uint64_t block, int thp, int *wait_ms) {
  if (e->rate > 0) {
    rate_refill(e);
    /* The bucket holds at most rate/10 + one chunk: at low rates a block goes
     * when it is full, and the debt is paid back before the next one. */
    double burst = e->rate / 10 + SWEEP_CHUNK_BYTES;
    double want = burst < (double)THP_BYTES ? burst : (double)THP_BYTES;
    if (e->tokens < want) {
      *wait_ms = (int)((want - e->tokens) * 1e3 / e->rate) + 1;
      return SWEEP_WAIT_RATE;
    }
  }
  if (!sweep_has_room(e)) return SWEEP_WAIT_POOL;
  int err = save_thp(e, s, block, thp, false);
  if (err == ENOBUFS) return SWEEP_WAIT_POOL;
  if (err == EAGAIN) return SWEEP_PROGRESS;
  if (err != 0) return -1;
  if (e->rate > 0) e->tokens -= (double)THP_BYTES;
  e->sweep_off = block + THP_BYTES;
  return SWEEP_PROGRESS;
}

int sweep_step(engine_t *e, int *wait_ms) {
  /* find the next unsaved page */
  segment_t *s = NULL;
  while (e->sweep_seg < e->nsegs) {
    s = &e->segs[e->sweep_seg];
    while (e->sweep_off < s->len && s->state[e->sweep_off / PG] != PAGE_UNSAVED) e->sweep_off += s->page_size;
    if (e->sweep_off < s->len) break;
    e->sweep_seg++;
    e->sweep_off = 0;
    s = NULL;
  }
  if (s == NULL) {
    /* Segments split by mremap are appended: one more pass catches them. */
    for (size_t i = 0; i < e->nsegs; i++)
      for (uint64_t o = 0; o < e->segs[i].len; o += PG)
        if (e->segs[i].state[o / PG] == PAGE_UNSAVED) {
          e->sweep_seg = i;
          e->sweep_off = o & ~((uint64_t)e->segs[i].page_size - 1);
          return SWEEP_PROGRESS;
        }
    return SWEEP_DONE;
  }
  if (s->kind == KIND_FILE && !s->whole_tried) {
    save_file_whole(e, s);
    return SWEEP_PROGRESS;
  }
  uint64_t block;
  int thp = thp_block(e, s, e->sweep_off, &block);
  if (thp != THP_NONE) {
    int r = sweep_thp(e, s, block, thp, wait_ms);
    if (r >= 0) return r; /* else a page of it could not be read: 4 KiB units below */
  }
  uint64_t unit = s->page_size;
  uint64_t max_bytes = unit > SWEEP_CHUNK_BYTES ? unit : SWEEP_CHUNK_BYTES;
  uint64_t off = e->sweep_off, end = off;
  while (end < s->len && end - off < max_bytes && s->state[end / PG] == PAGE_UNSAVED) end += unit;
  /* A chunk stops where a huge pmd starts: that block goes whole, next. */
  struct wpsnap_page_region huge;
  if (s->may_thp && find_huge(e, s->cur_start + off, s->cur_start + end, &huge) && huge.start > s->cur_start + off)
    end = huge.start - s->cur_start;
  uint64_t len = end - off;
  uint32_t npg = (uint32_t)(len / PG);

  if (e->rate > 0) {
    rate_refill(e);
    if (e->tokens < (double)len) {
      double need_us = ((double)len - e->tokens) * 1e6 / e->rate;
      *wait_ms = (int)(need_us / 1000) + 1;
      return SWEEP_WAIT_RATE;
    }
  }

  /* With no batch to copy into (the store holds the whole pool), wait before
   * reading the pagemap: while the pool is exhausted this loop runs once per
   * write fault, and the pread would be wasted every time. */
  if (!sweep_has_room(e)) return SWEEP_WAIT_POOL;

  uint8_t need[512], why[512];
  uint32_t ncopy = pages_with_data(e, s, off, npg, need, why);

  uint8_t *dst = NULL;
  if (ncopy > 0) {
    dst = reserve(e, ncopy, false);
    if (dst == NULL) return SWEEP_WAIT_POOL;
    uint32_t k = 0;
    for (uint32_t i = 0; i < npg;) {
      if (!need[i]) {
        i++;
        continue;
      }
      uint32_t j = i;
      while (j < npg && need[j]) j++;
      step_t st = copy_outcome(e, seg_copy(e, s, off + (uint64_t)i * PG, (uint64_t)(j - i) * PG, dst + (size_t)k * PG), true);
      if (st == STEP_STOP || st == STEP_RETRY) return SWEEP_PROGRESS;
      if (st == STEP_UNREADABLE) {
        /* A page the kernel will not give us: the run's first page alone; if
         * it reads, go on with the rest, else it is lost. */
        if (j - i > 1) {
          j = i + 1;
          if (seg_copy(e, s, off + (uint64_t)i * PG, PG, dst + (size_t)k * PG) == 0) {
            k++;
            i = j;
            continue;
          }
        }
        s->state[(off / PG) + i] = PAGE_LOST;
        add_lost(e, s->t_start + off + (uint64_t)i * PG, 1, LOST_READ_FAILED);
        return SWEEP_PROGRESS; /* redo the chunk without this page */
      }
      k += j - i;
      i = j;
    }
  }

  step_t st = unprotect_outcome(e, settle_checked(e, s->cur_start + off, len), "ioctl(UFFDIO_WRITEPROTECT) in the sweep");
  if (st == STEP_RETRY || st == STEP_STOP) return SWEEP_PROGRESS;
  if (st == STEP_UNREGISTERED) {
    for (uint32_t i = 0; i < npg; i++) s->state[off / PG + i] = PAGE_LOST;
    add_lost(e, s->t_start + off, npg, LOST_UNMAPPED);
    return SWEEP_PROGRESS;
  }
  /* The copy and the holes skipped (SEEK_DATA above) hold only if the file did
   * not change through an fd since T. */
  if (s->kind == KIND_FILE && !file_unchanged_since_t(s)) {
    lose_file(e, s);
    return SWEEP_PROGRESS;
  }
  /* Valid: commit. */
  uint32_t k = 0;
  for (uint32_t i = 0; i < npg;) {
    if (!need[i] && why[i] == WHY_PUNCHED) {
      s->state[off / PG + i] = PAGE_LOST;
      add_lost(e, s->t_start + off + (uint64_t)i * PG, 1, LOST_DISCARDED);
      i++;
      continue;
    }
    if (!need[i] && why[i] == WHY_VANISHED) {
      /* Decided only now: the unprotect succeeded, so no event was pending
       * (a move in progress empties the old range before its REMAP is read,
       * and keeps the unprotect failing with EAGAIN until it is). */
      s->state[off / PG + i] = PAGE_LOST;
      add_lost(e, s->t_start + off + (uint64_t)i * PG, 1, LOST_VANISHED);
      i++;
      continue;
    }
    if (!need[i]) {
      s->state[off / PG + i] = PAGE_SAVED;
      count_zero(e, why[i], 1);
      i++;
      continue;
    }
    uint32_t j = i;
    while (j < npg && need[j]) j++;
    for (uint32_t x = i; x < j; x++) {
      e->cur_sweep->addrs[e->cur_sweep->count + k + (x - i)] = s->t_start + off + (uint64_t)x * PG;
      s->state[off / PG + x] = PAGE_SAVED;
    }
    k += j - i;
    i = j;
  }
  if (k > 0) {
    e->cur_sweep->count += k;
    atomic_fetch_add(&e->bytes_copied, (uint64_t)k * PG);
    atomic_fetch_add(&e->pages_sweep, k);
    if (e->cur_sweep->count == e->cur_sweep->cap) flush_batch(e, &e->cur_sweep);
  }
  if (e->rate > 0) e->tokens -= (double)len;
  e->sweep_off = end;
  return SWEEP_PROGRESS;
}

/* ---------- thread ---------- */

/* ---------- the engine as the fault loop's owner ---------- */

static void on_fault(void *owner, unsigned source, const struct uffd_msg *m, uint64_t read_ns) {
  engine_nice(owner, ENGINE_NICE);
  handle_message(owner, m, read_ns);
}
static void on_event(void *owner, unsigned source, const struct uffd_msg *m) { handle_message(owner, m, 0); }
static void on_target_exited(void *owner) { target_gone(owner); }
static void on_fail(void *owner, int err, const char *what) { set_fatal(owner, err, what); }
static bool has_failed(void *owner) { return ((engine_t *)owner)->fatal_err != 0; }
static void lock_group(void *owner) { group_enter(owner); }
static void unlock_group(void *owner) { group_leave(owner); }

/* The sweep, between faults. Partly filled batches are posted only before a
 * long rate-limit wait: posting them at every wait would hand the store many
 * tiny batches. A pool wait ends when the store releases a batch it already
 * has (the wake eventfd), or after 50 ms. */
static loop_work_t sweep_work(void *owner, int *wait_ms) {
  engine_t *e = owner;
  /* The sweep competes for a CPU like the target's own threads: at the
   * engine's nice it took a whole CPU for as long as the window lasted, and
   * on two CPUs the target's threads then queued behind each other (a
   * heartbeat thread runnable for 60 ms to seconds at 8 GiB, perf sched).
   * Faults and the wait for them keep ENGINE_NICE (engine_nice below). */
  if (e->sweep_nice) engine_nice(e, SWEEP_NICE);
  group_enter(e);
  int r = sweep_step(e, wait_ms);
  group_leave(e);
  if (r == SWEEP_PROGRESS) return LOOP_PROGRESS;
  engine_nice(e, ENGINE_NICE);
  if (r == SWEEP_DONE) {
    e->sweep_done = true;
    return LOOP_DONE;
  }
  if (r == SWEEP_WAIT_RATE && *wait_ms >= 50) flush_current(e);
  if (r == SWEEP_WAIT_POOL) {
    *wait_ms = 50;
    /* Staging is full and cannot spill: the target's pages stay protected
     * until the store frees a batch. Tell JS once, so the store stops waiting
     * for idle CPUs (the target, blocked on us, would otherwise wait on the
     * store). While the stager can still spill, the wait is its to end. */
    if (!e->starved_posted && !stage_can_spill(e)) {
      e->starved_posted = true;
      post_message(e, MSG_STAGING_FULL);
    }
  }
  return LOOP_WAIT;
}

static const fault_loop_ops_t engine_loop_ops = {
    .fault = on_fault,
    .event = on_event,
    .work = sweep_work,
    .target_exited = on_target_exited,
    .fail = on_fail,
    .failed = has_failed,
    .lock = lock_group,
    .unlock = unlock_group,
};

void engine_loop_init(engine_t *e) {
  e->loop = (fault_loop_t){.uffds = &e->uffd, .nuffds = 1, .wake_fd = e->wake_fd, .pidfd = e->pidfd, .ops = &engine_loop_ops, .owner = e, .stop = &e->stop};
}

/* After the window: every page is saved or lost and the engine's ranges are
 * unregistered, so no message should come; any that does (a range that could
 * not be unregistered) is still read, so that no thread of the target waits on
 * an unread event while the stager hands the staged batches to the store. The
 * target's exit no longer matters: every page is copied. */
static loop_work_t staging_work(void *owner, int *wait_ms) {
  if (stage_is_done(owner)) return LOOP_DONE;
  *wait_ms = -1; /* the stager writes the wake eventfd when it is done */
  return LOOP_WAIT;
}

static void ignore_exit(void *owner) {}

static const fault_loop_ops_t staging_loop_ops = {
    .fault = on_fault,
    .event = on_event,
    .work = staging_work,
    .target_exited = ignore_exit,
    .fail = on_fail,
    .failed = has_failed,
    .lock = lock_group,
    .unlock = unlock_group,
};

/* End the protection at once: drop the registration of every range the engine
 * saved, so the target neither waits on an event nor keeps a protected page
 * while the store works. Closing the userfaultfd later would do the same, but
 * only once every staged batch is stored. Unregistering clears what is still
 * protected under the mmap write lock, the target's faults held off: in a
 * tracked generation most pages were read from the parent and are still
 * protected, so they are unprotected first, 2 MiB at a time under the read
 * lock (a gigabyte in one go held the target off for 200-600 ms). */
static void unregister_all(engine_t *e) {
  for (size_t i = 0; e->parent_pages && i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (s->gone) continue;
    for (uint64_t at = s->cur_start, end = s->cur_start + s->len; at < end;) {
      uint64_t next = (at & ~(THP_BYTES - 1)) + THP_BYTES;
      if (next > end) next = end;
      (void)uffd_writeprotect(e->uffd, at, next - at, false); /* a range that changed is cleared by the unregister */
      at = next;
    }
  }
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (s->gone) continue;
    struct uffdio_range r = {.start = s->cur_start, .len = s->len};
    (void)ioctl(e->uffd, UFFDIO_UNREGISTER, &r); /* a range that changed stays registered until the close */
  }
}

/* A shared file only mappings write (no_fd_writers): its holes at T are zero, marked saved now, after the
 * resume but before any message is read. Only a REMOVE event's read lets a MADV_REMOVE punch a hole, and
 * no fd may, so every hole now was a hole at T; a page a write filled since holds zeros until that write's
 * fault reaches us, the same as at T. A hole found later, in an unsaved page, was punched since: lost,
 * never taken for zero. Done here, not in the pause: a walk of a large file took milliseconds. In a group
 * the first engine to start walks each file, holding the lock every other engine needs to read. */
static void mark_holes_at_t(engine_t *e) {
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (!s->holes_pending) continue;
    s->holes_pending = false;
    struct stat st;
    uint64_t pages = 0;
    uint8_t *whole = s->group_shared && fstat(s->fd, &st) == 0 ? group_claim_holes(e->group, (uint64_t)st.st_dev, (uint64_t)st.st_ino, &pages) : NULL;
    if (s->group_shared && whole == NULL) continue; /* another member's engine walked it */
    count_zero(e, ZERO_FILE_HOLE, whole != NULL ? mark_holes(s->fd, 0, whole, pages) : mark_holes(s->fd, s->file_off, s->state, s->len / PG));
  }
}

/* The snapshot itself: from the resume until every page is saved or lost and
 * every staged batch handed to the store. */
void engine_main(engine_t *e) {
  find_thp_segments(e);
  if (e->keep) keep_prepare(e);
  e->tokens_at = mono_us();
  e->tokens = SWEEP_CHUNK_BYTES;
  /* Shared files first, at once: a write by the target to a shmem page not
   * present at T sets the file's times before its write-protect fault reaches
   * us (do_shared_fault calls fault_dirty_shared_page first), just as a write
   * through an fd does: the sooner the whole file is proven, the fewer such
   * writes can make it unprovable. */
  group_enter(e);
  mark_holes_at_t(e);
  for (size_t i = 0; i < e->nsegs && !e->fatal_err; i++)
    if (e->segs[i].kind == KIND_FILE && !e->segs[i].whole_tried) save_file_whole(e, &e->segs[i]);
  group_leave(e);
  if (!e->fatal_err) fault_loop_run(&e->loop);
  if (!e->sweep_done) {
    /* Stopped early: whatever is unsaved is not in the snapshot. A group's
     * shared pages stay unsaved for the other members' engines (a member's
     * exit does not change them); what none saves is listed lost at the end
     * (groupUnsaved). */
    int reason = e->gone_reason >= 0 ? e->gone_reason : LOST_INTERRUPTED;
    group_enter(e);
    for (size_t i = 0; i < e->nsegs; i++) {
      segment_t *s = &e->segs[i];
      if (!s->group_shared) lose_unsaved(e, s, reason);
    }
    group_leave(e);
  }
  flush_current(e);
  if (e->gone_reason < 0 && !e->keep) unregister_all(e);
  e->window_end_us = mono_us();
  stage_window_closed(e);
  post_message(e, MSG_WINDOW_CLOSED);
  stage_finish(e);
  if (!e->fatal_err && !atomic_load(&e->stop)) {
    /* Still reading the userfaultfd while the stager hands batches over. */
    e->loop.ops = &staging_loop_ops;
    e->loop.pidfd = -1;
    fault_loop_run(&e->loop);
  }
  stage_join(e);
  e->finished = true;
  post_message(e, MSG_DONE); /* allocated at start: the end is always reported */
  napi_release_threadsafe_function(e->tsfn, napi_tsfn_release);
  if (e->keep) keep_main(e);
}

static engine_cmd_t next_command(engine_t *e) {
  pthread_mutex_lock(&e->pool_lock);
  while (e->cmd == CMD_NONE) pthread_cond_wait(&e->cmd_cond, &e->pool_lock);
  engine_cmd_t cmd = e->cmd;
  e->cmd = CMD_NONE;
  pthread_mutex_unlock(&e->pool_lock);
  return cmd;
}

/* The engine thread: created with the engine (before the pause, so that no
 * thread is created in it), it tracks writes if told to, then runs the
 * snapshot, or quits. */
void *engine_thread(void *arg) {
  engine_t *e = arg;
  prctl(PR_SET_NAME, "wpsnap-engine");
  engine_thread_priority();
  engine_cmd_t cmd = next_command(e);
  if (cmd == CMD_TRACK) {
    track_main(e);
    pthread_mutex_lock(&e->pool_lock);
    e->track_stopped = true;
    pthread_cond_broadcast(&e->cmd_cond);
    pthread_mutex_unlock(&e->pool_lock);
    cmd = next_command(e);
  }
  if (cmd == CMD_RUN) engine_main(e);
  return NULL;
}
