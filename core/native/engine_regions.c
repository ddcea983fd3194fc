/* engineRun's regions: the segments the engine saves, with each page's
 * starting state (zero where known never touched, saved where the pause
 * accounted for it or a tracked generation reads it from its parent). */
#include "engine_internal.h"

static void mark_parent_pages(uint8_t *state, uint64_t start, uint64_t end, const parent_pages_t *pp) {
  size_t lo = 0, hi = pp->nunwritten;
  while (lo < hi) { /* the first range ending after start */
    size_t mid = (lo + hi) / 2;
    if (pp->unwritten[2 * mid + 1] <= start) lo = mid + 1;
    else hi = mid;
  }
  for (size_t k = lo; k < pp->nunwritten && pp->unwritten[2 * k] < end; k++) {
    uint64_t s0 = pp->unwritten[2 * k] < start ? start : pp->unwritten[2 * k];
    uint64_t e0 = pp->unwritten[2 * k + 1] > end ? end : pp->unwritten[2 * k + 1];
    if (s0 < e0 && !(s0 & (PG - 1)) && !(e0 & (PG - 1))) memset(state + (s0 - start) / PG, PAGE_SAVED, (e0 - s0) / PG);
  }
  for (size_t k = 0; k < pp->nwritten; k++) {
    uint64_t ws = pp->written[2 * k] & ~(PG - 1), we = (pp->written[2 * k] + pp->written[2 * k + 1] + PG - 1) & ~(PG - 1);
    uint64_t s0 = ws < start ? start : ws, e0 = we > end ? end : we;
    if (s0 < e0) memset(state + (s0 - start) / PG, PAGE_UNSAVED, (e0 - s0) / PG);
  }
}

/* Mark the holes of [file_off, file_off + npages pages) of a file saved; how many were unsaved. */
uint64_t mark_holes(int fd, uint64_t file_off, uint8_t *state, uint64_t npages) {
  uint64_t marked = 0, end = file_off + npages * PG;
  for (off_t p = (off_t)file_off; p < (off_t)end;) {
    off_t data = lseek(fd, p, SEEK_DATA);
    off_t hole_end = data < 0 || data > (off_t)end ? (off_t)end : data & ~(off_t)(PG - 1);
    for (off_t h = p; h < hole_end; h += (off_t)PG) {
      uint8_t *st = &state[(h - (off_t)file_off) / (off_t)PG];
      if (*st == PAGE_UNSAVED) marked++;
      *st = PAGE_SAVED;
    }
    if (hole_end >= (off_t)end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    p = hole < 0 ? (off_t)end : (hole + (off_t)PG - 1) / (off_t)PG * (off_t)PG;
  }
  return marked;
}

/* The regions to save, as segments with their page states. */
napi_value parse_regions(napi_env env, engine_t *e, napi_value regions, const parent_pages_t *pp) {
  uint32_t nregions = 0;
  if (napi_get_array_length(env, regions, &nregions) != napi_ok) return throw_type(env, "engineRun: regions must be an array");
  e->state_blocks = calloc(nregions ? nregions : 1, sizeof(uint8_t *));
  if (e->state_blocks == NULL) return throw_errno(env, ENOMEM, "calloc", "engine region table");
  for (uint32_t i = 0; i < nregions; i++) {
    napi_value r;
    napi_get_element(env, regions, i, &r);
    uint64_t start, end, file_off = 0;
    int32_t page_size = 4096, kind = KIND_ANON, fd = -1;
    bool hugetlb = false;
    if (!prop_uint64(env, r, "start", &start) || !prop_uint64(env, r, "end", &end) || end <= start || (start & (PG - 1)) ||
        (end & (PG - 1)))
      return throw_type(env, "engineRun: each region needs page-aligned start < end");
    prop_int32(env, r, "pageSize", &page_size);
    prop_int32(env, r, "kind", &kind);
    prop_int32(env, r, "fd", &fd);
    prop_uint64(env, r, "fileOffset", &file_off);
    bool no_fd_writers = false, shared = false;
    napi_value bv;
    if (napi_get_named_property(env, r, "noFdWriters", &bv) == napi_ok) arg_bool(env, bv, &no_fd_writers);
    if (napi_get_named_property(env, r, "groupShared", &bv) == napi_ok) arg_bool(env, bv, &shared);
    /* A shared file's pages are proven against its times at T: required. */
    uint64_t ctime_ns = 0, mtime_ns = 0;
    struct stat fst = {0};
    if (kind == KIND_FILE && (!prop_uint64(env, r, "ctimeNs", &ctime_ns) || !prop_uint64(env, r, "mtimeNs", &mtime_ns) ||
                              fd < 0 || fstat(fd, &fst) != 0))
      return throw_type(env, "engineRun: a shared-file region needs its fd, ctimeNs and mtimeNs at T");
    napi_value hv;
    if (napi_get_named_property(env, r, "hugetlb", &hv) == napi_ok) arg_bool(env, hv, &hugetlb);
    if (page_size < 4096 || (page_size & (page_size - 1)) || page_size > (2 << 20))
      return throw_type(env, "engineRun: pageSize must be 4096..2097152, a power of two");
    uint64_t npages = (end - start) / PG;
    uint8_t *state;
    shared = shared && kind == KIND_FILE;
    if (shared) { /* the group's states of this object, shared with the other members' engines */
      if (e->group == NULL || (file_off & (PG - 1)) ||
          (state = group_states(e->group, (uint64_t)fst.st_dev, (uint64_t)fst.st_ino, file_off / PG, npages)) == NULL)
        return throw_type(env, "engineRun: a groupShared region needs the run's group, holding its file and every page it maps");
    } else {
      state = calloc(npages, 1);
      if (state == NULL) return throw_errno(env, ENOMEM, "calloc", "page states of a %llu-page region", (unsigned long long)npages);
      e->state_blocks[e->nblocks++] = state;
    }
    /* zeroRanges: pages known to be never touched at T that were left
     * unprotected (sparse reservations): zero, and never to be read. */
    napi_value zv;
    napi_valuetype ztype = napi_undefined;
    if (napi_get_named_property(env, r, "zeroRanges", &zv) == napi_ok) napi_typeof(env, zv, &ztype);
    if (ztype != napi_undefined) {
      const uint64_t *z;
      size_t zpairs;
      if (!arg_u64_groups(env, zv, 2, &z, &zpairs)) return throw_type(env, "engineRun: zeroRanges must be a BigUint64Array of start, end pairs");
      for (size_t k = 0; k < 2 * zpairs; k += 2) {
        uint64_t zs = z[k] < start ? start : z[k], ze = z[k + 1] > end ? end : z[k + 1];
        if (zs >= ze || (zs & (PG - 1)) || (ze & (PG - 1))) continue;
        memset(state + (zs - start) / PG, PAGE_SAVED, (ze - zs) / PG);
        count_zero(e, ZERO_SPARSE, (ze - zs) / PG);
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
      if (!arg_u64_groups(env, sv, 2, &sr, &spairs)) return throw_type(env, "engineRun: savedRanges must be a BigUint64Array of start, end pairs");
      for (size_t k = 0; k < 2 * spairs; k += 2) {
        uint64_t ss = sr[k] < start ? start : sr[k], se = sr[k + 1] > end ? end : sr[k + 1];
        if (ss >= se || (ss & (PG - 1)) || (se & (PG - 1))) continue;
        memset(state + (ss - start) / PG, PAGE_SAVED, (se - ss) / PG);
      }
    }
    if (pp->nunwritten > 0) mark_parent_pages(state, start, end, pp);
    /* A shared file only mappings write: its holes at T are zero, marked now (in the pause), so that a hole
     * found later is known to be punched since (MADV_REMOVE through some mapping), never taken for zero. */
    segment_t *s = seg_append(e);
    if (s == NULL) return throw_errno(env, ENOMEM, "realloc", "engine segments");
    *s = (segment_t){.t_start = start, .cur_start = start, .len = end - start, .page_size = (uint32_t)page_size, .kind = kind,
                     .fd = fd, .file_off = file_off, .file_dev = (uint64_t)fst.st_dev, .file_ino = (uint64_t)fst.st_ino,
                     .ctime_ns_at_t = ctime_ns, .mtime_ns_at_t = mtime_ns, .hugetlb = hugetlb, .state = state,
                     .no_fd_writers = no_fd_writers && kind == KIND_FILE, .group_shared = shared,
                     /* without fd writers no proof is needed, so neither is the whole-file copy made for one;
                      * its holes at T are marked when the run starts (mark_holes_at_t) */
                     .whole_tried = no_fd_writers && kind == KIND_FILE, .holes_pending = no_fd_writers && kind == KIND_FILE};
    e->total_pages += npages;
  }
  return NULL;
}

