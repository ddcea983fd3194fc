/* Freezing a process with ptrace and injecting syscalls into it (x86_64 only:
 * register layout and the syscall ABI live in this file).
 *
 * freeze(pid)            PTRACE_SEIZE + PTRACE_INTERRUPT every thread, wait for
 *                        every stop, capture each thread's registers.
 * injectSyscall(h, ...)  run one syscall in a stopped thread, then put every
 *                        register back as captured: on detach the kernel
 *                        restarts an interrupted syscall itself.
 * thaw(h)                PTRACE_DETACH every thread, re-delivering signals that
 *                        arrived while they were stopped.
 * No PTRACE_O_EXITKILL: if wpsnap dies the kernel detaches and the target runs on. */
#include "addon.h"
#include "napi_util.h"

#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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
  uint8_t xstate[XSTATE_MAX];
  size_t xstate_len;
  bool injected;
} thread_t;

typedef struct {
  pid_t pid;
  thread_t *threads;
  size_t count, cap;
  bool thawed;
} freeze_t;

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Wait for a ptrace stop of one tid: yield for a short while (a stop usually
 * takes microseconds), then poll with short sleeps so that on a loaded
 * machine the stopping threads get the CPU. libuv only reaps its own
 * children by pid, so __WALL waits on a tid are ours.
 * Returns 0 and the status, ESRCH if the thread exited, ETIMEDOUT. */
static int wait_stop(pid_t tid, int *status) {
  double start = now_us();
  for (unsigned polls = 0;; polls++) {
    pid_t r = waitpid(tid, status, __WALL | WNOHANG);
    if (r == tid) {
      if (WIFEXITED(*status) || WIFSIGNALED(*status)) return ESRCH;
      return 0;
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno == ECHILD ? ESRCH : errno;
    }
    if (now_us() - start > 5e6) return ETIMEDOUT;
    if (polls < 500) {
      sched_yield();
    } else {
      struct timespec ts = {0, 20000};
      nanosleep(&ts, NULL);
    }
  }
}

static thread_t *find_thread(freeze_t *f, pid_t tid) {
  for (size_t i = 0; i < f->count; i++)
    if (f->threads[i].tid == tid) return &f->threads[i];
  return NULL;
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
  if (ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs) != 0) return false;
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
      ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs);
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

static int capture_regs(thread_t *t) {
  if (ptrace(PTRACE_GETREGS, t->tid, NULL, &t->regs) != 0) return errno;
  if (ptrace(PTRACE_GETFPREGS, t->tid, NULL, &t->fpregs) != 0) return errno;
  struct iovec iov = {.iov_base = t->xstate, .iov_len = sizeof t->xstate};
  t->xstate_len = ptrace(PTRACE_GETREGSET, t->tid, (void *)NT_X86_XSTATE, &iov) == 0 ? iov.iov_len : 0;
  t->resume_regs = t->regs;
  return 0;
}

/* Seize and interrupt every thread listed in /proc/PID/task that is not yet
 * ours, then wait for their stops. Returns the number of new threads or -errno. */
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
  pid_t seize_tid = 0;
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
      seize_tid = tid;
      break;
    }
    if (f->count == f->cap) {
      f->cap = f->cap ? f->cap * 2 : 16;
      f->threads = realloc(f->threads, f->cap * sizeof(thread_t));
    }
    thread_t *t = &f->threads[f->count++];
    memset(t, 0, sizeof *t);
    t->tid = tid;
    /* SAFETY: INTERRUPT makes a seized thread enter a PTRACE_EVENT_STOP at its
     * next kernel exit; a blocking syscall returns with a restart code. */
    ptrace(PTRACE_INTERRUPT, tid, NULL, NULL);
  }
  closedir(dir);
  size_t w = first_new;
  int first_err = 0;
  for (size_t i = first_new; i < f->count; i++) {
    thread_t *t = &f->threads[i];
    int status = 0;
    int err = wait_stop(t->tid, &status);
    if (err == ESRCH) continue; /* exited: drop it */
    if (err != 0) {
      if (!first_err) snprintf(what, what_len, "waitpid(tid %d) for the interrupt stop", t->tid);
      if (!first_err) first_err = err;
      f->threads[w++] = *t; /* keep it: detach_all tries again */
      continue;
    }
    classify_stop(t, status);
    err = capture_regs(t);
    if (err != 0 && !first_err) {
      snprintf(what, what_len, "ptrace(PTRACE_GETREGS) on tid %d", t->tid);
      first_err = err;
    }
    f->threads[w++] = *t;
  }
  size_t added = w - first_new;
  f->count = w;
  if (seize_err) {
    snprintf(what, what_len, "ptrace(PTRACE_SEIZE) on tid %d", seize_tid);
    return -seize_err;
  }
  if (first_err) return -first_err;
  return (int)added;
}

static void freeze_finalize(napi_env env, void *data, void *hint) {
  freeze_t *f = data;
  detach_all(f);
  free(f->threads);
  free(f);
}

static freeze_t *get_freeze(napi_env env, napi_value v) {
  void *data = NULL;
  if (napi_get_value_external(env, v, &data) != napi_ok) return NULL;
  return data;
}

/* freeze(pid) -> handle */
static napi_value js_freeze(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t pid;
  if (argc < 1 || !arg_int32(env, argv[0], &pid) || pid <= 0) return throw_type(env, "freeze(pid)");
  freeze_t *f = calloc(1, sizeof *f);
  f->pid = pid;
  char what[128] = "";
  int prev_slack = prctl(PR_GET_TIMERSLACK);
  prctl(PR_SET_TIMERSLACK, 1);
  int total = 0;
  for (int round = 0; round < 100; round++) {
    int added = seize_new_threads(f, what, sizeof what);
    if (added < 0) {
      prctl(PR_SET_TIMERSLACK, prev_slack);
      detach_all(f);
      free(f->threads);
      free(f);
      return throw_errno(env, -added, strstr(what, "waitpid") ? "waitpid" : "ptrace", "%s", what);
    }
    total += added;
    /* Stopped threads create no threads: a listing with nothing new is final. */
    if (added == 0) break;
  }
  prctl(PR_SET_TIMERSLACK, prev_slack);
  if (total == 0) {
    detach_all(f);
    free(f->threads);
    free(f);
    return throw_errno(env, ESRCH, "ptrace", "freeze pid %d: no thread could be stopped", pid);
  }
  napi_value handle;
  NAPI_CALL(env, napi_create_external(env, f, freeze_finalize, NULL, &handle));
  return handle;
}

/* frozenThreads(h) -> [{tid, regs, fpregs, xstate, stop}] */
static napi_value js_frozen_threads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  freeze_t *f = argc ? get_freeze(env, argv[0]) : NULL;
  if (f == NULL) return throw_type(env, "frozenThreads(handle)");
  napi_value arr;
  NAPI_CALL(env, napi_create_array_with_length(env, f->count, &arr));
  for (size_t i = 0; i < f->count; i++) {
    thread_t *t = &f->threads[i];
    napi_value o;
    NAPI_CALL(env, napi_create_object(env, &o));
    set_prop(env, o, "tid", make_int(env, t->tid));
    set_prop(env, o, "regs", make_buffer_copy(env, &t->regs, sizeof t->regs));
    set_prop(env, o, "fpregs", make_buffer_copy(env, &t->fpregs, sizeof t->fpregs));
    set_prop(env, o, "xstate", make_buffer_copy(env, t->xstate, t->xstate_len));
    set_prop(env, o, "stop", make_string(env, t->stop == STOP_INTERRUPT ? "interrupt" : t->stop == STOP_SIGNAL ? "signal" : "syscall"));
    napi_set_element(env, arr, (uint32_t)i, o);
  }
  return arr;
}

/* Resume with PTRACE_SYSCALL until the next syscall stop. A signal that
 * arrives meanwhile is held back (with its siginfo) and given back at the
 * detach (redeliver). */
static int run_to_syscall_stop(thread_t *t) {
  for (;;) {
    if (ptrace(PTRACE_SYSCALL, t->tid, NULL, NULL) != 0) return errno;
    int status = 0;
    int err = wait_stop(t->tid, &status);
    if (err != 0) return err;
    int sig = WSTOPSIG(status);
    if (sig == (SIGTRAP | 0x80)) return 0;
    if (((status >> 16) & 0xff) == 0 && sig != SIGTRAP && t->nrequeue < MAX_REQUEUE) {
      int k = t->nrequeue++;
      t->requeue[k] = sig;
      t->requeue_has_info[k] = ptrace(PTRACE_GETSIGINFO, t->tid, NULL, &t->requeue_info[k]) == 0;
    }
  }
}

/* injectSyscall(h, insnAddress, nr, args[]) -> bigint (raw rax, two's complement) */
static napi_value js_inject_syscall(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  freeze_t *f = argc >= 4 ? get_freeze(env, argv[0]) : NULL;
  uint64_t insn, nr;
  if (f == NULL || !arg_uint64(env, argv[1], &insn) || !arg_uint64(env, argv[2], &nr))
    return throw_type(env, "injectSyscall(handle, insnAddress, nr, args)");
  uint64_t args[6] = {0};
  uint32_t nargs = 0;
  napi_get_array_length(env, argv[3], &nargs);
  for (uint32_t i = 0; i < nargs && i < 6; i++) {
    napi_value v;
    napi_get_element(env, argv[3], i, &v);
    if (!arg_uint64(env, v, &args[i])) return throw_type(env, "injectSyscall: arguments must be numbers or bigints");
  }
  if (f->thawed) return throw_errno(env, EINVAL, "ptrace", "injectSyscall after thaw");
  /* Prefer a thread in an interrupt stop that is not the leader: the leader's
   * tid is the process id, which a parent's waitpid(pid) could also collect. */
  thread_t *t = NULL;
  for (size_t i = 0; i < f->count; i++) {
    thread_t *c = &f->threads[i];
    if (c->stop == STOP_SIGNAL) continue;
    if (t == NULL || (t->tid == f->pid && c->tid != f->pid)) t = c;
  }
  if (t == NULL) t = &f->threads[0];
  /* Resume with the registers exactly as captured, orig_rax and a restart code
   * in rax included: PTRACE_DETACH (or the tracer's death) sets TIF_SIGPENDING
   * (__ptrace_unlink -> ptrace_signal_wake_up), so on its way out the kernel
   * applies the same restart logic as if the thread had never been stopped,
   * including -EINTR when a signal handler runs first. Pre-applying the
   * restart here (orig_rax = -1) would restart pause()/ERESTARTNOHAND calls
   * after a handler instead of returning EINTR. */
  if (!t->injected) t->resume_regs = t->regs;

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
  if (ptrace(PTRACE_SETREGS, t->tid, NULL, &inj) != 0)
    return throw_errno(env, errno, "ptrace", "ptrace(PTRACE_SETREGS) on tid %d", t->tid);
  t->injected = true;
  int err = run_to_syscall_stop(t); /* entry */
  if (err == 0) err = run_to_syscall_stop(t); /* exit */
  struct user_regs_struct after;
  if (err == 0 && ptrace(PTRACE_GETREGS, t->tid, NULL, &after) != 0) err = errno;
  if (err == 0 && ptrace(PTRACE_SETREGS, t->tid, NULL, &t->resume_regs) != 0) err = errno;
  if (err != 0) return throw_errno(env, err, "ptrace", "inject syscall %llu into tid %d", (unsigned long long)nr, t->tid);
  t->stop = STOP_SYSCALL;
  return make_bigint(env, after.rax);
}

/* thaw(h): detach every thread. Idempotent. */
static napi_value js_thaw(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  freeze_t *f = argc ? get_freeze(env, argv[0]) : NULL;
  if (f == NULL) return throw_type(env, "thaw(handle)");
  detach_all(f);
  return NULL;
}

/* injectionThreadRsp(h) -> bigint: stack pointer of the thread injections run in. */
static napi_value js_injection_rsp(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  freeze_t *f = argc ? get_freeze(env, argv[0]) : NULL;
  if (f == NULL || f->count == 0) return throw_type(env, "injectionThreadRsp(handle)");
  thread_t *t = NULL;
  for (size_t i = 0; i < f->count; i++) {
    thread_t *c = &f->threads[i];
    if (c->stop == STOP_SIGNAL) continue;
    if (t == NULL || (t->tid == f->pid && c->tid != f->pid)) t = c;
  }
  if (t == NULL) t = &f->threads[0];
  return make_bigint(env, t->regs.rsp);
}

/* processVmWrite(pid, address, buffer) */
static napi_value js_process_vm_write(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
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
      {"freeze", NULL, js_freeze, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"frozenThreads", NULL, js_frozen_threads, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"injectSyscall", NULL, js_inject_syscall, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"injectionThreadRsp", NULL, js_injection_rsp, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"thaw", NULL, js_thaw, NULL, NULL, NULL, napi_default_jsproperty, NULL},
      {"processVmWrite", NULL, js_process_vm_write, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
