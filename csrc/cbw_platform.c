/*
 * cbw_platform.c - POSIX and Win32 implementations of cbw_platform.h.
 *
 * DESIGN: condition variables wait against CLOCK_MONOTONIC wherever the
 * platform allows it (pthread_condattr_setclock on Linux and the BSDs); macOS
 * lacks it, so there a relative wait is computed from the monotonic clock,
 * and Win32 waits take relative milliseconds.  Deadlines are therefore never
 * disturbed by changes of the wall clock.
 */
#include "cbw_platform.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>

#ifdef _WIN32

int cbw__mutex_init(cbw__mutex *m) { InitializeSRWLock(m); return 0; }
void cbw__mutex_destroy(cbw__mutex *m) { (void)m; }
void cbw__mutex_lock(cbw__mutex *m) { AcquireSRWLockExclusive(m); }
void cbw__mutex_unlock(cbw__mutex *m) { ReleaseSRWLockExclusive(m); }

int cbw__cond_init(cbw__cond *c) { InitializeConditionVariable(c); return 0; }
void cbw__cond_destroy(cbw__cond *c) { (void)c; }
void cbw__cond_signal(cbw__cond *c) { WakeConditionVariable(c); }
void cbw__cond_broadcast(cbw__cond *c) { WakeAllConditionVariable(c); }

void cbw__cond_wait(cbw__cond *c, cbw__mutex *m)
{
    SleepConditionVariableSRW(c, m, INFINITE, 0);
}

int cbw__cond_wait_until(cbw__cond *c, cbw__mutex *m, int64_t deadline_ns)
{
    int64_t now, ms;
    if (deadline_ns == CBW__NEVER) {
        cbw__cond_wait(c, m);
        return 0;
    }
    now = cbw__now_ns();
    if (now >= deadline_ns)
        return 1;
    ms = (deadline_ns - now + 999999) / 1000000;
    if (ms > 0x7ffffffe)
        ms = 0x7ffffffe;
    if (!SleepConditionVariableSRW(c, m, (DWORD)ms, 0))
        return cbw__now_ns() >= deadline_ns;
    return 0;
}

struct cbw__trampoline { void (*fn)(void *); void *arg; };

static DWORD WINAPI cbw__thread_main(LPVOID p)
{
    struct cbw__trampoline t = *(struct cbw__trampoline *)p;
    free(p);
    t.fn(t.arg);
    return 0;
}

int cbw__thread_start(cbw__thread *t, void (*fn)(void *), void *arg)
{
    struct cbw__trampoline *tr = malloc(sizeof(*tr));
    if (tr == NULL)
        return -1;
    tr->fn = fn;
    tr->arg = arg;
    *t = CreateThread(NULL, 0, cbw__thread_main, tr, 0, NULL);
    if (*t == NULL) {
        free(tr);
        return -1;
    }
    return 0;
}

void cbw__thread_join(cbw__thread t)
{
    WaitForSingleObject(t, INFINITE);
    CloseHandle(t);
}

void cbw__thread_detach(cbw__thread t) { CloseHandle(t); }

int64_t cbw__atomic_add(volatile int64_t *p, int64_t delta)
{
    return InterlockedAdd64((volatile LONG64 *)p, delta);
}

int64_t cbw__atomic_load(volatile int64_t *p)
{
    return InterlockedAdd64((volatile LONG64 *)p, 0);
}

void cbw__cpu_relax(void)
{
    YieldProcessor();
}

int64_t cbw__now_ns(void)
{
    static LARGE_INTEGER freq;
    LARGE_INTEGER now;
    if (freq.QuadPart == 0)
        QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&now);
    return (int64_t)((double)now.QuadPart * 1e9 / (double)freq.QuadPart);
}

#else /* POSIX */

#if defined(__APPLE__)
#define CBW__RELATIVE_WAIT 1
#endif

int cbw__mutex_init(cbw__mutex *m)
{
#if defined(__GLIBC__) && defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
    /* The worker mutex is held for short spells by two or three threads at
     * a time: spinning briefly before sleeping saves a wake-up. */
    pthread_mutexattr_t attr;
    int rc;
    if (pthread_mutexattr_init(&attr) != 0)
        return -1;
    (void)pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
#else
    return pthread_mutex_init(m, NULL) == 0 ? 0 : -1;
#endif
}

void cbw__mutex_destroy(cbw__mutex *m) { pthread_mutex_destroy(m); }

void cbw__mutex_lock(cbw__mutex *m)
{
    if (pthread_mutex_lock(m) != 0)
        abort();
}

void cbw__mutex_unlock(cbw__mutex *m)
{
    if (pthread_mutex_unlock(m) != 0)
        abort();
}

int cbw__cond_init(cbw__cond *c)
{
#ifdef CBW__RELATIVE_WAIT
    return pthread_cond_init(c, NULL) == 0 ? 0 : -1;
#else
    pthread_condattr_t attr;
    int rc;
    if (pthread_condattr_init(&attr) != 0)
        return -1;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
#endif
}

void cbw__cond_destroy(cbw__cond *c) { pthread_cond_destroy(c); }
void cbw__cond_signal(cbw__cond *c) { pthread_cond_signal(c); }
void cbw__cond_broadcast(cbw__cond *c) { pthread_cond_broadcast(c); }

void cbw__cond_wait(cbw__cond *c, cbw__mutex *m)
{
    if (pthread_cond_wait(c, m) != 0)
        abort();
}

int cbw__cond_wait_until(cbw__cond *c, cbw__mutex *m, int64_t deadline_ns)
{
    struct timespec ts;
    int rc;
    if (deadline_ns == CBW__NEVER) {
        cbw__cond_wait(c, m);
        return 0;
    }
#ifdef CBW__RELATIVE_WAIT
    {
        int64_t left = deadline_ns - cbw__now_ns();
        if (left <= 0)
            return 1;
        ts.tv_sec = (time_t)(left / 1000000000);
        ts.tv_nsec = (long)(left % 1000000000);
        rc = pthread_cond_timedwait_relative_np(c, m, &ts);
    }
#else
    ts.tv_sec = (time_t)(deadline_ns / 1000000000);
    ts.tv_nsec = (long)(deadline_ns % 1000000000);
    rc = pthread_cond_timedwait(c, m, &ts);
#endif
    if (rc == ETIMEDOUT)
        return 1;
    if (rc != 0)
        abort();
    return 0;
}

struct cbw__trampoline { void (*fn)(void *); void *arg; };

static void *cbw__thread_main(void *p)
{
    struct cbw__trampoline t = *(struct cbw__trampoline *)p;
    free(p);
    t.fn(t.arg);
    return NULL;
}

int cbw__thread_start(cbw__thread *t, void (*fn)(void *), void *arg)
{
    struct cbw__trampoline *tr = malloc(sizeof(*tr));
    if (tr == NULL)
        return -1;
    tr->fn = fn;
    tr->arg = arg;
    if (pthread_create(t, NULL, cbw__thread_main, tr) != 0) {
        free(tr);
        return -1;
    }
    return 0;
}

void cbw__thread_join(cbw__thread t)
{
    if (pthread_join(t, NULL) != 0)
        abort();
}

void cbw__thread_detach(cbw__thread t) { pthread_detach(t); }

int64_t cbw__atomic_add(volatile int64_t *p, int64_t delta)
{
    return __atomic_add_fetch(p, delta, __ATOMIC_SEQ_CST);
}

int64_t cbw__atomic_load(volatile int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

void cbw__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}

int64_t cbw__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif /* _WIN32 */

int64_t cbw__deadline_after_ms(int32_t ms)
{
    int64_t now;
    if (ms < 0)
        return CBW__NEVER;
    now = cbw__now_ns();
    if (now > CBW__NEVER - (int64_t)ms * 1000000)
        return CBW__NEVER;
    return now + (int64_t)ms * 1000000;
}
