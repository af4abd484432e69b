/*
 * cbw_internal.h - structures shared by the core's translation units.
 *
 * Ownership and locking, for every file that includes this:
 *  - One mutex per worker (w->mu) guards everything below: the job table,
 *    every route's queue and counters, every thread record, every job's
 *    phase/status/refs/waiters, and the timer state.  The only fields read
 *    without it are a running job's run.data/size, which belong to the
 *    thread running it.
 *  - Nothing is called through cbw_hooks while w->mu is held.  An executor
 *    may therefore take its own lock (an interpreter lock) and then call back
 *    into the core, which takes w->mu: the order is always executor lock,
 *    then w->mu.
 *  - A job is freed when its last reference goes: the table holds one while
 *    the job is known, the thread running it holds one, a detached cbw_result
 *    holds one.  So a job that timed out and was taken while its callback
 *    still runs stays valid until the callback returns.
 *  - The worker is freed when its last reference goes: the owner's, plus one
 *    per detached thread (a thread abandoned after a timeout, or the thread
 *    that called close from inside a callback), plus one per detached
 *    cbw_result not yet released (releasing it takes w->mu).
 */
#ifndef CBW_INTERNAL_H
#define CBW_INTERNAL_H

#include "cbw.h"
#include "cbw_platform.h"

#define CBW__WAIT_STRIPES 64
#define CBW__BATCH_MAX 256
#define CBW__DEFAULT_GRACE_MS 100
#define CBW__QUIET_NS 100000      /* producer quiet this long: run now */
#define CBW__COALESCE_MAX_NS 2000000 /* never hold ready jobs back longer */
#define CBW__SPIN_NS 50000        /* an idle thread or a waiter spins this long
                                     before it sleeps (see cbw_thread.c) */
#define CBW__WAITER_SPIN_NS 20000 /* a thread with one job looks this long for
                                     its waiter before taking the interpreter
                                     lock (see cbw_thread.c) */
#define CBW__HANDOFF_MAX_NS 5000000 /* a start waits at most this long for an
                                       idle route's first session to begin
                                       (see cbw_thread.c) */

typedef struct cbw__job cbw__job;
typedef struct cbw__route cbw__route;
typedef struct cbw__thread_rec cbw__thread_rec;

struct cbw__job {
    cbw_run run;              /* first: executors get &job->run */
    cbw__job *next;           /* route FIFO link */
    unsigned char *request;   /* the request of a retried or replayed run
                                 (malloc) or NULL: once a run has seen it, it
                                 is freed only with the job or by the next
                                 park, so a view the executor kept
                                 (cbw_run_keep_alive) stays valid */
    unsigned char *result;    /* replacement response (malloc) or NULL */
    char *error;              /* error text (malloc) or NULL */
    uint32_t refs;
    int32_t waiters;          /* threads blocked on this job */
    uint8_t phase;
    uint8_t status;
    uint8_t in_queue;
    uint8_t cancel_requested;  /* cancel() called while it ran */
    uint8_t flags;             /* CBW_JOB_DETACHED, CBW_JOB_NOTIFY */
    unsigned char inline_data[]; /* the request copy: one allocation per job */
};

/* Core-private job flags, beside CBW_JOB_DETACHED and CBW_JOB_NOTIFY.  A
 * job waiting out a retry backoff sits in its route's retry list (not the
 * FIFO), ordered by run.deadline_ns, which holds its due time meanwhile. */
#define CBW__JOB_RETRYING 0x10
#define CBW__JOB_KEPT 0x20 /* cbw_run_keep_alive: never retried in place */
#define CBW__JOB_REPLAY 0x08 /* its next run replays the same attempt */
#define CBW__JOB_SUSPENDED 0x40 /* in the retry list until woken or due */
#define CBW__JOB_WOKEN 0x80 /* cbw_job_wake while it ran: a suspension ends at once */

struct cbw__thread_rec {
    cbw_slot slot;            /* first: executors get &rec->slot */
    cbw_worker *w;
    cbw__route *route;
    cbw__thread handle;
    cbw__job *job;            /* the job it is running, or NULL */
    int64_t deadline_ns;      /* the running job's deadline, as the timer
                                 sees it; close may pull it forward */
    char *pending_error;      /* cbw_run_set_error text, moved to the job
                                 under w->mu when the run finishes */
    unsigned char *pristine;  /* on a retrying route: the running job's
                                 request as it was before the attempt */
    size_t pristine_size;
    unsigned char *suspend_request; /* cbw_run_suspend: the replay's request */
    size_t suspend_size;
    int64_t suspend_wake_ms;
    cbw__thread_rec *next;    /* the route's live threads */
    cbw__thread_rec *all_next; /* every thread record the worker made */
    uint8_t detached;         /* leaves on its own; never joined */
    uint8_t orphaned;         /* abandoned after its job timed out */
    uint8_t exited;
    uint8_t blocked;          /* in an infinite cbw_wait (deadlock check) */
    uint8_t handoff;          /* raised its route's handoff when it was made */
    int32_t blocked_on_route; /* ...for a job queued on this route, or 0 */
};

struct cbw__route {
    int32_t id;
    char name[CBW_ROUTE_NAME_MAX + 1];
    int32_t concurrency;
    int32_t timeout_ms;
    int32_t max_retries;
    int32_t backoff_ms;
    int32_t delay_ms;
    int64_t next_start_ns;     /* delay_ms: no start before this (route clock) */
    cbw__job *retry_head;      /* failed attempts waiting, earliest due first */
    int64_t delayed;           /* jobs in the retry list */
    int64_t suspended;         /* ...of which suspended (durable) jobs */
    uint8_t open;
    uint8_t close_accepted;
    cbw__job *head, *tail;
    int64_t queued;
    int64_t running;
    int64_t nthreads;          /* live (not orphaned, not exited) threads */
    int32_t idle;              /* threads waiting on cond */
    int32_t wakeups;           /* signals sent but not yet consumed */
    int32_t drain_waiters;
    int64_t waiting;           /* threads blocked on this route's jobs;
                                  written with cbw__atomic_add */
    uint8_t waited_for;        /* its last job had a waiter when it ended */
    int32_t delaying;          /* threads coalescing before a burst */
    cbw__cond coalc;           /* coalescing threads wait here */
    int64_t enqueued;          /* jobs ever queued (coalescing and spinning
                                  watch it); written with cbw__atomic_add */
    uint8_t spinning;          /* a thread spins for work (at most one) */
    uint8_t handoff;           /* a thread woken on an idle route is taking
                                  the executor's lock for its first job:
                                  starts wait for it on handc */
    cbw__cond handc;
    cbw__cond cond;            /* idle threads wait here for work */
    cbw__thread_rec *threads;
};

typedef struct cbw__page cbw__page;

typedef struct cbw__table {
    cbw__page **pages;         /* directory: hash of page number -> page */
    size_t mask;               /* directory capacity - 1 (a power of two) */
    size_t npages;
    size_t count;              /* jobs in the table */
    cbw__page *last;           /* the page of the latest put: a hot hint */
} cbw__table;

typedef struct cbw__token {
    uint64_t token;
    int64_t count;             /* jobs that may still run this callback */
    uint8_t used;              /* 0: empty slot (any token value is valid) */
} cbw__token;

typedef struct cbw__tokens {
    cbw__token *slots;
    size_t mask;
    size_t count;
    int64_t dead;              /* counts that reached 0 since the last collect */
    uint64_t collects;         /* collects that removed something */
    uint64_t orphans[8];       /* retained, but the table could not take
                                  them (ENOMEM): the next collect returns them */
    int norphans;
    uint8_t need_retain;       /* the executor has a retain hook */
} cbw__tokens;

struct cbw_worker {
    cbw__mutex mu;
    cbw_hooks hooks;
    uint32_t refs;
    uint8_t closing;           /* no new starts */
    uint8_t draining;          /* close(drain) is running the queue empty */
    uint8_t stopping;          /* threads leave; waiters wake with SHUTDOWN */
    uint8_t interrupting;      /* running jobs were told to stop (CLOSE_INTERRUPT) */
    uint8_t closed;            /* close() has finished */
    int64_t next_id;
    int32_t grace_ms;
    cbw__table table;
    cbw__tokens tokens;
    int64_t *done_ids;         /* completions to report (CBW_JOB_NOTIFY) */
    size_t done_len, done_cap;
    size_t notify_live;        /* watched jobs not yet completed: done_ids
                                  always has room for all of them */
    cbw__route **routes;       /* routes[i] has id i + 1 */
    int32_t nroutes;
    int32_t routes_cap;
    cbw__thread_rec *all_threads;
    cbw__cond waitc[CBW__WAIT_STRIPES]; /* job waiters, striped by job id */
    cbw__cond statec;          /* drain, close and thread-exit changes */
    /* The timer thread. */
    cbw__thread timer;
    cbw__cond timerc;
    uint8_t timer_started;
    uint8_t timer_stop;
    uint8_t timer_detached;    /* closed from the timer's own thread */
    uint8_t release_pending;   /* released by a worker thread mid-close */
    int64_t timer_wake_ns;     /* when it will next look; INT64_MIN: awake */
    int64_t completions;       /* jobs ever completed (spinning waiters watch
                                  it); written with cbw__atomic_add */
    int32_t batch_waiters;     /* callers of wait_many waiting for a batch's
                                  last job */
    int64_t unsuccessful;      /* jobs ever completed without success while
                                  batch_waiters > 0: wakes those callers */
    uint8_t manual_clock;      /* route schedules read clock_ns, not the OS */
    int64_t clock_ns;
};

extern CBW__TLS cbw__thread_rec *cbw__self;
extern CBW__TLS cbw_worker *cbw__timer_self; /* set on a worker's timer */

/* Memory (cbw_alloc.c): every core allocation goes through these. */
void *cbw__malloc(size_t n);
void *cbw__calloc(size_t n, size_t size);
void cbw__free(void *p);
char *cbw__strdup(const char *s);

/* Job table (cbw_table.c). */
int cbw__table_init(cbw__table *t);
void cbw__table_destroy(cbw__table *t);
cbw__job *cbw__table_get(const cbw__table *t, int64_t id);
int cbw__table_put(cbw__table *t, cbw__job *job);
int cbw__table_reserve(cbw__table *t, int64_t first_id, size_t n);
void cbw__table_each(cbw__table *t, void (*fn)(cbw__job *));
void cbw__table_remove(cbw__table *t, int64_t id);

/* Jobs (cbw_job.c); all under w->mu. */
cbw__job *cbw__job_new(const char *data, size_t size);
void cbw__job_unref(cbw__job *job);
void cbw__job_complete(cbw_worker *w, cbw__job *job, int status, const char *why);
int cbw__job_state(const cbw__job *job);
cbw__route *cbw__route_get(cbw_worker *w, int32_t id);

/* Callback tokens (cbw_token.c); under w->mu.  cbw__tokens_add sets
 * *missing instead of adding when the executor must retain the token first
 * (pass missing = NULL once it has). */
int cbw__tokens_add(cbw__tokens *t, uint64_t token, int64_t n, int *missing);
void cbw__tokens_done(cbw_worker *w, uint64_t token, int64_t n);
void cbw__tokens_destroy(cbw__tokens *t);
/* What must be reported once w->mu is dropped: call cbw__pending under the
 * lock, cbw__after_unlock after it (it calls the release and completed
 * hooks as needed). */
#define CBW__PENDING_TOKENS 1
#define CBW__PENDING_DONE 2
int cbw__pending(cbw_worker *w);
void cbw__after_unlock(cbw_worker *w, int pending);
int cbw__notify_reserve(cbw_worker *w);

/* Threads (cbw_thread.c); all under w->mu. */
int cbw__route_ensure_threads(cbw_worker *w, cbw__route *r);
void cbw__route_unlink_thread(cbw__route *r, cbw__thread_rec *t);
void cbw__route_wake(cbw__route *r);
void cbw__route_await_handoff(cbw_worker *w, cbw__route *r);

/* The timer (cbw_timer.c); all under w->mu. */
int cbw__timer_start(cbw_worker *w);
void cbw__timer_arm(cbw_worker *w, int64_t deadline_ns);

/* Routes (cbw_route.c); under w->mu. */
int32_t cbw__route_add(cbw_worker *w, const char *name, const cbw_route_config *cfg);
/* No job pending (queued or delayed) or running. */
#define cbw__route_idle(r) ((r)->queued == 0 && (r)->delayed == 0 && (r)->running == 0)
/* Nothing but suspended jobs, which wait for the outside world: a drain
 * does not wait for them. */
#define cbw__route_settled(r) \
    ((r)->queued == 0 && (r)->delayed == (r)->suspended && (r)->running == 0)
/* Whom a job leaving route r must wake on w->statec. */
#define cbw__route_drain_check(w, r) \
    ((cbw__route_idle(r) && (r)->drain_waiters) || ((w)->draining && cbw__route_settled(r)))

/* Route schedules: retries and delay between starts (cbw_schedule.c); all
 * under w->mu. */
int64_t cbw__route_clock(const cbw_worker *w);
int cbw__route_ready(cbw_worker *w, cbw__route *r, int64_t *wake_ns);
void cbw__route_started(cbw_worker *w, cbw__route *r);
void cbw__retry_snapshot(cbw__thread_rec *t, cbw__job *job);
int cbw__retry_schedule(cbw_worker *w, cbw__route *r, cbw__thread_rec *t,
                        cbw__job *job);
int cbw__suspend_park(cbw_worker *w, cbw__route *r, cbw__thread_rec *t, cbw__job *job);
void cbw__retry_unlink(cbw__route *r, cbw__job *job);
void cbw__retry_shut_down(cbw_worker *w, cbw__route *r);
void cbw__worker_unref(cbw_worker *w); /* called with w->mu held; unlocks */

#endif /* CBW_INTERNAL_H */
