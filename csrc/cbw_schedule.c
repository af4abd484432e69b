/*
 * cbw_schedule.c - route schedules: retries with backoff, delay between starts.
 *
 * DESIGN
 * A route may retry failed attempts (max_retries, backoff_ms) and space its
 * starts (delay_ms).  Both are kept by the route's own threads; there is no
 * scheduler thread and no polling:
 *  - When an attempt fails and the route may retry it, the thread that ran
 *    it restores the request from the copy it took before the attempt
 *    (cbw__retry_snapshot, made without the lock: the request belongs to the
 *    running thread), and puts the job in the route's retry list, ordered by
 *    due time.  The job stays QUEUED/PENDING to everyone else: waiters keep
 *    waiting, cancel cancels it.  Its run.deadline_ns holds the due time
 *    while it waits (a deadline means nothing to a job that is not running).
 *  - An idle thread sleeps until the earliest of: the first retry due, the
 *    route's next allowed start (when jobs are queued).  cbw__route_ready
 *    moves due retries to the FIFO tail and says whether a job may start now.
 *  - Every start on a route with delay_ms pushes next_start_ns forward, so
 *    the gap holds across all of the route's threads.
 * The list and counters are guarded by w->mu like the rest of the route.
 *
 * The route clock is the monotonic clock, or, for tests, a manual clock
 * that only cbw_worker_advance_clock moves: advancing it promotes due
 * retries at once (so the caller sees them queued when it returns) and
 * wakes the route threads, which sleep without a deadline meanwhile.
 */
#include <stdlib.h>
#include <string.h>

#include "cbw_internal.h"

#define CBW__BACKOFF_CAP_MS 3600000 /* one hour */

int64_t cbw__route_clock(const cbw_worker *w)
{
    return w->manual_clock ? w->clock_ns : cbw__now_ns();
}

/* The wait before attempt + 1, after `attempt` (1-based) failed. */
static int64_t backoff_ns(const cbw__route *r, uint32_t attempt)
{
    int64_t ms = r->backoff_ms;
    uint32_t shift = attempt > 0 ? attempt - 1 : 0;
    if (shift >= 32 || ms << shift > CBW__BACKOFF_CAP_MS)
        ms = CBW__BACKOFF_CAP_MS;
    else
        ms <<= shift;
    return ms * 1000000;
}

static int64_t add_saturating(int64_t a, int64_t b)
{
    return a > CBW__NEVER - b ? CBW__NEVER : a + b;
}

/* Moves the retries that are due to the tail of the FIFO. */
static void promote(cbw__route *r, int64_t now)
{
    cbw__job *job;
    while ((job = r->retry_head) != NULL && job->run.deadline_ns <= now) {
        r->retry_head = job->next;
        job->next = NULL;
        if (job->flags & CBW__JOB_SUSPENDED)
            r->suspended--;
        job->flags &= (uint8_t)~(CBW__JOB_RETRYING | CBW__JOB_SUSPENDED);
        job->run.deadline_ns = CBW__NEVER;
        job->in_queue = 1; /* the list's reference passes to the queue */
        if (r->tail != NULL)
            r->tail->next = job;
        else
            r->head = job;
        r->tail = job;
        r->delayed--;
        r->queued++;
        cbw__atomic_add(&r->enqueued, 1);
    }
}

int cbw__route_ready(cbw_worker *w, cbw__route *r, int64_t *wake_ns)
{
    int64_t now, at = CBW__NEVER;
    *wake_ns = CBW__NEVER;
    if (r->retry_head == NULL && r->delay_ms == 0)
        return r->head != NULL;
    now = cbw__route_clock(w);
    promote(r, now);
    if (r->head != NULL) {
        if (now >= r->next_start_ns)
            return 1;
        at = r->next_start_ns;
    }
    if (r->retry_head != NULL && r->retry_head->run.deadline_ns < at)
        at = r->retry_head->run.deadline_ns;
    if (!w->manual_clock)
        *wake_ns = at;
    return 0;
}

void cbw__route_started(cbw_worker *w, cbw__route *r)
{
    if (r->delay_ms > 0)
        r->next_start_ns = add_saturating(cbw__route_clock(w),
                                          (int64_t)r->delay_ms * 1000000);
}

void cbw__retry_snapshot(cbw__thread_rec *t, cbw__job *job)
{
    size_t n = job->run.size;
    t->pristine_size = n;
    t->pristine = cbw__malloc(n ? n : 1); /* NULL: this attempt is final */
    if (t->pristine != NULL && n)
        memcpy(t->pristine, job->run.data, n);
}

/* The retry list, ordered by due time (run.deadline_ns), FIFO among equals. */
static void insert_waiting(cbw__route *r, cbw__job *job)
{
    cbw__job **p = &r->retry_head;
    while (*p != NULL && (*p)->run.deadline_ns <= job->run.deadline_ns)
        p = &(*p)->next;
    job->next = *p;
    *p = job;
}

static void remove_waiting(cbw__route *r, cbw__job *job)
{
    cbw__job **p = &r->retry_head;
    while (*p != job) {
        if (*p == NULL)
            abort();
        p = &(*p)->next;
    }
    *p = job->next;
    job->next = NULL;
}

/* Puts a job whose attempt just ended back to waiting, in the retry list,
 * due at `due`, with `request` (malloc'd, size bytes) as the request its
 * next attempt sees: the buffer becomes the job's (its inline copy is left
 * unused, so a request of any size fits).  The running thread's reference
 * passes to the list. */
static void park(cbw__route *r, cbw__thread_rec *t, cbw__job *job,
                 unsigned char *request, size_t size, int64_t due)
{
    cbw__free(job->result); /* no view of these escaped (may_park) */
    job->result = NULL;
    cbw__free(job->request);
    job->request = request;
    job->run.data = request;
    job->run.size = size;
    job->run.rc = 0;
    cbw__free(t->pending_error); /* the next attempt starts afresh */
    t->pending_error = NULL;
    job->phase = CBW_PHASE_QUEUED;
    job->run.deadline_ns = due;
    job->flags |= CBW__JOB_RETRYING;
    insert_waiting(r, job);
    r->delayed++;
    cbw__cond_broadcast(&r->cond); /* idle threads may now sleep less */
}

static int may_park(const cbw_worker *w, const cbw__job *job)
{
    return !(job->flags & CBW__JOB_KEPT) && (!w->closing || w->draining);
}

int cbw__retry_schedule(cbw_worker *w, cbw__route *r, cbw__thread_rec *t,
                        cbw__job *job)
{
    unsigned char *request = t->pristine;
    if (r->max_retries == 0 || job->run.attempt > (uint32_t)r->max_retries ||
        request == NULL || job->cancel_requested || !may_park(w, job))
        return 0;
    t->pristine = NULL;
    park(r, t, job, request, t->pristine_size,
         add_saturating(cbw__route_clock(w), backoff_ns(r, job->run.attempt)));
    return 1;
}

int cbw__suspend_park(cbw_worker *w, cbw__route *r, cbw__thread_rec *t, cbw__job *job)
{
    unsigned char *request = t->suspend_request;
    int64_t due;
    if (request == NULL || !may_park(w, job))
        return 0;
    t->suspend_request = NULL;
    if (job->flags & CBW__JOB_WOKEN)
        due = cbw__route_clock(w); /* signalled while it was suspending */
    else if (t->suspend_wake_ms < 0)
        due = CBW__NEVER;
    else
        due = add_saturating(cbw__route_clock(w), t->suspend_wake_ms * 1000000);
    job->flags &= (uint8_t)~CBW__JOB_WOKEN;
    job->flags |= CBW__JOB_SUSPENDED | CBW__JOB_REPLAY; /* not a new attempt */
    r->suspended++;
    park(r, t, job, request, t->suspend_size, due);
    return 1;
}

int cbw_run_suspend(cbw_run *run, const char *request, size_t size, int64_t wake_after_ms)
{
    cbw__thread_rec *self = cbw__self;
    unsigned char *copy;
    if (self == NULL || self->job != (cbw__job *)(void *)run ||
        (request == NULL && size > 0) || wake_after_ms < -1 ||
        wake_after_ms > CBW__NEVER / 1000000)
        return CBW_EINVAL;
    copy = cbw__malloc(size ? size : 1);
    if (copy == NULL)
        return CBW_ENOMEM;
    if (size)
        memcpy(copy, request, size);
    /* Only the running thread touches these until its run ends. */
    cbw__free(self->suspend_request);
    self->suspend_request = copy;
    self->suspend_size = size;
    self->suspend_wake_ms = wake_after_ms;
    return CBW_OK;
}

int cbw_job_wake(cbw_worker *w, int64_t id, int64_t after_ms)
{
    cbw__job *job;
    cbw__route *r;
    int rc = 0;
    if (after_ms < 0 || after_ms > CBW__NEVER / 1000000)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    job = w->stopping ? NULL : cbw__table_get(&w->table, id);
    if (job == NULL) {
        rc = w->stopping ? CBW_ECLOSED : CBW_EUNKNOWN;
    } else if (job->flags & CBW__JOB_SUSPENDED) {
        r = cbw__route_get(w, job->run.route);
        remove_waiting(r, job);
        job->run.deadline_ns = add_saturating(cbw__route_clock(w), after_ms * 1000000);
        insert_waiting(r, job);
        promote(r, cbw__route_clock(w));
        cbw__cond_broadcast(&r->cond);
        rc = 1;
    } else if (job->phase == CBW_PHASE_RUNNING && after_ms == 0) {
        job->flags |= CBW__JOB_WOKEN;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int64_t cbw_worker_clock_ms(cbw_worker *w)
{
    int64_t now;
    cbw__mutex_lock(&w->mu);
    now = cbw__route_clock(w);
    cbw__mutex_unlock(&w->mu);
    return now / 1000000;
}

void cbw__retry_unlink(cbw__route *r, cbw__job *job)
{
    remove_waiting(r, job);
    if (job->flags & CBW__JOB_SUSPENDED)
        r->suspended--;
    job->flags &= (uint8_t)~(CBW__JOB_RETRYING | CBW__JOB_SUSPENDED);
    r->delayed--;
    cbw__job_unref(job); /* the list's reference */
}

void cbw__retry_shut_down(cbw_worker *w, cbw__route *r)
{
    cbw__job *job;
    while ((job = r->retry_head) != NULL) {
        cbw__tokens_done(w, job->run.callback, 1);
        cbw__job_complete(w, job, CBW_STATUS_SHUTDOWN,
                          job->flags & CBW__JOB_SUSPENDED
                              ? "the worker was closed while the job was suspended"
                              : "the worker was closed before the job was retried");
        cbw__retry_unlink(r, job);
    }
}

int cbw_worker_use_manual_clock(cbw_worker *w)
{
    int rc = CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if (w->next_id == 1 && !w->closing) {
        w->manual_clock = 1;
        w->clock_ns = 0;
        rc = CBW_OK;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_worker_advance_clock(cbw_worker *w, int64_t ms)
{
    int32_t i;
    int rc = CBW_OK;
    if (ms < 0 || ms > CBW__NEVER / 1000000)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if (!w->manual_clock) {
        rc = CBW_EINVAL;
    } else if (w->stopping) {
        rc = CBW_ECLOSED;
    } else {
        w->clock_ns = add_saturating(w->clock_ns, ms * 1000000);
        for (i = 0; i < w->nroutes; i++) {
            promote(w->routes[i], w->clock_ns);
            cbw__cond_broadcast(&w->routes[i]->cond);
        }
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}
