/* The controller's end of the agent socket (snapshot-format/FORMAT.md, "The agent protocol";
 * the agent is agent/wpsnap_agent.c, whose header defines the wire format).
 *
 * agentListen   a unix socket 0600 in a private directory (0700, ours)
 * agentAccept   one connection within a timeout, with its SO_PEERCRED
 * agentSend     one message, within a timeout
 * agentReceive  one message within a timeout, and the fd it carried (SCM_RIGHTS)
 * Every wait is a poll with a deadline: a stuck agent fails a call, it never
 * hangs wpsnap. */
#include "addon.h"
#include "napi_util.h"
#include "../../agent/wpsnap_agent.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* poll one fd for events until deadline: 0, ETIMEDOUT or an errno. */
static int wait_fd(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left < 0) left = 0;
    struct pollfd p = {.fd = fd, .events = events};
    int n = poll(&p, 1, (int)(left > INT32_MAX ? INT32_MAX : left));
    if (n > 0) return 0;
    if (n == 0) return ETIMEDOUT;
    if (errno != EINTR) return errno;
  }
}

static bool arg_string(napi_env env, napi_value v, char *out, size_t cap) {
  size_t len;
  return napi_get_value_string_utf8(env, v, out, cap, &len) == napi_ok && len + 1 < cap;
}

/* The socket's directory: made 0700 if missing; refused unless ours and
 * private. false with a JS exception pending. */
static bool check_directory(napi_env env, const char *path) {
  char copy[sizeof(((struct sockaddr_un *)0)->sun_path)];
  memcpy(copy, path, strlen(path) + 1);
  const char *dir = dirname(copy);
  struct stat st;
  if (mkdir(dir, 0700) == 0 && chmod(dir, 0700) != 0) throw_errno(env, errno, "chmod", "chmod 0700 %s", dir);
  else if (lstat(dir, &st) != 0) throw_errno(env, errno, "lstat", "the socket's directory %s", dir);
  else if (!S_ISDIR(st.st_mode)) throw_errno(env, ENOTDIR, "lstat", "the socket's directory %s is not a directory", dir);
  else if (st.st_uid != geteuid() || (st.st_mode & 077) != 0)
    throw_errno(env, EACCES, "lstat", "the socket's directory %s must be private to uid %u (mode 0700), it is uid %u mode %04o", dir,
                (unsigned)geteuid(), (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
  else return true;
  return false;
}

/* agentListen(path): the listening fd (non-blocking, close-on-exec). */
static napi_value js_agent_listen(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (argc < 1 || !arg_string(env, argv[0], addr.sun_path, sizeof addr.sun_path) || addr.sun_path[0] == '\0')
    return throw_type(env, "agentListen(path): a socket path of 1 to 106 bytes");
  const char *path = addr.sun_path;
  if (!check_directory(env, path)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return throw_errno(env, errno, "socket", "socket(AF_UNIX)");
  struct stat st;
  if (lstat(path, &st) == 0) {
    /* A socket no one listens on any more is a dead server's: take its place. */
    int probe = S_ISSOCK(st.st_mode) ? socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) : -1;
    int err = probe < 0 ? EEXIST : connect(probe, (struct sockaddr *)&addr, sizeof addr) == 0 ? EADDRINUSE : errno;
    if (probe >= 0) close(probe);
    if (err != ECONNREFUSED || unlink(path) != 0) {
      close(fd);
      return throw_errno(env, err == ECONNREFUSED ? errno : err, "bind", "%s: %s", path,
                         err == EADDRINUSE ? "a server listens there already" : "exists and is not a dead server's socket");
    }
  }
  /* The directory is private, so no one reaches the socket before its chmod. */
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || chmod(path, 0600) != 0 || listen(fd, 64) != 0) {
    int err = errno;
    close(fd);
    unlink(path);
    return throw_errno(env, err, "bind", "listen on %s", path);
  }
  return make_int(env, fd);
}

/* agentAccept(listenFd, timeoutMs): {fd, pid, uid, gid}, or null when none came in time. */
static napi_value js_agent_accept(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t lfd, timeout;
  if (argc < 2 || !arg_int32(env, argv[0], &lfd) || !arg_int32(env, argv[1], &timeout) || timeout < 0)
    return throw_type(env, "agentAccept(listenFd, timeoutMs)");
  int err = wait_fd(lfd, POLLIN, now_ms() + timeout);
  napi_value out;
  if (err == ETIMEDOUT) {
    NAPI_CALL(env, napi_get_null(env, &out));
    return out;
  }
  if (err != 0) return throw_errno(env, err, "poll", "wait for an agent");
  int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) {
    if (errno == EAGAIN || errno == ECONNABORTED || errno == EINTR) {
      NAPI_CALL(env, napi_get_null(env, &out));
      return out;
    }
    return throw_errno(env, errno, "accept4", "accept an agent");
  }
  /* SO_PEERCRED: who connect()ed, as the kernel recorded it then. */
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    err = errno;
    close(fd);
    return throw_errno(env, err, "getsockopt", "SO_PEERCRED of an agent");
  }
  NAPI_CALL(env, napi_create_object(env, &out));
  set_prop(env, out, "fd", make_int(env, fd));
  set_prop(env, out, "pid", make_int(env, cred.pid));
  set_prop(env, out, "uid", make_int(env, cred.uid));
  set_prop(env, out, "gid", make_int(env, cred.gid));
  return out;
}

static int send_bytes(int fd, const uint8_t *p, size_t len, int64_t deadline) {
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      len -= (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) return errno;
    int err = wait_fd(fd, POLLOUT, deadline);
    if (err != 0) return err;
  }
  return 0;
}

/* agentSend(fd, op, payload, timeoutMs) */
static napi_value js_agent_send(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd, op, timeout;
  void *payload;
  size_t len;
  if (argc < 4 || !arg_int32(env, argv[0], &fd) || !arg_int32(env, argv[1], &op) || !arg_buffer(env, argv[2], &payload, &len) ||
      !arg_int32(env, argv[3], &timeout) || op < 0 || op > 0xffff || len > WPSNAP_AGENT_MAX_PAYLOAD || timeout < 0)
    return throw_type(env, "agentSend(fd, op, payload, timeoutMs)");
  struct wpsnap_agent_header h = {.magic = WPSNAP_AGENT_MAGIC, .version = WPSNAP_AGENT_VERSION, .op = (uint16_t)op, .length = (uint32_t)len};
  int64_t deadline = now_ms() + timeout;
  int err = send_bytes(fd, (const uint8_t *)&h, sizeof h, deadline);
  if (err == 0) err = send_bytes(fd, payload, len, deadline);
  if (err != 0) return throw_errno(env, err, "send", "send message %d to the agent", op);
  return NULL;
}

/* recvmsg of up to len bytes; an fd that comes with them lands in *passed
 * (a second one is closed). 0, ECONNRESET at the end of the stream, or an errno. */
static int recv_bytes(int fd, uint8_t *p, size_t len, int *passed, int64_t deadline) {
  while (len > 0) {
    struct iovec iov = {.iov_base = p, .iov_len = len};
    union {
      char buf[CMSG_SPACE(4 * sizeof(int))];
      struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      int err = wait_fd(fd, POLLIN, deadline);
      if (err != 0) return err;
      continue;
    }
    if (n < 0) return errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; i++) {
        int got;
        memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
        if (*passed < 0) *passed = got;
        else close(got);
      }
    }
    if (n == 0) return ECONNRESET;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* agentReceive(fd, timeoutMs): {op, payload, fd} (fd -1 when the message carried none). */
static napi_value js_agent_receive(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd, timeout;
  if (argc < 2 || !arg_int32(env, argv[0], &fd) || !arg_int32(env, argv[1], &timeout) || timeout < 0)
    return throw_type(env, "agentReceive(fd, timeoutMs)");
  int64_t deadline = now_ms() + timeout;
  int passed = -1;
  struct wpsnap_agent_header h;
  int err = recv_bytes(fd, (uint8_t *)&h, sizeof h, &passed, deadline);
  if (err != 0) {
    if (passed >= 0) close(passed);
    return throw_errno(env, err, "recvmsg", err == ECONNRESET ? "the agent closed the connection" : "receive from the agent");
  }
  /* Checked before anything else is read: a peer cannot make us allocate more. */
  if (h.magic != WPSNAP_AGENT_MAGIC || h.version != WPSNAP_AGENT_VERSION || h.length > WPSNAP_AGENT_MAX_PAYLOAD) {
    if (passed >= 0) close(passed);
    return throw_errno(env, EPROTO, "recvmsg", "not an agent message (magic %#x, version %u, length %u)", h.magic, h.version, h.length);
  }
  uint8_t *payload = malloc(h.length > 0 ? h.length : 1);
  if (payload == NULL) {
    if (passed >= 0) close(passed);
    return throw_errno(env, ENOMEM, "malloc", "a %u-byte agent message", h.length);
  }
  err = recv_bytes(fd, payload, h.length, &passed, deadline);
  if (err != 0) {
    free(payload);
    if (passed >= 0) close(passed);
    return throw_errno(env, err, "recvmsg", err == ECONNRESET ? "the agent closed the connection" : "receive from the agent");
  }
  napi_value out;
  napi_value buffer = make_buffer_copy(env, payload, h.length);
  free(payload);
  if (buffer == NULL || napi_create_object(env, &out) != napi_ok) {
    if (passed >= 0) close(passed);
    napi_throw_error(env, "EINTERNAL", "agentReceive: Node-API call failed");
    return NULL;
  }
  set_prop(env, out, "op", make_int(env, h.op));
  set_prop(env, out, "payload", buffer);
  set_prop(env, out, "fd", make_int(env, passed));
  return out;
}

static napi_value protocol_constants(napi_env env) {
  napi_value c, ops;
  if (napi_create_object(env, &c) != napi_ok || napi_create_object(env, &ops) != napi_ok) return NULL;
  set_prop(env, c, "magic", make_int(env, WPSNAP_AGENT_MAGIC));
  set_prop(env, c, "version", make_int(env, WPSNAP_AGENT_VERSION));
  set_prop(env, c, "headerBytes", make_int(env, WPSNAP_AGENT_HEADER_BYTES));
  set_prop(env, c, "maxPayload", make_int(env, WPSNAP_AGENT_MAX_PAYLOAD));
  set_prop(env, c, "regsBytes", make_int(env, WPSNAP_AGENT_REGS_BYTES));
  set_prop(env, c, "fpregsBytes", make_int(env, WPSNAP_AGENT_FPREGS_BYTES));
  set_prop(env, c, "helloLinked", make_int(env, WPSNAP_AGENT_HELLO_LINKED));
  set_prop(env, ops, "hello", make_int(env, WPSNAP_AGENT_HELLO));
  set_prop(env, ops, "freeze", make_int(env, WPSNAP_AGENT_FREEZE));
  set_prop(env, ops, "frozen", make_int(env, WPSNAP_AGENT_FROZEN));
  set_prop(env, ops, "thaw", make_int(env, WPSNAP_AGENT_THAW));
  set_prop(env, ops, "done", make_int(env, WPSNAP_AGENT_DONE));
  set_prop(env, ops, "error", make_int(env, WPSNAP_AGENT_ERROR));
  set_prop(env, c, "ops", ops);
  return c;
}

_Static_assert(sizeof(struct wpsnap_agent_header) == WPSNAP_AGENT_HEADER_BYTES, "the header is 16 bytes");
_Static_assert(sizeof(struct wpsnap_agent_hello) == 24, "HELLO is 24 bytes");
_Static_assert(sizeof(struct wpsnap_agent_thread) == 16, "a thread record's head is 16 bytes");

void register_agent_socket_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"agentListen", NULL, js_agent_listen, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"agentAccept", NULL, js_agent_accept, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"agentSend", NULL, js_agent_send, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"agentReceive", NULL, js_agent_receive, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"agentProtocol", NULL, NULL, NULL, NULL, protocol_constants(env), napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
