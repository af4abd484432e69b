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
 * Timeouts: the run hook records which job the slot runs (exec_job), and the
 * Python side sets exec_flags to 1 immediately before calling the user's
 * callback and back to 0 immediately after it returns.  The timer's interrupt
 * hook, holding the interpreter lock, raises the interrupt exception
 * asynchronously in that thread only while exec_flags is 1 and exec_job is
 * the overdue job.  Both sides hold the interpreter lock, and CPython only
 * delivers an asynchronous exception at a point where it may also switch
 * threads, so the exception lands inside the callback (or as it returns),
 * never in the bridge's own bookkeeping.  If it was raised but not yet
 * delivered when the callback returned, it is withdrawn before the next job
 * can see it (exec_interrupted).
 *
 * Lock order: the interpreter lock may be held when the core's mutex is
 * taken, never the reverse (the core never calls a hook with its mutex held).
 */
#include "cbw.h"

static int cbwpy_run(void *ctx, cbw_slot *slot, cbw_run *run); /* Python */

#define CBWPY_EENCODE (-100)

static PyObject *cbwpy_interrupt_type;

/* Registers the exception class raised inside an overdue callback.  The
 * argument is that class object's address (CPython's id()). */
static void cbwpy_init(void *interrupt_type)
{
    PyGILState_STATE st = PyGILState_Ensure();
    Py_XINCREF((PyObject *)interrupt_type);
    Py_XDECREF(cbwpy_interrupt_type);
    cbwpy_interrupt_type = (PyObject *)interrupt_type;
    PyGILState_Release(st);
}

static void cbwpy_thread_enter(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    (void)PyGILState_Ensure(); /* a new thread: always PyGILState_UNLOCKED */
    slot->exec_ident = (uintptr_t)PyThread_get_thread_ident();
    slot->exec_flags = 0;
    slot->exec_job = 0;
    slot->exec_interrupted = 0;
    slot->exec_state = PyEval_SaveThread();
}

static void cbwpy_thread_exit(void *ctx, cbw_slot *slot)
{
    (void)ctx;
    PyEval_RestoreThread((PyThreadState *)slot->exec_state);
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

static int cbwpy_run_hook(void *ctx, cbw_slot *slot, cbw_run *run)
{
    int status;
    slot->exec_job = run->id;
    status = cbwpy_run(ctx, slot, run);
    slot->exec_flags = 0;
    slot->exec_job = 0;
    if (slot->exec_interrupted) {
        PyThreadState_SetAsyncExc((unsigned long)slot->exec_ident, NULL);
        slot->exec_interrupted = 0;
    }
    return status;
}

static void cbwpy_interrupt(void *ctx, cbw_slot *slot, int64_t job_id)
{
    PyGILState_STATE st;
    (void)ctx;
    if (cbwpy_interrupt_type == NULL || !Py_IsInitialized())
        return;
    st = PyGILState_Ensure();
    if (slot->exec_flags == 1 && slot->exec_job == job_id) {
        slot->exec_interrupted = 1;
        PyThreadState_SetAsyncExc((unsigned long)slot->exec_ident,
                                  cbwpy_interrupt_type);
    }
    PyGILState_Release(st);
}

/* A worker whose jobs are Python callbacks; ctx is the executor's handle. */
static cbw_worker *cbwpy_worker_new(void *ctx, int32_t concurrency, int *err)
{
    cbw_hooks hooks;
    hooks.ctx = ctx;
    hooks.thread_enter = cbwpy_thread_enter;
    hooks.thread_exit = cbwpy_thread_exit;
    hooks.session_begin = cbwpy_session_begin;
    hooks.session_end = cbwpy_session_end;
    hooks.run = cbwpy_run_hook;
    hooks.interrupt = cbwpy_interrupt;
    return cbw_worker_new(&hooks, concurrency, err);
}

/* Starts a job whose request is the UTF-8 form of a str, given by address.
 * The caller keeps the str alive for the call.  ASCII strings are copied
 * once, straight from the str's own storage into the job.  Returns what
 * cbw_start returns, or CBWPY_EENCODE when the text cannot be encoded (the
 * caller then encodes it itself to raise the proper error). */
static int64_t cbwpy_start_text(cbw_worker *w, int32_t route, uint64_t callback,
                                void *text, int32_t timeout_ms)
{
    PyGILState_STATE st = PyGILState_Ensure();
    Py_ssize_t n = 0;
    const char *p = PyUnicode_AsUTF8AndSize((PyObject *)text, &n);
    if (p == NULL)
        PyErr_Clear();
    PyGILState_Release(st);
    if (p == NULL)
        return CBWPY_EENCODE;
    /* The UTF-8 bytes belong to the str, which the caller keeps alive and
     * which is immutable, so the copy needs no interpreter lock. */
    return cbw_start(w, route, callback, p, (size_t)n, timeout_ms);
}
