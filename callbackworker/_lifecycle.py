"""The package's one interpreter-exit hook and one fork hook.

At interpreter exit, open task services close first: each settles or gives
back the tasks it has claimed while its worker can still run them.  Then
every open worker closes: queued jobs are shut down, running callbacks are
interrupted, and threads still busy after a short grace period are
abandoned, so exit never hangs.  (Hooks registered one per module would run
in reverse import order; this order is written here once.)

In a child made by ``os.fork()`` only the forking thread exists: the bridge
forgets the parent's threads, module state registered with
``on_fork_in_child`` is reset, and every worker starts over, empty, with
its configuration.

``Worker`` and ``TaskService`` add themselves to ``live_workers`` /
``live_services`` while open and take themselves out when closed.
"""

from __future__ import annotations

import atexit
import inspect
import os
import sys
import threading
import weakref
from typing import Any, Callable, List

from . import _native
from ._native import lib

__all__ = ["live_workers", "live_services", "on_fork_in_child", "off_the_main_thread",
           "wait_in_finalizer", "EXIT_GRACE_MS"]

EXIT_GRACE_MS = 200
"""How long exit waits for a worker's busy threads before abandoning them."""

live_workers: "weakref.WeakSet[Any]" = weakref.WeakSet()
"""Open ``Worker`` objects."""

live_services: "weakref.WeakSet[Any]" = weakref.WeakSet()
"""Open ``TaskService`` objects."""

_fork_actions: List[Callable[[], None]] = []


def on_fork_in_child(action: Callable[[], None]) -> None:
    """Has ``action()`` reset module state in a forked child, before the
    workers start over."""
    _fork_actions.append(action)


def _close_all_at_exit() -> None:
    """Closes every open task service, then every open worker."""
    for service in list(live_services):
        try:
            service.close()
        except Exception:  # exit must go on whatever one service does
            _native.log.exception("callbackworker: error closing %r at exit", service)
    for worker in list(live_workers):
        try:
            worker._close(lib.CBW_CLOSE_INTERRUPT, EXIT_GRACE_MS, interruptible=False)
        except Exception:  # exit must go on whatever one worker does
            _native.log.exception("callbackworker: error closing a worker at exit")


def _after_fork_in_child() -> None:
    _native.FORK_GENERATION[0] += 1
    lib.cbwpy_forked()
    for action in _fork_actions:
        action()
    for worker in list(live_workers):
        worker._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def off_the_main_thread(call: Callable[[], int]) -> int:
    """Runs ``call`` (a close, which may wait long for running callbacks) on
    a thread of its own while the main thread waits for it, so that Ctrl-C
    interrupts the wait: the ``KeyboardInterrupt`` reaches the caller at
    once and the close goes on in the background (a later ``close()``
    waits for it).  Where no thread can start (interpreter shutdown), the
    call runs here."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the waiting caller
            outcome.append((False, exc))

    closer = threading.Thread(target=run, name="callbackworker-close", daemon=True)
    try:
        closer.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        return call()
    closer.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# ---- a finalizer's wait, interruptible --------------------------------------------


def wait_in_finalizer(call: Callable[[], Any], finalizer_code: Any) -> None:
    """Runs ``call`` (a collected worker's release, which waits for its
    running callbacks) for a finalizer on the main thread, so that Ctrl-C
    interrupts the wait as it interrupts ``close()``.

    The call runs on a thread of its own while this thread waits on a plain
    lock (which a signal interrupts).  When the wait is interrupted, the
    call goes on in the background, and the exception (``KeyboardInterrupt``
    from Ctrl-C) cannot leave here: the interpreter would print it as
    "Exception ignored" and drop it.  It is delivered in the code that let
    the worker go instead (``_deliver_after_finalizers``).  ``threading`` is
    not used: the collector may run this while the thread holds one of that
    module's locks."""
    import _thread

    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            call()
        except BaseException:  # a finalizer's thread has no one to hand it to
            _native.log.exception("callbackworker: error releasing a collected worker")
        finally:
            done.release()

    try:
        _thread.start_new_thread(run, ())
    except RuntimeError:  # no new thread at interpreter shutdown: wait here
        call()
        return
    try:
        done.acquire()
    except BaseException as exc:  # from a signal handler: Ctrl-C
        _deliver_after_finalizers(exc, finalizer_code)


def _deliver_after_finalizers(exc: BaseException, finalizer_code: Any) -> None:
    """Raises ``exc`` in the main thread's code at its first function call
    outside every finalizer, through a profile function set for this thread
    alone and removed as it raises.  Finalizers are the worker's own
    (``finalizer_code``), ``weakref.finalize`` and a ``WeakSet``'s
    bookkeeping, and any ``__del__``: the collector may run this inside one,
    or run others after it.  While it is pending, SIGINT's handler is
    wrapped: a newer Ctrl-C drops it (it is stale) and is handled as
    usual, so it never lands in the handler of the newer one.  A profile
    function already set in Python is kept (a profile function that raises
    is unset): it is called first, and outside the finalizers the hook has
    SIGINT sent to this thread from another, which lands as soon as this
    one lets it run (a blocking call, or the interpreter's switch
    interval).  A profiler written in C (``cProfile``) cannot be chained:
    the interrupt is asked for at once, and a finalizer may still drop it."""
    import _thread
    import signal

    inside = {finalizer_code, weakref.finalize.__call__.__code__,
              getattr(live_workers._remove, "__code__", None)}
    exc = exc.with_traceback(None)
    main = _thread.get_ident()
    previous = sys.getprofile()
    if previous is not None and not inspect.isfunction(previous) \
            and not inspect.ismethod(previous):
        _thread.interrupt_main()
        return
    try:
        handler = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main interpreter: no handler to wrap
        handler = None

    stale = []

    def restore_handler() -> None:
        if callable(handler) and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, handler)

    def on_sigint(signum: int, frame: Any) -> Any:
        # A newer Ctrl-C: the pending interrupt is stale.  The hook removes
        # itself at its next call (Python 3.13 mishandles the exception
        # below if the profile function changes in a signal handler).
        stale.append(True)
        restore_handler()
        return handler(signum, frame)  # type: ignore[misc]

    inside.add(on_sigint.__code__)  # Python 3.13 profiles the signal handler's call

    def watch(frame: Any, event: str, arg: Any) -> None:
        if previous is not None:
            previous(frame, event, arg)
        if stale:
            sys.setprofile(previous)
            return
        scan = frame
        while scan is not None:
            if scan.f_code in inside or scan.f_code.co_name == "__del__":
                return
            scan = scan.f_back
        sys.setprofile(previous)
        restore_handler()
        if previous is None:
            raise exc
        # Raising here would unset the program's profiler; a signal sent
        # from another thread lands once this thread lets it run.
        if hasattr(signal, "pthread_kill"):
            _thread.start_new_thread(signal.pthread_kill, (main, signal.SIGINT))
        else:
            _thread.interrupt_main()

    sys.setprofile(watch)
    if callable(handler):
        signal.signal(signal.SIGINT, on_sigint)
