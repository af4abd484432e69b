/*
 * cbw_alloc.c - every allocation the core makes, counted.
 *
 * DESIGN: the core's heap use is observable so that tests can prove it is
 * empty after close (cbw_live_allocations) and can make the Nth allocation
 * fail (cbw_debug_fail_allocation) to exercise every ENOMEM path.  Both
 * counters are atomics, so the accounting needs no lock and is safe from any
 * thread.  The cost is one atomic add per allocation and per free.
 */
#include <stdlib.h>
#include <string.h>

#include "cbw_internal.h"

static volatile int64_t live_blocks;
static volatile int64_t fail_countdown;

void cbw_debug_fail_allocation(int64_t nth)
{
    int64_t cur = cbw__atomic_load(&fail_countdown);
    cbw__atomic_add(&fail_countdown, nth - cur);
}

int64_t cbw_live_allocations(void)
{
    return cbw__atomic_load(&live_blocks);
}

static int injected_failure(void)
{
    if (cbw__atomic_load(&fail_countdown) <= 0)
        return 0;
    return cbw__atomic_add(&fail_countdown, -1) == 0;
}

void *cbw__malloc(size_t n)
{
    void *p;
    if (injected_failure())
        return NULL;
    p = malloc(n ? n : 1);
    if (p != NULL)
        cbw__atomic_add(&live_blocks, 1);
    return p;
}

void *cbw__calloc(size_t n, size_t size)
{
    void *p;
    if (injected_failure())
        return NULL;
    p = calloc(n ? n : 1, size ? size : 1);
    if (p != NULL)
        cbw__atomic_add(&live_blocks, 1);
    return p;
}

void cbw__free(void *p)
{
    if (p == NULL)
        return;
    cbw__atomic_add(&live_blocks, -1);
    free(p);
}

char *cbw__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = cbw__malloc(n);
    if (p != NULL)
        memcpy(p, s, n);
    return p;
}
