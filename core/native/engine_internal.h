/* What the engine's files share: the engine's state and its internal functions.
 * The engine is one native thread per snapshotted process (engine_sweep.c runs
 * its loop); see engine.c for the whole picture. Not part of the addon's API. */
#ifndef WPSNAP_ENGINE_INTERNAL_H
#define WPSNAP_ENGINE_INTERNAL_H

#include "addon.h"
#include "constants.h"
#include "fault_loop.h"
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

  pthread_t thread;
  bool thread_started;
  napi_threadsafe_function tsfn;
  engine_msg_t *done_msg; /* the final message, allocated at start */
  _Atomic uint32_t batches_posted;
  bool fault_alloc;       /* WPSNAP_FAULT=engine-alloc: fail the third batch's allocation */
  bool fault_vanish;      /* WPSNAP_FAULT=engine-vanish: the sweep's first chunk shows a page gone */
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
uint64_t mono_ns(void);
void set_fatal(engine_t *e, int err, const char *what);
void add_lost(engine_t *e, uint64_t t_addr, uint64_t pages, int reason);
void lose_unsaved(engine_t *e, segment_t *s, int reason);
slot_t *slot_new(engine_t *e, bool overflow);
slot_t *slot_find_free(engine_t *e, bool overflow);
slot_t *slot_take(engine_t *e, bool allow_overflow);
void post_slot(engine_t *e, slot_t *s);
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
void *engine_main(void *arg);

#endif
