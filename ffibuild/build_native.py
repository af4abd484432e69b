"""cffi build script for ``callbackworker._cbw_native``.

Out-of-line API mode: the C core in ``csrc/`` and the executor glue in
``bridge.c`` are compiled into one extension module; ``cdef_core.h`` and
``cdef_bridge.h`` are the declarations Python sees.  setup.py names this file
in ``cffi_modules``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CSRC = ROOT / "csrc"

CORE_SOURCES = sorted(
    os.path.relpath(p, ROOT).replace(os.sep, "/") for p in CSRC.glob("cbw_*.c")
)


def compile_args() -> list[str]:
    """Strict warnings on compilers that speak GCC's dialect."""
    if sys.platform == "win32":
        return ["/W3", "/WX"]
    args = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
    extra = os.environ.get("CBW_EXTRA_CFLAGS")
    if extra:
        args += extra.split()
    return args


def link_args() -> list[str]:
    extra = os.environ.get("CBW_EXTRA_LDFLAGS")
    return extra.split() if extra else []


ffi = FFI()
ffi.cdef((HERE / "cdef_core.h").read_text())
ffi.cdef((HERE / "cdef_bridge.h").read_text())
ffi.set_source(
    "_cbw_native",
    (HERE / "bridge.c").read_text(),
    sources=CORE_SOURCES,
    include_dirs=[os.path.relpath(CSRC, ROOT)],
    define_macros=[] if sys.platform == "win32" else [("_GNU_SOURCE", "1")],
    extra_compile_args=compile_args(),
    extra_link_args=link_args(),
    libraries=[] if sys.platform == "win32" else ["pthread"],
    py_limited_api=False,  # the bridge uses thread-state APIs; no abi3 wheels
)

if __name__ == "__main__":
    ffi.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True)
