/* socketOptions: the options of a target's socket a restore sets again (a
 * copy of the fd taken with pidfd_getfd, getsockopt on it, closed).
 *
 * peekPipe: the bytes a target's pipe holds, read without taking them (a
 * snapshot records a self-pipe's content for a restore, during the pause):
 * a copy of the target's read end (pidfd_getfd), tee(2) into a pipe of our
 * own (tee duplicates, it does not consume), read from ours. */
#include "addon.h"
#include "napi_util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* The (pidfd, fd) arguments: a copy of the target's fd in this process, or -1 with a JS exception pending. */
static int target_fd_copy(napi_env env, napi_callback_info info, const char *usage, int32_t *target_fd) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return -1;
  int32_t pidfd;
  if (argc < 2 || !arg_int32(env, argv[0], &pidfd) || !arg_int32(env, argv[1], target_fd)) {
    throw_type(env, usage);
    return -1;
  }
  int fd = pidfd_getfd_call(pidfd, *target_fd);
  if (fd < 0) throw_errno(env, errno, "pidfd_getfd", "pidfd_getfd(fd %d)", *target_fd);
  return fd;
}

static napi_value js_peek_pipe(napi_env env, napi_callback_info info) {
  int32_t target_fd;
  int fd = target_fd_copy(env, info, "peekPipe(pidfd, fd)", &target_fd);
  if (fd < 0) return NULL;
  int held = 0;
  if (ioctl(fd, FIONREAD, &held) != 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, err, "ioctl", "ioctl(FIONREAD) on the pipe at fd %d", target_fd);
  }
  if (held <= 0) {
    close(fd);
    return make_buffer_copy(env, "", 0);
  }
  int copy[2];
  if (pipe2(copy, O_CLOEXEC | O_NONBLOCK) != 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, err, "pipe2", "a pipe to copy fd %d into", target_fd);
  }
  if (held > 65536) fcntl(copy[1], F_SETPIPE_SZ, held);
  char *data = malloc((size_t)held);
  ssize_t got = data == NULL ? -1 : tee(fd, copy[1], (size_t)held, SPLICE_F_NONBLOCK);
  int err = got < 0 ? (data == NULL ? ENOMEM : errno) : 0;
  size_t have = 0;
  while (err == 0 && have < (size_t)got) {
    ssize_t n = read(copy[0], data + have, (size_t)got - have);
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    have += (size_t)n;
  }
  close(copy[0]);
  close(copy[1]);
  close(fd);
  napi_value out = err == 0 ? make_buffer_copy(env, data, have) : throw_errno(env, err, "tee", "copy the bytes of the pipe at fd %d", target_fd);
  free(data);
  return out;
}

static int int_option(int fd, int level, int name) {
  int value = 0;
  socklen_t len = sizeof value;
  return getsockopt(fd, level, name, &value, &len) == 0 ? value : -1;
}

static napi_value js_socket_options(napi_env env, napi_callback_info info) {
  int32_t target_fd;
  int fd = target_fd_copy(env, info, "socketOptions(pidfd, fd)", &target_fd);
  if (fd < 0) return NULL;
  int domain = int_option(fd, SOL_SOCKET, SO_DOMAIN);
  int type = int_option(fd, SOL_SOCKET, SO_TYPE);
  napi_value out;
  napi_create_object(env, &out);
  set_prop(env, out, "reuseAddr", make_int(env, int_option(fd, SOL_SOCKET, SO_REUSEADDR)));
  set_prop(env, out, "reusePort", make_int(env, int_option(fd, SOL_SOCKET, SO_REUSEPORT)));
  set_prop(env, out, "keepAlive", make_int(env, int_option(fd, SOL_SOCKET, SO_KEEPALIVE)));
  if (domain == AF_INET6) set_prop(env, out, "v6Only", make_int(env, int_option(fd, IPPROTO_IPV6, IPV6_V6ONLY)));
  if ((domain == AF_INET || domain == AF_INET6) && type == SOCK_STREAM) set_prop(env, out, "noDelay", make_int(env, int_option(fd, IPPROTO_TCP, TCP_NODELAY)));
  close(fd);
  return out;
}

void register_pipe_peek_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"socketOptions", NULL, js_socket_options, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"peekPipe", NULL, js_peek_pipe, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
