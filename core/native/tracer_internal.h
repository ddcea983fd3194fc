/* What the tracer's generic part (ptrace_freeze.c) and its architecture part
 * (ptrace_x86_64.c) give each other. Private to the tracer helper. */
#ifndef WPSNAP_TRACER_INTERNAL_H
#define WPSNAP_TRACER_INTERNAL_H

#include "tracer.h"

/* Architecture part. */
/* Capture the thread's registers (general, FP, extended state up to xstate_cap bytes); 0 or an errno. */
int arch_capture_regs(thread_t *t, size_t xstate_cap);
/* Set the general registers a stopped thread resumes with; 0 or an errno. */
int arch_set_regs(pid_t tid, const struct user_regs_struct *regs);
/* Bytes of the largest extended register state this CPU can have, 0 if unknown. */
size_t arch_xstate_size(void);

/* Generic part. */
/* Wait for tid's next ptrace stop (bounded by the freeze's timeout); 0 or an errno. */
int wait_stop(pid_t tid, int *status);
/* Resume with PTRACE_SYSCALL until the next syscall stop, holding back
 * signals; a PTRACE_EVENT_CLONE stop on the way puts the new tid in *cloned
 * (when not NULL). */
int run_to_syscall_stop(thread_t *t, pid_t *cloned);
/* The same, for a thread already resumed with PTRACE_SYSCALL (several run at once). */
int await_syscall_stop(thread_t *t, pid_t *cloned);
/* PTRACE_O_SUSPEND_SECCOMP on or off for a stopped thread of f, with
 * PTRACE_O_TRACESYSGOOD and the extra options given (0 when off). */
int suspend_seccomp(freeze_t *f, thread_t *t, bool on, long extra_options, tracer_error_t *error);
/* A thread born stopped (its tracer auto-attached it): wait for its first
 * stop, capture it, and add it to f. 0 or an errno. */
int adopt_thread(freeze_t *f, pid_t tid, tracer_error_t *error);
/* Run syscall nr in t (the body of tracer_inject); extra_options and cloned as above. */
int inject_in(freeze_t *f, thread_t *t, uint64_t insn, uint64_t nr, const uint64_t args[6], long extra_options, pid_t *cloned,
              uint64_t *rax, tracer_error_t *error);
void set_error(tracer_error_t *error, const char *syscall_name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
