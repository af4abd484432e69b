/*
 * cbw_table.c - the job table: job id -> job in O(1).
 *
 * DESIGN: ids are handed out in increasing order and never reused, so the
 * table is direct-mapped in pages: id >> CBW__PAGE_BITS names a page of
 * CBW__PAGE_SLOTS job pointers and the low bits the slot in it.  Pages are
 * found through a small open-addressing hash on the page number (Fibonacci
 * hashing, linear probing, backward-shift deletion), created when their
 * first job arrives and freed when their last job is destroyed.  Consecutive
 * jobs therefore sit in consecutive slots, so bursts of starts and takes
 * walk memory sequentially, and removal never probes.  A live job costs one
 * pointer, plus a share of its page; a page costs 8 KiB whatever its
 * occupancy, so in the worst case (one survivor per page) memory is bounded
 * by 8 KiB per live job.  The caller holds the worker mutex.
 */
#include <string.h>

#include "cbw_internal.h"

#define CBW__PAGE_BITS 10
#define CBW__PAGE_SLOTS (1 << CBW__PAGE_BITS)
#define CBW__DIR_MIN 16

struct cbw__page {
    int64_t number;
    size_t live;
    cbw__job *slots[CBW__PAGE_SLOTS];
};

static size_t home(int64_t number, size_t mask)
{
    return (size_t)(((uint64_t)number * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & mask;
}

int cbw__table_init(cbw__table *t)
{
    t->pages = cbw__calloc(CBW__DIR_MIN, sizeof(cbw__page *));
    if (t->pages == NULL)
        return CBW_ENOMEM;
    t->mask = CBW__DIR_MIN - 1;
    t->npages = 0;
    t->count = 0;
    t->last = NULL;
    return CBW_OK;
}

void cbw__table_destroy(cbw__table *t)
{
    size_t i;
    for (i = 0; t->pages != NULL && i <= t->mask; i++)
        cbw__free(t->pages[i]);
    cbw__free(t->pages);
    t->pages = NULL;
}

static cbw__page *find_page(const cbw__table *t, int64_t number)
{
    size_t i;
    cbw__page *p = t->last;
    if (p != NULL && p->number == number)
        return p;
    for (i = home(number, t->mask); (p = t->pages[i]) != NULL; i = (i + 1) & t->mask)
        if (p->number == number)
            return p;
    return NULL;
}

cbw__job *cbw__table_get(const cbw__table *t, int64_t id)
{
    cbw__page *p;
    if (id <= 0)
        return NULL;
    p = find_page(t, id >> CBW__PAGE_BITS);
    return p != NULL ? p->slots[id & (CBW__PAGE_SLOTS - 1)] : NULL;
}

static void dir_insert(cbw__page **pages, size_t mask, cbw__page *p)
{
    size_t i = home(p->number, mask);
    while (pages[i] != NULL)
        i = (i + 1) & mask;
    pages[i] = p;
}

static int dir_grow(cbw__table *t)
{
    size_t cap = (t->mask + 1) * 2, i;
    cbw__page **pages = cbw__calloc(cap, sizeof(cbw__page *));
    if (pages == NULL)
        return CBW_ENOMEM;
    for (i = 0; i <= t->mask; i++)
        if (t->pages[i] != NULL)
            dir_insert(pages, cap - 1, t->pages[i]);
    cbw__free(t->pages);
    t->pages = pages;
    t->mask = cap - 1;
    return CBW_OK;
}

/* The page for `number`, created if needed. */
static cbw__page *page_for(cbw__table *t, int64_t number)
{
    cbw__page *p = find_page(t, number);
    if (p != NULL)
        return p;
    if ((t->npages + 1) * 2 > t->mask + 1 && dir_grow(t) != CBW_OK)
        return NULL;
    p = cbw__calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->number = number;
    dir_insert(t->pages, t->mask, p);
    t->npages++;
    return p;
}

int cbw__table_reserve(cbw__table *t, int64_t first_id, size_t n)
{
    int64_t number, last;
    if (n == 0)
        return CBW_OK;
    if ((uint64_t)n > (uint64_t)(INT64_MAX - first_id))
        return CBW_ENOMEM;
    last = (first_id + (int64_t)n - 1) >> CBW__PAGE_BITS;
    for (number = first_id >> CBW__PAGE_BITS; number <= last; number++)
        if (page_for(t, number) == NULL)
            return CBW_ENOMEM; /* pages made so far stay; they are reused */
    return CBW_OK;
}

int cbw__table_put(cbw__table *t, cbw__job *job)
{
    cbw__page *p = page_for(t, job->run.id >> CBW__PAGE_BITS);
    if (p == NULL)
        return CBW_ENOMEM;
    p->slots[job->run.id & (CBW__PAGE_SLOTS - 1)] = job;
    p->live++;
    t->count++;
    t->last = p;
    return CBW_OK;
}

static void dir_remove(cbw__table *t, cbw__page *p)
{
    size_t i = home(p->number, t->mask), j, k;
    while (t->pages[i] != p)
        i = (i + 1) & t->mask;
    t->pages[i] = NULL;
    t->npages--;
    for (j = i;;) {
        j = (j + 1) & t->mask;
        if (t->pages[j] == NULL)
            break;
        k = home(t->pages[j]->number, t->mask);
        if (((j - k) & t->mask) >= ((j - i) & t->mask)) {
            t->pages[i] = t->pages[j];
            t->pages[j] = NULL;
            i = j;
        }
    }
}

void cbw__table_remove(cbw__table *t, int64_t id)
{
    cbw__page *p = id > 0 ? find_page(t, id >> CBW__PAGE_BITS) : NULL;
    cbw__job **slot;
    if (p == NULL)
        return;
    slot = &p->slots[id & (CBW__PAGE_SLOTS - 1)];
    if (*slot == NULL)
        return;
    *slot = NULL;
    t->count--;
    if (--p->live > 0)
        return;
    if (t->last == p)
        t->last = NULL;
    dir_remove(t, p);
    cbw__free(p);
}

/* Calls fn on every job in the table (for the final teardown). */
void cbw__table_each(cbw__table *t, void (*fn)(cbw__job *))
{
    size_t i, s;
    for (i = 0; t->pages != NULL && i <= t->mask; i++)
        if (t->pages[i] != NULL)
            for (s = 0; s < CBW__PAGE_SLOTS; s++)
                if (t->pages[i]->slots[s] != NULL)
                    fn(t->pages[i]->slots[s]);
}
