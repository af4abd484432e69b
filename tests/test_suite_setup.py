"""How the suite runs (``tests/conftest.py``): from a scratch directory, so
that it and the interpreters it starts test the same ``callbackworker``."""

from __future__ import annotations

import subprocess
import sys
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
