/*
 * request_memory.c - what a callback's request view exports from.
 *
 * DESIGN
 * Part of the bridge's translation unit (build_native.py puts it before
 * bridge.c).  The memoryview a callback gets is made over a cbwpy_memory,
 * not straight over the job's memory, so that the bridge can tell, with
 * the public buffer protocol alone, whether anything still reads that
 * memory once the callback has returned: every memoryview and slice of the
 * request shares one managed buffer, which takes one buffer from the
 * exporter and gives it back only when the last of them is released or
 * freed.  Each worker thread (its cbw_slot) keeps one exporter and reuses
 * it while no one else holds it.  Everything here runs with the
 * interpreter lock held (see bridge.c on free threading).
 */

#include "cbw.h"

/* The free-threading locks (see bridge.c, DESIGN), decided here for the
 * whole translation unit. */
#if defined(Py_GIL_DISABLED) || defined(CBWPY_LOCKS_WITH_GIL)
#define CBWPY_LOCKS 1
#endif

/* `exports` counts the buffers taken and not yet given back: 0 after the
 * call means nothing can reach the job's memory any more.  `data` is set
 * only while the job's callback runs: a buffer asked for at any other time
 * (through `request.obj`) is refused. */
typedef struct cbwpy_memory {
    PyObject_HEAD
    void *data;
    Py_ssize_t size;
    Py_ssize_t exports;
} cbwpy_memory;

static PyTypeObject *cbwpy_memory_type;

/* The object's critical section (free threading; nothing with the
 * interpreter lock). */
#ifdef CBWPY_LOCKS
#define cbwpy_memory_begin(m) Py_BEGIN_CRITICAL_SECTION(m)
#define cbwpy_memory_end() Py_END_CRITICAL_SECTION()
#else
#define cbwpy_memory_begin(m) {
#define cbwpy_memory_end() }
#endif

static int cbwpy_memory_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    cbwpy_memory *m = (cbwpy_memory *)self;
    int rc = -1;
    cbwpy_memory_begin(self);
    if (m->data == NULL) {
        PyErr_SetString(PyExc_BufferError, "the job's request is no longer available");
        view->obj = NULL;
    } else if (PyBuffer_FillInfo(view, self, m->data, m->size, 0, flags) == 0) {
        m->exports++;
        rc = 0;
    }
    cbwpy_memory_end();
    return rc;
}

static void cbwpy_memory_releasebuffer(PyObject *self, Py_buffer *view)
{
    (void)view;
    cbwpy_memory_begin(self);
    ((cbwpy_memory *)self)->exports--;
    cbwpy_memory_end();
}

/* After the callback: no new buffer from here on.  Returns whether one is
 * still taken (something can still reach the job's memory). */
static int cbwpy_memory_close(cbwpy_memory *m)
{
    int taken;
    cbwpy_memory_begin(m);
    m->data = NULL;
    taken = m->exports != 0;
    cbwpy_memory_end();
    return taken;
}

static PyType_Slot cbwpy_memory_slots[] = {
    {Py_bf_getbuffer, (void *)cbwpy_memory_getbuffer},
    {Py_bf_releasebuffer, (void *)cbwpy_memory_releasebuffer},
    {0, NULL},
};

static PyType_Spec cbwpy_memory_spec = {
    "callbackworker.RequestMemory", sizeof(cbwpy_memory), 0, Py_TPFLAGS_DEFAULT,
    cbwpy_memory_slots,
};

/* Makes the exporter's type, once (at import).  0, or -1 with an
 * exception set. */
static int cbwpy_memory_init(void)
{
    if (cbwpy_memory_type == NULL)
        cbwpy_memory_type = (PyTypeObject *)PyType_FromSpec(&cbwpy_memory_spec);
    return cbwpy_memory_type == NULL ? -1 : 0;
}

/* The slot's exporter, ready for a new request: a fresh one when the last
 * one is still held elsewhere (a view kept, or `request.obj`).  NULL, with
 * an exception set, when none could be made. */
static cbwpy_memory *cbwpy_slot_memory(cbw_slot *slot)
{
    cbwpy_memory *m = slot->exec_memory;
    if (m != NULL && Py_REFCNT(m) == 1)
        return m;
    Py_XDECREF(m);
    m = PyObject_New(cbwpy_memory, cbwpy_memory_type);
    slot->exec_memory = m;
    if (m != NULL) {
        m->data = NULL;
        m->size = 0;
        m->exports = 0;
    }
    return m;
}

