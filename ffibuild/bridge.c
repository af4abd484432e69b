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
 * callable while jobs may run it, so the run hook calls it directly.
 *
 * Lock order: the interpreter lock may be held when the core's mutex is
 * taken, never the reverse (the core never calls a hook with its mutex held).
 */
#include "cbw.h"

static void cbwpy_completed(void *ctx, int64_t *ids, size_t n); /* Python */

#define CBWPY_EENCODE (-100)
#define CBWPY_EFAILED (-101)
#define CBWPY_WAIT_CHUNK 128

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
        cbwpy_escaped_name == NULL) {
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
        PyErr_WriteUnraisable(c->table); /* a bug in the bridge: log it */
        status = CBW_STATUS_ERROR;
    }
    Py_XDECREF(res);
    Py_XDECREF(addr);
    return (int)status;
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
 * The request view is a memoryview straight over the job's memory.  After
 * the call it is released; if something still refers to that memory (an
 * export, or a slice, which keeps the view's managed buffer), the memory is
 * kept for good and escaped() fails a successful job.
 */
static int cbwpy_run_hook(void *ctx, cbw_slot *slot, cbw_run *run)
{
    cbwpy_ctx *c = ctx;
    PyObject *callable = (PyObject *)(uintptr_t)run->callback;
    PyObject *view, *out, *exc = NULL, *res;
    PyMemoryViewObject *mv;
    _PyManagedBufferObject *mbuf;
    int status = CBW_STATUS_OK, escaped;

    view = PyMemoryView_FromMemory((char *)run->data, (Py_ssize_t)run->size, PyBUF_WRITE);
    if (view == NULL) {
        PyErr_Clear();
        cbw_run_set_error(run, "MemoryError: no memory for the request's view");
        return CBW_STATUS_ERROR;
    }
    slot->exec_job = run->id;
    Py_INCREF(callable); /* the registry may drop it while it runs (a close) */
    slot->exec_flags = 1;
    out = PyObject_CallOneArg(callable, view);
    slot->exec_flags = 0;
    if (slot->exec_interrupted) {
        PyThreadState_SetAsyncExc((unsigned long)slot->exec_ident, NULL);
        slot->exec_interrupted = 0;
    }
    slot->exec_job = 0;
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
    Py_XDECREF(exc); /* a stored failure keeps its own reference */

    mv = (PyMemoryViewObject *)view;
    mbuf = mv->mbuf;
    if (Py_REFCNT(view) == 1 && mv->exports == 0 && mbuf->exports == 1 &&
        !(mv->flags & _Py_MEMORYVIEW_RELEASED)) {
        /* Nothing else refers to the job's memory.  (A view the callback
         * released itself no longer counts in mbuf->exports, so the one
         * export left may be a slice: that case takes the path below.) */
        Py_DECREF(view);
        return status;
    }
    Py_INCREF(mbuf);
    res = PyObject_CallMethodNoArgs(view, cbwpy_release_name);
    escaped = res == NULL || mbuf->exports > 0;
    if (res == NULL)
        PyErr_Clear(); /* BufferError: the view itself is exported */
    Py_XDECREF(res);
    Py_DECREF(mbuf);
    Py_DECREF(view);
    if (escaped) {
        PyObject *was = PyLong_FromLong(status);
        if (was == NULL) {
            PyErr_Clear();
            cbw_run_keep_alive(run);
            return CBW_STATUS_ERROR;
        }
        status = cbwpy_call_table(c, cbwpy_escaped_name, run, was, NULL);
        Py_DECREF(was);
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

static int cbwpy_retain(void *ctx, uint64_t callback)
{
    cbwpy_ctx *c = ctx;
    PyGILState_STATE st = PyGILState_Ensure();
    PyObject *key = PyLong_FromUnsignedLongLong(callback);
    /* The token is the callable's address; the caller of cbw_start keeps
     * the callable alive for the duration of the call. */
    int rc = key == NULL ? -1
                         : PyDict_SetItem(c->registry, key, (PyObject *)(uintptr_t)callback);
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
    do {
        n = cbw_tokens_collect(c->worker, dead, 64);
        for (i = 0; i < n; i++) {
            PyObject *key = PyLong_FromUnsignedLongLong(dead[i]);
            PyObject *value = key != NULL ? PyDict_GetItemWithError(c->registry, key) : NULL;
            if (value != NULL && keep != NULL && PyList_Append(keep, value) < 0)
                PyErr_Clear();
            if (value == NULL || PyDict_DelItem(c->registry, key) < 0)
                PyErr_Clear(); /* already gone (the worker was closed) */
            Py_XDECREF(key);
        }
    } while (n == 64);
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

/* A str's code points, for encoding without the interpreter lock (a str is
 * immutable, and the caller keeps it alive). */
typedef struct cbwpy_text {
    int kind;
    const void *data;
    Py_ssize_t length;
} cbwpy_text;

/* The UTF-8 size of the text, or -1 if it holds a lone surrogate (which
 * UTF-8 cannot encode). */
static Py_ssize_t cbwpy_utf8_size(const cbwpy_text *t)
{
    Py_ssize_t i, size = 0;
    for (i = 0; i < t->length; i++) {
        Py_UCS4 c = PyUnicode_READ(t->kind, t->data, i);
        if (c < 0x80)
            size += 1;
        else if (c < 0x800)
            size += 2;
        else if (c >= 0xD800 && c <= 0xDFFF)
            return -1;
        else if (c < 0x10000)
            size += 3;
        else
            size += 4;
    }
    return size;
}

static void cbwpy_fill_utf8(void *arg, unsigned char *dst, size_t size)
{
    const cbwpy_text *t = arg;
    Py_ssize_t i;
    (void)size;
    for (i = 0; i < t->length; i++) {
        Py_UCS4 c = PyUnicode_READ(t->kind, t->data, i);
        if (c < 0x80) {
            *dst++ = (unsigned char)c;
        } else if (c < 0x800) {
            *dst++ = (unsigned char)(0xC0 | (c >> 6));
            *dst++ = (unsigned char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            *dst++ = (unsigned char)(0xE0 | (c >> 12));
            *dst++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            *dst++ = (unsigned char)(0x80 | (c & 0x3F));
        } else {
            *dst++ = (unsigned char)(0xF0 | (c >> 18));
            *dst++ = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
            *dst++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            *dst++ = (unsigned char)(0x80 | (c & 0x3F));
        }
    }
}

/* Starts a job whose request is the UTF-8 form of a str, given by address;
 * the caller keeps the str alive for the call.  The text is copied once:
 * ASCII straight from the str's storage, anything else encoded straight
 * into the job.  Returns what cbw_start returns, or CBWPY_EENCODE when the
 * text cannot be encoded (the caller then encodes it itself to raise the
 * proper error). */
static int64_t cbwpy_start_text(cbw_worker *w, int32_t route, uint64_t callback,
                                void *text, int32_t timeout_ms)
{
    PyObject *obj = (PyObject *)text;
    PyGILState_STATE st = PyGILState_Ensure();
    cbwpy_text t;
    Py_ssize_t size;
    const char *ascii = NULL;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0) {
        PyErr_Clear();
        PyGILState_Release(st);
        return CBWPY_EENCODE;
    }
#endif
    if (PyUnicode_IS_ASCII(obj))
        ascii = PyUnicode_AsUTF8AndSize(obj, &size); /* the str's own bytes */
    t.kind = PyUnicode_KIND(obj);
    t.data = PyUnicode_DATA(obj);
    t.length = PyUnicode_GET_LENGTH(obj);
    PyGILState_Release(st);
    if (ascii != NULL)
        return cbw_start(w, route, callback, ascii, (size_t)size, timeout_ms);
    size = cbwpy_utf8_size(&t);
    if (size < 0)
        return CBWPY_EENCODE;
    return cbw_start_fill(w, route, callback, (size_t)size, timeout_ms, cbwpy_fill_utf8, &t);
}

/* Waits for jobs ids[0..n) in order (n at most CBWPY_WAIT_CHUNK) with
 * cbw_wait_many, without the interpreter lock, then takes that lock once to
 * append each successful job's response to the list `out` as bytes.
 * *consumed counts the jobs destroyed.  Returns CBW_OK; or the core's error
 * for ids[*consumed], which is untouched; or CBWPY_EFAILED when
 * ids[*consumed - 1] completed without success: its detached result is in
 * *failed, for the caller to raise and release; or CBW_ENOMEM when a bytes
 * object could not be made (the jobs are destroyed, the responses from there
 * on lost).  The caller keeps `out` alive for the call. */
static int cbwpy_wait_many(cbw_worker *w, const int64_t *ids, size_t n, int32_t timeout_ms,
                           void *out, cbw_result *failed, size_t *consumed)
{
    cbw_result res[CBWPY_WAIT_CHUNK];
    PyObject *list = (PyObject *)out, *item;
    PyGILState_STATE st;
    size_t done = 0, i;
    int rc;

    *consumed = 0;
    if (n > CBWPY_WAIT_CHUNK)
        return CBW_EINVAL;
    rc = cbw_wait_many(w, ids, n, timeout_ms, res, &done);
    *consumed = done;
    if (done > 0 && res[done - 1].status != CBW_STATUS_OK) {
        *failed = res[--done]; /* the caller raises and releases it */
        rc = CBWPY_EFAILED;
    }
    if (done == 0)
        return rc;
    st = PyGILState_Ensure();
    for (i = 0; i < done; i++) {
        item = PyBytes_FromStringAndSize((const char *)res[i].data, (Py_ssize_t)res[i].size);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            PyErr_Clear();
            if (rc == CBWPY_EFAILED)
                cbw_result_release(failed);
            rc = CBW_ENOMEM;
            break;
        }
        Py_DECREF(item);
    }
    PyGILState_Release(st);
    cbw_result_release_many(res, done);
    return rc;
}
