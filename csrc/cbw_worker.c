/*
 * cbw_worker.c - worker lifecycle and the job verbs.
 *
 * DESIGN
 * Starting a job copies the request into a fresh job record before the
 * worker mutex is taken, so a large blob never holds up other threads; under
 * the mutex the job only gets its id, enters the table and joins its route's
 * FIFO.  Waiting happens on one of CBW__WAIT_STRIPES condition variables,
 * chosen by job id, with the waiter holding a reference so a concurrent take
 * cannot free the job under it.
 *
 * close() is the one slow path.  It stops new starts, optionally lets the
 * routes run dry (drain), completes every queued job with SHUTDOWN, wakes
 * every waiter and idle thread, joins the route threads (the caller's own
 * thread, when close is called from inside a callback, detaches instead) and
 * finally the timer.  Once stopping is set, every verb but close returns
 * CBW_ECLOSED; blocked waiters return CBW_ESHUTDOWN.
 */
#include <string.h>

#include "cbw_internal.h"

static void worker_destroy(cbw_worker *w)
{
    size_t i;
    int32_t r;
    cbw__thread_rec *t, *tn;
    cbw__table_each(&w->table, cbw__job_unref);
    cbw__table_destroy(&w->table);
    cbw__tokens_destroy(&w->tokens);
    for (r = 0; r < w->nroutes; r++) {
        cbw__cond_destroy(&w->routes[r]->cond);
        cbw__cond_destroy(&w->routes[r]->coalc);
        cbw__free(w->routes[r]);
    }
    cbw__free(w->routes);
    for (t = w->all_threads; t != NULL; t = tn) {
        tn = t->all_next;
        cbw__free(t->pending_error);
        cbw__free(t);
    }
    for (i = 0; i < CBW__WAIT_STRIPES; i++)
        cbw__cond_destroy(&w->waitc[i]);
    cbw__cond_destroy(&w->statec);
    cbw__cond_destroy(&w->timerc);
    cbw__mutex_destroy(&w->mu);
    if (w->hooks.finalize != NULL)
        w->hooks.finalize(w->hooks.ctx);
    cbw__free(w);
}

void cbw__worker_unref(cbw_worker *w)
{
    uint32_t left = --w->refs;
    cbw__mutex_unlock(&w->mu);
    if (left == 0)
        worker_destroy(w);
}

static int init_sync(cbw_worker *w)
{
    int i, ok = cbw__mutex_init(&w->mu) == 0;
    ok = ok && cbw__cond_init(&w->statec) == 0;
    ok = ok && cbw__cond_init(&w->timerc) == 0;
    for (i = 0; ok && i < CBW__WAIT_STRIPES; i++)
        ok = cbw__cond_init(&w->waitc[i]) == 0;
    return ok ? CBW_OK : CBW_ENOMEM;
}

cbw_worker *cbw_worker_new(const cbw_hooks *hooks, int32_t concurrency, int *err)
{
    cbw_worker *w;
    int rc;
    int32_t route;

    *err = CBW_EINVAL;
    if (hooks == NULL || hooks->run == NULL || concurrency < 1)
        return NULL;
    *err = CBW_ENOMEM;
    w = cbw__calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->hooks = *hooks;
    w->tokens.need_retain = hooks->retain != NULL;
    w->refs = 1;
    w->next_id = 1;
    w->grace_ms = CBW__DEFAULT_GRACE_MS;
    rc = init_sync(w);
    if (rc == CBW_OK)
        rc = cbw__table_init(&w->table);
    if (rc == CBW_OK) {
        route = cbw__route_add(w, "default", concurrency, CBW_TIMEOUT_INFINITE);
        rc = route < 0 ? (int)route : CBW_OK;
    }
    if (rc != CBW_OK) {
        cbw__table_destroy(&w->table);
        cbw__free(w->routes); /* cbw__route_add may have grown it, then failed */
        cbw__free(w);
        *err = rc;
        return NULL;
    }
    *err = CBW_OK;
    return w;
}

int cbw_worker_set_grace(cbw_worker *w, int32_t grace_ms)
{
    if (grace_ms < 0)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    w->grace_ms = grace_ms;
    cbw__mutex_unlock(&w->mu);
    return CBW_OK;
}

int cbw_worker_is_own_thread(cbw_worker *w)
{
    return cbw__self != NULL && cbw__self->w == w;
}

/* ---- starting jobs --------------------------------------------------- */

static int check_start(cbw_worker *w, int32_t route_id, int32_t timeout_ms,
                       cbw__route **out)
{
    cbw__route *r;
    int rc;
    if (w->closing)
        return CBW_ECLOSED;
    r = cbw__route_get(w, route_id);
    if (r == NULL)
        return CBW_ENOROUTE;
    if (!r->open)
        return CBW_EROUTECLOSED;
    if (r->nthreads < r->concurrency) {
        rc = cbw__route_ensure_threads(w, r);
        if (rc != CBW_OK)
            return rc;
    }
    if (timeout_ms == CBW_TIMEOUT_ROUTE)
        timeout_ms = r->timeout_ms;
    if (timeout_ms >= 0 && cbw__timer_start(w) != CBW_OK)
        return CBW_ETHREAD;
    *out = r;
    return CBW_OK;
}

/* Counts n more jobs for callback; calls the retain hook first (dropping
 * w->mu meanwhile) if the token is new, then checks the start again. */
static int take_tokens(cbw_worker *w, int32_t route_id, int32_t timeout_ms,
                       uint64_t callback, int64_t n, cbw__route **r)
{
    int rc, missing;
    uint64_t seen;
    rc = cbw__tokens_add(&w->tokens, callback, n, &missing);
    while (rc == CBW_OK && missing) {
        seen = w->tokens.collects;
        cbw__mutex_unlock(&w->mu);
        rc = w->hooks.retain(w->hooks.ctx, callback);
        cbw__mutex_lock(&w->mu);
        if (rc != CBW_OK)
            return CBW_ENOMEM;
        rc = cbw__tokens_add(&w->tokens, callback, n, &missing);
        if (rc == CBW_OK && missing && w->tokens.collects == seen) {
            /* No collect undid the retain: the registry holds the token. */
            rc = cbw__tokens_add(&w->tokens, callback, n, NULL);
            missing = 0;
        }
    }
    if (rc != CBW_OK)
        return rc;
    rc = check_start(w, route_id, timeout_ms, r); /* state may have changed */
    if (rc != CBW_OK)
        cbw__tokens_done(w, callback, n);
    return rc;
}

/* Gives the job its id and puts it at the tail of r.  After a
 * cbw__table_reserve covering the id, it cannot fail. */
static int enqueue(cbw_worker *w, cbw__route *r, cbw__job *job,
                   uint64_t callback, int32_t timeout_ms)
{
    int rc;
    job->run.id = w->next_id++;
    job->run.callback = callback;
    job->run.timeout_ms = timeout_ms == CBW_TIMEOUT_ROUTE ? r->timeout_ms : timeout_ms;
    job->run.route = r->id;
    rc = cbw__table_put(&w->table, job);
    if (rc != CBW_OK)
        return rc;
    job->refs++; /* the queue's reference */
    job->in_queue = 1;
    if (r->tail != NULL)
        r->tail->next = job;
    else
        r->head = job;
    r->tail = job;
    r->queued++;
    r->enqueued++;
    return CBW_OK;
}

int64_t cbw_start(cbw_worker *w, int32_t route, uint64_t callback,
                  const char *data, size_t size, int32_t timeout_ms)
{
    cbw__job *job;
    cbw__route *r;
    int rc, dead;
    int64_t id = 0;

    if (timeout_ms < CBW_TIMEOUT_ROUTE || (data == NULL && size > 0))
        return CBW_EINVAL;
    job = cbw__job_new(data, size);
    if (job == NULL)
        return CBW_ENOMEM;
    cbw__mutex_lock(&w->mu);
    rc = check_start(w, route, timeout_ms, &r);
    if (rc == CBW_OK)
        rc = take_tokens(w, route, timeout_ms, callback, 1, &r);
    if (rc == CBW_OK) {
        rc = enqueue(w, r, job, callback, timeout_ms);
        if (rc != CBW_OK)
            cbw__tokens_done(w, callback, 1);
    }
    if (rc == CBW_OK) {
        id = job->run.id;
        cbw__route_wake(r);
    }
    dead = w->tokens.dead > 0;
    cbw__mutex_unlock(&w->mu);
    cbw__tokens_notify(w, dead);
    if (rc != CBW_OK) {
        cbw__job_unref(job); /* never shared */
        return rc;
    }
    return id;
}

int cbw_start_many(cbw_worker *w, int32_t route, uint64_t callback,
                   const char *data, const size_t *sizes, size_t n,
                   int32_t timeout_ms, int64_t *ids)
{
    cbw__job **jobs;
    cbw__route *r;
    size_t i, made = 0;
    int rc = CBW_OK, dead;

    if (timeout_ms < CBW_TIMEOUT_ROUTE || (n > 0 && (data == NULL || sizes == NULL || ids == NULL)))
        return CBW_EINVAL;
    if (n == 0)
        return CBW_OK;
    jobs = cbw__calloc(n, sizeof(*jobs));
    if (jobs == NULL)
        return CBW_ENOMEM;
    for (; made < n; made++) {
        if (data == NULL && sizes[made] > 0) {
            rc = CBW_EINVAL;
            break;
        }
        jobs[made] = cbw__job_new(data, sizes[made]);
        if (data != NULL)
            data += sizes[made];
        if (jobs[made] == NULL) {
            rc = CBW_ENOMEM;
            break;
        }
    }
    if (rc == CBW_OK) {
        cbw__mutex_lock(&w->mu);
        rc = check_start(w, route, timeout_ms, &r);
        if (rc == CBW_OK)
            rc = take_tokens(w, route, timeout_ms, callback, (int64_t)n, &r);
        if (rc == CBW_OK) {
            rc = cbw__table_reserve(&w->table, w->next_id, n);
            if (rc != CBW_OK)
                cbw__tokens_done(w, callback, (int64_t)n);
        }
        for (i = 0; rc == CBW_OK && i < n; i++) {
            rc = enqueue(w, r, jobs[i], callback, timeout_ms);
            ids[i] = jobs[i]->run.id;
        }
        if (rc == CBW_OK)
            cbw__route_wake(r);
        dead = w->tokens.dead > 0;
        cbw__mutex_unlock(&w->mu);
        cbw__tokens_notify(w, dead);
    }
    if (rc != CBW_OK)
        for (i = 0; i < made; i++)
            cbw__job_unref(jobs[i]);
    cbw__free(jobs);
    return rc;
}

/* ---- cancel, wait, take ---------------------------------------------- */

int cbw_cancel(cbw_worker *w, int64_t id, uint64_t *callback)
{
    cbw__job *job;
    cbw__route *r;
    int rc = 0, dead;
    cbw__mutex_lock(&w->mu);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
    } else if (job->phase == CBW_PHASE_QUEUED) {
        r = cbw__route_get(w, job->run.route);
        r->queued--;
        if (callback != NULL)
            *callback = job->run.callback;
        cbw__tokens_done(w, job->run.callback, 1);
        cbw__job_complete(w, job, CBW_STATUS_CANCELLED,
                          "the job was cancelled before it started");
        if (r->queued == 0 && r->running == 0 && (r->drain_waiters || w->draining))
            cbw__cond_broadcast(&w->statec);
        rc = 1;
    }
    dead = w->tokens.dead > 0;
    cbw__mutex_unlock(&w->mu);
    cbw__tokens_notify(w, dead);
    return rc;
}

/* True when waiting for job from this thread could never end: the job is the
 * caller's own, or it is queued on the caller's route and every other thread
 * of that route is itself blocked in an unbounded wait. */
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
        if (t != self && !t->blocked)
            return 0;
    return 1;
}

/* Blocks until the job completes, the timeout passes or close() stops the
 * worker, holding a reference meanwhile so a concurrent take cannot free the
 * job under the waiter.  Called and returns with w->mu held; afterwards the
 * caller must look the job up again by id (another thread may have taken
 * it, and ids are never reused). */
static int wait_locked(cbw_worker *w, cbw__job *job, int32_t timeout_ms)
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
    r->waiting++;
    if (r->delaying > 0)
        cbw__cond_broadcast(&r->coalc); /* stop coalescing: someone waits */
    job->waiters++;
    job->refs++;
    if (own && timeout_ms < 0)
        self->blocked = 1;
    while (job->phase != CBW_PHASE_COMPLETED && !w->stopping)
        if (cbw__cond_wait_until(c, &w->mu, deadline))
            break;
    if (own)
        self->blocked = 0;
    job->waiters--;
    r->waiting--;
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
}

int cbw_wait(cbw_worker *w, int64_t id, int32_t timeout_ms, cbw_result *out)
{
    cbw__job *job;
    int rc;
    memset(out, 0, sizeof(*out));
    if (timeout_ms < CBW_TIMEOUT_INFINITE)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
    } else {
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
    if (timeout_ms < CBW_TIMEOUT_INFINITE || (buf == NULL && cap > 0) || slow == NULL)
        return CBW_EINVAL;
    memset(slow, 0, sizeof(*slow));
    cbw__mutex_lock(&w->mu);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
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

int cbw_wait_complete(cbw_worker *w, int64_t id, int32_t timeout_ms)
{
    cbw__job *job;
    int rc;
    if (timeout_ms < CBW_TIMEOUT_INFINITE)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
    } else {
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
    if (w->stopping)
        rc = CBW_ECLOSED;
    else if ((job = cbw__table_get(&w->table, id)) == NULL)
        rc = CBW_EUNKNOWN;
    else if (job->phase != CBW_PHASE_COMPLETED)
        rc = CBW_ENOTDONE;
    else
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
    cbw__mutex_unlock(&w->mu);
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
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
    } else {
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
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if ((job = cbw__table_get(&w->table, id)) == NULL) {
        rc = CBW_EUNKNOWN;
    } else {
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
