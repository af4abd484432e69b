"""The core's platform layer must keep building for every target.

The Win32 branch of csrc/cbw_platform.c is compiled with the MinGW-w64
cross-compiler when it is installed (.ci/run installs it where it can), with
the same warnings-as-errors flags as the native build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
MINGW = "x86_64-w64-mingw32-gcc"


@pytest.mark.skipif(shutil.which(MINGW) is None,
                    reason=f"{MINGW} is not installed (apt-get install gcc-mingw-w64-x86-64)")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("cbw_*.c")))
def test_core_compiles_for_windows(source: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [MINGW, "-std=gnu11", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", "-c",
         str(CSRC / source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("cbw_*.c")))
def test_core_compiles_strict_c11_pedantic(source: str, tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    proc = subprocess.run(
        [cc, "-std=c11", "-D_GNU_SOURCE", "-pedantic", "-Wall", "-Wextra", "-Werror",
         f"-I{CSRC}", "-c", str(CSRC / source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
