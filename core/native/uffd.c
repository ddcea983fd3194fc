/* userfaultfd, pidfd and remote-memory calls exposed to JS. Every ioctl here
 * acts on the mm the userfaultfd was created in (the target's), whichever
 * process holds the fd. */
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

int uffd_writeprotect(int uffd, uint64_t start, uint64_t len, bool protect) {
  struct uffdio_writeprotect wp = {
      .range = {.start = start, .len = len},
      .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
  };
  /* SAFETY: the kernel validates the range against the context's registered
   * vmas; mode 0 also wakes threads blocked on a wp fault in the range. */
  return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

int uffd_wake(int uffd, uint64_t start, uint64_t len) {
  struct uffdio_range range = {.start = start, .len = len};
  return ioctl(uffd, UFFDIO_WAKE, &range) == 0 ? 0 : errno;
}

/* process_vm_readv of [addr, addr+len); falls back to /proc/PID/mem (FOLL_FORCE
 * reads PROT_NONE pages). Returns 0 or an errno. */
int remote_read(pid_t pid, int memfd, uint64_t addr, void *dst, size_t len) {
  struct iovec local = {.iov_base = dst, .iov_len = len};
  struct iovec remote = {.iov_base = (void *)(uintptr_t)addr, .iov_len = len};
  ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n == (ssize_t)len) return 0;
  int err = n < 0 ? errno : EFAULT;
  if (err == ESRCH || memfd < 0) return err;
  size_t done = n > 0 ? (size_t)n : 0;
  while (done < len) {
    ssize_t m = pread(memfd, (char *)dst + done, len - done, (off_t)(addr + done));
    if (m < 0) {
      if (errno == EINTR) continue;
      return errno == EIO ? EFAULT : errno;
    }
    if (m == 0) return EFAULT;
    done += (size_t)m;
  }
  return 0;
}

int read_pagemap(int pagemap_fd, uint64_t addr, size_t npages, uint64_t *out) {
  size_t want = npages * sizeof(uint64_t), done = 0;
  while (done < want) {
    ssize_t n = pread(pagemap_fd, (char *)out + done, want - done, (off_t)((addr / 4096) * 8 + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += (size_t)n;
  }
  return 0;
}

/* uffdApi(fd, features: bigint) -> { features: bigint, ioctls: bigint } */
static napi_value js_uffd_api(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  uint64_t features;
  if (argc < 2 || !arg_int32(env, argv[0], &fd) || !arg_uint64(env, argv[1], &features))
    return throw_type(env, "uffdApi(fd, features)");
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  /* SAFETY: first ioctl on a new context; the kernel fails with EINVAL if a
   * requested feature is unknown and EPERM for privileged ones. */
  if (ioctl(fd, UFFDIO_API, &api) != 0)
    return throw_errno(env, errno, "ioctl", "ioctl(UFFDIO_API, features=0x%llx)", (unsigned long long)features);
  napi_value out;
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "features", make_bigint(env, api.features));
  set_prop(env, out, "ioctls", make_bigint(env, api.ioctls));
  return out;
}

/* uffdRegister(fd, start, len, mode) -> ioctls: bigint */
static napi_value js_uffd_register(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  uint64_t start, len, mode;
  if (argc < 4 || !arg_int32(env, argv[0], &fd) || !arg_uint64(env, argv[1], &start) ||
      !arg_uint64(env, argv[2], &len) || !arg_uint64(env, argv[3], &mode))
    return throw_type(env, "uffdRegister(fd, start, len, mode)");
  struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
  /* SAFETY: registers whole vmas of the context's mm; EINVAL if a vma in the
   * range cannot be registered (not anon/shmem/hugetlb, or misaligned). */
  if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
    return throw_errno(env, errno, "ioctl", "ioctl(UFFDIO_REGISTER, 0x%llx-0x%llx)",
                       (unsigned long long)start, (unsigned long long)(start + len));
  return make_bigint(env, reg.ioctls);
}

static napi_value js_uffd_unregister(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  uint64_t start, len;
  if (argc < 3 || !arg_int32(env, argv[0], &fd) || !arg_uint64(env, argv[1], &start) || !arg_uint64(env, argv[2], &len))
    return throw_type(env, "uffdUnregister(fd, start, len)");
  struct uffdio_range range = {.start = start, .len = len};
  if (ioctl(fd, UFFDIO_UNREGISTER, &range) != 0)
    return throw_errno(env, errno, "ioctl", "ioctl(UFFDIO_UNREGISTER, 0x%llx-0x%llx)",
                       (unsigned long long)start, (unsigned long long)(start + len));
  return NULL;
}

static napi_value js_uffd_writeprotect(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  uint64_t start, len;
  bool protect;
  if (argc < 4 || !arg_int32(env, argv[0], &fd) || !arg_uint64(env, argv[1], &start) ||
      !arg_uint64(env, argv[2], &len) || !arg_bool(env, argv[3], &protect))
    return throw_type(env, "uffdWriteProtect(fd, start, len, protect)");
  int err = uffd_writeprotect(fd, start, len, protect);
  if (err != 0)
    return throw_errno(env, err, "ioctl", "ioctl(UFFDIO_WRITEPROTECT, 0x%llx-0x%llx, %s)",
                       (unsigned long long)start, (unsigned long long)(start + len), protect ? "WP" : "0");
  return NULL;
}

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

/* probeUffd() -> { features, ioctls } of a context in this process: what the kernel offers. */
static napi_value js_probe_uffd(napi_env env, napi_callback_info info) {
  int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return throw_errno(env, errno, "userfaultfd", "userfaultfd(O_CLOEXEC|O_NONBLOCK)");
  struct uffdio_api api = {.api = UFFD_API, .features = 0};
  int rc = ioctl(fd, UFFDIO_API, &api);
  int err = errno;
  close(fd);
  if (rc != 0) return throw_errno(env, err, "ioctl", "ioctl(UFFDIO_API)");
  napi_value out;
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "features", make_bigint(env, api.features));
  set_prop(env, out, "ioctls", make_bigint(env, api.ioctls));
  return out;
}

static napi_value js_pidfd_open(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  if (argc < 1 || !arg_int32(env, argv[0], &pid)) return throw_type(env, "pidfdOpen(pid)");
  int fd = (int)syscall(__NR_pidfd_open, pid, 0);
  if (fd < 0) return throw_errno(env, errno, "pidfd_open", "pidfd_open(%d)", pid);
  return make_int(env, fd);
}

int pidfd_getfd_call(int pidfd, int targetfd) {
  return (int)syscall(__NR_pidfd_getfd, pidfd, targetfd, 0);
}

static napi_value js_pidfd_getfd(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pidfd, targetfd;
  if (argc < 2 || !arg_int32(env, argv[0], &pidfd) || !arg_int32(env, argv[1], &targetfd))
    return throw_type(env, "pidfdGetfd(pidfd, targetfd)");
  int fd = pidfd_getfd_call(pidfd, targetfd);
  if (fd < 0) return throw_errno(env, errno, "pidfd_getfd", "pidfd_getfd(fd %d)", targetfd);
  return make_int(env, fd);
}

static napi_value js_close_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  if (argc < 1 || !arg_int32(env, argv[0], &fd)) return throw_type(env, "closeFd(fd)");
  if (close(fd) != 0) return throw_errno(env, errno, "close", "close(%d)", fd);
  return NULL;
}

/* processVmRead(pid, address, length) -> Buffer */
static napi_value js_process_vm_read(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  uint64_t addr, len;
  if (argc < 3 || !arg_int32(env, argv[0], &pid) || !arg_uint64(env, argv[1], &addr) || !arg_uint64(env, argv[2], &len) ||
      len > (1ULL << 30))
    return throw_type(env, "processVmRead(pid, address, length <= 1 GiB)");
  void *data;
  napi_value buf;
  NAPI_CALL(env, napi_create_buffer(env, len, &data, &buf));
  int err = remote_read(pid, -1, addr, data, len);
  if (err != 0) return throw_errno(env, err, "process_vm_readv", "process_vm_readv(pid %d, 0x%llx, %llu bytes)", pid,
                                   (unsigned long long)addr, (unsigned long long)len);
  return buf;
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

/* mknodDevice(path, mode, rdev): create a character device node (root only). */
static napi_value js_mknod_device(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  char path[512];
  size_t len;
  int32_t mode;
  uint64_t rdev;
  if (argc < 3 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok || len >= sizeof path - 1 ||
      !arg_int32(env, argv[1], &mode) || !arg_uint64(env, argv[2], &rdev))
    return throw_type(env, "mknodDevice(path, mode, rdev)");
  if (mknod(path, S_IFCHR | (mode & 07777), (dev_t)rdev) != 0) return throw_errno(env, errno, "mknod", "mknod(%s)", path);
  return NULL;
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

/* populatedRanges(pid, ranges: BigUint64Array [start, end, …])
 *   -> { counts: Uint32Array (per range), ranges: BigUint64Array [start, end, …] }
 * The runs of pages that are present or swapped in each range, from one
 * PAGEMAP_SCAN walk (which skips empty page tables, so a mostly untouched
 * reservation costs microseconds). Everything outside the runs is
 * pte_none: never touched, zero. */
#define SCAN_VEC 1024

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
  size_t cap = 256, used = 0;
  uint64_t *out = malloc(cap * 2 * sizeof *out);
  uint32_t *counts = calloc(n ? n : 1, sizeof *counts);
  struct wpsnap_page_region *vec = malloc(SCAN_VEC * sizeof *vec);
  int err = (out && counts && vec) ? 0 : ENOMEM;
  for (size_t r = 0; r < n && err == 0; r++) {
    uint64_t at = in[2 * r], end = in[2 * r + 1];
    while (at < end && err == 0) {
      struct wpsnap_pm_scan_arg arg = {
          .size = sizeof arg,
          .start = at,
          .end = end,
          .vec = (uint64_t)(uintptr_t)vec,
          .vec_len = SCAN_VEC,
          .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
          .return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
      };
      /* SAFETY: a read-only walk of the target's page tables. */
      int got = ioctl(pm, PAGEMAP_SCAN, &arg);
      if (got < 0) {
        err = errno;
        break;
      }
      for (int i = 0; i < got; i++) {
        /* Present and swapped runs come back as separate regions: merge the adjacent ones. */
        if (counts[r] > 0 && out[2 * used - 1] == vec[i].start) {
          out[2 * used - 1] = vec[i].end;
          continue;
        }
        if (used == cap) {
          uint64_t *grown = realloc(out, cap * 4 * sizeof *out);
          if (grown == NULL) {
            err = ENOMEM;
            break;
          }
          out = grown;
          cap *= 2;
        }
        out[2 * used] = vec[i].start;
        out[2 * used + 1] = vec[i].end;
        used++;
        counts[r]++;
      }
      if (arg.walk_end <= at) break; /* no progress: should not happen */
      at = arg.walk_end;
    }
  }
  close(pm);
  free(vec);
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

/* copyFilePages(fd, fileOffset, length, address) -> { addresses, data }
 * Reads the data (non-hole) pages of [fileOffset, fileOffset+length) of a
 * shared file (shmem, hugetlbfs, SysV segment) with pread, labelled with the
 * address they are mapped at. Used while the target is stopped for shared
 * memory that uffd-wp cannot guard (other processes write it too). */
static napi_value js_copy_file_pages(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  uint64_t file_off, len, addr;
  if (argc < 4 || !arg_int32(env, argv[0], &fd) || !arg_uint64(env, argv[1], &file_off) || !arg_uint64(env, argv[2], &len) ||
      !arg_uint64(env, argv[3], &addr) || (len & 4095) || (addr & 4095) || (file_off & 4095))
    return throw_type(env, "copyFilePages(fd, fileOffset, length, address), page aligned");
  size_t npages = len / 4096;
  /* Which pages hold data: walk SEEK_DATA/SEEK_HOLE. */
  uint8_t *want = calloc(npages ? npages : 1, 1);
  size_t count = 0;
  off_t pos = (off_t)file_off, end = (off_t)(file_off + len);
  while (pos < end) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0 || data >= end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    for (off_t p = data & ~(off_t)4095; p < hole; p += 4096) {
      size_t i = (size_t)(p - (off_t)file_off) / 4096;
      if (!want[i]) {
        want[i] = 1;
        count++;
      }
    }
    pos = hole;
  }
  void *addr_data, *page_data;
  napi_value ab, addrs, pages, out;
  if (napi_create_arraybuffer(env, count * 8, &addr_data, &ab) != napi_ok ||
      napi_create_buffer(env, count * 4096, &page_data, &pages) != napi_ok) {
    free(want);
    return NULL;
  }
  size_t k = 0;
  for (size_t i = 0; i < npages; i++) {
    if (!want[i]) continue;
    ((uint64_t *)addr_data)[k] = addr + i * 4096;
    size_t done = 0;
    while (done < 4096) {
      ssize_t n = pread(fd, (char *)page_data + k * 4096 + done, 4096 - done, (off_t)(file_off + i * 4096 + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        int err = errno;
        free(want);
        return throw_errno(env, err, "pread", "read shared page at file offset 0x%llx", (unsigned long long)(file_off + i * 4096));
      }
      if (n == 0) { /* beyond the end of the file: zero */
        memset((char *)page_data + k * 4096 + done, 0, 4096 - done);
        break;
      }
      done += (size_t)n;
    }
    k++;
  }
  free(want);
  NAPI_CALL(env, napi_create_typedarray(env, napi_biguint64_array, count, ab, 0, &addrs));
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "addresses", addrs);
  set_prop(env, out, "data", pages);
  return out;
}

void register_uffd_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"uffdApi", NULL, js_uffd_api, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdRegister", NULL, js_uffd_register, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdUnregister", NULL, js_uffd_unregister, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdWriteProtect", NULL, js_uffd_writeprotect, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdWriteProtectRanges", NULL, js_uffd_writeprotect_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"probeUffd", NULL, js_probe_uffd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"pidfdOpen", NULL, js_pidfd_open, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"pidfdGetfd", NULL, js_pidfd_getfd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"closeFd", NULL, js_close_fd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"processVmRead", NULL, js_process_vm_read, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"readPagemap", NULL, js_read_pagemap, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"mknodDevice", NULL, js_mknod_device, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"probePagemapScan", NULL, js_probe_pagemap_scan, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"copyFilePages", NULL, js_copy_file_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"copyPrivatePages", NULL, js_copy_private_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"countPrivatePages", NULL, js_count_private_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"populatedRanges", NULL, js_populated_ranges, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
