/* userfaultfd ioctls exposed to JS and used by the engine. Every ioctl here
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

void register_uffd_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"uffdApi", NULL, js_uffd_api, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdRegister", NULL, js_uffd_register, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdUnregister", NULL, js_uffd_unregister, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"uffdWriteProtect", NULL, js_uffd_writeprotect, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"probeUffd", NULL, js_probe_uffd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
