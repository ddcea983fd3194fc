/* The target's memory and fds from outside: process_vm_readv, pidfd_open and
 * pidfd_getfd, close, and the device node a non-root target opens. */
#include <sys/socket.h>
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
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

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

/* peerCredentials(fd) -> {pid, uid, gid}: SO_PEERCRED of a connected unix
 * socket (Node has no API for it): who is on the other end of a keeper's
 * control socket. */
static napi_value js_peer_credentials(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  if (argc < 1 || !arg_int32(env, argv[0], &fd)) return throw_type(env, "peerCredentials(fd)");
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, errno, "getsockopt", "getsockopt(%d, SO_PEERCRED)", fd);
  napi_value o;
  NAPI_CALL(env, napi_create_object(env, &o));
  set_prop(env, o, "pid", make_int(env, (int32_t)cred.pid));
  set_prop(env, o, "uid", make_double(env, (double)cred.uid));
  set_prop(env, o, "gid", make_double(env, (double)cred.gid));
  return o;
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

void register_procmem_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"pidfdOpen", NULL, js_pidfd_open, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"pidfdGetfd", NULL, js_pidfd_getfd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"peerCredentials", NULL, js_peer_credentials, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"closeFd", NULL, js_close_fd, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"processVmRead", NULL, js_process_vm_read, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"mknodDevice", NULL, js_mknod_device, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
