/* Staging: full batches between the engine and the store.
 *
 * The engine copies pages at memory speed; the store hashes, compresses and
 * commits them far slower, at idle priority. So that the target's pages stay
 * protected only as long as copying takes, full batches wait here: in the
 * pool's memory, and when the pool runs low (the sweep needs free batches to
 * go on), in a spill file. A stager thread of its own does the waiting, the
 * writing and the reading back, so that the engine thread, which serves the
 * target's write faults, never blocks on a disk.
 *
 * The store holds at most js_max batches at a time; the stager hands it the
 * oldest staged batch in memory whenever it releases one, and spilled batches
 * once none is left in memory. The newest batch in memory is the one spilled:
 * it is the last the store would take. Spilled bytes are
 * punched out of the file once read back, so the file holds what is waiting,
 * at most spill_max bytes. A spill that fails (the directory is full) turns
 * spilling off and the snapshot goes on with the pool alone: the sweep then
 * waits for the store, as if no spill file had been given, and the stats say
 * why (stagingFallback).
 *
 * The spill file comes from JS already unlinked (O_TMPFILE, 0600): nothing of
 * it outlives the process, whatever happens to it. */
#include "engine_internal.h"

#include <signal.h>

/* Spill when fewer pool batches than this are free during the window: the
 * sweep needs a few to go on with while a batch is written. */
static uint32_t spill_low_water(const engine_t *e) {
  uint32_t n = e->pool_size / 8;
  return n < 2 ? 2 : n > 8 ? 8 : n;
}

static void unlink_staged(engine_t *e, staged_t *st) {
  if (st->prev) st->prev->next = st->next;
  else e->sq_head = st->next;
  if (st->next) st->next->prev = st->prev;
  else e->sq_tail = st->prev;
  e->sq_len--;
}

static void note_peak(engine_t *e) {
  if (e->staged_mem + e->spill_live > e->staging_peak) e->staging_peak = e->staged_mem + e->spill_live;
}

static int write_all(int fd, const void *buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, (const uint8_t *)buf + done, len - done, (off_t)(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return ENOSPC;
    done += (size_t)n;
  }
  return 0;
}

/* Hand a batch in memory to the store; pool_lock held (released around the call). */
static void deliver(engine_t *e, staged_t *st) {
  unlink_staged(e, st);
  e->staged_mem -= (uint64_t)st->count * PG;
  e->js_out++;
  slot_t *slot = st->slot;
  free(st);
  engine_msg_t *m = malloc(sizeof *m);
  if (m == NULL) {
    set_fatal(e, ENOMEM, "post a page batch");
    return;
  }
  m->type = MSG_BATCH_READY;
  m->slot = slot;
  pthread_mutex_unlock(&e->pool_lock);
  napi_call_threadsafe_function(e->tsfn, m, napi_tsfn_blocking);
  pthread_mutex_lock(&e->pool_lock);
}

/* A free pool batch for a read-back: during the window only beyond what the
 * sweep needs. pool_lock held. */
static slot_t *readback_slot(engine_t *e) {
  if (!e->window_closed && e->free_pool <= spill_low_water(e)) return NULL;
  slot_t *s = slot_find_free(e, false);
  if (s != NULL) {
    s->free = false;
    e->free_pool--;
  }
  return s;
}

/* Read a spilled batch back into a pool batch and hand it over; pool_lock held. */
static bool read_back(engine_t *e, staged_t *st) {
  slot_t *s = readback_slot(e);
  if (s == NULL) return false;
  st->spilling = true; /* busy: no one else touches it */
  pthread_mutex_unlock(&e->pool_lock);
  size_t bytes = (size_t)st->count * PG;
  int err = pread_all(e->spill_fd, s->data, bytes, st->spill_off);
  if (err == 0) {
    memcpy(s->addrs, st->addrs, sizeof(uint64_t) * st->count);
    s->count = st->count;
    /* Give the disk space back now: the file holds only what still waits. */
    (void)fallocate(e->spill_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)st->spill_off, (off_t)bytes);
  }
  pthread_mutex_lock(&e->pool_lock);
  st->spilling = false;
  if (err != 0) {
    slot_release_locked(e, s);
    set_fatal(e, err, "read a staged batch back from the spill file");
    return false;
  }
  free(st->addrs);
  st->addrs = NULL;
  st->slot = s;
  e->spill_live -= bytes;
  e->staged_mem += bytes;
  deliver(e, st);
  return true;
}

/* Write the newest batch in memory to the spill file and free its memory;
 * pool_lock held. Returns whether it did. */
static bool spill_one(engine_t *e) {
  staged_t *st = e->sq_tail;
  while (st != NULL && (st->slot == NULL || st->spilling)) st = st->prev;
  if (st == NULL) return false;
  size_t bytes = (size_t)st->count * PG;
  if (e->spill_live + bytes > e->spill_max) return false;
  uint64_t *addrs = malloc(sizeof(uint64_t) * st->count);
  if (addrs == NULL) return false;
  uint64_t off = e->spill_end;
  e->spill_end += bytes;
  st->spilling = true;
  slot_t *s = st->slot;
  pthread_mutex_unlock(&e->pool_lock);
  memcpy(addrs, s->addrs, sizeof(uint64_t) * st->count);
  int err = write_all(e->spill_fd, s->data, bytes, off);
  if (err == 0 && e->fault_mid_spill) {
    /* WPSNAP_FAULT=mid-spill: die with a batch spilled, as kill -9 would. */
    kill(getpid(), SIGKILL);
  }
  pthread_mutex_lock(&e->pool_lock);
  st->spilling = false;
  if (err != 0) {
    free(addrs);
    e->spill_end = off; /* nothing after it was written: its space is reused */
    snprintf(e->stage_fallback, sizeof e->stage_fallback,
             "the spill file could not grow beyond %llu MiB (%s: %s): the rest waited in the memory pool",
             (unsigned long long)(off >> 20), errno_name(err), strerror(err));
    return false;
  }
  st->slot = NULL;
  st->spill_off = off;
  st->addrs = addrs;
  e->staged_mem -= bytes;
  e->spill_live += bytes;
  if (e->spill_live > e->spill_peak) e->spill_peak = e->spill_live;
  e->spilled_batches++;
  note_peak(e);
  slot_release_locked(e, s);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one); /* the sweep may be waiting for a batch */
  (void)ignored;
  return true;
}

/* Drop what waits (the snapshot was stopped or failed: nothing more is stored); pool_lock held. */
static void drop_all(engine_t *e) {
  for (staged_t *st = e->sq_head; st != NULL;) {
    staged_t *next = st->next;
    if (!st->spilling) {
      unlink_staged(e, st);
      if (st->slot) {
        e->staged_mem -= (uint64_t)st->count * PG;
        slot_release_locked(e, st->slot);
      } else {
        e->spill_live -= (uint64_t)st->count * PG;
      }
      free(st->addrs);
      free(st);
    }
    st = next;
  }
}

static void *stage_main(void *arg) {
  engine_t *e = arg;
  prctl(PR_SET_NAME, "wpsnap-stager");
  /* A normal thread, not the engine's nice -10: writing the spill file is
   * CPU the target needs as much, and two threads at nice -10 on a 2-CPU
   * machine left the target's own threads runnable but waiting 60-170 ms
   * (perf sched, 8 GiB). Normal, whatever thread created it. */
  struct sched_param none = {0};
  (void)sched_setscheduler(0, SCHED_OTHER, &none);
  (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 0);
  pthread_mutex_lock(&e->pool_lock);
  for (;;) {
    bool progress = false;
    /* A stop (interrupt, store failure) or a failure of wpsnap drops what
     * waits; the target's exit or exec does not: what was copied is its
     * content at T, kept in the incomplete snapshot like the rest. */
    bool abandon = atomic_load(&e->stop) || (e->fatal_err != 0 && e->gone_reason < 0);
    if (abandon) {
      drop_all(e);
    } else {
      /* Batches in memory first, oldest first: that frees memory for the
       * sweep soonest, and a spilled batch waiting for a free batch to be
       * read into never holds up the others (the store takes them in any order). */
      while (e->js_out < e->js_max) {
        staged_t *next = e->sq_head;
        while (next != NULL && (next->slot == NULL || next->spilling)) next = next->next;
        if (next != NULL) {
          deliver(e, next);
          progress = true;
          continue;
        }
        staged_t *spilled = e->sq_head;
        while (spilled != NULL && spilled->spilling) spilled = spilled->next;
        if (spilled == NULL || !read_back(e, spilled)) break;
        progress = true;
      }
      if (!e->window_closed && e->spill_fd >= 0 && e->stage_fallback[0] == 0 && e->free_pool < spill_low_water(e) && spill_one(e)) progress = true;
    }
    if (e->posting_done && e->sq_head == NULL) break;
    if (!progress) {
      /* Woken by a new batch, a release, the window's end or a stop; the
       * timeout only rechecks `stop`, which engineStop sets without the lock. */
      struct timespec until;
      clock_gettime(CLOCK_REALTIME, &until);
      until.tv_nsec += 50 * 1000000L;
      if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&e->stage_cond, &e->pool_lock, &until);
    }
  }
  e->stage_done = true;
  pthread_mutex_unlock(&e->pool_lock);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one); /* the engine waits for this */
  (void)ignored;
  return NULL;
}

int stage_start(engine_t *e) {
  if (pthread_cond_init(&e->stage_cond, NULL) != 0) return ENOMEM;
  int err = pthread_create(&e->stage_thread, NULL, stage_main, e);
  if (err != 0) {
    pthread_cond_destroy(&e->stage_cond);
    return err;
  }
  e->stage_started = true;
  return 0;
}

static void stage_set(engine_t *e, bool *flag) {
  pthread_mutex_lock(&e->pool_lock);
  *flag = true;
  pthread_cond_signal(&e->stage_cond);
  pthread_mutex_unlock(&e->pool_lock);
}

/* The sweep ended: batches need no longer be kept free for it. */
void stage_window_closed(engine_t *e) { stage_set(e, &e->window_closed); }

/* No batch will be posted any more: the stager ends once every one is handed over. */
void stage_finish(engine_t *e) { stage_set(e, &e->posting_done); }

/* Can staging make room without the store: is there a spill file with room left? */
bool stage_can_spill(engine_t *e) {
  pthread_mutex_lock(&e->pool_lock);
  bool can = e->spill_fd >= 0 && e->stage_fallback[0] == 0 && e->spill_live + (uint64_t)e->batch_pages * PG <= e->spill_max;
  pthread_mutex_unlock(&e->pool_lock);
  return can;
}

bool stage_is_done(engine_t *e) {
  pthread_mutex_lock(&e->pool_lock);
  bool done = e->stage_done;
  pthread_mutex_unlock(&e->pool_lock);
  return done;
}

/* A released batch or a stop request: the stager looks again. */
void stage_poke(engine_t *e) {
  pthread_mutex_lock(&e->pool_lock);
  pthread_cond_signal(&e->stage_cond);
  pthread_mutex_unlock(&e->pool_lock);
}

void stage_join(engine_t *e) {
  if (!e->stage_started) return;
  pthread_join(e->stage_thread, NULL);
  e->stage_started = false;
  pthread_cond_destroy(&e->stage_cond);
}
