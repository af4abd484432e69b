"""The import-time refusal on a free-threaded interpreter running without the GIL.

The cffi bridge (``ffibuild/bridge.c``) compiles locks in place of the
interpreter lock on a free-threaded build (3.13t, 3.14t), but no such
interpreter has ever run the suite.  cffi marks the compiled module as not
needing the GIL, so CPython would not turn the GIL back on when the module
loads, and nothing in Python can turn it on afterwards.  Until CI tests a
free-threaded build, the package therefore refuses to import on one whose
GIL is off, before the compiled module is loaded, and says how to start the
interpreter with the GIL.  With the GIL enabled (``-X gil=1`` or
``PYTHON_GIL=1``) a free-threaded build runs it like any other.

Importing this module runs the check; ``callbackworker/__init__.py`` imports
it first.
"""

from __future__ import annotations

import sys
import sysconfig
from typing import Optional

__all__ = ["free_threading_refusal", "refuse_gil_free_interpreter"]


def free_threading_refusal(free_threaded_build: bool, gil_enabled: bool) -> Optional[str]:
    """Returns why the package cannot be imported on an interpreter with these
    facts, or ``None`` when it can: only a free-threaded build whose GIL is
    currently disabled is refused."""
    if not free_threaded_build or gil_enabled:
        return None
    return ("callbackworker needs the GIL: it has not been tested on a free-threaded "
            "interpreter running without it; start Python with -X gil=1 (or set "
            "PYTHON_GIL=1) to use it on this build")


def refuse_gil_free_interpreter() -> None:
    """Raises ``ImportError`` when the running interpreter is a free-threaded
    build with the GIL disabled (``sysconfig``'s ``Py_GIL_DISABLED`` and
    ``sys._is_gil_enabled()``); returns quietly everywhere else."""
    free_threaded_build = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    gil_enabled = True if is_gil_enabled is None else bool(is_gil_enabled())
    reason = free_threading_refusal(free_threaded_build, gil_enabled)
    if reason is not None:
        raise ImportError(reason)


refuse_gil_free_interpreter()
