/*
 * cdef_bridge.h - the Python side of the executor (bridge.c).
 *
 * cbwpy_run is implemented in Python (callbackworker/_native.py) and called
 * by worker threads for every job, with the interpreter lock held.
 */
extern "Python" int cbwpy_run(void *ctx, cbw_slot *slot, cbw_run *run);
extern "Python" void cbwpy_completed(void *ctx, int64_t *ids, size_t n);

void cbwpy_init(void *interrupt_type);
cbw_worker *cbwpy_worker_new(void *handle, void *registry, int32_t concurrency,
                             int *err);
int64_t cbwpy_start_text(cbw_worker *w, int32_t route, uint64_t callback,
                         void *text, int32_t timeout_ms);
