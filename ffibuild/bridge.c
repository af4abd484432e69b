/*
 * bridge.c - the executor that runs Python callbacks for the C core.
 *
 * DESIGN
 * Compiled into the cffi module after cffi's own prelude (so Python.h is
 * available).  Each worker thread gets one Python thread state for its whole
 * life (thread_enter/thread_exit), and takes the interpreter lock once per
 * burst of ready jobs (session_begin/session_end), not once per job: the
 * lock changes hands per burst, and the Python side runs job after job with
 * it held.  Python's own eval loop still hands the lock to other threads
 * every switch interval while callbacks run.
 *
 * Timeouts: the run hook records which job the slot runs (exec_job) and
 * sets exec_flags to 1 immediately before calling the user's callback and
 * back to 0 immediately after it returns.  The timer's interrupt
 * hook, holding the interpreter lock, raises the interrupt exception
 * asynchronously in that thread only while exec_flags is 1 and exec_job is
 * the overdue job.  Both sides hold the interpreter lock, and CPython only
 * delivers an asynchronous exception at a point where it may also switch
 * threads, so the exception lands inside the callback (or as it returns),
 * never in the bridge's own bookkeeping.  If it was raised but not yet
 * delivered when the callback returned, it is withdrawn before the next job
 * can see it (exec_interrupted).
 *
 * Callbacks: the core counts jobs per callback token (the callable's
 * address); retain puts the callable into the worker's registry dict before
 * its first job is visible, release removes the entries the core reports
 * dead, holding the interpreter lock throughout (see csrc/cbw_token.c).
 * A callback token is the callable's address, and the registry holds the
 * callable while jobs may run it, so the run hook calls it directly.  The
 * run hook takes a reference of its own before it does anything that can
 * run Python code: allocating the request's view may run the cyclic
 * collector on the worker's own thread, and a collected Worker's finalizer
 * releases the worker and clears the registry there and then, with this
 * thread's job not yet called.
 *
 * Request views: the callback's memoryview is made over a cbwpy_memory
 * (request_memory.c, compiled just before this file), which exports the
 * job's memory in place, so the bridge learns from its export count whether
 * anything still reads that memory after the call.  A job whose memory
 * escaped is kept alive (cbw_run_keep_alive) before any Python code runs
 * for it.
 *
 * The verbs that make or read Python objects in C (start_text, start_many,
 * wait_many) are in bridge_verbs.c, compiled after this file.
 *
 * C API: the bridge uses only public, documented CPython API (checked
 * against the 3.9 and 3.13 headers).  It used to read the memoryview's
 * internals (PyMemoryViewObject.exports/flags/mbuf and
 * _PyManagedBufferObject.exports) to find kept slices; the exporter object
 * replaces them, and no internal structure remains.  It is not limited to
 * the stable ABI: the str accessors of cbwpy_start_text
 * (PyUnicode_IS_ASCII/KIND/DATA/READ) are outside it, hence
 * _CFFI_NO_LIMITED_API and no abi3 wheel.
 *
 * Free threading: three things here were correct only because the
 * interpreter lock serializes them; a build without it (Py_GIL_DISABLED)
 * compiles locks in their place (CBWPY_LOCKS), and other builds pay nothing:
 *  - interrupts: a PyMutex per slot (in cbw_slot.exec_lock, as the timer
 *    may reach a slot whose thread is leaving) covers the timer's
 *    exec_flags/exec_job check with its PyThreadState_SetAsyncExc, and the
 *    run hook's exec_flags changes with the withdrawal.  A PyMutex detaches
 *    the thread while it waits, so it cannot deadlock against a
 *    stop-the-world that setting an asynchronous exception may take;
 *  - the registry: a PyMutex per worker (cbwpy_ctx) makes cbwpy_retain's
 *    insert and cbwpy_release's collect-and-delete one atomic step with
 *    respect to each other (see cbw_token.c); it is never held while a
 *    callable's last reference goes (the keep list);
 *  - cbwpy_memory (request_memory.c): the object's critical section covers
 *    getbuffer, releasebuffer and the run hook's "data = NULL, then
 *    exports == 0?".
 * Free-threaded interpreters are not on these machines, so that build is
 * untested; defining CBWPY_LOCKS_WITH_GIL compiles the same locks into a
 * 3.13+ build with the interpreter lock, which the tests run
 * (tests/test_sanitized_extension.py).
 *
 * Lock order: the interpreter lock may be held when the core's mutex is
 * taken, never the reverse (the core never calls a hook with its mutex held).
 */
#include "cbw.h"

#ifdef CBWPY_LOCKS /* request_memory.c decides */
/* A PyMutex is one zeroed byte; the slot has a word for it. */
typedef char cbwpy_slot_lock_fits[sizeof(PyMutex) <= sizeof(uintptr_t) ? 1 : -1];
#define cbwpy_slot_lock(slot) PyMutex_Lock((PyMutex *)(void *)&(slot)->exec_lock)
#define cbwpy_slot_unlock(slot) PyMutex_Unlock((PyMutex *)(void *)&(slot)->exec_lock)
#define cbwpy_registry_lock(c) PyMutex_Lock(&(c)->registry_lock)
#define cbwpy_registry_unlock(c) PyMutex_Unlock(&(c)->registry_lock)
#else
#define cbwpy_slot_lock(slot) ((void)0)
#define cbwpy_slot_unlock(slot) ((void)0)
#define cbwpy_registry_lock(c) ((void)0)
#define cbwpy_registry_unlock(c) ((void)0)
#endif

static void cbwpy_completed(void *ctx, int64_t *ids, size_t n); /* Python */

static PyObject *cbwpy_interrupt_type;
static PyObject *cbwpy_release_name;  /* "release" */
static PyObject *cbwpy_outcome_name;  /* "outcome" */
static PyObject *cbwpy_escaped_name;  /* "escaped" */
static int cbwpy_fork_generation;     /* bumped in every forked child */

/* What the hooks of one worker need. */
typedef struct cbwpy_ctx {
    void *handle;        /* ffi.new_handle of the worker's CallbackTable */
    PyObject *registry;  /* token (int) -> callable */
    PyObject *table;     /* the CallbackTable: outcome(), escaped() */
    int fork_generation; /* cbwpy_fork_generation when it was made */
    cbw_worker *worker;
#ifdef CBWPY_LOCKS
    PyMutex registry_lock; /* see DESIGN: free threading */
#endif
} cbwpy_ctx;

/* Registers the exception class raised inside an overdue callback.  The
 * argument is that class object's address (CPython's id()). */
static int cbwpy_init(void *interrupt_type)
{
    PyGILState_STATE st = PyGILState_Ensure();
    Py_XINCREF((PyObject *)interrupt_type);
    Py_XDECREF(cbwpy_interrupt_type);
    cbwpy_interrupt_type = (PyObject *)interrupt_type;
    if (cbwpy_release_name == NULL)
        cbwpy_release_name = PyUnicode_InternFromString("release");
    if (cbwpy_outcome_name == NULL)
        cbwpy_outcome_name = PyUnicode_InternFromString("outcome");
    if (cbwpy_escaped_name == NULL)
        cbwpy_escaped_name = PyUnicode_InternFromString("escaped");
    if (cbwpy_release_name == NULL || cbwpy_outcome_name == NULL ||
        cbwpy_escaped_name == NULL || cbwpy_memory_init() < 0) {
        PyErr_Clear();
        PyGILState_Release(st);
        return CBW_ENOMEM;
    }
    PyGILState_Release(st);
    return CBW_OK;
}

/* Called in a forked child (os.register_at_fork): callbacks still running
 * there belong to the parent's workers. */
static void cbwpy_forked(void)
{
    cbwpy_fork_generation++;
}

static void cbwpy_thread_enter(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    (void)PyGILState_Ensure(); /* a new thread: always PyGILState_UNLOCKED */
    slot->exec_ident = (uintptr_t)PyThread_get_thread_ident();
    slot->exec_flags = 0;
    slot->exec_job = 0;
    slot->exec_interrupted = 0;
    slot->exec_memory = NULL;
    slot->exec_state = PyEval_SaveThread();
}

static void cbwpy_thread_exit(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    PyEval_RestoreThread((PyThreadState *)slot->exec_state);
    Py_XDECREF((PyObject *)slot->exec_memory);
    slot->exec_memory = NULL;
    PyGILState_Release(PyGILState_UNLOCKED);
}

static void cbwpy_session_begin(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    PyEval_RestoreThread((PyThreadState *)slot->exec_state);
}

static void cbwpy_session_end(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    slot->exec_state = PyEval_SaveThread();
}

/* The exception being raised, normalized, with its traceback; clears it. */
static PyObject *cbwpy_take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Calls table.<name>(run, a[, b]) for an outcome the fast path does not
 * handle (b NULL: two arguments); returns its status. */
static int cbwpy_call_table(cbwpy_ctx *c, PyObject *name, cbw_run *run, PyObject *a,
                            PyObject *b)
{
    PyObject *addr = PyLong_FromVoidPtr(run), *res = NULL;
    long status = CBW_STATUS_ERROR;
    if (addr != NULL)
        res = PyObject_CallMethodObjArgs(c->table, name, addr, a, b, NULL);
    if (res != NULL)
        status = PyLong_AsLong(res);
    if (res == NULL || (status == -1 && PyErr_Occurred())) {
        if (PyErr_ExceptionMatches(PyExc_MemoryError)) {
            PyErr_Clear();
            cbw_run_set_error(run, "MemoryError: no memory to settle the callback's outcome");
        } else {
            PyErr_WriteUnraisable(c->table); /* a bug in the bridge: log it */
            cbw_run_set_error(run, "SystemError: the worker could not settle the "
                                   "callback's outcome (the error is logged)");
        }
        status = CBW_STATUS_ERROR;
    }
    Py_XDECREF(res);
    Py_XDECREF(addr);
    return (int)status;
}

/* Settles a run whose request memory escaped (kept alive already): calls
 * table.escaped(run, status, exc); returns the new status. */
static int cbwpy_escaped(cbwpy_ctx *c, cbw_run *run, int status, PyObject *exc)
{
    PyObject *was = PyLong_FromLong(status);
    if (was == NULL) {
        PyErr_Clear();
        cbw_run_set_error(run, "MemoryError: no memory to settle the callback's outcome");
        return CBW_STATUS_ERROR;
    }
    status = cbwpy_call_table(c, cbwpy_escaped_name, run, was, exc ? exc : Py_None);
    Py_DECREF(was);
    return status;
}

/*
 * Runs one job's callback, interpreter lock held.  The common case (the
 * callback edits its request in place and returns None, keeping nothing)
 * stays in C; anything else - an exception, a return value, a view that
 * outlives the call, a fork inside the callback - is settled in Python by
 * the worker's CallbackTable (outcome(), escaped()).
 *
 * exec_flags is 1 only while the callback itself runs, so the timer's
 * interrupt can land nowhere else; one raised but not yet delivered when
 * the callback returned is withdrawn before any other Python code runs.
 *
 * The request view is a memoryview over the slot's cbwpy_memory, which
 * exports the job's memory in place.  After the call the view is released
 * (only if something else still holds it: else dropping it releases it);
 * if some buffer of that memory is still taken (a slice, an export of the
 * view), the job is kept alive for good here, in C, before any Python code
 * can fail, and escaped() fails a successful or suspending job.
 */
static int cbwpy_run_hook(void *ctx, cbw_slot *slot, cbw_run *run)
{
    cbwpy_ctx *c = ctx;
    PyObject *callable = (PyObject *)(uintptr_t)run->callback;
    PyObject *view = NULL, *out, *exc = NULL, *res;
    cbwpy_memory *memory;
    int status = CBW_STATUS_OK;

    /* First of all: whatever allocates below may run the cyclic collector
     * on this thread, and a finalizer it runs may release or close this
     * worker and drop the registry's reference (the Worker's finalizer
     * clears its CallbackTable). */
    Py_INCREF(callable);
    memory = cbwpy_slot_memory(slot);
    if (memory != NULL) {
        memory->data = run->data;
        memory->size = (Py_ssize_t)run->size;
        view = PyMemoryView_FromObject((PyObject *)memory);
    }
    if (view == NULL) {
        PyErr_Clear();
        if (memory != NULL)
            memory->data = NULL;
        cbw_run_set_error(run, "MemoryError: no memory for the request's view");
        Py_DECREF(callable);
        return CBW_STATUS_ERROR;
    }
    cbwpy_slot_lock(slot);
    slot->exec_job = run->id;
    slot->exec_flags = 1;
    cbwpy_slot_unlock(slot);
    out = PyObject_CallOneArg(callable, view);
    cbwpy_slot_lock(slot);
    slot->exec_flags = 0;
    if (slot->exec_interrupted) {
        PyThreadState_SetAsyncExc((unsigned long)slot->exec_ident, NULL);
        slot->exec_interrupted = 0;
    }
    slot->exec_job = 0;
    cbwpy_slot_unlock(slot);
    if (out == NULL)
        exc = cbwpy_take_exception();
    Py_DECREF(callable);
    if (out == view) {
        Py_DECREF(out);
        out = NULL;
    }
    if (exc != NULL || (out != NULL && out != Py_None) ||
        cbwpy_fork_generation != c->fork_generation) {
        status = cbwpy_call_table(c, cbwpy_outcome_name, run, out ? out : Py_None,
                                  exc ? exc : Py_None);
    }
    Py_XDECREF(out);

    if (Py_REFCNT(view) > 1) {
        /* Held elsewhere (a traceback, a global): release it, so that it
         * no longer reaches the job's memory.  A BufferError here means
         * the view itself is exported, which the check below catches. */
        res = PyObject_CallMethodNoArgs(view, cbwpy_release_name);
        if (res == NULL)
            PyErr_Clear();
        Py_XDECREF(res);
    }
    Py_DECREF(view);
    if (!cbwpy_memory_close(memory)) {
        Py_XDECREF(exc); /* a stored failure keeps its own reference */
        return status;
    }
    /* Something still reads the job's memory: it must never be freed. */
    cbw_run_keep_alive(run);
    status = cbwpy_escaped(c, run, status, exc);
    Py_XDECREF(exc);
    return status;
}

static void cbwpy_interrupt(void *ctx, cbw_slot *slot, int64_t job_id)
{
    PyGILState_STATE st;
    (void)ctx;
    if (cbwpy_interrupt_type == NULL || !Py_IsInitialized())
        return;
    st = PyGILState_Ensure();
    cbwpy_slot_lock(slot);
    if (slot->exec_flags == 1 && slot->exec_job == job_id) {
        slot->exec_interrupted = 1;
        PyThreadState_SetAsyncExc((unsigned long)slot->exec_ident,
                                  cbwpy_interrupt_type);
    }
    cbwpy_slot_unlock(slot);
    PyGILState_Release(st);
}

static int cbwpy_retain(void *ctx, uint64_t callback)
{
    cbwpy_ctx *c = ctx;
    PyGILState_STATE st = PyGILState_Ensure();
    PyObject *key = PyLong_FromUnsignedLongLong(callback);
    int rc = -1;
    /* The token is the callable's address; the caller of cbw_start keeps
     * the callable alive for the duration of the call. */
    if (key != NULL) {
        cbwpy_registry_lock(c);
        rc = PyDict_SetItem(c->registry, key, (PyObject *)(uintptr_t)callback);
        cbwpy_registry_unlock(c);
    }
    Py_XDECREF(key);
    if (rc < 0)
        PyErr_Clear();
    PyGILState_Release(st);
    return rc < 0 ? CBW_ENOMEM : CBW_OK;
}

/* Removes the callables of dead tokens from the registry.  Collect and
 * delete must be atomic with respect to Python code (see cbw_token.c), so
 * the callables are kept alive in a list until every delete is done: no
 * finalizer can run, and release the interpreter lock, in between. */
static void cbwpy_release(void *ctx)
{
    cbwpy_ctx *c = ctx;
    uint64_t dead[64];
    size_t n, i;
    PyObject *keep;
    PyGILState_STATE st;
    if (!Py_IsInitialized())
        return;
    st = PyGILState_Ensure();
    keep = PyList_New(0);
    cbwpy_registry_lock(c);
    do {
        n = cbw_tokens_collect(c->worker, dead, 64);
        for (i = 0; i < n; i++) {
            PyObject *key = PyLong_FromUnsignedLongLong(dead[i]);
            PyObject *value = key != NULL ? PyDict_GetItemWithError(c->registry, key) : NULL;
            if (value != NULL && (keep == NULL || PyList_Append(keep, value) < 0)) {
                /* Out of memory: deleting it could run its finalizer here,
                 * so it stays in the registry until the worker is released. */
                PyErr_Clear();
                value = NULL;
            }
            if (value == NULL || PyDict_DelItem(c->registry, key) < 0)
                PyErr_Clear(); /* already gone (the worker was closed) */
            Py_XDECREF(key);
        }
    } while (n == 64);
    cbwpy_registry_unlock(c);
    if (keep == NULL)
        PyErr_Clear();
    Py_XDECREF(keep); /* finalizers may run now */
    PyGILState_Release(st);
}

/* Watched jobs completed: hand their ids to Python, under the interpreter
 * lock (taken here unless this thread already holds it in a session). */
static void cbwpy_completed_hook(void *ctx)
{
    cbwpy_ctx *c = ctx;
    int64_t ids[64];
    size_t n;
    PyGILState_STATE st;
    if (!Py_IsInitialized())
        return;
    st = PyGILState_Ensure();
    while ((n = cbw_completions_collect(c->worker, ids, 64)) > 0)
        cbwpy_completed(c->handle, ids, n);
    PyGILState_Release(st);
}

static void cbwpy_finalize(void *ctx)
{
    cbwpy_ctx *c = ctx;
    if (Py_IsInitialized()) {
        PyGILState_STATE st = PyGILState_Ensure();
        Py_XDECREF(c->registry);
        Py_XDECREF(c->table);
        PyGILState_Release(st);
    }
    free(c);
}

/* A worker whose jobs are Python callbacks.  handle is the ffi handle of
 * its CallbackTable, registry that table's token -> callable dict, by
 * address. */
static cbw_worker *cbwpy_worker_new(void *handle, void *registry, void *table,
                                    int32_t concurrency, int *err)
{
    cbw_hooks hooks;
    cbw_worker *w;
    PyGILState_STATE st;
    cbwpy_ctx *ctx = malloc(sizeof(*ctx));
    if (ctx == NULL) {
        *err = CBW_ENOMEM;
        return NULL;
    }
    ctx->handle = handle;
    ctx->registry = (PyObject *)registry;
    ctx->table = (PyObject *)table;
    ctx->worker = NULL;
#ifdef CBWPY_LOCKS
    memset(&ctx->registry_lock, 0, sizeof(ctx->registry_lock)); /* unlocked */
#endif
    st = PyGILState_Ensure();
    ctx->fork_generation = cbwpy_fork_generation;
    Py_INCREF(ctx->registry);
    Py_INCREF(ctx->table);
    PyGILState_Release(st);
    hooks.ctx = ctx;
    hooks.thread_enter = cbwpy_thread_enter;
    hooks.thread_exit = cbwpy_thread_exit;
    hooks.session_begin = cbwpy_session_begin;
    hooks.session_end = cbwpy_session_end;
    hooks.run = cbwpy_run_hook;
    hooks.interrupt = cbwpy_interrupt;
    hooks.retain = cbwpy_retain;
    hooks.release = cbwpy_release;
    hooks.finalize = cbwpy_finalize;
    hooks.completed = cbwpy_completed_hook;
    w = cbw_worker_new(&hooks, concurrency, err);
    if (w == NULL)
        cbwpy_finalize(ctx);
    else
        ctx->worker = w;
    return w;
}

/* The ffi handle of the CallbackTable of the worker whose job the calling
 * thread runs, or NULL on any other thread: how a callback finds its own
 * worker's Python state without a registry. */
static void *cbwpy_current_table(void)
{
    cbwpy_ctx *c = cbw_current_context();
    return c != NULL ? c->handle : NULL;
}
