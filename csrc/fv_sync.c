/*
 * fv_sync.c -- implementation of the doorbell primitives (see fv_sync.h).
 *
 * Linux: spin briefly, then FUTEX_WAIT_BITSET on the shared (non-private)
 * futex word with an absolute CLOCK_MONOTONIC deadline.
 * Elsewhere: spin, then poll with nanosleep and exponential backoff.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE 1 /* syscall(), clock_gettime() under -std=c11 */
#endif
#if !defined(__linux__) && !defined(_POSIX_C_SOURCE) && !defined(__APPLE__)
#define _POSIX_C_SOURCE 200809L
#endif

#include "fv_sync.h"

#include <errno.h>
#include <stdint.h>
#include <time.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sched.h>
#define fv_yield() sched_yield()
#else
#define fv_yield() ((void)0)
#endif

#ifdef __linux__
#include <linux/futex.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ------------------------------------------------------------------ */
/* atomics                                                             */
/* ------------------------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)

uint32_t fv_load_acquire(const uint32_t *w)
{
    return __atomic_load_n(w, __ATOMIC_ACQUIRE);
}

void fv_store_release(uint32_t *w, uint32_t v)
{
    __atomic_store_n(w, v, __ATOMIC_RELEASE);
}

uint32_t fv_add_fetch(uint32_t *w, int32_t delta)
{
    return __atomic_add_fetch(w, (uint32_t)delta, __ATOMIC_SEQ_CST);
}

uint32_t fv_load_seq_cst(const uint32_t *w)
{
    return __atomic_load_n(w, __ATOMIC_SEQ_CST);
}

uint32_t fv_store_then_load(uint32_t *w, uint32_t v, const uint32_t *other)
{
    __atomic_store_n(w, v, __ATOMIC_SEQ_CST);
    return __atomic_load_n(other, __ATOMIC_SEQ_CST);
}

#else /* generic C11 */

#include <stdatomic.h>

/* uint32_t and _Atomic uint32_t share size and alignment on every platform
 * this project targets; the cast is the usual idiom for shared memory. */
#define FV_ATOMIC(p) ((_Atomic uint32_t *)(p))

uint32_t fv_load_acquire(const uint32_t *w)
{
    return atomic_load_explicit(FV_ATOMIC((uint32_t *)w), memory_order_acquire);
}

void fv_store_release(uint32_t *w, uint32_t v)
{
    atomic_store_explicit(FV_ATOMIC(w), v, memory_order_release);
}

uint32_t fv_add_fetch(uint32_t *w, int32_t delta)
{
    return atomic_fetch_add_explicit(FV_ATOMIC(w), (uint32_t)delta,
                                     memory_order_seq_cst) + (uint32_t)delta;
}

uint32_t fv_load_seq_cst(const uint32_t *w)
{
    return atomic_load_explicit(FV_ATOMIC((uint32_t *)w), memory_order_seq_cst);
}

uint32_t fv_store_then_load(uint32_t *w, uint32_t v, const uint32_t *other)
{
    atomic_store_explicit(FV_ATOMIC(w), v, memory_order_seq_cst);
    return atomic_load_explicit(FV_ATOMIC((uint32_t *)other), memory_order_seq_cst);
}

#endif

/* ------------------------------------------------------------------ */
/* helpers                                                             */
/* ------------------------------------------------------------------ */

#define FV_NS_PER_SEC INT64_C(1000000000)
/* Spin iterations between clock reads. */
#define FV_SPIN_BATCH 32

static inline void fv_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#elif defined(__aarch64__) || (defined(__arm__) && defined(__ARM_ARCH) && __ARM_ARCH >= 7)
    __asm__ __volatile__("yield" ::: "memory");
#elif defined(__powerpc__) || defined(__ppc__) || defined(__PPC__)
    __asm__ __volatile__("or 27,27,27" ::: "memory");
#elif defined(__GNUC__) || defined(__clang__)
    __asm__ __volatile__("" ::: "memory");
#endif
}

int64_t fv_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * FV_NS_PER_SEC + (int64_t)ts.tv_nsec;
}

/* Spin until *w changes or the clock reaches spin_end.
 * Returns 1 if the word changed; otherwise 0 and *now is the last clock read. */
static int fv_spin(const uint32_t *w, uint32_t expected, int64_t spin_end,
                   int64_t *now, int yield_cpu)
{
    for (;;) {
        if (yield_cpu) {
            /* Hand the core to any runnable process (maybe the one we wait for). */
            if (fv_load_acquire(w) != expected)
                return 1;
            fv_yield();
        } else {
            for (int i = 0; i < FV_SPIN_BATCH; i++) {
                if (fv_load_acquire(w) != expected)
                    return 1;
                fv_cpu_relax();
            }
        }
        *now = fv_monotonic_ns();
        if (*now >= spin_end)
            return fv_load_acquire(w) != expected;
    }
}

static int fv_poll_wait(const uint32_t *w, uint32_t expected, int64_t deadline)
{
    int64_t nap = 1000; /* 1 us */
    for (;;) {
        if (fv_load_acquire(w) != expected)
            return 1;
        int64_t step = nap;
        if (deadline >= 0) {
            int64_t left = deadline - fv_monotonic_ns();
            if (left <= 0)
                return fv_load_acquire(w) != expected;
            if (step > left)
                step = left;
        }
        struct timespec req;
        req.tv_sec = (time_t)(step / FV_NS_PER_SEC);
        req.tv_nsec = (long)(step % FV_NS_PER_SEC);
        if (nanosleep(&req, NULL) != 0 && errno == EINTR)
            return fv_load_acquire(w) != expected ? 1 : -1;
        if (nap < 1000000)
            nap *= 2;
    }
}

/* ------------------------------------------------------------------ */
/* wait / wake                                                          */
/* ------------------------------------------------------------------ */

int fv_wait_while_equal(uint32_t *w, uint32_t expected,
                        int64_t timeout_ns, int64_t spin_ns, int yield_cpu)
{
    if (fv_load_acquire(w) != expected)
        return 1;
    if (timeout_ns == 0)
        return 0;

    /* Absolute deadline, computed once (-1: none). */
    int64_t now = fv_monotonic_ns();
    int64_t deadline = -1;
    if (timeout_ns > 0)
        deadline = (timeout_ns > INT64_MAX - now) ? -1 : now + timeout_ns;

    if (spin_ns > 0) {
        int64_t spin_end = (spin_ns > INT64_MAX - now) ? INT64_MAX : now + spin_ns;
        if (deadline >= 0 && spin_end > deadline)
            spin_end = deadline;
        if (fv_spin(w, expected, spin_end, &now, yield_cpu))
            return 1;
        if (deadline >= 0 && now >= deadline)
            return 0;
    }

#ifdef __linux__
    struct timespec abs_ts;
    const struct timespec *tsp = NULL;
    if (deadline >= 0) {
        abs_ts.tv_sec = (time_t)(deadline / FV_NS_PER_SEC);
        abs_ts.tv_nsec = (long)(deadline % FV_NS_PER_SEC);
        tsp = &abs_ts;
    }
    for (;;) {
        if (fv_load_acquire(w) != expected)
            return 1;
        /* Shared futex (no FUTEX_PRIVATE_FLAG): the word is in a MAP_SHARED
         * segment.  FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC
         * timeout, so spurious wakeups never stretch the total wait. */
        long r = syscall(SYS_futex, w, FUTEX_WAIT_BITSET, expected, tsp,
                         NULL, FUTEX_BITSET_MATCH_ANY);
        if (r == 0)
            continue; /* woken (possibly spuriously): re-check the word */
        switch (errno) {
        case EAGAIN:  /* *w != expected when the kernel looked */
            continue;
        case ETIMEDOUT:
            return fv_load_acquire(w) != expected;
        case EINTR:
            return fv_load_acquire(w) != expected ? 1 : -1;
        default:
            /* ENOSYS (e.g. a seccomp filter) or similar: degrade to polling
             * rather than failing or busy-looping. */
            return fv_poll_wait(w, expected, deadline);
        }
    }
#else
    return fv_poll_wait(w, expected, deadline);
#endif
}

int fv_wake(uint32_t *w, int n)
{
#ifdef __linux__
    if (n < 0)
        n = 0;
    long r = syscall(SYS_futex, w, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -1 : (int)r;
#else
    (void)w;
    (void)n;
    return 0;
#endif
}

/* ------------------------------------------------------------------ */
/* parent death                                                        */
/* ------------------------------------------------------------------ */

#ifdef __linux__

/* The parent seen at installation; a pid fits in sig_atomic_t (int) on Linux. */
static volatile sig_atomic_t fv_parent = 0;

/* A file to unlink before the group is killed (the segment's name): "" for none. */
static char fv_unlink_path[4096] = "";

static void fv_kill_group(void)
{
    pid_t self = getpid();
    if (fv_unlink_path[0] != '\0')
        unlink(fv_unlink_path); /* async-signal-safe; ENOENT if another worker was first */
    kill(getpgrp() == self ? -self : self, SIGKILL);
}

int fv_unlink_on_parent_death(const char *path)
{
    size_t n = strlen(path);
    if (n >= sizeof fv_unlink_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(fv_unlink_path, path, n + 1);
    return 0;
}

static void fv_on_parent_death(int signum)
{
    (void)signum;
    if (getppid() != (pid_t)fv_parent) /* not just the forking thread: the process */
        fv_kill_group();
}

int fv_kill_group_on_parent_death(int signum)
{
    struct sigaction action;
    fv_parent = (sig_atomic_t)getppid();
    memset(&action, 0, sizeof action);
    action.sa_handler = fv_on_parent_death;
    action.sa_flags = SA_RESTART; /* the env's own blocking calls need not see EINTR */
    sigemptyset(&action.sa_mask);
    if (sigaction(signum, &action, NULL) != 0)
        return -1;
    if (prctl(PR_SET_PDEATHSIG, (unsigned long)signum, 0UL, 0UL, 0UL) != 0)
        return -1;
    /* the parent may have ended before prctl: then no signal ever comes */
    if (getppid() != (pid_t)fv_parent)
        fv_kill_group();
    return 0;
}

#else

int fv_kill_group_on_parent_death(int signum)
{
    (void)signum;
    errno = ENOSYS;
    return -1;
}

int fv_unlink_on_parent_death(const char *path)
{
    (void)path;
    errno = ENOSYS;
    return -1;
}

#endif
