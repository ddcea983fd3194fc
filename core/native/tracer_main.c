/* wpsnap-tracer: the tracer (tracer.h) in a process of its own, serving
 * wpsnap's requests on fd 3 (tracer_protocol.h). It exists so that a wpsnap
 * killed at any moment leaves the target as it was: an injected syscall runs
 * to its end and the thread gets its registers back (the kernel would detach
 * it with the injected ones if its tracer died), the fds created in the
 * target and not closed yet are closed there, and every thread is detached.
 * Signals that end a process are ignored: only SIGKILL, or wpsnap closing
 * the socket, ends it. */
#include "tracer.h"
#include "tracer_protocol.h"

#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>

#define SYS_CLOSE 3
#define SYS_IOCTL 16
#define SYS_OPENAT 257
#define SYS_USERFAULTFD 323
#define USERFAULTFD_IOC_NEW 0xaa00
#define MAX_OWNED 16

static freeze_t *frozen;
/* fds the injected calls created in the target and wpsnap has not closed there yet. */
static int64_t owned[MAX_OWNED];
static int nowned;
/* The syscall instruction wpsnap's injections use: abandon() closes the fds with it. */
static uint64_t syscall_insn;
/* DOOM: the target is SIGKILLed, not thawed, if wpsnap goes before THAW/RELEASE. */
static bool doomed;

static int reply(int32_t err, const tracer_error_t *error, const void *body, uint32_t len) {
  reply_t r = {.err = err, .len = len};
  if (err != 0 && error != NULL) {
    memcpy(r.syscall, error->syscall, sizeof r.syscall);
    memcpy(r.what, error->what, sizeof r.what);
  }
  int e = write_all(TRACER_FD, &r, sizeof r);
  if (e == 0 && len > 0) e = write_all(TRACER_FD, body, len);
  return e;
}

static void track_fds(const inject_request_t *q, uint64_t rax) {
  int64_t result = (int64_t)rax;
  bool creates = q->nr == SYS_USERFAULTFD || q->nr == SYS_OPENAT || (q->nr == SYS_IOCTL && q->args[1] == USERFAULTFD_IOC_NEW);
  if (creates && result >= 0 && nowned < MAX_OWNED) owned[nowned++] = result;
  if (q->nr == SYS_CLOSE) {
    for (int i = 0; i < nowned; i++) {
      if (owned[i] == (int64_t)q->args[0]) owned[i--] = owned[--nowned];
    }
  }
}

static size_t record_size(const thread_t *t) {
  return sizeof(thread_record_t) + t->xstate_len;
}

/* PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13; the headers here are older). */
#define WPSNAP_PTRACE_GET_RSEQ_CONFIGURATION 0x420f
struct wpsnap_rseq_configuration {
  uint64_t rseq_abi_pointer;
  uint32_t rseq_abi_size, signature, flags, pad;
};

static char *put_record(char *p, const thread_t *t) {
  thread_record_t rec = {
      .tid = t->tid, .stop = (int32_t)t->stop, .sigmask = t->sigmask, .regs = t->regs, .fpregs = t->fpregs, .xstate_len = (uint32_t)t->xstate_len};
  /* Where the kernel writes the thread's rseq area (a rollback must not unmap it even for a moment);
   * asked while the thread is still stopped (after a thaw it is not asked). */
  struct wpsnap_rseq_configuration rseq;
  if (frozen != NULL && !frozen->thawed &&
      ptrace((enum __ptrace_request)WPSNAP_PTRACE_GET_RSEQ_CONFIGURATION, t->tid, (void *)sizeof rseq, &rseq) == (long)sizeof rseq &&
      rseq.rseq_abi_pointer != 0) {
    rec.rseq_area = rseq.rseq_abi_pointer;
    rec.rseq_size = rseq.rseq_abi_size;
    rec.rseq_signature = rseq.signature;
  }
  if (t->has_robust_list) {
    rec.flags |= RECORD_ROBUST_LIST;
    rec.robust_list_head = t->robust_list_head;
    rec.robust_list_len = t->robust_list_len;
  }
  if (t->has_clear_child_tid) {
    rec.flags |= RECORD_CLEAR_CHILD_TID;
    rec.clear_child_tid = t->clear_child_tid;
  }
  memcpy(p, &rec, sizeof rec);
  memcpy(p + sizeof rec, t->xstate, t->xstate_len);
  return p + record_size(t);
}

/* The THREADS body, every frozen thread's record, after the reply header:
 * the header goes out before the records are copied (THAW's caller waits for
 * the header only), the records in chunks from a buffer on the stack. */
static int reply_threads(void) {
  size_t len = sizeof(uint32_t);
  for (size_t i = 0; i < frozen->count; i++) len += record_size(&frozen->threads[i]);
  reply_t r = {.len = (uint32_t)len};
  int e = write_all(TRACER_FD, &r, sizeof r);
  static char chunk[64 * 1024];
  uint32_t count = (uint32_t)frozen->count;
  memcpy(chunk, &count, sizeof count);
  char *p = chunk + sizeof count;
  for (size_t i = 0; i < frozen->count && e == 0; i++) {
    const thread_t *t = &frozen->threads[i];
    if (p + record_size(t) > chunk + sizeof chunk) {
      e = write_all(TRACER_FD, chunk, (size_t)(p - chunk));
      p = chunk;
    }
    p = put_record(p, t);
  }
  if (e == 0) e = write_all(TRACER_FD, chunk, (size_t)(p - chunk));
  return e;
}

static int serve_freeze(const freeze_with_request_t *q) {
  tracer_error_t error = {{0}, {0}};
  if (frozen != NULL) {
    snprintf(error.syscall, sizeof error.syscall, "ptrace");
    snprintf(error.what, sizeof error.what, "this tracer has already frozen pid %d", frozen->pid);
    return reply(EBUSY, &error, NULL, 0);
  }
  /* Before the pause: the instruction the freeze's injections use. */
  uint64_t insn = (q->flags & FREEZE_TID_ADDRESSES) && q->insn == 0 ? tracer_syscall_insn(q->pid) : q->insn;
  int err = tracer_freeze(q->pid, &frozen, &error);
  if (err != 0) return reply(err, &error, NULL, 0);
  if (q->flags & FREEZE_TID_ADDRESSES) tracer_read_tid_addresses(frozen, insn);
  size_t chosen = tracer_injection_thread(frozen);
  char body[2 * sizeof(uint32_t) + sizeof(thread_record_t) + XSTATE_MAX];
  uint32_t head[2] = {(uint32_t)frozen->count, (uint32_t)chosen};
  memcpy(body, head, sizeof head);
  char *end = put_record(body + sizeof head, &frozen->threads[chosen]);
  return reply(0, NULL, body, (uint32_t)(end - body));
}

/* INJECT (tid 0: into the injection thread) and INJECT_THREAD. */
static int serve_inject(pid_t tid, const inject_request_t *q) {
  tracer_error_t error = {{0}, {0}};
  if (frozen == NULL) {
    snprintf(error.syscall, sizeof error.syscall, "ptrace");
    snprintf(error.what, sizeof error.what, "inject a syscall before freeze");
    return reply(EINVAL, &error, NULL, 0);
  }
  thread_t *t = tid == 0 ? &frozen->threads[tracer_injection_thread(frozen)] : tracer_thread(frozen, tid, &error);
  if (t == NULL) return reply(ESRCH, &error, NULL, 0);
  if (tid != 0 && t->stop == STOP_SIGNAL) {
    snprintf(error.syscall, sizeof error.syscall, "ptrace");
    snprintf(error.what, sizeof error.what, "tid %d is in a signal-delivery stop (signal %d): an injected call would discard the signal", tid,
             t->deliver_sig);
    return reply(EBUSY, &error, NULL, 0);
  }
  uint64_t rax = 0;
  syscall_insn = q->insn;
  int err = tracer_inject(frozen, t, q->insn, q->nr, q->args, &rax, &error);
  if (err != 0) return reply(err, &error, NULL, 0);
  track_fds(q, rax);
  return reply(0, NULL, &rax, sizeof rax);
}

static int serve_set_thread(const set_thread_request_t *q, const uint8_t *xstate) {
  tracer_error_t error = {{0}, {0}};
  if (frozen == NULL) {
    snprintf(error.syscall, sizeof error.syscall, "ptrace");
    snprintf(error.what, sizeof error.what, "set a thread's registers before freeze");
    return reply(EINVAL, &error, NULL, 0);
  }
  int err = tracer_set_thread(frozen, q->tid, &q->regs, &q->fpregs, xstate, q->xstate_len, q->has_sigmask ? &q->sigmask : NULL, &error);
  return reply(err, err != 0 ? &error : NULL, NULL, 0);
}

static int serve_clone(const clone_thread_request_t *q) {
  tracer_error_t error = {{0}, {0}};
  if (frozen == NULL) {
    snprintf(error.syscall, sizeof error.syscall, "ptrace");
    snprintf(error.what, sizeof error.what, "clone a thread before freeze");
    return reply(EINVAL, &error, NULL, 0);
  }
  int64_t result = 0;
  syscall_insn = q->insn;
  int err = tracer_clone_thread(frozen, q->insn, q->args, q->size, &result, &error);
  if (err != 0) return reply(err, &error, NULL, 0);
  return reply(0, NULL, &result, sizeof result);
}

/* wpsnap is gone: close what it left open in the target, then let the target
 * go; or, doomed, end it: a process under construction never runs half-built. */
static void abandon(void) {
  if (frozen == NULL) return;
  if (doomed && !frozen->thawed) {
    /* SAFETY: SIGKILL reaches the stopped threads as they are (a traced
     * thread is woken for it and dies without returning to user mode);
     * our exit then detaches what is left. */
    kill(frozen->pid, SIGKILL);
    return;
  }
  tracer_error_t ignored;
  for (int i = 0; i < nowned; i++) {
    uint64_t args[6] = {(uint64_t)owned[i]}, rax;
    tracer_inject(frozen, &frozen->threads[tracer_injection_thread(frozen)], syscall_insn, SYS_CLOSE, args, &rax, &ignored);
  }
  tracer_thaw(frozen);
}

int main(void) {
  /* wpsnap waits for this process to exit; the tracer is its child, which
   * the init process (or a subreaper) reaps, whenever it ends. */
  pid_t child = fork();
  if (child < 0) return 1;
  if (child > 0) return 0;
  prctl(PR_SET_NAME, "wpsnap-tracer");
  signal(SIGPIPE, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  signal(SIGTERM, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  tracer_prepare(); /* while wpsnap prepares the rest, before the pause */
  /* Real-time priority: the threads it wakes (PTRACE_INTERRUPT, PTRACE_DETACH)
   * no longer preempt it one by one, so it has asked every thread to stop
   * (or released every thread) before any of them runs. It never spins: every
   * wait blocks. Without the privilege it runs as it is. */
  struct sched_param realtime = {.sched_priority = 1};
  sched_setscheduler(0, SCHED_FIFO, &realtime);
  for (;;) {
    request_t q;
    union {
      freeze_request_t freeze;
      freeze_with_request_t freeze_with;
      inject_request_t inject;
      inject_thread_request_t inject_thread;
      clone_thread_request_t clone;
      thaw_request_t thaw;
      struct {
        set_thread_request_t head;
        uint8_t xstate[XSTATE_MAX];
      } set_thread;
    } payload;
    if (read_all(TRACER_FD, &q, sizeof q) != 0 || q.len > sizeof payload || read_all(TRACER_FD, &payload, q.len) != 0) break;
    int e = 0;
    if (q.op == OP_FREEZE && q.len == sizeof payload.freeze) {
      freeze_with_request_t plain = {.pid = payload.freeze.pid};
      e = serve_freeze(&plain);
    } else if (q.op == OP_FREEZE_WITH && q.len == sizeof payload.freeze_with) {
      e = serve_freeze(&payload.freeze_with);
    } else if (q.op == OP_INJECT && q.len == sizeof payload.inject) {
      e = serve_inject(0, &payload.inject);
    } else if (q.op == OP_INJECT_THREAD && q.len == sizeof payload.inject_thread && payload.inject_thread.tid > 0) {
      e = serve_inject(payload.inject_thread.tid, &payload.inject_thread.call);
    } else if (q.op == OP_CLONE_THREAD && q.len == sizeof payload.clone) {
      e = serve_clone(&payload.clone);
    } else if (q.op == OP_DOOM && q.len == 0) {
      doomed = frozen != NULL;
      tracer_error_t error = {"ptrace", "doomOnAbandon before freeze"};
      e = frozen != NULL ? reply(0, NULL, NULL, 0) : reply(EINVAL, &error, NULL, 0);
    } else if (q.op == OP_SET_THREAD && q.len >= sizeof payload.set_thread.head &&
               q.len == sizeof payload.set_thread.head + payload.set_thread.head.xstate_len && payload.set_thread.head.has_sigmask <= 1) {
      e = serve_set_thread(&payload.set_thread.head, payload.set_thread.xstate);
    } else if (q.op == OP_THREADS && frozen != NULL) {
      e = reply_threads();
    } else if (q.op == OP_THAW) {
      if (frozen != NULL) tracer_thaw(frozen);
      if (frozen != NULL && q.len == sizeof payload.thaw && payload.thaw.with_threads) {
        reply_threads();
      } else {
        reply(0, NULL, NULL, 0);
      }
      tracer_free(frozen);
      return 0;
    } else if (q.op == OP_RELEASE) {
      if (frozen != NULL) tracer_thaw(frozen);
      tracer_free(frozen);
      frozen = NULL;
      nowned = 0;
      doomed = false;
      e = reply(0, NULL, NULL, 0);
    } else {
      break;
    }
    if (e != 0) break; /* wpsnap stopped listening */
  }
  abandon();
  tracer_free(frozen);
  return 0;
}
