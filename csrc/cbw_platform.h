/*
 * cbw_platform.h - the only place that knows which thread library is in use.
 *
 * Mutexes, condition variables with absolute monotonic deadlines, threads,
 * thread-local storage and a monotonic clock, for POSIX threads (Linux,
 * macOS, BSD) and Win32.  Every other file uses only these names.  Failures
 * that mean a broken invariant (locking an invalid mutex) abort.
 */
#ifndef CBW_PLATFORM_H
#define CBW_PLATFORM_H

#include <stdint.h>

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>
typedef SRWLOCK cbw__mutex;
typedef CONDITION_VARIABLE cbw__cond;
typedef HANDLE cbw__thread;
#else
#include <pthread.h>
typedef pthread_mutex_t cbw__mutex;
typedef pthread_cond_t cbw__cond;
typedef pthread_t cbw__thread;
#endif

#ifdef _MSC_VER
#define CBW__TLS __declspec(thread)
#else
#define CBW__TLS __thread
#endif

#define CBW__NEVER INT64_MAX

int cbw__mutex_init(cbw__mutex *m);
void cbw__mutex_destroy(cbw__mutex *m);
void cbw__mutex_lock(cbw__mutex *m);
void cbw__mutex_unlock(cbw__mutex *m);

int cbw__cond_init(cbw__cond *c);
void cbw__cond_destroy(cbw__cond *c);
void cbw__cond_signal(cbw__cond *c);
void cbw__cond_broadcast(cbw__cond *c);
void cbw__cond_wait(cbw__cond *c, cbw__mutex *m);
/* Waits until signalled or until the monotonic clock reaches deadline_ns
 * (CBW__NEVER: no limit).  Returns 0, or 1 when the deadline has passed. */
int cbw__cond_wait_until(cbw__cond *c, cbw__mutex *m, int64_t deadline_ns);

/* Starts fn(arg) on a new thread; returns 0 or -1. */
int cbw__thread_start(cbw__thread *t, void (*fn)(void *), void *arg);
void cbw__thread_join(cbw__thread t);
/* Lets a thread's resources go when it ends; it will never be joined. */
void cbw__thread_detach(cbw__thread t);

/* Sequentially consistent 64-bit atomic add; returns the new value. */
int64_t cbw__atomic_add(volatile int64_t *p, int64_t delta);
int64_t cbw__atomic_load(volatile int64_t *p);

/* A hint to the CPU that this thread is spinning. */
void cbw__cpu_relax(void);

/* Monotonic nanoseconds since an arbitrary origin. */
int64_t cbw__now_ns(void);
/* now + ms, saturating at CBW__NEVER; ms < 0 means no deadline. */
int64_t cbw__deadline_after_ms(int32_t ms);

#endif /* CBW_PLATFORM_H */
