/* Write faults first, then the events that keep the region map true. */
#include "engine_internal.h"

void handle_fault(engine_t *e, uint64_t addr, uint64_t read_ns) {
  /* Retry while events keep the address space changing: each round applies
   * them. Give up only if it never settles for FAULT_SETTLE_US. */
  double settle_start = mono_us();
  for (unsigned attempt = 0; attempt < 16 || mono_us() - settle_start < FAULT_SETTLE_US; attempt++) {
    segment_t *s = seg_by_cur(e, addr);
    if (s == NULL) {
      uffd_wake(e->uffd, addr & ~(PG - 1), PG);
      return;
    }
    if (s->kind == KIND_FILE && !s->whole_tried) save_file_whole(e, s);
    uint64_t block;
    int thp = thp_block(e, s, addr - s->cur_start, &block);
    if (thp != THP_NONE) {
      if (attempt > 0) wait_quiet(e, s->cur_start + block, THP_BYTES);
      int err = save_thp(e, s, block, thp, true);
      if (err == EAGAIN) continue;
      if (err == 0 && e->keep) track_log_written(&e->track, s->cur_start + block, THP_BYTES);
      if (err == 0) {
        if (read_ns != 0 && e->nlatency < MAX_LATENCY_SAMPLES) {
          uint64_t dt = mono_ns() - read_ns;
          e->latency_ns[e->nlatency++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
        }
        return;
      }
      /* A page of it could not be read: 4 KiB units below (the pmd splits). */
    }
    uint64_t unit = s->page_size;
    uint64_t off = (addr - s->cur_start) & ~(unit - 1);
    uint64_t idx = off / PG;
    uint32_t npg = (uint32_t)(unit / PG);
    if (attempt > 0) wait_quiet(e, s->cur_start + off, unit);
    if (s->state[idx] != PAGE_UNSAVED) { /* saved (or lost) already: let the thread write */
      step_t st = unprotect_outcome(e, unprotect_checked(e, s->cur_start + off, unit), "ioctl(UFFDIO_WRITEPROTECT) of a saved page");
      if (st == STEP_RETRY) continue;
      if (st == STEP_UNREGISTERED) uffd_wake(e->uffd, s->cur_start + off, unit);
      if (st == STEP_OK && e->keep) track_log_written(&e->track, s->cur_start + off, unit); /* logged once unprotected */
      return;
    }
    uint8_t *dst = reserve(e, npg, true);
    if (dst == NULL) return; /* the engine has failed: the thread is woken when JS closes the userfaultfd */
    step_t st = copy_outcome(e, seg_copy(e, s, off, unit, dst), true);
    if (st == STEP_RETRY) continue;
    if (st == STEP_STOP) return;
    if (st == STEP_UNREADABLE) {
      for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_LOST;
      add_lost(e, s->t_start + off, npg, LOST_READ_FAILED);
      if (uffd_writeprotect(e->uffd, s->cur_start + off, unit, false) != 0) uffd_wake(e->uffd, s->cur_start + off, unit);
      return;
    }
    st = unprotect_outcome(e, unprotect_checked(e, s->cur_start + off, unit), "ioctl(UFFDIO_WRITEPROTECT) after a fault");
    if (st == STEP_RETRY) continue;
    if (st == STEP_STOP) return;
    if (st == STEP_UNREGISTERED) { /* as the sweep would find it: lost, and the thread let go */
      for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_LOST;
      add_lost(e, s->t_start + off, npg, LOST_UNMAPPED);
      uffd_wake(e->uffd, s->cur_start + off, unit);
      return;
    }
    if (s->kind == KIND_FILE && !file_unchanged_since_t(s)) {
      lose_file(e, s); /* the page is unprotected and its thread woken: it was lost anyway */
      return;
    }
    if (s->kind == KIND_FILE && s->no_fd_writers && file_has_hole(s, off, unit)) {
      /* Data at T (its holes at T are saved already), a hole now: punched through another mapping. */
      for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_LOST;
      add_lost(e, s->t_start + off, npg, LOST_DISCARDED);
      return;
    }
    for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_SAVED;
    commit(e, s->t_start + off, npg, true);
    if (e->keep) track_log_written(&e->track, s->cur_start + off, unit);
    atomic_fetch_add(&e->pages_fault, npg);
    if (read_ns != 0 && e->nlatency < MAX_LATENCY_SAMPLES) {
      uint64_t dt = mono_ns() - read_ns;
      e->latency_ns[e->nlatency++] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
    }
    return;
  }
  set_fatal(e, EAGAIN, "fault handling did not settle");
}

/* MADV_DONTNEED/MADV_REMOVE of [start,end): the zap follows as soon as we read
 * this event. Save what is still unsaved now and check it against the pagemap. */
static bool page_is_zero(const uint8_t *page) {
  static const uint8_t zero[PG];
  return memcmp(page, zero, PG) == 0;
}

void handle_remove(engine_t *e, uint64_t start, uint64_t end) {
  for (size_t si = 0; si < e->nsegs; si++) {
    segment_t *s = &e->segs[si];
    if (s->gone) continue;
    if (s->kind == KIND_FILE && !s->whole_tried) save_file_whole(e, s);
    uint64_t lo = start > s->cur_start ? start : s->cur_start;
    uint64_t hi = end < s->cur_start + s->len ? end : s->cur_start + s->len;
    for (uint64_t a = lo & ~(PG - 1); a < hi; a += PG) {
      uint64_t off = a - s->cur_start;
      uint64_t idx = off / PG;
      if (s->state[idx] != PAGE_UNSAVED) continue;
      uint64_t pm1 = 0, pm2 = 0;
      read_pagemap(e->pagemap_fd, a, 1, &pm1);
      /* Only a PTE marker proves "never touched since T": a zap drops it. The
       * shared zero page proves nothing here: one read() completes every
       * event it returns, so an earlier zap plus a read fault may have put it there. */
      if (s->kind == KIND_ANON && is_marker_entry(pm1)) {
        s->state[idx] = PAGE_SAVED; /* never written: zero at T */
        count_zero(e, ZERO_MARKER, 1);
        continue;
      }
      uint8_t *dst = reserve(e, 1, true);
      if (dst == NULL) return; /* the engine has failed */
      int err = seg_copy(e, s, off, PG, dst);
      /* After an exec the old mm's pagemap reads nothing: never take that for
       * "zapped". An event handler applies no newer event: no retry here. */
      int pm_err = read_pagemap(e->pagemap_fd, a, 1, &pm2);
      if (copy_outcome(e, err != 0 ? err : pm_err, false) == STEP_STOP) return;
      bool ok = err == 0 && (s->kind == KIND_FILE || pm_err == 0);
      if (ok && s->kind == KIND_FILE) {
        /* Page cache content survives a DONTNEED; a MADV_REMOVE punches a hole,
         * and that punch changes the file's times: the file's unsaved pages
         * are then lost file-changed-before-saved (conservative). */
        off_t data = lseek(s->fd, (off_t)(s->file_off + off), SEEK_DATA);
        ok = data == (off_t)(s->file_off + off);
        if (ok && !file_unchanged_since_t(s)) {
          lose_file(e, s);
          continue;
        }
        /* Without fd writers: a MADV_REMOVE (not told from a DONTNEED by its event) punches this range
         * once its event is read, and the remover's next write refills the hole with a zero page before
         * its fault reaches us (that write, like any other, then waits for us). So a page read as zero
         * may be such a refill: unless the times are still T's, it alone is lost. Content that is not
         * zero was there at T (nothing else can write it meanwhile). */
        if (ok && s->no_fd_writers && page_is_zero(dst) && !file_times_at_t(s)) ok = false;
      } else if (ok) {
        /* The copy pinned the page first: if it is still the same page, or gone
         * (zapped after the pin), the copy is the content at T. */
        bool same = (pm1 & PM_PRESENT) && (pm2 & PM_PRESENT) && (pm1 & PM_PFN_MASK) == (pm2 & PM_PFN_MASK) && (pm2 & PM_UFFD_WP);
        bool zapped_after = (pm1 & PM_PRESENT) && !(pm2 & PM_PRESENT) && !entry_has_data(e, pm2);
        /* An unsaved page that still holds its content at T is write-protected:
         * its entry carries uffd-wp. One zapped and faulted in again before pm1
         * was read (anonymous memory keeps no marker), or given the same pfn
         * again after pm1, does not. */
        ok = (pm1 & PM_UFFD_WP) && (same || zapped_after) && !is_zero_page_entry(e, pm2);
      }
      if (ok) {
        s->state[idx] = PAGE_SAVED;
        commit(e, s->t_start + off, 1, true);
        atomic_fetch_add(&e->pages_fault, 1);
      } else {
        s->state[idx] = PAGE_LOST;
        add_lost(e, s->t_start + off, 1, LOST_DISCARDED);
      }
    }
  }
}

/* munmap (or an implicit unmap: MAP_FIXED, MREMAP_FIXED's destination, the
 * source after a move) of [start,end): unsaved pages are lost, and the piece
 * is detached so that no later event or fault at these addresses (a new
 * mapping, or another segment moved here) is resolved against it. */
void handle_unmap(engine_t *e, uint64_t start, uint64_t end) {
  for (size_t si = 0; si < e->nsegs; si++) {
    segment_t *s = &e->segs[si];
    if (s->gone || end <= s->cur_start || start >= s->cur_start + s->len) continue;
    if (start > s->cur_start) {
      seg_split(e, si, start - s->cur_start);
      continue; /* the tail is visited later in this loop */
    }
    if (end < s->cur_start + s->len) seg_split(e, si, end - e->segs[si].cur_start);
    s = &e->segs[si];
    lose_unsaved(e, s, LOST_UNMAPPED);
    s->gone = true;
  }
}

/* mremap moved [from, from+len) to `to`: the pages (and their protection)
 * moved with it. Split segments at the edges and re-address the middle. */
void handle_remap(engine_t *e, uint64_t from, uint64_t to, uint64_t len) {
  for (size_t si = 0; si < e->nsegs; si++) {
    segment_t *s = &e->segs[si];
    if (s->gone || from + len <= s->cur_start || from >= s->cur_start + s->len) continue;
    if (from > s->cur_start) {
      seg_split(e, si, from - s->cur_start);
      continue; /* the tail is visited later in this loop */
    }
    if (from + len < s->cur_start + s->len) seg_split(e, si, from + len - e->segs[si].cur_start);
    s = &e->segs[si];
    s->cur_start = to + (s->cur_start - from);
  }
}

static void handle_message_locked(engine_t *e, const struct uffd_msg *m, uint64_t read_ns);

/* In a group every message is handled under the group's lock (engine_group.c). */
void handle_message(engine_t *e, const struct uffd_msg *m, uint64_t read_ns) {
  group_enter(e);
  handle_message_locked(e, m, read_ns);
  group_leave(e);
}

static void handle_message_locked(engine_t *e, const struct uffd_msg *m, uint64_t read_ns) {
  if (e->keep && m->event != UFFD_EVENT_PAGEFAULT) track_log_event(&e->track, m);
  switch (m->event) {
  case UFFD_EVENT_PAGEFAULT:
    atomic_fetch_add(&e->faults, 1);
    handle_fault(e, m->arg.pagefault.address, read_ns);
    break;
  case UFFD_EVENT_REMOVE:
    atomic_fetch_add(&e->events, 1);
    handle_remove(e, m->arg.remove.start, m->arg.remove.end);
    break;
  case UFFD_EVENT_UNMAP:
    atomic_fetch_add(&e->events, 1);
    handle_unmap(e, m->arg.remove.start, m->arg.remove.end);
    break;
  case UFFD_EVENT_REMAP:
    atomic_fetch_add(&e->events, 1);
    handle_remap(e, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
    break;
  case UFFD_EVENT_FORK:
    /* The child inherits the protection under its own context (the fork's
     * ufd): its writes to the shared memory wait on that context until it is
     * closed, and then go through without a fault here. So every unsaved
     * shared page is saved now, from the file, and only then is the child's
     * context closed (which releases the child); what cannot be saved is
     * lost, never stored wrong. */
    atomic_fetch_add(&e->events, 1);
    for (size_t si = 0; si < e->nsegs; si++) {
      segment_t *s = &e->segs[si];
      if (s->kind != KIND_FILE || s->gone) continue;
      save_file_now(e, s);
      lose_unsaved(e, s, LOST_SHARED);
    }
    close((int)m->arg.fork.ufd);
    break;
  default:
    break;
  }
}
