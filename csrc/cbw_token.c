/*
 * cbw_token.c - how many unfinished jobs refer to each callback token.
 *
 * DESIGN
 * Executors usually map a token to an object that must stay alive while a
 * job may still run it (a Python callable).  Counting per job in the
 * executor would cost a lock on every start and every run, so the core
 * counts, under w->mu, in a small open-addressing table (tokens are few:
 * one per distinct callback in flight).
 *
 *  - A start whose token is not in the table calls hooks->retain (outside
 *    w->mu) before the job becomes visible, then inserts the token.
 *  - A token's count drops when a job will never run its callback again:
 *    after its run, or when it is cancelled or shut down.  A count that
 *    reaches 0 stays in the table (a new start revives it for free) and
 *    marks the worker as having dead tokens; hooks->release is then called
 *    outside w->mu.
 *  - The executor, holding whatever lock guards its own map, calls
 *    cbw_tokens_collect(), which removes and returns the tokens whose count
 *    is still 0.  A start racing with this either revived the token first,
 *    or finds it gone and calls retain, which waits for the executor's lock.
 *  - A collect may also run while a start is inside retain (w->mu is not
 *    held there) and undo that retain if the token had meanwhile been added
 *    and died again.  Every collect that removes something bumps
 *    `collects`; a start that retained finds the token still absent and the
 *    counter changed retains again before it inserts.
 *  - If the insert after a retain fails (ENOMEM), the token goes on a small
 *    orphan list that the next collect returns, so the executor lets go of
 *    what it retained; the start fails.
 */
#include <stdlib.h>
#include <string.h>

#include "cbw_internal.h"

static size_t home(uint64_t token, size_t mask)
{
    return (size_t)((token * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & mask;
}

static cbw__token *find(cbw__tokens *t, uint64_t token)
{
    size_t i;
    if (t->slots == NULL)
        return NULL;
    for (i = home(token, t->mask); t->slots[i].used; i = (i + 1) & t->mask)
        if (t->slots[i].token == token)
            return &t->slots[i];
    return NULL;
}

static int grow(cbw__tokens *t)
{
    size_t cap = t->slots ? (t->mask + 1) * 2 : 16, i, j;
    cbw__token *slots = cbw__calloc(cap, sizeof(*slots));
    if (slots == NULL)
        return CBW_ENOMEM;
    for (i = 0; t->slots != NULL && i <= t->mask; i++) {
        if (!t->slots[i].used)
            continue;
        for (j = home(t->slots[i].token, cap - 1); slots[j].used; j = (j + 1) & (cap - 1))
            ;
        slots[j] = t->slots[i];
    }
    cbw__free(t->slots);
    t->slots = slots;
    t->mask = cap - 1;
    return CBW_OK;
}

int cbw__tokens_add(cbw__tokens *t, uint64_t token, int64_t n, int *missing)
{
    cbw__token *e = find(t, token);
    size_t i;
    if (missing != NULL)
        *missing = 0;
    if (e != NULL) {
        e->count += n;
        return CBW_OK;
    }
    if (missing != NULL && t->need_retain) {
        *missing = 1; /* the caller retains outside w->mu and comes back */
        return CBW_OK;
    }
    if (t->slots == NULL || (t->count + 1) * 2 > t->mask + 1)
        if (grow(t) != CBW_OK)
            return CBW_ENOMEM;
    for (i = home(token, t->mask); t->slots[i].used; i = (i + 1) & t->mask)
        ;
    t->slots[i].used = 1;
    t->slots[i].token = token;
    t->slots[i].count = n;
    t->count++;
    return CBW_OK;
}

void cbw__tokens_done(cbw_worker *w, uint64_t token, int64_t n)
{
    cbw__token *e = find(&w->tokens, token);
    if (e == NULL)
        abort();
    e->count -= n;
    if (e->count == 0)
        w->tokens.dead++;
}

static void remove_at(cbw__tokens *t, size_t i)
{
    size_t j = i, k;
    t->slots[i].used = 0;
    t->count--;
    for (;;) {
        j = (j + 1) & t->mask;
        if (!t->slots[j].used)
            return;
        k = home(t->slots[j].token, t->mask);
        if (((j - k) & t->mask) >= ((j - i) & t->mask)) {
            t->slots[i] = t->slots[j];
            t->slots[j].used = 0;
            i = j;
        }
    }
}

size_t cbw_tokens_collect(cbw_worker *w, uint64_t *out, size_t cap)
{
    cbw__tokens *t = &w->tokens;
    size_t n = 0, i = 0;
    cbw__mutex_lock(&w->mu);
    while (t->norphans > 0 && n < cap) {
        uint64_t token = t->orphans[--t->norphans];
        if (find(t, token) == NULL) /* else a later start owns it again */
            out[n++] = token;
    }
    while (t->slots != NULL && i <= t->mask && n < cap) {
        if (t->slots[i].used && t->slots[i].count == 0) {
            out[n++] = t->slots[i].token;
            remove_at(t, i); /* may shift a later entry into slot i */
            continue;
        }
        i++;
    }
    if (n > 0)
        t->collects++;
    if (n < cap)
        t->dead = 0;
    cbw__mutex_unlock(&w->mu);
    return n;
}

void cbw__tokens_destroy(cbw__tokens *t)
{
    cbw__free(t->slots);
    memset(t, 0, sizeof(*t));
}


int cbw__pending(cbw_worker *w)
{
    return (w->tokens.dead > 0 ? CBW__PENDING_TOKENS : 0) |
           (w->done_len > 0 ? CBW__PENDING_DONE : 0);
}

void cbw__after_unlock(cbw_worker *w, int pending)
{
    if ((pending & CBW__PENDING_TOKENS) && w->hooks.release != NULL)
        w->hooks.release(w->hooks.ctx);
    if ((pending & CBW__PENDING_DONE) && w->hooks.completed != NULL)
        w->hooks.completed(w->hooks.ctx);
}
