/* The shared memory of a process group (snapshotGroup, core/group.ts): one
 * engine per member, each on its own userfaultfd, and one page state per page
 * of every memory object several members map (a memfd, shmem, a hugetlbfs
 * file), which every member's segments of that object point into. A page of
 * such an object is copied once, by whichever engine comes first, before any
 * engine lets a write to it through: every engine of a group takes the
 * group's lock around each step that reads or changes page states (a fault or
 * an event handled, a sweep step), so a page seen unsaved is copied and marked
 * saved before another engine can see it. A copy of a shared file is read
 * from the file (pread), never through a member's mapping, so which member's
 * engine does it does not matter; the store then indexes it for every member
 * (core/group.ts). */
#include "engine_internal.h"

typedef struct {
  uint64_t dev, ino, pages;
  uint8_t *state;
  bool holes_marked; /* its holes at T are marked (engine_regions.c): the first member's engine did it */
} group_object_t;

struct engine_group {
  pthread_mutex_t lock; /* recursive: a fault handled under it applies events, which take it too */
  _Atomic int refs;     /* the JS handle and every engine that runs with it */
  size_t nobjects;
  group_object_t *objects;
};

void group_ref(engine_group_t *g) { atomic_fetch_add(&g->refs, 1); }

void group_unref(engine_group_t *g) {
  if (g == NULL || atomic_fetch_sub(&g->refs, 1) != 1) return;
  for (size_t i = 0; i < g->nobjects; i++) free(g->objects[i].state);
  free(g->objects);
  pthread_mutex_destroy(&g->lock);
  free(g);
}

void group_enter(engine_t *e) {
  if (e->group != NULL) pthread_mutex_lock(&e->group->lock);
}

void group_leave(engine_t *e) {
  if (e->group != NULL) pthread_mutex_unlock(&e->group->lock);
}

uint8_t *group_states(engine_group_t *g, uint64_t dev, uint64_t ino, uint64_t first_page, uint64_t npages) {
  for (size_t i = 0; i < g->nobjects; i++) {
    group_object_t *o = &g->objects[i];
    if (o->dev != dev || o->ino != ino) continue;
    return first_page + npages <= o->pages ? o->state + first_page : NULL;
  }
  return NULL;
}

/* One walk of the whole object (every member's mapping lies within it), by the first engine to start. */
uint8_t *group_claim_holes(engine_group_t *g, uint64_t dev, uint64_t ino, uint64_t *pages) {
  for (size_t i = 0; i < g->nobjects; i++) {
    group_object_t *o = &g->objects[i];
    if (o->dev != dev || o->ino != ino || o->holes_marked) continue;
    o->holes_marked = true;
    *pages = o->pages;
    return o->state;
  }
  return NULL;
}

engine_group_t *group_of(napi_env env, napi_value v) { return handle_data(env, v, HANDLE_GROUP); }

static void group_finalize(napi_env env, void *data, void *hint) { group_unref(data); }

/* groupCreate([{dev: bigint, ino: bigint, pages: number}]) -> handle: the
 * group's shared objects (st_dev and st_ino of the file, pages it spans in
 * any member's mapping), every page unsaved. */
static napi_value js_group_create(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint32_t n = 0;
  bool is_array = false;
  if (argc < 1 || napi_is_array(env, argv[0], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[0], &n) != napi_ok)
    return throw_type(env, "groupCreate([{dev, ino, pages}])");
  engine_group_t *g = calloc(1, sizeof *g);
  if (g == NULL || (g->objects = calloc(n ? n : 1, sizeof *g->objects)) == NULL) {
    free(g);
    return throw_errno(env, ENOMEM, "calloc", "the group's shared objects");
  }
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&g->lock, &attr);
  pthread_mutexattr_destroy(&attr);
  g->refs = 1;
  for (uint32_t i = 0; i < n; i++) {
    napi_value o;
    napi_get_element(env, argv[0], i, &o);
    group_object_t *obj = &g->objects[i];
    double pages = 0;
    napi_value pv;
    if (!prop_uint64(env, o, "dev", &obj->dev) || !prop_uint64(env, o, "ino", &obj->ino) || napi_get_named_property(env, o, "pages", &pv) != napi_ok ||
        napi_get_value_double(env, pv, &pages) != napi_ok || pages < 1 || pages > (double)(1ull << 40)) {
      group_unref(g);
      return throw_type(env, "groupCreate: each object needs dev, ino (bigint) and pages (a positive number)");
    }
    obj->pages = (uint64_t)pages;
    if ((obj->state = calloc(obj->pages, 1)) == NULL) {
      group_unref(g);
      return throw_errno(env, ENOMEM, "calloc", "page states of a %llu-page shared object", (unsigned long long)obj->pages);
    }
    g->nobjects++;
  }
  napi_value handle;
  NAPI_CALL(env, make_handle(env, g, group_finalize, HANDLE_GROUP, &handle));
  return handle;
}

/* groupUnsaved(handle) -> [{dev, ino, pages: BigUint64Array [first, end) page pairs}]: what no
 * engine saved nor lost (every member mapping it exited first). Call once every engine is done. */
static napi_value js_group_unsaved(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  engine_group_t *g = argc ? group_of(env, argv[0]) : NULL;
  if (g == NULL) return throw_type(env, "groupUnsaved(handle)");
  napi_value out;
  napi_create_array(env, &out);
  uint32_t k = 0;
  pthread_mutex_lock(&g->lock);
  for (size_t i = 0; i < g->nobjects; i++) {
    group_object_t *o = &g->objects[i];
    page_runs_t runs = {0};
    for (uint64_t p = 0; p < o->pages;) {
      if (o->state[p] != PAGE_UNSAVED) {
        p++;
        continue;
      }
      uint64_t q = p;
      while (q < o->pages && o->state[q] == PAGE_UNSAVED) q++;
      if (page_runs_push(&runs, p, q) != 0) break;
      p = q;
    }
    if (runs.n > 0) {
      napi_value entry, ab, arr;
      void *data;
      napi_create_object(env, &entry);
      set_prop(env, entry, "dev", make_bigint(env, o->dev));
      set_prop(env, entry, "ino", make_bigint(env, o->ino));
      napi_create_arraybuffer(env, runs.n * 16, &data, &ab);
      memcpy(data, runs.pairs, runs.n * 16);
      napi_create_typedarray(env, napi_biguint64_array, runs.n * 2, ab, 0, &arr);
      set_prop(env, entry, "pages", arr);
      napi_set_element(env, out, k++, entry);
    }
    free(runs.pairs);
  }
  pthread_mutex_unlock(&g->lock);
  return out;
}

void register_engine_group_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"groupCreate", NULL, js_group_create, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"groupUnsaved", NULL, js_group_unsaved, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
