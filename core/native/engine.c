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
#include "engine_internal.h"

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
  napi_value by;
  if (napi_create_object(env, &by) == napi_ok) {
    for (int i = 0; i < ZERO_REASON_COUNT; i++) set_prop(env, by, zero_reason_names[i], make_double(env, (double)atomic_load(&e->zero_by[i])));
    set_prop(env, o, "zeroPagesBy", by);
  }
  set_prop(env, o, "pagesLost", make_double(env, (double)atomic_load(&e->pages_lost)));
  set_prop(env, o, "bytesCopied", make_double(env, (double)atomic_load(&e->bytes_copied)));
  set_prop(env, o, "events", make_double(env, (double)atomic_load(&e->events)));
  set_prop(env, o, "eagainRetries", make_double(env, (double)atomic_load(&e->eagain)));
  set_prop(env, o, "overflowBatches", make_double(env, (double)atomic_load(&e->overflow_batches)));
  set_prop(env, o, "totalPages", make_double(env, (double)e->total_pages));
  pthread_mutex_lock(&e->pool_lock);
  set_prop(env, o, "stagedBatches", make_double(env, (double)e->sq_len));
  set_prop(env, o, "storeBatches", make_double(env, (double)e->js_out));
  set_prop(env, o, "stagingBytes", make_double(env, (double)(e->staged_mem + e->spill_live)));
  set_prop(env, o, "stagingBytesPeak", make_double(env, (double)e->staging_peak));
  set_prop(env, o, "spillBytesPeak", make_double(env, (double)e->spill_peak));
  set_prop(env, o, "spilledBatches", make_double(env, (double)e->spilled_batches));
  set_prop(env, o, "poolBytes", make_double(env, (double)e->pool_mem_len));
  if (e->stage_fallback[0]) set_prop(env, o, "stagingFallback", make_string(env, e->stage_fallback));
  pthread_mutex_unlock(&e->pool_lock);
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
    set_prop(env, o, "windowMicros", make_double(env, e->window_end_us > e->started_us ? e->window_end_us - e->started_us : 0));
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
  } else if (m->type == MSG_STAGING_FULL) {
    set_prop(env, msg, "type", make_string(env, "staging-full"));
  } else if (m->type == MSG_WINDOW_CLOSED) {
    set_prop(env, msg, "type", make_string(env, "window"));
    set_prop(env, msg, "windowMicros", make_double(env, e->window_end_us > e->started_us ? e->window_end_us - e->started_us : 0));
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
  for (staged_t *st = e->sq_head; st != NULL;) {
    staged_t *next = st->next;
    free(st->addrs);
    free(st);
    st = next;
  }
  for (size_t i = 0; i < e->nslots; i++) {
    if (e->slots[i] == NULL) continue;
    if (!e->slots[i]->pooled) munmap(e->slots[i]->data, (size_t)e->slots[i]->cap * PG);
    free(e->slots[i]->addrs);
    free(e->slots[i]);
  }
  free(e->slots);
  if (e->pool_mem != NULL) munmap(e->pool_mem, e->pool_mem_len);
  for (size_t i = 0; i < e->nblocks; i++) free(e->state_blocks[i]);
  free(e->state_blocks);
  for (size_t i = 0; i < e->nsegs; i++)
    if (e->segs[i].fd >= 0 && (i == 0 || e->segs[i].fd != e->segs[i - 1].fd)) {
      /* fds are owned by JS */
    }
  free(e->segs);
  fault_loop_free(&e->loop);
  free(e->lost);
  free(e->latency_ns);
  if (e->pagemap_fd >= 0) close(e->pagemap_fd);
  if (e->mem_fd >= 0) close(e->mem_fd);
  if (e->wake_fd >= 0) close(e->wake_fd);
  track_state_free(&e->track);
  pthread_mutex_destroy(&e->pool_lock);
  group_unref(e->group);
  free(e);
}

static void send_command(engine_t *e, engine_cmd_t cmd);

static void engine_finalize(napi_env env, void *data, void *hint) {
  engine_t *e = data;
  if (e->thread_started) {
    atomic_store(&e->stop, true);
    atomic_store(&e->track_stop, true);
    if (!e->ran) send_command(e, CMD_QUIT);
    uint64_t one = 1;
    ssize_t ignored = write(e->wake_fd, &one, sizeof one);
    (void)ignored;
    pthread_join(e->thread, NULL);
  }
  if (!e->ran && e->stage_started) stage_finish(e);
  stage_join(e);
  engine_free(e);
}

/* engineCreate({pid, pidfd, batchPages, poolBatches, warmBatches, storeBatches, spillFd, spillMaxBytes,
 *               rateBytesPerSec}, onMessage) -> handle
 * Everything that does not need the target stopped, done before the pause:
 * the staging pool (its first warmBatches batches touched now: a fresh page
 * costs far more than a copy, see pool_alloc), the stager thread, the fds on
 * the target. poolBatches: the staging pool in batches; storeBatches: batches
 * the store holds at most at a time; spillFd: an unlinked 0600 file for what
 * the pool cannot hold (-1: none), at most spillMaxBytes of it. The engine
 * runs once engineRun gives it the userfaultfd and the regions; a handle that
 * never runs is ended with engineClose. */
static napi_value js_engine_create(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) return throw_type(env, "engineCreate(options, onMessage)");
  napi_value opts = argv[0];
  int32_t pid, pidfd, batch_pages = 512, pool = 16, warm = 0, store_batches = 8, spill_fd = -1;
  uint64_t rate = 0, spill_max = 0;
  if (!prop_int32(env, opts, "pid", &pid) || !prop_int32(env, opts, "pidfd", &pidfd))
    return throw_type(env, "engineCreate: pid and pidfd are required");
  prop_int32(env, opts, "batchPages", &batch_pages);
  prop_int32(env, opts, "poolBatches", &pool);
  prop_int32(env, opts, "warmBatches", &warm);
  prop_uint64(env, opts, "rateBytesPerSec", &rate);
  prop_int32(env, opts, "storeBatches", &store_batches);
  prop_int32(env, opts, "spillFd", &spill_fd);
  prop_uint64(env, opts, "spillMaxBytes", &spill_max);
  if (store_batches < 1) store_batches = 1;
  if (batch_pages < 512) batch_pages = 512; /* a 2 MiB huge page must fit */
  if (pool < 2) pool = 2;
  if (warm > pool) warm = pool;

  engine_t *e = calloc(1, sizeof *e);
  if (e == NULL) return throw_errno(env, ENOMEM, "calloc", "start the engine");
  e->done_msg = malloc(sizeof *e->done_msg);
  if (e->done_msg == NULL) {
    free(e);
    return throw_errno(env, ENOMEM, "malloc", "start the engine");
  }
  const char *fault = getenv("WPSNAP_FAULT");
  e->fault_alloc = fault != NULL && strcmp(fault, FAULT_POINT_ENGINE_ALLOC) == 0;
  e->fault_vanish = fault != NULL && strcmp(fault, FAULT_POINT_ENGINE_VANISH) == 0;
  e->fault_mid_spill = fault != NULL && strcmp(fault, FAULT_POINT_MID_SPILL) == 0;
  const char *sweep_nice = getenv("WPSNAP_SWEEP_NICE");
  e->sweep_nice = sweep_nice == NULL || strcmp(sweep_nice, "engine") != 0;
  e->cur_nice = ENGINE_NICE;
  e->pid = pid;
  e->uffd = -1;
  e->pidfd = pidfd;
  e->pagemap_fd = e->mem_fd = e->wake_fd = -1;
  e->js_max = (uint32_t)store_batches;
  e->spill_fd = spill_fd;
  e->spill_max = spill_fd >= 0 ? spill_max : 0;
  e->gone_reason = -1;
  e->batch_pages = (uint32_t)batch_pages;
  e->pool_size = (uint32_t)pool;
  e->rate = (double)rate;
  pthread_mutex_init(&e->pool_lock, NULL);
  track_state_init(&e->track, -1, -1, NULL);
  pthread_cond_init(&e->cmd_cond, NULL);

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
  e->zero_pfn = shared_zero_pfn();
  int pool_err = pool_alloc(e, (uint32_t)pool, (uint32_t)warm);
  if (pool_err != 0) {
    engine_free(e);
    return throw_errno(env, pool_err, "mmap", "allocate the staging pool (%d batches)", pool);
  }

  napi_value name;
  napi_create_string_utf8(env, "wpsnap-engine", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[1], NULL, name, 0, 1, NULL, NULL, e, call_js, &e->tsfn) != napi_ok) {
    engine_free(e);
    return throw_type(env, "engineCreate: onMessage must be a function");
  }
  int stage_err = stage_start(e);
  if (stage_err != 0) {
    napi_release_threadsafe_function(e->tsfn, napi_tsfn_abort);
    engine_free(e);
    return throw_errno(env, stage_err, "pthread_create", "start the stager thread");
  }
  int thread_err = pthread_create(&e->thread, NULL, engine_thread, e);
  if (thread_err != 0) {
    atomic_store(&e->stop, true);
    stage_finish(e);
    stage_join(e);
    napi_release_threadsafe_function(e->tsfn, napi_tsfn_abort);
    engine_free(e);
    return throw_errno(env, thread_err, "pthread_create", "start the engine thread");
  }
  e->thread_started = true;
  napi_value handle;
  NAPI_CALL(env, make_handle(env, e, engine_finalize, HANDLE_ENGINE, &handle));
  return handle;
}

/* engineRun(handle, {uffd, regions: [{start, end, pageSize, kind, fd, fileOffset, hugetlb, zeroRanges, savedRanges}], keep}):
 * start the engine thread on the target's protected regions. Called in the
 * pause, right before the resume, so that the target's first write faults
 * find the engine ready. */
static void send_command(engine_t *e, engine_cmd_t cmd) {
  pthread_mutex_lock(&e->pool_lock);
  e->cmd = cmd;
  pthread_cond_broadcast(&e->cmd_cond);
  pthread_mutex_unlock(&e->pool_lock);
}

/* Stop tracking and wait until the engine thread has handled every message read. */
static void track_stop_wait(engine_t *e) {
  if (!e->tracking) return;
  atomic_store(&e->track_stop, true);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one);
  (void)ignored;
  pthread_mutex_lock(&e->pool_lock);
  while (!e->track_stopped) pthread_cond_wait(&e->cmd_cond, &e->pool_lock);
  pthread_mutex_unlock(&e->pool_lock);
  e->tracking = false;
}

/* After a run with keep: stop serving the context and wait until every message read is logged. */
static void keep_stop_wait(engine_t *e) {
  atomic_store(&e->keep_stop, true);
  uint64_t one = 1;
  ssize_t ignored = write(e->wake_fd, &one, sizeof one);
  (void)ignored;
  pthread_mutex_lock(&e->pool_lock);
  while (!e->keep_stopped) pthread_cond_wait(&e->cmd_cond, &e->pool_lock);
  pthread_mutex_unlock(&e->pool_lock);
}

static napi_value js_engine_run(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc >= 2 ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineRun(handle, {uffd, regions})");
  if (e->prepared || e->closed) return throw_type(env, "engineRun: the engine already ran");
  track_stop_wait(e);
  int32_t uffd;
  napi_value regions;
  if (!prop_int32(env, argv[1], "uffd", &uffd) || napi_get_named_property(env, argv[1], "regions", &regions) != napi_ok)
    return throw_type(env, "engineRun: uffd and regions are required");
  e->uffd = uffd;
  napi_value kv, gv;
  napi_valuetype gt = napi_undefined;
  if (napi_get_named_property(env, argv[1], "keep", &kv) == napi_ok) arg_bool(env, kv, &e->keep);
  if (napi_get_named_property(env, argv[1], "group", &gv) == napi_ok) napi_typeof(env, gv, &gt);
  if (gt != napi_undefined) {
    engine_group_t *g = group_of(env, gv);
    if (g == NULL || e->keep) return throw_type(env, "engineRun: group must be a groupCreate handle (and a group's engine keeps nothing)");
    if (e->group == NULL) group_ref(g);
    e->group = g;
  }
  parent_pages_t pp = {0};
  napi_value uv, wv;
  napi_valuetype ut = napi_undefined, wt = napi_undefined;
  if (napi_get_named_property(env, argv[1], "unwritten", &uv) == napi_ok) napi_typeof(env, uv, &ut);
  if (napi_get_named_property(env, argv[1], "writtenAtInstant", &wv) == napi_ok) napi_typeof(env, wv, &wt);
  if (ut != napi_undefined && !arg_u64_groups(env, uv, 2, &pp.unwritten, &pp.nunwritten))
    return throw_type(env, "engineRun: unwritten must be a BigUint64Array of start, end pairs");
  if (wt != napi_undefined && !arg_u64_groups(env, wv, 2, &pp.written, &pp.nwritten))
    return throw_type(env, "engineRun: writtenAtInstant must be a BigUint64Array of start, len pairs");
  e->parent_pages = pp.nunwritten > 0;
  napi_value failed = parse_regions(env, e, regions, &pp);
  if (failed != NULL) return failed;
  bool pending;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return NULL;
  engine_loop_init(e);
  e->prepared = true;
  return NULL;
}

/* engineGo(handle): start the snapshot prepared by engineRun (right after the resume). */
static napi_value js_engine_go(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc ? get_engine(env, argv[0]) : NULL;
  if (e == NULL || !e->prepared || e->ran || e->closed) return throw_type(env, "engineGo(handle): after engineRun, once");
  e->started_us = mono_us();
  e->ran = true;
  send_command(e, CMD_RUN);
  return NULL;
}

/* engineTrack(handle, {uffd, ranges: BigUint64Array [start, end, unit, ...] sorted}): before the
 * pause, let the target's writes to its protected ranges through and record them (engine_track.c). */
static napi_value js_engine_track(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc >= 2 ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineTrack(handle, {uffd, ranges})");
  if (e->ran || e->closed || e->tracking || e->track_stopped) return throw_type(env, "engineTrack: only once, before engineRun");
  int32_t uffd;
  napi_value rv;
  const uint64_t *ranges;
  size_t n;
  if (!prop_int32(env, argv[1], "uffd", &uffd) || napi_get_named_property(env, argv[1], "ranges", &rv) != napi_ok ||
      !arg_u64_groups(env, rv, 3, &ranges, &n))
    return throw_type(env, "engineTrack: uffd and ranges (a BigUint64Array of start, end, unit triples) are required");
  if (track_set_ranges(&e->track, ranges, n) != 0) return throw_errno(env, ENOMEM, "malloc", "tracked ranges");
  e->uffd = uffd;
  e->tracking = true;
  send_command(e, CMD_TRACK);
  return NULL;
}

/* engineTrackTake(handle, stop) -> {written, invalid, overflowed, faults, forks}: the ranges written
 * (and zapped or moved into) and those unmapped or moved away since the last take, as [start, len] pairs.
 * With stop, tracking ends first and every message read is in it: called in the pause. */
static napi_value js_engine_track_take(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc >= 1 ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineTrackTake(handle, stop)");
  bool stop = false;
  if (argc >= 2) arg_bool(env, argv[1], &stop);
  if (stop && e->keep && e->ran) keep_stop_wait(e);
  else if (stop) track_stop_wait(e);
  napi_value o = track_take_object(env, &e->track);
  if (e->fatal_err) set_prop(env, o, "error", make_string(env, e->fatal_what));
  if (e->keep) {
    napi_value exited;
    napi_get_boolean(env, atomic_load(&e->keep_exited), &exited);
    set_prop(env, o, "exited", exited);
  }
  return o;
}

/* engineClose(handle): end an engine that never ran (the snapshot failed
 * before engineRun): its stager stops and its callback is released, so the
 * process can exit. A no-op once it ran: its end is the 'done' message. */
static napi_value js_engine_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_t *e = argc ? get_engine(env, argv[0]) : NULL;
  if (e == NULL) return throw_type(env, "engineClose(handle)");
  if (e->ran || e->closed) return NULL;
  e->closed = true;
  track_stop_wait(e);
  send_command(e, CMD_QUIT);
  pthread_join(e->thread, NULL);
  e->thread_started = false;
  atomic_store(&e->stop, true);
  stage_finish(e);
  stage_join(e);
  napi_release_threadsafe_function(e->tsfn, napi_tsfn_abort);
  return NULL;
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
  if (id >= 0 && (size_t)id < e->nslots && e->slots[id] != NULL && !e->slots[id]->free) {
    slot_release_locked(e, e->slots[id]);
    if (e->js_out > 0) e->js_out--;
  }
  pthread_cond_signal(&e->stage_cond);
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
  if (e->stage_started) stage_poke(e);
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
      {"engineCreate", NULL, js_engine_create, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineRun", NULL, js_engine_run, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineGo", NULL, js_engine_go, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineClose", NULL, js_engine_close, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineTrack", NULL, js_engine_track, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineTrackTake", NULL, js_engine_track_take, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineRelease", NULL, js_engine_release, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineStop", NULL, js_engine_stop, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineStats", NULL, js_engine_stats, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"engineJoin", NULL, js_engine_join, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
