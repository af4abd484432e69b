"""cffi build script for ``callbackworker._cbw_native``.

Out-of-line API mode: the C core in ``csrc/`` and the executor glue in
``request_memory.c``, ``bridge.c`` and ``bridge_verbs.c`` are compiled into
one extension module; ``cdef_core.h`` and ``cdef_bridge.h`` are the
declarations Python sees.
setup.py names this file in ``cffi_modules``.
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
# The executor glue: one translation unit after cffi's prelude, in this order.
BRIDGE_SOURCES = ("request_memory.c", "bridge.c", "bridge_verbs.c")


def compile_args() -> list[str]:
    """Strict warnings on compilers that speak GCC's dialect."""
    if sys.platform == "win32":
        # Warnings stay visible, but an MSVC-only one (untested here) must
        # not fail a user's install; -Werror below is enforced in CI.
        return ["/W3"]
    args = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
    extra = os.environ.get("CBW_EXTRA_CFLAGS")
    if extra:
        args += extra.split()
    return args


def link_args() -> list[str]:
    extra = os.environ.get("CBW_EXTRA_LDFLAGS")
    return extra.split() if extra else []


def bridge_source() -> str:
    """The bridge's files as one text; #line keeps compiler messages
    pointing into each file."""
    return "".join(f'#line 1 "ffibuild/{name}"\n' + (HERE / name).read_text()
                   for name in BRIDGE_SOURCES)


def make_ffi(absolute_paths: bool = False) -> FFI:
    """The module definition.  setuptools wants source paths relative to
    the project root; a direct ffi.compile() runs the compiler elsewhere and
    needs absolute ones."""
    made = FFI()
    made.cdef((HERE / "cdef_core.h").read_text())
    made.cdef((HERE / "cdef_bridge.h").read_text())
    sources = [str(ROOT / s) for s in CORE_SOURCES] if absolute_paths else CORE_SOURCES
    macros = [("_CFFI_NO_LIMITED_API", None)]  # the bridge uses thread-state APIs
    if sys.platform != "win32":
        macros.append(("_GNU_SOURCE", "1"))
    made.set_source(
        "_cbw_native",
        bridge_source(),
        sources=sources,
        include_dirs=[str(CSRC) if absolute_paths else os.path.relpath(CSRC, ROOT)],
        define_macros=macros,
        extra_compile_args=compile_args(),
        extra_link_args=link_args(),
        libraries=[] if sys.platform == "win32" else ["pthread"],
        py_limited_api=False,  # no abi3 wheels: see _CFFI_NO_LIMITED_API
    )
    return made


ffi = make_ffi()

if __name__ == "__main__":
    out = ROOT / "build" / "cffi"
    built = make_ffi(absolute_paths=True).compile(tmpdir=str(out), verbose=True)
    print(f"built {built}")
