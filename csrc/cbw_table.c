/*
 * cbw_table.c - the job table: job id -> job, O(1) on average.
 *
 * DESIGN: open addressing with linear probing over a power-of-two array of
 * job pointers; the key is stored in the job itself (job->run.id), so a slot
 * is one pointer.  Ids are handed out in increasing order and never reused,
 * so Fibonacci hashing spreads consecutive ids evenly.  (The identity hash
 * would be kinder to caches, but consecutive ids then form one long probe
 * run and backward-shift deletion would scan all of it: O(n) per take.)  Removal uses backward
 * shift deletion, so there are no tombstones and lookups of ids that were
 * destroyed stop at the first empty slot.  The load factor stays under 1/2:
 * the table doubles when it would pass that, and halves (down to its initial
 * size) when it falls under 1/8, so a drained worker gives its memory back.
 * The caller holds the worker mutex.
 */
#include <string.h>

#include "cbw_internal.h"

#define CBW__TABLE_MIN 64

static size_t slot_of(int64_t id, size_t mask)
{
    return (size_t)(((uint64_t)id * UINT64_C(0x9E3779B97F4A7C15)) >> 20) & mask;
}

int cbw__table_init(cbw__table *t)
{
    t->slots = cbw__calloc(CBW__TABLE_MIN, sizeof(cbw__job *));
    if (t->slots == NULL)
        return CBW_ENOMEM;
    t->mask = CBW__TABLE_MIN - 1;
    t->count = 0;
    return CBW_OK;
}

void cbw__table_destroy(cbw__table *t)
{
    cbw__free(t->slots);
    t->slots = NULL;
}

cbw__job *cbw__table_get(const cbw__table *t, int64_t id)
{
    size_t i = slot_of(id, t->mask);
    cbw__job *job;
    while ((job = t->slots[i]) != NULL) {
        if (job->run.id == id)
            return job;
        i = (i + 1) & t->mask;
    }
    return NULL;
}

static void insert_slot(cbw__job **slots, size_t mask, cbw__job *job)
{
    size_t i = slot_of(job->run.id, mask);
    while (slots[i] != NULL)
        i = (i + 1) & mask;
    slots[i] = job;
}

static int resize(cbw__table *t, size_t capacity)
{
    cbw__job **slots = cbw__calloc(capacity, sizeof(cbw__job *));
    size_t i;
    if (slots == NULL)
        return CBW_ENOMEM;
    for (i = 0; i <= t->mask; i++)
        if (t->slots[i] != NULL)
            insert_slot(slots, capacity - 1, t->slots[i]);
    cbw__free(t->slots);
    t->slots = slots;
    t->mask = capacity - 1;
    return CBW_OK;
}

int cbw__table_reserve(cbw__table *t, size_t more)
{
    size_t capacity = t->mask + 1;
    if (more > SIZE_MAX / 4 - t->count)
        return CBW_ENOMEM;
    while ((t->count + more) * 2 > capacity)
        capacity *= 2;
    return capacity == t->mask + 1 ? CBW_OK : resize(t, capacity);
}

int cbw__table_put(cbw__table *t, cbw__job *job)
{
    int rc = cbw__table_reserve(t, 1);
    if (rc != CBW_OK)
        return rc;
    insert_slot(t->slots, t->mask, job);
    t->count++;
    return CBW_OK;
}

void cbw__table_remove(cbw__table *t, int64_t id)
{
    size_t i = slot_of(id, t->mask), j, home;
    while (t->slots[i] != NULL && t->slots[i]->run.id != id)
        i = (i + 1) & t->mask;
    if (t->slots[i] == NULL)
        return;
    t->slots[i] = NULL;
    t->count--;
    /* Backward shift: move later members of the probe run into the hole
     * when their home slot is not between the hole and their position. */
    j = i;
    for (;;) {
        j = (j + 1) & t->mask;
        if (t->slots[j] == NULL)
            break;
        home = slot_of(t->slots[j]->run.id, t->mask);
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->slots[i] = t->slots[j];
            t->slots[j] = NULL;
            i = j;
        }
    }
    if (t->mask + 1 > CBW__TABLE_MIN && t->count * 8 < t->mask + 1)
        (void)resize(t, (t->mask + 1) / 2); /* on failure it stays larger */
}
