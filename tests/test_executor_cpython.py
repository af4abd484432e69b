"""CPython's own thread-pool tests, run against ``callbackworker.Executor``.

On Python 3.12 and later, the standard library's test package holds the
executor tests (``test.test_concurrent_futures``).  When that package is
importable (some distributions leave it out), this module imports its
thread-pool test classes at run time, points ``ThreadPoolMixin.executor_type``
at ``callbackworker.Executor``, and exposes each class here, under a
``CPython`` prefix, for pytest to run as unittest cases.  No test code of
CPython's is copied into this repository.

A test is skipped only when it cannot say anything about our Executor: it
reads ``ThreadPoolExecutor``'s private attributes (its thread list), it
builds a ``ThreadPoolExecutor`` itself instead of ``executor_type``, or it
runs a child interpreter that imports the executor by name from
``concurrent.futures``.  Each skip below says which.  Thread names,
shutdown without waiting and submitting from an exit hook are covered for
our Executor in tests/test_executor.py; waiting for calls at interpreter
exit is not ThreadPoolExecutor's way here: the package's exit never hangs
(tests/test_lifecycle.py).

Run it with a Python that has the test package, e.g.
``/root/.pyenv/versions/3.13.0/bin/python -m venv /work/venvs/x`` then
``pytest tests/test_executor_cpython.py``.
"""

from __future__ import annotations

import importlib
import sys
import unittest
from typing import Dict, List, Type

import pytest

from callbackworker import Executor

if sys.version_info < (3, 12):
    pytest.skip("CPython's test_concurrent_futures package exists from Python 3.12 on",
                allow_module_level=True)
try:
    _util = importlib.import_module("test.test_concurrent_futures.util")
except ImportError as exc:  # a distribution without the test package
    pytest.skip(f"the standard library's test package is not installed ({exc})",
                allow_module_level=True)

# The thread-pool mixin is the one seam CPython's tests offer: every
# thread-pool test case builds its executor through it.
_util.ThreadPoolMixin.executor_type = Executor

MODULES = ["test_thread_pool", "test_shutdown", "test_init", "test_wait", "test_as_completed"]

_PRIVATE_THREADS = "reads ThreadPoolExecutor._threads, its private list of threads"
_OWN_TPE = "builds a ThreadPoolExecutor itself (and reads its private _threads)"
_BY_NAME = ("runs a child interpreter that imports the executor by class name from "
            "concurrent.futures, which names the abstract Executor there")

SKIPS: Dict[str, str] = {
    # test_thread_pool
    "ThreadPoolExecutorTest.test_saturation": _PRIVATE_THREADS,
    "ThreadPoolExecutorTest.test_idle_thread_reuse": _PRIVATE_THREADS,
    "ThreadPoolExecutorTest.test_hang_global_shutdown_lock":
        "exercises ThreadPoolExecutor's private _global_shutdown_lock with its own pools",
    # test_shutdown
    "ThreadPoolShutdownTest.test_threads_terminate": _PRIVATE_THREADS,
    "ThreadPoolShutdownTest.test_context_manager_shutdown": _OWN_TPE,
    "ThreadPoolShutdownTest.test_del_shutdown": _OWN_TPE,
    "ThreadPoolShutdownTest.test_shutdown_no_wait": _OWN_TPE,
    "ThreadPoolShutdownTest.test_thread_names_assigned": _OWN_TPE,
    "ThreadPoolShutdownTest.test_thread_names_default": _OWN_TPE,
    "ThreadPoolShutdownTest.test_cancel_futures_wait_false":
        "runs a child interpreter with a ThreadPoolExecutor of its own",
    "ThreadPoolShutdownTest.test_interpreter_shutdown": _BY_NAME,
    "ThreadPoolShutdownTest.test_submit_after_interpreter_shutdown": _BY_NAME,
    "ThreadPoolShutdownTest.test_hang_gh83386": _BY_NAME,
}


def _thread_pool_cases(module: object) -> List[Type[unittest.TestCase]]:
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, unittest.TestCase)
            and issubclass(obj, _util.ThreadPoolMixin)]


def _with_skips(case: Type[unittest.TestCase]) -> Type[unittest.TestCase]:
    """A subclass of CPython's case with this module's skips applied."""
    skips = {}
    for key, reason in SKIPS.items():
        cls_name, _, test_name = key.partition(".")
        if cls_name == case.__name__ and hasattr(case, test_name):
            skips[test_name] = unittest.skip(reason)(getattr(case, test_name))
    return type(f"CPython{case.__name__}", (case,), {"__module__": __name__, **skips})


def _load() -> None:
    names = set()
    for module_name in MODULES:
        module = importlib.import_module(f"test.test_concurrent_futures.{module_name}")
        for case in _thread_pool_cases(module):
            made = _with_skips(case)
            globals()[made.__name__] = made
            names.add(case.__name__)
    unknown = {key.partition(".")[0] for key in SKIPS} - names
    assert not unknown, f"skip list names test classes CPython no longer has: {unknown}"


_load()
