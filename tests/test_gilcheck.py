"""The import-time refusal on a free-threaded interpreter without the GIL
(``callbackworker/_gilcheck.py``).

No free-threaded interpreter exists on the machines this suite runs on, so
the tests fake the two facts the check reads: ``sysconfig``'s
``Py_GIL_DISABLED`` and ``sys._is_gil_enabled()``.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

from callbackworker._gilcheck import free_threading_refusal, refuse_gil_free_interpreter


def fake_interpreter(monkeypatch: pytest.MonkeyPatch, *, free_threaded_build: bool,
                     gil_enabled: bool) -> None:
    real = sysconfig.get_config_var

    def get_config_var(name: str) -> Any:
        return int(free_threaded_build) if name == "Py_GIL_DISABLED" else real(name)

    monkeypatch.setattr(sysconfig, "get_config_var", get_config_var)
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: gil_enabled, raising=False)


def test_a_free_threaded_build_without_the_gil_is_refused():
    reason = free_threading_refusal(free_threaded_build=True, gil_enabled=False)
    assert reason is not None
    assert "needs the GIL" in reason and "-X gil=1" in reason and "PYTHON_GIL=1" in reason


def test_a_free_threaded_build_with_the_gil_enabled_is_accepted():
    assert free_threading_refusal(free_threaded_build=True, gil_enabled=True) is None


def test_a_default_build_is_accepted():
    assert free_threading_refusal(free_threaded_build=False, gil_enabled=True) is None


def test_the_check_raises_import_error_on_a_gil_free_interpreter(monkeypatch):
    fake_interpreter(monkeypatch, free_threaded_build=True, gil_enabled=False)
    with pytest.raises(ImportError, match="needs the GIL"):
        refuse_gil_free_interpreter()


def test_the_check_passes_a_free_threaded_build_started_with_the_gil(monkeypatch):
    fake_interpreter(monkeypatch, free_threaded_build=True, gil_enabled=True)
    refuse_gil_free_interpreter()


def test_the_check_passes_an_interpreter_without_is_gil_enabled(monkeypatch):
    monkeypatch.delattr(sys, "_is_gil_enabled", raising=False)
    refuse_gil_free_interpreter()


def test_importing_the_package_is_refused_before_the_compiled_module_loads(tmp_path: Path):
    script = textwrap.dedent("""
        import sys, sysconfig
        real = sysconfig.get_config_var
        sysconfig.get_config_var = (
            lambda name: 1 if name == "Py_GIL_DISABLED" else real(name))
        sys._is_gil_enabled = lambda: False
        try:
            import callbackworker
        except ImportError as exc:
            print("refused:", exc)
        loaded = sorted(m for m in sys.modules if m.endswith("_cbw_native"))
        print("compiled module loaded:", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused: callbackworker needs the GIL" in result.stdout
    assert "compiled module loaded: []" in result.stdout
