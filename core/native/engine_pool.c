/* The bounded pool of page batches and the fault/sweep batches being filled. */
#include "engine_internal.h"

/* ---------- pool ---------- */

/* A new batch, or NULL with the engine failed (ENOMEM): the fault thread never
 * dereferences a failed allocation, it ends the snapshot and JS releases the
 * target. A pool batch is carved from the pool's mapping (pool_alloc); an
 * overflow batch is a mapping of its own, unmapped when no longer needed. */
slot_t *slot_new(engine_t *e, bool overflow) {
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
  size_t bytes = (size_t)s->cap * PG;
  size_t pooled = overflow ? SIZE_MAX : e->nslots;
  if (!overflow && e->pool_mem != NULL && (pooled + 1) * bytes <= e->pool_mem_len) {
    s->data = e->pool_mem + pooled * bytes;
    s->pooled = true;
  } else {
    /* SAFETY: private anonymous memory of our own; checked against MAP_FAILED. */
    s->data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  if (s->addrs == NULL || s->data == MAP_FAILED) {
    if (s->data != MAP_FAILED && !s->pooled) munmap(s->data, bytes);
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

/* The pool: `count` batches in one mapping advised for transparent huge
 * pages. A batch of 512 pages is one 2 MiB huge page: touching a fresh 4 KiB
 * page costs ~10 µs on a VM (2.8 s per GiB measured here), a huge page ~0.4
 * ms (0.2 s per GiB), and a large pool is touched once. Pool batches are the
 * first `count` slots. */
int pool_alloc(engine_t *e, uint32_t count, uint32_t warm) {
  size_t bytes = (size_t)e->batch_pages * PG * count;
  size_t align = THP_BYTES;
  /* SAFETY: private anonymous memory of our own; checked against MAP_FAILED. */
  uint8_t *raw = mmap(NULL, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return errno;
  uint8_t *aligned = (uint8_t *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
  if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
  size_t tail = (size_t)(raw + bytes + align - (aligned + bytes));
  if (tail > 0) munmap(aligned + bytes, tail);
  (void)madvise(aligned, bytes, MADV_HUGEPAGE); /* an optimisation: without it the pool works, slower */
  /* Touch the first `warm` batches now, before the pause: after the pause the
   * target waits on the sweep, and the sweep would wait on fresh memory. */
  if (warm > 0) (void)madvise(aligned, (size_t)e->batch_pages * PG * warm, MADV_POPULATE_WRITE);
  e->pool_mem = aligned;
  e->pool_mem_len = bytes;
  for (uint32_t i = 0; i < count; i++) {
    slot_t *slot = slot_new(e, false);
    if (slot == NULL) return ENOMEM;
    slot->free = true;
    e->free_pool++;
  }
  return 0;
}

/* A free pool batch (overflow = false) or spare overflow batch; pool_lock held. */
slot_t *slot_find_free(engine_t *e, bool overflow) {
  for (size_t i = 0; i < e->nslots; i++) {
    slot_t *s = e->slots[i];
    if (s != NULL && s->free && s->overflow == overflow) return s;
  }
  return NULL;
}

/* A free batch: pool batches first; for a fault, then a spare overflow batch,
 * then a new one. The sweep only ever gets pool batches. */
slot_t *slot_take(engine_t *e, bool allow_overflow) {
  /* WPSNAP_FAULT=engine-alloc: once two batches are posted, getting a batch
   * fails as an allocation does under memory pressure (slot_new NULL): for a
   * write fault (a target thread waits on it) or for the sweep, whichever
   * asks first (a target whose shared memory is no longer copied whole at
   * the start may fill no second fault batch). */
  if (e->fault_alloc && atomic_load(&e->batches_posted) >= 2) {
    set_fatal(e, ENOMEM, "allocate a page batch (WPSNAP_FAULT=engine-alloc)");
    return NULL;
  }
  pthread_mutex_lock(&e->pool_lock);
  slot_t *found = slot_find_free(e, false);
  if (found == NULL && allow_overflow) found = slot_find_free(e, true);
  if (found != NULL && found->overflow) e->spare_overflow--;
  if (found != NULL && !found->overflow) e->free_pool--;
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

/* A batch is full (or the last one): it goes to staging (engine_stage.c),
 * which hands it to the store when the store has room. */
void post_slot(engine_t *e, slot_t *s) {
  staged_t *st = calloc(1, sizeof *st);
  if (st == NULL) {
    set_fatal(e, ENOMEM, "stage a page batch");
    return;
  }
  st->slot = s;
  st->count = s->count;
  atomic_fetch_add(&e->batches_posted, 1);
  pthread_mutex_lock(&e->pool_lock);
  st->prev = e->sq_tail;
  if (e->sq_tail) e->sq_tail->next = st;
  else e->sq_head = st;
  e->sq_tail = st;
  e->sq_len++;
  e->staged_mem += (uint64_t)s->count * PG;
  if (e->staged_mem + e->spill_live > e->staging_peak) e->staging_peak = e->staged_mem + e->spill_live;
  pthread_cond_signal(&e->stage_cond);
  pthread_mutex_unlock(&e->pool_lock);
}

/* A batch's memory may be reused: back to the pool, or an overflow batch kept
 * spare or unmapped; pool_lock held. */
void slot_release_locked(engine_t *e, slot_t *s) {
  if (s->overflow && e->spare_overflow >= MAX_SPARE_OVERFLOW) {
    munmap(s->data, (size_t)s->cap * PG);
    free(s->addrs);
    e->slots[s->id] = NULL;
    free(s);
    return;
  }
  if (s->overflow) e->spare_overflow++;
  else e->free_pool++;
  s->count = 0;
  s->free = true;
}

/* A message to JS that is not a batch (the window closed, the end). */
void post_message(engine_t *e, msg_type_t type) {
  engine_msg_t *m = type == MSG_DONE ? e->done_msg : malloc(sizeof *m);
  if (m == NULL) return; /* the window message is informative only */
  if (type == MSG_DONE) e->done_msg = NULL;
  m->type = type;
  m->slot = NULL;
  napi_call_threadsafe_function(e->tsfn, m, napi_tsfn_blocking);
}

void flush_batch(engine_t *e, slot_t **batch) {
  if (*batch != NULL && (*batch)->count > 0) {
    post_slot(e, *batch);
    *batch = NULL;
  }
}

/* Post both partly filled batches (before waiting, and at the end). */
void flush_current(engine_t *e) {
  flush_batch(e, &e->cur_sweep);
  flush_batch(e, &e->cur_fault);
}

/* Room for n pages at the tail of the fault or the sweep batch. Faults and the
 * sweep fill separate batches: the sweep only ever gets pool batches (it waits
 * when the pool is exhausted), faults get an overflow batch rather than wait.
 * Returns NULL only for the sweep. */
uint8_t *reserve(engine_t *e, uint32_t n, bool from_fault) {
  slot_t **batch = from_fault ? &e->cur_fault : &e->cur_sweep;
  if (*batch != NULL && (*batch)->count + n > (*batch)->cap) flush_batch(e, batch);
  if (*batch == NULL) {
    *batch = slot_take(e, from_fault);
    if (*batch == NULL) return NULL;
  }
  return (*batch)->data + (size_t)(*batch)->count * PG;
}

/* Can the sweep reserve at least one page now? */
bool sweep_has_room(engine_t *e) {
  if (e->cur_sweep != NULL) return e->cur_sweep->count < e->cur_sweep->cap;
  pthread_mutex_lock(&e->pool_lock);
  bool any = slot_find_free(e, false) != NULL;
  pthread_mutex_unlock(&e->pool_lock);
  return any;
}

/* Pages reserved and filled: record their addresses at T. */
void commit(engine_t *e, uint64_t t_addr, uint32_t n, bool from_fault) {
  slot_t **batch = from_fault ? &e->cur_fault : &e->cur_sweep;
  for (uint32_t i = 0; i < n; i++) (*batch)->addrs[(*batch)->count + i] = t_addr + i * PG;
  (*batch)->count += n;
  atomic_fetch_add(&e->bytes_copied, (uint64_t)n * PG);
  if ((*batch)->count == (*batch)->cap) flush_batch(e, batch);
}
