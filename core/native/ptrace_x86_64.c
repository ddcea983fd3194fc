/* The tracer's x86_64 part: the register sets a thread is captured with, and
 * the syscall ABI of an injected call. The generic part is ptrace_freeze.c.
 *
 * tracer_inject   run one syscall in a stopped thread, then put every
 *                 register back as captured: on detach the kernel restarts
 *                 an interrupted syscall itself. */
#include "tracer.h"
#include "tracer_internal.h"

#include <cpuid.h>
#include <elf.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <unistd.h>

int arch_capture_regs(thread_t *t, size_t xstate_cap) {
  if (ptrace(PTRACE_GETREGS, t->tid, NULL, &t->regs) != 0) return errno;
  if (ptrace(PTRACE_GETFPREGS, t->tid, NULL, &t->fpregs) != 0) return errno;
  struct iovec iov = {.iov_base = t->xstate, .iov_len = xstate_cap};
  t->xstate_len = ptrace(PTRACE_GETREGSET, t->tid, (void *)NT_X86_XSTATE, &iov) == 0 ? iov.iov_len : 0;
  t->resume_regs = t->regs;
  return 0;
}

int arch_set_regs(pid_t tid, const struct user_regs_struct *regs) {
  /* SAFETY: the thread is in a ptrace stop; SETREGS only changes what it resumes with. */
  return ptrace(PTRACE_SETREGS, tid, NULL, regs) == 0 ? 0 : errno;
}

/* CPUID 0xD: ecx is the XSAVE area size of every feature the CPU has, an
 * upper bound of what NT_X86_XSTATE returns; 0 if unknown. */
size_t arch_xstate_size(void) {
  unsigned eax, ebx, ecx = 0, edx;
  return __get_cpuid_count(0xd, 0, &eax, &ebx, &ecx, &edx) ? ecx : 0;
}

int tracer_inject(freeze_t *f, uint64_t insn, uint64_t nr, const uint64_t args[6], uint64_t *rax, tracer_error_t *error) {
  if (f->thawed || f->count == 0) {
    set_error(error, "ptrace", "inject a syscall after thaw");
    return EINVAL;
  }
  thread_t *t = &f->threads[tracer_injection_thread(f)];
  /* Resume with the registers exactly as captured, orig_rax and a restart code
   * in rax included: PTRACE_DETACH (or the tracer's death) sets TIF_SIGPENDING
   * (__ptrace_unlink -> ptrace_signal_wake_up), so on its way out the kernel
   * applies the same restart logic as if the thread had never been stopped,
   * including -EINTR when a signal handler runs first. Pre-applying the
   * restart here (orig_rax = -1) would restart pause()/ERESTARTNOHAND calls
   * after a handler instead of returning EINTR. */
  if (!t->injected) t->resume_regs = t->regs;

  /* A seccomp filter may refuse the injected call, or kill the process for
   * it (systemd's SystemCallFilter= does by default): suspend it for the
   * injection, in this stopped thread only. */
  int err = suspend_seccomp(f, t, true, error);
  if (err != 0) return err;

  struct user_regs_struct inj = t->resume_regs;
  inj.rip = insn;
  inj.rax = nr;
  inj.orig_rax = (unsigned long long)-1; /* no restart fix-up on the way out of the stop */
  inj.rdi = args[0];
  inj.rsi = args[1];
  inj.rdx = args[2];
  inj.r10 = args[3];
  inj.r8 = args[4];
  inj.r9 = args[5];
  /* SAFETY: the thread is in a ptrace stop; SETREGS only changes what it
   * resumes with. t->injected makes detach_all restore resume_regs. */
  if (ptrace(PTRACE_SETREGS, t->tid, NULL, &inj) != 0) {
    err = errno;
    set_error(error, "ptrace", "ptrace(PTRACE_SETREGS) on tid %d", t->tid);
    return err;
  }
  t->injected = true;
  /* Tests: hold the injected registers for a while (a controller killed now
   * must not leave them in the target). */
  const char *stall = getenv("WPSNAP_TRACER_STALL_US");
  if (stall != NULL) usleep((useconds_t)atoi(stall));
  err = run_to_syscall_stop(t); /* entry */
  if (err == 0) err = run_to_syscall_stop(t); /* exit */
  struct user_regs_struct after;
  if (err == 0 && ptrace(PTRACE_GETREGS, t->tid, NULL, &after) != 0) err = errno;
  if (err == 0 && ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs) != 0) err = errno;
  if (err == 0) suspend_seccomp(f, t, false, error);
  if (err != 0) {
    set_error(error, "ptrace", "inject syscall %llu into tid %d", (unsigned long long)nr, t->tid);
    return err;
  }
  t->stop = STOP_SYSCALL;
  *rax = after.rax;
  return 0;
}

int tracer_set_thread(freeze_t *f, pid_t tid, const struct user_regs_struct *regs, const struct user_fpregs_struct *fpregs,
                      const uint8_t *xstate, size_t xstate_len, const uint64_t *sigmask, tracer_error_t *error) {
  thread_t *t = NULL;
  for (size_t i = 0; i < f->count && t == NULL; i++)
    if (f->threads[i].tid == tid) t = &f->threads[i];
  if (f->thawed || t == NULL) {
    set_error(error, "ptrace", "tid %d is not frozen", tid);
    return ESRCH;
  }
  /* SAFETY: the thread is in a ptrace stop; it resumes with these registers
   * at the detach (t->injected makes detach_all put them back once more). */
  if (ptrace(PTRACE_SETREGS, tid, NULL, regs) != 0) {
    int err = errno;
    set_error(error, "ptrace", "ptrace(PTRACE_SETREGS) on tid %d", tid);
    return err;
  }
  t->resume_regs = *regs;
  t->injected = true;
  if (xstate_len > 0) {
    struct iovec iov = {.iov_base = (void *)xstate, .iov_len = xstate_len};
    if (ptrace(PTRACE_SETREGSET, tid, (void *)NT_X86_XSTATE, &iov) != 0) {
      int err = errno;
      set_error(error, "ptrace", "ptrace(PTRACE_SETREGSET, NT_X86_XSTATE) on tid %d", tid);
      return err;
    }
  } else if (ptrace(PTRACE_SETFPREGS, tid, NULL, fpregs) != 0) {
    int err = errno;
    set_error(error, "ptrace", "ptrace(PTRACE_SETFPREGS) on tid %d", tid);
    return err;
  }
  /* SAFETY: the thread is in a ptrace stop; SETSIGMASK replaces its blocked
   * set (the kernel drops SIGKILL and SIGSTOP from it) without delivering
   * anything now; a signal it unblocks is delivered once it runs. */
  if (sigmask != NULL && ptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof *sigmask, sigmask) != 0) {
    int err = errno;
    set_error(error, "ptrace", "ptrace(PTRACE_SETSIGMASK) on tid %d", tid);
    return err;
  }
  return 0;
}
