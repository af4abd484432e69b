/*
 * cbw_worker.c - worker lifecycle and starting jobs.
 *
 * DESIGN
 * Starting a job copies the request into a fresh job record before the
 * worker mutex is taken, so a large blob never holds up other threads; under
 * the mutex the job only gets its id, enters the table and joins its route's
 * FIFO.
 *
 * Waiting, taking, cancelling and queries live in cbw_wait.c, shutdown in
 * cbw_close.c.
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
    cbw__free(w->done_ids);
    for (r = 0; r < w->nroutes; r++) {
        cbw__cond_destroy(&w->routes[r]->cond);
        cbw__cond_destroy(&w->routes[r]->coalc);
        cbw__cond_destroy(&w->routes[r]->handc);
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
        cbw_route_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        cfg.concurrency = concurrency;
        cfg.timeout_ms = CBW_TIMEOUT_INFINITE;
        route = cbw__route_add(w, "default", &cfg);
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
            if (rc != CBW_OK && w->tokens.norphans < 8) {
                w->tokens.orphans[w->tokens.norphans++] = callback;
                w->tokens.dead++; /* the caller's after_unlock releases it */
            }
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
    cbw__atomic_add(&r->enqueued, 1);
    return CBW_OK;
}

int64_t cbw_start(cbw_worker *w, int32_t route, uint64_t callback,
                  const char *data, size_t size, int32_t timeout_ms)
{
    return cbw_start_ex(w, route, callback, data, size, timeout_ms, 0, 0);
}

/* Enqueues a job whose request is already in place; frees it on failure. */
static int64_t start_job(cbw_worker *w, int32_t route, uint64_t callback,
                         cbw__job *job, int32_t timeout_ms, int flags, uint64_t tag)
{
    cbw__route *r;
    int rc, pending;
    int64_t id = 0;

    job->flags = (uint8_t)(flags & CBW_JOB_DETACHED);
    job->run.tag = tag;
    cbw__mutex_lock(&w->mu);
    rc = check_start(w, route, timeout_ms, &r);
    if (rc == CBW_OK)
        rc = take_tokens(w, route, timeout_ms, callback, 1, &r);
    if (rc == CBW_OK && (flags & CBW_JOB_NOTIFY)) {
        rc = cbw__notify_reserve(w);
        if (rc == CBW_OK)
            job->flags |= CBW_JOB_NOTIFY;
        else
            cbw__tokens_done(w, callback, 1);
    }
    if (rc == CBW_OK) {
        rc = enqueue(w, r, job, callback, timeout_ms);
        if (rc != CBW_OK) {
            cbw__tokens_done(w, callback, 1);
            if (job->flags & CBW_JOB_NOTIFY)
                w->notify_live--;
        }
    }
    if (rc == CBW_OK) {
        id = job->run.id;
        cbw__route_wake(r);
        cbw__route_await_handoff(w, r);
    }
    pending = cbw__pending(w);
    cbw__mutex_unlock(&w->mu);
    cbw__after_unlock(w, pending);
    if (rc != CBW_OK) {
        cbw__job_unref(job); /* never shared */
        return rc;
    }
    return id;
}

static int start_args_ok(size_t size, const void *data, int32_t timeout_ms, int flags)
{
    return timeout_ms >= CBW_TIMEOUT_ROUTE && (data != NULL || size == 0) &&
           (flags & ~(CBW_JOB_DETACHED | CBW_JOB_NOTIFY)) == 0;
}

int64_t cbw_start_ex(cbw_worker *w, int32_t route, uint64_t callback,
                     const char *data, size_t size, int32_t timeout_ms, int flags,
                     uint64_t tag)
{
    cbw__job *job;
    if (!start_args_ok(size, data, timeout_ms, flags))
        return CBW_EINVAL;
    job = cbw__job_new(data, size);
    if (job == NULL)
        return CBW_ENOMEM;
    return start_job(w, route, callback, job, timeout_ms, flags, tag);
}

int64_t cbw_start_fill(cbw_worker *w, int32_t route, uint64_t callback, size_t size,
                       int32_t timeout_ms, cbw_fill_fn fill, void *arg)
{
    cbw__job *job;
    if (fill == NULL || !start_args_ok(0, NULL, timeout_ms, 0))
        return CBW_EINVAL;
    job = cbw__job_new(NULL, size);
    if (job == NULL)
        return CBW_ENOMEM;
    fill(arg, job->inline_data, size);
    return start_job(w, route, callback, job, timeout_ms, 0, 0);
}

int cbw_start_many(cbw_worker *w, int32_t route, uint64_t callback,
                   const char *data, const size_t *sizes, size_t n,
                   int32_t timeout_ms, int64_t *ids)
{
    cbw__job **jobs;
    cbw__route *r;
    size_t i, made = 0;
    int rc = CBW_OK, pending;

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
        if (rc == CBW_OK) {
            cbw__route_wake(r);
            cbw__route_await_handoff(w, r);
        }
        pending = cbw__pending(w);
        cbw__mutex_unlock(&w->mu);
        cbw__after_unlock(w, pending);
    }
    if (rc != CBW_OK)
        for (i = 0; i < made; i++)
            cbw__job_unref(jobs[i]);
    cbw__free(jobs);
    return rc;
}
