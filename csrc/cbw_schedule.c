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
        job->flags &= (uint8_t)~CBW__JOB_RETRYING;
        job->run.deadline_ns = CBW__NEVER;
        job->in_queue = 1; /* the list's reference passes to the queue */
        if (r->tail != NULL)
            r->tail->next = job;
        else
            r->head = job;
        r->tail = job;
        r->delayed--;
        r->queued++;
        r->enqueued++;
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

int cbw__retry_schedule(cbw_worker *w, cbw__route *r, cbw__thread_rec *t,
                        cbw__job *job)
{
    cbw__job **p;
    if (r->max_retries == 0 || job->run.attempt > (uint32_t)r->max_retries ||
        t->pristine == NULL || job->cancel_requested ||
        (job->flags & CBW__JOB_KEPT) || (w->closing && !w->draining))
        return 0;
    /* The attempt's response is dropped: the next one starts afresh. */
    cbw__free(job->result);
    job->result = NULL;
    cbw__free(t->pending_error);
    t->pending_error = NULL;
    if (t->pristine_size)
        memcpy(job->inline_data, t->pristine, t->pristine_size);
    job->run.data = job->inline_data;
    job->run.size = t->pristine_size;
    job->run.rc = 0;
    job->phase = CBW_PHASE_QUEUED;
    job->run.deadline_ns = add_saturating(cbw__route_clock(w),
                                          backoff_ns(r, job->run.attempt));
    job->flags |= CBW__JOB_RETRYING;
    for (p = &r->retry_head; *p != NULL && (*p)->run.deadline_ns <= job->run.deadline_ns;
         p = &(*p)->next)
        ;
    job->next = *p; /* the running thread's reference passes to the list */
    *p = job;
    r->delayed++;
    cbw__cond_broadcast(&r->cond); /* idle threads may now sleep less */
    return 1;
}

void cbw__retry_unlink(cbw__route *r, cbw__job *job)
{
    cbw__job **p = &r->retry_head;
    while (*p != job) {
        if (*p == NULL)
            abort();
        p = &(*p)->next;
    }
    *p = job->next;
    job->next = NULL;
    job->flags &= (uint8_t)~CBW__JOB_RETRYING;
    r->delayed--;
    cbw__job_unref(job); /* the list's reference */
}

void cbw__retry_shut_down(cbw_worker *w, cbw__route *r)
{
    cbw__job *job;
    while ((job = r->retry_head) != NULL) {
        cbw__tokens_done(w, job->run.callback, 1);
        cbw__job_complete(w, job, CBW_STATUS_SHUTDOWN,
                          "the worker was closed before the job was retried");
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
