/*
 * cbw_job.c - job records and how a job completes.
 *
 * DESIGN: a job is one allocation holding its header and the copy of the
 * request, so starting a job costs one malloc and one memcpy.  A job
 * completes exactly once (cbw__job_complete), whoever gets there first: the
 * thread that ran it, the timer (TIMEOUT), cancel (CANCELLED) or close
 * (SHUTDOWN).  Completion wakes the job's waiters only if it has any, so the
 * common case of nobody waiting costs no system call.  A watched job's id is
 * queued for hooks->completed (room was reserved when it was watched, so
 * this cannot fail); a detached job leaves the table at once.  All under
 * w->mu.
 */
#include <stdlib.h>
#include <string.h>

#include "cbw_internal.h"

cbw__job *cbw__job_new(const char *data, size_t size)
{
    cbw__job *job;
    if (size > SIZE_MAX - sizeof(cbw__job))
        return NULL;
    job = cbw__malloc(sizeof(cbw__job) + size);
    if (job == NULL)
        return NULL;
    memset(job, 0, sizeof(*job));
    if (size && data != NULL)
        memcpy(job->inline_data, data, size); /* else the caller fills it */
    job->run.data = job->inline_data;
    job->run.size = size;
    job->run.deadline_ns = CBW__NEVER;
    job->refs = 1;
    job->phase = CBW_PHASE_QUEUED;
    job->status = CBW_STATUS_PENDING;
    return job;
}

void cbw__job_unref(cbw__job *job)
{
    if (job->refs == 0)
        abort();
    if (--job->refs > 0)
        return;
    cbw__free(job->request);
    cbw__free(job->result);
    cbw__free(job->error);
    cbw__free(job);
}

void cbw__job_complete(cbw_worker *w, cbw__job *job, int status, const char *why)
{
    if (job->phase == CBW_PHASE_COMPLETED)
        abort();
    job->phase = CBW_PHASE_COMPLETED;
    job->status = (uint8_t)status;
    cbw__atomic_add(&w->completions, 1);
    if (why != NULL && job->error == NULL)
        job->error = cbw__strdup(why); /* on ENOMEM the text stays empty */
    if (job->waiters > 0)
        cbw__cond_broadcast(&w->waitc[(uint64_t)job->run.id % CBW__WAIT_STRIPES]);
    if (status != CBW_STATUS_OK && w->batch_waiters > 0) {
        /* A wait_many caller sleeps on its batch's last job, whichever
         * stripe that is: wake them all to look at their batches. */
        int i;
        w->unsuccessful++;
        for (i = 0; i < CBW__WAIT_STRIPES; i++)
            cbw__cond_broadcast(&w->waitc[i]);
    }
    if (job->flags & CBW_JOB_NOTIFY) {
        job->flags &= (uint8_t)~CBW_JOB_NOTIFY;
        w->done_ids[w->done_len++] = job->run.id;
        w->notify_live--;
    }
    if (job->flags & CBW_JOB_DETACHED) {
        cbw__table_remove(&w->table, job->run.id);
        cbw__job_unref(job); /* the table's reference; the caller holds one */
    }
}

int cbw__notify_reserve(cbw_worker *w)
{
    size_t need = w->done_len + w->notify_live + 1, cap;
    int64_t *grown;
    if (need > w->done_cap) {
        cap = w->done_cap ? w->done_cap * 2 : 16;
        while (cap < need)
            cap *= 2;
        grown = cbw__malloc(cap * sizeof(*grown));
        if (grown == NULL)
            return CBW_ENOMEM;
        if (w->done_len)
            memcpy(grown, w->done_ids, w->done_len * sizeof(*grown));
        cbw__free(w->done_ids);
        w->done_ids = grown;
        w->done_cap = cap;
    }
    w->notify_live++;
    return CBW_OK;
}

int cbw__job_state(const cbw__job *job)
{
    if (job->phase == CBW_PHASE_QUEUED)
        return job->flags & CBW__JOB_SUSPENDED ? CBW_STATE_SUSPENDED : CBW_STATE_QUEUED;
    if (job->phase == CBW_PHASE_RUNNING)
        return CBW_STATE_RUNNING;
    switch (job->status) {
    case CBW_STATUS_OK: return CBW_STATE_SUCCEEDED;
    case CBW_STATUS_ERROR: return CBW_STATE_FAILED;
    case CBW_STATUS_TIMEOUT: return CBW_STATE_TIMED_OUT;
    case CBW_STATUS_CANCELLED: return CBW_STATE_CANCELLED;
    case CBW_STATUS_SHUTDOWN: return CBW_STATE_SHUT_DOWN;
    default: abort();
    }
}

cbw__route *cbw__route_get(cbw_worker *w, int32_t id)
{
    if (id < 1 || id > w->nroutes)
        return NULL;
    return w->routes[id - 1];
}

static cbw__job *job_of(cbw_run *run)
{
    return (cbw__job *)(void *)run;
}

int cbw_run_set_result(cbw_run *run, const char *data, size_t size)
{
    cbw__job *job = job_of(run);
    unsigned char *copy;
    if (cbw__self == NULL || cbw__self->job != job)
        return CBW_EINVAL;
    if (size <= run->size) {
        /* run->data is always the job's own memory (inline, its request
         * buffer or an earlier result): fill it in place. */
        memmove(run->data, data, size);
        run->size = size;
        return CBW_OK;
    }
    copy = cbw__malloc(size);
    if (copy == NULL)
        return CBW_ENOMEM;
    memcpy(copy, data, size);
    /* Only the thread running the job touches result/data/size until the
     * job completes, so no lock is needed to swap the buffers.  The request
     * (inline, or job->request) is left alone: the executor may have kept a
     * view of it.  An earlier result is no run's request, so it can go. */
    cbw__free(job->result);
    job->result = copy;
    run->data = copy;
    run->size = size;
    return CBW_OK;
}

int cbw_run_set_error(cbw_run *run, const char *text)
{
    /* Only the running thread writes its own record's pending_error; the
     * job's error field is shared with the timer, so it is set later, under
     * w->mu, by the thread loop. */
    cbw__thread_rec *self = cbw__self;
    char *copy;
    if (self == NULL || self->job != job_of(run))
        return CBW_EINVAL;
    copy = cbw__strdup(text);
    if (copy == NULL)
        return CBW_ENOMEM;
    cbw__free(self->pending_error);
    self->pending_error = copy;
    return CBW_OK;
}

int cbw_run_keep_alive(cbw_run *run)
{
    cbw__thread_rec *self = cbw__self;
    if (self == NULL || self->job != job_of(run))
        return CBW_EINVAL;
    cbw__mutex_lock(&self->w->mu);
    job_of(run)->refs++; /* never dropped */
    job_of(run)->flags |= CBW__JOB_KEPT;
    cbw__mutex_unlock(&self->w->mu);
    return CBW_OK;
}

int cbw_run_overdue(const cbw_run *run)
{
    return run->deadline_ns != CBW__NEVER && cbw__now_ns() >= run->deadline_ns;
}
