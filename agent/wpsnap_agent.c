/* The cooperative agent (protocol: snapshot-format/FORMAT.md, "The agent protocol").
 *
 * One service thread connects to the controller's socket and serves it. On
 * FREEZE it holds every other thread of the process in a signal handler that
 * records the thread's registers from its ucontext and waits on a futex, then
 * passes a fresh userfaultfd and the registers to the controller and closes
 * its own copy of the fd. THAW (or the connection's end) opens the futex.
 *
 * While threads are held the service thread uses no lock the held threads
 * might hold: no malloc, no stdio, no opendir (mmap and raw syscalls only). */
#include "wpsnap_agent.h"

#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define RETRY_NS (200 * 1000000L)
#define DEFAULT_FREEZE_MS 2000u
#define MAX_THREADS 1024
#define ARCH_GET_FS_ 0x1003
#define ARCH_GET_GS_ 0x1004

/* One held thread's record, written by its own signal handler. */
typedef struct {
  pid_t tid;
  _Atomic int held;
  bool self; /* the service thread: records and returns at once */
  bool gone; /* exited before its handler ran */
  uint32_t xstate_len;
  uint64_t sigmask;
  uint64_t regs[27];
  uint8_t fpregs[512];
  uint8_t *xstate; /* xstate_cap bytes */
} slot_t;

/* One FREEZE: its slots, and the gate the held threads wait on. */
typedef struct {
  _Atomic uint32_t gate; /* 0 closed, 1 open */
  _Atomic uint32_t held_count;
  _Atomic size_t count; /* slots in use; the handlers read it while the service thread appends */
  size_t cap;
  slot_t *slots;
  uint8_t *reply; /* the FROZEN message, reply_cap bytes */
  size_t reply_cap;
} round_t;

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int freeze_signal;
static size_t xstate_cap;
static pid_t own_pid;
static _Atomic(round_t *) current_round;
static _Atomic int handlers_inside;
static atomic_flag started = ATOMIC_FLAG_INIT;

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *timeout) {
  return syscall(SYS_futex, (uint32_t *)word, op | FUTEX_PRIVATE_FLAG, val, timeout, NULL, 0);
}

static pid_t gettid_raw(void) { return (pid_t)syscall(SYS_gettid); }

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void capture(slot_t *s, const ucontext_t *uc) {
  const greg_t *g = uc->uc_mcontext.gregs;
  uint64_t csgsfs = (uint64_t)g[REG_CSGSFS];
  uint64_t fs_base = 0, gs_base = 0;
  syscall(SYS_arch_prctl, ARCH_GET_FS_, &fs_base);
  syscall(SYS_arch_prctl, ARCH_GET_GS_, &gs_base);
  uint16_t ds, es, fs, gs;
  __asm__ volatile("mov %%ds, %0; mov %%es, %1; mov %%fs, %2; mov %%gs, %3" : "=r"(ds), "=r"(es), "=r"(fs), "=r"(gs));
  /* struct user_regs_struct order (snapshot-format/regs-x86_64.ts). orig_rax
   * is -1: the kernel already applied any syscall restart to rax/rip before
   * it delivered the signal, so these registers resume as they are. */
  uint64_t r[27] = {
      (uint64_t)g[REG_R15], (uint64_t)g[REG_R14], (uint64_t)g[REG_R13], (uint64_t)g[REG_R12], (uint64_t)g[REG_RBP],
      (uint64_t)g[REG_RBX], (uint64_t)g[REG_R11], (uint64_t)g[REG_R10], (uint64_t)g[REG_R9],  (uint64_t)g[REG_R8],
      (uint64_t)g[REG_RAX], (uint64_t)g[REG_RCX], (uint64_t)g[REG_RDX], (uint64_t)g[REG_RSI], (uint64_t)g[REG_RDI],
      UINT64_MAX,           (uint64_t)g[REG_RIP], csgsfs & 0xffff,      (uint64_t)g[REG_EFL], (uint64_t)g[REG_RSP],
      (csgsfs >> 48) & 0xffff, fs_base, gs_base, ds, es, fs, gs,
  };
  memcpy(s->regs, r, sizeof r);
  memcpy(&s->sigmask, &uc->uc_sigmask, sizeof s->sigmask);
  s->xstate_len = 0;
  const uint8_t *fp = (const uint8_t *)uc->uc_mcontext.fpregs;
  if (fp == NULL) return;
  memcpy(s->fpregs, fp, sizeof s->fpregs);
  /* The kernel marks a full XSAVE frame in the FXSAVE area's software bytes
   * (struct _fpx_sw_bytes at 464: magic1, extended_size, xfeatures, xstate_size). */
  uint32_t magic1, xstate_size;
  memcpy(&magic1, fp + 464, 4);
  memcpy(&xstate_size, fp + 464 + 16, 4);
  if (magic1 == FP_XSTATE_MAGIC1 && xstate_size >= 576 && xstate_size <= xstate_cap) {
    memcpy(s->xstate, fp, xstate_size);
    s->xstate_len = xstate_size;
  }
}

/* Async-signal-safe: raw syscalls and atomics only. */
static void on_freeze_signal(int sig, siginfo_t *si, void *ucv) {
  (void)sig;
  int saved_errno = errno;
  atomic_fetch_add(&handlers_inside, 1);
  round_t *r = atomic_load(&current_round);
  if (r != NULL && si->si_code == SI_TKILL && si->si_pid == own_pid) {
    pid_t tid = gettid_raw();
    slot_t *s = NULL;
    for (size_t i = 0; i < r->count && s == NULL; i++)
      if (r->slots[i].tid == tid) s = &r->slots[i];
    if (s != NULL && atomic_load(&s->held) == 0) {
      bool self = s->self; /* read before held: the service thread may reorder the slots after */
      capture(s, (const ucontext_t *)ucv);
      atomic_store(&s->held, 1);
      atomic_fetch_add(&r->held_count, 1);
      futex(&r->held_count, FUTEX_WAKE, 1, NULL);
      if (!self)
        while (atomic_load(&r->gate) == 0) futex(&r->gate, FUTEX_WAIT, 0, NULL);
    }
  }
  atomic_fetch_sub(&handlers_inside, 1);
  errno = saved_errno;
}

static int install_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_freeze_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  /* Nothing else runs in a held thread until it is released. */
  sigfillset(&sa.sa_mask);
  return sigaction(freeze_signal, &sa, NULL) == 0 ? 0 : errno;
}

/* ---- the socket ---- */

static int send_all(int fd, const void *buf, size_t len, int pass_fd) {
  const uint8_t *p = buf;
  while (len > 0) {
    struct iovec iov = {.iov_base = (void *)p, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    union {
      char buf[CMSG_SPACE(sizeof(int))];
      struct cmsghdr align;
    } control;
    if (pass_fd >= 0) {
      memset(&control, 0, sizeof control);
      msg.msg_control = control.buf;
      msg.msg_controllen = sizeof control.buf;
      struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EPIPE;
    pass_fd = -1; /* the fd went with the first byte */
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static int send_message(int fd, uint16_t op, const void *payload, uint32_t length, int pass_fd) {
  struct wpsnap_agent_header h = {.magic = WPSNAP_AGENT_MAGIC, .version = WPSNAP_AGENT_VERSION, .op = op, .length = length};
  int err = send_all(fd, &h, sizeof h, pass_fd);
  return err == 0 && length > 0 ? send_all(fd, payload, length, -1) : err;
}

static int send_error(int fd, int err, const char *what) {
  struct {
    struct wpsnap_agent_error e;
    char text[200];
  } m = {.e = {.err = err}};
  size_t n = strlen(what);
  if (n > sizeof m.text) n = sizeof m.text;
  memcpy(m.text, what, n);
  return send_message(fd, WPSNAP_AGENT_ERROR, &m, (uint32_t)(sizeof m.e + n), -1);
}

static int recv_all(int fd, void *buf, size_t len) {
  uint8_t *p = buf;
  while (len > 0) {
    ssize_t n = recv(fd, p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : ECONNRESET;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* The next request; its payload (at most cap bytes kept, the rest skipped). */
static int recv_message(int fd, struct wpsnap_agent_header *h, void *payload, size_t cap) {
  int err = recv_all(fd, h, sizeof *h);
  if (err != 0) return err;
  if (h->magic != WPSNAP_AGENT_MAGIC || h->version != WPSNAP_AGENT_VERSION || h->length > WPSNAP_AGENT_MAX_PAYLOAD) return EPROTO;
  uint8_t skip[256];
  for (uint32_t left = h->length; left > 0;) {
    size_t n = left < sizeof skip ? left : sizeof skip;
    bool keep = h->length - left + n <= cap;
    err = recv_all(fd, keep ? (uint8_t *)payload + (h->length - left) : skip, n);
    if (err != 0) return err;
    left -= (uint32_t)n;
  }
  return 0;
}

/* ---- FREEZE ---- */

/* The one round, mapped once when the agent starts and never unmapped: an
 * unmap after a thaw would take pages the controller has not saved yet (a
 * snapshot would list them lost), and mmap, not malloc, because a held thread
 * may hold malloc's lock. The pages a round never touches stay unpopulated. */
static round_t *round_map(size_t cap) {
  size_t slot_bytes = sizeof(slot_t) + ((xstate_cap + 63) & ~(size_t)63);
  size_t record_bytes = sizeof(struct wpsnap_agent_thread) + WPSNAP_AGENT_REGS_BYTES + WPSNAP_AGENT_FPREGS_BYTES + ((xstate_cap + 7) & ~(size_t)7);
  size_t reply_cap = sizeof(struct wpsnap_agent_frozen) + cap * record_bytes;
  size_t bytes = sizeof(round_t) + cap * slot_bytes + reply_cap;
  void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return NULL;
  round_t *r = m;
  r->cap = cap;
  r->slots = (slot_t *)(r + 1);
  uint8_t *xs = (uint8_t *)(r->slots + cap);
  for (size_t i = 0; i < cap; i++) r->slots[i].xstate = xs + i * (slot_bytes - sizeof(slot_t));
  r->reply = xs + cap * (slot_bytes - sizeof(slot_t));
  r->reply_cap = reply_cap;
  return r;
}

static void round_begin(round_t *r) {
  for (size_t i = 0; i < r->count; i++) {
    r->slots[i].tid = 0;
    r->slots[i].gone = false;
    atomic_store(&r->slots[i].held, 0);
  }
  r->count = 0;
  atomic_store(&r->gate, 0);
  atomic_store(&r->held_count, 0);
  atomic_store(&current_round, r);
}

/* Open the gate and wait until no handler runs any more. */
static void round_release(round_t *r) {
  atomic_store(&r->gate, 1);
  futex(&r->gate, FUTEX_WAKE, INT32_MAX, NULL);
  atomic_store(&current_round, NULL);
  struct timespec tick = {0, 100000};
  while (atomic_load(&handlers_inside) > 0) nanosleep(&tick, NULL);
}

static bool round_has(const round_t *r, pid_t tid) {
  for (size_t i = 0; i < r->count; i++)
    if (r->slots[i].tid == tid) return true;
  return false;
}

/* Signal every thread of /proc/self/task not signalled yet; how many were new (-errno on failure). */
static long signal_new_threads(round_t *r) {
  static char buf[8192]; /* the service thread's only */
  int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return -errno;
  long added = 0;
  for (;;) {
    long n = syscall(SYS_getdents64, dir, buf, sizeof buf);
    if (n <= 0) {
      if (n < 0) added = -errno;
      break;
    }
    for (long off = 0; off < n;) {
      struct {
        uint64_t ino;
        int64_t off;
        unsigned short reclen;
        unsigned char type;
        char name[];
      } *d = (void *)(buf + off);
      off += d->reclen;
      pid_t tid = 0;
      for (const char *c = d->name; *c >= '0' && *c <= '9'; c++) tid = tid * 10 + (*c - '0');
      if (tid <= 0 || round_has(r, tid)) continue;
      if (r->count == r->cap) {
        close(dir);
        return -EOVERFLOW;
      }
      slot_t *s = &r->slots[r->count];
      s->tid = tid;
      s->self = tid == gettid_raw();
      s->gone = false;
      atomic_store(&s->held, 0);
      r->count++; /* published before the signal: its handler must find the slot */
      /* SAFETY: tgkill to a thread of this process; the handler only records and waits. */
      if (syscall(SYS_tgkill, own_pid, tid, freeze_signal) != 0) {
        r->count--; /* it exited meanwhile */
        continue;
      }
      added++;
    }
  }
  close(dir);
  return added;
}

/* Whether /proc/self/task/<tid> still exists. */
static bool thread_alive(pid_t tid) {
  char path[48] = "/proc/self/task/";
  char digits[12];
  int n = 0;
  do digits[n++] = (char)('0' + tid % 10);
  while ((tid /= 10) > 0 && n < 11);
  size_t len = strlen(path);
  while (n > 0) path[len++] = digits[--n];
  path[len] = '\0';
  return access(path, F_OK) == 0;
}

/* Wait until every slot's thread is held or gone; 0 or ETIMEDOUT. */
static int wait_held(round_t *r, uint64_t deadline) {
  for (;;) {
    uint32_t seen = atomic_load(&r->held_count);
    size_t settled = 0;
    for (size_t i = 0; i < r->count; i++) settled += atomic_load(&r->slots[i].held) != 0 || r->slots[i].gone;
    if (settled == r->count) return 0;
    if (now_ms() >= deadline) return ETIMEDOUT;
    struct timespec ts = {0, 2 * 1000000L};
    if (futex(&r->held_count, FUTEX_WAIT, seen, &ts) == 0 || errno != ETIMEDOUT) continue;
    /* Nothing arrived for a while: a thread that exited after its tgkill never will. */
    for (size_t i = 0; i < r->count; i++)
      if (atomic_load(&r->slots[i].held) == 0 && !r->slots[i].gone && !thread_alive(r->slots[i].tid)) r->slots[i].gone = true;
  }
}

/* Hold every thread: 0, or an errno and what failed (every thread released). */
static int freeze_all(round_t *r, uint32_t timeout_ms, const char **what) {
  *what = "sigaction";
  int err = install_handler();
  if (err != 0) return err;
  round_begin(r);
  uint64_t deadline = now_ms() + (timeout_ms == 0 ? DEFAULT_FREEZE_MS : timeout_ms);
  /* Threads created meanwhile are caught by the next listing: stop once one finds none new. */
  for (;;) {
    long added = signal_new_threads(r);
    *what = "list /proc/self/task";
    if (added < 0) {
      err = (int)-added;
      break;
    }
    *what = "hold every thread (one blocks the agent's signal?)";
    err = wait_held(r, deadline);
    if (err != 0 || added == 0) break;
  }
  if (err != 0) round_release(r);
  return err;
}

/* FROZEN with the records of the held threads and a new userfaultfd, whose
 * copy here is closed at once. */
static int send_frozen(int sock, round_t *r) {
  uint8_t *msg = r->reply;
  size_t at = sizeof(struct wpsnap_agent_frozen);
  uint32_t held = 0;
  for (size_t i = 0; i < r->count; i++) {
    const slot_t *s = &r->slots[i];
    if (atomic_load(&s->held) == 0) continue; /* its thread exited before the handler ran */
    held++;
    struct wpsnap_agent_thread t = {.tid = (uint32_t)s->tid, .xstate_len = s->xstate_len, .sigmask = s->sigmask};
    memcpy(msg + at, &t, sizeof t);
    at += sizeof t;
    memcpy(msg + at, s->regs, WPSNAP_AGENT_REGS_BYTES);
    at += WPSNAP_AGENT_REGS_BYTES;
    memcpy(msg + at, s->fpregs, WPSNAP_AGENT_FPREGS_BYTES);
    at += WPSNAP_AGENT_FPREGS_BYTES;
    memcpy(msg + at, s->xstate, s->xstate_len);
    size_t padded = (s->xstate_len + 7u) & ~7u;
    memset(msg + at + s->xstate_len, 0, padded - s->xstate_len);
    at += padded;
  }
  struct wpsnap_agent_frozen head = {.threads = held};
  memcpy(msg, &head, sizeof head);
  if (at > WPSNAP_AGENT_MAX_PAYLOAD) return send_error(sock, EOVERFLOW, "too many threads for one message");
  /* The controller needs write-protect, so no UFFD_USER_MODE_ONLY: a process
   * that may not create one says so in an ERROR. */
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  int err = uffd < 0 ? send_error(sock, errno, "userfaultfd(O_CLOEXEC|O_NONBLOCK)") : send_message(sock, WPSNAP_AGENT_FROZEN, msg, (uint32_t)at, uffd);
  /* The controller must hold the only reference: if it dies, the kernel drops the protection. */
  if (uffd >= 0) close(uffd);
  return err != 0 ? err : uffd < 0 ? -1 : 0;
}

/* Wait for THAW; anything else, or the connection's end, also releases. 0: THAW came. */
static int hold_until_thaw(int sock) {
  struct wpsnap_agent_header h;
  uint8_t ignored[64];
  int err = recv_message(sock, &h, ignored, sizeof ignored);
  if (err != 0) return err;
  return h.op == WPSNAP_AGENT_THAW ? 0 : EPROTO;
}

/* ---- the service thread ---- */

static void sleep_retry(void) {
  struct timespec ts = {0, RETRY_NS};
  nanosleep(&ts, NULL);
}

/* A server's socket file: a new server makes a new one. */
typedef struct {
  ino_t ino;
  struct timespec ctime;
} socket_id_t;

static bool same_socket(const socket_id_t *a, const struct stat *st) {
  return a->ino == st->st_ino && a->ctime.tv_sec == st->st_ctim.tv_sec && a->ctime.tv_nsec == st->st_ctim.tv_nsec;
}

/* Connect to a server of this user (or root) whose socket is not `avoid` (the one just served). */
static int connect_server(const socket_id_t *avoid, socket_id_t *id) {
  struct stat st;
  if (stat(socket_path, &st) != 0 || !S_ISSOCK(st.st_mode) || same_socket(avoid, &st)) return -1;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  memcpy(addr.sun_path, socket_path, strlen(socket_path));
  struct ucred cred;
  socklen_t len = sizeof cred;
  /* Our memory goes to whoever listens: only to a server of our own user or root. */
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      (cred.uid != geteuid() && cred.uid != 0)) {
    close(fd);
    return -1;
  }
  /* Let the controller read this process's memory under Yama (EINVAL: no Yama). */
  prctl(PR_SET_PTRACER, (unsigned long)cred.pid, 0, 0, 0);
  *id = (socket_id_t){.ino = st.st_ino, .ctime = st.st_ctim};
  return fd;
}

/* One connection: HELLO, then requests until DONE (true) or the connection ends (false). */
static bool serve(int sock, round_t *r) {
  struct wpsnap_agent_hello hello = {.pid = (uint32_t)own_pid};
#ifdef WPSNAP_AGENT_LINKED
  hello.flags = WPSNAP_AGENT_HELLO_LINKED;
#endif
  /* The process's name (its main thread's), not this thread's. */
  int comm = open("/proc/self/comm", O_RDONLY | O_CLOEXEC);
  if (comm >= 0) {
    ssize_t n = read(comm, hello.comm, sizeof hello.comm);
    for (ssize_t i = 0; i < n; i++)
      if (hello.comm[i] == '\n') hello.comm[i] = '\0';
    close(comm);
  }
  if (send_message(sock, WPSNAP_AGENT_HELLO, &hello, sizeof hello, -1) != 0) return false;
  for (;;) {
    struct wpsnap_agent_header h;
    struct wpsnap_agent_freeze req = {0};
    if (recv_message(sock, &h, &req, sizeof req) != 0) return false;
    if (h.op == WPSNAP_AGENT_DONE) return true;
    if (h.op == WPSNAP_AGENT_THAW) continue; /* nothing held */
    if (h.op != WPSNAP_AGENT_FREEZE) return false;
    const char *what;
    int err = freeze_all(r, req.timeout_ms, &what);
    if (err != 0) {
      if (send_error(sock, err, what) != 0) return false;
      continue;
    }
    int sent = send_frozen(sock, r);
    /* Held until THAW, or released at once when the controller is gone or confused. */
    int thawed = sent == 0 ? hold_until_thaw(sock) : sent;
    round_release(r);
    if (thawed > 0) return false;
  }
}

static void *service_main(void *unused) {
  (void)unused;
  sigset_t own;
  sigemptyset(&own);
  sigaddset(&own, freeze_signal);
  pthread_sigmask(SIG_UNBLOCK, &own, NULL);
  round_t *r;
  while ((r = round_map(MAX_THREADS)) == NULL) sleep_retry();
  socket_id_t served = {0}, id = {0};
  for (;;) {
    int sock = connect_server(&served, &id);
    if (sock < 0) {
      sleep_retry();
      continue;
    }
    /* After DONE, wait for another server rather than joining this one's next round. */
    served = serve(sock, r) ? id : (socket_id_t){0};
    close(sock);
  }
  return NULL;
}

static int pick_signal(void) {
  const char *env = getenv("WPSNAP_AGENT_SIGNAL");
  int sig = env != NULL ? atoi(env) : 0;
  return sig >= SIGRTMIN && sig <= SIGRTMAX ? sig : SIGRTMAX - 3;
}

static size_t xsave_size(void) {
  unsigned eax, ebx, ecx = 0, edx;
  /* CPUID 0xD ecx: the XSAVE area of every feature the CPU has, an upper bound of a signal frame's. */
  return __get_cpuid_count(0xd, 0, &eax, &ebx, &ecx, &edx) ? ecx : 0;
}

int wpsnap_agent_start(const char *path) {
  if (path == NULL || path[0] == '\0' || strlen(path) >= sizeof socket_path) return path == NULL || path[0] == '\0' ? 0 : ENAMETOOLONG;
  if (atomic_flag_test_and_set(&started)) return 0;
  memcpy(socket_path, path, strlen(path) + 1);
  freeze_signal = pick_signal();
  xstate_cap = xsave_size();
  own_pid = getpid();
  /* The service thread takes none of the program's signals, only its own. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int err = pthread_create(&thread, &attr, service_main, NULL);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (err == 0) pthread_setname_np(thread, "wpsnap-agent");
  return err;
}

#ifndef WPSNAP_AGENT_LINKED
/* Preloaded: start when the program loads, if WPSNAP_SOCKET names a socket. */
__attribute__((constructor)) static void agent_preload(void) { wpsnap_agent_start(getenv("WPSNAP_SOCKET")); }
#endif
