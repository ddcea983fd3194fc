/* The tracer: freezing a process with ptrace and injecting syscalls into it.
 * ptrace_freeze.c implements what any architecture shares, ptrace_x86_64.c
 * the registers and the syscall ABI; it runs in wpsnap-tracer, a helper process of its own
 * (tracer_main.c), which ptrace_client.c drives over a socket. A tracer in its
 * own process finishes what it started when wpsnap dies: an injected syscall
 * is completed and every register put back, a userfaultfd created in the
 * target is closed there, and every thread is detached. */
#ifndef WPSNAP_TRACER_H
#define WPSNAP_TRACER_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

#define XSTATE_MAX 8192
#define MAX_REQUEUE 8

typedef enum { STOP_INTERRUPT, STOP_SIGNAL, STOP_SYSCALL } stop_kind_t;

typedef struct {
  pid_t tid;
  stop_kind_t stop;
  int deliver_sig;  /* signal-delivery-stop signal: passed back by PTRACE_DETACH */
  /* Signals that arrived during an injection, held back: the first is
   * delivered at the detach with its own siginfo (redeliver), any others
   * re-sent with tgkill after the detach. */
  int requeue[MAX_REQUEUE];
  siginfo_t requeue_info[MAX_REQUEUE];
  bool requeue_has_info[MAX_REQUEUE];
  int nrequeue;
  struct user_regs_struct regs;          /* as captured at the freeze */
  struct user_regs_struct resume_regs;   /* what the thread must resume with */
  struct user_fpregs_struct fpregs;
  uint64_t sigmask; /* blocked signals as captured at the freeze (PTRACE_GETSIGMASK), bit n-1 for signal n */
  uint8_t *xstate; /* XSAVE area: a slot of the prepared pool, or malloc'd (XSTATE_MAX) */
  size_t xstate_len;
  bool injected;
  bool stopped;    /* its freeze stop was collected and its registers captured */
  /* get_robust_list(tid) at the freeze (has_robust_list: the call succeeded). */
  bool has_robust_list;
  uint64_t robust_list_head, robust_list_len;
  /* clear_child_tid, from an injected prctl(PR_GET_TID_ADDRESS) when the freeze asked for it. */
  bool has_clear_child_tid;
  uint64_t clear_child_tid;
} thread_t;

typedef struct {
  pid_t pid;
  thread_t *threads; /* the prepared pool while count fits it, then malloc'd */
  size_t count, cap;
  size_t pool_slots; /* XSAVE areas of the pool handed out */
  pid_t injection_tid; /* the thread injections run in, chosen once at the freeze */
  bool thawed;
} freeze_t;

/* The failing call, for the error that reaches JS. */
typedef struct {
  char syscall[16];
  char what[160];
} tracer_error_t;

/* Allocate the memory a freeze of up to TRACER_POOL_THREADS threads needs
 * (thread records and their XSAVE areas) and have a background thread touch
 * it: the tracer's own page faults then do not lengthen the target's pause.
 * Call before raising the caller's scheduling priority (the thread inherits it). */
#define TRACER_POOL_THREADS 1024
void tracer_prepare(void);
/* PTRACE_SEIZE + PTRACE_INTERRUPT every thread, then collect the stops as
 * they come (waitpid(-1, __WALL)), capturing each thread's registers and
 * blocked signal mask; list
 * /proc/PID/task again until it names no thread not yet stopped.
 * Returns 0 and *out, or an errno (nothing left stopped). */
int tracer_freeze(pid_t pid, freeze_t **out, tracer_error_t *error);
/* A `syscall` instruction (0f 05) in the [vdso] of pid, or 0 (read before the pause). */
uint64_t tracer_syscall_insn(pid_t pid);
/* After tracer_freeze: each thread's clear_child_tid, read by injecting
 * prctl(PR_GET_TID_ADDRESS, scratch) into it at insn (scratch: 8 bytes
 * below its red zone, put back after), into every thread at once. A thread
 * in a signal-delivery stop, or whose stack cannot be read, gets no value.
 * Failures leave values out; they never fail the freeze. */
void tracer_read_tid_addresses(freeze_t *f, uint64_t insn);
/* The frozen thread tid, or NULL (ESRCH and *error set). */
thread_t *tracer_thread(freeze_t *f, pid_t tid, tracer_error_t *error);
/* Run one syscall in a stopped thread t of f, then put every register back
 * as captured: the thread resumes as if never stopped (an interrupted
 * syscall restarts, or returns EINTR, as it would have). A thread in a
 * signal-delivery stop would lose its signal: the injection thread is never
 * one unless every thread is, and the caller refuses others (EBUSY).
 * Returns 0 and the raw rax, or an errno. */
int tracer_inject(freeze_t *f, thread_t *t, uint64_t insn, uint64_t nr, const uint64_t args[6], uint64_t *rax, tracer_error_t *error);
/* clone3(args, size) injected into the injection thread with
 * PTRACE_O_TRACECLONE for the duration: the new thread is stopped from
 * birth (its PTRACE_EVENT_STOP collected), its registers captured, and it
 * joins f (thawed like the others). Returns 0 and *result: the new tid as
 * the tracer sees it, or clone3's negative errno (nothing added); or an
 * errno of the tracer. */
int tracer_clone_thread(freeze_t *f, uint64_t insn, uint64_t args, uint64_t size, int64_t *result, tracer_error_t *error);
/* Give a stopped thread the registers it resumes with (also after later
 * injections), its FP/vector state (XSAVE area, or fpregs without one) and,
 * when sigmask is not NULL, its blocked signal mask: a rollback. Returns 0 or
 * an errno (ESRCH: no such thread frozen). */
int tracer_set_thread(freeze_t *f, pid_t tid, const struct user_regs_struct *regs, const struct user_fpregs_struct *fpregs,
                      const uint8_t *xstate, size_t xstate_len, const uint64_t *sigmask, tracer_error_t *error);
/* Index in f->threads of the thread injections run in (the same one every
 * time: chosen at the freeze, threads added later never take its place). */
size_t tracer_injection_thread(const freeze_t *f);
/* PTRACE_DETACH every thread, re-delivering signals that arrived while they were stopped. Idempotent. */
void tracer_thaw(freeze_t *f);
void tracer_free(freeze_t *f);

#endif
