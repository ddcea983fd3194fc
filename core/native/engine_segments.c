/* Segments (a region at T and where it is now), copying from them, proving
 * shared-file copies, the pagemap tests, reading events, unprotecting. */
#include "engine_internal.h"

/* ---------- segments ---------- */

segment_t *seg_by_cur(engine_t *e, uint64_t addr) {
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (!s->gone && addr >= s->cur_start && addr < s->cur_start + s->len) return s;
  }
  return NULL;
}

segment_t *seg_append(engine_t *e) {
  if (e->nsegs == e->segs_cap) {
    size_t cap = e->segs_cap ? e->segs_cap * 2 : 64;
    segment_t *grown = realloc(e->segs, cap * sizeof(segment_t));
    if (grown == NULL) {
      set_fatal(e, ENOMEM, "grow the segment table");
      return NULL;
    }
    e->segs = grown;
    e->segs_cap = cap;
  }
  return &e->segs[e->nsegs++];
}

/* Split segment i so that a boundary falls at offset `off` (page aligned). */
void seg_split(engine_t *e, size_t i, uint64_t off) {
  if (off == 0 || off >= e->segs[i].len) return;
  segment_t *tail = seg_append(e);
  if (tail == NULL) return; /* the engine has failed: the snapshot ends incomplete */
  segment_t *s = &e->segs[i];
  *tail = *s;
  tail->t_start += off;
  tail->cur_start += off;
  tail->len -= off;
  tail->file_off += off;
  tail->state += off / PG;
  s->len = off;
}

/* ---------- shared files changed through their fd ---------- */

/* uffd-wp sees only writes through page tables: write/pwrite, fallocate,
 * ftruncate, copy_file_range and splice into a shmem file (by the target or any
 * process holding an fd) change its pages without a fault. Each changes the
 * inode's ctime and mtime while holding the inode lock (i_rwsem):
 * shmem_file_write_iter calls file_update_time before generic_perform_write
 * (copy_file_range and splice end in the same write_iter); shmem_setattr sets
 * them with the new size; shmem_fallocate's punch sets them in
 * shmem_truncate_range AFTER the pages are gone. A copy taken during a punch is
 * therefore proven only once the punch is over: lseek(SEEK_DATA) takes the same
 * lock (shmem_file_llseek), so when it returns every change that overlapped the
 * copy has set the times. tmpfs has multigrain timestamps (6.13+): once we have
 * read the ctime, the next change gets a distinct one, even within one tick. */
uint64_t ts_ns(struct timespec t) { return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec; }

bool file_times_at_t(segment_t *s) {
  (void)lseek(s->fd, 0, SEEK_DATA); /* a barrier only: waits for a change holding the inode lock */
  struct stat st;
  if (fstat(s->fd, &st) != 0) return false;
  return ts_ns(st.st_ctim) == s->ctime_ns_at_t && ts_ns(st.st_mtim) == s->mtime_ns_at_t;
}

bool file_unchanged_since_t(segment_t *s) {
  /* Only an fd writes a file without a fault (a write through a mapping after
   * its unprotect sets the times too, and would fail the proof for nothing). */
  return s->no_fd_writers || file_times_at_t(s);
}

/* The file changed since T: no unsaved page of any region of it can be proven
 * any more. Pages already saved (and proven when they were) stay. */
void lose_file(engine_t *e, const segment_t *changed) {
  uint64_t dev = changed->file_dev, ino = changed->file_ino;
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (s->kind == KIND_FILE && s->file_dev == dev && s->file_ino == ino) lose_unsaved(e, s, LOST_FILE_CHANGED);
  }
}

/* ---------- the target gone: exit or exec ---------- */

/* Is the address space the snapshot is of gone? pagemap_fd was opened on it:
 * once no task uses it pagemap_read returns nothing (mmget_not_zero fails). An
 * exec drops the old mm inside exec_mmap while holding exec_update_lock, which
 * process_vm_readv (mm_access) also takes: a copy can read the new image only
 * after the old mm is gone, and then the UFFDIO_WRITEPROTECT that must follow
 * every copy fails with ESRCH (mmget_not_zero on the context's mm). */
bool mm_gone(engine_t *e) {
  uint64_t pm;
  return read_pagemap(e->pagemap_fd, 0, 1, &pm) == EIO;
}

/* Stop: the target exited or called exec. An exit makes the pidfd readable
 * (exit_notify runs right after exit_mm); after an exec the process runs on. */
void target_gone(engine_t *e) {
  if (e->gone_reason >= 0) return;
  struct pollfd p = {.fd = e->pidfd, .events = POLLIN};
  bool exited = e->pidfd >= 0 && poll(&p, 1, 200) > 0 && (p.revents & POLLIN);
  e->gone_reason = exited ? LOST_TARGET_EXITED : LOST_TARGET_EXEC;
  set_fatal(e, ESRCH, exited ? "target exited during the snapshot" : "target called exec during the snapshot");
}

/* ---------- copying ---------- */

/* Copy [off, off+len) of a segment (its current address) into dst. */
int seg_copy(engine_t *e, segment_t *s, uint64_t off, uint64_t len, uint8_t *dst) {
  if (s->kind == KIND_FILE) {
    uint64_t done = 0;
    while (done < len) {
      ssize_t n = pread(s->fd, dst + done, len - done, (off_t)(s->file_off + off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0) { /* beyond the end of the file: reads as zero */
        memset(dst + done, 0, len - done);
        break;
      }
      done += (uint64_t)n;
    }
    return 0;
  }
  return remote_read(e->pid, e->mem_fd, s->cur_start + off, dst, len);
}

/* Every unsaved page of a shared file, copied and proven in one go, before the
 * engine unprotects any page of it. Once a page is unprotected the target's
 * writes through its mapping also set the file's times (fault_dirty_shared_page
 * calls file_update_time when the PTE was clean or absent), and those cannot
 * be told from a write through an fd: a later proof would fail for no reason.
 * Worse, a write to a page not present at T sets them even before its fault
 * reaches us. Copying the file whole first, right after the resume (pread:
 * immune to address-space events), with a single proof after it keeps every
 * page unless such a write came first. Larger files, or no memory for the
 * copy: each copy is proven on its own, and a mapping write after the sweep
 * passed loses the rest of the file (conservative). */
void save_file_whole(engine_t *e, segment_t *first) {
  uint64_t dev = first->file_dev, ino = first->file_ino, bytes = 0;
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (s->kind != KIND_FILE || s->file_dev != dev || s->file_ino != ino) continue;
    s->whole_tried = true;
    for (uint64_t o = 0; o < s->len; o += PG) bytes += s->state[o / PG] == PAGE_UNSAVED ? PG : 0;
  }
  if (bytes == 0 || bytes > FILE_WHOLE_MAX) return;
  uint8_t *buf = malloc(bytes);
  if (buf == NULL) return;
  uint64_t done = 0;
  for (size_t i = 0; i < e->nsegs && done <= bytes; i++) {
    segment_t *s = &e->segs[i];
    if (s->kind != KIND_FILE || s->file_dev != dev || s->file_ino != ino) continue;
    for (uint64_t o = 0; o < s->len;) {
      uint64_t end = o;
      while (end < s->len && s->state[end / PG] == PAGE_UNSAVED) end += PG;
      if (end > o && seg_copy(e, s, o, end - o, buf + done) != 0) {
        free(buf); /* unreadable: the per-copy path decides page by page */
        return;
      }
      done += end - o;
      o = end == o ? o + PG : end;
    }
  }
  if (!file_unchanged_since_t(first)) {
    free(buf);
    lose_file(e, first);
    return;
  }
  done = 0;
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (s->kind != KIND_FILE || s->file_dev != dev || s->file_ino != ino) continue;
    for (uint64_t o = 0; o < s->len; o += PG) {
      if (s->state[o / PG] != PAGE_UNSAVED) continue;
      uint8_t *dst = reserve(e, 1, true);
      if (dst == NULL) { /* the engine has failed (no batch memory) */
        free(buf);
        return;
      }
      memcpy(dst, buf + done, PG);
      commit(e, s->t_start + o, 1, true);
      s->state[o / PG] = PAGE_SAVED;
      atomic_fetch_add(&e->pages_fault, 1);
      done += PG;
    }
  }
  free(buf);
}

bool file_has_hole(segment_t *s, uint64_t off, uint64_t len) {
  off_t from = (off_t)(s->file_off + off);
  off_t hole = lseek(s->fd, from, SEEK_HOLE);
  return hole >= 0 && hole < from + (off_t)len;
}

void save_file_now(engine_t *e, segment_t *s) {
  for (uint64_t o = 0; o < s->len && !e->fatal_err;) {
    if (s->state[o / PG] != PAGE_UNSAVED) {
      o += PG;
      continue;
    }
    uint64_t end = o;
    while (end < s->len && end - o < 64 * PG && s->state[end / PG] == PAGE_UNSAVED) end += PG;
    uint32_t npg = (uint32_t)((end - o) / PG);
    uint8_t *dst = reserve(e, npg, true);
    if (dst == NULL) return; /* the engine has failed (no batch memory) */
    if (seg_copy(e, s, o, end - o, dst) != 0) {
      memset(s->state + o / PG, PAGE_LOST, npg);
      add_lost(e, s->t_start + o, npg, LOST_READ_FAILED);
    } else if (!file_unchanged_since_t(s)) {
      lose_file(e, s);
      return;
    } else {
      /* A file whose holes at T are known: a page that is a hole now was punched since, lost, never
       * stored as zero; the others are committed in order, their data moved up over the lost ones. */
      bool holes = s->no_fd_writers && file_has_hole(s, o, end - o);
      uint32_t kept = 0;
      for (uint32_t i = 0; i < npg; i++) {
        uint64_t at = o + (uint64_t)i * PG;
        if (holes && file_has_hole(s, at, PG)) {
          s->state[at / PG] = PAGE_LOST;
          add_lost(e, s->t_start + at, 1, LOST_DISCARDED);
          continue;
        }
        if (kept != i) memmove(dst + (size_t)kept * PG, dst + (size_t)i * PG, PG);
        s->state[at / PG] = PAGE_SAVED;
        commit(e, s->t_start + at, 1, true);
        kept++;
      }
      atomic_fetch_add(&e->pages_fault, kept);
    }
    o = end;
  }
}

bool is_zero_page_entry(engine_t *e, uint64_t pm) {
  return (pm & PM_PRESENT) && e->zero_pfn != 0 && (pm & PM_PFN_MASK) == e->zero_pfn;
}

/* A uffd-wp PTE marker on a never-populated pte: pagemap shows it as a swap
 * entry of the marker type (the last swap type, 31: swap type is the low 5 bits). */
bool is_marker_entry(uint64_t pm) {
  return (pm & PM_SWAP) && !(pm & PM_PRESENT) && (pm & 0x1f) == 0x1f;
}

/* Does this pagemap entry hold data (a real page, resident or swapped out)? */
bool entry_has_data(engine_t *e, uint64_t pm) {
  if (pm & PM_PRESENT) return !is_zero_page_entry(e, pm);
  return (pm & PM_SWAP) && !is_marker_entry(pm);
}

/* ---------- message handling ---------- */


/* Read whatever is pending: events are applied at once, faults queued
 * (fault_loop_read). Returns the number of messages. */
int read_more(engine_t *e, bool wait) {
  return fault_loop_read(&e->loop, wait);
}

/* Unprotect [start, start+len) at its current address, retrying while the
 * address space is changing. Returns 0, or ENOENT if the range is no longer
 * registered, or EAGAIN after applying events (the caller must re-check its
 * copy), or another errno. */
int unprotect_checked(engine_t *e, uint64_t cur_start, uint64_t len) {
  int err = uffd_writeprotect(e->uffd, cur_start, len, false);
  if (err == EAGAIN) {
    atomic_fetch_add(&e->eagain, 1);
    read_more(e, true);
  }
  return err;
}

/* In keep mode a saved page stays protected, so that the first write after T
 * reaches the log: protecting it again fails with EAGAIN on a pending event
 * just as the unprotect does, which is what validates the copy. */
int settle_checked(engine_t *e, uint64_t cur_start, uint64_t len) {
  if (!e->keep) return unprotect_checked(e, cur_start, len);
  int err = uffd_writeprotect(e->uffd, cur_start, len, true);
  if (err == EAGAIN) {
    atomic_fetch_add(&e->eagain, 1);
    read_more(e, true);
  }
  return err;
}

/* A copy from the target (seg_copy's result). ESRCH, or any failure once the
 * mm is gone, is an exit or exec: the copy may be of a new image. Otherwise a
 * failure is re-checked after the events pending now (a page moved or unmapped
 * since the caller looked); an event handler itself must not apply newer
 * events (may_apply_events false): its page is then unreadable. */
step_t copy_outcome(engine_t *e, int err, bool may_apply_events) {
  if (err == 0) return STEP_OK;
  if (err == ESRCH || mm_gone(e)) {
    target_gone(e);
    return STEP_STOP;
  }
  if (may_apply_events && read_more(e, false) > 0) return STEP_RETRY;
  return STEP_UNREADABLE;
}

/* An unprotect (unprotect_checked's result), after which the copy is valid.
 * EAGAIN: unprotect_checked applied the events, the copy may be stale.
 * ENOENT: not registered; pending events may explain it (a move or unmap we
 * have not read), else the mapping was replaced without one. ESRCH: the
 * context's mm is gone (exit or exec). Anything else fails the engine, with
 * `what` naming the operation. */
step_t unprotect_outcome(engine_t *e, int err, const char *what) {
  switch (err) {
  case 0:
    return STEP_OK;
  case EAGAIN:
    return STEP_RETRY;
  case ENOENT:
    return read_more(e, false) > 0 ? STEP_RETRY : STEP_UNREGISTERED;
  case ESRCH:
    target_gone(e);
    return STEP_STOP;
  default:
    set_fatal(e, err, what);
    return STEP_STOP;
  }
}

/* After an EAGAIN whose events we have read: each thread that raised
 * mmap_changing lowers it only when it runs again. Retrying at once loses the
 * race every time against a thread that changes its address space in a loop
 * (it raises it again before we look). Probe with a no-op (re-protecting the
 * faulting page, which is protected) until the kernel accepts, for at most
 * 300 us, without yielding the CPU to the thread that would close the window. */
void wait_quiet(engine_t *e, uint64_t start, uint64_t len) {
  double until = mono_us() + 300;
  while (uffd_writeprotect(e->uffd, start, len, true) == EAGAIN && mono_us() < until) {
  }
}
