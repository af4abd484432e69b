/*
 * cbw.h - the exported API of the callbackworker C core.
 *
 * A worker owns routes (named FIFO queues, each served by its own threads),
 * a table of jobs keyed by 64-bit ids that are never reused, and one timer
 * thread that enforces run-time limits.  A job is an opaque callback token
 * plus a private copy of an input blob.  The core never interprets the token:
 * it hands each job to an executor through cbw_hooks, which is where a
 * language binding (the cffi bridge) takes its interpreter lock and calls the
 * real callback.  The core never calls a hook while holding its own mutex.
 *
 * Every function returning int returns CBW_OK (0) or a negative CBW_E* code,
 * unless its comment says otherwise.  Caller mistakes are error codes; a
 * broken internal invariant aborts.
 */
#ifndef CBW_H
#define CBW_H

#include <stddef.h>
#include <stdint.h>

#include "cbw_asyncmeta.h"

#define CBW_OK 0
#define CBW_ENOMEM (-1)     /* an allocation failed; nothing was changed */
#define CBW_EUNKNOWN (-2)   /* job id never issued or already destroyed */
#define CBW_ECLOSED (-3)    /* the worker is closing or closed */
#define CBW_EINVAL (-4)     /* an argument is out of range */
#define CBW_ENOTDONE (-5)   /* the job has not completed */
#define CBW_ETIMEDOUT (-6)  /* a wait ran out of time; the job is untouched */
#define CBW_EDEADLOCK (-7)  /* the wait could never be satisfied */
#define CBW_ESHUTDOWN (-8)  /* a wait was ended by close() */
#define CBW_ETHREAD (-9)    /* a thread could not be started */
#define CBW_ENOROUTE (-10)  /* no route with that id or name */
#define CBW_EROUTECLOSED (-11) /* the route accepts no new jobs */
#define CBW_EEXIST (-12)    /* a route with that name exists already */
#define CBW_EMORE (-13)     /* cbw_wait_copy: see *slow instead */

#define CBW_TIMEOUT_INFINITE (-1)
#define CBW_TIMEOUT_ROUTE (-2) /* cbw_start: use the route's timeout */
#define CBW_TIMEOUT_MAX 2147483647
#define CBW_DEFAULT_ROUTE 1
#define CBW_ROUTE_NAME_MAX 128

/* close() flags. */
#define CBW_CLOSE_DRAIN 1     /* run every queued job (and retry) before
                                 shutting down; suspended jobs are not
                                 waited for */
#define CBW_CLOSE_INTERRUPT 2 /* interrupt running callbacks; abandon threads
                                 still busy after the grace period */

/* cbw_start_ex() flags. */
#define CBW_JOB_DETACHED 1 /* destroyed as soon as it completes */
#define CBW_JOB_NOTIFY 2   /* hooks->completed reports its completion */

typedef struct cbw_worker cbw_worker;

/*
 * One attempt of a job, as the executor sees it.  `data`/`size` is the job's
 * private copy of the request; the callback may edit it in place and it then
 * becomes the response.  The executor may shrink `size`, store an integer
 * return code in `rc`, replace the response with cbw_run_set_result() or
 * record an error text with cbw_run_set_error().
 */
typedef struct cbw_run {
    int64_t id;
    uint64_t callback;
    unsigned char *data;
    size_t size;
    uint64_t tag;          /* the starter's, opaque: see cbw_start_ex */
    int64_t deadline_ns;   /* monotonic; INT64_MAX when there is no limit */
    int32_t timeout_ms;
    int32_t route;
    uint32_t attempt;
    int32_t rc;            /* the callback's integer return, recorded */
} cbw_run;

/*
 * One worker thread, as its executor sees it.  The exec_* fields belong to
 * the executor; the core only stores them, zeroed when the thread is made,
 * and keeps them until the worker is freed (after the thread has left).
 */
typedef struct cbw_slot {
    void *exec_state;
    uintptr_t exec_ident;
    int64_t exec_job;
    int exec_flags;
    int exec_interrupted;
    void *exec_memory;
    uintptr_t exec_lock;   /* room for a one-word lock of the executor's */
} cbw_slot;

/*
 * How the core runs jobs.  Only `run` is required.  A worker thread calls
 * thread_enter once, then for every burst of ready jobs session_begin,
 * run (once per job, up to a bounded number), session_end; thread_exit last.
 * The timer thread calls interrupt when a running job passes its deadline
 * (or at close with CBW_CLOSE_INTERRUPT); the job may already have left the
 * slot, so the executor must track which job its slot runs (exec_job) and
 * compare.  The core never touches the exec_* fields.
 */
typedef struct cbw_hooks {
    void *ctx;
    void (*thread_enter)(void *ctx, cbw_slot *slot);
    void (*thread_exit)(void *ctx, cbw_slot *slot);
    void (*session_begin)(void *ctx, cbw_slot *slot);
    void (*session_end)(void *ctx, cbw_slot *slot);
    int (*run)(void *ctx, cbw_slot *slot, cbw_run *run); /* CBW_STATUS_OK or _ERROR */
    void (*interrupt)(void *ctx, cbw_slot *slot, int64_t job_id);
    /* Callback lifetime (see cbw_token.c): retain is called, without the
     * core's mutex, before the first job with a token becomes visible;
     * release when some token may have no job left, after which the
     * executor calls cbw_tokens_collect under its own lock. */
    int (*retain)(void *ctx, uint64_t callback);
    void (*release)(void *ctx);
    /* Called once when the worker's memory is freed. */
    void (*finalize)(void *ctx);
    /* Some watched job (CBW_JOB_NOTIFY, cbw_job_watch) has completed; the
     * executor calls cbw_completions_collect.  Never called with the core's
     * mutex held; called on whichever thread completed the job. */
    void (*completed)(void *ctx);
} cbw_hooks;

/* A completed job detached from the table by cbw_wait() or cbw_take(). */
typedef struct cbw_result {
    int64_t id;
    int status;
    int32_t route;
    const unsigned char *data; /* the response; valid until released */
    size_t size;
    const char *error;         /* "" when the job succeeded */
    uint64_t callback;
    void *job_;                /* private */
    cbw_worker *worker_;       /* private */
} cbw_result;

/* A snapshot of one job. */
typedef struct cbw_job_info {
    int64_t id;
    int phase;
    int status;
    int state;
    int32_t timeout_ms;
    int32_t route;
    uint32_t attempt;
    int has_result;
    size_t result_size;
    int32_t rc;
    size_t error_len;
} cbw_job_info;

/* A snapshot of one route.  queued: ready to start, in FIFO order;
 * delayed: failed attempts waiting out their retry backoff.  Both are
 * pending (not running). */
typedef struct cbw_route_info {
    int32_t id;
    int state;
    int close_accepted;
    int32_t concurrency;
    int32_t timeout_ms;
    int32_t max_retries;
    int32_t backoff_ms;
    int32_t delay_ms;
    int64_t queued;
    int64_t delayed;
    int64_t running;
    int64_t threads;
} cbw_route_info;

/*
 * How a route runs its jobs.  concurrency >= 1 threads; timeout_ms is the
 * run-time limit of jobs started with CBW_TIMEOUT_ROUTE (-1: none).  A job
 * whose attempt fails (the executor's run returns CBW_STATUS_ERROR) is run
 * again, from a fresh copy of its original request, up to max_retries more
 * times, attempt n + 1 starting backoff_ms * 2^(n-1) ms (at most one hour)
 * after attempt n failed.  delay_ms is the least time between two
 * consecutive starts on the route.  A timed-out, cancelled or shut-down
 * attempt is final.
 */
typedef struct cbw_route_config {
    int32_t concurrency;
    int32_t timeout_ms;
    int32_t max_retries;
    int32_t backoff_ms;
    int32_t delay_ms;
} cbw_route_config;

/* Worker lifecycle. */
cbw_worker *cbw_worker_new(const cbw_hooks *hooks, int32_t concurrency, int *err);
int cbw_worker_close(cbw_worker *w, int flags, int32_t grace_ms);
void cbw_worker_release(cbw_worker *w);
int cbw_worker_set_grace(cbw_worker *w, int32_t grace_ms);
int cbw_worker_is_own_thread(cbw_worker *w);
/* Route schedules (retry backoff, delay between starts) read the monotonic
 * clock.  For tests, a worker may instead use a manual clock that starts at
 * 0 and moves only when cbw_worker_advance_clock is called; switch before
 * the first job starts (else CBW_EINVAL).  Run-time limits always use the
 * real clock. */
int cbw_worker_use_manual_clock(cbw_worker *w);
int cbw_worker_advance_clock(cbw_worker *w, int64_t ms);

/* Routes.  Route ids start at 1 (the default route, "default"). */
int32_t cbw_route_open(cbw_worker *w, const char *name, int32_t concurrency,
                       int32_t timeout_ms);
int32_t cbw_route_open_config(cbw_worker *w, const char *name,
                              const cbw_route_config *config);
int32_t cbw_route_find(cbw_worker *w, const char *name);
int cbw_route_close(cbw_worker *w, int32_t route);
int cbw_route_info_get(cbw_worker *w, int32_t route, cbw_route_info *out);
/* 1 once the route has no pending or running job, 0 if timeout_ms passed
 * first, CBW_ESHUTDOWN if close() stopped the worker meanwhile. */
int cbw_route_wait_drained(cbw_worker *w, int32_t route, int32_t timeout_ms);

/* Jobs.  cbw_start returns the new job id (> 0) or a CBW_E* code (< 0).
 * cbw_start_many starts n jobs, all or none: the requests lie back to back
 * in data, sizes[i] bytes each; their ids are written to ids[]. */
int64_t cbw_start(cbw_worker *w, int32_t route, uint64_t callback,
                  const char *data, size_t size, int32_t timeout_ms);
/* cbw_start with CBW_JOB_* flags and a tag: 64 bits the core only stores
 * (run.tag), so an executor can find per-job state it set up before the
 * job existed. */
int64_t cbw_start_ex(cbw_worker *w, int32_t route, uint64_t callback,
                     const char *data, size_t size, int32_t timeout_ms, int flags,
                     uint64_t tag);
/* cbw_start for a request the caller writes itself, straight into the job
 * (no intermediate copy): fill(arg, dst, size) runs once, before the job
 * becomes visible, without the core's mutex. */
typedef void (*cbw_fill_fn)(void *arg, unsigned char *dst, size_t size);
int64_t cbw_start_fill(cbw_worker *w, int32_t route, uint64_t callback, size_t size,
                       int32_t timeout_ms, cbw_fill_fn fill, void *arg);
int cbw_start_many(cbw_worker *w, int32_t route, uint64_t callback,
                   const char *data, const size_t *sizes, size_t n,
                   int32_t timeout_ms, int64_t *ids);
/* 1: the job was queued and is now CANCELLED; 0: it is running (it is
 * asked to stop, see cbw_current_cancel_requested) or has completed. */
int cbw_cancel(cbw_worker *w, int64_t id, uint64_t *callback);
int cbw_wait_complete(cbw_worker *w, int64_t id, int32_t timeout_ms);
int cbw_wait(cbw_worker *w, int64_t id, int32_t timeout_ms, cbw_result *out);
int cbw_take(cbw_worker *w, int64_t id, cbw_result *out);
/* cbw_wait for small responses, in one call: once the job has completed
 * successfully with a response of at most cap bytes, copies it to buf,
 * destroys the job and returns its size.  Otherwise (failed, or larger) the
 * job is detached into *slow as cbw_wait would and CBW_EMORE is returned;
 * other errors are cbw_wait's. */
int64_t cbw_wait_copy(cbw_worker *w, int64_t id, int32_t timeout_ms,
                      char *buf, size_t cap, cbw_result *slow);
/* Lets a detached result go.  A result keeps its worker's memory (not its
 * threads) alive, so it may be released after cbw_worker_release. */
void cbw_result_release(cbw_result *res);
/* Waits for ids[0..n) in order, as cbw_wait would for each, with one
 * deadline (timeout_ms) for the whole call, detaching each completed job
 * into out[i].  Stops after the first job that completed without success
 * (its status is in out[*done - 1]) or at the first wait that fails: then
 * that error is returned, for ids[*done], and that job is untouched.  Jobs
 * after the stop are untouched.  Returns CBW_OK otherwise.  A caller that
 * is not one of the worker's threads waits for the last job first (one
 * wake-up per call, not per job) and notices a job that failed, or was
 * taken, meanwhile within a millisecond. */
int cbw_wait_many(cbw_worker *w, const int64_t *ids, size_t n, int32_t timeout_ms,
                  cbw_result *out, size_t *done);
/* cbw_result_release for n results, taking the worker's mutex once. */
void cbw_result_release_many(cbw_result *res, size_t n);
int cbw_job_info_get(cbw_worker *w, int64_t id, cbw_job_info *out);
/* Asks for one completion report of a job: 1 if it has completed already
 * (no report follows), 0 if hooks->completed will report it. */
int cbw_job_watch(cbw_worker *w, int64_t id);
/* Moves up to cap reported job ids to out; returns how many. */
size_t cbw_completions_collect(cbw_worker *w, int64_t *out, size_t cap);
int cbw_job_error_text(cbw_worker *w, int64_t id, char *buf, size_t cap);

/* For executors: removes the tokens no job refers to any more and writes
 * them to out (at most cap); returns how many. */
size_t cbw_tokens_collect(cbw_worker *w, uint64_t *out, size_t cap);

/* Inside a callback: the attempt the calling thread is running, or NULL on
 * any thread that is not running a job; and whether cbw_cancel was called
 * on that running job (cooperative cancellation: cancel cannot stop a
 * running job, the callback may look and stop itself). */
const cbw_run *cbw_current_run(void);
cbw_worker *cbw_current_worker(void); /* whose thread this is, or NULL */
void *cbw_current_context(void);      /* that worker's cbw_hooks.ctx, or NULL */
int cbw_current_cancel_requested(void);

/* For executors, during run(). */
int cbw_run_set_result(cbw_run *run, const char *data, size_t size);
int cbw_run_set_error(cbw_run *run, const char *text);
/* The callback kept a view of the request after returning: the job record
 * and the request the run saw (which cbw_run_set_result leaves in place)
 * are never freed, so that view stays valid.  Such a job is never retried,
 * and a suspension it asked for fails it (CBW_STATUS_ERROR) instead: its
 * request cannot be replaced under the view. */
int cbw_run_keep_alive(cbw_run *run);
/* Durable jobs: asks that, when run() returns, the job suspend instead of
 * completing: it leaves its thread, waits (State SUSPENDED, phase QUEUED,
 * pending on its route) and runs again from the start - with `request` as
 * its request and the same attempt number - once cbw_job_wake wakes it or
 * wake_after_ms passes (-1: only when woken).  Ignored if the run times out;
 * the job completes with SHUTDOWN if the worker is closing, and with ERROR
 * if the run was kept alive (cbw_run_keep_alive). */
int cbw_run_suspend(cbw_run *run, const char *request, size_t size, int64_t wake_after_ms);
/* Wakes a suspended job after_ms from now (0: at once; a later call
 * replaces the time).  1 if it was suspended; 0 if it was not (if it is
 * running and after_ms is 0, a suspension it asks for ends at once). */
int cbw_job_wake(cbw_worker *w, int64_t id, int64_t after_ms);
/* The route clock in milliseconds (see cbw_worker_use_manual_clock). */
int64_t cbw_worker_clock_ms(cbw_worker *w);
/* 1 if the run has passed its deadline (its job is, or is about to be,
 * completed with TIMEOUT whatever the callback does). */
int cbw_run_overdue(const cbw_run *run);

/* Allocation hooks for tests: the Nth allocation from now fails (0 = never);
 * cbw_live_allocations counts blocks the core holds right now. */
void cbw_debug_fail_allocation(int64_t nth);
int64_t cbw_live_allocations(void);

#endif /* CBW_H */
