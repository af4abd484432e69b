/*
 * cbw_asyncmeta.h - the asyncmeta vocabulary, defined once for the C core.
 *
 * These numbers are the shared contract between every asyncmeta-compatible
 * backend: phases, statuses, capability bits and profiles, route states and
 * the JobMeta / RouteMeta field keys.  callbackworker/asyncmeta.py repeats
 * them for pure-Python use; tests/test_asyncmeta.py proves both agree.
 */
#ifndef CBW_ASYNCMETA_H
#define CBW_ASYNCMETA_H

/* Phases of a job's life. */
#define CBW_PHASE_QUEUED 0
#define CBW_PHASE_RUNNING 1
#define CBW_PHASE_COMPLETED 2

/* Statuses.  PENDING is the asyncmeta StatusPending; the rest are the
 * completion statuses of a job. */
#define CBW_STATUS_OK 0
#define CBW_STATUS_PENDING 1
#define CBW_STATUS_ERROR 2
#define CBW_STATUS_TIMEOUT 3
#define CBW_STATUS_SHUTDOWN 4
#define CBW_STATUS_CANCELLED 5

/* Unified states: phase and completion status in one code. */
#define CBW_STATE_QUEUED 0
#define CBW_STATE_RUNNING 1
#define CBW_STATE_SUCCEEDED 2
#define CBW_STATE_FAILED 3
#define CBW_STATE_TIMED_OUT 4
#define CBW_STATE_CANCELLED 5
#define CBW_STATE_SHUT_DOWN 6
#define CBW_STATE_SUSPENDED 7

/* Capability bits. */
#define CBW_CAP_WAIT_COMPLETE 1
#define CBW_CAP_WAIT_DRAINED 2
#define CBW_CAP_JOB_META 4
#define CBW_CAP_ROUTE_META 8
#define CBW_CAP_PHASE_TEXT 16
#define CBW_CAP_STATUS_TEXT 32
#define CBW_CAP_JOB_INFO 64
#define CBW_CAP_ROUTE_INFO 128
#define CBW_CAP_ROUTE_CLOSE 256
#define CBW_CAP_BLOB_TAKE 512
#define CBW_CAP_BLOB_RESULT_META 1024
#define CBW_CAP_KNOWN 2048

/* Capability profiles: ready-made unions of the bits above. */
#define CBW_PROFILE_JOB_INSPECT                                             \
    (CBW_CAP_WAIT_COMPLETE | CBW_CAP_JOB_META | CBW_CAP_PHASE_TEXT |       \
     CBW_CAP_STATUS_TEXT | CBW_CAP_JOB_INFO | CBW_CAP_KNOWN)
#define CBW_PROFILE_BLOB_JOB                                                \
    (CBW_PROFILE_JOB_INSPECT | CBW_CAP_BLOB_TAKE | CBW_CAP_BLOB_RESULT_META)
#define CBW_PROFILE_ROUTE_CONTROL                                           \
    (CBW_CAP_WAIT_DRAINED | CBW_CAP_ROUTE_META | CBW_CAP_ROUTE_INFO |      \
     CBW_CAP_ROUTE_CLOSE | CBW_CAP_KNOWN)
#define CBW_PROFILE_ROUTE_SERVICE                                           \
    (CBW_PROFILE_BLOB_JOB | CBW_PROFILE_ROUTE_CONTROL)

/* Route states. */
#define CBW_ROUTE_CLOSED 0
#define CBW_ROUTE_OPEN 1

/* JobMeta field keys (0 is never a valid key). */
#define CBW_JOB_META_PHASE 1
#define CBW_JOB_META_STATUS 2
#define CBW_JOB_META_ROUTE 3
#define CBW_JOB_META_TIMEOUT 4
#define CBW_JOB_META_KNOWN 5
#define CBW_JOB_META_HAS_BLOB_RESULT 6
#define CBW_JOB_META_BLOB_RESULT_SIZE 7

/* RouteMeta field keys. */
#define CBW_ROUTE_META_STATE 1
#define CBW_ROUTE_META_TIMEOUT 2
#define CBW_ROUTE_META_PENDING 3
#define CBW_ROUTE_META_QUEUED 4
#define CBW_ROUTE_META_RUNNING 5
#define CBW_ROUTE_META_DRAINED 6
#define CBW_ROUTE_META_KNOWN 7
#define CBW_ROUTE_META_CLOSE_ACCEPTED 8
#define CBW_ROUTE_META_CLOSED_QUEUED 9

#endif /* CBW_ASYNCMETA_H */
