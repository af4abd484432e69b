/*
 * test_core.c - the C core exercised through cbw.h alone, without Python.
 *
 * HARNESS
 * The program links csrc/cbw_*.c directly and plays the part of the cffi
 * bridge with a pure-C executor (the `ex` hooks below).  A job's callback
 * token is an opcode (enum op); the request blob carries the operation's
 * argument where it needs one (milliseconds to sleep, close flags).  The
 * executor counts every hook call, so the tests can check the hook protocol
 * (thread_enter/exit and session_begin/end balance, run only inside a
 * session), and its interrupt hook marks the slot's running job by turning
 * slot->exec_job negative with a compare-and-swap, so a late interrupt can
 * never land on the next job of the same slot.  `token_hooks` adds the
 * callback-lifetime hooks (retain/release/finalize) over a small registry
 * guarded by its own mutex, the way the cffi bridge keeps callables alive.
 *
 * Every test is one function, run in order by main(), reported TAP style
 * ("ok N - name").  CHECK records a failure (with file:line) and goes on;
 * REQUIRE stops the program, for states a test cannot clean up after (a
 * hung thread).  After each test, run_test() waits until the core's live
 * allocations are back where they were before it, so every test is also a
 * leak check (jobs kept by cbw_run_keep_alive are, by design, never freed;
 * kept_blocks accounts for them).  Waits use finite timeouts, and a SIGALRM
 * watchdog bounds the whole run, so a hang in the core is reported rather
 * than endured; an abort() in the core names the test that was running.
 *
 * CBW_STRESS_ITERS sets the jobs per client thread of the stress test.
 * Build: cc -std=gnu11 -Wall -Wextra -Werror -D_GNU_SOURCE -pthread -Icsrc
 *        tests/c/test_core.c csrc/cbw_*.c
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cbw.h"

#define WAIT_MS 10000           /* a job that should finish does so by then */
#define SETTLE_MS 5000          /* detached threads leave within this */
#define WATCHDOG_S 250
#define LOG_MAX 4096
#define ROUTES_MAX 8
#define GROW_FACTOR 3

/* ---- checks ------------------------------------------------------------ */

static int failures;
static const char *current_test = "startup";

static void fail_at(const char *file, int line, const char *what)
{
    if (__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST) <= 50)
        fprintf(stdout, "# %s:%d: check failed: %s\n", file, line, what);
}

static void fail_eq(const char *file, int line, const char *a, const char *b,
                    long long va, long long vb)
{
    char buf[512];
    snprintf(buf, sizeof(buf), "%s == %s (%lld != %lld)", a, b, va, vb);
    fail_at(file, line, buf);
}

#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond))                                                        \
            fail_at(__FILE__, __LINE__, #cond);                             \
    } while (0)

#define CHECK_EQ(a, b)                                                      \
    do {                                                                    \
        long long a_ = (long long)(a), b_ = (long long)(b);                 \
        if (a_ != b_)                                                       \
            fail_eq(__FILE__, __LINE__, #a, #b, a_, b_);                    \
    } while (0)

#define REQUIRE(cond)                                                       \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fail_at(__FILE__, __LINE__, #cond);                             \
            printf("Bail out! %s cannot continue\n", current_test);         \
            fflush(stdout);                                                 \
            _exit(1);                                                       \
        }                                                                   \
    } while (0)

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define INC(p) __atomic_add_fetch((p), 1, __ATOMIC_SEQ_CST)
#define DEC(p) __atomic_sub_fetch((p), 1, __ATOMIC_SEQ_CST)

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* True once expr holds; false if it still does not after ms milliseconds. */
#define EVENTUALLY(expr, ms)                                                \
    ({                                                                      \
        int64_t until_ = now_ms() + (ms);                                   \
        int ok_;                                                            \
        while (!(ok_ = !!(expr)) && now_ms() < until_)                      \
            sleep_ms(1);                                                    \
        ok_;                                                                \
    })

/* ---- the executor ------------------------------------------------------ */

enum op {
    OP_ZERO,      /* token 0: an echo (test_callback_token_zero_is_ordinary) */
    OP_ECHO,      /* the request is the response */
    OP_UPPER,     /* uppercase the request in place */
    OP_FAIL,      /* cbw_run_set_error, then fail */
    OP_SLEEP,     /* sleep <request> ms, ignoring interrupts */
    OP_GROW,      /* respond with the request GROW_FACTOR times, plus '!' */
    OP_BUSY,      /* spin until interrupted; <request> ms naps between looks */
    OP_BLOCK,     /* wait for ex.gate, ignoring interrupts */
    OP_LOG,       /* append the job id to ex.log */
    OP_TRACK,     /* count concurrent runs per route, sleep <request> ms */
    OP_CLOSE,     /* cbw_worker_close(flags = <request>) from the callback */
    OP_WAIT_SELF, /* cbw_wait on the job itself */
    OP_WAIT_NEXT, /* cbw_wait on the job with the next id */
    OP_KEEP,      /* cbw_run_keep_alive, remember the request's address */
    OP_SCRIBBLE,  /* uppercase the request in place; fail unless it already was */
    OP_SUSPEND,   /* "s<ms>": suspend, replay with "r<ms>" (woken, or after <ms>) */
    OP_KEEP_GROW, /* attempt 1 fails; later ones OP_KEEP, then OP_GROW */
    OP_KEEP_SUSPEND, /* cbw_run_keep_alive, then OP_SUSPEND */
    OP_COUNT      /* stress: count runs by id, track routes; '!' fails, '~' naps */
};

typedef struct executor {
    cbw_worker *worker;
    int gate;
    int64_t log[LOG_MAX];
    int log_len;
    int active[ROUTES_MAX + 1], max_active[ROUTES_MAX + 1];
    int hook_rc, hook_done;
    int interrupts, interrupted_runs, bailouts, blocks_returned, sleeps_done;
    int grow_enomem;
    int threads_entered, threads_exited, sessions_begun, sessions_ended;
    int bad_calls;
    int *ran;          /* OP_COUNT runs by job id, when set */
    int64_t ran_cap;
    /* The retain/release hooks' registry, guarded by tokens_mu. */
    int retained[OP_COUNT + 2]; /* by token: retained, not yet collected */
    int retains[OP_COUNT + 2], collected[OP_COUNT + 2];
    int releases, finalized, refuse_token;
} executor;

static pthread_mutex_t tokens_mu = PTHREAD_MUTEX_INITIALIZER;

static executor ex;

/* What OP_KEEP kept, and the core blocks such jobs hold forever.  The runs
 * (each at the start of its job record) stay referenced here, as a real
 * executor's views reference them, so LeakSanitizer sees them reachable. */
static const unsigned char *kept_view;
static size_t kept_size;
static int64_t kept_blocks;
static const cbw_run *kept_runs[16];
static int kept_runs_len;

static void ex_thread_enter(void *ctx, cbw_slot *slot)
{
    (void)slot;
    INC(&((executor *)ctx)->threads_entered);
}

static void ex_thread_exit(void *ctx, cbw_slot *slot)
{
    CHECK_EQ(slot->exec_flags, 0);
    INC(&((executor *)ctx)->threads_exited);
}

static void ex_session_begin(void *ctx, cbw_slot *slot)
{
    CHECK_EQ(slot->exec_flags, 0);
    slot->exec_flags = 1;
    INC(&((executor *)ctx)->sessions_begun);
}

static void ex_session_end(void *ctx, cbw_slot *slot)
{
    CHECK_EQ(slot->exec_flags, 1);
    slot->exec_flags = 0;
    INC(&((executor *)ctx)->sessions_ended);
}

static void ex_interrupt(void *ctx, cbw_slot *slot, int64_t job_id)
{
    int64_t expected = job_id;
    INC(&((executor *)ctx)->interrupts);
    __atomic_compare_exchange_n(&slot->exec_job, &expected, -job_id, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static int64_t request_number(const cbw_run *run)
{
    int64_t n = 0;
    size_t i;
    for (i = 0; i < run->size && isdigit(run->data[i]); i++)
        n = n * 10 + (run->data[i] - '0');
    return n;
}

static void route_enter(executor *x, int32_t route)
{
    int now, max;
    if (route < 0 || route > ROUTES_MAX)
        route = 0;
    now = INC(&x->active[route]);
    max = LOAD(&x->max_active[route]);
    while (now > max &&
           !__atomic_compare_exchange_n(&x->max_active[route], &max, now, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

static void route_leave(executor *x, int32_t route)
{
    DEC(&x->active[route < 0 || route > ROUTES_MAX ? 0 : route]);
}

/* Calls that may only fail for lack of memory. */
static void expect_ok_or_enomem(executor *x, int rc)
{
    if (rc != CBW_OK && rc != CBW_ENOMEM)
        INC(&x->bad_calls);
}

static int op_fail(executor *x, cbw_run *run)
{
    expect_ok_or_enomem(x, cbw_run_set_error(run, "deliberate failure"));
    return CBW_STATUS_ERROR;
}

static int op_grow(executor *x, cbw_run *run)
{
    size_t n = run->size * GROW_FACTOR + 1, i;
    char *buf = malloc(n);
    int rc;
    if (buf == NULL)
        abort();
    for (i = 0; i < GROW_FACTOR; i++)
        memcpy(buf + i * run->size, run->data, run->size);
    buf[n - 1] = '!';
    rc = cbw_run_set_result(run, buf, n);
    free(buf);
    expect_ok_or_enomem(x, rc);
    if (rc == CBW_OK)
        return CBW_STATUS_OK;
    INC(&x->grow_enomem);
    return op_fail(x, run);
}

static int op_busy(executor *x, cbw_slot *slot, cbw_run *run)
{
    int64_t give_up = now_ms() + WAIT_MS;
    while (LOAD(&slot->exec_job) != -run->id) {
        if (now_ms() > give_up) {
            INC(&x->bailouts);
            return CBW_STATUS_ERROR;
        }
        if (request_number(run) > 0)
            sleep_ms(request_number(run));
        else
            sched_yield();
    }
    INC(&x->interrupted_runs);
    return CBW_STATUS_OK;
}

static int op_block(executor *x)
{
    int64_t give_up = now_ms() + 2 * WAIT_MS;
    while (!LOAD(&x->gate)) {
        if (now_ms() > give_up) {
            INC(&x->bailouts);
            break;
        }
        sleep_ms(1);
    }
    INC(&x->blocks_returned);
    return CBW_STATUS_OK;
}

static int op_log(executor *x, cbw_run *run)
{
    int i = INC(&x->log_len) - 1;
    if (i < LOG_MAX)
        STORE(&x->log[i], run->id);
    return CBW_STATUS_OK;
}

static int op_track(executor *x, cbw_run *run)
{
    route_enter(x, run->route);
    sleep_ms(request_number(run));
    route_leave(x, run->route);
    return CBW_STATUS_OK;
}

static int op_wait(executor *x, int64_t id)
{
    cbw_result res;
    int rc = cbw_wait(LOAD(&x->worker), id, CBW_TIMEOUT_INFINITE, &res);
    if (rc == CBW_OK)
        cbw_result_release(&res);
    STORE(&x->hook_rc, rc);
    STORE(&x->hook_done, 1);
    return CBW_STATUS_OK;
}

static int op_close(executor *x, cbw_run *run)
{
    int rc = cbw_worker_close(LOAD(&x->worker), (int)request_number(run), 0);
    STORE(&x->hook_rc, rc);
    STORE(&x->hook_done, 1);
    return CBW_STATUS_OK;
}

static int op_keep(executor *x, cbw_run *run)
{
    if (cbw_run_keep_alive(run) != CBW_OK)
        INC(&x->bad_calls);
    STORE(&kept_size, run->size);
    STORE(&kept_view, run->data);
    STORE(&kept_runs[(INC(&kept_runs_len) - 1) % 16], run);
    return CBW_STATUS_OK;
}

/* What OP_KEEP_GROW saw as its request (kept_view must still read it). */
static char kept_request[32];

static int op_keep_grow(executor *x, cbw_run *run)
{
    if (run->attempt == 1)
        return op_fail(x, run);
    if (run->size >= sizeof(kept_request))
        return op_fail(x, run);
    memcpy(kept_request, run->data, run->size);
    op_keep(x, run);
    return op_grow(x, run); /* a longer response: a new buffer */
}

static int op_count(executor *x, cbw_run *run)
{
    int *ran = LOAD(&x->ran);
    if (ran != NULL && run->id > 0 && run->id <= LOAD(&x->ran_cap))
        INC(&ran[run->id]);
    route_enter(x, run->route);
    if (run->size > 0 && run->data[0] == '~')
        sleep_ms(1);
    route_leave(x, run->route);
    if (run->size > 0 && run->data[0] == '!')
        return op_fail(x, run);
    return CBW_STATUS_OK;
}

static int op_suspend(executor *x, cbw_run *run)
{
    char replay[32];
    size_t n = run->size < sizeof(replay) ? run->size : sizeof(replay) - 1;
    if (n == 0 || run->data[0] != 's')
        return CBW_STATUS_OK; /* the replay: the request is the response */
    memcpy(replay, run->data, n);
    replay[0] = 'r';
    replay[n] = '\0';
    memset(run->data, '?', run->size); /* the replay must not see this */
    if (cbw_run_suspend(run, replay, n, n > 1 ? atoi(replay + 1) : -1) != CBW_OK)
        INC(&x->bad_calls);
    return CBW_STATUS_ERROR; /* ignored: the job suspends */
}

static int dispatch(executor *x, cbw_slot *slot, cbw_run *run)
{
    size_t i;
    int status = CBW_STATUS_OK;
    switch (run->callback) {
    case OP_ZERO: case OP_ECHO: return CBW_STATUS_OK;
    case OP_UPPER:
        for (i = 0; i < run->size; i++)
            run->data[i] = (unsigned char)toupper(run->data[i]);
        return CBW_STATUS_OK;
    case OP_SCRIBBLE:
        for (i = 0; i < run->size; i++) {
            if (!isupper(run->data[i]))
                status = CBW_STATUS_ERROR;
            run->data[i] = (unsigned char)toupper(run->data[i]);
        }
        return status;
    case OP_FAIL: return op_fail(x, run);
    case OP_SUSPEND: return op_suspend(x, run);
    case OP_SLEEP:
        sleep_ms(request_number(run));
        INC(&x->sleeps_done);
        return CBW_STATUS_OK;
    case OP_GROW: return op_grow(x, run);
    case OP_BUSY: return op_busy(x, slot, run);
    case OP_BLOCK: return op_block(x);
    case OP_LOG: return op_log(x, run);
    case OP_TRACK: return op_track(x, run);
    case OP_CLOSE: return op_close(x, run);
    case OP_WAIT_SELF: return op_wait(x, run->id);
    case OP_WAIT_NEXT: return op_wait(x, run->id + 1);
    case OP_KEEP: return op_keep(x, run);
    case OP_KEEP_GROW: return op_keep_grow(x, run);
    case OP_KEEP_SUSPEND: op_keep(x, run); return op_suspend(x, run);
    case OP_COUNT: return op_count(x, run);
    default: INC(&x->bad_calls); return CBW_STATUS_ERROR;
    }
}

static int ex_run(void *ctx, cbw_slot *slot, cbw_run *run)
{
    executor *x = ctx;
    cbw_worker *w = LOAD(&x->worker);
    int status;
    CHECK_EQ(slot->exec_flags, 1); /* inside a session */
    CHECK(w == NULL || cbw_worker_is_own_thread(w));
    CHECK(run->attempt >= 1);
    STORE(&slot->exec_job, run->id);
    status = dispatch(x, slot, run);
    STORE(&slot->exec_job, 0);
    return status;
}

static int ex_retain(void *ctx, uint64_t callback)
{
    executor *x = ctx;
    if (callback > OP_COUNT || (int)callback == LOAD(&x->refuse_token))
        return CBW_ENOMEM;
    pthread_mutex_lock(&tokens_mu);
    x->retained[callback] = 1;
    x->retains[callback]++;
    pthread_mutex_unlock(&tokens_mu);
    return CBW_OK;
}

/* Collects the dead tokens under the registry's lock, as cbw.h asks. */
static void ex_release(void *ctx)
{
    executor *x = ctx;
    uint64_t dead[4];
    size_t n, i;
    INC(&x->releases);
    pthread_mutex_lock(&tokens_mu);
    do {
        n = cbw_tokens_collect(LOAD(&x->worker), dead, 4);
        for (i = 0; i < n; i++) {
            CHECK(dead[i] <= OP_COUNT && x->retained[dead[i]]);
            if (dead[i] <= OP_COUNT) {
                x->retained[dead[i]] = 0;
                x->collected[dead[i]]++;
            }
        }
    } while (n == 4);
    pthread_mutex_unlock(&tokens_mu);
}

static void ex_finalize(void *ctx)
{
    INC(&((executor *)ctx)->finalized);
}

static int registry_size(void)
{
    int i, n = 0;
    pthread_mutex_lock(&tokens_mu);
    for (i = 0; i <= OP_COUNT; i++)
        n += ex.retained[i];
    pthread_mutex_unlock(&tokens_mu);
    return n;
}

static const cbw_hooks token_hooks = {
    .ctx = &ex,
    .thread_enter = ex_thread_enter,
    .thread_exit = ex_thread_exit,
    .session_begin = ex_session_begin,
    .session_end = ex_session_end,
    .run = ex_run,
    .interrupt = ex_interrupt,
    .retain = ex_retain,
    .release = ex_release,
    .finalize = ex_finalize,
};

static const cbw_hooks hooks = {
    .ctx = &ex,
    .thread_enter = ex_thread_enter,
    .thread_exit = ex_thread_exit,
    .session_begin = ex_session_begin,
    .session_end = ex_session_end,
    .run = ex_run,
    .interrupt = ex_interrupt,
};

/* ---- helpers ----------------------------------------------------------- */

static cbw_worker *new_worker(int32_t concurrency)
{
    int err = 12345;
    cbw_worker *w = cbw_worker_new(&hooks, concurrency, &err);
    REQUIRE(w != NULL);
    CHECK_EQ(err, CBW_OK);
    STORE(&ex.worker, w);
    return w;
}

static int64_t start_text(cbw_worker *w, int32_t route, enum op op,
                          const char *text, int32_t timeout_ms)
{
    int64_t id = cbw_start(w, route, (uint64_t)op, text, strlen(text), timeout_ms);
    CHECK(id > 0);
    return id;
}

/* Waits for the job, checks its status (and response, if data != NULL) and
 * lets the result go. */
static void expect_result(cbw_worker *w, int64_t id, int status, const char *data)
{
    cbw_result res;
    int rc = cbw_wait(w, id, WAIT_MS, &res);
    CHECK_EQ(rc, CBW_OK);
    if (rc != CBW_OK)
        return;
    CHECK_EQ(res.id, id);
    CHECK_EQ(res.status, status);
    CHECK(res.error != NULL);
    if (data != NULL) {
        CHECK_EQ(res.size, strlen(data));
        CHECK(res.size == strlen(data) && memcmp(res.data, data, res.size) == 0);
    }
    cbw_result_release(&res);
}

static void open_gate(void) { STORE(&ex.gate, 1); }

static int route_running(cbw_worker *w, int32_t route)
{
    cbw_route_info info;
    return cbw_route_info_get(w, route, &info) == CBW_OK ? (int)info.running : -1;
}

static int log_index(int64_t id)
{
    int i, n = LOAD(&ex.log_len);
    for (i = 0; i < n && i < LOG_MAX; i++)
        if (LOAD(&ex.log[i]) == id)
            return i;
    return -1;
}

/* Joins t, failing the run if it does not end within ms. */
static void join_within(pthread_t t, int ms, void **ret)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    REQUIRE(pthread_timedjoin_np(t, ret, &ts) == 0);
}

/* Each route must still be able to run `width` jobs at once: no thread may
 * have been left asleep while work waits in its queue. */
static void check_route_width(cbw_worker *w, int32_t route, int width)
{
    int64_t ids[3];
    int i, running;
    STORE(&ex.gate, 0);
    for (i = 0; i < width; i++)
        ids[i] = start_text(w, route, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_running(w, route) == width, 2000));
    running = route_running(w, route);
    if (running != width)
        printf("# route %d runs %d of %d jobs at once\n", route, running, width);
    open_gate();
    for (i = 0; i < width; i++)
        expect_result(w, ids[i], CBW_STATUS_OK, "");
}

/* ---- basic verbs --------------------------------------------------------- */

static void test_start_wait_echo(void)
{
    cbw_worker *w = new_worker(1);
    cbw_result res;
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "hello", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait(w, id, CBW_TIMEOUT_INFINITE, &res), CBW_OK);
    CHECK_EQ(res.id, id);
    CHECK_EQ(res.status, CBW_STATUS_OK);
    CHECK_EQ(res.route, CBW_DEFAULT_ROUTE);
    CHECK_EQ(res.callback, OP_ECHO);
    CHECK(res.size == 5 && memcmp(res.data, "hello", 5) == 0);
    CHECK(res.error != NULL && res.error[0] == '\0');
    cbw_result_release(&res);
    cbw_result_release(&res); /* a second release is harmless */
    CHECK_EQ(cbw_worker_is_own_thread(w), 0);
    cbw_worker_release(w);
}

static void test_wait_complete_then_take(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result res;
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "abc", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.phase, CBW_PHASE_COMPLETED);
    CHECK_EQ(info.state, CBW_STATE_SUCCEEDED);
    CHECK_EQ(info.has_result, 1);
    CHECK_EQ(info.result_size, 3);
    CHECK_EQ(info.attempt, 1);
    CHECK_EQ(cbw_take(w, id, &res), CBW_OK);
    CHECK(res.size == 3 && memcmp(res.data, "ABC", 3) == 0);
    cbw_result_release(&res);
    CHECK_EQ(cbw_take(w, id, &res), CBW_EUNKNOWN);
    CHECK_EQ(cbw_wait(w, id, 0, &res), CBW_EUNKNOWN);
    CHECK_EQ(cbw_wait_complete(w, id, 0), CBW_EUNKNOWN);
    cbw_worker_release(w);
}

static void test_take_before_completion(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result res;
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_take(w, id, &res), CBW_ENOTDONE);
    CHECK(res.job_ == NULL);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK(info.phase != CBW_PHASE_COMPLETED);
    CHECK_EQ(info.has_result, 0);
    CHECK_EQ(cbw_job_error_text(w, id, NULL, 0), 0);
    open_gate();
    expect_result(w, id, CBW_STATUS_OK, "");
    cbw_worker_release(w);
}

static void test_unknown_ids(void)
{
    static const int64_t ids[] = {0, -1, 2, 999999, INT64_MAX};
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result res;
    char buf[8];
    size_t i;
    CHECK(start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", CBW_TIMEOUT_INFINITE) == 1);
    for (i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
        CHECK_EQ(cbw_take(w, ids[i], &res), CBW_EUNKNOWN);
        CHECK_EQ(cbw_wait(w, ids[i], 10, &res), CBW_EUNKNOWN);
        CHECK_EQ(cbw_wait_complete(w, ids[i], 10), CBW_EUNKNOWN);
        CHECK_EQ(cbw_cancel(w, ids[i], NULL), CBW_EUNKNOWN);
        CHECK_EQ(cbw_job_info_get(w, ids[i], &info), CBW_EUNKNOWN);
        CHECK_EQ(cbw_job_error_text(w, ids[i], buf, sizeof(buf)), CBW_EUNKNOWN);
    }
    cbw_worker_release(w);
}

static void test_ids_strictly_increase_never_reused(void)
{
    cbw_worker *w = new_worker(2);
    cbw_job_info info;
    int64_t prev = 0, id;
    int i;
    for (i = 0; i < 200; i++) {
        id = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", CBW_TIMEOUT_INFINITE);
        CHECK(id > prev);
        if (i % 2 == 0)
            expect_result(w, id, CBW_STATUS_OK, "x"); /* frees the id */
        else
            CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
        prev = id;
    }
    CHECK_EQ(cbw_job_info_get(w, prev - 1, &info), CBW_EUNKNOWN);
    CHECK_EQ(cbw_job_info_get(w, prev, &info), CBW_OK);
    cbw_worker_release(w);
}

static void test_fifo_order_with_concurrency_one(void)
{
    cbw_worker *w = new_worker(1);
    int64_t gate_id, ids[64];
    int i;
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    for (i = 0; i < 64; i++)
        ids[i] = start_text(w, CBW_DEFAULT_ROUTE, OP_LOG, "", CBW_TIMEOUT_INFINITE);
    open_gate();
    expect_result(w, gate_id, CBW_STATUS_OK, "");
    for (i = 0; i < 64; i++)
        expect_result(w, ids[i], CBW_STATUS_OK, "");
    CHECK_EQ(LOAD(&ex.log_len), 64);
    for (i = 0; i < 64; i++)
        CHECK_EQ(LOAD(&ex.log[i]), ids[i]);
    cbw_worker_release(w);
}

static void test_cancel(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    uint64_t token = 0;
    char buf[128];
    int64_t running, queued;
    running = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    queued = start_text(w, CBW_DEFAULT_ROUTE, OP_LOG, "", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_cancel(w, queued, &token), 1);
    CHECK_EQ(token, OP_LOG);
    CHECK_EQ(cbw_job_info_get(w, queued, &info), CBW_OK);
    CHECK_EQ(info.phase, CBW_PHASE_COMPLETED);
    CHECK_EQ(info.status, CBW_STATUS_CANCELLED);
    CHECK_EQ(info.state, CBW_STATE_CANCELLED);
    CHECK(cbw_job_error_text(w, queued, buf, sizeof(buf)) > 0);
    CHECK_EQ(cbw_cancel(w, queued, NULL), 0);
    CHECK(EVENTUALLY(route_running(w, CBW_DEFAULT_ROUTE) == 1, WAIT_MS));
    CHECK_EQ(cbw_cancel(w, running, NULL), 0); /* running: too late */
    open_gate();
    expect_result(w, running, CBW_STATUS_OK, "");
    CHECK_EQ(cbw_cancel(w, running, NULL), CBW_EUNKNOWN); /* taken */
    expect_result(w, queued, CBW_STATUS_CANCELLED, NULL);
    CHECK_EQ(LOAD(&ex.log_len), 0); /* the cancelled job never ran */
    cbw_worker_release(w);
}

static void test_cancel_of_completed_job_returns_zero(void)
{
    cbw_worker *w = new_worker(1);
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_cancel(w, id, NULL), 0);
    expect_result(w, id, CBW_STATUS_OK, "x");
    cbw_worker_release(w);
}

static void test_failure_reports_error_text(void)
{
    static const char text[] = "deliberate failure";
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result res;
    cbw_run outside = {0};
    char buf[64], small[6];
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_FAIL, "x", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.status, CBW_STATUS_ERROR);
    CHECK_EQ(info.state, CBW_STATE_FAILED);
    CHECK_EQ(info.has_result, 0);
    CHECK_EQ(info.error_len, strlen(text));
    CHECK_EQ(cbw_job_error_text(w, id, buf, sizeof(buf)), (int)strlen(text));
    CHECK(strcmp(buf, text) == 0);
    CHECK_EQ(cbw_job_error_text(w, id, small, sizeof(small)), (int)strlen(text));
    CHECK(strcmp(small, "delib") == 0);
    CHECK_EQ(cbw_take(w, id, &res), CBW_OK);
    CHECK_EQ(res.status, CBW_STATUS_ERROR);
    CHECK(res.data == NULL && res.size == 0);
    CHECK(strcmp(res.error, text) == 0);
    cbw_result_release(&res);
    CHECK_EQ(cbw_run_set_error(&outside, "x"), CBW_EINVAL);
    CHECK_EQ(cbw_run_set_result(&outside, "x", 1), CBW_EINVAL);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    cbw_worker_release(w);
}

static void test_result_replacement_longer_than_request(void)
{
    static const char req[] = "0123456789abcdef";
    char want[sizeof(req) * GROW_FACTOR + 1];
    cbw_worker *w = new_worker(1);
    size_t n = strlen(req), i;
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_GROW, req, CBW_TIMEOUT_INFINITE);
    for (i = 0; i < GROW_FACTOR; i++)
        memcpy(want + i * n, req, n);
    want[GROW_FACTOR * n] = '!';
    want[GROW_FACTOR * n + 1] = '\0';
    expect_result(w, id, CBW_STATUS_OK, want);
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_GROW, "", CBW_TIMEOUT_INFINITE);
    expect_result(w, id, CBW_STATUS_OK, "!");
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    cbw_worker_release(w);
}

/* ---- run-time limits ------------------------------------------------------ */

static void test_timeout_wakes_waiter_at_deadline(void)
{
    cbw_worker *w = new_worker(1);
    char buf[128];
    cbw_result res;
    int64_t t0 = now_ms(), id, waited;
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_SLEEP, "300", 50);
    CHECK_EQ(cbw_wait(w, id, WAIT_MS, &res), CBW_OK);
    waited = now_ms() - t0;
    CHECK_EQ(res.status, CBW_STATUS_TIMEOUT);
    CHECK(res.data == NULL && res.size == 0);
    CHECK(res.error[0] != '\0');
    CHECK(waited >= 45);
    CHECK(waited < 250); /* the deadline woke it, not the callback's return */
    if (waited >= 250)
        printf("# waiter woke after %lld ms\n", (long long)waited);
    cbw_result_release(&res);
    CHECK_EQ(cbw_job_error_text(w, id, buf, sizeof(buf)), CBW_EUNKNOWN);
    cbw_worker_release(w);
}

static void test_timeout_interrupts_busy_callback(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_BUSY, "", 50);
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.status, CBW_STATUS_TIMEOUT);
    CHECK_EQ(info.state, CBW_STATE_TIMED_OUT);
    CHECK_EQ(info.timeout_ms, 50);
    CHECK_EQ(cbw_route_wait_drained(w, CBW_DEFAULT_ROUTE, WAIT_MS), 1);
    CHECK(LOAD(&ex.interrupts) >= 1);
    CHECK(EVENTUALLY(LOAD(&ex.interrupted_runs) == 1, WAIT_MS));
    expect_result(w, id, CBW_STATUS_TIMEOUT, NULL);
    cbw_worker_release(w);
}

static void test_stuck_thread_is_replaced_after_grace(void)
{
    cbw_worker *w = new_worker(1);
    cbw_route_info info;
    int64_t stuck, next;
    CHECK_EQ(cbw_worker_set_grace(w, -1), CBW_EINVAL);
    CHECK_EQ(cbw_worker_set_grace(w, 20), CBW_OK);
    stuck = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", 50);
    next = start_text(w, CBW_DEFAULT_ROUTE, OP_LOG, "", CBW_TIMEOUT_INFINITE);
    expect_result(w, next, CBW_STATUS_OK, "");
    CHECK_EQ(LOAD(&ex.blocks_returned), 0); /* ran before the stuck one returned */
    CHECK_EQ(log_index(next), 0);
    CHECK(LOAD(&ex.interrupts) >= 1);
    CHECK_EQ(cbw_route_info_get(w, CBW_DEFAULT_ROUTE, &info), CBW_OK);
    CHECK_EQ(info.threads, 1);
    CHECK_EQ(info.running, 0);
    expect_result(w, stuck, CBW_STATUS_TIMEOUT, NULL);
    open_gate();
    CHECK(EVENTUALLY(LOAD(&ex.blocks_returned) == 1, WAIT_MS));
    cbw_worker_release(w);
}

static void test_wait_timeout_leaves_job_intact(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result res;
    int64_t id, t0;
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    t0 = now_ms();
    CHECK_EQ(cbw_wait(w, id, 30, &res), CBW_ETIMEDOUT);
    CHECK(now_ms() - t0 >= 25);
    CHECK(res.job_ == NULL);
    CHECK_EQ(cbw_wait(w, id, 0, &res), CBW_ETIMEDOUT);
    CHECK_EQ(cbw_wait_complete(w, id, 10), 0);
    CHECK_EQ(cbw_wait(w, id, -2, &res), CBW_EINVAL);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK(info.phase != CBW_PHASE_COMPLETED);
    open_gate();
    expect_result(w, id, CBW_STATUS_OK, "");
    cbw_worker_release(w);
}

static void test_wait_copy_copies_small_responses(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result slow;
    char buf[4];
    int64_t small, large, failed, blocked;
    small = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "abcd", CBW_TIMEOUT_INFINITE);
    large = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "abcde", CBW_TIMEOUT_INFINITE);
    failed = start_text(w, CBW_DEFAULT_ROUTE, OP_FAIL, "", CBW_TIMEOUT_INFINITE);
    blocked = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait_copy(w, small, WAIT_MS, buf, sizeof(buf), &slow), 4);
    CHECK(memcmp(buf, "ABCD", 4) == 0 && slow.job_ == NULL);
    CHECK_EQ(cbw_job_info_get(w, small, &info), CBW_EUNKNOWN); /* destroyed */
    CHECK_EQ(cbw_wait_copy(w, large, WAIT_MS, buf, sizeof(buf), &slow), CBW_EMORE);
    CHECK(slow.id == large && slow.size == 5 && memcmp(slow.data, "ABCDE", 5) == 0);
    cbw_result_release(&slow);
    CHECK_EQ(cbw_wait_copy(w, failed, WAIT_MS, buf, sizeof(buf), &slow), CBW_EMORE);
    CHECK(slow.status == CBW_STATUS_ERROR && strcmp(slow.error, "deliberate failure") == 0);
    cbw_result_release(&slow);
    CHECK_EQ(cbw_wait_copy(w, blocked, 10, buf, sizeof(buf), &slow), CBW_ETIMEDOUT);
    CHECK_EQ(cbw_wait_copy(w, blocked, 10, buf, sizeof(buf), NULL), CBW_EINVAL);
    CHECK_EQ(cbw_wait_copy(w, small, 10, buf, sizeof(buf), &slow), CBW_EUNKNOWN);
    open_gate();
    CHECK_EQ(cbw_wait_copy(w, blocked, WAIT_MS, NULL, 0, &slow), 0);
    cbw_worker_release(w);
}

static void test_wait_many_stops_at_a_failure_or_a_failed_wait(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    cbw_result out[4];
    size_t done = 99;
    int64_t ids[4];
    ids[0] = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "ab", CBW_TIMEOUT_INFINITE);
    ids[1] = start_text(w, CBW_DEFAULT_ROUTE, OP_FAIL, "", CBW_TIMEOUT_INFINITE);
    ids[2] = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "cd", CBW_TIMEOUT_INFINITE);
    ids[3] = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    /* A failed job: detached, last of the results; the ones after it untouched. */
    CHECK_EQ(cbw_wait_many(w, ids, 4, WAIT_MS, out, &done), CBW_OK);
    CHECK_EQ(done, 2);
    CHECK(out[0].status == CBW_STATUS_OK && out[0].size == 2 && memcmp(out[0].data, "AB", 2) == 0);
    CHECK(out[1].status == CBW_STATUS_ERROR && strcmp(out[1].error, "deliberate failure") == 0);
    cbw_result_release_many(out, done);
    CHECK(out[0].job_ == NULL && out[1].job_ == NULL);
    CHECK_EQ(cbw_job_info_get(w, ids[0], &info), CBW_EUNKNOWN);
    CHECK_EQ(cbw_job_info_get(w, ids[2], &info), CBW_OK);
    /* A wait that times out: its error, for ids[done], which is untouched. */
    CHECK_EQ(cbw_wait_many(w, ids + 2, 2, 30, out, &done), CBW_ETIMEDOUT);
    CHECK_EQ(done, 1);
    CHECK(out[0].size == 2 && memcmp(out[0].data, "CD", 2) == 0);
    cbw_result_release_many(out, done);
    CHECK_EQ(cbw_job_info_get(w, ids[3], &info), CBW_OK);
    /* Unknown ids, arguments. */
    CHECK_EQ(cbw_wait_many(w, ids, 1, WAIT_MS, out, &done), CBW_EUNKNOWN);
    CHECK_EQ(done, 0);
    CHECK_EQ(cbw_wait_many(w, ids, 1, -2, out, &done), CBW_EINVAL);
    CHECK_EQ(cbw_wait_many(w, NULL, 1, WAIT_MS, out, &done), CBW_EINVAL);
    CHECK_EQ(cbw_wait_many(w, ids, 0, WAIT_MS, NULL, &done), CBW_OK);
    CHECK_EQ(cbw_wait_many(w, ids, 1, WAIT_MS, out, NULL), CBW_EINVAL);
    open_gate();
    CHECK_EQ(cbw_wait_many(w, ids + 3, 1, WAIT_MS, out, &done), CBW_OK);
    CHECK_EQ(done, 1);
    cbw_result_release_many(out, 1);
    cbw_result_release_many(out, 1); /* a second release is harmless */
    cbw_worker_release(w);
}

/* More jobs pass their deadline at once than the timer delivers in one go. */
static void test_timer_handles_many_simultaneous_deadlines(void)
{
    cbw_worker *w = new_worker(1);
    int32_t route = cbw_route_open(w, "many", 24, 30);
    int64_t ids[24];
    int i;
    for (i = 0; i < 24; i++)
        ids[i] = start_text(w, route, OP_BUSY, "1", CBW_TIMEOUT_ROUTE);
    for (i = 0; i < 24; i++)
        expect_result(w, ids[i], CBW_STATUS_TIMEOUT, NULL);
    CHECK_EQ(cbw_route_wait_drained(w, route, WAIT_MS), 1);
    CHECK(EVENTUALLY(LOAD(&ex.interrupted_runs) == 24, WAIT_MS)); /* some may be orphans */
    cbw_worker_release(w);
}

/* ---- the job table and job records ----------------------------------------- */

static void test_many_jobs_taken_in_random_order(void)
{
    enum { N = 3000 };
    static int64_t ids[N];
    cbw_worker *w = new_worker(2);
    cbw_job_info info;
    char text[24];
    uint64_t rng = 88172645463325252u;
    int i, j;
    int64_t t;
    for (i = 0; i < N; i++) {
        snprintf(text, sizeof(text), "%d", i);
        ids[i] = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, text, CBW_TIMEOUT_INFINITE);
    }
    CHECK_EQ(cbw_route_wait_drained(w, CBW_DEFAULT_ROUTE, WAIT_MS), 1);
    for (i = N - 1; i > 0; i--) { /* shuffle, remembering each id's text */
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        j = (int)(rng % (uint64_t)(i + 1));
        t = ids[i], ids[i] = ids[j], ids[j] = t;
    }
    for (i = 0; i < N; i++) {
        snprintf(text, sizeof(text), "%lld", (long long)(ids[i] - 1));
        expect_result(w, ids[i], CBW_STATUS_OK, text);
        if (i % 97 == 0 && i + 1 < N)
            CHECK_EQ(cbw_job_info_get(w, ids[i + 1], &info), CBW_OK);
    }
    for (i = 0; i < N; i += 7)
        CHECK_EQ(cbw_job_info_get(w, ids[i], &info), CBW_EUNKNOWN);
    cbw_worker_release(w);
}

static void test_keep_alive_keeps_the_request_valid(void)
{
    int64_t before = cbw_live_allocations(), id;
    cbw_worker *w = new_worker(1);
    cbw_run outside = {0};
    CHECK_EQ(cbw_run_keep_alive(&outside), CBW_EINVAL);
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_KEEP, "kept", CBW_TIMEOUT_INFINITE);
    expect_result(w, id, CBW_STATUS_OK, "kept");
    cbw_worker_release(w);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    CHECK(EVENTUALLY(cbw_live_allocations() == before + 1, SETTLE_MS));
    kept_blocks += cbw_live_allocations() - before; /* by design, forever */
    CHECK(LOAD(&kept_size) == 4 && memcmp(LOAD(&kept_view), "kept", 4) == 0);
}

/* A retried attempt's request lives in its own buffer: a response longer
 * than it must not free it under a view the executor kept. */
static void test_keep_alive_of_a_retried_request_survives_a_longer_response(void)
{
    int64_t before = cbw_live_allocations(), id;
    cbw_worker *w = new_worker(1);
    cbw_route_config cfg = {1, CBW_TIMEOUT_INFINITE, 1, 0, 0};
    int32_t route = cbw_route_open_config(w, "again", &cfg);
    id = start_text(w, route, OP_KEEP_GROW, "retried", CBW_TIMEOUT_ROUTE);
    expect_result(w, id, CBW_STATUS_OK, "retriedretriedretried!");
    cbw_worker_release(w);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    /* The job, its request and its response stay, by design. */
    CHECK(EVENTUALLY(cbw_live_allocations() == before + 3, SETTLE_MS));
    kept_blocks += cbw_live_allocations() - before;
    CHECK(LOAD(&kept_size) == 7 && memcmp(LOAD(&kept_view), "retried", 7) == 0);
    CHECK(strcmp(kept_request, "retried") == 0);
}

/* A suspension cannot replace a request a view was kept of: the job fails
 * and says why (it is not reported shut down while the worker is open). */
static void test_kept_suspension_fails_with_the_reason(void)
{
    int64_t before = cbw_live_allocations(), id;
    cbw_worker *w = new_worker(1);
    cbw_result res;
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_KEEP_SUSPEND, "s", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait(w, id, WAIT_MS, &res), CBW_OK);
    CHECK_EQ(res.status, CBW_STATUS_ERROR);
    CHECK(res.error != NULL && strstr(res.error, "kept a view of its request") != NULL);
    cbw_result_release(&res);
    cbw_worker_release(w);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    CHECK(EVENTUALLY(cbw_live_allocations() == before + 2, SETTLE_MS)); /* job, error */
    kept_blocks += cbw_live_allocations() - before;
}

/* A detached result holds the worker's memory: releasing it after the
 * worker is fine, and frees the worker then. */
static void test_result_released_after_its_worker(void)
{
    int err;
    cbw_worker *w = cbw_worker_new(&token_hooks, 1, &err);
    cbw_result res;
    int64_t id;
    REQUIRE(w != NULL);
    STORE(&ex.worker, w);
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_UPPER, "late", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait(w, id, WAIT_MS, &res), CBW_OK);
    cbw_worker_release(w);
    CHECK_EQ(LOAD(&ex.finalized), 0);
    CHECK(res.size == 4 && memcmp(res.data, "LATE", 4) == 0);
    CHECK(res.error != NULL && res.error[0] == '\0');
    cbw_result_release(&res);
    CHECK_EQ(LOAD(&ex.finalized), 1);
    cbw_result_release(&res); /* a second release is a no-op */
}

/* ---- close --------------------------------------------------------------- */

static void test_release_without_close_finishes_running_jobs(void)
{
    cbw_worker *w = new_worker(1);
    int i;
    start_text(w, CBW_DEFAULT_ROUTE, OP_SLEEP, "20", CBW_TIMEOUT_INFINITE);
    for (i = 0; i < 5; i++)
        start_text(w, CBW_DEFAULT_ROUTE, OP_LOG, "", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_running(w, CBW_DEFAULT_ROUTE) == 1, WAIT_MS));
    cbw_worker_release(w);
    CHECK_EQ(LOAD(&ex.sleeps_done), 1); /* joined, not abandoned */
    CHECK_EQ(LOAD(&ex.log_len), 0);     /* shut down, not run */
}


typedef struct waiter {
    cbw_worker *w;
    int64_t id;
    int ready, rc, status;
} waiter;

static void *waiter_main(void *arg)
{
    waiter *wt = arg;
    cbw_result res;
    STORE(&wt->ready, 1);
    wt->rc = cbw_wait(wt->w, wt->id, CBW_TIMEOUT_INFINITE, &res);
    wt->status = res.status;
    cbw_result_release(&res);
    return NULL;
}

static void *closer_main(void *arg)
{
    return (void *)(intptr_t)cbw_worker_close(arg, 0, 0);
}

static void check_verbs_after_close(cbw_worker *w, int64_t id)
{
    cbw_result res;
    cbw_job_info job;
    cbw_route_info route;
    size_t size = 1;
    int64_t ids[1];
    CHECK_EQ(cbw_start(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", 1, -1), CBW_ECLOSED);
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", &size, 1, -1, ids),
             CBW_ECLOSED);
    CHECK_EQ(cbw_wait(w, id, 0, &res), CBW_ECLOSED);
    CHECK_EQ(cbw_wait_complete(w, id, 0), CBW_ECLOSED);
    CHECK_EQ(cbw_take(w, id, &res), CBW_ECLOSED);
    CHECK_EQ(cbw_cancel(w, id, NULL), CBW_ECLOSED);
    CHECK_EQ(cbw_job_info_get(w, id, &job), CBW_ECLOSED);
    CHECK_EQ(cbw_job_error_text(w, id, NULL, 0), CBW_ECLOSED);
    CHECK_EQ(cbw_route_open(w, "late", 1, -1), CBW_ECLOSED);
    CHECK_EQ(cbw_route_find(w, "default"), CBW_ECLOSED);
    CHECK_EQ(cbw_route_close(w, CBW_DEFAULT_ROUTE), CBW_ECLOSED);
    CHECK_EQ(cbw_route_info_get(w, CBW_DEFAULT_ROUTE, &route), CBW_ECLOSED);
    CHECK_EQ(cbw_route_wait_drained(w, CBW_DEFAULT_ROUTE, 0), CBW_ECLOSED);
}

static void test_close_shuts_down_queue_and_wakes_waiters(void)
{
    cbw_worker *w = new_worker(1);
    waiter on_running = {w, 0, 0, 0, 0}, on_queued = {w, 0, 0, 0, 0};
    pthread_t t1, t2, closer, second_closer;
    void *close_rc;
    on_running.id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    on_queued.id = start_text(w, CBW_DEFAULT_ROUTE, OP_LOG, "", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_running(w, CBW_DEFAULT_ROUTE) == 1, WAIT_MS));
    REQUIRE(pthread_create(&t1, NULL, waiter_main, &on_running) == 0);
    REQUIRE(pthread_create(&t2, NULL, waiter_main, &on_queued) == 0);
    CHECK(EVENTUALLY(LOAD(&on_running.ready) && LOAD(&on_queued.ready), WAIT_MS));
    sleep_ms(200); /* let both block inside cbw_wait */
    REQUIRE(pthread_create(&closer, NULL, closer_main, w) == 0);
    join_within(t1, WAIT_MS, NULL); /* close is still joining the blocked job */
    join_within(t2, WAIT_MS, NULL);
    REQUIRE(pthread_create(&second_closer, NULL, closer_main, w) == 0);
    sleep_ms(20);
    CHECK_EQ(pthread_tryjoin_np(second_closer, NULL), EBUSY); /* waits for the first */
    CHECK_EQ(on_running.rc, CBW_ESHUTDOWN);
    CHECK_EQ(on_queued.rc, CBW_OK);
    CHECK_EQ(on_queued.status, CBW_STATUS_SHUTDOWN);
    open_gate();
    join_within(closer, WAIT_MS, &close_rc);
    CHECK_EQ((intptr_t)close_rc, CBW_OK);
    join_within(second_closer, WAIT_MS, &close_rc);
    CHECK_EQ((intptr_t)close_rc, CBW_OK);
    CHECK_EQ(LOAD(&ex.log_len), 0);
    check_verbs_after_close(w, on_running.id);
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK);
    CHECK_EQ(cbw_worker_close(w, CBW_CLOSE_DRAIN, 0), CBW_OK);
    cbw_worker_release(w);
}

static void test_close_drain_runs_queued_jobs(void)
{
    cbw_worker *w = new_worker(1);
    int32_t route = cbw_route_open(w, "wide", 2, CBW_TIMEOUT_INFINITE);
    int i;
    CHECK(route > 0);
    for (i = 0; i < 10; i++) {
        start_text(w, CBW_DEFAULT_ROUTE, OP_SLEEP, "3", CBW_TIMEOUT_INFINITE);
        start_text(w, route, OP_SLEEP, "3", CBW_TIMEOUT_INFINITE);
    }
    CHECK_EQ(cbw_worker_close(w, CBW_CLOSE_DRAIN, 0), CBW_OK);
    CHECK_EQ(LOAD(&ex.sleeps_done), 20);
    CHECK_EQ(cbw_start(w, route, OP_ECHO, "", 0, -1), CBW_ECLOSED);
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK);
    cbw_worker_release(w);
}

static void test_close_interrupt_abandons_stuck_threads(void)
{
    cbw_worker *w = new_worker(2);
    int64_t t0;
    start_text(w, CBW_DEFAULT_ROUTE, OP_BUSY, "", CBW_TIMEOUT_INFINITE);
    start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_running(w, CBW_DEFAULT_ROUTE) == 2, WAIT_MS));
    t0 = now_ms();
    CHECK_EQ(cbw_worker_close(w, CBW_CLOSE_INTERRUPT, 20), CBW_OK);
    CHECK(now_ms() - t0 < WAIT_MS / 2);
    CHECK(LOAD(&ex.interrupts) >= 2);
    CHECK_EQ(LOAD(&ex.blocks_returned), 0); /* abandoned, not joined */
    CHECK(EVENTUALLY(LOAD(&ex.interrupted_runs) == 1, WAIT_MS));
    cbw_worker_release(w);
    open_gate();
    CHECK(EVENTUALLY(LOAD(&ex.blocks_returned) == 1, WAIT_MS));
}

/* Starts an OP_CLOSE job with the given flags (after `first`, if it is not
 * OP_ECHO) and returns what close returned inside the callback. */
static int close_from_callback(cbw_worker *w, enum op first, const char *flags)
{
    if (first != OP_ECHO)
        start_text(w, CBW_DEFAULT_ROUTE, first, "", CBW_TIMEOUT_INFINITE);
    start_text(w, CBW_DEFAULT_ROUTE, OP_CLOSE, flags, CBW_TIMEOUT_INFINITE);
    REQUIRE(EVENTUALLY(LOAD(&ex.hook_done), WAIT_MS)); /* else: deadlock */
    STORE(&ex.hook_done, 0);
    return LOAD(&ex.hook_rc);
}

static void test_close_from_inside_callback(void)
{
    cbw_worker *w = new_worker(1);
    CHECK_EQ(close_from_callback(w, OP_ECHO, "0"), CBW_OK);
    check_verbs_after_close(w, 1);
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK);
    cbw_worker_release(w);
}

static void test_close_drain_from_inside_callback_is_deadlock(void)
{
    cbw_worker *w = new_worker(1);
    int64_t id;
    CHECK_EQ(close_from_callback(w, OP_ECHO, "1"), CBW_EDEADLOCK);
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "still open", CBW_TIMEOUT_INFINITE);
    expect_result(w, id, CBW_STATUS_OK, "still open");
    cbw_worker_release(w);
}

static void test_close_interrupt_from_inside_callback(void)
{
    cbw_worker *w = new_worker(2);
    CHECK_EQ(close_from_callback(w, OP_BLOCK, "2"), CBW_OK);
    open_gate();
    CHECK(EVENTUALLY(LOAD(&ex.blocks_returned) == 1, WAIT_MS));
    cbw_worker_release(w);
}

/* ---- waits from inside callbacks ----------------------------------------- */

static void test_wait_on_own_job_is_deadlock(void)
{
    cbw_worker *w = new_worker(1);
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_WAIT_SELF, "", CBW_TIMEOUT_INFINITE);
    expect_result(w, id, CBW_STATUS_OK, NULL);
    CHECK_EQ(LOAD(&ex.hook_done), 1);
    CHECK_EQ(LOAD(&ex.hook_rc), CBW_EDEADLOCK);
    cbw_worker_release(w);
}

static void test_wait_on_job_queued_behind_is_deadlock(void)
{
    cbw_worker *w = new_worker(1);
    int64_t gate_id, waiting, behind;
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    waiting = start_text(w, CBW_DEFAULT_ROUTE, OP_WAIT_NEXT, "", CBW_TIMEOUT_INFINITE);
    behind = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "b", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(behind, waiting + 1);
    open_gate();
    expect_result(w, gate_id, CBW_STATUS_OK, "");
    expect_result(w, waiting, CBW_STATUS_OK, "");
    expect_result(w, behind, CBW_STATUS_OK, "b");
    CHECK_EQ(LOAD(&ex.hook_done), 1);
    CHECK_EQ(LOAD(&ex.hook_rc), CBW_EDEADLOCK);
    cbw_worker_release(w);
}

/* ---- routes ---------------------------------------------------------------- */

static void test_route_open_validates(void)
{
    cbw_worker *w = new_worker(1);
    char long_name[CBW_ROUTE_NAME_MAX + 2];
    int32_t route = cbw_route_open(w, "fast", 2, 50);
    cbw_job_info info;
    int64_t id;
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    CHECK_EQ(route, 2);
    CHECK_EQ(cbw_route_open(w, "fast", 1, -1), CBW_EEXIST);
    CHECK_EQ(cbw_route_open(w, "zero", 0, -1), CBW_EINVAL);
    CHECK_EQ(cbw_route_open(w, "neg", -3, -1), CBW_EINVAL);
    CHECK_EQ(cbw_route_open(w, "", 1, -1), CBW_EINVAL);
    CHECK_EQ(cbw_route_open(w, long_name, 1, -1), CBW_EINVAL);
    CHECK_EQ(cbw_route_find(w, "fast"), route);
    CHECK_EQ(cbw_route_find(w, "default"), CBW_DEFAULT_ROUTE);
    CHECK_EQ(cbw_route_find(w, "nope"), CBW_ENOROUTE);
    CHECK_EQ(cbw_start(w, 99, OP_ECHO, "", 0, -1), CBW_ENOROUTE);
    id = start_text(w, route, OP_UPPER, "on fast", CBW_TIMEOUT_ROUTE);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.route, route);
    CHECK_EQ(info.timeout_ms, 50);
    expect_result(w, id, CBW_STATUS_OK, "ON FAST");
    cbw_worker_release(w);
}

static void check_route_info(cbw_worker *w, int32_t route, int state,
                             int64_t queued, int64_t running)
{
    cbw_route_info info;
    CHECK_EQ(cbw_route_info_get(w, route, &info), CBW_OK);
    CHECK_EQ(info.id, route);
    CHECK_EQ(info.state, state);
    CHECK_EQ(info.close_accepted, state == CBW_ROUTE_CLOSED);
    CHECK_EQ(info.concurrency, 2);
    CHECK_EQ(info.queued, queued);
    CHECK_EQ(info.running, running);
}

static void test_route_close_and_drain(void)
{
    cbw_worker *w = new_worker(1);
    cbw_route_info info;
    int32_t route = cbw_route_open(w, "pair", 2, CBW_TIMEOUT_INFINITE);
    int i;
    CHECK_EQ(cbw_route_info_get(w, 77, &info), CBW_ENOROUTE);
    for (i = 0; i < 5; i++)
        start_text(w, route, i < 2 ? OP_BLOCK : OP_LOG, "", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_running(w, route) == 2, WAIT_MS));
    check_route_info(w, route, CBW_ROUTE_OPEN, 3, 2);
    CHECK_EQ(cbw_route_close(w, route), 1);
    CHECK_EQ(cbw_route_close(w, route), 0);
    CHECK_EQ(cbw_route_close(w, 77), CBW_ENOROUTE);
    CHECK_EQ(cbw_start(w, route, OP_ECHO, "", 0, -1), CBW_EROUTECLOSED);
    check_route_info(w, route, CBW_ROUTE_CLOSED, 3, 2);
    CHECK_EQ(cbw_route_wait_drained(w, route, 20), 0);
    CHECK_EQ(cbw_route_wait_drained(w, CBW_DEFAULT_ROUTE, 0), 1);
    open_gate();
    CHECK_EQ(cbw_route_wait_drained(w, route, WAIT_MS), 1);
    check_route_info(w, route, CBW_ROUTE_CLOSED, 0, 0);
    CHECK_EQ(LOAD(&ex.log_len), 3);
    CHECK_EQ(cbw_route_info_get(w, route, &info), CBW_OK);
    CHECK_EQ(info.threads, 2);
    cbw_worker_release(w);
}

static void test_route_concurrency_is_a_ceiling(void)
{
    static const int32_t widths[] = {1, 3};
    cbw_worker *w = new_worker(1);
    int32_t routes[2] = {CBW_DEFAULT_ROUTE, cbw_route_open(w, "three", 3, -1)};
    int i, r;
    CHECK_EQ(routes[1], 2);
    for (i = 0; i < 40; i++)
        for (r = 0; r < 2; r++)
            start_text(w, routes[r], OP_TRACK, "2", CBW_TIMEOUT_INFINITE);
    for (r = 0; r < 2; r++) {
        CHECK_EQ(cbw_route_wait_drained(w, routes[r], WAIT_MS), 1);
        CHECK(LOAD(&ex.max_active[routes[r]]) >= 1);
        CHECK(LOAD(&ex.max_active[routes[r]]) <= widths[r]);
    }
    if (LOAD(&ex.max_active[2]) < 3)
        printf("# route 'three' peaked at %d concurrent runs\n", LOAD(&ex.max_active[2]));
    cbw_worker_release(w);
}

/* A producer starting small bursts and polling with take (so no waiter ends
 * the threads' coalescing early), then a check that the route still runs
 * as many jobs at once as its concurrency allows. */
static void test_route_keeps_its_concurrency_after_bursts(void)
{
    cbw_worker *w = new_worker(1);
    int32_t route = cbw_route_open(w, "three", 3, -1);
    cbw_result res;
    int64_t ids[8];
    int round, k, n;
    for (round = 0; round < 300; round++) {
        n = 1 + round % 7;
        for (k = 0; k < n; k++) {
            ids[k] = start_text(w, route, OP_ECHO, "", CBW_TIMEOUT_INFINITE);
            if (round % 3 == 0)
                usleep(30);
        }
        usleep((useconds_t)(round % 400));
        for (k = 0; k < n; k++) {
            int rc;
            while ((rc = cbw_take(w, ids[k], &res)) == CBW_ENOTDONE)
                usleep(50);
            CHECK_EQ(rc, CBW_OK);
            cbw_result_release(&res);
        }
    }
    check_route_width(w, route, 3);
    cbw_worker_release(w);
}

/* ---- start_many ----------------------------------------------------------- */

static void test_start_many_in_order(void)
{
    static const char data[] = "aabbbcccc";
    static const size_t sizes[] = {2, 3, 4};
    static const char *want[] = {"aa", "bbb", "cccc"};
    cbw_worker *w = new_worker(1);
    int64_t ids[3] = {0, 0, 0};
    int i;
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_LOG, data, sizes, 3, -1, ids), CBW_OK);
    for (i = 0; i < 3; i++) {
        CHECK(i == 0 || ids[i] == ids[i - 1] + 1);
        expect_result(w, ids[i], CBW_STATUS_OK, want[i]);
        CHECK_EQ(log_index(ids[i]), i);
    }
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_LOG, data, sizes, 0, -1, ids), CBW_OK);
    cbw_worker_release(w);
}

static void test_start_many_all_or_nothing(void)
{
    static const size_t sizes[] = {1, 1};
    cbw_worker *w = new_worker(1);
    int32_t route = cbw_route_open(w, "shut", 1, -1);
    int64_t ids[2] = {-7, -7}, next;
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_LOG, NULL, sizes, 2, -1, ids),
             CBW_EINVAL);
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_LOG, "ab", sizes, 2, -9, ids),
             CBW_EINVAL);
    CHECK_EQ(cbw_start_many(w, 42, OP_LOG, "ab", sizes, 2, -1, ids), CBW_ENOROUTE);
    CHECK_EQ(cbw_route_close(w, route), 1);
    CHECK_EQ(cbw_start_many(w, route, OP_LOG, "ab", sizes, 2, -1, ids), CBW_EROUTECLOSED);
    next = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "n", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(next, 1); /* no failed call consumed an id */
    expect_result(w, next, CBW_STATUS_OK, "n");
    CHECK_EQ(LOAD(&ex.log_len), 0);
    cbw_worker_release(w);
}

/* ---- callback tokens ------------------------------------------------------ */

/* cbw.h: "The core never interprets the token", so 0 is a token like any
 * other: it runs, it can be cancelled, close can shut it down. */
static void test_callback_token_zero_is_ordinary(void)
{
    cbw_worker *w = new_worker(1);
    int64_t ran, cancelled, gate_id;
    ran = start_text(w, CBW_DEFAULT_ROUTE, OP_ZERO, "zero", CBW_TIMEOUT_INFINITE);
    expect_result(w, ran, CBW_STATUS_OK, "zero");
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    cancelled = start_text(w, CBW_DEFAULT_ROUTE, OP_ZERO, "c", CBW_TIMEOUT_INFINITE);
    start_text(w, CBW_DEFAULT_ROUTE, OP_ZERO, "shut down", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_cancel(w, cancelled, NULL), 1);
    expect_result(w, cancelled, CBW_STATUS_CANCELLED, NULL);
    open_gate();
    expect_result(w, gate_id, CBW_STATUS_OK, "");
    cbw_worker_release(w);
}

static cbw_worker *new_token_worker(void)
{
    int err = 12345;
    cbw_worker *w = cbw_worker_new(&token_hooks, 1, &err);
    REQUIRE(w != NULL);
    STORE(&ex.worker, w);
    return w;
}

static void test_tokens_retained_once_and_collected_when_dead(void)
{
    cbw_worker *w = new_token_worker();
    int64_t ids[5];
    int i;
    ids[0] = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    for (i = 1; i < 5; i++)
        ids[i] = start_text(w, CBW_DEFAULT_ROUTE, i < 3 ? OP_ECHO : OP_UPPER, "t",
                            CBW_TIMEOUT_INFINITE);
    CHECK_EQ(ex.retains[OP_BLOCK] + ex.retains[OP_ECHO] + ex.retains[OP_UPPER], 3);
    CHECK_EQ(cbw_cancel(w, ids[2], NULL), 1); /* ECHO still has ids[1] */
    CHECK_EQ(registry_size(), 3);
    open_gate();
    for (i = 0; i < 5; i++)
        expect_result(w, ids[i], i == 2 ? CBW_STATUS_CANCELLED : CBW_STATUS_OK, NULL);
    CHECK(EVENTUALLY(registry_size() == 0, WAIT_MS));
    CHECK(LOAD(&ex.releases) >= 1);
    ids[0] = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "again", CBW_TIMEOUT_INFINITE);
    expect_result(w, ids[0], CBW_STATUS_OK, "again");
    pthread_mutex_lock(&tokens_mu);
    CHECK_EQ(ex.retains[OP_ECHO], 2);
    for (i = 0; i <= OP_COUNT; i++)
        CHECK(ex.collected[i] <= ex.retains[i]);
    pthread_mutex_unlock(&tokens_mu);
    CHECK_EQ(LOAD(&ex.finalized), 0);
    cbw_worker_release(w);
    CHECK(EVENTUALLY(LOAD(&ex.finalized) == 1, WAIT_MS));
    CHECK_EQ(registry_size(), 0);
}

static void test_refused_retain_fails_the_start(void)
{
    static const size_t sizes[] = {1, 1};
    cbw_worker *w = new_token_worker();
    int64_t ids[2], id;
    STORE(&ex.refuse_token, OP_LOG);
    CHECK_EQ(cbw_start(w, CBW_DEFAULT_ROUTE, OP_LOG, "x", 1, -1), CBW_ENOMEM);
    CHECK_EQ(cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_LOG, "xy", sizes, 2, -1, ids),
             CBW_ENOMEM);
    id = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "ok", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(id, 1);
    expect_result(w, id, CBW_STATUS_OK, "ok");
    CHECK_EQ(LOAD(&ex.log_len), 0);
    cbw_worker_release(w);
    CHECK(EVENTUALLY(LOAD(&ex.finalized) == 1, WAIT_MS));
    CHECK(EVENTUALLY(registry_size() == 0, WAIT_MS));
}

/* ---- allocation failures ------------------------------------------------- */

#define ALLOC_FAIL_MAX 160

static int ok_or_enomem(int64_t rc)
{
    return rc >= 0 || rc == CBW_ENOMEM;
}

/* Checks one job of the sequence: it must complete; a grown response may have
 * failed for lack of memory (then it is an ERROR). */
static void alloc_expect(cbw_worker *w, int64_t id, enum op op)
{
    cbw_result res;
    int rc = cbw_wait(w, id, WAIT_MS, &res);
    CHECK_EQ(rc, CBW_OK);
    if (rc != CBW_OK)
        return;
    if (op == OP_UPPER)
        CHECK(res.status == CBW_STATUS_OK && res.size == 3 && memcmp(res.data, "ABC", 3) == 0);
    else if (op == OP_GROW)
        CHECK((res.status == CBW_STATUS_OK && res.size == 3 * GROW_FACTOR + 1) ||
              res.status == CBW_STATUS_ERROR);
    else
        CHECK_EQ(res.status, CBW_STATUS_ERROR);
    cbw_result_release(&res);
}

/* Every verb of a typical life, tolerating CBW_ENOMEM anywhere; returns how
 * many calls reported it. */
static int alloc_sequence(int drain)
{
    static const size_t sizes[] = {3, 3, 3};
    int err = 0, enomem = 0;
    int64_t one, many[3], late;
    int32_t route;
    int rc, i;
    cbw_worker *w = cbw_worker_new(&hooks, 2, &err);
    if (w == NULL) {
        CHECK_EQ(err, CBW_ENOMEM);
        return 1;
    }
    STORE(&ex.worker, w);
    one = cbw_start(w, CBW_DEFAULT_ROUTE, OP_UPPER, "abc", 3, -1);
    rc = cbw_start_many(w, CBW_DEFAULT_ROUTE, OP_GROW, "abcdefghi", sizes, 3, 1000, many);
    route = cbw_route_open(w, "second", 2, 5000);
    late = route > 0 ? cbw_start(w, route, OP_FAIL, "x", 1, CBW_TIMEOUT_ROUTE) : route;
    CHECK(ok_or_enomem(one) && ok_or_enomem(rc) && ok_or_enomem(route) && ok_or_enomem(late));
    enomem = (one == CBW_ENOMEM) + (rc == CBW_ENOMEM) + (route == CBW_ENOMEM) +
             (late == CBW_ENOMEM);
    if (one > 0)
        alloc_expect(w, one, OP_UPPER);
    for (i = 0; rc == CBW_OK && i < 3; i++)
        alloc_expect(w, many[i], OP_GROW);
    if (late > 0)
        alloc_expect(w, late, OP_FAIL);
    for (i = 0; i < 4; i++) /* left for close to drain or shut down */
        CHECK(ok_or_enomem(cbw_start(w, CBW_DEFAULT_ROUTE, OP_GROW, "q", 1, -1)));
    CHECK_EQ(cbw_worker_close(w, drain ? CBW_CLOSE_DRAIN : 0, 0), CBW_OK);
    cbw_worker_release(w);
    return enomem;
}

static void test_allocation_failures_are_clean(void)
{
    int64_t n, base, leaked;
    int reported = 0, last_enomem = 0;
    for (n = 1; n <= ALLOC_FAIL_MAX; n++) {
        base = cbw_live_allocations();
        cbw_debug_fail_allocation(n);
        if (alloc_sequence((int)(n & 1)) > 0)
            last_enomem = (int)n;
        cbw_debug_fail_allocation(0);
        if (!EVENTUALLY(cbw_live_allocations() == base, 2000)) {
            leaked = cbw_live_allocations() - base;
            if (reported++ < 5)
                printf("# allocation %lld failing leaks %lld block(s)\n",
                       (long long)n, (long long)leaked);
            CHECK_EQ(leaked, 0);
        }
    }
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    CHECK(LOAD(&ex.grow_enomem) > 0); /* cbw_run_set_result was covered */
    CHECK(last_enomem < ALLOC_FAIL_MAX - 20); /* the loop outran the sequence */
    printf("# the last injected failure a verb reported was allocation %d\n", last_enomem);
}

/* ---- stress ---------------------------------------------------------------- */

#define STRESS_CLIENTS 4

typedef struct stress {
    cbw_worker *w;
    int32_t routes[2];
    int iters, total;
    int64_t *published;  /* ids in start order, for anyone to poke at */
    int npublished;
    int *cancelled, *taken, *outcome;
} stress;

typedef struct pending { int64_t id; int seq; } pending;

typedef struct client {
    stress *s;
    int index;
    uint64_t rng;
    pending *own;
    int nown;
} client;

static uint64_t next_random(client *c)
{
    c->rng ^= c->rng << 13;
    c->rng ^= c->rng >> 7;
    c->rng ^= c->rng << 17;
    return c->rng;
}

static void stress_request(const client *c, int seq, char *buf, size_t cap)
{
    snprintf(buf, cap, "%sc%d-%d", seq % 8 == 7 ? "!" : seq % 16 == 3 ? "~" : "", c->index,
             seq);
}

/* Checks one detached result against what was asked for and records it. */
static void stress_record(client *c, const pending *p, const cbw_result *res)
{
    stress *s = c->s;
    char want[64];
    stress_request(c, p->seq, want, sizeof(want));
    CHECK(res->id == p->id && p->id >= 1 && p->id <= s->total);
    if (p->id < 1 || p->id > s->total)
        return;
    INC(&s->taken[p->id]);
    STORE(&s->outcome[p->id], res->status);
    if (res->status == CBW_STATUS_OK)
        CHECK(want[0] != '!' && res->size == strlen(want) &&
              memcmp(res->data, want, res->size) == 0);
    else if (res->status == CBW_STATUS_ERROR)
        CHECK(want[0] == '!' && strcmp(res->error, "deliberate failure") == 0);
    else
        CHECK_EQ(res->status, CBW_STATUS_CANCELLED);
}

enum collect { BY_WAIT, BY_TAKE, BY_WAIT_COPY };

/* cbw_wait_copy into a buffer too small for some responses; a copied
 * response is presented as a result that owns nothing. */
static int64_t wait_copy(cbw_worker *w, int64_t id, int32_t timeout_ms,
                         char *buf, size_t cap, cbw_result *res)
{
    int64_t rc = cbw_wait_copy(w, id, timeout_ms, buf, cap, res);
    if (rc == CBW_EMORE)
        return CBW_OK;
    if (rc >= 0) {
        CHECK(res->job_ == NULL);
        res->id = id;
        res->status = CBW_STATUS_OK;
        res->data = (const unsigned char *)buf;
        res->size = (size_t)rc;
        res->error = "";
        return CBW_OK;
    }
    return rc;
}

/* Waits for, takes or copies one of the client's own jobs; returns 1 if it
 * went. */
static int stress_collect(client *c, int k, int32_t timeout_ms, enum collect how)
{
    cbw_result res;
    char buf[8];
    int64_t id = c->own[k].id, rc;
    if (how == BY_TAKE)
        rc = cbw_take(c->s->w, id, &res);
    else if (how == BY_WAIT_COPY)
        rc = wait_copy(c->s->w, id, timeout_ms, buf, sizeof(buf), &res);
    else
        rc = cbw_wait(c->s->w, id, timeout_ms, &res);
    if (rc != CBW_OK) {
        CHECK_EQ(rc, how == BY_TAKE ? CBW_ENOTDONE : CBW_ETIMEDOUT);
        return 0;
    }
    stress_record(c, &c->own[k], &res);
    cbw_result_release(&res);
    c->own[k] = c->own[--c->nown];
    return 1;
}

static void stress_start(client *c, int seq)
{
    stress *s = c->s;
    char req[64];
    int64_t id;
    int slot;
    stress_request(c, seq, req, sizeof(req));
    id = cbw_start(s->w, s->routes[seq % 2], OP_COUNT, req, strlen(req), -1);
    CHECK(id > 0);
    if (id <= 0)
        return;
    c->own[c->nown].id = id;
    c->own[c->nown++].seq = seq;
    slot = INC(&s->npublished) - 1;
    if (slot < s->total)
        STORE(&s->published[slot], id);
}

static int64_t random_published(client *c)
{
    int n = LOAD(&c->s->npublished);
    return n > 0 ? LOAD(&c->s->published[next_random(c) % (uint64_t)n]) : 0;
}

static void stress_poke(client *c)
{
    stress *s = c->s;
    cbw_job_info info;
    cbw_route_info rinfo;
    int64_t id = random_published(c);
    int rc;
    switch (next_random(c) % 8) {
    case 0: case 1:
        if (c->nown > 0 && id % 2 == 0)
            id = c->own[c->nown - 1].id; /* the newest is likelier queued */
        rc = cbw_cancel(s->w, id, NULL);
        CHECK(rc == 0 || rc == 1 || rc == CBW_EUNKNOWN || id == 0);
        if (rc == 1)
            INC(&s->cancelled[id]);
        break;
    case 2: case 3: case 4:
        if (c->nown > 0)
            stress_collect(c, (int)(next_random(c) % (uint64_t)c->nown),
                           (int32_t)(next_random(c) % 5) - 1,
                           (enum collect)(next_random(c) % 3));
        break;
    case 5:
        rc = cbw_job_info_get(s->w, id, &info);
        CHECK(rc == CBW_OK || rc == CBW_EUNKNOWN);
        CHECK_EQ(cbw_route_info_get(s->w, s->routes[id % 2], &rinfo), CBW_OK);
        break;
    default:
        break;
    }
}

static void *stress_client(void *arg)
{
    client *c = arg;
    int seq;
    for (seq = 0; seq < c->s->iters; seq++) {
        stress_start(c, seq);
        stress_poke(c);
    }
    while (c->nown > 0)
        CHECK(stress_collect(c, c->nown - 1, WAIT_MS, (enum collect)(c->nown % 2 * 2)));
    return NULL;
}

static void stress_verify(stress *s)
{
    int id, lost = 0, ncancelled = 0, max1 = LOAD(&ex.max_active[s->routes[0]]);
    int max3 = LOAD(&ex.max_active[s->routes[1]]);
    CHECK_EQ(LOAD(&s->npublished), s->total);
    for (id = 1; id <= s->total; id++) {
        int cancelled = LOAD(&s->cancelled[id]), ran = LOAD(&ex.ran[id]);
        int outcome = LOAD(&s->outcome[id]);
        lost += LOAD(&s->taken[id]) != 1;
        ncancelled += cancelled;
        CHECK(cancelled <= 1);
        CHECK_EQ(outcome == CBW_STATUS_CANCELLED, cancelled == 1);
        CHECK_EQ(ran, cancelled == 1 ? 0 : 1);
    }
    CHECK_EQ(lost, 0);
    CHECK(max1 == 1 && max3 >= 1 && max3 <= 3);
    printf("# stress: %d jobs, %d cancelled, at most %d at once on 'three'\n", s->total,
           ncancelled, max3);
}

static int stress_iters(void)
{
    const char *env = getenv("CBW_STRESS_ITERS");
    int n = env != NULL ? atoi(env) : 2000;
    return n > 0 ? n : 2000;
}

static void test_stress_every_job_accounted_once(void)
{
    stress s = {0};
    client clients[STRESS_CLIENTS];
    pthread_t threads[STRESS_CLIENTS];
    int i;
    s.iters = stress_iters();
    s.total = s.iters * STRESS_CLIENTS;
    s.w = new_worker(1);
    s.routes[0] = CBW_DEFAULT_ROUTE;
    s.routes[1] = cbw_route_open(s.w, "three", 3, -1);
    CHECK_EQ(s.routes[1], 2);
    s.published = calloc((size_t)s.total, sizeof(int64_t));
    s.cancelled = calloc((size_t)s.total + 1, sizeof(int));
    s.taken = calloc((size_t)s.total + 1, sizeof(int));
    s.outcome = calloc((size_t)s.total + 1, sizeof(int));
    ex.ran_cap = s.total;
    STORE(&ex.ran, calloc((size_t)s.total + 1, sizeof(int)));
    REQUIRE(s.published && s.cancelled && s.taken && s.outcome && ex.ran);
    for (i = 0; i < STRESS_CLIENTS; i++) {
        clients[i] = (client){&s, i, 0x9E3779B97F4A7C15u * (uint64_t)(i + 1), NULL, 0};
        clients[i].own = calloc((size_t)s.iters, sizeof(pending));
        REQUIRE(clients[i].own != NULL);
        REQUIRE(pthread_create(&threads[i], NULL, stress_client, &clients[i]) == 0);
    }
    for (i = 0; i < STRESS_CLIENTS; i++) {
        join_within(threads[i], 200000, NULL);
        free(clients[i].own);
    }
    stress_verify(&s);
    check_route_width(s.w, s.routes[1], 3);
    check_route_width(s.w, s.routes[0], 1);
    cbw_worker_release(s.w);
    free(s.published);
    free(s.cancelled);
    free(s.taken);
    free(s.outcome);
    free(ex.ran);
}

/* ---- completion reports and detached jobs ------------------------------- */

static struct {
    pthread_mutex_t mu;
    int64_t ids[64];
    int n;
    cbw_worker *w;
} reports = { PTHREAD_MUTEX_INITIALIZER, {0}, 0, NULL };

static void ex_completed(void *ctx)
{
    int64_t got[8];
    size_t n, i;
    (void)ctx;
    while ((n = cbw_completions_collect(reports.w, got, 8)) > 0) {
        pthread_mutex_lock(&reports.mu);
        for (i = 0; i < n && reports.n < 64; i++)
            reports.ids[reports.n++] = got[i];
        pthread_mutex_unlock(&reports.mu);
    }
}

static const cbw_hooks report_hooks = {
    .ctx = &ex,
    .thread_enter = ex_thread_enter,
    .thread_exit = ex_thread_exit,
    .session_begin = ex_session_begin,
    .session_end = ex_session_end,
    .run = ex_run,
    .interrupt = ex_interrupt,
    .completed = ex_completed,
};

static int reported(int64_t id)
{
    int i, found = 0;
    pthread_mutex_lock(&reports.mu);
    for (i = 0; i < reports.n; i++)
        found += reports.ids[i] == id;
    pthread_mutex_unlock(&reports.mu);
    return found;
}

static void test_watched_jobs_are_reported_once(void)
{
    int err;
    cbw_worker *w = cbw_worker_new(&report_hooks, 1, &err);
    int64_t done, watched, gate_id, queued, cancelled, shut;
    REQUIRE(w != NULL);
    reports.w = w;
    reports.n = 0;
    STORE(&ex.worker, w);
    done = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "a", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_wait_complete(w, done, WAIT_MS), 1);
    CHECK_EQ(cbw_job_watch(w, done), 1); /* completed already: no report */
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    watched = cbw_start_ex(w, CBW_DEFAULT_ROUTE, OP_ECHO, "b", 1, CBW_TIMEOUT_INFINITE,
                           CBW_JOB_NOTIFY, 0);
    queued = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "c", CBW_TIMEOUT_INFINITE);
    cancelled = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "d", CBW_TIMEOUT_INFINITE);
    shut = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "e", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_job_watch(w, queued), 0);
    CHECK_EQ(cbw_job_watch(w, queued), 0); /* one report serves both */
    CHECK_EQ(cbw_job_watch(w, cancelled), 0);
    CHECK_EQ(cbw_job_watch(w, shut), 0);
    CHECK_EQ(cbw_cancel(w, cancelled, NULL), 1);
    CHECK_EQ(reported(cancelled), 1);
    open_gate();
    expect_result(w, gate_id, CBW_STATUS_OK, "");
    CHECK_EQ(cbw_wait_complete(w, queued, WAIT_MS), 1);
    CHECK(EVENTUALLY(reported(watched) == 1 && reported(queued) == 1, 2000));
    expect_result(w, watched, CBW_STATUS_OK, "b");
    expect_result(w, queued, CBW_STATUS_OK, "c");
    expect_result(w, cancelled, CBW_STATUS_CANCELLED, NULL);
    CHECK_EQ(cbw_job_watch(w, 999999), CBW_EUNKNOWN);
    STORE(&ex.gate, 0);
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    shut = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "f", CBW_TIMEOUT_INFINITE);
    CHECK_EQ(cbw_job_watch(w, shut), 0);
    open_gate();
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK);
    CHECK_EQ(reported(shut), 1); /* shut down, or ran before close: reported */
    CHECK_EQ(reported(done), 0);
    cbw_worker_release(w);
    reports.w = NULL;
}

static void test_detached_jobs_leave_the_table(void)
{
    cbw_worker *w = new_worker(1);
    cbw_result res;
    int64_t gate_id, id, queued;
    id = cbw_start_ex(w, CBW_DEFAULT_ROUTE, OP_ECHO, "x", 1, CBW_TIMEOUT_INFINITE,
                      CBW_JOB_DETACHED, 0);
    CHECK(id > 0);
    CHECK(EVENTUALLY(cbw_take(w, id, &res) == CBW_EUNKNOWN, 2000));
    gate_id = start_text(w, CBW_DEFAULT_ROUTE, OP_BLOCK, "", CBW_TIMEOUT_INFINITE);
    queued = cbw_start_ex(w, CBW_DEFAULT_ROUTE, OP_ECHO, "y", 1, CBW_TIMEOUT_INFINITE,
                          CBW_JOB_DETACHED, 0);
    CHECK_EQ(cbw_cancel(w, queued, NULL), 1);
    CHECK_EQ(cbw_take(w, queued, &res), CBW_EUNKNOWN); /* gone once cancelled */
    CHECK_EQ(cbw_start_ex(w, CBW_DEFAULT_ROUTE, OP_ECHO, "z", 1, CBW_TIMEOUT_INFINITE, 64, 0),
             CBW_EINVAL);
    open_gate();
    expect_result(w, gate_id, CBW_STATUS_OK, "");
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK);
    cbw_worker_release(w);
}

static struct { cbw_worker *w; int closed; } timer_closer;

static void close_from_timer_hook(void *ctx)
{
    int64_t got[8];
    (void)ctx;
    while (cbw_completions_collect(timer_closer.w, got, 8) > 0)
        ;
    if (!LOAD(&timer_closer.closed)) {
        CHECK_EQ(cbw_worker_close(timer_closer.w, 0, 0), CBW_OK);
        cbw_worker_release(timer_closer.w); /* the timer keeps it alive */
        STORE(&timer_closer.closed, 1);
    }
}

static const cbw_hooks timer_close_hooks = {
    .ctx = &ex,
    .thread_enter = ex_thread_enter,
    .thread_exit = ex_thread_exit,
    .session_begin = ex_session_begin,
    .session_end = ex_session_end,
    .run = ex_run,
    .interrupt = ex_interrupt,
    .completed = close_from_timer_hook,
};

/* A completion report for a job that timed out runs on the timer thread;
 * closing and releasing the worker there must neither abort (the timer
 * cannot join itself) nor free the worker under the timer. */
static void test_close_and_release_from_a_hook_on_the_timer(void)
{
    int err;
    int64_t id;
    cbw_worker *w = cbw_worker_new(&timer_close_hooks, 1, &err);
    REQUIRE(w != NULL);
    timer_closer.w = w;
    STORE(&timer_closer.closed, 0);
    id = cbw_start_ex(w, CBW_DEFAULT_ROUTE, OP_SLEEP, "150", 3, 20, CBW_JOB_NOTIFY, 0);
    CHECK(id > 0);
    CHECK(EVENTUALLY(LOAD(&timer_closer.closed), 5000));
}

static void test_no_allocations_left(void)
{
    CHECK_EQ(cbw_live_allocations(), kept_blocks);
}

/* ---- route schedules: retries and delay between starts --------------------- */

static int64_t route_delayed(cbw_worker *w, int32_t route)
{
    cbw_route_info info;
    return cbw_route_info_get(w, route, &info) == CBW_OK ? info.delayed : -1;
}

static uint32_t job_attempt(cbw_worker *w, int64_t id)
{
    cbw_job_info info;
    return cbw_job_info_get(w, id, &info) == CBW_OK ? info.attempt : 0;
}

static cbw_worker *manual_clock_worker(void)
{
    cbw_worker *w = new_worker(1);
    CHECK_EQ(cbw_worker_advance_clock(w, 1), CBW_EINVAL); /* not manual yet */
    CHECK_EQ(cbw_worker_use_manual_clock(w), CBW_OK);
    CHECK_EQ(cbw_worker_advance_clock(w, -1), CBW_EINVAL);
    return w;
}

static void test_retries_back_off_exponentially(void)
{
    cbw_worker *w = manual_clock_worker();
    cbw_route_config cfg = {1, CBW_TIMEOUT_INFINITE, 2, 100, 0};
    cbw_job_info info;
    int32_t route = cbw_route_open_config(w, "retry", &cfg);
    int64_t id = start_text(w, route, OP_FAIL, "x", CBW_TIMEOUT_ROUTE);
    CHECK_EQ(cbw_worker_use_manual_clock(w), CBW_EINVAL); /* jobs exist */
    /* Attempt 1 fails: the job waits 100 ms, still queued to the caller. */
    CHECK(EVENTUALLY(route_delayed(w, route) == 1, WAIT_MS));
    CHECK_EQ(job_attempt(w, id), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.state, CBW_STATE_QUEUED);
    CHECK_EQ(info.status, CBW_STATUS_PENDING);
    CHECK_EQ(info.error_len, 0);
    CHECK_EQ(cbw_worker_advance_clock(w, 99), CBW_OK);
    CHECK_EQ(route_delayed(w, route), 1);
    CHECK_EQ(cbw_worker_advance_clock(w, 1), CBW_OK);
    /* Attempt 2 fails: now 200 ms. */
    CHECK(EVENTUALLY(job_attempt(w, id) == 2 && route_delayed(w, route) == 1, WAIT_MS));
    CHECK_EQ(cbw_worker_advance_clock(w, 199), CBW_OK);
    CHECK_EQ(route_delayed(w, route), 1);
    CHECK_EQ(cbw_wait_complete(w, id, 0), 0);
    CHECK_EQ(cbw_worker_advance_clock(w, 1), CBW_OK);
    /* Attempt 3 is the last: max_retries = 2. */
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.attempt, 3);
    CHECK_EQ(info.state, CBW_STATE_FAILED);
    CHECK_EQ(route_delayed(w, route), 0);
    CHECK_EQ(cbw_route_wait_drained(w, route, 0), 1);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    cbw_worker_release(w);
}

static void test_retry_restores_the_original_request(void)
{
    cbw_worker *w = new_worker(1);
    cbw_route_config cfg = {1, CBW_TIMEOUT_INFINITE, 3, 0, 0};
    int32_t route = cbw_route_open_config(w, "again", &cfg);
    /* OP_SCRIBBLE edits its request and fails unless it was uppercase
     * already: each attempt sees the request as it was started, so every
     * one fails, four runs in all. */
    int64_t id = start_text(w, route, OP_SCRIBBLE, "abc", CBW_TIMEOUT_ROUTE);
    cbw_job_info info;
    CHECK_EQ(cbw_wait_complete(w, id, WAIT_MS), 1);
    CHECK_EQ(cbw_job_info_get(w, id, &info), CBW_OK);
    CHECK_EQ(info.attempt, 4);
    CHECK_EQ(info.state, CBW_STATE_FAILED);
    id = start_text(w, route, OP_UPPER, "abc", CBW_TIMEOUT_ROUTE);
    expect_result(w, id, CBW_STATUS_OK, "ABC");
    cbw_worker_release(w);
}

static void test_cancel_and_close_reach_waiting_retries(void)
{
    cbw_worker *w = manual_clock_worker();
    cbw_route_config cfg = {1, CBW_TIMEOUT_INFINITE, 5, 1000, 0};
    cbw_job_info info;
    cbw_result res;
    int32_t route = cbw_route_open_config(w, "doomed", &cfg);
    int64_t a = start_text(w, route, OP_FAIL, "a", CBW_TIMEOUT_ROUTE);
    int64_t b = start_text(w, route, OP_FAIL, "b", CBW_TIMEOUT_ROUTE);
    CHECK(EVENTUALLY(route_delayed(w, route) == 2, WAIT_MS));
    CHECK_EQ(cbw_cancel(w, a, NULL), 1);
    CHECK_EQ(cbw_job_info_get(w, a, &info), CBW_OK);
    CHECK_EQ(info.state, CBW_STATE_CANCELLED);
    CHECK_EQ(route_delayed(w, route), 1);
    CHECK_EQ(cbw_cancel(w, a, NULL), 0);
    CHECK_EQ(cbw_take(w, a, &res), CBW_OK);
    cbw_result_release(&res);
    CHECK_EQ(cbw_worker_close(w, 0, 0), CBW_OK); /* b completes SHUTDOWN */
    cbw_worker_release(w);
    (void)b;
}

static void test_delay_spaces_consecutive_starts(void)
{
    cbw_worker *w = manual_clock_worker();
    cbw_route_config cfg = {2, CBW_TIMEOUT_INFINITE, 0, 0, 50};
    cbw_route_info info;
    int32_t route = cbw_route_open_config(w, "paced", &cfg);
    int i;
    STORE(&ex.log_len, 0);
    for (i = 0; i < 3; i++)
        start_text(w, route, OP_LOG, "", CBW_TIMEOUT_ROUTE);
    CHECK(EVENTUALLY(LOAD(&ex.log_len) == 1, WAIT_MS));
    CHECK_EQ(cbw_route_info_get(w, route, &info), CBW_OK);
    CHECK_EQ(info.delay_ms, 50);
    CHECK_EQ(cbw_worker_advance_clock(w, 49), CBW_OK);
    sleep_ms(30); /* two idle threads had every chance to start one */
    CHECK_EQ(LOAD(&ex.log_len), 1);
    CHECK_EQ(cbw_worker_advance_clock(w, 1), CBW_OK);
    CHECK(EVENTUALLY(LOAD(&ex.log_len) == 2, WAIT_MS));
    sleep_ms(30);
    CHECK_EQ(LOAD(&ex.log_len), 2);
    CHECK_EQ(cbw_worker_advance_clock(w, 50), CBW_OK);
    CHECK_EQ(cbw_route_wait_drained(w, route, WAIT_MS), 1);
    CHECK_EQ(LOAD(&ex.log_len), 3);
    cbw_worker_release(w);
}

static int job_state(cbw_worker *w, int64_t id)
{
    cbw_job_info info;
    return cbw_job_info_get(w, id, &info) == CBW_OK ? info.state : -1;
}

static void test_suspended_job_replays_when_woken(void)
{
    cbw_worker *w = manual_clock_worker();
    cbw_run outside = {0};
    int64_t id = start_text(w, CBW_DEFAULT_ROUTE, OP_SUSPEND, "s", CBW_TIMEOUT_INFINITE);
    int64_t timed = start_text(w, CBW_DEFAULT_ROUTE, OP_SUSPEND, "s250", CBW_TIMEOUT_INFINITE);
    int64_t after = start_text(w, CBW_DEFAULT_ROUTE, OP_ECHO, "next", CBW_TIMEOUT_INFINITE);
    /* Both leave the thread: the route goes on with the next job. */
    expect_result(w, after, CBW_STATUS_OK, "next");
    CHECK_EQ(job_state(w, id), CBW_STATE_SUSPENDED);
    CHECK_EQ(job_state(w, timed), CBW_STATE_SUSPENDED);
    CHECK_EQ(route_delayed(w, CBW_DEFAULT_ROUTE), 2);
    CHECK_EQ(cbw_route_wait_drained(w, CBW_DEFAULT_ROUTE, 0), 0);
    CHECK_EQ(cbw_worker_clock_ms(w), 0);
    CHECK_EQ(cbw_worker_advance_clock(w, 249), CBW_OK);
    CHECK_EQ(job_state(w, timed), CBW_STATE_SUSPENDED);
    CHECK_EQ(cbw_worker_advance_clock(w, 1), CBW_OK);
    CHECK_EQ(cbw_worker_clock_ms(w), 250);
    expect_result(w, timed, CBW_STATUS_OK, "r250");
    CHECK_EQ(cbw_job_wake(w, id, 0), 1);
    expect_result(w, id, CBW_STATUS_OK, "r");
    CHECK_EQ(cbw_job_wake(w, id, 0), CBW_EUNKNOWN);
    CHECK_EQ(cbw_job_wake(w, after, -1), CBW_EINVAL);
    CHECK_EQ(cbw_run_suspend(&outside, "x", 1, -1), CBW_EINVAL);
    CHECK_EQ(LOAD(&ex.bad_calls), 0);
    cbw_worker_release(w);
}

static void test_suspended_jobs_cancel_and_shut_down(void)
{
    cbw_worker *w = new_worker(1);
    cbw_job_info info;
    int64_t a = start_text(w, CBW_DEFAULT_ROUTE, OP_SUSPEND, "s", CBW_TIMEOUT_INFINITE);
    int64_t b = start_text(w, CBW_DEFAULT_ROUTE, OP_SUSPEND, "s", CBW_TIMEOUT_INFINITE);
    CHECK(EVENTUALLY(route_delayed(w, CBW_DEFAULT_ROUTE) == 2, WAIT_MS));
    CHECK_EQ(cbw_job_info_get(w, a, &info), CBW_OK);
    CHECK_EQ(info.attempt, 1);
    CHECK_EQ(info.phase, CBW_PHASE_QUEUED);
    CHECK_EQ(cbw_cancel(w, a, NULL), 1);
    CHECK_EQ(job_state(w, a), CBW_STATE_CANCELLED);
    CHECK_EQ(cbw_job_wake(w, a, 0), 0);
    /* A drain runs what can run; a suspended job waits for the outside
     * world, so it is shut down rather than waited for. */
    CHECK_EQ(cbw_worker_close(w, CBW_CLOSE_DRAIN, 0), CBW_OK);
    cbw_worker_release(w);
    (void)b;
}

static void test_route_config_is_validated(void)
{
    cbw_worker *w = new_worker(1);
    cbw_route_config cfg = {1, CBW_TIMEOUT_INFINITE, -1, 0, 0};
    CHECK_EQ(cbw_route_open_config(w, "bad", &cfg), CBW_EINVAL);
    cfg.max_retries = 0;
    cfg.backoff_ms = -1;
    CHECK_EQ(cbw_route_open_config(w, "bad", &cfg), CBW_EINVAL);
    cfg.backoff_ms = 0;
    cfg.delay_ms = -5;
    CHECK_EQ(cbw_route_open_config(w, "bad", &cfg), CBW_EINVAL);
    CHECK_EQ(cbw_route_open_config(w, "bad", NULL), CBW_EINVAL);
    cfg.delay_ms = 0;
    CHECK(cbw_route_open_config(w, "bad", &cfg) > 1);
    cbw_worker_release(w);
}

/* ---- the runner ---------------------------------------------------------- */

typedef struct test_case { void (*fn)(void); const char *name; } test_case;

#define TEST(fn) {fn, #fn + 5}

static const test_case tests[] = {
    TEST(test_start_wait_echo),
    TEST(test_wait_complete_then_take),
    TEST(test_take_before_completion),
    TEST(test_unknown_ids),
    TEST(test_ids_strictly_increase_never_reused),
    TEST(test_fifo_order_with_concurrency_one),
    TEST(test_cancel),
    TEST(test_cancel_of_completed_job_returns_zero),
    TEST(test_failure_reports_error_text),
    TEST(test_result_replacement_longer_than_request),
    TEST(test_timeout_wakes_waiter_at_deadline),
    TEST(test_timeout_interrupts_busy_callback),
    TEST(test_stuck_thread_is_replaced_after_grace),
    TEST(test_wait_timeout_leaves_job_intact),
    TEST(test_wait_copy_copies_small_responses),
    TEST(test_wait_many_stops_at_a_failure_or_a_failed_wait),
    TEST(test_timer_handles_many_simultaneous_deadlines),
    TEST(test_many_jobs_taken_in_random_order),
    TEST(test_keep_alive_keeps_the_request_valid),
    TEST(test_keep_alive_of_a_retried_request_survives_a_longer_response),
    TEST(test_kept_suspension_fails_with_the_reason),
    TEST(test_result_released_after_its_worker),
    TEST(test_release_without_close_finishes_running_jobs),
    TEST(test_close_shuts_down_queue_and_wakes_waiters),
    TEST(test_close_drain_runs_queued_jobs),
    TEST(test_close_interrupt_abandons_stuck_threads),
    TEST(test_close_from_inside_callback),
    TEST(test_close_drain_from_inside_callback_is_deadlock),
    TEST(test_close_interrupt_from_inside_callback),
    TEST(test_wait_on_own_job_is_deadlock),
    TEST(test_wait_on_job_queued_behind_is_deadlock),
    TEST(test_route_open_validates),
    TEST(test_route_close_and_drain),
    TEST(test_route_concurrency_is_a_ceiling),
    TEST(test_route_keeps_its_concurrency_after_bursts),
    TEST(test_retries_back_off_exponentially),
    TEST(test_retry_restores_the_original_request),
    TEST(test_cancel_and_close_reach_waiting_retries),
    TEST(test_delay_spaces_consecutive_starts),
    TEST(test_route_config_is_validated),
    TEST(test_suspended_job_replays_when_woken),
    TEST(test_suspended_jobs_cancel_and_shut_down),
    TEST(test_start_many_in_order),
    TEST(test_start_many_all_or_nothing),
    TEST(test_tokens_retained_once_and_collected_when_dead),
    TEST(test_refused_retain_fails_the_start),
    TEST(test_allocation_failures_are_clean),
    TEST(test_stress_every_job_accounted_once),
    TEST(test_callback_token_zero_is_ordinary),
    TEST(test_watched_jobs_are_reported_once),
    TEST(test_detached_jobs_leave_the_table),
    TEST(test_close_and_release_from_a_hook_on_the_timer),
    TEST(test_no_allocations_left),
};

/* Names the test that was running when the process dies; async-signal-safe. */
static void bail_out(const char *why)
{
    static const char head[] = "Bail out! ", mid[] = " in ";
    (void)!write(STDOUT_FILENO, head, sizeof(head) - 1);
    (void)!write(STDOUT_FILENO, why, strlen(why));
    (void)!write(STDOUT_FILENO, mid, sizeof(mid) - 1);
    (void)!write(STDOUT_FILENO, current_test, strlen(current_test));
    (void)!write(STDOUT_FILENO, "\n", 1);
}

static void on_watchdog(int sig)
{
    (void)sig;
    bail_out("watchdog: the run took too long");
    _exit(3);
}

static void on_abort(int sig)
{
    bail_out("abort()");
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Runs one test on a fresh executor and checks it left nothing behind: no
 * core allocations and no threads still inside the hooks. */
static int run_test(int number, const test_case *t)
{
    int before = LOAD(&failures);
    int64_t base = cbw_live_allocations(), kept_before = kept_blocks, t0 = now_ms();
    memset(&ex, 0, sizeof(ex));
    current_test = t->name;
    t->fn();
    if (now_ms() - t0 > 1000)
        printf("# %s took %lld ms\n", t->name, (long long)(now_ms() - t0));
    base += kept_blocks - kept_before; /* what OP_KEEP kept stays, by design */
    if (!EVENTUALLY(cbw_live_allocations() == base, SETTLE_MS))
        printf("# the core holds %lld more block(s) than before the test\n",
               (long long)(cbw_live_allocations() - base));
    CHECK_EQ(cbw_live_allocations(), base);
    CHECK(EVENTUALLY(LOAD(&ex.threads_exited) == LOAD(&ex.threads_entered), SETTLE_MS));
    CHECK_EQ(LOAD(&ex.sessions_begun), LOAD(&ex.sessions_ended));
    CHECK_EQ(LOAD(&ex.bailouts), 0);
    printf("%s %d - %s\n", LOAD(&failures) == before ? "ok" : "not ok", number, t->name);
    fflush(stdout);
    return LOAD(&failures) == before;
}

int main(void)
{
    size_t i, n = sizeof(tests) / sizeof(tests[0]);
    int passed = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGALRM, on_watchdog);
    signal(SIGABRT, on_abort);
    alarm(WATCHDOG_S);
    printf("1..%zu\n", n);
    for (i = 0; i < n; i++)
        passed += run_test((int)i + 1, &tests[i]);
    printf("# %d of %zu passed\n", passed, n);
    return passed == (int)n ? 0 : 1;
}
