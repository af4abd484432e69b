"""How the suite runs: from a scratch directory (``tests/conftest.py``), so
that it and the interpreters it starts test the same ``callbackworker``; and
with deprecation warnings and unraisable exceptions as errors
(``pyproject.toml``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import callbackworker

CHECKOUT = Path(__file__).resolve().parents[1]


def test_the_tests_run_outside_the_checkout():
    cwd = Path.cwd().resolve()
    assert cwd != CHECKOUT and CHECKOUT not in cwd.parents


def test_an_interpreter_started_by_a_test_imports_the_package_under_test():
    result = subprocess.run(
        [sys.executable, "-c", "import callbackworker; print(callbackworker.__file__)"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == Path(callbackworker.__file__).resolve()


def test_deprecation_warnings_and_unraisable_exceptions_fail_a_test(tmp_path: Path):
    (tmp_path / "test_probe.py").write_text(textwrap.dedent("""
        import gc
        import warnings

        def test_deprecated():
            warnings.warn("an old API", DeprecationWarning)

        class RaisesInFinalizer:
            def __del__(self):
                raise RuntimeError("lost in a finalizer")

        def test_unraisable():
            RaisesInFinalizer()
            gc.collect()
    """))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-c", str(CHECKOUT / "pyproject.toml"), str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=120)
    assert "2 failed" in result.stdout, result.stdout + result.stderr
    assert "DeprecationWarning: an old API" in result.stdout
    assert "PytestUnraisableExceptionWarning" in result.stdout
