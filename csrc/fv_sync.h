/*
 * fv_sync.h -- cross-process "doorbell" primitives for fastvec.
 *
 * Plain C11, no Python.  Every function operates on a naturally aligned
 * 32-bit word that may live in a MAP_SHARED mapping used by several
 * processes, so nothing here uses process-private futexes.
 *
 * These are mechanisms only: no policy about which word means what.
 */
#ifndef FV_SYNC_H
#define FV_SYNC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when waits sleep in the kernel (Linux futex), 0 for the polling fallback. */
#ifdef __linux__
#define FV_HAVE_FUTEX 1
#else
#define FV_HAVE_FUTEX 0
#endif

/* Atomic load with acquire ordering. */
uint32_t fv_load_acquire(const uint32_t *w);

/* Atomic store with release ordering. */
void fv_store_release(uint32_t *w, uint32_t v);

/* Atomic *w += delta (modulo 2**32), sequentially consistent; returns the NEW value. */
uint32_t fv_add_fetch(uint32_t *w, int32_t delta);

/* Atomic load, sequentially consistent: after an fv_add_fetch or fv_store_then_load of
 * another word it is ordered after that write (a Dekker-style handshake: of two processes
 * that each write one word and then read the other's, at least one sees the other's write;
 * acquire/release alone do not promise that). */
uint32_t fv_load_seq_cst(const uint32_t *w);

/* Store v into *w, then load *other, both sequentially consistent; returns *other. */
uint32_t fv_store_then_load(uint32_t *w, uint32_t v, const uint32_t *other);

/*
 * Block while *w == expected.
 *
 *   returns  1  as soon as *w != expected (observed with acquire ordering),
 *            0  if timeout_ns elapsed first (timeout_ns < 0: wait forever),
 *           -1  if a signal interrupted the sleep (EINTR), so the caller can
 *               run its signal handlers and call again with the remaining time.
 *
 * Spins for up to spin_ns first, then sleeps. The spin uses a CPU relax hint, or, with
 * yield_cpu, sched_yield() between checks so that a process waiting on a busy core hands
 * that core to whoever is runnable there (often the very process it waits for).
 * Safe to call without any lock held; it never touches Python state.
 */
int fv_wait_while_equal(uint32_t *w, uint32_t expected,
                        int64_t timeout_ns, int64_t spin_ns, int yield_cpu);

/*
 * Wake up to n waiters blocked on w (INT32_MAX: all of them).
 * Returns the number woken, or -1 with errno set.  Without futexes this is
 * a no-op returning 0 (waiters poll).
 */
int fv_wake(uint32_t *w, int n);

/* CLOCK_MONOTONIC in nanoseconds (the clock used for wait deadlines). */
int64_t fv_monotonic_ns(void);

/* 1 where a process can ask to be signalled when its parent ends (Linux PR_SET_PDEATHSIG). */
#ifdef __linux__
#define FV_HAVE_PDEATHSIG 1
#else
#define FV_HAVE_PDEATHSIG 0
#endif

/*
 * Kill the caller's process group when its parent process ends.
 *
 * Installs an async-signal-safe handler for signum and asks the kernel to
 * send signum when the parent ends.  Linux sends it when the parent *thread*
 * that forked the caller ends, so the handler acts only if the parent
 * process has changed (getppid() differs from the one seen here): it then
 * sends SIGKILL to the caller's whole process group if the caller leads one,
 * else to the caller alone.  If the parent ends while this call runs, the
 * group is killed at once (the caller checks for a parent that ended before).
 *
 * Returns 0, or -1 with errno set (ENOSYS without FV_HAVE_PDEATHSIG).
 */
int fv_kill_group_on_parent_death(int signum);

/*
 * Have the parent-death handler unlink path (copied here) before it kills the group,
 * so that a segment whose creator died is not left behind.  Returns 0, or -1 with errno
 * set (ENAMETOOLONG, or ENOSYS where there is no parent-death signal).
 */
int fv_unlink_on_parent_death(const char *path);

#ifdef __cplusplus
}
#endif

#endif /* FV_SYNC_H */
