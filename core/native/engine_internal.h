/* What the engine's files share: the engine's state and its internal functions.
 * The engine is one native thread per snapshotted process (engine_sweep.c runs
 * its loop); see engine.c for the whole picture. Not part of the addon's API. */
#ifndef WPSNAP_ENGINE_INTERNAL_H
#define WPSNAP_ENGINE_INTERNAL_H

#include "addon.h"
#include "constants.h"
#include "dirty_log.h"
#include "fault_loop.h"
#include "kernel_compat.h"
#include "napi_util.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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
/* The sweep's nice (WPSNAP_SWEEP_NICE=engine keeps ENGINE_NICE for it too). */
#define SWEEP_NICE 0

enum { PAGE_UNSAVED = 0, PAGE_SAVED = 1, PAGE_LOST = 2 };

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
  bool no_fd_writers; /* KIND_FILE: no process held a writable fd on it at T: only mappings write it, and they fault */
  bool group_shared;  /* KIND_FILE: state points into the group's object (engine_group.c), shared with other members' engines */
  bool holes_pending; /* KIND_FILE, no_fd_writers: its holes at T are still to be marked (engine_main, before any message is read) */
  uint8_t *state;     /* one byte per 4 KiB page of this piece */
} segment_t;

typedef struct slot {
  uint32_t id;
  uint32_t count;
  uint32_t cap;
  bool overflow;
  bool free;
  bool pooled;    /* carved from the staging pool's mapping (never unmapped on its own) */
  uint64_t *addrs;
  uint8_t *data;
} slot_t;

/* A full batch waiting for the store (engine_stage.c): in a batch of memory,
 * or written to the spill file (slot NULL, its addresses kept here). */
typedef struct staged {
  slot_t *slot;
  uint32_t count;
  bool spilling;      /* being written to the spill file, outside the lock */
  uint64_t spill_off; /* spilled: where its pages are in the spill file */
  uint64_t *addrs;    /* spilled: the pages' addresses at T */
  struct staged *prev, *next;
} staged_t;

typedef struct {
  uint64_t address;
  uint64_t pages;
  int reason;
} lost_t;

typedef enum { MSG_BATCH_READY, MSG_STAGING_FULL, MSG_WINDOW_CLOSED, MSG_DONE } msg_type_t;

/* What the engine thread is told to do next (engine.c). */
typedef enum { CMD_NONE, CMD_TRACK, CMD_RUN, CMD_QUIT } engine_cmd_t;

typedef struct {
  msg_type_t type;
  slot_t *slot;
} engine_msg_t;

/* How a page was known to be zero at T without reading it. */
enum {
  ZERO_MARKER,           /* a uffd-wp PTE marker: never populated since T */
  ZERO_SHARED_ZERO_PAGE, /* mapped the shared zero page (read, never written) */
  ZERO_HUGE_ZERO_PAGE,   /* a PMD mapping the huge zero page */
  ZERO_FILE_HOLE,        /* a hole of a shared file (SEEK_DATA) */
  ZERO_SPARSE,           /* outside the populated runs of a sparse mapping, found at the pause */
  ZERO_REASON_COUNT
};
extern const char *const zero_reason_names[ZERO_REASON_COUNT];
/* pages_with_data(): an unsaved page gone without an event (listed lost, not zero). */
#define WHY_VANISHED 0xff
/* pages_with_data(): a hole now in a shared file whose holes at T are known (no_fd_writers): punched
 * after T (MADV_REMOVE through some mapping), so listed lost (discarded-before-saved), not zero. */
#define WHY_PUNCHED 0xfe

typedef struct engine_group engine_group_t;

typedef struct {
  pid_t pid;
  engine_group_t *group; /* a member of a process group's snapshot: its shared objects' states and lock (engine_group.c) */
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
  uint32_t free_pool;      /* pool batches free now */
  uint8_t *pool_mem;       /* the pool's batches, one mapping advised for huge pages */
  size_t pool_mem_len;
  slot_t *cur_sweep; /* batch the sweep fills (pool only) */
  slot_t *cur_fault; /* batch faults and events fill (pool, else overflow) */

  /* rate limit (bytes/s, 0 = unlimited) */
  double rate;
  double tokens;
  double tokens_at;

  /* the userfaultfd's messages: events applied as read, faults queued (fault_loop.c) */
  fault_loop_t loop;

  lost_t *lost;
  size_t nlost, lost_cap;

  uint32_t *latency_ns;
  size_t nlatency;

  _Atomic bool stop;
  _Atomic uint64_t faults, pages_fault, pages_sweep, pages_zero, pages_lost, bytes_copied, events, eagain, overflow_batches;
  _Atomic uint64_t zero_by[ZERO_REASON_COUNT]; /* pages_zero by how each was known zero */
  uint64_t total_pages;

  int fatal_err;
  char fatal_what[160];
  int gone_reason; /* LOST_TARGET_EXITED/EXEC once the target's mm is gone, else -1 */
  bool finished;
  double started_us;
  double window_end_us; /* when the sweep ended: every page saved or lost, none protected any more */

  /* staging (engine_stage.c): full batches wait here until the store takes
   * them, at most js_max at a time; beyond the pool they go to the spill file.
   * Guarded by pool_lock. */
  pthread_t stage_thread;
  bool stage_started;
  pthread_cond_t stage_cond;
  staged_t *sq_head, *sq_tail;
  uint32_t sq_len;
  uint32_t js_out, js_max;  /* batches the store holds now, and at most */
  bool window_closed;       /* the sweep ended: the pool needs no room for it any more */
  bool starved_posted;      /* the sweep waited for the store once (MSG_STAGING_FULL sent); engine thread only */
  bool posting_done;        /* the engine posts no more batches */
  bool stage_done;          /* every staged batch went to the store (or was dropped) */
  int spill_fd;             /* -1: no spill file */
  uint64_t spill_max;       /* live spilled bytes at most */
  uint64_t spill_end, spill_live, spill_peak, spilled_batches;
  uint64_t staged_mem;      /* bytes of full batches in memory the store has not taken */
  uint64_t staging_peak;    /* peak of staged_mem + spill_live */
  char stage_fallback[200]; /* why spilling stopped (the directory filled up), or "" */

  /* the engine thread: created with the engine, told what to do by a command */
  engine_cmd_t cmd;         /* guarded by pool_lock */
  pthread_cond_t cmd_cond;
  bool prepared;            /* engineRun gave it its regions */
  bool ran;                 /* engineGo started it */
  /* pre-protection (engine_track.c) */
  track_state_t track;      /* the log and the ranges (dirty_log.h) */
  _Atomic bool track_stop;
  bool tracking, track_stopped; /* guarded by pool_lock */
  /* keep (engineRun): the target stays tracked after the window, for a keeper
   * to take the context over (engine_keep.c). The sweep protects the pages it
   * saved again instead of unprotecting them, every write fault after T is
   * logged in `track`, and after the window the thread serves the context
   * until engineTrackTake(stop). */
  bool keep;
  /* A tracked generation: pages read from the parent were never saved by the
   * engine and stay protected to the end of the window (engine.c). */
  bool parent_pages;
  _Atomic bool keep_stop, keep_exited;
  bool keep_stopped; /* guarded by pool_lock */

  pthread_t thread;
  bool thread_started;
  bool closed;            /* engineClose ended it without a run */
  napi_threadsafe_function tsfn;
  engine_msg_t *done_msg; /* the final message, allocated at start */
  _Atomic uint32_t batches_posted;
  bool fault_alloc;       /* WPSNAP_FAULT=engine-alloc: fail the third batch's allocation */
  bool fault_vanish;      /* WPSNAP_FAULT=engine-vanish: the sweep's first chunk shows a page gone */
  bool fault_mid_spill;   /* WPSNAP_FAULT=mid-spill: die once a batch is spilled */
  bool sweep_nice;        /* the sweep runs at SWEEP_NICE, faults at ENGINE_NICE */
  int cur_nice;
} engine_t;

/* Enumerations of the sweep and the THP path (engine_sweep.c, engine_thp.c). */
#define THP_BYTES (2ull << 20)
#define THP_PAGES 512u
enum { THP_NONE = 0, THP_DATA = 1, THP_ZERO = 2 };

enum { SWEEP_PROGRESS, SWEEP_DONE, SWEEP_WAIT_POOL, SWEEP_WAIT_RATE };

/* What the result of a step of a copy -> unprotect -> commit sequence means.
 * Every such sequence (a write fault, a huge block, a sweep chunk, a discarded
 * page) asks copy_outcome() and unprotect_outcome(), so an errno means one
 * thing everywhere; the caller only decides what to do about it. */
typedef enum {
  STEP_OK,           /* go on to the next step */
  STEP_RETRY,        /* address-space events were applied: look the address up again and copy again */
  STEP_UNREADABLE,   /* the kernel will not give this memory and no event explains it: its pages are lost (read-failed) */
  STEP_UNREGISTERED, /* the range is not registered any more and no event explains it: the mapping was replaced (unmapped) */
  STEP_STOP,         /* the target exited or called exec, or the engine failed: store nothing of this copy */
} step_t;

/* Internal functions, by file. */
double mono_us(void);
void engine_thread_priority(void);
void engine_nice(engine_t *e, int nice);
uint64_t mono_ns(void);
void set_fatal(engine_t *e, int err, const char *what);
void add_lost(engine_t *e, uint64_t t_addr, uint64_t pages, int reason);
void lose_unsaved(engine_t *e, segment_t *s, int reason);
slot_t *slot_new(engine_t *e, bool overflow);
int pool_alloc(engine_t *e, uint32_t count, uint32_t warm);
slot_t *slot_find_free(engine_t *e, bool overflow);
slot_t *slot_take(engine_t *e, bool allow_overflow);
void post_slot(engine_t *e, slot_t *s);
void slot_release_locked(engine_t *e, slot_t *s);
int stage_start(engine_t *e);
void stage_window_closed(engine_t *e);
void stage_finish(engine_t *e);
bool stage_is_done(engine_t *e);
bool stage_can_spill(engine_t *e);
void stage_join(engine_t *e);
void stage_poke(engine_t *e);
void post_message(engine_t *e, msg_type_t type);
void flush_batch(engine_t *e, slot_t **batch);
void flush_current(engine_t *e);
uint8_t *reserve(engine_t *e, uint32_t n, bool from_fault);
bool sweep_has_room(engine_t *e);
void commit(engine_t *e, uint64_t t_addr, uint32_t n, bool from_fault);
segment_t *seg_by_cur(engine_t *e, uint64_t addr);
segment_t *seg_append(engine_t *e);
void seg_split(engine_t *e, size_t i, uint64_t off);
uint64_t ts_ns(struct timespec t);
bool file_unchanged_since_t(segment_t *s);
/* The file's times are still T's: nothing wrote or punched it since (through an fd or a mapping). */
bool file_times_at_t(segment_t *s);
void lose_file(engine_t *e, const segment_t *changed);
void count_zero(engine_t *e, int why, uint64_t n);
bool mm_gone(engine_t *e);
void target_gone(engine_t *e);
int seg_copy(engine_t *e, segment_t *s, uint64_t off, uint64_t len, uint8_t *dst);
void save_file_whole(engine_t *e, segment_t *first);
bool is_zero_page_entry(engine_t *e, uint64_t pm);
bool is_marker_entry(uint64_t pm);
bool entry_has_data(engine_t *e, uint64_t pm);
int read_more(engine_t *e, bool wait);
int unprotect_checked(engine_t *e, uint64_t cur_start, uint64_t len);
/* The sweep's end of a saved range: unprotect it, or with keep protect it again (the same check). */
int settle_checked(engine_t *e, uint64_t cur_start, uint64_t len);
step_t copy_outcome(engine_t *e, int err, bool may_apply_events);
step_t unprotect_outcome(engine_t *e, int err, const char *what);
void wait_quiet(engine_t *e, uint64_t start, uint64_t len);
bool find_huge(engine_t *e, uint64_t addr, uint64_t end, struct wpsnap_page_region *r);
int thp_block(engine_t *e, segment_t *s, uint64_t off, uint64_t *block);
uint32_t thp_need(segment_t *s, uint64_t block, int thp, uint8_t need[THP_PAGES]);
int thp_copy(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], uint8_t *dst);
void thp_commit(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], slot_t **batch);
int save_thp(engine_t *e, segment_t *s, uint64_t block, int thp, bool from_fault);
void find_thp_segments(engine_t *e);
void handle_fault(engine_t *e, uint64_t addr, uint64_t read_ns);
void handle_remove(engine_t *e, uint64_t start, uint64_t end);
void handle_unmap(engine_t *e, uint64_t start, uint64_t end);
void handle_remap(engine_t *e, uint64_t from, uint64_t to, uint64_t len);
void handle_message(engine_t *e, const struct uffd_msg *m, uint64_t read_ns);
void engine_loop_init(engine_t *e);
void rate_refill(engine_t *e);
uint32_t pages_with_data(engine_t *e, segment_t *s, uint64_t off, uint32_t npg, uint8_t *need, uint8_t *why);
int sweep_thp(engine_t *e, segment_t *s, uint64_t block, int thp, int *wait_ms);
int sweep_step(engine_t *e, int *wait_ms);
void engine_main(engine_t *e);
/* A tracked generation's pages identical to its parent's: `unwritten`
 * ([start, end) pairs, sorted, disjoint: covered since the parent's instant
 * and never written, as known before the pause), less `written` ([start,
 * len] pairs, few: the writes of the pause's final log). Marked saved: the
 * engine neither reads nor stores them; they read through the parent. Done
 * here, in C, because it runs in the pause. */
typedef struct {
  const uint64_t *unwritten;
  size_t nunwritten;
  const uint64_t *written;
  size_t nwritten;
} parent_pages_t;

/* Parse engineRun's regions into segments (engine_regions.c); NULL, or the exception thrown. */
napi_value parse_regions(napi_env env, engine_t *e, napi_value regions, const parent_pages_t *pp);
/* engine_group.c: a process group's shared objects. */
void group_ref(engine_group_t *g);
void group_unref(engine_group_t *g);
void group_enter(engine_t *e); /* the group's lock, around anything that reads or changes page states; no-op outside a group */
void group_leave(engine_t *e);
/* The states of pages [first_page, +npages) of a group's file, NULL if it is not one; *holes_marked: another
 * engine marked the whole file's holes at T already (the caller does, for the whole file, if not). */
uint8_t *group_states(engine_group_t *g, uint64_t dev, uint64_t ino, uint64_t first_page, uint64_t npages);
/* The whole file's states and page count, for the one engine that marks its holes at T (NULL: another did). */
uint8_t *group_claim_holes(engine_group_t *g, uint64_t dev, uint64_t ino, uint64_t *pages);
/* Mark the holes of [file_off, file_off + npages pages) of a file saved; how many were unsaved (engine_regions.c). */
uint64_t mark_holes(int fd, uint64_t file_off, uint8_t *state, uint64_t npages);
engine_group_t *group_of(napi_env env, napi_value v);
/* A shared file whose holes at T are known (no_fd_writers): is any page of [off, off+len) of s a hole now? */
bool file_has_hole(segment_t *s, uint64_t off, uint64_t len);
/* Every unsaved page of a shared-file segment, copied (pread) and proven now, in batch-sized runs (engine_segments.c). */
void save_file_now(engine_t *e, segment_t *s);
void keep_prepare(engine_t *e);
void keep_main(engine_t *e);
void *engine_thread(void *arg);
void track_main(engine_t *e);

#endif
