/*
 * cbw_close.c - shutting a worker down and letting it go.
 *
 * DESIGN
 * close() runs once; a second or concurrent call waits for the first to
 * finish (unless it comes from one of the worker's own threads, which must
 * not wait for itself) and returns CBW_OK.  A concurrent call with
 * CBW_CLOSE_INTERRUPT that finds the first one running without it (a drain,
 * or a plain close waiting for a long callback) escalates it first: it does
 * steps 3 and 4 itself, so the first close's drain ends and its joins are
 * bounded by grace_ms, and an exit-time close never waits on a weaker one.
 * The steps, each under w->mu except the joins:
 *  1. closing: cbw_start fails from now on.
 *  2. with CBW_CLOSE_DRAIN, wait until every route is empty but for
 *     suspended jobs (they wait for an outside signal; retries waiting out
 *     their backoff are waited for).
 *  3. every queued job completes with SHUTDOWN; stopping: every verb fails,
 *     blocked waiters wake with CBW_ESHUTDOWN, idle threads leave.
 *  4. with CBW_CLOSE_INTERRUPT, every running job's deadline becomes now, so
 *     the timer interrupts it and abandons its thread after grace_ms.
 *  5. join every route thread but the caller's own (which detaches), then
 *     the timer.  Threads abandoned by the timer are not joined: they hold a
 *     worker reference and leave by themselves.
 */
#include "cbw_internal.h"

static int routes_busy(cbw_worker *w)
{
    int32_t i;
    for (i = 0; i < w->nroutes; i++)
        if (!cbw__route_settled(w->routes[i]))
            return 1;
    return 0;
}

static void shut_down_queues(cbw_worker *w)
{
    int32_t i;
    cbw__job *job;
    for (i = 0; i < w->nroutes; i++) {
        cbw__route *r = w->routes[i];
        while ((job = r->head) != NULL) {
            r->head = job->next;
            job->next = NULL;
            job->in_queue = 0;
            if (job->phase == CBW_PHASE_QUEUED) {
                cbw__tokens_done(w, job->run.callback, 1);
                cbw__job_complete(w, job, CBW_STATUS_SHUTDOWN,
                                  "the worker was closed before the job started");
            }
            cbw__job_unref(job);
        }
        r->tail = NULL;
        r->queued = 0;
        cbw__retry_shut_down(w, r);
    }
}

/* Drain must not wait for coalescing threads to time out. */
static void wake_coalescing(cbw_worker *w)
{
    int32_t i;
    for (i = 0; i < w->nroutes; i++)
        cbw__cond_broadcast(&w->routes[i]->coalc);
}

static void wake_everyone(cbw_worker *w)
{
    int32_t i;
    for (i = 0; i < w->nroutes; i++) {
        cbw__cond_broadcast(&w->routes[i]->cond);
        cbw__cond_broadcast(&w->routes[i]->coalc);
    }
    for (i = 0; i < CBW__WAIT_STRIPES; i++)
        cbw__cond_broadcast(&w->waitc[i]);
    cbw__cond_broadcast(&w->statec);
    cbw__cond_signal(&w->timerc);
}

static void interrupt_running(cbw_worker *w)
{
    int32_t i;
    cbw__thread_rec *t;
    int64_t now = cbw__now_ns();
    for (i = 0; i < w->nroutes; i++)
        for (t = w->routes[i]->threads; t != NULL; t = t->next)
            if (t->job != NULL && t->job->phase == CBW_PHASE_RUNNING &&
                t->deadline_ns > now)
                t->deadline_ns = now;
    if (cbw__timer_start(w) == CBW_OK)
        cbw__cond_signal(&w->timerc);
}

/* Steps 3 and 4 with CBW_CLOSE_INTERRUPT, for the close itself or for one
 * that escalates a weaker close already running. */
static void stop_now(cbw_worker *w, int32_t grace_ms)
{
    shut_down_queues(w);
    w->stopping = 1;
    w->interrupting = 1;
    w->grace_ms = grace_ms;
    interrupt_running(w);
    wake_everyone(w);
}

/* A live route thread other than the caller, or NULL. */
static cbw__thread_rec *next_to_join(cbw_worker *w)
{
    int32_t i;
    cbw__thread_rec *t;
    for (i = 0; i < w->nroutes; i++)
        for (t = w->routes[i]->threads; t != NULL; t = t->next)
            if (t != cbw__self)
                return t;
    return NULL;
}

static void join_threads(cbw_worker *w)
{
    cbw__thread_rec *t;
    while ((t = next_to_join(w)) != NULL) {
        while (!t->exited && !t->orphaned)
            cbw__cond_wait(&w->statec, &w->mu);
        if (t->orphaned)
            continue; /* the timer unlinked it; it leaves by itself */
        cbw__route_unlink_thread(t->route, t);
        cbw__mutex_unlock(&w->mu);
        cbw__thread_join(t->handle);
        cbw__mutex_lock(&w->mu);
    }
}

int cbw_worker_close(cbw_worker *w, int flags, int32_t grace_ms)
{
    cbw__thread_rec *self = cbw__self;
    /* The worker's own threads (and its timer, where hooks run) must not
     * wait for a close running elsewhere: that close waits for them. */
    int own = (self != NULL && self->w == w) || cbw__timer_self == w, pending, release;

    if (grace_ms < 0)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if (w->closing) {
        if ((flags & CBW_CLOSE_INTERRUPT) && !w->interrupting && !w->closed)
            stop_now(w, grace_ms);
        while (!w->closed && !own)
            cbw__cond_wait(&w->statec, &w->mu);
        cbw__mutex_unlock(&w->mu);
        return CBW_OK;
    }
    if (own && (flags & CBW_CLOSE_DRAIN)) {
        cbw__mutex_unlock(&w->mu);
        return CBW_EDEADLOCK; /* the caller's own job keeps its route busy */
    }
    w->closing = 1;
    if (flags & CBW_CLOSE_DRAIN) {
        w->draining = 1;
        wake_coalescing(w);
        while (routes_busy(w))
            cbw__cond_wait(&w->statec, &w->mu);
        w->draining = 0;
    }
    if (flags & CBW_CLOSE_INTERRUPT) {
        stop_now(w, grace_ms);
    } else {
        shut_down_queues(w);
        w->stopping = 1;
    }
    if (own && self != NULL && !self->detached) {
        self->detached = 1; /* leaves after its callback returns */
        w->refs++;
    }
    wake_everyone(w);
    join_threads(w);
    if (w->timer_started) {
        w->timer_stop = 1;
        cbw__cond_signal(&w->timerc);
        if (cbw__timer_self == w) {
            /* A hook running on the timer closed the worker: the timer
             * cannot join itself, so it leaves by itself, holding the
             * worker until it does. */
            w->timer_detached = 1;
            w->refs++;
            cbw__thread_detach(w->timer);
        } else {
            cbw__mutex_unlock(&w->mu);
            cbw__thread_join(w->timer);
            cbw__mutex_lock(&w->mu);
        }
        w->timer_started = 0;
    }
    w->closed = 1;
    cbw__cond_broadcast(&w->statec);
    pending = cbw__pending(w);
    release = w->release_pending;
    w->release_pending = 0;
    cbw__mutex_unlock(&w->mu);
    cbw__after_unlock(w, pending);
    if (release) {
        cbw__mutex_lock(&w->mu);
        cbw__worker_unref(w); /* the owner's, handed over by release */
    }
    return CBW_OK;
}

void cbw_worker_release(cbw_worker *w)
{
    if (w == NULL)
        return;
    /* close() returns once the worker is closed, except on one of its own
     * threads while another thread is still closing it: then the closer
     * drops the owner's reference when it is done. */
    (void)cbw_worker_close(w, 0, 0);
    cbw__mutex_lock(&w->mu);
    if (!w->closed) {
        w->release_pending = 1;
        cbw__mutex_unlock(&w->mu);
        return;
    }
    cbw__worker_unref(w);
}
