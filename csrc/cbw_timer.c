/*
 * cbw_timer.c - the timer thread, which enforces run-time limits.
 *
 * DESIGN
 * One timer thread per worker, started with the first job that has a
 * deadline.  It sleeps on w->timerc until the earliest deadline of a running
 * job (a start with a later deadline does not wake it: cbw__timer_arm
 * signals only when the new deadline comes first), completes an overdue job
 * with TIMEOUT, so its waiters wake at once, and asks the executor to
 * interrupt the callback, after dropping w->mu (hooks are never called with
 * it held).  If the thread is still inside the callback a grace period
 * later, the thread is abandoned: it is marked orphaned and detached, a
 * replacement is started for its route, and when the callback finally
 * returns the thread discards the result and leaves (cbw_thread.c).
 * Everything here runs under w->mu unless said otherwise.
 */
#include "cbw_internal.h"

CBW__TLS cbw_worker *cbw__timer_self;

#define CBW__FIRE_MAX 16

/* The timer abandons a thread stuck in a callback past deadline + grace. */
static void orphan(cbw_worker *w, cbw__route *r, cbw__thread_rec *t)
{
    t->orphaned = 1;
    r->running--;
    cbw__route_unlink_thread(r, t);
    if (!t->detached) {
        t->detached = 1;
        w->refs++; /* dropped by the thread when it finally leaves */
    }
    if (!w->stopping)
        (void)cbw__route_ensure_threads(w, r); /* best effort */
    cbw__route_wake(r);
    cbw__cond_broadcast(&w->statec);
}

static int64_t add_saturating(int64_t a, int64_t b)
{
    return a > CBW__NEVER - b ? CBW__NEVER : a + b;
}

typedef struct { cbw__thread_rec *t; int64_t job_id; } cbw__fire;

/* One pass over the running jobs: times out the overdue ones (recording whom
 * to interrupt in fire[]), abandons stuck threads, and returns when the timer
 * must look again. */
static int64_t timer_scan(cbw_worker *w, cbw__fire *fire, int *nfire)
{
    int64_t now = cbw__now_ns(), next = CBW__NEVER, grace, until;
    cbw__thread_rec *t, *tn;
    cbw__job *job;
    int32_t i;

    grace = (int64_t)w->grace_ms * 1000000;
    for (i = 0; i < w->nroutes; i++) {
        cbw__route *r = w->routes[i];
        for (t = r->threads; t != NULL; t = tn) {
            tn = t->next;
            job = t->job;
            if (job == NULL || t->deadline_ns == CBW__NEVER)
                continue;
            if (job->phase != CBW_PHASE_COMPLETED) {
                if (now < t->deadline_ns) {
                    if (t->deadline_ns < next)
                        next = t->deadline_ns;
                    continue;
                }
                if (*nfire == CBW__FIRE_MAX) {
                    next = now; /* look again after these are delivered */
                    continue;
                }
                cbw__job_complete(w, job,
                                  w->stopping ? CBW_STATUS_SHUTDOWN
                                              : CBW_STATUS_TIMEOUT,
                                  w->stopping
                                      ? "the worker was closed while the callback ran"
                                      : "the callback ran past its timeout");
                fire[*nfire].t = t;
                fire[*nfire].job_id = job->run.id;
                (*nfire)++;
            }
            until = add_saturating(t->deadline_ns, grace);
            if (now >= until)
                orphan(w, r, t);
            else if (until < next)
                next = until;
        }
    }
    return next;
}

static void timer_main(void *arg)
{
    cbw_worker *w = arg;
    const cbw_hooks *h = &w->hooks;
    cbw__fire fire[CBW__FIRE_MAX];
    int nfire, i, pending;
    int64_t next;

    cbw__timer_self = w;
    cbw__mutex_lock(&w->mu);
    while (!w->timer_stop) {
        nfire = 0;
        next = timer_scan(w, fire, &nfire);
        if (nfire > 0) {
            w->timer_wake_ns = INT64_MIN; /* awake: nobody need signal */
            pending = cbw__pending(w);
            cbw__mutex_unlock(&w->mu);
            cbw__after_unlock(w, pending);
            for (i = 0; i < nfire; i++)
                if (h->interrupt)
                    h->interrupt(h->ctx, &fire[i].t->slot, fire[i].job_id);
            cbw__mutex_lock(&w->mu);
            continue;
        }
        w->timer_wake_ns = next;
        cbw__cond_wait_until(&w->timerc, &w->mu, next);
    }
    cbw__timer_self = NULL;
    if (w->timer_detached)
        cbw__worker_unref(w); /* a hook closed the worker on this thread */
    else
        cbw__mutex_unlock(&w->mu);
}

int cbw__timer_start(cbw_worker *w)
{
    if (w->timer_started)
        return CBW_OK;
    w->timer_wake_ns = CBW__NEVER;
    if (cbw__thread_start(&w->timer, timer_main, w) != 0)
        return CBW_ETHREAD;
    w->timer_started = 1;
    return CBW_OK;
}

void cbw__timer_arm(cbw_worker *w, int64_t deadline_ns)
{
    if (w->timer_started && deadline_ns < w->timer_wake_ns)
        cbw__cond_signal(&w->timerc);
}
