/*
 * Small helpers shared by the programs wpsnap snapshots in its demo and its
 * tests: the demo's workload (core/demo/pagewriter.c) and the test fixtures
 * (fixtures/common.h includes this). Header-only, static inline: a helper a
 * program does not call costs it nothing, and a program of several files
 * (fixtures/hostile/) gets its own copy in each. The page-content formula here is the one core/demo/oracle.ts checks.
 */
#ifndef WPSNAP_DEMO_WORKLOAD_H
#define WPSNAP_DEMO_WORKLOAD_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE_4K 4096u
#define WORDS_PER_PAGE (PAGE_SIZE_4K / 8u)

/* ---------------------------------------------------------------- numbers */

/* The golden-ratio increment of splitmix64. */
#define GOLDEN64 UINT64_C(0x9E3779B97F4A7C15)

/* splitmix64 finaliser of (x + GOLDEN64): a bijection on 64-bit values. */
static inline uint64_t mix64(uint64_t x)
{
	uint64_t z = x + GOLDEN64;
	z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
	return z ^ (z >> 31);
}

/* splitmix64 generator step: advances *state, returns the next value. */
static inline uint64_t splitmix64_next(uint64_t *state)
{
	uint64_t r = mix64(*state);
	*state += GOLDEN64;
	return r;
}

/* ---------------------------------------------------------------- time */

static inline uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline struct timespec ns_to_timespec(uint64_t ns)
{
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
	return ts;
}

/* Sleep the whole time: an EINTR resumes the sleep for what is left. */
static inline void sleep_nanos(uint64_t ns)
{
	struct timespec ts = ns_to_timespec(ns);
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static inline void sleep_us(uint64_t us)
{
	sleep_nanos(us * 1000u);
}

/* --rate pacing: how long a loop that started at `start` (now_ns(CLOCK_MONOTONIC))
 * and has done `done` steps must wait to run no faster than `rate` steps a second. */
static inline uint64_t pace_wait_ns(uint64_t start, uint64_t done, uint64_t rate)
{
	uint64_t target = start + done * 1000000000u / rate;
	uint64_t now = now_ns(CLOCK_MONOTONIC);
	return now < target ? target - now : 0;
}

/*
 * One nanosleep(ns), checked as a correctly restarted sleep must end: returns
 * 0 when it returned 0 after at least ns, the errno when it failed, -1 when it
 * returned 0 too early.  *elapsed: how long it took.
 */
static inline int checked_nanosleep(uint64_t ns, uint64_t *elapsed)
{
	const struct timespec req = ns_to_timespec(ns);
	uint64_t t0 = now_ns(CLOCK_MONOTONIC);
	int r = nanosleep(&req, NULL);
	int err = errno;
	*elapsed = now_ns(CLOCK_MONOTONIC) - t0;
	return r != 0 ? err : *elapsed < ns ? -1 : 0;
}

/* ---------------------------------------------------------------- errors and options */

__attribute__((noreturn, format(printf, 1, 2)))
static inline void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

/*
 * One line on stderr, "<who>: <message>[: <strerror(err)>]" (err 0: no
 * error text), written under the stderr lock so that threads reporting at
 * the same time never interleave.
 */
__attribute__((format(printf, 3, 0)))
static inline void vreport(const char *who, int err, const char *fmt, va_list ap)
{
	flockfile(stderr);
	fprintf(stderr, "%s: ", who);
	vfprintf(stderr, fmt, ap);
	if (err)
		fprintf(stderr, ": %s", strerror(err));
	fputc('\n', stderr);
	funlockfile(stderr);
}

/* The usage text (newline included): for --help on stdout and exit 0, for a usage error on stderr and exit 2. */
__attribute__((noreturn))
static inline void usage_exit(const char *text, bool help)
{
	fputs(text, help ? stdout : stderr);
	exit(help ? 0 : 2);
}

/* Parse an unsigned integer option (decimal or 0x-hex) or exit with usage code 2. */
static inline uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end || s[0] == '-')
		die("invalid value for --%s: '%s'", opt, s);
	return (uint64_t)v;
}

/* The index of s in names[0..n), or exit with usage code 2. */
static inline unsigned parse_choice(const char *opt, const char *s, const char *const names[], unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (strcmp(s, names[i]) == 0)
			return i;
	die("invalid value for --%s: '%s'", opt, s);
}

/* ---------------------------------------------------------------- threads and signals */

/* A worker's first steps: publish its tid, then wait at the start barrier
 * (main prints the ready line once every thread is through it). */
static inline void thread_started(pid_t *tid, pthread_barrier_t *barrier)
{
	*tid = gettid();
	pthread_barrier_wait(barrier);
}

/*
 * Block SIGTERM and SIGINT in the calling thread (the main thread, before it
 * creates any other: every thread inherits the mask), so that no handler ever
 * interrupts a worker's syscall; main takes them with wait_stop_signal().
 */
static inline void block_stop_signals(sigset_t *stopset)
{
	sigemptyset(stopset);
	sigaddset(stopset, SIGTERM);
	sigaddset(stopset, SIGINT);
	pthread_sigmask(SIG_BLOCK, stopset, NULL);
}

/* Wait up to timeout_ns for SIGTERM or SIGINT: true when one came.  False on
 * the timeout (EAGAIN) and on EINTR (e.g. a ptrace stop): the caller loops. */
static inline bool wait_stop_signal(const sigset_t *stopset, uint64_t timeout_ns)
{
	struct timespec ts = ns_to_timespec(timeout_ns);
	int sig = sigtimedwait(stopset, NULL, &ts);
	return sig == SIGTERM || sig == SIGINT;
}

/*
 * The main thread's loop once the ready line is out: tick(n) for n = 0, 1, ...
 * every period_ns (the first one a period from now), until SIGTERM or SIGINT
 * comes or, when finished is given, until it returns true (asked before every
 * tick and at least every poll_ns).  Returns the number of ticks.
 */
static inline uint64_t tick_until_stop(const sigset_t *stopset, uint64_t period_ns, void (*tick)(uint64_t n),
				       bool (*finished)(void), uint64_t poll_ns)
{
	uint64_t n = 0, next = now_ns(CLOCK_MONOTONIC) + period_ns;
	for (;;) {
		if (finished && finished())
			return n;
		uint64_t now = now_ns(CLOCK_MONOTONIC);
		if (now >= next) {
			tick(n++);
			next += period_ns;
			continue;
		}
		uint64_t wait = next - now;
		if (finished && wait > poll_ns)
			wait = poll_ns;
		if (wait_stop_signal(stopset, wait))
			return n;
	}
}

/* ---------------------------------------------------------------- memory */

/* A fresh private anonymous mapping (flags: further MAP_* flags), or exit 2 with "<who>: mmap(<bytes>): <error>". */
static inline void *map_anon_or_die(const char *who, size_t bytes, int prot, int flags)
{
	/* SAFETY: fresh private anonymous mapping, zero-filled on first touch. */
	void *p = mmap(NULL, bytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
	if (p == MAP_FAILED)
		die("%s: mmap(%zu): %s", who, bytes, strerror(errno));
	return p;
}

/* ---------------------------------------------------------------- step-coded pages */

/*
 * The content (magic, q, s, p) that stream q writes at step s into page p
 * (pagewriter: magic 0x5750 << 48, q the writer; hostile: 0x4854 << 48, q
 * the stream; each fixture's header comment is its spec, mirrored by
 * test/support/oracle.ts and test/support/hostile.ts):
 *   word 0 = magic | q << 40 | p,  word 1 = s,
 *   word w >= 2 = h ^ (w * GOLDEN64),  h = mix64(key ^ s << 20 ^ p),
 *   key = mix64(seed ^ (q + 1) << 56).
 */
static inline uint64_t stream_key(uint64_t seed, unsigned q)
{
	return mix64(seed ^ ((uint64_t)(q + 1) << 56));
}

static inline uint64_t step_hash(uint64_t key, uint64_t s, uint64_t p)
{
	return mix64(key ^ (s << 20) ^ p);
}

/* Word i of content (magic, q, s, p); h = step_hash(key, s, p). */
static inline uint64_t step_word(uint64_t magic, unsigned q, uint64_t s, uint64_t p, uint64_t h, unsigned i)
{
	if (i == 0)
		return magic | (uint64_t)q << 40 | p;
	if (i == 1)
		return s;
	return h ^ (i * GOLDEN64);
}

/*
 * Write content (magic, q, s, p) into the page at dst.  The destination is
 * volatile so that the compiler emits exactly one 8-byte store per word, in
 * increasing word order: no vectorised or memcpy-style stores whose order the
 * oracles could not model (a page caught mid-write is a prefix of the new
 * content followed by the old).
 */
static inline void step_fill(void *dst_, uint64_t magic, unsigned q, uint64_t key, uint64_t s, uint64_t p)
{
	volatile uint64_t *dst = dst_;
	uint64_t h = step_hash(key, s, p);
	dst[0] = magic | (uint64_t)q << 40 | p;
	dst[1] = s;
	for (uint64_t i = 2; i < WORDS_PER_PAGE; i++)
		dst[i] = h ^ (i * GOLDEN64);
}

/* The first word of the page at src that differs from content (magic, q, s, p), or -1. */
static inline int step_check(const void *src_, uint64_t magic, unsigned q, uint64_t key, uint64_t s, uint64_t p)
{
	const uint64_t *src = src_;
	uint64_t h = step_hash(key, s, p);
	for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
		if (src[i] != step_word(magic, q, s, p, h, i))
			return (int)i;
	return -1;
}

/* The first non-zero word of the page at src, or -1. */
static inline int zero_check(const void *src_)
{
	const uint64_t *src = src_;
	for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
		if (src[i])
			return (int)i;
	return -1;
}

/* The order a writer visits its pages in: a Fisher-Yates shuffle of 0..pages-1
 * seeded by (seed, writer index), the same in every program that uses it
 * (pagewriter, fixtures/thp), so the oracle follows either. */
static inline uint32_t *page_permutation(uint64_t pages, uint64_t seed, unsigned index, const char *who)
{
	uint32_t *perm = malloc(pages * sizeof *perm);
	if (!perm)
		die("%s: out of memory", who);
	for (uint64_t i = 0; i < pages; i++)
		perm[i] = (uint32_t)i;
	uint64_t state = seed ^ (UINT64_C(0x7065726D) << 32) ^ index;
	for (uint64_t i = pages - 1; i >= 1; i--) {
		uint64_t j = splitmix64_next(&state) % (i + 1);
		uint32_t tmp = perm[i];
		perm[i] = perm[j];
		perm[j] = tmp;
	}
	return perm;
}

#endif
