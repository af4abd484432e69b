/*
 * cbw_route.c - named routes: FIFO queues with their own threads.
 *
 * DESIGN: routes are created, never destroyed, for the worker's life, so a
 * route id stays valid and route pointers may be kept by jobs and threads
 * without reference counts.  Route id N lives at w->routes[N - 1]; id 1 is
 * "default".  Closing a route only stops new starts: its pending and running
 * jobs finish (retries included).  Drain waiters sleep on w->statec, which the thread loop and
 * cancel broadcast when a route with drain waiters becomes empty.
 * Everything here runs under w->mu.
 */
#include <string.h>

#include "cbw_internal.h"

static int valid_name(const char *name)
{
    size_t n;
    if (name == NULL)
        return 0;
    n = strlen(name);
    return n > 0 && n <= CBW_ROUTE_NAME_MAX;
}

static int32_t find(cbw_worker *w, const char *name)
{
    int32_t i;
    for (i = 0; i < w->nroutes; i++)
        if (strcmp(w->routes[i]->name, name) == 0)
            return w->routes[i]->id;
    return CBW_ENOROUTE;
}

static int valid_config(const cbw_route_config *cfg)
{
    return cfg != NULL && cfg->concurrency >= 1 &&
           cfg->timeout_ms >= CBW_TIMEOUT_INFINITE && cfg->max_retries >= 0 &&
           cfg->backoff_ms >= 0 && cfg->delay_ms >= 0;
}

int32_t cbw__route_add(cbw_worker *w, const char *name, const cbw_route_config *cfg)
{
    cbw__route *r;
    if (!valid_name(name) || !valid_config(cfg))
        return CBW_EINVAL;
    if (find(w, name) > 0)
        return CBW_EEXIST;
    if (w->nroutes == w->routes_cap) {
        int32_t cap = w->routes_cap ? w->routes_cap * 2 : 4;
        cbw__route **grown = cbw__calloc((size_t)cap, sizeof(*grown));
        if (grown == NULL)
            return CBW_ENOMEM;
        if (w->nroutes)
            memcpy(grown, w->routes, (size_t)w->nroutes * sizeof(*grown));
        cbw__free(w->routes);
        w->routes = grown;
        w->routes_cap = cap;
    }
    r = cbw__calloc(1, sizeof(*r));
    if (r == NULL)
        return CBW_ENOMEM;
    if (cbw__cond_init(&r->cond) != 0) {
        cbw__free(r);
        return CBW_ENOMEM;
    }
    if (cbw__cond_init(&r->coalc) != 0) {
        cbw__cond_destroy(&r->cond);
        cbw__free(r);
        return CBW_ENOMEM;
    }
    if (cbw__cond_init(&r->handc) != 0) {
        cbw__cond_destroy(&r->coalc);
        cbw__cond_destroy(&r->cond);
        cbw__free(r);
        return CBW_ENOMEM;
    }
    memcpy(r->name, name, strlen(name) + 1);
    r->concurrency = cfg->concurrency;
    r->timeout_ms = cfg->timeout_ms;
    r->max_retries = cfg->max_retries;
    r->backoff_ms = cfg->backoff_ms;
    r->delay_ms = cfg->delay_ms;
    r->next_start_ns = INT64_MIN;
    r->open = 1;
    r->id = w->nroutes + 1;
    w->routes[w->nroutes++] = r;
    return r->id;
}

int32_t cbw_route_open_config(cbw_worker *w, const char *name,
                              const cbw_route_config *config)
{
    int32_t rc;
    cbw__mutex_lock(&w->mu);
    rc = w->closing ? CBW_ECLOSED : cbw__route_add(w, name, config);
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int32_t cbw_route_open(cbw_worker *w, const char *name, int32_t concurrency,
                       int32_t timeout_ms)
{
    cbw_route_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.concurrency = concurrency;
    cfg.timeout_ms = timeout_ms;
    return cbw_route_open_config(w, name, &cfg);
}

int32_t cbw_route_find(cbw_worker *w, const char *name)
{
    int32_t rc;
    if (!valid_name(name))
        return CBW_ENOROUTE;
    cbw__mutex_lock(&w->mu);
    rc = w->stopping ? CBW_ECLOSED : find(w, name);
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_route_close(cbw_worker *w, int32_t route)
{
    cbw__route *r;
    int rc;
    cbw__mutex_lock(&w->mu);
    r = cbw__route_get(w, route);
    if (w->stopping)
        rc = CBW_ECLOSED;
    else if (r == NULL)
        rc = CBW_ENOROUTE;
    else {
        rc = r->open;
        r->open = 0;
        r->close_accepted = 1;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_route_info_get(cbw_worker *w, int32_t route, cbw_route_info *out)
{
    cbw__route *r;
    int rc = CBW_OK;
    memset(out, 0, sizeof(*out));
    cbw__mutex_lock(&w->mu);
    r = cbw__route_get(w, route);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if (r == NULL) {
        rc = CBW_ENOROUTE;
    } else {
        out->id = r->id;
        out->state = r->open ? CBW_ROUTE_OPEN : CBW_ROUTE_CLOSED;
        out->close_accepted = r->close_accepted;
        out->concurrency = r->concurrency;
        out->timeout_ms = r->timeout_ms;
        out->max_retries = r->max_retries;
        out->backoff_ms = r->backoff_ms;
        out->delay_ms = r->delay_ms;
        out->queued = r->queued;
        out->delayed = r->delayed;
        out->running = r->running;
        out->threads = r->nthreads;
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}

int cbw_route_wait_drained(cbw_worker *w, int32_t route, int32_t timeout_ms)
{
    cbw__route *r;
    int rc;
    int64_t deadline = cbw__deadline_after_ms(timeout_ms);
    if (timeout_ms < CBW_TIMEOUT_INFINITE)
        return CBW_EINVAL;
    cbw__mutex_lock(&w->mu);
    r = cbw__route_get(w, route);
    if (w->stopping) {
        rc = CBW_ECLOSED;
    } else if (r == NULL) {
        rc = CBW_ENOROUTE;
    } else {
        r->drain_waiters++;
        cbw__atomic_add(&r->waiting, 1);
        if (r->delaying > 0)
            cbw__cond_broadcast(&r->coalc);
        while (!cbw__route_idle(r) && !w->stopping)
            if (cbw__cond_wait_until(&w->statec, &w->mu, deadline))
                break;
        r->drain_waiters--;
        cbw__atomic_add(&r->waiting, -1);
        if (w->stopping)
            rc = CBW_ESHUTDOWN; /* close emptied it: that is not draining */
        else
            rc = cbw__route_idle(r);
    }
    cbw__mutex_unlock(&w->mu);
    return rc;
}
