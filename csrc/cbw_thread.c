/*
 * cbw_thread.c - the threads that run jobs.
 *
 * DESIGN
 * Each route has `concurrency` threads, started when its first job arrives.
 * An idle thread sleeps on its route's condition variable.  A start signals
 * that variable only when some thread is idle and not already being woken
 * (r->idle > r->wakeups), so a burst of starts against a busy route costs no
 * system call at all.
 *
 * A woken thread runs a burst: it asks its executor for a session
 * (session_begin, where a binding takes its interpreter lock once), then pops
 * and runs ready jobs one after the other, up to CBW__BATCH_MAX, and ends the
 * session.  The worker mutex is dropped around every run() call, so starts,
 * waits and cancels proceed while callbacks run; a job popped from the queue
 * is RUNNING before the mutex is dropped, so cancel never races with it.
 *
 * Cancelled jobs are left in the FIFO (cancel is O(1)); the queue holds a
 * reference and the popping thread drops them.
 *
 * When an executor session is costly (it takes an interpreter lock the
 * producer also needs), the batching rule is: an idle route's first job
 * starts at once, later ones are batched.
 *
 * Prompt start: a thread that slept (its idle spell outlasted the spin
 * below) and wakes to a route with no running job takes the executor's lock
 * for that job straight away, and raises r->handoff meanwhile; so does a
 * new thread (spawn raises the flag for it, as it enters the executor and
 * begins its first session).  A start on that route that sees the flag
 * waits (on r->handc, for at most CBW__HANDOFF_MAX_NS) until the thread's
 * session has begun.  Every start runs without the executor's lock (the
 * bridge releases the interpreter lock around each core call), so the
 * thread takes the lock while the producer waits, instead of queueing for
 * it behind a producer that holds it between starts (for a whole switch
 * interval of the interpreter).  This happens once per idle spell, and only
 * to a producer that is still starting jobs.  A job may therefore run
 * before its start has returned: whatever a job's callback looks up must be
 * in place before the start, never recorded after it.
 *
 * Coalescing: any other thread woken with more than one ready job (the
 * route is busy: one of its threads runs a job, or this thread found the job
 * while spinning) does not start a burst at once while jobs are still
 * arriving.  It waits until some thread blocks waiting for a job of its
 * route (the lock is then free), or the producer has been quiet for
 * CBW__QUIET_NS, or CBW__COALESCE_MAX_NS have passed.  Competing for the
 * lock with a thread that is busy starting jobs would cost that thread a
 * wake-up system call on every start; waiting turns many small bursts into
 * a few large ones.  A waiter never waits for this: blocking in a wait ends
 * the coalescing at once.
 *
 * Spinning, for round trips (start a job, wait for it, repeat): a thread
 * that runs out of work spins for up to CBW__SPIN_NS before it sleeps, and
 * so does a waiter before it blocks, so a job started or completed within
 * that time costs neither side a wake-up.  A thread woken for a single job
 * on a route whose last job was waited for also spins briefly for that
 * job's waiter before taking the executor's lock (the producer holds it
 * until it blocks in its wait).  A burst whose last job has a waiter ends
 * its session before completing that job, and leaves dead callback tokens
 * for later (the thread's next session, or before it sleeps), so the
 * waiter finds the executor's lock free.
 *
 * Run-time limits are the timer's (cbw_timer.c).
 */
#include <stdlib.h>

#include "cbw_internal.h"

CBW__TLS cbw__thread_rec *cbw__self;

void cbw__route_wake(cbw__route *r)
{
    if (r->idle > r->wakeups) {
        r->wakeups++;
        cbw__cond_signal(&r->cond);
    }
}

/* A start on route r, which just queued its job(s): if a thread woken on
 * the idle route is taking the executor's lock for its first job, lets it
 * (see DESIGN).  The caller holds w->mu and not the executor's lock. */
void cbw__route_await_handoff(cbw_worker *w, cbw__route *r)
{
    int64_t until;
    if (!r->handoff)
        return;
    until = cbw__now_ns() + CBW__HANDOFF_MAX_NS;
    while (r->handoff && !w->stopping)
        if (cbw__cond_wait_until(&r->handc, &w->mu, until))
            break;
}

void cbw__route_unlink_thread(cbw__route *r, cbw__thread_rec *t)
{
    cbw__thread_rec **p = &r->threads;
    while (*p != t) {
        if (*p == NULL)
            abort();
        p = &(*p)->next;
    }
    *p = t->next;
    t->next = NULL;
    r->nthreads--;
}

static cbw__job *pop_ready(cbw_worker *w, cbw__route *r)
{
    cbw__job *job;
    (void)w;
    while ((job = r->head) != NULL) {
        r->head = job->next;
        if (r->head == NULL)
            r->tail = NULL;
        job->next = NULL;
        job->in_queue = 0;
        if (job->phase == CBW_PHASE_QUEUED)
            return job; /* the queue's reference passes to the thread */
        cbw__job_unref(job); /* cancelled while queued */
    }
    return NULL;
}

static void begin_run(cbw_worker *w, cbw__route *r, cbw__thread_rec *t,
                      cbw__job *job)
{
    r->queued--;
    r->running++;
    job->phase = CBW_PHASE_RUNNING;
    if (job->flags & CBW__JOB_REPLAY)
        job->flags &= (uint8_t)~CBW__JOB_REPLAY;
    else
        job->run.attempt++;
    cbw__route_started(w, r);
    t->job = job;
    job->run.deadline_ns = cbw__deadline_after_ms(job->run.timeout_ms);
    t->deadline_ns = job->run.deadline_ns;
    if (t->deadline_ns != CBW__NEVER)
        cbw__timer_arm(w, t->deadline_ns);
}

/* Completes the run's job with status and the executor's error text
 * (cbw_run_set_error), else `why`. */
static void complete_run(cbw_worker *w, cbw__thread_rec *t, cbw__job *job, int status,
                         const char *why)
{
    if (t->pending_error != NULL) {
        cbw__free(job->error);
        job->error = t->pending_error;
        t->pending_error = NULL;
    }
    cbw__job_complete(w, job, status, why);
}

static void end_run(cbw_worker *w, cbw__route *r, cbw__thread_rec *t,
                    cbw__job *job, int status)
{
    int retried = 0;
    t->job = NULL;
    if (!t->orphaned)
        r->running--;
    r->waited_for = job->waiters > 0;
    if (job->phase != CBW_PHASE_COMPLETED) {
        if (t->deadline_ns != CBW__NEVER && cbw__now_ns() >= t->deadline_ns) {
            cbw__job_complete(w, job, CBW_STATUS_TIMEOUT,
                              "the callback ran past its timeout");
        } else if (t->suspend_request != NULL) {
            if (cbw__suspend_park(w, r, t, job))
                retried = 1;
            else if (job->flags & CBW__JOB_KEPT) /* its request must stay */
                complete_run(w, t, job, CBW_STATUS_ERROR,
                             "BufferError: the callback kept a view of its request, "
                             "so the job could not suspend");
            else
                cbw__job_complete(w, job, CBW_STATUS_SHUTDOWN,
                                  "the worker was closed while the job suspended");
        } else if (status != CBW_STATUS_OK && cbw__retry_schedule(w, r, t, job)) {
            retried = 1; /* the job and its callback token wait in the list */
        } else {
            complete_run(w, t, job,
                         status == CBW_STATUS_OK ? CBW_STATUS_OK : CBW_STATUS_ERROR, NULL);
        }
    }
    cbw__free(t->pending_error);
    t->pending_error = NULL;
    cbw__free(t->pristine);
    t->pristine = NULL;
    cbw__free(t->suspend_request);
    t->suspend_request = NULL;
    job->flags &= (uint8_t)~CBW__JOB_WOKEN;
    if (!retried) {
        cbw__tokens_done(w, job->run.callback, 1);
        cbw__job_unref(job);
    }
    if (cbw__route_drain_check(w, r))
        cbw__cond_broadcast(&w->statec);
}

/* Runs ready jobs under one executor session; `prompt`: this thread raised
 * r->handoff, and lowers it once the session has begun.  Called and returns
 * with w->mu held. */
static void run_burst(cbw_worker *w, cbw__route *r, cbw__thread_rec *t, int prompt)
{
    const cbw_hooks *h = &w->hooks;
    int n, status, pending, in_session = 1;
    int64_t wake;
    cbw__job *job;

    cbw__mutex_unlock(&w->mu);
    if (h->session_begin)
        h->session_begin(h->ctx, &t->slot);
    cbw__mutex_lock(&w->mu);
    if (prompt) {
        r->handoff = 0;
        cbw__cond_broadcast(&r->handc);
    }
    for (n = 0; n < CBW__BATCH_MAX && !t->orphaned && in_session; n++) {
        if (!cbw__route_ready(w, r, &wake))
            break;
        job = pop_ready(w, r);
        if (job == NULL)
            break;
        begin_run(w, r, t, job);
        cbw__mutex_unlock(&w->mu);
        if (r->max_retries > 0 && job->run.attempt <= (uint32_t)r->max_retries)
            cbw__retry_snapshot(t, job); /* the request is this thread's now */
        status = h->run(h->ctx, &t->slot, &job->run);
        cbw__mutex_lock(&w->mu);
        if (r->head == NULL && job->waiters > 0) {
            /* The last ready job, and someone waits for it: end the session
             * first, so the waiter finds the executor's lock free. */
            cbw__mutex_unlock(&w->mu);
            if (h->session_end)
                h->session_end(h->ctx, &t->slot);
            in_session = 0;
            cbw__mutex_lock(&w->mu);
        }
        end_run(w, r, t, job, status);
        pending = cbw__pending(w);
        if (!in_session)
            pending &= ~CBW__PENDING_TOKENS; /* later, not while the waiter
                                                wants the executor's lock */
        if (pending) {
            cbw__mutex_unlock(&w->mu);
            cbw__after_unlock(w, pending); /* inside the session: cheap */
            cbw__mutex_lock(&w->mu);
        }
    }
    if (in_session) {
        cbw__mutex_unlock(&w->mu);
        if (h->session_end)
            h->session_end(h->ctx, &t->slot);
        cbw__mutex_lock(&w->mu);
    }
}

/* Holds back a burst while a producer is still starting jobs (see DESIGN).
 * Called and returns with w->mu held. */
static void coalesce(cbw_worker *w, cbw__route *r, cbw__thread_rec *t)
{
    int64_t now = cbw__now_ns(), give_up = now + CBW__COALESCE_MAX_NS, seen;
    r->delaying++;
    while (r->head != NULL && r->waiting == 0 && !w->draining && !w->stopping &&
           !t->orphaned &&
           now < give_up) {
        seen = r->enqueued;
        cbw__cond_wait_until(&r->coalc, &w->mu,
                             now + CBW__QUIET_NS < give_up ? now + CBW__QUIET_NS : give_up);
        now = cbw__now_ns();
        if (r->enqueued == seen)
            break; /* quiet */
    }
    r->delaying--;
}

/* Spins (without the lock) for up to CBW__SPIN_NS while no job arrives,
 * before the thread sleeps: a producer that starts its next job within
 * that time finds the thread awake, and neither side makes a system call.
 * One thread per route spins at a time.  Called and returns with w->mu
 * held; true if a job was queued meanwhile. */
static int spin_for_work(cbw_worker *w, cbw__route *r)
{
    int64_t seen = r->enqueued, until = cbw__now_ns() + CBW__SPIN_NS;
    int arrived = 0;
    r->spinning = 1;
    cbw__mutex_unlock(&w->mu);
    for (;;) {
        int i;
        for (i = 0; i < 64 && !arrived; i++) {
            cbw__cpu_relax();
            arrived = cbw__atomic_load(&r->enqueued) != seen;
        }
        if (arrived || cbw__now_ns() >= until)
            break;
    }
    cbw__mutex_lock(&w->mu);
    r->spinning = 0;
    return arrived;
}

/* A thread woken for a single job, on a route whose last job was waited
 * for, looks briefly for that job's waiter before it takes the interpreter
 * lock.  The producer holds that lock from its start() until its wait()
 * releases it; asking for it meanwhile would put this thread to sleep on
 * the lock and cost a wake-up, while a thread that asks once the waiter
 * blocks finds it free.  Called and returns with w->mu held. */
static void spin_for_waiter(cbw_worker *w, cbw__route *r)
{
    int64_t until = cbw__now_ns() + CBW__WAITER_SPIN_NS;
    int found = 0;
    cbw__mutex_unlock(&w->mu);
    while (!found) {
        int i;
        for (i = 0; i < 64 && !found; i++) {
            cbw__cpu_relax();
            found = cbw__atomic_load(&r->waiting) > 0;
        }
        if (cbw__now_ns() >= until)
            break;
    }
    cbw__mutex_lock(&w->mu);
}

/* Raises r->handoff for this thread when its route has no running job and
 * no other thread holds the flag (see DESIGN); true if it did. */
static int raise_handoff(cbw_worker *w, cbw__route *r)
{
    if (w->hooks.session_begin == NULL || r->handoff || r->running > 0)
        return 0;
    r->handoff = 1;
    return 1;
}

static void lower_handoff(cbw__route *r)
{
    r->handoff = 0;
    cbw__cond_broadcast(&r->handc);
}

static void thread_main(void *arg)
{
    cbw__thread_rec *t = arg;
    cbw_worker *w = t->w;
    cbw__route *r = t->route;
    const cbw_hooks *h = &w->hooks;
    int detached, leftover, prompt, slept = 0;
    int64_t wake;

    cbw__self = t;
    cbw__mutex_lock(&w->mu);
    prompt = t->handoff; /* raised by spawn: entering takes the executor's lock too */
    cbw__mutex_unlock(&w->mu);
    if (h->thread_enter)
        h->thread_enter(h->ctx, &t->slot);
    cbw__mutex_lock(&w->mu);
    for (;;) {
        int spun = 0, swept = 0; /* once per idle spell each, then sleep */
        while (!t->orphaned && !w->stopping && !cbw__route_ready(w, r, &wake)) {
            if (prompt) {
                lower_handoff(r); /* nothing to run yet */
                prompt = 0;
            }
            if (!spun && wake == CBW__NEVER && !r->spinning && !w->closing) {
                spun = 1;
                (void)spin_for_work(w, r);
                continue; /* the lock was dropped: look again */
            }
            if (!swept && w->tokens.dead > 0 && h->release != NULL) {
                /* Dead callback tokens left by a burst that ended early. */
                swept = 1;
                cbw__mutex_unlock(&w->mu);
                cbw__after_unlock(w, CBW__PENDING_TOKENS);
                cbw__mutex_lock(&w->mu);
                continue;
            }
            r->idle++;
            cbw__cond_wait_until(&r->cond, &w->mu, wake);
            r->idle--;
            slept = 1;
            if (r->wakeups > 0)
                r->wakeups--;
        }
        if (t->orphaned || r->head == NULL)
            break;
        /* The batching rule (see DESIGN): the first job after an idle spell
         * starts at once; later ones are coalesced. */
        if (slept && !prompt)
            prompt = raise_handoff(w, r);
        slept = 0;
        if (h->session_begin != NULL && !prompt && r->queued > 1 && r->delay_ms == 0)
            coalesce(w, r, t); /* one ready job says nothing of a producer */
        else if (h->session_begin != NULL && r->queued == 1 && r->waited_for &&
                 r->waiting == 0)
            spin_for_waiter(w, r);
        run_burst(w, r, t, prompt);
        prompt = 0;
    }
    if (prompt)
        lower_handoff(r);
    t->exited = 1;
    detached = t->detached;
    if (detached && !t->orphaned)
        cbw__route_unlink_thread(r, t); /* otherwise close() unlinks and joins */
    if (detached)
        cbw__thread_detach(t->handle);
    cbw__cond_broadcast(&w->statec);
    leftover = w->tokens.dead > 0; /* left by a last burst that ended early */
    cbw__mutex_unlock(&w->mu);
    if (leftover)
        cbw__after_unlock(w, CBW__PENDING_TOKENS);
    if (h->thread_exit)
        h->thread_exit(h->ctx, &t->slot);
    cbw__self = NULL;
    if (detached) {
        cbw__mutex_lock(&w->mu);
        cbw__worker_unref(w); /* may free w and t */
    }
}

static int spawn(cbw_worker *w, cbw__route *r)
{
    cbw__thread_rec *t = cbw__calloc(1, sizeof(*t));
    if (t == NULL)
        return CBW_ENOMEM;
    t->w = w;
    t->route = r;
    t->handoff = (uint8_t)raise_handoff(w, r); /* before the thread reads it */
    if (cbw__thread_start(&t->handle, thread_main, t) != 0) {
        if (t->handoff)
            lower_handoff(r);
        cbw__free(t);
        return CBW_ETHREAD;
    }
    t->next = r->threads;
    r->threads = t;
    r->nthreads++;
    t->all_next = w->all_threads;
    w->all_threads = t;
    return CBW_OK;
}

int cbw__route_ensure_threads(cbw_worker *w, cbw__route *r)
{
    int rc = CBW_OK;
    while (r->nthreads < r->concurrency && !w->stopping) {
        rc = spawn(w, r);
        if (rc != CBW_OK)
            break;
    }
    return r->nthreads > 0 ? CBW_OK : rc;
}
