/*
 * cbw_wait.c - cancelling, waiting for, taking and inspecting jobs.
 *
 * DESIGN: waiting happens on one of CBW__WAIT_STRIPES condition variables,
 * chosen by job id; a completion broadcasts only when the job has waiters.
 * A waiter holds a reference on the job while it sleeps, so a concurrent
 * take cannot free the job under it, and looks the job up again by id once
 * awake (ids are never reused, so a taken job simply is not found).  A
 * waiter blocked on a job of its own route, from one of the worker's own
 * threads, is refused with CBW_EDEADLOCK when nothing could ever run that
 * job.  wait_many waits for the last job of its batch first, so that a
 * batch costs its caller one wake-up.  Everything runs under w->mu.
 */
#include <string.h>

#include "cbw_internal.h"

/* The job with this id, with w->mu held; on NULL, *rc says why.  Once
 * close() is stopping the worker every verb fails with CBW_ECLOSED. */
static cbw__job *lookup(cbw_worker *w, int64_t id, int *rc)
{
    cbw__job *job = NULL;
    if (w->stopping)
        *rc = CBW_ECLOSED;
    else if ((job = cbw__table_get(&w->table, id)) == NULL)
        *rc = CBW_EUNKNOWN;
    return job;
}

int cbw_cancel(cbw_worker *w, int64_t id, uint64_t *callback)
{
    cbw__job *job;
    cbw__route *r;
    int rc = 0, pending;
    cbw__mutex_lock(&w->mu);
    job = lookup(w, id, &rc);
    if (job != NULL && job->phase == CBW_PHASE_RUNNING)
        job->cancel_requested = 1;
    if (job != NULL && job->phase == CBW_PHASE_QUEUED) {
        r = cbw__route_get(w, job->run.route);
        if (!(job->flags & CBW__JOB_RETRYING))
            r->queued--; /* it stays in the FIFO; the popping thread drops it */
        if (callback != NULL)
            *callback = job->run.callback;
        cbw__tokens_done(w, job->run.callback, 1);
        job->refs++; /* job_complete may drop the table's reference */
        cbw__job_complete(w, job, CBW_STATUS_CANCELLED,
                          job->flags & CBW__JOB_RETRYING
                              ? "the job was cancelled while waiting to be retried"
                              : "the job was cancelled before it started");
        if (job->flags & CBW__JOB_RETRYING)
            cbw__retry_unlink(r, job);
        cbw__job_unref(job);
        if (cbw__route_drain_check(w, r))
            cbw__cond_broadcast(&w->statec);
        rc = 1;
    }
    pending = cbw__pending(w);
    cbw__mutex_unlock(&w->mu);
    cbw__after_unlock(w, pending);
    return rc;
}

/* True when waiting for job from this thread could never end: the job is the
 * caller's own, or it is queued on the caller's route and every other thread
 * of that route is itself blocked, without a time limit, on a job queued on
 * that same route (a cycle: only the route's own threads could run those
 * jobs).  A thread waiting on another route's job is not counted as stuck. */
static int would_deadlock(cbw_worker *w, cbw__job *job, int32_t timeout_ms)
{
    cbw__thread_rec *self = cbw__self, *t;
    if (self == NULL || self->w != w)
        return 0;
    if (self->job == job)
        return 1;
    if (timeout_ms >= 0 || job->phase != CBW_PHASE_QUEUED ||
        job->run.route != self->route->id)
        return 0;
    for (t = self->route->threads; t != NULL; t = t->next)
        if (t != self && !(t->blocked && t->blocked_on_route == self->route->id))
            return 0;
    return 1;
}

/* Spins (without the lock) for up to CBW__SPIN_NS, or until the deadline,
 * while no job completes: a job that is about to complete then wakes its
 * waiter without a system call on either side.  Called and returns with
 * w->mu held. */
static void spin_for_completion(cbw_worker *w, int64_t deadline)
{
    int64_t seen = w->completions, now = cbw__now_ns(), until = now + CBW__SPIN_NS;
    int done = 0;
    if (deadline < until)
        until = deadline;
    cbw__mutex_unlock(&w->mu);
    while (!done && now < until) {
        int i;
        for (i = 0; i < 64 && !done; i++) {
            cbw__cpu_relax();
            done = cbw__atomic_load(&w->completions) != seen;
        }
        now = cbw__now_ns();
    }
    cbw__mutex_lock(&w->mu);
}

/* Blocks until the job completes, the timeout passes or close() stops the
 * worker, holding a reference meanwhile so a concurrent take cannot free the
 * job under the waiter.  Called and returns with w->mu held; afterwards the
 * caller must look the job up again by id (another thread may have taken
 * it, and ids are never reused). */
static int wait_watching(cbw_worker *w, cbw__job *job, int32_t timeout_ms,
                         const int64_t *unsuccessful);

static int wait_locked(cbw_worker *w, cbw__job *job, int32_t timeout_ms)
{
    return wait_watching(w, job, timeout_ms, NULL);
}

/* wait_locked that, given unsuccessful (the value of w->unsuccessful the
 * caller last saw, the caller counted in w->batch_waiters), also returns
 * CBW_ETIMEDOUT as soon as some job of the worker completes without
 * success. */
static int wait_watching(cbw_worker *w, cbw__job *job, int32_t timeout_ms,
                         const int64_t *unsuccessful)
{
    cbw__cond *c = &w->waitc[(uint64_t)job->run.id % CBW__WAIT_STRIPES];
    cbw__thread_rec *self = cbw__self;
    cbw__route *r;
    int64_t deadline;
    int own = self != NULL && self->w == w, done;

    if (job->phase == CBW_PHASE_COMPLETED)
        return CBW_OK;
    if (timeout_ms == 0)
        return CBW_ETIMEDOUT;
    if (would_deadlock(w, job, timeout_ms))
        return CBW_EDEADLOCK;
    deadline = cbw__deadline_after_ms(timeout_ms);
    r = cbw__route_get(w, job->run.route);
    cbw__atomic_add(&r->waiting, 1);
    if (r->delaying > 0)
        cbw__cond_broadcast(&r->coalc); /* stop coalescing: someone waits */
    job->waiters++;
    job->refs++;
    if (own && timeout_ms < 0) {
        self->blocked = 1;
        self->blocked_on_route = job->phase == CBW_PHASE_QUEUED ? job->run.route : 0;
    }
    if (job->phase != CBW_PHASE_COMPLETED && !w->stopping)
        spin_for_completion(w, deadline);
    while (job->phase != CBW_PHASE_COMPLETED && !w->stopping &&
           (unsuccessful == NULL || *unsuccessful == w->unsuccessful))
        if (cbw__cond_wait_until(c, &w->mu, deadline))
            break;
    if (own)
        self->blocked = 0;
    job->waiters--;
    cbw__atomic_add(&r->waiting, -1);
    done = job->phase == CBW_PHASE_COMPLETED;
    cbw__job_unref(job);
    if (done)
        return CBW_OK;
    return w->stopping ? CBW_ESHUTDOWN : CBW_ETIMEDOUT;
}

static void detach(cbw_worker *w, cbw__job *job, cbw_result *out)
{
    int ok = job->status == CBW_STATUS_OK;
    cbw__table_remove(&w->table, job->run.id);
    out->id = job->run.id;
    out->status = job->status;
    out->route = job->run.route;
    out->data = ok ? job->run.data : NULL;
    out->size = ok ? job->run.size : 0;
    out->error = job->error != NULL ? job->error : "";
    out->callback = job->run.callback;
    out->job_ = job; /* the table's reference passes to the result */
    out->worker_ = w;
    w->refs++; /* w->mu must outlive the result (cbw_result_release) */
}

int cbw_wait(cbw_worker *w, int64_t id, int32_t timeout_ms, cbw_result *out)
{
    cbw__job *job;
    int rc;
    memset(out, 0, sizeof(*out));
    if (timeout_ms < CBW_TIMEOUT_INFINITE)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &rc)) != NULL) {
        rc = wait_locked(w, job, timeout_ms);
        if (rc == CBW_OK) {
            job = cbw__table_get(&w->table, id);
            if (job == NULL)
                rc = CBW_EUNKNOWN; /* another thread took it meanwhile */
            else
                detach(w, job, out);
        }
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int64_t cbw_wait_copy(cbw_worker *w, int64_t id, int32_t timeout_ms,
                      char *buf, size_t cap, cbw_result *slow)
{
    cbw__job *job;
    int64_t rc;
    int code = CBW_OK;
    if (timeout_ms < CBW_TIMEOUT_INFINITE || (buf == NULL && cap > 0) || slow == NULL)
        return CBW_EINVAL;
    memset(slow, 0, sizeof(*slow));
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &code)) == NULL) {
        rc = code;
    } else {
        rc = wait_locked(w, job, timeout_ms);
        if (rc == CBW_OK && (job = cbw__table_get(&w->table, id)) == NULL) {
            rc = CBW_EUNKNOWN; /* another thread took it meanwhile */
        } else if (rc == CBW_OK) {
            if (job->status != CBW_STATUS_OK || job->run.size > cap) {
                detach(w, job, slow);
                rc = CBW_EMORE;
            } else {
                rc = (int64_t)job->run.size;
                if (job->run.size)
                    memcpy(buf, job->run.data, job->run.size);
                cbw__table_remove(&w->table, id);
                cbw__job_unref(job);
            }
        }
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

/* What is left of timeout_ms (-1: none) at deadline, rounded up. */
static int32_t ms_left(int32_t timeout_ms, int64_t deadline)
{
    int64_t left;
    if (timeout_ms < 0)
        return CBW_TIMEOUT_INFINITE;
    left = deadline - cbw__now_ns();
    return left <= 0 ? 0 : (int32_t)((left + 999999) / 1000000);
}

/* How often wait_for_last looks again at its whole batch for a job that
 * another thread took meanwhile (the only change no completion signals):
 * after WAIT_MANY_LOOK_MIN_MS, then twice as long after each look, up to
 * WAIT_MANY_LOOK_MAX_MS. */
#define WAIT_MANY_LOOK_MIN_MS 16
#define WAIT_MANY_LOOK_MAX_MS 256

/* The last job of ids[0..n) if every job there is known and none has
 * completed without success (else NULL); w->mu held. */
static cbw__job *batch_last(cbw_worker *w, const int64_t *ids, size_t n)
{
    cbw__job *job = NULL;
    size_t i;
    for (i = 0; i < n; i++) {
        job = cbw__table_get(&w->table, ids[i]);
        if (job == NULL || (job->phase == CBW_PHASE_COMPLETED && job->status != CBW_STATUS_OK))
            return NULL;
    }
    return job;
}

/* cbw_wait_many's first step, for a caller that is not one of the worker's
 * threads: waits for the batch's last job first.  The others mostly
 * complete before it, so the batch costs the caller one wake-up instead of
 * one per job (each of which would also contend with the running thread
 * for w->mu).  A job that completes without success (failed, cancelled,
 * timed out) while such a caller waits wakes it (w->unsuccessful), and it
 * looks at its batch again, stopping as soon as a job has failed, been
 * taken or is unknown: the in-order loop that follows then meets it as it
 * would have.  A job taken by another thread is seen at the next periodic
 * look (WAIT_MANY_LOOK_*).  Called and returns with w->mu held. */
static void wait_for_last(cbw_worker *w, const int64_t *ids, size_t n, int32_t timeout_ms)
{
    int64_t deadline = cbw__deadline_after_ms(timeout_ms), seen;
    int32_t left, look = WAIT_MANY_LOOK_MIN_MS;
    cbw__job *last;
    if (n < 2 || (cbw__self != NULL && cbw__self->w == w))
        return;
    w->batch_waiters++;
    while (!w->stopping && (last = batch_last(w, ids, n)) != NULL &&
           last->phase != CBW_PHASE_COMPLETED) {
        left = ms_left(timeout_ms, deadline);
        if (left == 0)
            break;
        seen = w->unsuccessful;
        if (wait_watching(w, last, left < 0 || left > look ? look : left, &seen) !=
            CBW_ETIMEDOUT)
            break;
        if (look < WAIT_MANY_LOOK_MAX_MS)
            look *= 2;
    }
    w->batch_waiters--;
}

int cbw_wait_many(cbw_worker *w, const int64_t *ids, size_t n, int32_t timeout_ms,
                  cbw_result *out, size_t *done)
{
    cbw__job *job;
    int64_t deadline;
    size_t i;
    int rc = CBW_OK;
    if (done == NULL)
        return CBW_EINVAL;
    *done = 0;
    if (timeout_ms < CBW_TIMEOUT_INFINITE || (n > 0 && (ids == NULL || out == NULL)))
        return CBW_EINVAL;
    if (n == 0)
        return CBW_OK;
    memset(out, 0, n * sizeof(*out));
    deadline = cbw__deadline_after_ms(timeout_ms);
    cbw__mutex_lock(&w->mu);
    wait_for_last(w, ids, n, timeout_ms);
    for (i = 0; i < n; i++) {
        if ((job = lookup(w, ids[i], &rc)) == NULL)
            break;
        rc = job->phase == CBW_PHASE_COMPLETED
                 ? CBW_OK
                 : wait_locked(w, job, ms_left(timeout_ms, deadline));
        if (rc != CBW_OK)
            break;
        if ((job = cbw__table_get(&w->table, ids[i])) == NULL) {
            rc = CBW_EUNKNOWN; /* another thread took it meanwhile */
            break;
        }
        detach(w, job, &out[i]);
        *done = i + 1;
        if (out[i].status != CBW_STATUS_OK)
            break;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

void cbw_result_release_many(cbw_result *res, size_t n)
{
    size_t i = 0;
    uint32_t held;
    cbw_worker *w;
    while (i < n) {
        if (res[i].job_ == NULL) {
            i++;
            continue;
        }
        w = res[i].worker_;
        held = 0;
        cbw__mutex_lock(&w->mu);
        for (; i < n && (res[i].job_ == NULL || res[i].worker_ == w); i++) {
            if (res[i].job_ == NULL)
                continue;
            cbw__job_unref(res[i].job_);
            held++; /* each result holds a reference on the worker */
            res[i].job_ = NULL;
            res[i].data = NULL;
            res[i].error = NULL;
        }
        w->refs -= held - 1;
        cbw__worker_unref(w); /* the last one; unlocks, may free the worker */
    }
}

int cbw_wait_complete(cbw_worker *w, int64_t id, int32_t timeout_ms)
{
    cbw__job *job;
    int rc;
    if (timeout_ms < CBW_TIMEOUT_INFINITE)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &rc)) != NULL) {
        rc = wait_locked(w, job, timeout_ms);
        if (rc == CBW_OK)
            rc = cbw__table_get(&w->table, id) != NULL ? 1 : CBW_EUNKNOWN;
        else if (rc == CBW_ETIMEDOUT)
            rc = 0;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_take(cbw_worker *w, int64_t id, cbw_result *out)
{
    cbw__job *job;
    int rc = CBW_OK;
    memset(out, 0, sizeof(*out));
    cbw__mutex_lock(&w->mu);
    job = lookup(w, id, &rc);
    if (job != NULL && job->phase != CBW_PHASE_COMPLETED)
        rc = CBW_ENOTDONE;
    else if (job != NULL)
        detach(w, job, out);
    cbw__mutex_unlock(&w->mu);
    return rc;
}

void cbw_result_release(cbw_result *res)
{
    cbw_worker *w = res->worker_;
    if (res->job_ == NULL)
        return;
    cbw__mutex_lock(&w->mu);
    cbw__job_unref(res->job_);
    cbw__worker_unref(w); /* the result's; unlocks, may free the worker */
    res->job_ = NULL;
    res->data = NULL;
    res->error = NULL;
}

int cbw_job_info_get(cbw_worker *w, int64_t id, cbw_job_info *out)
{
    cbw__job *job;
    int rc = CBW_OK;
    memset(out, 0, sizeof(*out));
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &rc)) != NULL) {
        out->id = id;
        out->phase = job->phase;
        out->status = job->status;
        out->state = cbw__job_state(job);
        out->timeout_ms = job->run.timeout_ms;
        out->route = job->run.route;
        out->attempt = job->run.attempt;
        out->has_result = job->phase == CBW_PHASE_COMPLETED &&
                          job->status == CBW_STATUS_OK;
        out->result_size = out->has_result ? job->run.size : 0;
        out->rc = out->has_result ? job->run.rc : 0;
        out->error_len = job->error != NULL ? strlen(job->error) : 0;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_job_error_text(cbw_worker *w, int64_t id, char *buf, size_t cap)
{
    cbw__job *job;
    int rc;
    size_t n;
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &rc)) != NULL) {
        const char *e = job->error != NULL && job->phase == CBW_PHASE_COMPLETED
                            ? job->error : "";
        n = strlen(e);
        if (cap > 0) {
            if (n >= cap)
                n = cap - 1;
            memcpy(buf, e, n);
            buf[n] = '\0';
        }
        rc = (int)(strlen(e) > 0x7fffffff ? 0x7fffffff : strlen(e));
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

const cbw_run *cbw_current_run(void)
{
    cbw__thread_rec *self = cbw__self;
    return self != NULL && self->job != NULL ? &self->job->run : NULL;
}

cbw_worker *cbw_current_worker(void)
{
    cbw__thread_rec *self = cbw__self;
    return self != NULL && self->job != NULL ? self->w : NULL;
}

void *cbw_current_context(void)
{
    cbw__thread_rec *self = cbw__self;
    return self != NULL && self->job != NULL ? self->w->hooks.ctx : NULL;
}

int cbw_current_cancel_requested(void)
{
    cbw__thread_rec *self = cbw__self;
    int requested;
    if (self == NULL || self->job == NULL)
        return 0;
    cbw__mutex_lock(&self->w->mu);
    requested = self->job->cancel_requested;
    cbw__mutex_unlock(&self->w->mu);
    return requested;
}

int cbw_job_watch(cbw_worker *w, int64_t id)
{
    cbw__job *job;
    int rc = CBW_OK;
    cbw__mutex_lock(&w->mu);
    if ((job = lookup(w, id, &rc)) != NULL) {
        if (job->phase == CBW_PHASE_COMPLETED)
            rc = 1;
        else if (job->flags & CBW_JOB_NOTIFY)
            rc = 0; /* already watched: one report serves every watcher */
        else if ((rc = cbw__notify_reserve(w)) == CBW_OK)
            job->flags |= CBW_JOB_NOTIFY;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

size_t cbw_completions_collect(cbw_worker *w, int64_t *out, size_t cap)
{
    size_t n;
    cbw__mutex_lock(&w->mu);
    n = w->done_len < cap ? w->done_len : cap;
    if (n > 0) {
        memcpy(out, w->done_ids, n * sizeof(*out));
        if (w->done_len > n)
            memmove(w->done_ids, w->done_ids + n, (w->done_len - n) * sizeof(*out));
        w->done_len -= n;
    }
    cbw__mutex_unlock(&w->mu);
    return n;
}
