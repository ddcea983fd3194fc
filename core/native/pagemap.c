/* /proc/PID/pagemap and PAGEMAP_SCAN: which pages are present, swapped,
 * never touched or privately modified, and the copy of the privately
 * modified pages of private file mappings during the pause. */
#include "addon.h"
#include "kernel_compat.h"
#include "napi_util.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

int pread_all(int fd, void *buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += (size_t)n;
  }
  return 0;
}

int read_pagemap(int pagemap_fd, uint64_t addr, size_t npages, uint64_t *out) {
  return pread_all(pagemap_fd, out, npages * sizeof(uint64_t), (addr / 4096) * 8);
}

#define KPF_ZERO_PAGE 24 /* /proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst) */

/* The pfn of the shared zero page, or 0 if it cannot be known. A read fault on
 * an untouched private anonymous page usually maps it, but not always: on this
 * kernel it allocates a real page instead. Taking that page's pfn for the zero
 * page was a silent-data bug: the page is freed at once, the target reuses it
 * (a copy-on-write copy after a fork, say) and the sweep took that target page
 * for zero. So the pfn is trusted only when /proc/kpageflags says it is the
 * zero page; otherwise no entry is ever taken for the zero page, and such
 * pages are read (they read as zeros). */
uint64_t shared_zero_pfn(void) {
  volatile uint8_t *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 0;
  (void)p[0];
  uint64_t entry = 0, flags = 0;
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    read_pagemap(fd, (uint64_t)(uintptr_t)p, 1, &entry);
    close(fd);
  }
  munmap((void *)p, 4096);
  uint64_t pfn = (entry & PM_PRESENT) ? (entry & PM_PFN_MASK) : 0;
  if (pfn == 0) return 0;
  int kf = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  if (kf < 0) return 0;
  ssize_t n = pread(kf, &flags, sizeof flags, (off_t)(pfn * sizeof flags));
  close(kf);
  return n == (ssize_t)sizeof flags && (flags >> KPF_ZERO_PAGE & 1) ? pfn : 0;
}

/* zeroPagePfn() -> bigint: what shared_zero_pfn() trusts (0n: none). */
static napi_value js_zero_page_pfn(napi_env env, napi_callback_info info) {
  (void)info;
  return make_bigint(env, shared_zero_pfn());
}

/* readPagemap(pid, address, npages) -> BigUint64Array of raw entries */
static napi_value js_read_pagemap(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  uint64_t addr, npages;
  if (argc < 3 || !arg_int32(env, argv[0], &pid) || !arg_uint64(env, argv[1], &addr) || !arg_uint64(env, argv[2], &npages) ||
      npages > (1ULL << 24))
    return throw_type(env, "readPagemap(pid, address, npages)");
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return throw_errno(env, errno, "open", "open(%s)", path);
  void *data;
  napi_value ab, arr;
  if (napi_create_arraybuffer(env, npages * 8, &data, &ab) != napi_ok) {
    close(fd);
    return NULL;
  }
  int err = read_pagemap(fd, addr, npages, data);
  close(fd);
  if (err != 0) return throw_errno(env, err, "pread", "pread(%s)", path);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, npages, ab, 0, &arr));
  return arr;
}

/* The pages of private file mappings that differ from the file: those present
 * but not file pages (copy-on-write anon pages) and swapped ones; with
 * allPresent = 1, every present page. ranges are [start, end, allPresent]
 * triples. Returns a malloc'd array of their addresses (count in *count), or
 * NULL after throwing. */
static uint64_t *select_private_pages(napi_env env, napi_value pid_arg, napi_value ranges_arg, const char *name, int32_t *pid,
                                      size_t *count) {
  const uint64_t *ranges;
  size_t nranges, total_pages = 0;
  if (!arg_int32(env, pid_arg, pid) || !arg_u64_groups(env, ranges_arg, 3, &ranges, &nranges)) {
    char message[128];
    snprintf(message, sizeof message, "%s(pid, ranges: BigUint64Array of start, end, allPresent triples)", name);
    throw_type(env, message);
    return NULL;
  }
  for (size_t r = 0; r < nranges; r++) {
    uint64_t start = ranges[3 * r], end = ranges[3 * r + 1];
    if (end <= start || (start & 4095) || (end & 4095)) {
      char message[128];
      snprintf(message, sizeof message, "%s: each range must be page-aligned with start < end", name);
      throw_type(env, message);
      return NULL;
    }
    total_pages += (end - start) / 4096;
  }
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", *pid);
  int pm = open(path, O_RDONLY | O_CLOEXEC);
  if (pm < 0) {
    throw_errno(env, errno, "open", "open(%s)", path);
    return NULL;
  }
  /* Chosen addresses are written over the pagemap entries already examined. */
  uint64_t *entries = malloc((total_pages ? total_pages : 1) * 8);
  if (entries == NULL) {
    close(pm);
    throw_errno(env, ENOMEM, "malloc", "%s", name);
    return NULL;
  }
  size_t chosen = 0, at = 0;
  for (size_t r = 0; r < nranges; r++) {
    uint64_t start = ranges[3 * r], end = ranges[3 * r + 1];
    bool all_present = ranges[3 * r + 2] != 0;
    size_t npages = (end - start) / 4096;
    int err = read_pagemap(pm, start, npages, entries + at);
    if (err != 0) {
      close(pm);
      free(entries);
      throw_errno(env, err, "pread", "pread(%s) at 0x%llx", path, (unsigned long long)start);
      return NULL;
    }
    for (size_t i = 0; i < npages; i++) {
      uint64_t e = entries[at + i];
      bool cow = ((e & PM_PRESENT) && !(e & PM_FILE)) || (e & PM_SWAP);
      if (cow || (all_present && (e & PM_PRESENT))) entries[chosen++] = start + i * 4096;
    }
    at += npages;
  }
  close(pm);
  *count = chosen;
  return entries;
}

/* countPrivatePages(pid, ranges) -> number: how many pages copyPrivatePages
 * would copy now (to size its buffer before the target is stopped). */
static napi_value js_count_private_pages(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) return throw_type(env, "countPrivatePages(pid, ranges)");
  int32_t pid;
  size_t count;
  uint64_t *entries = select_private_pages(env, argv[0], argv[1], "countPrivatePages", &pid, &count);
  if (entries == NULL) return NULL;
  free(entries);
  return make_double(env, (double)count);
}

/* copyPrivatePages(pid, ranges: BigUint64Array [start, end, allPresent, …], into?: Buffer)
 *   -> { addresses: BigUint64Array, data: Buffer }
 * Copies the pages select_private_pages() chooses. Runs while the target is
 * stopped (these mappings cannot be write-protected), so every range goes in
 * one call: the pagemap and mem files are opened once, and the pages are read
 * with one process_vm_readv per IOV_MAX pages. The pages go into `into` when
 * they fit (data is then `into`, the pages at its start): memory touched
 * before the pause, since first touches of fresh memory cost as much as the
 * copy itself on this kind of VM. Otherwise into a new buffer. */
#define COPY_IOV_MAX 1024

static int read_pages_batched(pid_t pid, int memfd, const uint64_t *addrs, size_t count, char *dst) {
  struct iovec local, remote[COPY_IOV_MAX];
  for (size_t first = 0; first < count; first += COPY_IOV_MAX) {
    size_t n = count - first < COPY_IOV_MAX ? count - first : COPY_IOV_MAX;
    for (size_t k = 0; k < n; k++) remote[k] = (struct iovec){(void *)(uintptr_t)addrs[first + k], 4096};
    local = (struct iovec){dst + first * 4096, n * 4096};
    ssize_t got = process_vm_readv(pid, &local, 1, remote, n, 0);
    if (got == (ssize_t)(n * 4096)) continue;
    if (got < 0 && errno == ESRCH) return ESRCH;
    /* A short read stops at the first page it could not read (PROT_NONE):
     * read the rest one by one, falling back to /proc/PID/mem. */
    size_t done = got > 0 ? (size_t)got / 4096 : 0;
    for (size_t k = done; k < n; k++) {
      int err = remote_read(pid, memfd, addrs[first + k], dst + (first + k) * 4096, 4096);
      if (err != 0) return err;
    }
  }
  return 0;
}

static napi_value js_copy_private_pages(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) return throw_type(env, "copyPrivatePages(pid, ranges, into?)");
  int32_t pid;
  size_t count;
  uint64_t *entries = select_private_pages(env, argv[0], argv[1], "copyPrivatePages", &pid, &count);
  if (entries == NULL) return NULL;
  void *addr_data, *page_data = NULL;
  size_t into_len = 0;
  napi_value ab, addrs, pages, out;
  bool is_buffer = false;
  if (argc >= 3 && napi_is_buffer(env, argv[2], &is_buffer) == napi_ok && is_buffer &&
      napi_get_buffer_info(env, argv[2], &page_data, &into_len) == napi_ok && into_len >= count * 4096) {
    pages = argv[2];
  } else if (napi_create_buffer(env, count * 4096, &page_data, &pages) != napi_ok) {
    free(entries);
    return NULL;
  }
  if (napi_create_arraybuffer(env, count * 8, &addr_data, &ab) != napi_ok) {
    free(entries);
    return NULL;
  }
  memcpy(addr_data, entries, count * 8);
  free(entries);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  int memfd = open(path, O_RDONLY | O_CLOEXEC);
  int err = read_pages_batched(pid, memfd, addr_data, count, page_data);
  if (memfd >= 0) close(memfd);
  if (err != 0) return throw_errno(env, err, "process_vm_readv", "copy the private pages of pid %d", pid);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, count, ab, 0, &addrs));
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "addresses", addrs);
  set_prop(env, out, "data", pages);
  return out;
}

/* readRanges(pid, ranges: BigUint64Array [start, end, …]) -> { addresses, data }
 * Every page of the ranges, read from the process with process_vm_readv (one
 * remote iovec per range, not per page: a dirty set of a few thousand runs is
 * read in a few calls), in order. A page that cannot be read (unmapped
 * meanwhile, or PROT_NONE and /proc/PID/mem refuses it too) is left out. A
 * page never populated reads as zeros: the store elides it. */
#define READ_IOV_MAX 1024

static napi_value js_read_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  const uint64_t *ranges;
  size_t nranges;
  if (argc < 2 || !arg_int32(env, argv[0], &pid) || !arg_u64_groups(env, argv[1], 2, &ranges, &nranges))
    return throw_type(env, "readRanges(pid, ranges: BigUint64Array of start, end pairs)");
  size_t total = 0;
  for (size_t r = 0; r < nranges; r++) {
    uint64_t start = ranges[2 * r], end = ranges[2 * r + 1];
    if (end <= start || (start & 4095) || (end & 4095)) return throw_type(env, "readRanges: each range must be page-aligned with start < end");
    total += (end - start) / 4096;
  }
  void *data, *addr_data;
  napi_value buffer, ab, addrs, out;
  NAPI_CALL(env, napi_create_buffer(env, total * 4096, &data, &buffer));
  uint64_t *addresses = malloc((total ? total : 1) * sizeof(uint64_t));
  uint8_t *ok = malloc(total ? total : 1);
  if (addresses == NULL || ok == NULL) {
    free(addresses);
    free(ok);
    return throw_errno(env, ENOMEM, "malloc", "readRanges");
  }
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  int memfd = open(path, O_RDONLY | O_CLOEXEC);
  struct iovec remote[READ_IOV_MAX];
  size_t page = 0;
  for (size_t first = 0; first < nranges; first += READ_IOV_MAX) {
    size_t n = nranges - first < READ_IOV_MAX ? nranges - first : READ_IOV_MAX;
    size_t bytes = 0, call_first_page = page;
    for (size_t k = 0; k < n; k++) {
      uint64_t start = ranges[2 * (first + k)], end = ranges[2 * (first + k) + 1];
      remote[k] = (struct iovec){(void *)(uintptr_t)start, end - start};
      for (uint64_t a = start; a < end; a += 4096) addresses[page++] = a;
      bytes += end - start;
    }
    struct iovec local = {(uint8_t *)data + call_first_page * 4096, bytes};
    ssize_t got = process_vm_readv(pid, &local, 1, remote, n, 0);
    if (got < 0 && errno == ESRCH) {
      if (memfd >= 0) close(memfd);
      free(addresses);
      free(ok);
      return throw_errno(env, ESRCH, "process_vm_readv", "read pid %d", pid);
    }
    size_t done = got > 0 ? (size_t)got / 4096 : 0;
    for (size_t i = call_first_page; i < page; i++) {
      ok[i] = i - call_first_page < done || remote_read(pid, memfd, addresses[i], (uint8_t *)data + i * 4096, 4096) == 0;
    }
  }
  if (memfd >= 0) close(memfd);
  /* Leave out what could not be read. */
  size_t kept = 0;
  for (size_t i = 0; i < total; i++) {
    if (!ok[i]) continue;
    if (kept != i) {
      addresses[kept] = addresses[i];
      memmove((uint8_t *)data + kept * 4096, (uint8_t *)data + i * 4096, 4096);
    }
    kept++;
  }
  free(ok);
  NAPI_CALL(env, napi_create_arraybuffer(env, kept * 8, &addr_data, &ab));
  memcpy(addr_data, addresses, kept * 8);
  free(addresses);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, kept, ab, 0, &addrs));
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "addresses", addrs);
  set_prop(env, out, "data", buffer);
  set_prop(env, out, "pages", make_double(env, (double)kept));
  return out;
}

/* probePagemapScan() -> 0 if the PAGEMAP_SCAN ioctl works on /proc/self/pagemap, else the errno. */
static napi_value js_probe_pagemap_scan(napi_env env, napi_callback_info info) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return make_int(env, errno);
  static char page[4096] __attribute__((aligned(4096)));
  page[0] = 1;
  struct wpsnap_page_region regions[4];
  struct wpsnap_pm_scan_arg arg = {
      .size = sizeof arg,
      .start = (uint64_t)(uintptr_t)page,
      .end = (uint64_t)(uintptr_t)page + 4096,
      .vec = (uint64_t)(uintptr_t)regions,
      .vec_len = 4,
      .category_anyof_mask = PAGE_IS_PRESENT,
      .return_mask = PAGE_IS_PRESENT,
  };
  /* SAFETY: read-only scan of one page of our own memory. */
  int rc = ioctl(fd, PAGEMAP_SCAN, &arg);
  int err = rc < 0 ? errno : 0;
  close(fd);
  return make_int(env, err);
}

/* See addon.h. Only a full vector leaves the rest of the range unwalked: the
 * scan goes on from the later of walk_end and the last run returned, because
 * walk_end can come back below runs already returned once more than 512 were
 * found (seen on 6.18), and walking them again would report them twice. */
#define SCAN_VEC 1024

int page_runs_push(page_runs_t *runs, uint64_t start, uint64_t end) {
  if (runs->n == runs->cap) {
    size_t cap = runs->cap ? runs->cap * 2 : 64;
    uint64_t *grown = realloc(runs->pairs, cap * 2 * sizeof(uint64_t));
    if (grown == NULL) return ENOMEM;
    runs->pairs = grown;
    runs->cap = cap;
  }
  runs->pairs[2 * runs->n] = start;
  runs->pairs[2 * runs->n + 1] = end;
  runs->n++;
  return 0;
}

int pagemap_scan_runs(int fd, uint64_t start, uint64_t end, const struct wpsnap_pm_scan_arg *query, page_runs_t *runs) {
  struct wpsnap_page_region vec[SCAN_VEC];
  size_t first = runs->n;
  uint64_t at = start;
  while (at < end) {
    struct wpsnap_pm_scan_arg arg = *query;
    arg.size = sizeof arg;
    arg.start = at;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = SCAN_VEC;
    /* SAFETY: the kernel walks the target's page tables and writes at most vec_len regions to vec. */
    int got = ioctl(fd, PAGEMAP_SCAN, &arg);
    if (got < 0) return errno;
    for (int i = 0; i < got; i++) {
      /* Runs of different categories come back as separate regions: merge the adjacent ones. */
      if (runs->n > first && runs->pairs[2 * runs->n - 1] == vec[i].start) {
        runs->pairs[2 * runs->n - 1] = vec[i].end;
        continue;
      }
      if (page_runs_push(runs, vec[i].start, vec[i].end) != 0) return ENOMEM;
    }
    if ((uint64_t)got < SCAN_VEC) break;
    uint64_t next = arg.walk_end > vec[got - 1].end ? arg.walk_end : vec[got - 1].end;
    if (next <= at) break; /* no progress: never loop forever */
    at = next;
  }
  return 0;
}

/* populatedRanges(pid, ranges: BigUint64Array [start, end, …])
 *   -> { counts: Uint32Array (per range), ranges: BigUint64Array [start, end, …] }
 * The runs of pages that are present or swapped in each range, from one
 * PAGEMAP_SCAN walk (which skips empty page tables, so a mostly untouched
 * reservation costs microseconds). Everything outside the runs is
 * pte_none: never touched, zero. */
static napi_value js_populated_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  const uint64_t *in;
  size_t n;
  if (argc < 2 || !arg_int32(env, argv[0], &pid) || !arg_u64_groups(env, argv[1], 2, &in, &n))
    return throw_type(env, "populatedRanges(pid, ranges: BigUint64Array of start, end pairs)");
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
  int pm = open(path, O_RDONLY | O_CLOEXEC);
  if (pm < 0) return throw_errno(env, errno, "open", "open(%s)", path);
  page_runs_t runs = {0};
  uint32_t *counts = calloc(n ? n : 1, sizeof *counts);
  int err = counts ? 0 : ENOMEM;
  const struct wpsnap_pm_scan_arg query = {.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED, .return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED};
  for (size_t r = 0; r < n && err == 0; r++) {
    size_t before = runs.n;
    /* SAFETY: a read-only walk of the target's page tables. */
    err = pagemap_scan_runs(pm, in[2 * r], in[2 * r + 1], &query, &runs);
    counts[r] = (uint32_t)(runs.n - before);
  }
  close(pm);
  uint64_t *out = runs.pairs;
  size_t used = runs.n;
  if (err != 0) {
    free(out);
    free(counts);
    return throw_errno(env, err, "ioctl", "ioctl(PAGEMAP_SCAN) on %s", path);
  }
  void *ranges_data, *counts_data;
  napi_value ranges_ab, counts_ab, ranges_arr, counts_arr, result;
  NAPI_CALL(env, napi_create_arraybuffer(env, used * 16, &ranges_data, &ranges_ab));
  NAPI_CALL(env, napi_create_arraybuffer(env, n * 4, &counts_data, &counts_ab));
  memcpy(ranges_data, out, used * 16);
  memcpy(counts_data, counts, n * 4);
  free(out);
  free(counts);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, used * 2, ranges_ab, 0, &ranges_arr));
  NAPI_CALL(env, napi_create_typedarray(env, napi_uint32_array, n, counts_ab, 0, &counts_arr));
  NAPI_CALL(env, napi_create_object(env, &result));
  set_prop(env, result, "counts", counts_arr);
  set_prop(env, result, "ranges", ranges_arr);
  return result;
}

void register_pagemap_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"readPagemap", NULL, js_read_pagemap, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"countPrivatePages", NULL, js_count_private_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"copyPrivatePages", NULL, js_copy_private_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"readRanges", NULL, js_read_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"probePagemapScan", NULL, js_probe_pagemap_scan, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"populatedRanges", NULL, js_populated_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"zeroPagePfn", NULL, js_zero_page_pfn, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
