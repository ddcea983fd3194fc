/* wpsnap-restorer: the process a restore becomes (core/restore.ts).
 *
 * wpsnap starts it with the restored process's stdio as fds 0-2 and a
 * control socket as fd 3, then sends it a plan: lines of words, strings in
 * hex, ending with "go". It then makes three processes:
 *
 *   launcher  (this one)   with a new PID namespace asked, unshares it and
 *                          forks the guardian; reports the target's host pid
 *                          ("pids GUARDIAN TARGET") and exits.
 *   guardian  (pid 1 of the new namespace, or a plain parent without one)
 *                          creates the target with clone3(set_tid) at its pid
 *                          of T, then watches the control socket: if it
 *                          closes before "commit" (wpsnap died while the
 *                          target was half-built), or before "served" after
 *                          "commit-lazy" (the page server died while pages
 *                          were missing), it SIGKILLs the target. For a lazy
 *                          restore it holds a copy of the target's
 *                          userfaultfd ("hold-uffd"), so the registration
 *                          never drops while the target lives: a missing page
 *                          blocks (and the target is killed) instead of
 *                          reading zero. It exits with the target's status.
 *   target                 re-creates the fds of the plan at their numbers
 *                          (files, pipes with their bytes, eventfd, timerfd,
 *                          signalfd, epoll and its registrations, listening
 *                          sockets, reset sockets, stdio), cwd, root, umask,
 *                          rlimits and personality, says "ready" (or
 *                          "error MESSAGE") and waits in pause() for wpsnap
 *                          to freeze it and replace its address space.
 *
 * Built static and run with glibc's rseq registration off, so the target's
 * memory is only its own text, data, heap and stack, which wpsnap unmaps. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/sched.h>
#include <unistd.h>

#define CONTROL_FD 3
#define MAX_WORDS 16
#ifndef TFD_IOC_SET_TICKS
#define TFD_IOC_SET_TICKS _IOW('T', 0, uint64_t)
#endif

static char *plan;       /* the plan's text, NUL-terminated lines */
static size_t plan_len;
static int control = CONTROL_FD;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof line - 2) n = sizeof line - 2;
  line[n++] = '\n';
  (void)!write(control, line, (size_t)n);
}

/* "error ..." with the message hex-free: words only, newlines replaced. */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...) {
  char msg[900];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  for (char *p = msg; *p; p++)
    if (*p == '\n') *p = ' ';
  say("error %s", msg);
  _exit(1);
}

/* Read the plan up to its "go" line. */
static void read_plan(void) {
  size_t cap = 1 << 16;
  plan = malloc(cap);
  if (plan == NULL) fail("out of memory for the plan");
  for (;;) {
    if (plan_len + 4096 > cap) {
      cap *= 2;
      plan = realloc(plan, cap);
      if (plan == NULL) fail("out of memory for the plan");
    }
    ssize_t n = read(control, plan + plan_len, cap - plan_len - 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) _exit(1); /* wpsnap is gone */
    plan_len += (size_t)n;
    plan[plan_len] = 0;
    if (plan_len >= 3 && strcmp(plan + plan_len - 3, "go\n") == 0 && (plan_len == 3 || plan[plan_len - 4] == '\n')) break;
  }
}

/* Split a line (modified in place) into words. */
static int words_of(char *line, char **w) {
  int n = 0;
  for (char *save = NULL, *tok = strtok_r(line, " ", &save); tok != NULL && n < MAX_WORDS; tok = strtok_r(NULL, " ", &save)) w[n++] = tok;
  return n;
}

/* A hex string decoded in place; its length in *len. */
static char *unhex(char *s, size_t *len) {
  size_t n = strlen(s) / 2;
  for (size_t i = 0; i < n; i++) {
    unsigned v;
    if (sscanf(s + 2 * i, "%2x", &v) != 1) fail("bad hex in the plan");
    s[i] = (char)v;
  }
  s[n] = 0;
  if (len != NULL) *len = n;
  return s;
}

static unsigned long long num(const char *s) { return strtoull(s, NULL, 0); }

/* Each plan line is "KIND ..."; for_each calls fn on the lines of one kind. */
typedef void (*line_fn)(char **w, int n);
static void for_each(const char *kind, line_fn fn) {
  for (size_t at = 0; at < plan_len;) {
    char *end = memchr(plan + at, '\n', plan_len - at);
    size_t len = end != NULL ? (size_t)(end - (plan + at)) : plan_len - at;
    char line[len + 1];
    memcpy(line, plan + at, len);
    line[len] = 0;
    at += len + 1;
    char *w[MAX_WORDS];
    int n = words_of(line, w);
    if (n > 0 && strcmp(w[0], kind) == 0) fn(w, n);
  }
}

static const char *first_word_value(const char *kind) {
  static char value[64];
  value[0] = 0;
  for (size_t at = 0; at < plan_len;) {
    char *end = memchr(plan + at, '\n', plan_len - at);
    size_t len = end != NULL ? (size_t)(end - (plan + at)) : plan_len - at;
    size_t k = strlen(kind);
    if (len > k && strncmp(plan + at, kind, k) == 0 && plan[at + k] == ' ') {
      snprintf(value, sizeof value, "%.*s", (int)(len - k - 1), plan + at + k + 1);
      return value;
    }
    at += len + 1;
  }
  return NULL;
}

/* --- the target's fds ------------------------------------------------- */

static int stdio_copy[3] = {-1, -1, -1}; /* the inherited stdio, moved out of the way */

/* Put `fd` at `want` with its close-on-exec flag. */
static void place(int fd, int want, unsigned long long flags) {
  if (fd != want) {
    if (dup2(fd, want) < 0) fail("fd %d: dup2: %s", want, strerror(errno));
    close(fd);
  }
  if (fcntl(want, F_SETFD, (flags & O_CLOEXEC) ? FD_CLOEXEC : 0) < 0) fail("fd %d: fcntl: %s", want, strerror(errno));
}

/* file FD FLAGS POS DEV INO HEXPATH: opened by path, checked to be the same file (unless DEV and INO are 0), at its offset. */
static void open_file(char **w, int n) {
  if (n != 7) fail("bad file line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  char *path = unhex(w[6], NULL);
  int fd = open(path, (int)(flags & ~(unsigned long long)(O_CREAT | O_TRUNC | O_EXCL | O_CLOEXEC)) | O_CLOEXEC);
  if (fd < 0) fail("fd %d: open %s: %s", want, path, strerror(errno));
  struct stat st;
  bool check_identity = num(w[4]) != 0 || num(w[5]) != 0; /* 0 0: a file of its own /proc, new inodes */
  if (fstat(fd, &st) != 0 || (check_identity && (st.st_dev != (dev_t)num(w[4]) || st.st_ino != (ino_t)num(w[5])))) fail("fd %d: %s is not the file it was at T (device or inode changed)", want, path);
  off_t pos = (off_t)num(w[3]);
  if (pos > 0 && !S_ISDIR(st.st_mode) && lseek(fd, pos, SEEK_SET) != pos) fail("fd %d: lseek %s to %lld: %s", want, path, (long long)pos, strerror(errno));
  place(fd, want, flags);
}

/* pipe RFD WFD RFLAGS WFLAGS HEXBYTES|-: a pipe both ends of which the process held, with the bytes it held. */
static void make_pipe(char **w, int n) {
  if (n != 6) fail("bad pipe line");
  int rfd = (int)num(w[1]), wfd = (int)num(w[2]);
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) fail("fd %d: pipe2: %s", rfd, strerror(errno));
  if (strcmp(w[5], "-") != 0) {
    size_t len;
    char *bytes = unhex(w[5], &len);
    if (len > 65536 && fcntl(p[1], F_SETPIPE_SZ, (int)len) < 0) fail("fd %d: a pipe of %zu bytes: %s", rfd, len, strerror(errno));
    if (write(p[1], bytes, len) != (ssize_t)len) fail("fd %d: refill the pipe: %s", rfd, strerror(errno));
  }
  unsigned long long rflags = num(w[3]), wflags = num(w[4]);
  if (fcntl(p[0], F_SETFL, (int)(rflags & O_NONBLOCK)) < 0 || fcntl(p[1], F_SETFL, (int)(wflags & O_NONBLOCK)) < 0) fail("fd %d: pipe flags: %s", rfd, strerror(errno));
  place(p[0], rfd, rflags);
  place(p[1], wfd, wflags);
}

/* stdio FD WHICH FLAGS: what --stdio gave (0, 1 or 2), at FD. */
static void make_stdio(char **w, int n) {
  if (n != 4) fail("bad stdio line");
  int want = (int)num(w[1]), which = (int)num(w[2]);
  if (which < 0 || which > 2 || stdio_copy[which] < 0) fail("fd %d: no stdio %d to give it", want, which);
  int fd = dup(stdio_copy[which]);
  if (fd < 0) fail("fd %d: dup: %s", want, strerror(errno));
  place(fd, want, num(w[3]));
}

/* eventfd FD COUNT FLAGS SEMAPHORE */
static void make_eventfd(char **w, int n) {
  if (n != 5) fail("bad eventfd line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[3]);
  int fd = eventfd(0, (int)(flags & O_NONBLOCK) | EFD_CLOEXEC | (num(w[4]) ? EFD_SEMAPHORE : 0));
  if (fd < 0) fail("fd %d: eventfd: %s", want, strerror(errno));
  uint64_t count = num(w[2]);
  if (count > 0 && write(fd, &count, sizeof count) != sizeof count) fail("fd %d: eventfd count %llu: %s", want, (unsigned long long)count, strerror(errno));
  place(fd, want, flags);
}

/* timerfd FD FLAGS CLOCKID VALUE_SEC VALUE_NSEC INTERVAL_SEC INTERVAL_NSEC TICKS: armed again with the time it had left. */
static void make_timerfd(char **w, int n) {
  if (n != 9) fail("bad timerfd line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  int fd = timerfd_create((int)num(w[3]), (int)(flags & O_NONBLOCK) | TFD_CLOEXEC);
  if (fd < 0) fail("fd %d: timerfd_create: %s", want, strerror(errno));
  struct itimerspec spec = {.it_value = {(time_t)num(w[4]), (long)num(w[5])}, .it_interval = {(time_t)num(w[6]), (long)num(w[7])}};
  if ((spec.it_value.tv_sec != 0 || spec.it_value.tv_nsec != 0) && timerfd_settime(fd, 0, &spec, NULL) != 0) fail("fd %d: timerfd_settime: %s", want, strerror(errno));
  uint64_t ticks = num(w[8]);
  if (ticks > 0 && ioctl(fd, TFD_IOC_SET_TICKS, &ticks) != 0) fail("fd %d: timerfd ticks: %s", want, strerror(errno));
  place(fd, want, flags);
}

/* signalfd FD FLAGS MASK */
static void make_signalfd(char **w, int n) {
  if (n != 4) fail("bad signalfd line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  uint64_t mask = num(w[3]);
  sigset_t set;
  sigemptyset(&set);
  for (int s = 1; s <= 64; s++)
    if (mask & (1ULL << (s - 1))) sigaddset(&set, s);
  int fd = signalfd(-1, &set, (int)(flags & O_NONBLOCK) | SFD_CLOEXEC);
  if (fd < 0) fail("fd %d: signalfd: %s", want, strerror(errno));
  place(fd, want, flags);
}

static void make_epoll(char **w, int n) {
  if (n != 3) fail("bad epoll line");
  int want = (int)num(w[1]);
  int fd = epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) fail("fd %d: epoll_create1: %s", want, strerror(errno));
  place(fd, want, num(w[2]));
}

/* epollctl EPFD TFD EVENTS DATA: after every other fd exists, at its number. */
static void epoll_register(char **w, int n) {
  if (n != 5) fail("bad epollctl line");
  struct epoll_event ev = {.events = (uint32_t)num(w[3]), .data.u64 = num(w[4])};
  if (epoll_ctl((int)num(w[1]), EPOLL_CTL_ADD, (int)num(w[2]), &ev) != 0) fail("fd %d: register fd %d in it: %s", (int)num(w[1]), (int)num(w[2]), strerror(errno));
}

/* A unix path bound by a process that is gone: the socket file stays; remove it if nobody listens there. */
static void remove_stale_unix(const struct sockaddr_un *a, socklen_t len) {
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) return;
  if (connect(probe, (const struct sockaddr *)a, len) != 0 && errno == ECONNREFUSED) unlink(a->sun_path);
  close(probe);
}

/* socket FD FLAGS FAMILY TYPE LISTEN(0|1) HEXADDR OPTIONS: bound (and listening) at its address of T;
 * OPTIONS bits: 1 SO_REUSEADDR, 2 SO_REUSEPORT, 4 IPV6_V6ONLY, 8 SO_KEEPALIVE, 16 TCP_NODELAY. */
static void make_socket(char **w, int n) {
  if (n != 8) fail("bad socket line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  int family = (int)num(w[3]), type = (int)num(w[4]);
  bool listening = num(w[5]) != 0;
  char *text = unhex(w[6], NULL);
  char shown[300];
  snprintf(shown, sizeof shown, "%s", text);
  unsigned long long options = num(w[7]);
  int fd = socket(family, type | SOCK_CLOEXEC | (int)(flags & O_NONBLOCK), 0);
  if (fd < 0) fail("fd %d: socket: %s", want, strerror(errno));
  int one = 1;
  if ((options & 1) && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) fail("fd %d: SO_REUSEADDR: %s", want, strerror(errno));
  if ((options & 2) && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) fail("fd %d: SO_REUSEPORT: %s", want, strerror(errno));
  if ((options & 4) && family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0) fail("fd %d: IPV6_V6ONLY: %s", want, strerror(errno));
  if ((options & 8) && setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0) fail("fd %d: SO_KEEPALIVE: %s", want, strerror(errno));
  if ((options & 16) && type == SOCK_STREAM && family != AF_UNIX && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) fail("fd %d: TCP_NODELAY: %s", want, strerror(errno));
  union {
    struct sockaddr_un un;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
  } a;
  memset(&a, 0, sizeof a);
  socklen_t len = 0;
  if (family == AF_UNIX) {
    a.un.sun_family = AF_UNIX;
    size_t plen = strlen(text);
    if (plen >= sizeof a.un.sun_path) fail("fd %d: unix path too long", want);
    memcpy(a.un.sun_path, text, plen);
    if (text[0] == '@') a.un.sun_path[0] = 0; /* abstract */
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + (text[0] == '@' ? 0 : 1));
    if (plen == 0) len = 0; /* unbound */
  } else {
    char *colon = strrchr(text, ':');
    if (colon == NULL) fail("fd %d: bad address %s", want, text);
    *colon = 0;
    int port = atoi(colon + 1);
    if (family == AF_INET) {
      a.in.sin_family = AF_INET;
      a.in.sin_port = htons((uint16_t)port);
      if (inet_pton(AF_INET, text, &a.in.sin_addr) != 1) fail("fd %d: bad address %s", want, text);
      len = sizeof a.in;
    } else {
      char *addr = text[0] == '[' ? text + 1 : text;
      size_t alen = strlen(addr);
      if (alen > 0 && addr[alen - 1] == ']') addr[alen - 1] = 0;
      a.in6.sin6_family = AF_INET6;
      a.in6.sin6_port = htons((uint16_t)port);
      if (inet_pton(AF_INET6, addr, &a.in6.sin6_addr) != 1) fail("fd %d: bad address %s", want, addr);
      len = sizeof a.in6;
    }
    *colon = ':';
  }
  if (len > 0 && bind(fd, (struct sockaddr *)&a, len) != 0) {
    if (errno == EADDRINUSE && family == AF_UNIX && text[0] != '@') {
      remove_stale_unix(&a.un, len);
      if (bind(fd, (struct sockaddr *)&a, len) == 0) goto bound;
    }
    fail("fd %d: bind %s: %s", want, shown, strerror(errno));
  }
bound:
  if (listening && listen(fd, SOMAXCONN) != 0) fail("fd %d: listen on %s: %s", want, shown, strerror(errno));
  place(fd, want, flags);
}

/* reset FD FLAGS: a connected socket whose peer is gone: reads report ECONNRESET (a unix
 * stream peer closed with data unread), then end of file; writes fail with EPIPE. */
static void make_reset(char **w, int n) {
  if (n != 3) fail("bad reset line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (int)(flags & O_NONBLOCK), 0, pair) != 0) fail("fd %d: socketpair: %s", want, strerror(errno));
  if (write(pair[0], "", 1) != 1) fail("fd %d: socketpair write: %s", want, strerror(errno));
  close(pair[1]);
  place(pair[0], want, flags);
}

/* memfd FD FLAGS SIZE HEXNAME: a memfd of T's size; its content comes with the mappings. */
static void make_memfd(char **w, int n) {
  if (n != 5) fail("bad memfd line");
  int want = (int)num(w[1]);
  unsigned long long flags = num(w[2]);
  char *name = unhex(w[4], NULL);
  int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) fail("fd %d: memfd_create: %s", want, strerror(errno));
  if (ftruncate(fd, (off_t)num(w[3])) != 0) fail("fd %d: memfd size: %s", want, strerror(errno));
  place(fd, want, flags);
}

/* dup FD OF FLAGS: another fd on the same open file (a pipe end held twice). */
static void make_dup(char **w, int n) {
  if (n != 4) fail("bad dup line");
  int want = (int)num(w[1]);
  int fd = dup((int)num(w[2]));
  if (fd < 0) fail("fd %d: dup of fd %s: %s", want, w[2], strerror(errno));
  place(fd, want, num(w[3]));
}

static int max_plan_fd;
static void note_fd(char **w, int n) {
  int fd = n > 1 ? (int)num(w[1]) : 0;
  if (strcmp(w[0], "pipe") == 0 && n > 2 && (int)num(w[2]) > fd) fd = (int)num(w[2]);
  if (fd > max_plan_fd) max_plan_fd = fd;
}

static void rlimit_line(char **w, int n) {
  if (n != 4) fail("bad rlimit line");
  struct rlimit rl = {.rlim_cur = strcmp(w[2], "inf") == 0 ? RLIM_INFINITY : num(w[2]), .rlim_max = strcmp(w[3], "inf") == 0 ? RLIM_INFINITY : num(w[3])};
  if (setrlimit((int)num(w[1]), &rl) != 0) fail("rlimit %s: %s", w[1], strerror(errno));
}

/* The target: its fds, cwd, root, umask, rlimits and personality; then it waits to be frozen. */
static void become_target(int report) __attribute__((noreturn));
static void become_target(int report) {
  /* Every disposition and the mask as a new program has them (wpsnap sets T's later). */
  for (int s = 1; s < 65; s++) signal(s, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  prctl(PR_SET_PDEATHSIG, SIGKILL); /* the guardian gone: gone too */
  if (send(report, "here", 4, 0) != 4) fail("report the target's pid: %s", strerror(errno));
  close(report);
  static const char *kinds[] = {"file", "pipe", "stdio", "eventfd", "timerfd", "signalfd", "epoll", "socket", "reset", "memfd", "dup"};
  for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) for_each(kinds[k], note_fd);
  /* Everything inherited goes above the plan's fds: stdio copies and the control socket. */
  int above = max_plan_fd + 1 > 3 ? max_plan_fd + 1 : 4;
  for (int i = 0; i < 3; i++) stdio_copy[i] = fcntl(i, F_DUPFD_CLOEXEC, above);
  control = fcntl(CONTROL_FD, F_DUPFD_CLOEXEC, above);
  if (control < 0) _exit(1);
  for (int fd = 0; fd <= max_plan_fd; fd++) close(fd);
  const char *root = first_word_value("root");
  if (root != NULL) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", root);
    unhex(path, NULL);
    if (strcmp(path, "/") != 0 && chroot(path) != 0) fail("chroot %s: %s", path, strerror(errno));
  }
  const char *cwd = first_word_value("cwd");
  if (cwd != NULL) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", cwd);
    unhex(path, NULL);
    if (chdir(path) != 0) fail("cwd %s: %s", path, strerror(errno));
  }
  for_each("file", open_file);
  for_each("pipe", make_pipe);
  for_each("stdio", make_stdio);
  for_each("eventfd", make_eventfd);
  for_each("timerfd", make_timerfd);
  for_each("signalfd", make_signalfd);
  for_each("epoll", make_epoll);
  for_each("socket", make_socket);
  for_each("reset", make_reset);
  for_each("memfd", make_memfd);
  for_each("dup", make_dup);
  for_each("epollctl", epoll_register);
  for_each("rlimit", rlimit_line);
  const char *mask = first_word_value("umask");
  if (mask != NULL) umask((mode_t)num(mask));
  const char *persona = first_word_value("personality");
  if (persona != NULL && personality((unsigned long)num(persona)) < 0) fail("personality %s: %s", persona, strerror(errno));
  for (int i = 0; i < 3; i++)
    if (stdio_copy[i] >= 0) close(stdio_copy[i]);
  say("ready %d", control);
  /* The control socket stays open here (wpsnap closes it by injection once frozen). */
  for (;;) pause();
}

/* --- the guardian ------------------------------------------------------ */

static pid_t target;
static int held_uffd = -1;

static void kill_target(void) {
  if (target > 0) kill(target, SIGKILL);
}

/* Control messages after the target is built; returns false once the socket has nothing more to say. */
static bool serve_control(int *phase) {
  char buf[256];
  ssize_t n = read(control, buf, sizeof buf - 1);
  if (n < 0 && errno == EINTR) return true;
  if (n <= 0) {
    if (*phase != 1) kill_target(); /* 0: half-built; 2: lazy pages still missing */
    return false;
  }
  buf[n] = 0;
  for (char *save = NULL, *line = strtok_r(buf, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
    int fd;
    if (strcmp(line, "commit") == 0) {
      *phase = 1;
    } else if (strcmp(line, "commit-lazy") == 0) {
      *phase = 2;
    } else if (strcmp(line, "served") == 0) {
      *phase = 1;
      if (held_uffd >= 0) close(held_uffd);
      held_uffd = -1;
    } else if (sscanf(line, "hold-uffd %d", &fd) == 1) {
      int pidfd = (int)syscall(SYS_pidfd_open, target, 0);
      held_uffd = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
      if (pidfd >= 0) close(pidfd);
      if (held_uffd < 0) say("error guardian: take the userfaultfd: %s", strerror(errno));
      else say("held %d", held_uffd);
    }
  }
  return *phase != 1;
}

static void become_guardian(pid_t ns_pid, int report) __attribute__((noreturn));
static void become_guardian(pid_t ns_pid, int report) {
  prctl(PR_SET_NAME, "wpsnap-guardian");
  struct clone_args args;
  memset(&args, 0, sizeof args);
  args.exit_signal = SIGCHLD;
  pid_t tid = ns_pid;
  if (ns_pid > 0) {
    args.set_tid = (uint64_t)(uintptr_t)&tid;
    args.set_tid_size = 1;
  }
  long child = syscall(SYS_clone3, &args, sizeof args);
  if (child < 0) fail("create the process with pid %d: clone3: %s", ns_pid, strerror(errno));
  if (child == 0) become_target(report);
  target = (pid_t)child;
  close(report);
  /* stdio is the target's, not ours: a reader of it sees its end when the target ends. */
  int null = open("/dev/null", O_RDWR | O_CLOEXEC);
  for (int i = 0; i < 3 && null >= 0; i++) dup2(null, i);
  int phase = 0;
  bool watching = true;
  int status = 0;
  for (;;) {
    if (watching) {
      struct pollfd p = {.fd = control, .events = POLLIN};
      int r = poll(&p, 1, 200);
      if (r > 0) watching = serve_control(&phase);
      if (!watching) close(control);
    }
    /* Reap every child (orphans of the namespace too); end with the target. */
    pid_t done;
    int st;
    while ((done = waitpid(-1, &st, watching ? WNOHANG | __WALL : __WALL)) > 0) {
      if (done == target) {
        status = st;
        if (held_uffd >= 0) close(held_uffd);
        _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
      }
    }
    if (done < 0 && errno == ECHILD) _exit(1);
  }
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  read_plan();
  const char *ns = first_word_value("ns");
  pid_t ns_pid = ns != NULL ? (pid_t)num(ns) : 0;
  /* The target says hello on this socket; with SO_PASSCRED the kernel gives its pid as seen here. */
  int report[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, report) != 0) fail("socketpair: %s", strerror(errno));
  int on = 1;
  if (setsockopt(report[0], SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0) fail("SO_PASSCRED: %s", strerror(errno));
  if (ns_pid > 0 && unshare(CLONE_NEWPID) != 0) fail("a new PID namespace: unshare: %s", strerror(errno));
  pid_t guardian = fork();
  if (guardian < 0) fail("fork: %s", strerror(errno));
  if (guardian == 0) {
    close(report[0]);
    become_guardian(ns_pid, report[1]);
  }
  close(report[1]);
  char buf[8];
  char cbuf[CMSG_SPACE(sizeof(struct ucred))];
  struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
  ssize_t n;
  while ((n = recvmsg(report[0], &msg, 0)) < 0 && errno == EINTR) {
  }
  struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL;
  if (c == NULL || c->cmsg_type != SCM_CREDENTIALS) _exit(1); /* the guardian said why */
  struct ucred cred;
  memcpy(&cred, CMSG_DATA(c), sizeof cred);
  say("pids %d %d", guardian, cred.pid);
  return 0;
}
