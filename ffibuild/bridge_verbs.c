/*
 * bridge_verbs.c - the start and wait verbs that read or make Python
 * objects in C.
 *
 * DESIGN
 * Part of the bridge's translation unit (build_native.py puts it after
 * bridge.c).  cffi releases the interpreter lock around every call into
 * this module; each verb here takes it back (PyGILState_Ensure) only to
 * read its Python arguments or to make its Python results, and calls the
 * core without it.  The core's mutex is never held while the interpreter
 * lock is taken (see bridge.c, lock order).  Python objects passed by
 * address are kept alive by the caller for the call; a list passed in is
 * one that no other code holds, so no Python code run meanwhile (a
 * buffer's exporter, another thread) can change it.
 */

#define CBWPY_EENCODE (-100)
#define CBWPY_EFAILED (-101)
#define CBWPY_EBADREQUEST (-102)
#define CBWPY_WAIT_CHUNK 128

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


/* Releases the buffers taken for requests[0..n); views[i].obj is NULL
 * where none was taken (a bytes object is read in place). */
static void cbwpy_release_views(Py_buffer *views, size_t n)
{
    size_t i;
    if (views == NULL)
        return;
    for (i = 0; i < n; i++)
        if (views[i].obj != NULL)
            PyBuffer_Release(&views[i]);
    free(views);
}

/* The requests of cbwpy_start_many, copied into one blob: their sizes in
 * sizes[0..n), the blob in *blob (malloc'd, freed by the caller).
 * Interpreter lock held.  CBWPY_EBADREQUEST with *bad the index of a request
 * that is not a C-contiguous buffer; CBW_ENOMEM. */
static int cbwpy_gather(PyObject *list, size_t n, size_t *sizes, char **blob, size_t *bad)
{
    Py_buffer *views = NULL;
    size_t i, total = 0;
    char *at;
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, (Py_ssize_t)i);
        if (PyBytes_CheckExact(item)) {
            sizes[i] = (size_t)PyBytes_GET_SIZE(item);
        } else {
            if (views == NULL && (views = calloc(n, sizeof(*views))) == NULL) {
                cbwpy_release_views(views, i);
                return CBW_ENOMEM;
            }
            if (PyObject_GetBuffer(item, &views[i], PyBUF_SIMPLE) < 0) {
                PyErr_Clear();
                views[i].obj = NULL;
                cbwpy_release_views(views, i);
                *bad = i;
                return CBWPY_EBADREQUEST;
            }
            sizes[i] = (size_t)views[i].len;
        }
        total += sizes[i];
    }
    *blob = at = malloc(total > 0 ? total : 1);
    if (at != NULL) {
        for (i = 0; i < n; i++) {
            const void *src = views != NULL && views[i].obj != NULL
                                  ? views[i].buf
                                  : PyBytes_AS_STRING(PyList_GET_ITEM(list, (Py_ssize_t)i));
            memcpy(at, src, sizes[i]);
            at += sizes[i];
        }
    }
    cbwpy_release_views(views, n);
    return at != NULL ? CBW_OK : CBW_ENOMEM;
}

/* Starts one job per request of the list `requests` (n items, bytes-like)
 * with one cbw_start_many, and appends the new ids, in order, to the list
 * `out`.  The requests are read and copied in C, the core is called
 * without the interpreter lock.  Returns what cbw_start_many returns (no
 * job started on error); CBWPY_EBADREQUEST, nothing started, with *bad the
 * index of a request that is not a C-contiguous buffer; or CBW_ENOMEM
 * when an id could not be appended (the jobs have started). */
static int cbwpy_start_many(cbw_worker *w, int32_t route, uint64_t callback, void *requests,
                            int32_t timeout_ms, void *out, size_t *bad)
{
    PyObject *list = (PyObject *)requests, *item;
    PyGILState_STATE st = PyGILState_Ensure();
    size_t n = (size_t)PyList_GET_SIZE(list), i;
    size_t *sizes = malloc((n > 0 ? n : 1) * sizeof(*sizes));
    int64_t *ids = malloc((n > 0 ? n : 1) * sizeof(*ids));
    char *blob = NULL;
    int rc = sizes != NULL && ids != NULL ? CBW_OK : CBW_ENOMEM;

    if (rc == CBW_OK)
        rc = cbwpy_gather(list, n, sizes, &blob, bad);
    PyGILState_Release(st);
    if (rc == CBW_OK)
        rc = cbw_start_many(w, route, callback, blob, sizes, n, timeout_ms, ids);
    free(blob);
    free(sizes);
    if (rc == CBW_OK && n > 0) {
        st = PyGILState_Ensure();
        for (i = 0; i < n; i++) {
            item = PyLong_FromLongLong(ids[i]);
            if (item == NULL || PyList_Append((PyObject *)out, item) < 0) {
                Py_XDECREF(item);
                PyErr_Clear();
                rc = CBW_ENOMEM;
                break;
            }
            Py_DECREF(item);
        }
        PyGILState_Release(st);
    }
    free(ids);
    return rc;
}

/* Copies the ids of the list `list` (n items) into ids[0..n) for
 * cbwpy_wait_many.  Returns 0; or -1, with ids partly filled, when some item
 * is not a plain int in 1..INT64_MAX (an id the core could have issued):
 * the caller then checks them one by one, to report the right error. */
static int cbwpy_read_ids(void *list, int64_t *ids, size_t n)
{
    PyObject *items = (PyObject *)list, *item;
    PyGILState_STATE st = PyGILState_Ensure();
    int overflow, rc = 0;
    size_t i;
    for (i = 0; i < n && rc == 0; i++) {
        item = PyList_GET_ITEM(items, (Py_ssize_t)i);
        overflow = 0; /* an int too large: -1 and overflow set, never an error */
        ids[i] = PyLong_CheckExact(item) ? PyLong_AsLongLongAndOverflow(item, &overflow) : 0;
        if (ids[i] <= 0 || overflow != 0)
            rc = -1;
    }
    PyGILState_Release(st);
    return rc;
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
