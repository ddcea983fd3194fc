/* The tracer's x86_64 part: the register sets a thread is captured with, and
 * the syscall ABI of an injected call. The generic part is ptrace_freeze.c.
 *
 * tracer_inject   run one syscall in a stopped thread, then put every
 *                 register back as captured: on detach the kernel restarts
 *                 an interrupted syscall itself.
 * tracer_read_tid_addresses
 *                 each thread's clear_child_tid, by an injected
 *                 prctl(PR_GET_TID_ADDRESS) onto its own stack. */
#include "tracer.h"
#include "tracer_internal.h"

#include <cpuid.h>
#include <elf.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int inject_in(freeze_t *f, thread_t *t, uint64_t insn, uint64_t nr, const uint64_t args[6], long extra_options, pid_t *cloned,
              uint64_t *rax, tracer_error_t *error) {
  if (f->thawed || f->count == 0) {
    set_error(error, "ptrace", "inject a syscall after thaw");
    return EINVAL;
  }
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
  int err = suspend_seccomp(f, t, true, extra_options, error);
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
    suspend_seccomp(f, t, false, 0, error);
    set_error(error, "ptrace", "ptrace(PTRACE_SETREGS) on tid %d", t->tid);
    return err;
  }
  t->injected = true;
  /* Tests: hold the injected registers for a while (a controller killed now
   * must not leave them in the target). */
  const char *stall = getenv("WPSNAP_TRACER_STALL_US");
  if (stall != NULL) usleep((useconds_t)atoi(stall));
  err = run_to_syscall_stop(t, NULL); /* entry */
  if (err == 0) err = run_to_syscall_stop(t, cloned); /* exit (a clone's event stop comes between) */
  struct user_regs_struct after;
  if (err == 0 && ptrace(PTRACE_GETREGS, t->tid, NULL, &after) != 0) err = errno;
  if (err == 0 && ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs) != 0) err = errno;
  if (err == 0) suspend_seccomp(f, t, false, 0, error);
  if (err != 0) {
    set_error(error, "ptrace", "inject syscall %llu into tid %d", (unsigned long long)nr, t->tid);
    return err;
  }
  t->stop = STOP_SYSCALL;
  *rax = after.rax;
  return 0;
}

int tracer_inject(freeze_t *f, thread_t *t, uint64_t insn, uint64_t nr, const uint64_t args[6], uint64_t *rax, tracer_error_t *error) {
  return inject_in(f, t, insn, nr, args, 0, NULL, rax, error);
}

uint64_t tracer_syscall_insn(pid_t pid) {
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/%d/maps", pid);
  FILE *fp = fopen(path, "re");
  if (fp == NULL) return 0;
  unsigned long long start = 0, end = 0;
  bool found = false;
  while (!found && fgets(line, sizeof line, fp) != NULL)
    found = strstr(line, "[vdso]") != NULL && sscanf(line, "%llx-%llx", &start, &end) == 2;
  fclose(fp);
  if (!found || end <= start || end - start > 64 * 1024) return 0;
  static uint8_t code[64 * 1024];
  struct iovec local = {.iov_base = code, .iov_len = end - start};
  struct iovec remote = {.iov_base = (void *)(uintptr_t)start, .iov_len = end - start};
  ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  for (ssize_t i = 0; i + 1 < n; i++)
    if (code[i] == 0x0f && code[i + 1] == 0x05) return start + (uint64_t)i;
  return 0;
}

#define RED_ZONE 128
#define SYS_PRCTL 157
#define PR_GET_TID_ADDRESS_ 40

/* A thread of tracer_read_tid_addresses' batch. */
typedef struct {
  thread_t *t;
  uint64_t scratch, saved;
  stop_kind_t stop;
  bool ok;
} tid_probe_t;

void tracer_read_tid_addresses(freeze_t *f, uint64_t insn) {
  tid_probe_t *probes = insn != 0 && !f->thawed ? calloc(f->count, sizeof *probes) : NULL;
  if (probes == NULL) return;
  tracer_error_t ignored;
  size_t n = 0;
  for (size_t i = 0; i < f->count; i++) {
    thread_t *t = &f->threads[i];
    if (t->stop == STOP_SIGNAL) continue; /* PTRACE_SYSCALL would discard its signal */
    /* 8 bytes below the red zone: the thread's own stack, which it does not use while stopped. */
    tid_probe_t *p = &probes[n];
    p->scratch = (t->regs.rsp - RED_ZONE - 8) & ~(uint64_t)7;
    struct iovec local = {.iov_base = &p->saved, .iov_len = 8}, remote = {.iov_base = (void *)(uintptr_t)p->scratch, .iov_len = 8};
    /* SAFETY: reads 8 bytes of the stopped thread's stack; nothing changes. */
    if (process_vm_readv(f->pid, &local, 1, &remote, 1, 0) != 8) continue;
    if (!t->injected) t->resume_regs = t->regs;
    if (suspend_seccomp(f, t, true, 0, &ignored) != 0) continue;
    struct user_regs_struct inj = t->resume_regs;
    inj.rip = insn;
    inj.rax = SYS_PRCTL;
    inj.orig_rax = (unsigned long long)-1;
    inj.rdi = PR_GET_TID_ADDRESS_;
    inj.rsi = p->scratch;
    /* SAFETY: as in inject_in: the thread is stopped, t->injected makes detach_all restore resume_regs. */
    if (ptrace(PTRACE_SETREGS, t->tid, NULL, &inj) != 0) {
      suspend_seccomp(f, t, false, 0, &ignored);
      continue;
    }
    t->injected = true;
    *p = (tid_probe_t){.t = t, .scratch = p->scratch, .saved = p->saved, .stop = t->stop, .ok = true};
    n++;
  }
  /* Every thread runs its prctl at once (entry stops, then exit stops): the
   * tracer's round trips to each thread overlap instead of adding up. */
  for (int phase = 0; phase < 2; phase++) {
    for (size_t i = 0; i < n; i++)
      if (probes[i].ok && ptrace(PTRACE_SYSCALL, probes[i].t->tid, NULL, NULL) != 0) probes[i].ok = false;
    for (size_t i = 0; i < n; i++)
      if (probes[i].ok && await_syscall_stop(probes[i].t, NULL) != 0) probes[i].ok = false;
  }
  for (size_t i = 0; i < n; i++) {
    tid_probe_t *p = &probes[i];
    thread_t *t = p->t;
    struct user_regs_struct after;
    bool called = p->ok && ptrace(PTRACE_GETREGS, t->tid, NULL, &after) == 0 && after.rax == 0;
    /* SAFETY: the thread is in the exit stop of its prctl (when ok); detach_all sets these again anyway. */
    ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs);
    suspend_seccomp(f, t, false, 0, &ignored);
    t->stop = p->stop; /* a syscall-exit stop detaches as its interrupt stop did: the record keeps the stop it was found in */
    uint64_t value = 0;
    struct iovec local = {.iov_base = &value, .iov_len = 8}, remote = {.iov_base = (void *)(uintptr_t)p->scratch, .iov_len = 8};
    bool read = called && process_vm_readv(f->pid, &local, 1, &remote, 1, 0) == 8;
    /* SAFETY: puts back the 8 bytes prctl wrote over (unchanged if it did not run). */
    local.iov_base = &p->saved;
    process_vm_writev(f->pid, &local, 1, &remote, 1, 0);
    t->clear_child_tid = value;
    t->has_clear_child_tid = read;
  }
  free(probes);
}

int tracer_set_thread(freeze_t *f, pid_t tid, const struct user_regs_struct *regs, const struct user_fpregs_struct *fpregs,
                      const uint8_t *xstate, size_t xstate_len, const uint64_t *sigmask, tracer_error_t *error) {
  thread_t *t = tracer_thread(f, tid, error);
  if (t == NULL) return ESRCH;
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
