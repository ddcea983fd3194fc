/* UFFDIO_WRITEPROTECT over many ranges at once, spread over the CPUs while
 * the target is stopped (uffdWriteProtectRanges). */
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

/* Write-protecting populated 4 KiB pages costs ~20 ms per GiB in one ioctl,
 * all of it while the target is stopped. The ioctl takes mmap_lock for reading
 * only, so disjoint pieces protect in parallel: the ranges are cut into one
 * share per online CPU (at 2 MiB boundaries, so two threads never take the
 * same page-table lock) and each share runs on its own thread. */
#define WP_PARALLEL_MIN_BYTES (64ull << 20)
#define WP_MAX_THREADS 8
#define WP_PIECE_ALIGN (2ull << 20)

struct wp_piece {
  uint64_t start, len;
};

struct wp_share {
  int uffd;
  bool protect;
  struct wp_piece *pieces;
  size_t count;
  int err;             /* first errno, 0 if every piece succeeded */
  struct wp_piece failed;
};

static void *wp_share_run(void *arg) {
  struct wp_share *share = arg;
  for (size_t i = 0; i < share->count; i++) {
    int err = uffd_writeprotect(share->uffd, share->pieces[i].start, share->pieces[i].len, share->protect);
    if (err != 0) {
      share->err = err;
      share->failed = share->pieces[i];
      break;
    }
  }
  return NULL;
}

/* Cut `ranges` (n pairs of start, len) into at most `threads` shares of about
 * equal bytes. pieces must hold n + threads entries (each cut adds one). */
static size_t wp_split(const uint64_t *ranges, size_t n, unsigned threads, struct wp_piece *pieces,
                       struct wp_share *shares) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) total += ranges[2 * i + 1];
  uint64_t quota = (total + threads - 1) / threads;
  size_t used = 0, share = 0;
  uint64_t in_share = 0;
  shares[0].pieces = pieces;
  shares[0].count = 0;
  for (size_t i = 0; i < n; i++) {
    uint64_t start = ranges[2 * i], len = ranges[2 * i + 1];
    while (len > 0) {
      uint64_t take = len;
      if (share + 1 < threads && in_share + take > quota) {
        /* Cut at a 2 MiB boundary past the quota, inside this range. */
        uint64_t want = start + (quota - in_share);
        uint64_t cut = (want + WP_PIECE_ALIGN - 1) & ~(WP_PIECE_ALIGN - 1);
        take = cut < start + len ? cut - start : len;
      }
      if (take > 0) {
        pieces[used++] = (struct wp_piece){start, take};
        shares[share].count++;
        in_share += take;
        start += take;
        len -= take;
      }
      if (share + 1 < threads && in_share >= quota) {
        share++;
        shares[share].pieces = pieces + used;
        shares[share].count = 0;
        in_share = 0;
      }
    }
  }
  return share + 1;
}

/* uffdWriteProtectRanges(fd, ranges: BigUint64Array [start, len, …], protect)
 * -> undefined; throws naming the first range piece the kernel refused. */
static napi_value js_uffd_writeprotect_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  bool protect;
  const uint64_t *ranges;
  size_t n;
  if (argc < 3 || !arg_int32(env, argv[0], &fd) || !arg_u64_groups(env, argv[1], 2, &ranges, &n) ||
      !arg_bool(env, argv[2], &protect))
    return throw_type(env, "uffdWriteProtectRanges(fd, ranges: BigUint64Array of start, len pairs, protect)");
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) total += ranges[2 * i + 1];
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  unsigned threads = total < WP_PARALLEL_MIN_BYTES || cpus < 2 ? 1 : (unsigned)(cpus < WP_MAX_THREADS ? cpus : WP_MAX_THREADS);
  struct wp_piece *pieces = calloc(n + threads, sizeof *pieces);
  struct wp_share shares[WP_MAX_THREADS] = {0};
  if (pieces == NULL) return throw_errno(env, ENOMEM, "calloc", "write-protect %zu ranges", n);
  size_t used = n == 0 ? 0 : wp_split(ranges, n, threads, pieces, shares);
  pthread_t tids[WP_MAX_THREADS];
  bool started[WP_MAX_THREADS] = {false};
  for (size_t i = 0; i < used; i++) {
    shares[i].uffd = fd;
    shares[i].protect = protect;
    /* Share 0 runs here; if a thread cannot start, its share runs here too. */
    if (i > 0 && pthread_create(&tids[i], NULL, wp_share_run, &shares[i]) == 0) started[i] = true;
  }
  for (size_t i = 0; i < used; i++)
    if (!started[i]) wp_share_run(&shares[i]);
  for (size_t i = 1; i < used; i++)
    if (started[i]) pthread_join(tids[i], NULL);
  for (size_t i = 0; i < used; i++) {
    if (shares[i].err == 0) continue;
    struct wp_piece failed = shares[i].failed;
    int err = shares[i].err;
    free(pieces);
    return throw_errno(env, err, "ioctl", "ioctl(UFFDIO_WRITEPROTECT, 0x%llx-0x%llx, %s)",
                       (unsigned long long)failed.start, (unsigned long long)(failed.start + failed.len),
                       protect ? "WP" : "0");
  }
  free(pieces);
  return NULL;
}

void register_protect_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"uffdWriteProtectRanges", NULL, js_uffd_writeprotect_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
