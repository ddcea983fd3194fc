/* wpsnap <-> wpsnap-tracer: requests and replies over a stream socket (the
 * tracer's fd 3), in host byte order. A reply answers every request; the
 * tracer exits after THAW's reply, or, when the socket closes (wpsnap died),
 * after closing in the target the fds it created there and thawing it.
 * RELEASE thaws as THAW does and keeps the tracer for the next FREEZE (a
 * rollback session freezes its target again and again: no process to start
 * each time). After DOOM (a process under construction, wpsnap restore), a
 * closed socket SIGKILLs the target instead of thawing it; THAW and RELEASE
 * still thaw it. */
#ifndef WPSNAP_TRACER_PROTOCOL_H
#define WPSNAP_TRACER_PROTOCOL_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#define TRACER_FD 3

enum {
  OP_FREEZE = 1,
  OP_INJECT = 2,
  OP_THAW = 3,
  OP_THREADS = 4,
  OP_SET_THREAD = 5,
  OP_RELEASE = 6,
  OP_INJECT_THREAD = 7, /* inject_thread_request_t; reply body uint64_t rax */
  OP_CLONE_THREAD = 8,  /* clone_thread_request_t; reply body int64_t: new tid or clone3's -errno */
  OP_DOOM = 9,          /* no payload, no reply body: a closed socket now SIGKILLs the target */
  OP_FREEZE_WITH = 10,  /* freeze_with_request_t; replied as FREEZE */
};

typedef struct {
  uint32_t op;
  uint32_t len; /* payload bytes that follow */
} request_t;

typedef struct {
  int32_t pid;
} freeze_request_t;

/* FREEZE_WITH: FREEZE and what else the freeze does while every thread is stopped. */
#define FREEZE_TID_ADDRESSES 1u /* each thread's clear_child_tid, by an injected prctl(PR_GET_TID_ADDRESS) */
typedef struct {
  int32_t pid;
  uint32_t flags; /* FREEZE_* */
  uint64_t insn;  /* the `syscall` instruction the freeze's injections use; 0: one in the [vdso] */
} freeze_with_request_t;

typedef struct {
  uint64_t insn, nr, args[6];
} inject_request_t;

/* INJECT into the frozen thread tid (ESRCH: not frozen; EBUSY: in a signal-delivery stop). */
typedef struct {
  int32_t tid;
  uint32_t reserved; /* 0 */
  inject_request_t call;
} inject_thread_request_t;

/* clone3(args, size) in the injection thread; the new thread joins the frozen ones. */
typedef struct {
  uint64_t insn;
  uint64_t args; /* struct clone_args in the target */
  uint64_t size;
} clone_thread_request_t;

typedef struct {
  uint32_t with_threads; /* 1: THAW's reply body is the THREADS body (sent after every thread is released) */
} thaw_request_t;

typedef struct {
  int32_t err; /* 0 or an errno */
  char syscall[16];
  char what[160];
  uint32_t len; /* body bytes that follow */
} reply_t;

/* FREEZE's body: uint32_t count, uint32_t index of the thread injections
 * run in, then that thread's record: a thread_record_t followed by
 * xstate_len bytes of XSAVE area. Every thread's record comes with THREADS
 * (or THAW's reply when asked for): uint32_t count, then count records.
 * They are not sent during the pause unless asked for: 500 threads make 1.7 MB. */
typedef struct {
  int32_t tid;
  int32_t stop;     /* stop_kind_t */
  uint64_t sigmask; /* blocked signals at the freeze, bit n-1 for signal n (at offset 8: no padding) */
  struct user_regs_struct regs;
  struct user_fpregs_struct fpregs;
  uint32_t xstate_len;
  uint32_t rseq_size; /* the thread's registered rseq area (PTRACE_GET_RSEQ_CONFIGURATION) while frozen; 0: none, or not asked */
  uint64_t rseq_area;
  /* Appended (wpsnap restore): valid as flags say. */
  uint64_t robust_list_head; /* get_robust_list(tid) at the freeze */
  uint64_t robust_list_len;
  uint64_t clear_child_tid;  /* prctl(PR_GET_TID_ADDRESS) injected at the freeze (FREEZE_TID_ADDRESSES) */
  uint32_t rseq_signature;   /* with rseq_area */
  uint32_t flags;            /* RECORD_* */
} thread_record_t;

#define RECORD_ROBUST_LIST 1u
#define RECORD_CLEAR_CHILD_TID 2u

/* SET_THREAD (a rollback): the thread resumes with these registers, and
 * takes this FP/vector state now (the XSAVE area when xstate_len > 0, else
 * fpregs) and, when has_sigmask is 1, this blocked signal mask. The request
 * is the fixed part followed by xstate_len bytes; the reply has no body. */
typedef struct {
  int32_t tid;
  uint32_t xstate_len;
  uint32_t has_sigmask; /* 1: set sigmask (PTRACE_SETSIGMASK); 0: the mask stays as it is */
  uint32_t reserved;    /* 0; keeps sigmask and regs 8-byte aligned */
  uint64_t sigmask;
  struct user_regs_struct regs;
  struct user_fpregs_struct fpregs;
} set_thread_request_t;

/* Records are copied with memcpy, but both sides build the same layout: no hidden padding before the 64-bit fields. */
_Static_assert(offsetof(thread_record_t, sigmask) == 8 && offsetof(thread_record_t, regs) == 16, "thread_record_t layout");
_Static_assert(offsetof(thread_record_t, rseq_area) == 752 && offsetof(thread_record_t, robust_list_head) == 760 &&
                   offsetof(thread_record_t, clear_child_tid) == 776 && offsetof(thread_record_t, rseq_signature) == 784 &&
                   offsetof(thread_record_t, flags) == 788 && sizeof(thread_record_t) == 792,
               "thread_record_t: the appended fields, no padding, and the XSAVE area that follows stays 8-byte aligned");
_Static_assert(offsetof(inject_thread_request_t, call) == 8 && sizeof(clone_thread_request_t) == 24 && sizeof(freeze_with_request_t) == 16,
               "request layouts");
_Static_assert(offsetof(set_thread_request_t, sigmask) == 16 && offsetof(set_thread_request_t, regs) == 24, "set_thread_request_t layout");
_Static_assert(sizeof(set_thread_request_t) % 8 == 0, "set_thread_request_t: the XSAVE area that follows stays 8-byte aligned");

/* INJECT's and INJECT_THREAD's body: uint64_t rax. CLONE_THREAD's: int64_t. */

static inline int write_all(int fd, const void *data, size_t len) {
  const char *p = data;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EPIPE;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* 0, or EPIPE at end of file, or an errno. */
static inline int read_all(int fd, void *data, size_t len) {
  char *p = data;
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EPIPE;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

#endif
