/*
 * cdef_bridge.h - the executor glue (bridge.c, bridge_verbs.c) and its
 * Python side.
 *
 * cbwpy_completed is implemented in Python (callbackworker/_native.py) and
 * called with the interpreter lock held when watched jobs complete.
 */
extern "Python" void cbwpy_completed(void *ctx, int64_t *ids, size_t n);

#define CBWPY_EENCODE ...  /* cbwpy_start_text: the str cannot be encoded */

int cbwpy_init(void *interrupt_type);
void cbwpy_forked(void);
cbw_worker *cbwpy_worker_new(void *handle, void *registry, void *table,
                             int32_t concurrency, int *err);
void *cbwpy_current_table(void);
int64_t cbwpy_start_text(cbw_worker *w, int32_t route, uint64_t callback,
                         void *text, int32_t timeout_ms);
int cbwpy_start_many(cbw_worker *w, int32_t route, uint64_t callback, void *requests,
                     int32_t timeout_ms, void *out, size_t *bad);
#define CBWPY_EBADREQUEST ...  /* cbwpy_start_many: a request is not a C-contiguous buffer */
int cbwpy_read_ids(void *list, int64_t *ids, size_t n);
#define CBWPY_EFAILED ...
#define CBWPY_WAIT_CHUNK ...
int cbwpy_wait_many(cbw_worker *w, const int64_t *ids, size_t n, int32_t timeout_ms,
                    void *out, cbw_result *failed, size_t *consumed);
