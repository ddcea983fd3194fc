/* The tracer (tracer.h), the part any architecture shares: freezing every
 * thread and thawing them, the helper's memory pool, signals held back during
 * an injection, seccomp suspension. Registers and the syscall ABI are in
 * ptrace_x86_64.c (tracer_internal.h lists what each side gives the other).
 *
 * tracer_freeze   PTRACE_SEIZE + PTRACE_INTERRUPT every listed thread, then
 *                 collect the stops (in parallel) and each one's registers
 *                 and blocked signal mask;
 *                 list again until nothing is new.
 * tracer_thaw     PTRACE_DETACH every thread, re-delivering signals that
 *                 arrived while they were stopped.
 * tracer_clone_thread
 *                 clone3 injected with PTRACE_O_TRACECLONE: the new thread
 *                 is adopted in its first stop, before it runs.
 * No PTRACE_O_EXITKILL: if the tracer dies the kernel detaches and the target runs on. */
#include "tracer.h"
#include "tracer_internal.h"

#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Waits for tracee stops block in waitpid (the stopping threads get the
 * CPU), for at most 5 s: SIGALRM, whose handler is installed without
 * SA_RESTART, interrupts them. */
static volatile sig_atomic_t wait_expired;
static void on_alarm(int sig) {
  (void)sig;
  wait_expired = 1;
}

static void arm_wait_timeout(bool on) {
  if (on) {
    struct sigaction alarm_action = {.sa_handler = on_alarm};
    sigaction(SIGALRM, &alarm_action, NULL);
    wait_expired = 0;
  }
  struct itimerval timeout = {.it_value = {.tv_sec = on ? 5 : 0}};
  setitimer(ITIMER_REAL, &timeout, NULL);
}

/* waitpid(which, __WALL) until it reports or the armed timeout expires:
 * the tid, or -1 with errno (ETIMEDOUT). libuv only reaps its own children
 * by pid, and the tracer helper has no children but its tracees. */
static pid_t wait_tracee(pid_t which, int *status) {
  for (;;) {
    pid_t r = waitpid(which, status, __WALL);
    if (r >= 0 || errno != EINTR) return r;
    if (wait_expired) {
      errno = ETIMEDOUT;
      return -1;
    }
  }
}

/* Wait for a ptrace stop of one tid. Returns 0 and the status, ESRCH if the
 * thread exited, ETIMEDOUT. */
int wait_stop(pid_t tid, int *status) {
  arm_wait_timeout(true);
  pid_t r = wait_tracee(tid, status);
  int err = r == tid ? 0 : errno == ECHILD ? ESRCH : errno;
  arm_wait_timeout(false);
  if (err == 0 && (WIFEXITED(*status) || WIFSIGNALED(*status))) return ESRCH;
  return err;
}

static thread_t *find_thread(freeze_t *f, pid_t tid) {
  for (size_t i = 0; i < f->count; i++)
    if (f->threads[i].tid == tid) return &f->threads[i];
  return NULL;
}

thread_t *tracer_thread(freeze_t *f, pid_t tid, tracer_error_t *error) {
  thread_t *t = f->thawed ? NULL : find_thread(f, tid);
  if (t == NULL) set_error(error, "ptrace", "tid %d is not frozen", tid);
  return t;
}

/* Put the first signal held back during an injection where it would have
 * been: the thread, its registers already restored, is resumed just far
 * enough to stop for that signal's delivery (re-raised with tgkill), and the
 * siginfo of that stop is replaced by the original one, so the detach
 * delivers the signal exactly as it was sent (SI_USER and the sender's pid,
 * a sigqueue value…). A signal the thread blocks now stays pending instead,
 * as it would have. Returns true if the held-back signal is dealt with. */
static bool redeliver(freeze_t *f, thread_t *t) {
  int sig = t->requeue[0];
  uint64_t blocked = 0;
  if (ptrace(PTRACE_GETSIGMASK, t->tid, (void *)sizeof blocked, &blocked) != 0) return false;
  if (blocked & (1ULL << (sig - 1))) return false;
  /* SAFETY: the thread is in the syscall-exit-stop of our injected call. */
  if (arch_set_regs(t->tid, &t->resume_regs) != 0) return false;
  if (syscall(SYS_tgkill, f->pid, t->tid, sig) != 0) return false;
  /* From here the re-raised signal is queued: it must not be sent again. */
  if (ptrace(PTRACE_CONT, t->tid, NULL, NULL) != 0) return true;
  int status = 0;
  if (wait_stop(t->tid, &status) != 0) return true;
  int got = WSTOPSIG(status);
  t->stop = STOP_SIGNAL;
  t->deliver_sig = got;
  /* Another pending signal may come first: it is delivered at the detach,
   * and ours stays queued (with tgkill's siginfo). */
  if (got == sig && t->requeue_has_info[0]) ptrace(PTRACE_SETSIGINFO, t->tid, NULL, &t->requeue_info[0]);
  return true;
}

static void detach_all(freeze_t *f) {
  if (f->thawed) return;
  f->thawed = true;
  for (size_t i = 0; i < f->count; i++) {
    thread_t *t = &f->threads[i];
    if (t->nrequeue > 0 && t->stop != STOP_SIGNAL && redeliver(f, t)) {
      memmove(t->requeue, t->requeue + 1, (size_t)(t->nrequeue - 1) * sizeof t->requeue[0]);
      t->nrequeue--;
    }
    if (t->injected) {
      /* SAFETY: the thread is in a syscall-exit-stop of our injected call;
       * resume_regs were already set, this is a second guard. */
      arch_set_regs(t->tid, &t->resume_regs);
    }
    ptrace(PTRACE_DETACH, t->tid, NULL, (void *)(long)(t->stop == STOP_SIGNAL ? t->deliver_sig : 0));
  }
  for (size_t i = 0; i < f->count; i++)
    for (int k = 0; k < f->threads[i].nrequeue; k++) syscall(SYS_tgkill, f->pid, f->threads[i].tid, f->threads[i].requeue[k]);
}

static void classify_stop(thread_t *t, int status) {
  int sig = WSTOPSIG(status);
  int event = (status >> 16) & 0xff;
  if (event == PTRACE_EVENT_STOP) {
    t->stop = STOP_INTERRUPT;
  } else if (sig == (SIGTRAP | 0x80)) {
    t->stop = STOP_SYSCALL;
  } else {
    t->stop = STOP_SIGNAL;
    t->deliver_sig = sig;
  }
}


/* The prepared pool: thread records and XSAVE areas of XSTATE slot bytes each. */
static thread_t *pool;
static uint8_t *xstate_pool;
static size_t xstate_slot = XSTATE_MAX;

/* Touch the pool in the background: the helper starts just before the pause
 * (4.6 MB take about 3 ms to fault in on this VM) and must answer FREEZE at
 * once. A freeze reaching pages not touched yet faults them itself. */
static void *populate_pool(void *arg) {
  size_t len = (size_t)(uintptr_t)arg;
  setpriority(PRIO_PROCESS, (id_t)gettid(), 19); /* after the target's threads */
  for (size_t at = 0; at < len; at += 256 * 1024) {
    size_t n = len - at < 256 * 1024 ? len - at : 256 * 1024;
    if (madvise((char *)pool + at, n, MADV_POPULATE_WRITE) != 0) break;
  }
  return NULL;
}

void tracer_prepare(void) {
  size_t extended = arch_xstate_size();
  if (extended > 0 && extended <= XSTATE_MAX) xstate_slot = (extended + 63) & ~(size_t)63;
  size_t records = TRACER_POOL_THREADS * sizeof(thread_t), areas = TRACER_POOL_THREADS * xstate_slot;
  /* SAFETY: a fresh private mapping, never unmapped. */
  void *p = mmap(NULL, records + areas, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return; /* freezes then allocate as they go */
  pool = p;
  xstate_pool = (uint8_t *)p + records;
  /* Every signal blocked in the toucher: SIGALRM must interrupt the main thread's waitpid. */
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  pthread_t toucher;
  if (pthread_create(&toucher, NULL, populate_pool, (void *)(uintptr_t)(records + areas)) == 0) pthread_detach(toucher);
  pthread_sigmask(SIG_SETMASK, &previous, NULL);
}

static bool in_pool(const void *p) {
  const uint8_t *b = p;
  return pool != NULL && b >= (const uint8_t *)pool && b < xstate_pool + TRACER_POOL_THREADS * xstate_slot;
}

static size_t xstate_cap(const thread_t *t) {
  return in_pool(t->xstate) ? xstate_slot : XSTATE_MAX;
}

/* A new record at the end of f->threads, or NULL without memory. */
static thread_t *add_thread(freeze_t *f, pid_t tid) {
  if (f->count == f->cap) {
    size_t cap = f->cap ? f->cap * 2 : 64;
    thread_t *grown = in_pool(f->threads) ? malloc(cap * sizeof *grown) : realloc(f->threads, cap * sizeof *grown);
    if (grown == NULL) return NULL;
    if (in_pool(f->threads)) memcpy(grown, f->threads, f->count * sizeof *grown);
    f->threads = grown;
    f->cap = cap;
  }
  /* Pool slots are handed out in order and never reused within a freeze. */
  uint8_t *xstate = pool != NULL && f->pool_slots < TRACER_POOL_THREADS ? xstate_pool + f->pool_slots++ * xstate_slot : malloc(XSTATE_MAX);
  if (xstate == NULL) return NULL;
  thread_t *t = &f->threads[f->count++];
  memset(t, 0, sizeof *t);
  t->tid = tid;
  t->xstate = xstate;
  return t;
}

static void drop_thread(freeze_t *f, size_t i) {
  thread_t *t = &f->threads[i];
  if (!in_pool(t->xstate)) free(t->xstate);
  f->threads[i] = f->threads[--f->count];
}

/* A thread's stop, just collected: its kind, registers, blocked signal mask
 * and robust list. 0 or an errno (what names the failing call). */
static int capture_stopped(thread_t *t, int status, char *what, size_t what_len) {
  t->stopped = true;
  classify_stop(t, status);
  int err = arch_capture_regs(t, xstate_cap(t));
  if (err != 0) {
    snprintf(what, what_len, "ptrace(PTRACE_GETREGS) on tid %d", t->tid);
    return err;
  }
  /* SAFETY: the thread is in a ptrace stop; GETSIGMASK reads its blocked
   * set (8 bytes: the kernel refuses any other size) and changes nothing. */
  if (ptrace(PTRACE_GETSIGMASK, t->tid, (void *)sizeof t->sigmask, &t->sigmask) != 0) {
    snprintf(what, what_len, "ptrace(PTRACE_GETSIGMASK) on tid %d", t->tid);
    return errno;
  }
  /* get_robust_list(tid): a read of the thread's task (ptrace read access,
   * which a tracer has); no value when it fails. */
  void *head = NULL;
  size_t len = 0;
  t->has_robust_list = syscall(SYS_get_robust_list, t->tid, &head, &len) == 0;
  t->robust_list_head = (uint64_t)(uintptr_t)head;
  t->robust_list_len = len;
  return 0;
}

/* Collect the stops of threads first.. (all interrupted already, they stop
 * in parallel), capturing each one's registers at once. A blocking
 * waitpid(tid) costs O(1) in the kernel and wakes only for that tid;
 * waitpid(-1) would scan every tracee on every call and wake on every stop
 * (O(threads^2)). A thread that exited is dropped. At most 5 s in all. */
static int collect_stops(freeze_t *f, size_t first, char *what, size_t what_len) {
  arm_wait_timeout(true);
  int err = 0;
  for (size_t i = first; i < f->count && err == 0;) {
    thread_t *t = &f->threads[i];
    int status = 0;
    pid_t tid = wait_tracee(t->tid, &status);
    if (tid < 0) {
      err = errno == ECHILD ? ESRCH : errno;
      snprintf(what, what_len, "waitpid(tid %d) for its interrupt stop", t->tid);
      break;
    }
    if (WIFEXITED(status) || WIFSIGNALED(status)) {
      drop_thread(f, i); /* the last record moves to i */
      continue;
    }
    err = capture_stopped(t, status, what, what_len);
    i++;
  }
  arm_wait_timeout(false);
  return err;
}

/* Seize and interrupt every thread listed in /proc/PID/task that is not yet
 * ours, then collect their stops. Returns the number of new threads or -errno. */
static int seize_new_threads(freeze_t *f, char *what, size_t what_len) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/task", f->pid);
  DIR *dir = opendir(path);
  if (dir == NULL) {
    int err = errno == ENOENT ? ESRCH : errno; /* no such process */
    snprintf(what, what_len, "pid %d: opendir(%s)", f->pid, path);
    return -err;
  }
  size_t first_new = f->count;
  int seize_err = 0;
  struct dirent *de;
  while ((de = readdir(dir)) != NULL) {
    if (de->d_name[0] < '0' || de->d_name[0] > '9') continue;
    pid_t tid = (pid_t)atoi(de->d_name);
    if (find_thread(f, tid)) continue;
    /* SAFETY: SEIZE does not stop the thread; TRACESYSGOOD marks syscall stops
     * with 0x80 so they cannot be mistaken for a SIGTRAP. */
    if (ptrace(PTRACE_SEIZE, tid, NULL, (void *)(long)PTRACE_O_TRACESYSGOOD) != 0) {
      if (errno == ESRCH) continue; /* exited meanwhile */
      /* Threads seized so far are being interrupted: they must reach their
       * stop before PTRACE_DETACH can release them (it fails with ESRCH on a
       * running tracee, which would then stop later with nobody to resume it). */
      seize_err = errno;
      snprintf(what, what_len, "ptrace(PTRACE_SEIZE) on tid %d", tid);
      break;
    }
    thread_t *t = add_thread(f, tid);
    if (t == NULL) {
      /* No room to keep it: stop it and let it go at once (PTRACE_DETACH needs a stopped tracee). */
      int status;
      ptrace(PTRACE_INTERRUPT, tid, NULL, NULL);
      if (wait_stop(tid, &status) == 0) ptrace(PTRACE_DETACH, tid, NULL, NULL);
      seize_err = ENOMEM;
      snprintf(what, what_len, "memory for the registers of tid %d", tid);
      break;
    }
    /* SAFETY: INTERRUPT makes a seized thread enter a PTRACE_EVENT_STOP at its
     * next kernel exit; a blocking syscall returns with a restart code. */
    ptrace(PTRACE_INTERRUPT, tid, NULL, NULL);
  }
  closedir(dir);
  size_t listed = f->count - first_new;
  char wait_what[128] = "";
  int err = collect_stops(f, first_new, wait_what, sizeof wait_what);
  if (seize_err) return -seize_err;
  if (err) {
    snprintf(what, what_len, "%s", wait_what);
    return -err;
  }
  return (int)listed; /* seized now: stopped, or exited since */
}

/* Resume with PTRACE_SYSCALL until the next syscall stop. A signal that
 * arrives meanwhile is held back (with its siginfo) and given back at the
 * detach (redeliver). */
int run_to_syscall_stop(thread_t *t, pid_t *cloned) {
  if (ptrace(PTRACE_SYSCALL, t->tid, NULL, NULL) != 0) return errno;
  return await_syscall_stop(t, cloned);
}

int await_syscall_stop(thread_t *t, pid_t *cloned) {
  /* A fault the thread takes again and again (SIGSEGV from the kernel when
   * its rseq area is not mapped, say) would loop here forever: give up. */
  int same = 0, last = 0;
  for (bool resumed = true;; resumed = ptrace(PTRACE_SYSCALL, t->tid, NULL, NULL) == 0) {
    if (!resumed) return errno;
    int status = 0;
    int err = wait_stop(t->tid, &status);
    if (err != 0) return err;
    int sig = WSTOPSIG(status);
    if (sig == (SIGTRAP | 0x80)) return 0;
    if (cloned != NULL && status >> 8 == (SIGTRAP | (PTRACE_EVENT_CLONE << 8))) {
      unsigned long msg = 0;
      /* SAFETY: in a PTRACE_EVENT_CLONE stop the event message is the new thread's tid. */
      if (ptrace(PTRACE_GETEVENTMSG, t->tid, NULL, &msg) == 0) *cloned = (pid_t)msg;
    }
    same = sig == last ? same + 1 : 0;
    last = sig;
    if (same >= 64 && (sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE)) return EFAULT;
    if (((status >> 16) & 0xff) == 0 && sig != SIGTRAP && t->nrequeue < MAX_REQUEUE) {
      int k = t->nrequeue++;
      t->requeue[k] = sig;
      t->requeue_has_info[k] = ptrace(PTRACE_GETSIGINFO, t->tid, NULL, &t->requeue_info[k]) == 0;
    }
  }
}

void set_error(tracer_error_t *error, const char *syscall_name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void set_error(tracer_error_t *error, const char *syscall_name, const char *fmt, ...) {
  snprintf(error->syscall, sizeof error->syscall, "%s", syscall_name);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(error->what, sizeof error->what, fmt, ap);
  va_end(ap);
}

void tracer_free(freeze_t *f) {
  if (f == NULL) return;
  for (size_t i = 0; i < f->count; i++)
    if (!in_pool(f->threads[i].xstate)) free(f->threads[i].xstate);
  if (!in_pool(f->threads)) free(f->threads);
  free(f);
}

static size_t choose_injection_thread(const freeze_t *f);

int tracer_freeze(pid_t pid, freeze_t **out, tracer_error_t *error) {
  freeze_t *f = calloc(1, sizeof *f);
  if (f == NULL) return ENOMEM;
  f->pid = pid;
  if (pool != NULL) {
    f->threads = pool;
    f->cap = TRACER_POOL_THREADS;
  }
  char what[160] = "";
  for (int round = 0; round < 100; round++) {
    int added = seize_new_threads(f, what, sizeof what);
    if (added < 0) {
      tracer_thaw(f);
      tracer_free(f);
      set_error(error, strstr(what, "waitpid") ? "waitpid" : "ptrace", "%s", what);
      return -added;
    }
    /* Stopped threads create no threads: a listing with nothing new is final. */
    if (added == 0) break;
  }
  if (f->count == 0) {
    tracer_thaw(f);
    tracer_free(f);
    set_error(error, "ptrace", "freeze pid %d: no thread could be stopped", pid);
    return ESRCH;
  }
  f->injection_tid = f->threads[choose_injection_thread(f)].tid;
  *out = f;
  return 0;
}

/* The thread injections run in: one in an interrupt stop that is not the
 * leader, by preference (the leader's tid is the process id, which a
 * parent's waitpid(pid) could also collect). */
static size_t choose_injection_thread(const freeze_t *f) {
  size_t chosen = f->count;
  for (size_t i = 0; i < f->count; i++) {
    const thread_t *c = &f->threads[i];
    if (c->stop == STOP_SIGNAL) continue;
    if (chosen == f->count || (f->threads[chosen].tid == f->pid && c->tid != f->pid)) chosen = i;
  }
  return chosen != f->count ? chosen : 0;
}

size_t tracer_injection_thread(const freeze_t *f) {
  for (size_t i = 0; i < f->count; i++)
    if (f->threads[i].tid == f->injection_tid) return i;
  return 0;
}

void tracer_thaw(freeze_t *f) {
  detach_all(f);
}

/* Seccomp mode of a process (Seccomp: in /proc/PID/status): 0 none, 1 strict, 2 filter. */
static int seccomp_mode(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *fp = fopen(path, "re");
  if (fp == NULL) return 0;
  int mode = 0;
  while (fgets(line, sizeof line, fp) != NULL) {
    if (sscanf(line, "Seccomp: %d", &mode) == 1) break;
  }
  fclose(fp);
  return mode;
}

/* PTRACE_O_SUSPEND_SECCOMP on (or off again) for a stopped thread. Turning
 * it on fails without CAP_SYS_ADMIN or CONFIG_CHECKPOINT_RESTORE; that
 * matters only if the process is under seccomp, and then nothing is injected. */
int suspend_seccomp(freeze_t *f, thread_t *t, bool on, long extra_options, tracer_error_t *error) {
  long options = PTRACE_O_TRACESYSGOOD | extra_options | (on ? PTRACE_O_SUSPEND_SECCOMP : 0);
  if (ptrace(PTRACE_SETOPTIONS, t->tid, NULL, (void *)options) == 0 || !on) return 0;
  int err = errno;
  int mode = seccomp_mode(f->pid);
  if (mode == 0) {
    /* Nothing to suspend; the extra options (PTRACE_O_TRACECLONE) are still needed. */
    if (extra_options == 0 || ptrace(PTRACE_SETOPTIONS, t->tid, NULL, (void *)(options & ~(long)PTRACE_O_SUSPEND_SECCOMP)) == 0) return 0;
    err = errno;
    set_error(error, "ptrace", "ptrace(PTRACE_SETOPTIONS, 0x%lx) on tid %d", options & ~(long)PTRACE_O_SUSPEND_SECCOMP, t->tid);
    return err;
  }
  set_error(error, "ptrace",
            "pid %d runs under seccomp (%s mode) and its filter cannot be suspended for the injected call "
            "(PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN)",
            f->pid, mode == 1 ? "strict" : "filter");
  return err == EINVAL ? EPERM : err;
}


int adopt_thread(freeze_t *f, pid_t tid, tracer_error_t *error) {
  int status = 0;
  int err = wait_stop(tid, &status);
  if (err != 0) {
    set_error(error, "waitpid", "waitpid(tid %d) for the first stop of the new thread", tid);
    return err;
  }
  /* SAFETY: the new thread is in its first stop; it inherited its parent's
   * options (PTRACE_O_TRACECLONE, PTRACE_O_SUSPEND_SECCOMP): it gets the freeze's own. */
  ptrace(PTRACE_SETOPTIONS, tid, NULL, (void *)(long)PTRACE_O_TRACESYSGOOD);
  thread_t *t = add_thread(f, tid);
  if (t == NULL) {
    set_error(error, "ptrace", "memory for the registers of the new thread %d", tid);
    return ENOMEM;
  }
  char what[128] = "";
  err = capture_stopped(t, status, what, sizeof what);
  if (err != 0) set_error(error, "ptrace", "%s", what);
  return err;
}

#define SYS_CLONE3_ 435

int tracer_clone_thread(freeze_t *f, uint64_t insn, uint64_t args, uint64_t size, int64_t *result, tracer_error_t *error) {
  if (f->thawed || f->count == 0) {
    set_error(error, "ptrace", "clone a thread after thaw");
    return EINVAL;
  }
  thread_t *t = &f->threads[tracer_injection_thread(f)];
  uint64_t call[6] = {args, size}, rax = 0;
  pid_t cloned = 0;
  /* PTRACE_O_TRACECLONE for this call only: the kernel attaches the new
   * thread to this tracer before it runs, and it starts in a
   * PTRACE_EVENT_STOP (a seized tracer's auto-attach), never in user code. */
  int err = inject_in(f, t, insn, SYS_CLONE3_, call, PTRACE_O_TRACECLONE, &cloned, &rax, error);
  if (err != 0) {
    /* A thread created before the failure is still born stopped, and ours: keep it. */
    if (cloned > 0) adopt_thread(f, cloned, error);
    return err;
  }
  if ((int64_t)rax < 0) {
    *result = (int64_t)rax;
    return 0;
  }
  if (cloned <= 0) {
    set_error(error, "ptrace", "clone3 returned %lld in tid %d without a PTRACE_EVENT_CLONE stop", (long long)rax, t->tid);
    return EPROTO;
  }
  err = adopt_thread(f, cloned, error);
  if (err != 0) return err;
  *result = cloned;
  return 0;
}
