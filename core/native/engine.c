/* The snapshot engine: one native thread per snapshotted process that owns the
 * "saved" state of every page and interleaves
 *   - write faults (copy the page as it was at T, mark it saved, unprotect+wake),
 *   - non-cooperative events (remove/unmap/remap keep the region map true),
 *   - a background sweep of unsaved pages in small chunks.
 * Copies land in a bounded pool of batches handed to JS through a thread-safe
 * function; JS releases a batch when it is stored. The fault path never waits
 * on JS: when the pool is empty it allocates an overflow batch; only the sweep
 * waits for a free batch.
 *
 * Validation rule (seed 002, DESIGN "mmap_changing"): a copy is kept only if
 * the UFFDIO_WRITEPROTECT that unprotects its pages succeeds afterwards. The
 * kernel fails that ioctl with EAGAIN while any remove/unmap/remap event is
 * unread, so success proves no such change raced with the copy. Zaps by
 * MADV_DONTNEED happen only after we read their REMOVE event; pages still
 * unsaved then are copied at once and checked against the pagemap. */
#include "addon.h"
#include "constants.h"
#include "kernel_compat.h"
#include "napi_util.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PG 4096ULL
#define SWEEP_CHUNK_BYTES (128 * 1024)
#define MSG_BATCH 64
#define MAX_LATENCY_SAMPLES (1u << 22)
#define MAX_SPARE_OVERFLOW 32
#define FAULT_SETTLE_US 10e6
/* A shared file up to this size (unsaved part) is saved whole before the
 * engine unprotects any page of it: see save_file_whole. */
#define FILE_WHOLE_MAX (128ull << 20)
/* The engine's nice value when the process may raise it (root, CAP_SYS_NICE).
 * A thread of the target blocked on a write fault waits for this thread to be
 * scheduled; at nice 0 it queues behind the store's compression threads and
 * the fault p99 grows from ~100 µs to milliseconds. */
#define ENGINE_NICE (-10)

enum { PAGE_UNSAVED = 0, PAGE_SAVED = 1, PAGE_LOST = 2 };
const char *const lost_reason_names[LOST_REASON_COUNT] = {
    [LOST_UNMAPPED] = "unmapped-before-saved",
    [LOST_DISCARDED] = "discarded-before-saved",
    [LOST_READ_FAILED] = "read-failed",
    [LOST_INTERRUPTED] = "interrupted",
    [LOST_SHARED] = "shared-with-other-process",
    [LOST_FILE_CHANGED] = "file-changed-before-saved",
    [LOST_TARGET_EXITED] = "target-exited",
    [LOST_TARGET_EXEC] = "target-exec",
};

/* A piece of a region at T, and where that piece lives now (mremap moves it). */
typedef struct {
  uint64_t t_start;   /* address at T */
  uint64_t cur_start; /* address now */
  uint64_t len;
  uint32_t page_size; /* 4096 or the hugetlb page size */
  int kind;
  int fd;             /* KIND_FILE: the shared file, read with pread */
  uint64_t file_off;  /* KIND_FILE: file offset of t_start */
  uint64_t file_dev, file_ino;          /* KIND_FILE: the inode, to find every region of the file */
  uint64_t ctime_ns_at_t, mtime_ns_at_t; /* KIND_FILE: the inode's times at T (fstat in the pause) */
  bool hugetlb;
  bool may_thp;       /* anonymous, and held PMD-mapped huge pages at the start (see thp_block) */
  bool gone;          /* unmapped: its old address range belongs to other mappings now */
  bool whole_tried;   /* KIND_FILE: save_file_whole ran for this file */
  uint8_t *state;     /* one byte per 4 KiB page of this piece */
} segment_t;

typedef struct slot {
  uint32_t id;
  uint32_t count;
  uint32_t cap;
  bool overflow;
  bool free;
  uint64_t *addrs;
  uint8_t *data;
} slot_t;

typedef struct {
  uint64_t address;
  uint64_t pages;
  int reason;
} lost_t;

typedef enum { MSG_BATCH_READY, MSG_DONE } msg_type_t;

typedef struct {
  msg_type_t type;
  slot_t *slot;
} engine_msg_t;

typedef struct {
  pid_t pid;
  int uffd;
  int pidfd;
  int pagemap_fd;
  int mem_fd;
  int wake_fd; /* eventfd: stop requests and released batches */
  uint64_t zero_pfn;

  segment_t *segs;
  size_t nsegs, segs_cap;
  uint8_t **state_blocks; /* owned state arrays, one per region */
  size_t nblocks;

  /* sweep cursor */
  size_t sweep_seg;
  uint64_t sweep_off;
  bool sweep_done;

  /* pool */
  pthread_mutex_t pool_lock;
  slot_t **slots; /* by id; overflow ids follow the fixed ones */
  size_t nslots, slots_cap;
  uint32_t pool_size, batch_pages;
  uint32_t spare_overflow; /* released overflow batches kept for reuse */
  slot_t *cur_sweep; /* batch the sweep fills (pool only) */
  slot_t *cur_fault; /* batch faults and events fill (pool, else overflow) */

  /* rate limit (bytes/s, 0 = unlimited) */
  double rate;
  double tokens;
  double tokens_at;

  /* pending messages read while an ioctl had to be retried */
  struct uffd_msg *pending;
  size_t npending, pending_cap;

  lost_t *lost;
  size_t nlost, lost_cap;

  uint32_t *latency_ns;
  size_t nlatency;

  _Atomic bool stop;
  _Atomic uint64_t faults, pages_fault, pages_sweep, pages_zero, pages_lost, bytes_copied, events, eagain, overflow_batches;
  uint64_t total_pages;

  int fatal_err;
  char fatal_what[160];
  int gone_reason; /* LOST_TARGET_EXITED/EXEC once the target's mm is gone, else -1 */
  bool finished;
  double started_us;

  pthread_t thread;
  bool thread_started;
  napi_threadsafe_function tsfn;
  engine_msg_t *done_msg; /* the final message, allocated at start */
  _Atomic uint32_t batches_posted;
  bool fault_alloc;       /* WPSNAP_FAULT=engine-alloc: fail the third batch's allocation */
} engine_t;

static double mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static uint64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_fatal(engine_t *e, int err, const char *what) {
  if (e->fatal_err) return;
  e->fatal_err = err;
  snprintf(e->fatal_what, sizeof e->fatal_what, "%s", what);
}

/* ---------- lost ranges ---------- */

static void add_lost(engine_t *e, uint64_t t_addr, uint64_t pages, int reason) {
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
static void lose_unsaved(engine_t *e, segment_t *s, int reason) {
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

/* ---------- pool ---------- */

/* A new batch, or NULL with the engine failed (ENOMEM): the fault thread never
 * dereferences a failed allocation, it ends the snapshot and JS releases the
 * target. */
static slot_t *slot_new(engine_t *e, bool overflow) {
  if (e->nslots == e->slots_cap) {
    size_t cap = e->slots_cap ? e->slots_cap * 2 : 32;
    slot_t **grown = realloc(e->slots, cap * sizeof(slot_t *));
    if (grown == NULL) {
      set_fatal(e, ENOMEM, "grow the batch table");
      return NULL;
    }
    e->slots = grown;
    e->slots_cap = cap;
  }
  slot_t *s = calloc(1, sizeof *s);
  if (s == NULL) {
    set_fatal(e, ENOMEM, "allocate a page batch");
    return NULL;
  }
  s->cap = e->batch_pages;
  s->addrs = malloc(sizeof(uint64_t) * s->cap);
  /* SAFETY: private anonymous memory of our own; checked against MAP_FAILED. */
  s->data = mmap(NULL, (size_t)s->cap * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s->addrs == NULL || s->data == MAP_FAILED) {
    if (s->data != MAP_FAILED) munmap(s->data, (size_t)s->cap * PG);
    free(s->addrs);
    free(s);
    set_fatal(e, ENOMEM, "allocate a page batch");
    return NULL;
  }
  s->overflow = overflow;
  s->id = (uint32_t)e->nslots;
  e->slots[e->nslots++] = s;
  return s;
}

/* A free pool batch (overflow = false) or spare overflow batch; pool_lock held. */
static slot_t *slot_find_free(engine_t *e, bool overflow) {
  for (size_t i = 0; i < e->nslots; i++) {
    slot_t *s = e->slots[i];
    if (s != NULL && s->free && s->overflow == overflow) return s;
  }
  return NULL;
}

/* A free batch: pool batches first; for a fault, then a spare overflow batch,
 * then a new one. The sweep only ever gets pool batches. */
static slot_t *slot_take(engine_t *e, bool allow_overflow) {
  /* WPSNAP_FAULT=engine-alloc: once two batches are posted, getting a batch
   * for a write fault fails as an allocation does under memory pressure
   * (slot_new NULL), with a target thread waiting on that fault. */
  if (e->fault_alloc && allow_overflow && atomic_load(&e->batches_posted) >= 2) {
    set_fatal(e, ENOMEM, "allocate a page batch (WPSNAP_FAULT=engine-alloc)");
    return NULL;
  }
  pthread_mutex_lock(&e->pool_lock);
  slot_t *found = slot_find_free(e, false);
  if (found == NULL && allow_overflow) found = slot_find_free(e, true);
  if (found != NULL && found->overflow) e->spare_overflow--;
  if (found == NULL && allow_overflow) {
    found = slot_new(e, true);
    atomic_fetch_add(&e->overflow_batches, 1);
  }
  if (found != NULL) {
    found->free = false;
    found->count = 0;
  }
  pthread_mutex_unlock(&e->pool_lock);
  return found;
}

static void post_slot(engine_t *e, slot_t *s) {
  engine_msg_t *m = malloc(sizeof *m);
  if (m == NULL) {
    set_fatal(e, ENOMEM, "post a page batch");
    return;
  }
  m->type = MSG_BATCH_READY;
  m->slot = s;
  atomic_fetch_add(&e->batches_posted, 1);
  napi_call_threadsafe_function(e->tsfn, m, napi_tsfn_blocking);
}

static void flush_batch(engine_t *e, slot_t **batch) {
  if (*batch != NULL && (*batch)->count > 0) {
    post_slot(e, *batch);
    *batch = NULL;
  }
}

/* Post both partly filled batches (before waiting, and at the end). */
static void flush_current(engine_t *e) {
  flush_batch(e, &e->cur_sweep);
  flush_batch(e, &e->cur_fault);
}

/* Room for n pages at the tail of the fault or the sweep batch. Faults and the
 * sweep fill separate batches: the sweep only ever gets pool batches (it waits
 * when the pool is exhausted), faults get an overflow batch rather than wait.
 * Returns NULL only for the sweep. */
static uint8_t *reserve(engine_t *e, uint32_t n, bool from_fault) {
  slot_t **batch = from_fault ? &e->cur_fault : &e->cur_sweep;
  if (*batch != NULL && (*batch)->count + n > (*batch)->cap) flush_batch(e, batch);
  if (*batch == NULL) {
    *batch = slot_take(e, from_fault);
    if (*batch == NULL) return NULL;
  }
  return (*batch)->data + (size_t)(*batch)->count * PG;
}

/* Can the sweep reserve at least one page now? */
static bool sweep_has_room(engine_t *e) {
  if (e->cur_sweep != NULL) return e->cur_sweep->count < e->cur_sweep->cap;
  pthread_mutex_lock(&e->pool_lock);
  bool any = slot_find_free(e, false) != NULL;
  pthread_mutex_unlock(&e->pool_lock);
  return any;
}

/* Pages reserved and filled: record their addresses at T. */
static void commit(engine_t *e, uint64_t t_addr, uint32_t n, bool from_fault) {
  slot_t **batch = from_fault ? &e->cur_fault : &e->cur_sweep;
  for (uint32_t i = 0; i < n; i++) (*batch)->addrs[(*batch)->count + i] = t_addr + i * PG;
  (*batch)->count += n;
  atomic_fetch_add(&e->bytes_copied, (uint64_t)n * PG);
  if ((*batch)->count == (*batch)->cap) flush_batch(e, batch);
}

/* ---------- segments ---------- */

static segment_t *seg_by_cur(engine_t *e, uint64_t addr) {
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    if (!s->gone && addr >= s->cur_start && addr < s->cur_start + s->len) return s;
  }
  return NULL;
}

static segment_t *seg_append(engine_t *e) {
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
static void seg_split(engine_t *e, size_t i, uint64_t off) {
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
static uint64_t ts_ns(struct timespec t) { return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec; }

static bool file_unchanged_since_t(segment_t *s) {
  (void)lseek(s->fd, 0, SEEK_DATA); /* a barrier only: waits for a change holding the inode lock */
  struct stat st;
  if (fstat(s->fd, &st) != 0) return false;
  return ts_ns(st.st_ctim) == s->ctime_ns_at_t && ts_ns(st.st_mtim) == s->mtime_ns_at_t;
}

/* The file changed since T: no unsaved page of any region of it can be proven
 * any more. Pages already saved (and proven when they were) stay. */
static void lose_file(engine_t *e, const segment_t *changed) {
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
static bool mm_gone(engine_t *e) {
  uint64_t pm;
  return read_pagemap(e->pagemap_fd, 0, 1, &pm) == EIO;
}

/* Stop: the target exited or called exec. An exit makes the pidfd readable
 * (exit_notify runs right after exit_mm); after an exec the process runs on. */
static void target_gone(engine_t *e) {
  if (e->gone_reason >= 0) return;
  struct pollfd p = {.fd = e->pidfd, .events = POLLIN};
  bool exited = e->pidfd >= 0 && poll(&p, 1, 200) > 0 && (p.revents & POLLIN);
  e->gone_reason = exited ? LOST_TARGET_EXITED : LOST_TARGET_EXEC;
  set_fatal(e, ESRCH, exited ? "target exited during the snapshot" : "target called exec during the snapshot");
}

/* ---------- copying ---------- */

/* Copy [off, off+len) of a segment (its current address) into dst. */
static int seg_copy(engine_t *e, segment_t *s, uint64_t off, uint64_t len, uint8_t *dst) {
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
static void save_file_whole(engine_t *e, segment_t *first) {
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

static bool is_zero_page_entry(engine_t *e, uint64_t pm) {
  return (pm & PM_PRESENT) && e->zero_pfn != 0 && (pm & PM_PFN_MASK) == e->zero_pfn;
}

/* A uffd-wp PTE marker on a never-populated pte: pagemap shows it as a swap
 * entry of the marker type (the last swap type, 31: swap type is the low 5 bits). */
static bool is_marker_entry(uint64_t pm) {
  return (pm & PM_SWAP) && !(pm & PM_PRESENT) && (pm & 0x1f) == 0x1f;
}

/* Does this pagemap entry hold data (a real page, resident or swapped out)? */
static bool entry_has_data(engine_t *e, uint64_t pm) {
  if (pm & PM_PRESENT) return !is_zero_page_entry(e, pm);
  return (pm & PM_SWAP) && !is_marker_entry(pm);
}

/* ---------- message handling ---------- */

static void handle_message(engine_t *e, struct uffd_msg *m, uint64_t read_ns);

/* Read whatever is pending. Events are applied at once (an ioctl is waiting for
 * them); faults are queued for the main loop. Returns the number of messages. */
static int read_more(engine_t *e, bool wait) {
  struct uffd_msg msgs[MSG_BATCH];
  ssize_t r = read(e->uffd, msgs, sizeof msgs);
  if (r < 0) {
    if (errno == EAGAIN && wait) {
      /* mmap_changing is raised just before the event is queued: give it a moment. */
      struct pollfd p = {.fd = e->uffd, .events = POLLIN};
      poll(&p, 1, 1);
      return 0;
    }
    if (errno != EAGAIN && errno != EINTR) set_fatal(e, errno, "read(userfaultfd)");
    return 0;
  }
  int n = (int)(r / (ssize_t)sizeof(struct uffd_msg));
  for (int i = 0; i < n; i++) {
    if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
      if (e->npending == e->pending_cap) {
        size_t cap = e->pending_cap ? e->pending_cap * 2 : 64;
        struct uffd_msg *grown = realloc(e->pending, cap * sizeof(struct uffd_msg));
        if (grown == NULL) {
          /* The faulting thread stays blocked until JS closes the userfaultfd, which wakes it. */
          set_fatal(e, ENOMEM, "queue a write fault");
          continue;
        }
        e->pending = grown;
        e->pending_cap = cap;
      }
      e->pending[e->npending++] = msgs[i];
    } else {
      handle_message(e, &msgs[i], 0);
    }
  }
  return n;
}

/* Unprotect [start, start+len) at its current address, retrying while the
 * address space is changing. Returns 0, or ENOENT if the range is no longer
 * registered, or EAGAIN after applying events (the caller must re-check its
 * copy), or another errno. */
static int unprotect_checked(engine_t *e, uint64_t cur_start, uint64_t len) {
  int err = uffd_writeprotect(e->uffd, cur_start, len, false);
  if (err == EAGAIN) {
    atomic_fetch_add(&e->eagain, 1);
    read_more(e, true);
  }
  return err;
}

/* After an EAGAIN whose events we have read: each thread that raised
 * mmap_changing lowers it only when it runs again. Retrying at once loses the
 * race every time against a thread that changes its address space in a loop
 * (it raises it again before we look). Probe with a no-op (re-protecting the
 * faulting page, which is protected) until the kernel accepts, for at most
 * 300 us, without yielding the CPU to the thread that would close the window. */
static void wait_quiet(engine_t *e, uint64_t start, uint64_t len) {
  double until = mono_us() + 300;
  while (uffd_writeprotect(e->uffd, start, len, true) == EAGAIN && mono_us() < until) {
  }
}

/* ---------- transparent huge pages ----------
 * UFFDIO_WRITEPROTECT keeps a huge PMD of an anonymous mapping huge only when
 * its range covers the whole 2 MiB (mm/mprotect.c change_pmd_range: a huge
 * pmd is split unless next - addr == HPAGE_PMD_SIZE; file-backed ones always
 * are); change_huge_pmd() then sets or clears the pmd's uffd-wp bit, and a
 * write fault on a protected huge pmd reaches us without a split
 * (wp_huge_pmd). The pause protects whole mappings, cut at 2 MiB boundaries
 * (uffd.c), so THPs are protected whole; a 4 KiB unprotect after a fault or a
 * 128 KiB sweep chunk would split them. So a PMD-mapped block is saved and
 * unprotected as one 2 MiB unit, by a fault in it or by the sweep. */
#define THP_BYTES (2ull << 20)
#define THP_PAGES 512u
enum { THP_NONE = 0, THP_DATA = 1, THP_ZERO = 2 };

/* The first PMD-mapped block in [addr, end), as PAGEMAP_SCAN's PAGE_IS_HUGE
 * reports it (for anonymous memory only a huge pmd sets it); false if none. */
static bool find_huge(engine_t *e, uint64_t addr, uint64_t end, struct wpsnap_page_region *r) {
  struct wpsnap_pm_scan_arg arg = {
      .size = sizeof arg,
      .start = addr,
      .end = end,
      .vec = (uint64_t)(uintptr_t)r,
      .vec_len = 1,
      .category_anyof_mask = PAGE_IS_HUGE,
      .return_mask = PAGE_IS_HUGE | PAGE_IS_PFNZERO,
  };
  /* SAFETY: a read-only walk of the target's page tables; EINVAL/ENOTTY on a
   * kernel without PAGEMAP_SCAN leaves everything in 4 KiB units. */
  return ioctl(e->pagemap_fd, PAGEMAP_SCAN, &arg) == 1;
}

/* Is the 2 MiB block holding offset `off` of s one huge PMD now? Sets *block
 * to its offset in s; THP_ZERO when it maps the huge zero page. */
static int thp_block(engine_t *e, segment_t *s, uint64_t off, uint64_t *block) {
  if (!s->may_thp) return THP_NONE;
  uint64_t addr = (s->cur_start + off) & ~(THP_BYTES - 1);
  struct wpsnap_page_region r;
  if (addr < s->cur_start || addr + THP_BYTES > s->cur_start + s->len) return THP_NONE;
  if (!find_huge(e, addr, addr + THP_BYTES, &r) || r.start != addr || r.end != addr + THP_BYTES) return THP_NONE;
  *block = addr - s->cur_start;
  return (r.categories & PAGE_IS_PFNZERO) ? THP_ZERO : THP_DATA;
}

/* need[i]: page i of the block is unsaved and holds data at T (every page of a
 * huge pmd does, but the huge zero page). Returns how many. */
static uint32_t thp_need(segment_t *s, uint64_t block, int thp, uint8_t need[THP_PAGES]) {
  uint32_t n = 0;
  for (uint32_t i = 0; i < THP_PAGES; i++) {
    need[i] = thp == THP_DATA && s->state[block / PG + i] == PAGE_UNSAVED;
    n += need[i];
  }
  return n;
}

/* Copy the needed pages of the block, in runs, to dst. 0 or an errno. */
static int thp_copy(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], uint8_t *dst) {
  uint32_t k = 0;
  for (uint32_t i = 0; i < THP_PAGES;) {
    if (!need[i]) {
      i++;
      continue;
    }
    uint32_t j = i;
    while (j < THP_PAGES && need[j]) j++;
    int err = seg_copy(e, s, block + (uint64_t)i * PG, (uint64_t)(j - i) * PG, dst + (size_t)k * PG);
    if (err != 0) return err;
    k += j - i;
    i = j;
  }
  return 0;
}

/* The block is unprotected: its copied pages go into *batch (reserved by
 * thp_need's count), and every other unsaved page of it was zero at T. */
static void thp_commit(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], slot_t **batch) {
  uint32_t k = 0;
  for (uint32_t i = 0; i < THP_PAGES; i++) {
    uint8_t *state = &s->state[block / PG + i];
    if (need[i]) (*batch)->addrs[(*batch)->count + k++] = s->t_start + block + (uint64_t)i * PG;
    else if (*state == PAGE_UNSAVED) atomic_fetch_add(&e->pages_zero, 1);
    if (*state == PAGE_UNSAVED) *state = PAGE_SAVED;
  }
  if (k == 0) return;
  (*batch)->count += k;
  atomic_fetch_add(&e->bytes_copied, (uint64_t)k * PG);
  if ((*batch)->count == (*batch)->cap) flush_batch(e, batch);
}

/* Save and unprotect a PMD-mapped block, for a fault (which may not wait for
 * the pool) or the sweep. Returns 0 when done; EAGAIN when events were applied
 * (segments may have moved: look the address up again); ENOBUFS when the
 * sweep has no batch; -1 when a page could not be read (use 4 KiB units). */
static int save_thp(engine_t *e, segment_t *s, uint64_t block, int thp, bool from_fault) {
  uint8_t need[THP_PAGES];
  uint32_t n = thp_need(s, block, thp, need);
  uint8_t *dst = n > 0 ? reserve(e, n, from_fault) : NULL;
  if (n > 0 && dst == NULL) return ENOBUFS;
  int err = n > 0 ? thp_copy(e, s, block, need, dst) : 0;
  if (err == ESRCH || (err != 0 && mm_gone(e))) {
    target_gone(e);
    return 0;
  }
  if (err != 0) return read_more(e, false) > 0 ? EAGAIN : -1;
  err = unprotect_checked(e, s->cur_start + block, THP_BYTES);
  if (err == EAGAIN) return EAGAIN; /* events applied: copy again */
  if (err == ENOENT) return read_more(e, false) > 0 ? EAGAIN : -1;
  if (err == ESRCH) { /* exec or exit: the copy may be of a new image, never stored */
    target_gone(e);
    return 0;
  }
  if (err != 0) {
    set_fatal(e, err, "ioctl(UFFDIO_WRITEPROTECT) of a huge page");
    return 0;
  }
  thp_commit(e, s, block, need, from_fault ? &e->cur_fault : &e->cur_sweep);
  atomic_fetch_add(from_fault ? &e->pages_fault : &e->pages_sweep, n);
  return 0;
}

/* Which segments may hold THPs: anonymous ones with a huge pmd at the start.
 * Later huge pmds only form where every pte is unprotected (khugepaged and
 * MADV_COLLAPSE refuse uffd-wp ptes), i.e. over saved pages. */
static void find_thp_segments(engine_t *e) {
  struct wpsnap_page_region r;
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    s->may_thp = s->kind == KIND_ANON && !s->hugetlb && s->len >= THP_BYTES &&
                 find_huge(e, s->cur_start, s->cur_start + s->len, &r);
  }
}

static void handle_fault(engine_t *e, uint64_t addr, uint64_t read_ns) {
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
    if (s->state[idx] != PAGE_UNSAVED) {
      int err = uffd_writeprotect(e->uffd, s->cur_start + off, unit, false);
      if (err == EAGAIN) {
        read_more(e, true);
        continue;
      }
      if (err != 0) uffd_wake(e->uffd, s->cur_start + off, unit);
      return;
    }
    uint8_t *dst = reserve(e, npg, true);
    if (dst == NULL) return; /* the engine has failed: the thread is woken when JS closes the userfaultfd */
    int err = seg_copy(e, s, off, unit, dst);
    if (err == ESRCH || (err != 0 && mm_gone(e))) {
      target_gone(e);
      return;
    }
    if (err != 0) {
      /* Unreadable: re-check after pending events, then give up on the page. */
      if (read_more(e, false) > 0) continue;
      for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_LOST;
      add_lost(e, s->t_start + off, npg, LOST_READ_FAILED);
      if (uffd_writeprotect(e->uffd, s->cur_start + off, unit, false) != 0) uffd_wake(e->uffd, s->cur_start + off, unit);
      return;
    }
    err = unprotect_checked(e, s->cur_start + off, unit);
    if (err == EAGAIN) continue; /* events applied: copy again */
    if (err == ENOENT) {
      if (read_more(e, false) > 0) continue;
      uffd_wake(e->uffd, addr & ~(PG - 1), PG);
      return;
    }
    if (err == ESRCH) { /* the copy may be of a new image: never stored */
      target_gone(e);
      return;
    }
    if (err != 0) {
      set_fatal(e, err, "ioctl(UFFDIO_WRITEPROTECT) after a fault");
      return;
    }
    if (s->kind == KIND_FILE && !file_unchanged_since_t(s)) {
      lose_file(e, s); /* the page is unprotected and its thread woken: it was lost anyway */
      return;
    }
    for (uint32_t i = 0; i < npg; i++) s->state[idx + i] = PAGE_SAVED;
    commit(e, s->t_start + off, npg, true);
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
static void handle_remove(engine_t *e, uint64_t start, uint64_t end) {
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
        atomic_fetch_add(&e->pages_zero, 1);
        continue;
      }
      uint8_t *dst = reserve(e, 1, true);
      if (dst == NULL) return; /* the engine has failed */
      int err = seg_copy(e, s, off, PG, dst);
      /* After an exec the old mm's pagemap reads nothing: never take that for "zapped". */
      int pm_err = read_pagemap(e->pagemap_fd, a, 1, &pm2);
      if ((err != 0 || pm_err != 0) && mm_gone(e)) {
        target_gone(e);
        return;
      }
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
static void handle_unmap(engine_t *e, uint64_t start, uint64_t end) {
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
static void handle_remap(engine_t *e, uint64_t from, uint64_t to, uint64_t len) {
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

static void handle_message(engine_t *e, struct uffd_msg *m, uint64_t read_ns) {
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
    /* The fork waits for this read, but the read completes it: from now on
     * the child can write the shared memory without faulting here. Unsaved
     * shared pages therefore have no instant T any more: list them lost.
     * Closing the child's context releases the child. */
    atomic_fetch_add(&e->events, 1);
    for (size_t si = 0; si < e->nsegs; si++) {
      segment_t *s = &e->segs[si];
      if (s->kind != KIND_FILE) continue;
      lose_unsaved(e, s, LOST_SHARED);
    }
    close((int)m->arg.fork.ufd);
    break;
  default:
    break;
  }
}

/* Handle everything pending on the userfaultfd. */
static void drain(engine_t *e) {
  for (;;) {
    while (e->npending > 0 && !e->fatal_err) {
      struct uffd_msg m = e->pending[0];
      memmove(e->pending, e->pending + 1, (e->npending - 1) * sizeof m);
      e->npending--;
      handle_message(e, &m, mono_ns());
    }
    if (e->fatal_err) return;
    /* Events are applied as they are read, in the kernel's order, before any
     * fault of the same read is handled (read() returns pending faults first):
     * a fault handler must never copy a page whose REMOVE was read already
     * (the zap follows the read), nor apply newer events it reads itself
     * (read_more) before older ones still waiting in a local batch. */
    if (read_more(e, false) <= 0) return; /* EAGAIN: POLLIN may be followed by nothing to read (seed 003) */
  }
}

/* ---------- sweep ---------- */

enum { SWEEP_PROGRESS, SWEEP_DONE, SWEEP_WAIT_POOL, SWEEP_WAIT_RATE };

static void rate_refill(engine_t *e) {
  if (e->rate <= 0) return;
  double now = mono_us();
  e->tokens += (now - e->tokens_at) * e->rate / 1e6;
  if (e->tokens > e->rate / 10 + SWEEP_CHUNK_BYTES) e->tokens = e->rate / 10 + SWEEP_CHUNK_BYTES;
  e->tokens_at = now;
}

/* Which of the npg pages (at most 512) from `off` hold data at T? Anonymous
 * pages never touched (pte marker or the shared zero page) are zero at T;
 * holes of a shared file likewise. Fills need[] and returns how many do. */
static uint32_t pages_with_data(engine_t *e, segment_t *s, uint64_t off, uint32_t npg, uint8_t *need) {
  if (s->kind == KIND_ANON) {
    uint64_t pm[512];
    int err = read_pagemap(e->pagemap_fd, s->cur_start + off, npg, pm);
    if (err != 0) {
      if (err == ESRCH) target_gone(e);
      for (uint32_t i = 0; i < npg; i++) pm[i] = PM_PRESENT;
    }
    for (uint32_t i = 0; i < npg; i++) need[i] = entry_has_data(e, pm[i]);
  } else if (s->kind == KIND_FILE) {
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
static int sweep_thp(engine_t *e, segment_t *s, uint64_t block, int thp, int *wait_ms) {
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

static int sweep_step(engine_t *e, int *wait_ms) {
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

  uint8_t need[512];
  uint32_t ncopy = pages_with_data(e, s, off, npg, need);

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
      int err = seg_copy(e, s, off + (uint64_t)i * PG, (uint64_t)(j - i) * PG, dst + (size_t)k * PG);
      if (err == ESRCH || (err != 0 && mm_gone(e))) {
        target_gone(e);
        return SWEEP_PROGRESS;
      }
      if (err != 0) {
        /* An address-space change we have not read yet, or a page the kernel
         * will not give us: re-check after events, else lose the page. */
        if (read_more(e, false) > 0) return SWEEP_PROGRESS;
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

  int err = unprotect_checked(e, s->cur_start + off, len);
  if (err == EAGAIN) return SWEEP_PROGRESS; /* events applied; copy again */
  if (err == ENOENT) {
    if (read_more(e, false) > 0) return SWEEP_PROGRESS;
    /* Not ours any more and no event explains it: the mapping was replaced. */
    for (uint32_t i = 0; i < npg; i++) s->state[off / PG + i] = PAGE_LOST;
    add_lost(e, s->t_start + off, npg, LOST_UNMAPPED);
    return SWEEP_PROGRESS;
  }
  if (err == ESRCH) { /* the copy may be of a new image: never stored */
    target_gone(e);
    return SWEEP_PROGRESS;
  }
  if (err != 0) {
    set_fatal(e, err, "ioctl(UFFDIO_WRITEPROTECT) in the sweep");
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
    if (!need[i]) {
      s->state[off / PG + i] = PAGE_SAVED;
      atomic_fetch_add(&e->pages_zero, 1);
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

static void *engine_main(void *arg) {
  engine_t *e = arg;
  prctl(PR_SET_NAME, "wpsnap-engine");
  find_thp_segments(e);
  /* Per-thread on Linux; without the privilege the engine simply stays at the process's nice. */
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), ENGINE_NICE);
  e->tokens_at = mono_us();
  e->tokens = SWEEP_CHUNK_BYTES;
  struct pollfd fds[3] = {
      {.fd = e->uffd, .events = POLLIN},
      {.fd = e->wake_fd, .events = POLLIN},
      {.fd = e->pidfd, .events = POLLIN},
  };
  /* Shared files first, at once: a write by the target to a shmem page not
   * present at T sets the file's times before its write-protect fault reaches
   * us (do_shared_fault calls fault_dirty_shared_page first), just as a write
   * through an fd does: the sooner the whole file is proven, the fewer such
   * writes can make it unprovable. */
  for (size_t i = 0; i < e->nsegs && !e->fatal_err; i++)
    if (e->segs[i].kind == KIND_FILE && !e->segs[i].whole_tried) save_file_whole(e, &e->segs[i]);
  while (!atomic_load(&e->stop) && !e->fatal_err) {
    drain(e);
    if (e->fatal_err) break;
    if (e->sweep_done) break;
    int wait_ms = -1;
    int r = sweep_step(e, &wait_ms);
    if (r == SWEEP_PROGRESS) continue;
    if (r == SWEEP_DONE) {
      e->sweep_done = true;
      drain(e);
      break;
    }
    /* Partly filled batches are posted only before a long rate-limit wait:
     * posting them at every wait would hand the store many tiny batches. A
     * pool wait ends when the store releases a batch it already has. */
    if (r == SWEEP_WAIT_RATE && wait_ms >= 50) flush_current(e);
    if (r == SWEEP_WAIT_POOL) wait_ms = 50;
    int pr = poll(fds, e->pidfd >= 0 ? 3 : 2, wait_ms);
    if (pr > 0 && (fds[1].revents & POLLIN)) {
      uint64_t v;
      ssize_t ignored = read(e->wake_fd, &v, sizeof v);
      (void)ignored;
    }
    if (pr > 0 && e->pidfd >= 0 && (fds[2].revents & POLLIN)) target_gone(e);
  }
  if (!e->sweep_done) {
    /* Stopped early: whatever is unsaved is not in the snapshot. */
    int reason = e->gone_reason >= 0 ? e->gone_reason : LOST_INTERRUPTED;
    for (size_t i = 0; i < e->nsegs; i++) {
      segment_t *s = &e->segs[i];
      lose_unsaved(e, s, reason);
    }
  }
  flush_current(e);
  e->finished = true;
  engine_msg_t *m = e->done_msg; /* allocated at start: the end is always reported */
  e->done_msg = NULL;
  m->type = MSG_DONE;
  m->slot = NULL;
  napi_call_threadsafe_function(e->tsfn, m, napi_tsfn_blocking);
  napi_release_threadsafe_function(e->tsfn, napi_tsfn_release);
  return NULL;
}

/* ---------- JS glue ---------- */

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static napi_value stats_object(napi_env env, engine_t *e, bool final) {
  napi_value o;
  if (napi_create_object(env, &o) != napi_ok) return NULL;
  set_prop(env, o, "faults", make_double(env, (double)atomic_load(&e->faults)));
  set_prop(env, o, "pagesFromFaults", make_double(env, (double)atomic_load(&e->pages_fault)));
  set_prop(env, o, "pagesFromSweep", make_double(env, (double)atomic_load(&e->pages_sweep)));
  set_prop(env, o, "pagesZero", make_double(env, (double)atomic_load(&e->pages_zero)));
  set_prop(env, o, "pagesLost", make_double(env, (double)atomic_load(&e->pages_lost)));
  set_prop(env, o, "bytesCopied", make_double(env, (double)atomic_load(&e->bytes_copied)));
  set_prop(env, o, "events", make_double(env, (double)atomic_load(&e->events)));
  set_prop(env, o, "eagainRetries", make_double(env, (double)atomic_load(&e->eagain)));
  set_prop(env, o, "overflowBatches", make_double(env, (double)atomic_load(&e->overflow_batches)));
  set_prop(env, o, "totalPages", make_double(env, (double)e->total_pages));
  if (final) {
    double p50 = 0, p99 = 0, max = 0;
    if (e->nlatency > 0) {
      qsort(e->latency_ns, e->nlatency, sizeof(uint32_t), cmp_u32);
      p50 = e->latency_ns[e->nlatency / 2] / 1000.0;
      p99 = e->latency_ns[(size_t)((e->nlatency - 1) * 0.99)] / 1000.0;
      max = e->latency_ns[e->nlatency - 1] / 1000.0;
    }
    set_prop(env, o, "faultServiceP50Micros", make_double(env, p50));
    set_prop(env, o, "faultServiceP99Micros", make_double(env, p99));
    set_prop(env, o, "faultServiceMaxMicros", make_double(env, max));
    set_prop(env, o, "latencySamples", make_double(env, (double)e->nlatency));
    napi_value lost;
    napi_create_array_with_length(env, e->nlost, &lost);
    for (size_t i = 0; i < e->nlost; i++) {
      napi_value l;
      napi_create_object(env, &l);
      set_prop(env, l, "address", make_bigint(env, e->lost[i].address));
      set_prop(env, l, "pages", make_double(env, (double)e->lost[i].pages));
      set_prop(env, l, "reason", make_string(env, lost_reason_names[e->lost[i].reason]));
      napi_set_element(env, lost, (uint32_t)i, l);
    }
    set_prop(env, o, "lost", lost);
    if (e->fatal_err) {
      char message[300];
      snprintf(message, sizeof message, "%s: %s (%s)", e->fatal_what, errno_name(e->fatal_err), strerror(e->fatal_err));
      napi_value err, code, msg;
      napi_create_string_utf8(env, errno_name(e->fatal_err), NAPI_AUTO_LENGTH, &code);
      napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
      napi_create_error(env, code, msg, &err);
      set_prop(env, err, "errno", make_int(env, e->fatal_err));
      set_prop(env, err, "syscall", make_string(env, e->fatal_what));
      set_prop(env, o, "error", err);
    }
    set_prop(env, o, "stopped", make_int(env, atomic_load(&e->stop) ? 1 : 0));
  }
  return o;
}

static void noop_finalize(napi_env env, void *data, void *hint) {}

static void call_js(napi_env env, napi_value callback, void *context, void *data) {
  engine_t *e = context;
  engine_msg_t *m = data;
  if (env == NULL) {
    free(m);
    return;
  }
  napi_value msg, undefined;
  napi_create_object(env, &msg);
  if (m->type == MSG_BATCH_READY) {
    slot_t *s = m->slot;
    napi_value ab_addr, ab_data, addrs, pages;
    /* Zero-copy views of the batch: valid until engineRelease(slot). */
    napi_create_external_arraybuffer(env, s->addrs, (size_t)s->count * 8, noop_finalize, NULL, &ab_addr);
    napi_create_external_arraybuffer(env, s->data, (size_t)s->count * PG, noop_finalize, NULL, &ab_data);
    napi_create_typedarray(env, napi_biguint64_array, s->count, ab_addr, 0, &addrs);
    napi_create_typedarray(env, napi_uint8_array, (size_t)s->count * PG, ab_data, 0, &pages);
    set_prop(env, msg, "type", make_string(env, "batch"));
    set_prop(env, msg, "slot", make_int(env, s->id));
    set_prop(env, msg, "addresses", addrs);
    set_prop(env, msg, "data", pages);
  } else {
    set_prop(env, msg, "type", make_string(env, "done"));
    set_prop(env, msg, "stats", stats_object(env, e, true));
  }
  free(m);
  napi_get_undefined(env, &undefined);
  napi_call_function(env, undefined, callback, 1, &msg, NULL);
}

static engine_t *get_engine(napi_env env, napi_value v) { return handle_data(env, v, HANDLE_ENGINE); }

static void engine_free(engine_t *e) {
  free(e->done_msg);
  for (size_t i = 0; i < e->nslots; i++) {
    if (e->slots[i] == NULL) continue;
    munmap(e->slots[i]->data, (size_t)e->slots[i]->cap * PG);
    free(e->slots[i]->addrs);
    free(e->slots[i]);
  }
  free(e->slots);
  for (size_t i = 0; i < e->nblocks; i++) free(e->state_blocks[i]);
  free(e->state_blocks);
  for (size_t i = 0; i < e->nsegs; i++)
    if (e->segs[i].fd >= 0 && (i == 0 || e->segs[i].fd != e->segs[i - 1].fd)) {
      /* fds are owned by JS */
    }
  free(e->segs);
  free(e->pending);
  free(e->lost);
  free(e->latency_ns);
  if (e->pagemap_fd >= 0) close(e->pagemap_fd);
  if (e->mem_fd >= 0) close(e->mem_fd);
  if (e->wake_fd >= 0) close(e->wake_fd);
  pthread_mutex_destroy(&e->pool_lock);
  free(e);
}

static void engine_finalize(napi_env env, void *data, void *hint) {
  engine_t *e = data;
  if (e->thread_started) {
    atomic_store(&e->stop, true);
    uint64_t one = 1;
    ssize_t ignored = write(e->wake_fd, &one, sizeof one);
    (void)ignored;
    pthread_join(e->thread, NULL);
  }
  engine_free(e);
}

/* The pfn of the shared zero page: map a page here, read it, look it up. */
static uint64_t find_zero_pfn(void) {
  volatile uint8_t *p = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 0;
  (void)p[0];
  uint64_t entry = 0;
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    read_pagemap(fd, (uint64_t)(uintptr_t)p, 1, &entry);
    close(fd);
  }
  munmap((void *)p, PG);
  return (entry & PM_PRESENT) ? (entry & PM_PFN_MASK) : 0;
}

/* engineStart({pid, uffd, pidfd, regions: [{start, end, pageSize, kind, fd, fileOffset, hugetlb}],
 *              batchPages, poolBatches, rateBytesPerSec}, onMessage) -> handle */
static napi_value js_engine_start(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) return throw_type(env, "engineStart(options, onMessage)");
  napi_value opts = argv[0];
  int32_t pid, uffd, pidfd, batch_pages = 512, pool = 16;
  uint64_t rate = 0;
  if (!prop_int32(env, opts, "pid", &pid) || !prop_int32(env, opts, "uffd", &uffd) || !prop_int32(env, opts, "pidfd", &pidfd))
    return throw_type(env, "engineStart: pid, uffd and pidfd are required");
  prop_int32(env, opts, "batchPages", &batch_pages);
  prop_int32(env, opts, "poolBatches", &pool);
  prop_uint64(env, opts, "rateBytesPerSec", &rate);
  if (batch_pages < 512) batch_pages = 512; /* a 2 MiB huge page must fit */
  if (pool < 2) pool = 2;

  engine_t *e = calloc(1, sizeof *e);
  if (e == NULL) return throw_errno(env, ENOMEM, "calloc", "start the engine");
  e->done_msg = malloc(sizeof *e->done_msg);
  if (e->done_msg == NULL) {
    free(e);
    return throw_errno(env, ENOMEM, "malloc", "start the engine");
  }
  const char *fault = getenv("WPSNAP_FAULT");
  e->fault_alloc = fault != NULL && strcmp(fault, FAULT_POINT_ENGINE_ALLOC) == 0;
  e->pid = pid;
  e->uffd = uffd;
  e->pidfd = pidfd;
  e->pagemap_fd = e->mem_fd = e->wake_fd = -1;
  e->gone_reason = -1;
  e->batch_pages = (uint32_t)batch_pages;
  e->pool_size = (uint32_t)pool;
  e->rate = (double)rate;
  pthread_mutex_init(&e->pool_lock, NULL);

  napi_value regions;
  uint32_t nregions = 0;
  if (napi_get_named_property(env, opts, "regions", &regions) != napi_ok || napi_get_array_length(env, regions, &nregions) != napi_ok) {
    engine_free(e);
    return throw_type(env, "engineStart: regions must be an array");
  }
  e->state_blocks = calloc(nregions ? nregions : 1, sizeof(uint8_t *));
  if (e->state_blocks == NULL) {
    engine_free(e);
    return throw_errno(env, ENOMEM, "calloc", "engine region table");
  }
  for (uint32_t i = 0; i < nregions; i++) {
    napi_value r;
    napi_get_element(env, regions, i, &r);
    uint64_t start, end, file_off = 0;
    int32_t page_size = 4096, kind = KIND_ANON, fd = -1;
    bool hugetlb = false;
    if (!prop_uint64(env, r, "start", &start) || !prop_uint64(env, r, "end", &end) || end <= start || (start & (PG - 1)) ||
        (end & (PG - 1))) {
      engine_free(e);
      return throw_type(env, "engineStart: each region needs page-aligned start < end");
    }
    prop_int32(env, r, "pageSize", &page_size);
    prop_int32(env, r, "kind", &kind);
    prop_int32(env, r, "fd", &fd);
    prop_uint64(env, r, "fileOffset", &file_off);
    /* A shared file's pages are proven against its times at T: required. */
    uint64_t ctime_ns = 0, mtime_ns = 0;
    struct stat fst = {0};
    if (kind == KIND_FILE && (!prop_uint64(env, r, "ctimeNs", &ctime_ns) || !prop_uint64(env, r, "mtimeNs", &mtime_ns) ||
                              fd < 0 || fstat(fd, &fst) != 0)) {
      engine_free(e);
      return throw_type(env, "engineStart: a shared-file region needs its fd, ctimeNs and mtimeNs at T");
    }
    napi_value hv;
    if (napi_get_named_property(env, r, "hugetlb", &hv) == napi_ok) arg_bool(env, hv, &hugetlb);
    if (page_size < 4096 || (page_size & (page_size - 1)) || page_size > (2 << 20)) {
      engine_free(e);
      return throw_type(env, "engineStart: pageSize must be 4096..2097152, a power of two");
    }
    uint64_t npages = (end - start) / PG;
    uint8_t *state = calloc(npages, 1);
    if (state == NULL) {
      engine_free(e);
      return throw_errno(env, ENOMEM, "calloc", "page states of a %llu-page region", (unsigned long long)npages);
    }
    e->state_blocks[e->nblocks++] = state;
    /* zeroRanges: pages known to be never touched at T that were left
     * unprotected (sparse reservations): zero, and never to be read. */
    napi_value zv;
    napi_valuetype ztype = napi_undefined;
    if (napi_get_named_property(env, r, "zeroRanges", &zv) == napi_ok) napi_typeof(env, zv, &ztype);
    if (ztype != napi_undefined) {
      const uint64_t *z;
      size_t zpairs;
      if (!arg_u64_groups(env, zv, 2, &z, &zpairs)) {
        engine_free(e);
        return throw_type(env, "engineStart: zeroRanges must be a BigUint64Array of start, end pairs");
      }
      for (size_t k = 0; k < 2 * zpairs; k += 2) {
        uint64_t zs = z[k] < start ? start : z[k], ze = z[k + 1] > end ? end : z[k + 1];
        if (zs >= ze || (zs & (PG - 1)) || (ze & (PG - 1))) continue;
        memset(state + (zs - start) / PG, PAGE_SAVED, (ze - zs) / PG);
        atomic_fetch_add(&e->pages_zero, (ze - zs) / PG);
      }
    }
    /* savedRanges: pages JS already accounted for during the pause (copied
     * then, or listed lost): a kernel-side writer (a long-term pin) changes
     * them without a fault, so a later copy would not be their content at T. */
    napi_value sv;
    napi_valuetype stype = napi_undefined;
    if (napi_get_named_property(env, r, "savedRanges", &sv) == napi_ok) napi_typeof(env, sv, &stype);
    if (stype != napi_undefined) {
      const uint64_t *sr;
      size_t spairs;
      if (!arg_u64_groups(env, sv, 2, &sr, &spairs)) {
        engine_free(e);
        return throw_type(env, "engineStart: savedRanges must be a BigUint64Array of start, end pairs");
      }
      for (size_t k = 0; k < 2 * spairs; k += 2) {
        uint64_t ss = sr[k] < start ? start : sr[k], se = sr[k + 1] > end ? end : sr[k + 1];
        if (ss >= se || (ss & (PG - 1)) || (se & (PG - 1))) continue;
        memset(state + (ss - start) / PG, PAGE_SAVED, (se - ss) / PG);
      }
    }
    segment_t *s = seg_append(e);
    *s = (segment_t){.t_start = start, .cur_start = start, .len = end - start, .page_size = (uint32_t)page_size, .kind = kind,
                     .fd = fd, .file_off = file_off, .file_dev = (uint64_t)fst.st_dev, .file_ino = (uint64_t)fst.st_ino,
                     .ctime_ns_at_t = ctime_ns, .mtime_ns_at_t = mtime_ns, .hugetlb = hugetlb, .state = state};
    e->total_pages += npages;
  }
  e->latency_ns = malloc(sizeof(uint32_t) * MAX_LATENCY_SAMPLES);
  if (e->latency_ns == NULL) {
    engine_free(e);
    return throw_errno(env, ENOMEM, "malloc", "fault latency samples");
  }
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
  e->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
  if (e->pagemap_fd < 0) {
    int err = errno;
    engine_free(e);
    return throw_errno(env, err, "open", "open(%s)", path);
  }
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  e->mem_fd = open(path, O_RDONLY | O_CLOEXEC);
  e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  e->zero_pfn = find_zero_pfn();
  for (int32_t i = 0; i < pool; i++) {
    slot_t *slot = slot_new(e, false);
    if (slot == NULL) {
      engine_free(e);
      return throw_errno(env, ENOMEM, "mmap", "allocate the engine's batch pool");
    }
    slot->free = true;
  }

  napi_value name;
  napi_create_string_utf8(env, "wpsnap-engine", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[1], NULL, name, 0, 1, NULL, NULL, e, call_js, &e->tsfn) != napi_ok) {
    engine_free(e);
    return throw_type(env, "engineStart: onMessage must be a function");
  }
  e->started_us = mono_us();
  if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
    int err = errno;
    napi_release_threadsafe_function(e->tsfn, napi_tsfn_abort);
    engine_free(e);
    return throw_errno(env, err, "pthread_create", "start the engine thread");
  }
  e->thread_started = true;
  napi_value handle;
  NAPI_CALL(env, make_handle(env, e, engine_finalize, HANDLE_ENGINE, &handle));
  return handle;
}

/* engineRelease(handle, slot): the batch is stored; its memory may be reused. */
static napi_value js_engine_release(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc >= 2 ? get_engine(env, argv[0]) : NULL;
  int32_t id;
  if (e == NULL || !arg_int32(env, argv[1], &id)) return throw_type(env, "engineRelease(handle, slot)");
  pthread_mutex_lock(&e->pool_lock);
  if (id >= 0 && (size_t)id < e->nslots && e->slots[id] != NULL) {
    slot_t *s = e->slots[id];
    if (s->overflow && e->spare_overflow >= MAX_SPARE_OVERFLOW) {
      munmap(s->data, (size_t)s->cap * PG);
      free(s->addrs);
      free(s);
      e->slots[id] = NULL;
    } else {
      if (s->overflow) e->spare_overflow++;
      s->count = 0;
      s->free = true;
    }
  }
  pthread_mutex_unlock(&e->pool_lock);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one);
  (void)ignored;
  return NULL;
}

/* engineStop(handle): stop early; unsaved pages are reported lost ("interrupted"). */
static napi_value js_engine_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineStop(handle)");
  atomic_store(&e->stop, true);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one);
  (void)ignored;
  return NULL;
}

/* engineStats(handle) -> live counters (safe while running). */
static napi_value js_engine_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineStats(handle)");
  return stats_object(env, e, false);
}

/* engineJoin(handle): wait for the thread after its "done" message. */
static napi_value js_engine_join(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineJoin(handle)");
  if (e->thread_started) {
    pthread_join(e->thread, NULL);
    e->thread_started = false;
  }
  return NULL;
}

void register_engine_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"engineStart", NULL, js_engine_start, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineRelease", NULL, js_engine_release, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineStop", NULL, js_engine_stop, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineStats", NULL, js_engine_stats, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineJoin", NULL, js_engine_join, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
