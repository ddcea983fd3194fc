/* freeze / frozenThreads / injectSyscall(InThread) / cloneThread / doomOnAbandon / injectionThreadRsp / thaw:
 * the tracer (tracer.h) runs in wpsnap-tracer, a helper process started by prepareFreeze() (or by freeze()
 * itself) and ended by thaw(); these functions send it requests (tracer_protocol.h) and wait for its
 * replies. If wpsnap dies, the helper sees the socket close and puts the target back as it was. */
#include "addon.h"
#include "constants.h"
#include "napi_util.h"
#include "tracer.h"
#include "tracer_protocol.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

typedef struct {
  thread_record_t rec;
  const uint8_t *xstate; /* in client_t.records */
} client_thread_t;

typedef struct {
  int sock;
  bool thawed;
  uint32_t count;             /* threads frozen */
  thread_record_t injection;  /* the thread injections run in, as captured */
  /* Every thread's record, fetched when first asked for (frozenThreads), or
   * with thaw's reply: not during the pause. */
  bool have_threads;
  uint32_t records_pending; /* bytes of records the helper sends after THAW's reply, read when asked for */
  char *records;
  client_thread_t *threads;
} client_t;

/* wpsnap_tracer, next to this addon. */
static int helper_path(char *path, size_t len) {
  Dl_info info;
  if (dladdr((void *)helper_path, &info) == 0 || info.dli_fname == NULL) return ENOENT;
  const char *slash = strrchr(info.dli_fname, '/');
  size_t dir = slash != NULL ? (size_t)(slash - info.dli_fname) : 0;
  if (snprintf(path, len, "%.*s/wpsnap_tracer", (int)dir, info.dli_fname) >= (int)len) return ENAMETOOLONG;
  return access(path, X_OK) == 0 ? 0 : errno;
}

static void client_end(client_t *c) {
  if (c->sock >= 0) close(c->sock);
  c->sock = -1;
}

static void client_free(client_t *c) {
  free(c->records);
  free(c->threads);
  free(c);
}

/* Read a THREADS body of len bytes (one read) and index its records. */
static int read_threads(client_t *c, uint32_t len) {
  char *body = malloc(len ? len : 1);
  if (body == NULL) return ENOMEM;
  int err = read_all(c->sock, body, len);
  uint32_t count = 0;
  if (err == 0 && len >= sizeof count) memcpy(&count, body, sizeof count);
  else if (err == 0) err = EPROTO;
  client_thread_t *threads = err == 0 ? calloc(count ? count : 1, sizeof *threads) : NULL;
  if (err == 0 && threads == NULL) err = ENOMEM;
  size_t at = sizeof count;
  for (uint32_t i = 0; err == 0 && i < count; i++) {
    if (len - at < sizeof threads[i].rec) {
      err = EPROTO;
      break;
    }
    memcpy(&threads[i].rec, body + at, sizeof threads[i].rec);
    at += sizeof threads[i].rec;
    if (threads[i].rec.xstate_len > XSTATE_MAX || len - at < threads[i].rec.xstate_len) err = EPROTO;
    threads[i].xstate = (const uint8_t *)body + at;
    at += threads[i].rec.xstate_len;
  }
  if (err != 0) {
    free(body);
    free(threads);
    return err;
  }
  c->records = body;
  c->threads = threads;
  c->count = count;
  c->have_threads = true;
  return 0;
}

/* Send a request and read the reply header; the body (r->len bytes) is read by the caller. */
static int request(client_t *c, uint32_t op, const void *payload, uint32_t len, reply_t *r) {
  request_t q = {.op = op, .len = len};
  int err = write_all(c->sock, &q, sizeof q);
  if (err == 0 && len > 0) err = write_all(c->sock, payload, len);
  if (err == 0 && op == OP_INJECT) {
    /* Tests: die while the helper holds injected registers in the target. */
    const char *fault = getenv("WPSNAP_FAULT");
    if (fault != NULL && strcmp(fault, FAULT_POINT_MID_INJECT) == 0) kill(getpid(), SIGKILL);
  }
  if (err == 0) err = read_all(c->sock, r, sizeof *r);
  return err;
}

/* Send a request without waiting for its reply (pipelined: the replies are read in order later). */
static int send_only(client_t *c, uint32_t op, const void *payload, uint32_t len) {
  request_t q = {.op = op, .len = len};
  int err = write_all(c->sock, &q, sizeof q);
  if (err == 0 && len > 0) err = write_all(c->sock, payload, len);
  return err;
}

static napi_value throw_reply(napi_env env, const reply_t *r) {
  char syscall_name[sizeof r->syscall + 1], what[sizeof r->what + 1];
  snprintf(syscall_name, sizeof syscall_name, "%s", r->syscall);
  snprintf(what, sizeof what, "%s", r->what);
  return throw_errno(env, r->err, syscall_name[0] ? syscall_name : "ptrace", "%s", what);
}

static napi_value throw_lost(napi_env env, int err) {
  return throw_errno(env, err, "read", "the tracer helper (wpsnap_tracer) stopped answering");
}

static void client_finalize(napi_env env, void *data, void *hint) {
  client_t *c = data;
  client_end(c); /* a handle never thawed: the helper thaws the target when the socket closes */
  client_free(c);
}

static client_t *get_client(napi_env env, napi_value v) { return handle_data(env, v, HANDLE_FREEZE); }

/* Start a tracer helper; returns its socket or -errno (what it was in *what). */
static int spawn_helper(const char **what) {
  char path[4096];
  int err = helper_path(path, sizeof path);
  if (err != 0) {
    *what = "the tracer helper wpsnap_tracer is missing next to the addon (npm install builds it)";
    return -err;
  }
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
    *what = "socketpair for the tracer helper";
    return -errno;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pair[1], TRACER_FD); /* dup2 clears CLOEXEC */
  /* Not wpsnap's stdin/stdout: a reader of wpsnap's output must see its end
   * when wpsnap exits, not when the helper does. stderr stays, for a crash. */
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  char *const args[] = {"wpsnap-tracer", NULL};
  pid_t launcher;
  err = posix_spawn(&launcher, path, &actions, NULL, args, environ);
  posix_spawn_file_actions_destroy(&actions);
  close(pair[1]);
  if (err != 0) {
    close(pair[0]);
    *what = "start the tracer helper wpsnap_tracer";
    return -err;
  }
  /* It forks the tracer and exits at once: the tracer is nobody's child here. */
  int status;
  while (waitpid(launcher, &status, 0) < 0 && errno == EINTR) {
  }
  return pair[0];
}

/* Helpers started ahead by prepareFreeze(n), one per freeze to come (a group freezes every member); a
 * helper that released its target is kept while fewer than the last n wait. */
#define MAX_SPARES 64
static int spares[MAX_SPARES], nspares, spares_wanted = 1;

/* After RELEASE (its reply, or NULL if none came): a helper that released the
 * target becomes the spare for the next freeze; otherwise the connection ends
 * (if the helper is gone, it thawed the target as it went). */
static void keep_or_end(client_t *c, const reply_t *released) {
  if (released != NULL && released->err == 0 && released->len == 0 && nspares < spares_wanted) {
    spares[nspares++] = c->sock;
    c->sock = -1;
  } else {
    client_end(c);
  }
}

/* prepareFreeze(n = 1): start tracer helpers now, until n wait, so that the
 * next n freeze() calls do not spend a pause starting a process. */
static napi_value js_prepare_freeze(napi_env env, napi_callback_info info) {
  CALL_ARGS(1);
  int32_t wanted = 1;
  if (argc >= 1 && !arg_int32(env, argv[0], &wanted)) return throw_type(env, "prepareFreeze(count?)");
  spares_wanted = wanted < 1 ? 1 : wanted > MAX_SPARES ? MAX_SPARES : wanted;
  while (nspares < wanted && nspares < MAX_SPARES) {
    const char *what = "";
    int sock = spawn_helper(&what);
    if (sock < 0) return throw_errno(env, -sock, "posix_spawn", "%s", what);
    spares[nspares++] = sock;
  }
  return NULL;
}

/* freeze's options ({tidAddresses?: boolean, syscallInsn?: bigint}) into q; false after throwing. */
static bool freeze_options(napi_env env, napi_value options, freeze_with_request_t *q) {
  napi_valuetype type = napi_undefined, vt = napi_undefined;
  napi_value v;
  bool tid_addresses = false;
  if (napi_typeof(env, options, &type) == napi_ok && type == napi_undefined) return true;
  if (type != napi_object || napi_get_named_property(env, options, "tidAddresses", &v) != napi_ok || napi_typeof(env, v, &vt) != napi_ok ||
      (vt != napi_undefined && !arg_bool(env, v, &tid_addresses)) || napi_get_named_property(env, options, "syscallInsn", &v) != napi_ok ||
      napi_typeof(env, v, &vt) != napi_ok || (vt != napi_undefined && !arg_uint64(env, v, &q->insn))) {
    throw_type(env, "freeze(pid, withThreads?, {tidAddresses?: boolean, syscallInsn?: bigint}?)");
    return false;
  }
  if (tid_addresses) q->flags |= FREEZE_TID_ADDRESSES;
  return true;
}

/* freeze(pid, withThreads?, options?) -> handle */
static napi_value js_freeze(napi_env env, napi_callback_info info) {
  CALL_ARGS(3);
  int32_t pid;
  bool with_threads = false;
  freeze_with_request_t with = {0};
  napi_valuetype wt = napi_undefined;
  if (argc >= 2) napi_typeof(env, argv[1], &wt);
  if (argc < 1 || !arg_int32(env, argv[0], &pid) || pid <= 0 || (wt != napi_undefined && !arg_bool(env, argv[1], &with_threads)))
    return throw_type(env, "freeze(pid, withThreads?, options?)");
  if (argc >= 3 && !freeze_options(env, argv[2], &with)) return NULL;
  with.pid = pid;
  int sock = nspares > 0 ? spares[--nspares] : -1;
  if (sock < 0) {
    const char *what = "";
    sock = spawn_helper(&what);
    if (sock < 0) return throw_errno(env, -sock, "posix_spawn", "%s", what);
  }
  client_t *c = calloc(1, sizeof *c);
  if (c == NULL) {
    close(sock);
    return throw_errno(env, ENOMEM, "calloc", "freeze: memory for the handle");
  }
  c->sock = sock;
  int err;
  freeze_request_t q = {.pid = pid};
  reply_t r = {0};
  /* withThreads: THREADS goes right behind FREEZE, its reply read right after FREEZE's: one round trip.
   * A plain FREEZE without options (a helper of an older build answers it too). */
  err = with.flags == 0 ? send_only(c, OP_FREEZE, &q, sizeof q) : send_only(c, OP_FREEZE_WITH, &with, sizeof with);
  if (err == 0 && with_threads) err = send_only(c, OP_THREADS, NULL, 0);
  if (err == 0) err = read_all(c->sock, &r, sizeof r);
  uint32_t head[2] = {0, 0}; /* count, injection thread */
  if (err != 0 || r.err != 0) goto failed;
  err = r.len >= sizeof head + sizeof c->injection ? read_all(c->sock, head, sizeof head) : EPROTO;
  if (err == 0) err = read_all(c->sock, &c->injection, sizeof c->injection);
  uint32_t rest = r.len - (uint32_t)(sizeof head + sizeof c->injection);
  if (err == 0 && (head[0] == 0 || head[1] >= head[0] || c->injection.xstate_len != rest || rest > XSTATE_MAX)) err = EPROTO;
  char xstate[XSTATE_MAX]; /* the injection thread's: not needed here, all come with the records */
  if (err == 0) err = read_all(c->sock, xstate, rest);
  c->count = head[0];
  if (err == 0 && with_threads) {
    reply_t t;
    err = read_all(c->sock, &t, sizeof t);
    if (err == 0 && t.err != 0) err = t.err;
    if (err == 0) err = read_threads(c, t.len);
  }
  if (err == 0) {
    napi_value handle;
    NAPI_CALL(env, make_handle(env, c, client_finalize, HANDLE_FREEZE, &handle));
    return handle;
  }
failed:
  client_end(c);
  client_free(c);
  return err != 0 ? throw_lost(env, err) : throw_reply(env, &r);
}

/* frozenThreads(h) -> [{tid, regs, fpregs, xstate, sigmask, stop}] */
static napi_value js_frozen_threads(napi_env env, napi_callback_info info) {
  CALL_ARGS(1);
  client_t *c = argc ? get_client(env, argv[0]) : NULL;
  if (c == NULL) return throw_type(env, "frozenThreads(handle)");
  if (!c->have_threads && c->thawed) {
    /* Sent by the helper after the thaw's reply, read only now: the thaw (the pause) did not wait for them. */
    int err = c->records_pending > 0 ? read_threads(c, c->records_pending) : EPIPE;
    client_end(c);
    if (err != 0) return throw_errno(env, err, "read", "frozenThreads: the registers were not received after the thaw");
  } else if (!c->have_threads) {
    reply_t r;
    int err = request(c, OP_THREADS, NULL, 0, &r);
    if (err == 0 && r.err != 0) return throw_reply(env, &r);
    if (err == 0) err = read_threads(c, r.len);
    if (err != 0) return throw_lost(env, err);
  }
  napi_value arr;
  NAPI_CALL(env, napi_create_array_with_length(env, c->count, &arr));
  for (size_t i = 0; i < c->count; i++) {
    const thread_record_t *t = &c->threads[i].rec;
    napi_value o;
    NAPI_CALL(env, napi_create_object(env, &o));
    set_prop(env, o, "tid", make_int(env, t->tid));
    set_prop(env, o, "regs", make_buffer_copy(env, &t->regs, sizeof t->regs));
    set_prop(env, o, "fpregs", make_buffer_copy(env, &t->fpregs, sizeof t->fpregs));
    set_prop(env, o, "xstate", make_buffer_copy(env, c->threads[i].xstate, t->xstate_len));
    set_prop(env, o, "sigmask", make_bigint(env, t->sigmask));
    if (t->rseq_area != 0) {
      set_prop(env, o, "rseqArea", make_bigint(env, t->rseq_area));
      set_prop(env, o, "rseqSize", make_int(env, t->rseq_size));
      set_prop(env, o, "rseqSignature", make_int(env, t->rseq_signature));
    }
    if (t->flags & RECORD_ROBUST_LIST) {
      napi_value robust;
      NAPI_CALL(env, napi_create_object(env, &robust));
      set_prop(env, robust, "head", make_bigint(env, t->robust_list_head));
      set_prop(env, robust, "len", make_int(env, (int32_t)t->robust_list_len));
      set_prop(env, o, "robustList", robust);
    }
    if (t->flags & RECORD_CLEAR_CHILD_TID) set_prop(env, o, "clearChildTid", make_bigint(env, t->clear_child_tid));
    set_prop(env, o, "stop", make_string(env, t->stop == STOP_INTERRUPT ? "interrupt" : t->stop == STOP_SIGNAL ? "signal" : "syscall"));
    napi_set_element(env, arr, (uint32_t)i, o);
  }
  return arr;
}

/* A request before the thaw whose reply has no body. */
static napi_value no_body_request(napi_env env, client_t *c, uint32_t op, const void *q, uint32_t len, const char *name) {
  if (c->thawed) return throw_errno(env, EINVAL, "ptrace", "%s after thaw", name);
  reply_t r;
  int err = request(c, op, q, len, &r);
  if (err != 0) return throw_lost(env, err);
  return r.err != 0 ? throw_reply(env, &r) : NULL;
}

/* (insnAddress, nr, args[]) of an injection into q; false after throwing. */
static bool inject_args(napi_env env, const napi_value argv[3], inject_request_t *q, const char *usage) {
  uint32_t nargs = 0;
  bool is_array = false;
  if (!arg_uint64(env, argv[0], &q->insn) || !arg_uint64(env, argv[1], &q->nr) || napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array) {
    throw_type(env, usage);
    return false;
  }
  napi_get_array_length(env, argv[2], &nargs);
  for (uint32_t i = 0; i < nargs && i < 6; i++) {
    napi_value v;
    napi_get_element(env, argv[2], i, &v);
    if (!arg_uint64(env, v, &q->args[i])) {
      throw_type(env, "injectSyscall: arguments must be numbers or bigints");
      return false;
    }
  }
  return true;
}

/* Send an injection (INJECT, INJECT_THREAD or CLONE_THREAD) and read its 8-byte answer. */
static napi_value inject_request(napi_env env, client_t *c, uint32_t op, const void *q, uint32_t len, const char *name) {
  if (c->thawed) return throw_errno(env, EINVAL, "ptrace", "%s after thaw", name);
  reply_t r;
  int err = request(c, op, q, len, &r);
  if (err != 0) return throw_lost(env, err);
  if (r.err != 0) return throw_reply(env, &r);
  uint64_t rax = 0;
  err = r.len == sizeof rax ? read_all(c->sock, &rax, sizeof rax) : EPROTO;
  if (err != 0) return throw_lost(env, err);
  if (op != OP_CLONE_THREAD) return make_bigint(env, rax);
  int64_t tid = (int64_t)rax;
  if (tid > 0 && c->have_threads) {
    /* A new frozen thread: the records read so far miss it; they are read again when asked for. */
    free(c->records);
    free(c->threads);
    c->records = NULL;
    c->threads = NULL;
    c->have_threads = false;
  }
  if (tid > 0) c->count++;
  return make_int(env, (int32_t)tid);
}

/* injectSyscall(h, insnAddress, nr, args[]) -> bigint (raw rax, two's complement) */
static napi_value js_inject_syscall(napi_env env, napi_callback_info info) {
  CALL_ARGS(4);
  client_t *c = argc >= 4 ? get_client(env, argv[0]) : NULL;
  inject_request_t q = {0};
  if (c == NULL) return throw_type(env, "injectSyscall(handle, insnAddress, nr, args)");
  if (!inject_args(env, argv + 1, &q, "injectSyscall(handle, insnAddress, nr, args)")) return NULL;
  return inject_request(env, c, OP_INJECT, &q, sizeof q, "injectSyscall");
}

/* injectSyscallInThread(h, tid, insnAddress, nr, args[]) -> bigint */
static napi_value js_inject_syscall_in_thread(napi_env env, napi_callback_info info) {
  CALL_ARGS(5);
  const char *usage = "injectSyscallInThread(handle, tid, insnAddress, nr, args)";
  client_t *c = argc >= 5 ? get_client(env, argv[0]) : NULL;
  inject_thread_request_t q = {0};
  if (c == NULL || !arg_int32(env, argv[1], &q.tid) || q.tid <= 0) return throw_type(env, usage);
  if (!inject_args(env, argv + 2, &q.call, usage)) return NULL;
  return inject_request(env, c, OP_INJECT_THREAD, &q, sizeof q, "injectSyscallInThread");
}

/* cloneThread(h, insnAddress, cloneArgsAddress, cloneArgsSize) -> new tid, or clone3's -errno */
static napi_value js_clone_thread(napi_env env, napi_callback_info info) {
  CALL_ARGS(4);
  client_t *c = argc >= 4 ? get_client(env, argv[0]) : NULL;
  clone_thread_request_t q = {0};
  int32_t size = 0;
  if (c == NULL || !arg_uint64(env, argv[1], &q.insn) || !arg_uint64(env, argv[2], &q.args) || !arg_int32(env, argv[3], &size) || size <= 0)
    return throw_type(env, "cloneThread(handle, insnAddress, cloneArgsAddress: bigint, cloneArgsSize: number)");
  q.size = (uint64_t)size;
  return inject_request(env, c, OP_CLONE_THREAD, &q, sizeof q, "cloneThread");
}

/* doomOnAbandon(h): if this process dies before thaw, the helper SIGKILLs the target. */
static napi_value js_doom_on_abandon(napi_env env, napi_callback_info info) {
  CALL_ARGS(1);
  client_t *c = argc ? get_client(env, argv[0]) : NULL;
  if (c == NULL) return throw_type(env, "doomOnAbandon(handle)");
  return no_body_request(env, c, OP_DOOM, NULL, 0, "doomOnAbandon");
}

/* setThreadState(h, tid, {regs, fpregs, xstate, sigmask?}): the frozen thread
 * resumes with these registers (struct user_regs_struct, 216 bytes) and takes
 * this FP/vector state (the XSAVE area if not empty, else the 512-byte
 * fpregs) and, when sigmask (a bigint, 0 ..= 2^64-1) is given, this blocked
 * signal mask. */
typedef struct {
  set_thread_request_t head;
  uint8_t xstate[XSTATE_MAX];
} set_thread_t;

/* A SET_THREAD request from (tid, {regs, fpregs, xstate, sigmask?}); its length in *len, or NULL after throwing. */
static bool build_set_thread(napi_env env, napi_value tid_value, napi_value state, set_thread_t *q, uint32_t *len) {
  int32_t tid;
  napi_value rv, fv, xv;
  void *regs = NULL, *fpregs = NULL, *xstate = NULL;
  size_t regs_len = 0, fpregs_len = 0, xstate_len = 0;
  if (!arg_int32(env, tid_value, &tid) || napi_get_named_property(env, state, "regs", &rv) != napi_ok ||
      napi_get_named_property(env, state, "fpregs", &fv) != napi_ok || napi_get_named_property(env, state, "xstate", &xv) != napi_ok ||
      !arg_buffer(env, rv, &regs, &regs_len) || !arg_buffer(env, fv, &fpregs, &fpregs_len) || !arg_buffer(env, xv, &xstate, &xstate_len)) {
    throw_type(env, "setThreadState(handle, tid, {regs, fpregs, xstate}: Buffers)");
    return false;
  }
  if (regs_len != sizeof(struct user_regs_struct) || fpregs_len != sizeof(struct user_fpregs_struct) || xstate_len > XSTATE_MAX) {
    throw_type(env, "setThreadState: regs must be a struct user_regs_struct (216 bytes), fpregs 512 bytes, xstate at most 8192");
    return false;
  }
  napi_value mv;
  napi_valuetype mask_type = napi_undefined;
  uint64_t sigmask = 0;
  bool lossless = false;
  if (napi_get_named_property(env, state, "sigmask", &mv) != napi_ok || napi_typeof(env, mv, &mask_type) != napi_ok ||
      (mask_type != napi_undefined && (mask_type != napi_bigint || napi_get_value_bigint_uint64(env, mv, &sigmask, &lossless) != napi_ok || !lossless))) {
    throw_type(env, "setThreadState: sigmask must be a bigint from 0 to 2^64-1, or undefined");
    return false;
  }
  memset(&q->head, 0, sizeof q->head);
  q->head.tid = tid;
  q->head.xstate_len = (uint32_t)xstate_len;
  q->head.has_sigmask = mask_type == napi_bigint;
  q->head.sigmask = sigmask;
  memcpy(&q->head.regs, regs, regs_len);
  memcpy(&q->head.fpregs, fpregs, fpregs_len);
  if (xstate_len > 0) memcpy(q->xstate, xstate, xstate_len);
  *len = (uint32_t)(sizeof q->head + xstate_len);
  return true;
}

static napi_value js_set_thread_state(napi_env env, napi_callback_info info) {
  CALL_ARGS(3);
  client_t *c = argc >= 3 ? get_client(env, argv[0]) : NULL;
  if (c == NULL) return throw_type(env, "setThreadState(handle, tid, {regs, fpregs, xstate}: Buffers)");
  static set_thread_t q;
  uint32_t len;
  if (!build_set_thread(env, argv[1], argv[2], &q, &len)) return NULL;
  return no_body_request(env, c, OP_SET_THREAD, &q, len, "setThreadState");
}

/* setThreadsAndThaw(h, [{tid, regs, fpregs, xstate, sigmask?}]): every thread's
 * state, then the thaw (the helper kept for the next freeze), in one round
 * trip: the requests go out together and their replies are read after. The
 * thaw happens whatever a SET_THREAD answered; the first failure is thrown
 * after it. The records must have been read (frozenThreads, or freeze's
 * withThreads). */
static napi_value js_set_threads_and_thaw(napi_env env, napi_callback_info info) {
  CALL_ARGS(2);
  client_t *c = argc >= 2 ? get_client(env, argv[0]) : NULL;
  bool is_array = false;
  if (c == NULL || napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array) return throw_type(env, "setThreadsAndThaw(handle, [{tid, regs, fpregs, xstate, sigmask?}])");
  if (c->thawed || !c->have_threads) return throw_errno(env, EINVAL, "ptrace", "setThreadsAndThaw: after thaw, or before the records were read");
  uint32_t n;
  NAPI_CALL(env, napi_get_array_length(env, argv[1], &n));
  static set_thread_t q;
  int err = 0;
  for (uint32_t i = 0; i < n && err == 0; i++) {
    napi_value state, tid;
    NAPI_CALL(env, napi_get_element(env, argv[1], i, &state));
    NAPI_CALL(env, napi_get_named_property(env, state, "tid", &tid));
    uint32_t len;
    if (!build_set_thread(env, tid, state, &q, &len)) {
      n = i; /* what was sent is answered below; the thaw still happens */
      break;
    }
    err = send_only(c, OP_SET_THREAD, &q, len);
  }
  bool threw = false;
  napi_is_exception_pending(env, &threw);
  c->thawed = true;
  if (err == 0) err = send_only(c, OP_RELEASE, NULL, 0);
  reply_t first_failure = {0};
  for (uint32_t i = 0; i < n && err == 0; i++) {
    reply_t r;
    err = read_all(c->sock, &r, sizeof r);
    if (err == 0 && r.err != 0 && first_failure.err == 0) first_failure = r;
  }
  reply_t released;
  if (err == 0) err = read_all(c->sock, &released, sizeof released);
  keep_or_end(c, err == 0 ? &released : NULL);
  if (threw) return NULL;
  if (err != 0) return throw_lost(env, err);
  if (first_failure.err != 0) return throw_reply(env, &first_failure);
  return NULL;
}

/* injectionThreadRsp(h) -> bigint: stack pointer of the thread injections run in. */
static napi_value js_injection_rsp(napi_env env, napi_callback_info info) {
  CALL_ARGS(1);
  client_t *c = argc ? get_client(env, argv[0]) : NULL;
  if (c == NULL || c->thawed || c->count == 0) return throw_type(env, "injectionThreadRsp(handle)");
  return make_bigint(env, c->injection.regs.rsp);
}

/* thaw(h): detach every thread. Idempotent. A helper with nothing left to send
 * stays, as the next freeze()'s (RELEASE). */
static napi_value js_thaw(napi_env env, napi_callback_info info) {
  CALL_ARGS(1);
  client_t *c = argc ? get_client(env, argv[0]) : NULL;
  if (c == NULL) return throw_type(env, "thaw(handle)");
  if (c->thawed) return NULL;
  c->thawed = true;
  reply_t r;
  if (c->have_threads) {
    /* Nothing to receive after the thaw: the helper stays, for the next freeze (a rollback session's). */
    int err = request(c, OP_RELEASE, NULL, 0, &r);
    keep_or_end(c, err == 0 ? &r : NULL);
    return NULL;
  }
  /* The records come after every thread is released, and are read when first asked for: outside the pause. */
  thaw_request_t q = {.with_threads = !c->have_threads};
  int err = request(c, OP_THAW, &q, sizeof q, &r); /* if the helper is gone, it thawed the target as it went */
  if (err == 0 && r.err == 0 && r.len > 0 && !c->have_threads) {
    c->records_pending = r.len; /* the socket stays open for them */
  } else {
    client_end(c); /* without the records, frozenThreads says so later: the thaw itself happened */
  }
  return NULL;
}

/* processVmWrite(pid, address, buffer) */
static napi_value js_process_vm_write(napi_env env, napi_callback_info info) {
  CALL_ARGS(3);
  int32_t pid;
  uint64_t addr;
  void *data;
  size_t len;
  if (argc < 3 || !arg_int32(env, argv[0], &pid) || !arg_uint64(env, argv[1], &addr) || !arg_buffer(env, argv[2], &data, &len))
    return throw_type(env, "processVmWrite(pid, address, buffer)");
  struct iovec local = {.iov_base = data, .iov_len = len};
  struct iovec remote = {.iov_base = (void *)(uintptr_t)addr, .iov_len = len};
  ssize_t n = process_vm_writev(pid, &local, 1, &remote, 1, 0);
  if (n != (ssize_t)len)
    return throw_errno(env, n < 0 ? errno : EFAULT, "process_vm_writev", "process_vm_writev(pid %d, 0x%llx, %zu bytes)", pid,
                       (unsigned long long)addr, len);
  return NULL;
}

void register_ptrace_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"prepareFreeze", NULL, js_prepare_freeze, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"freeze", NULL, js_freeze, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"frozenThreads", NULL, js_frozen_threads, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"injectSyscall", NULL, js_inject_syscall, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"injectSyscallInThread", NULL, js_inject_syscall_in_thread, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"cloneThread", NULL, js_clone_thread, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"doomOnAbandon", NULL, js_doom_on_abandon, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"setThreadState", NULL, js_set_thread_state, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"setThreadsAndThaw", NULL, js_set_threads_and_thaw, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"injectionThreadRsp", NULL, js_injection_rsp, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"thaw", NULL, js_thaw, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"processVmWrite", NULL, js_process_vm_write, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
