/* The data pages of shared files (SysV segments, shmem) copied whole in the
 * pause, holes skipped. */
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
  if (want == NULL) return throw_errno(env, ENOMEM, "calloc", "copy %zu shared pages", npages);
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

void register_file_pages_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"copyFilePages", NULL, js_copy_file_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
