"""The C core's own test program, tests/c/test_core.c, built and run four ways.

The program links csrc/cbw_*.c directly, drives the core through cbw.h with a
pure-C executor and prints TAP.  Here it is compiled plain, under
ThreadSanitizer and under AddressSanitizer with UndefinedBehaviorSanitizer,
and the plain build also runs under valgrind's memcheck.  Each run must exit
0 and print no sanitizer report.  A sanitizer variant is skipped only when the
compiler cannot build a trivial program with it; every run has a timeout, so a
hang in the core fails the test instead of stalling the suite.
"""

import os
import platform
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TEST_PROGRAM = ROOT / "tests" / "c" / "test_core.c"
COMMON_FLAGS = ("-std=gnu11", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-pthread")
RUN_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 120
VALGRIND_STRESS_ITERS = "200"
OUTPUT_TAIL = 12000
SANITIZER_REPORTS = (
    "WARNING: ThreadSanitizer",
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
)


@dataclass(frozen=True)
class Variant:
    """One way to build the test program, and the environment to run it in."""

    flags: Tuple[str, ...]
    env: Dict[str, str] = field(default_factory=dict)
    sanitizer: str = ""


VARIANTS = {
    "plain": Variant(flags=("-O2", "-g")),
    "tsan": Variant(
        flags=("-fsanitize=thread", "-O1", "-g"),
        env={"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"},
        sanitizer="thread",
    ),
    "asan_ubsan": Variant(
        flags=("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"),
        env={
            "ASAN_OPTIONS": "halt_on_error=1 detect_leaks=1",
            "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1",
        },
        sanitizer="address,undefined",
    ),
}


def _compiler() -> List[str]:
    """The C compiler command: $CC (which may carry arguments) or `cc`."""
    command = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(command[0]) is None:
        pytest.skip(f"no C compiler: {command[0]!r} is not on PATH (set $CC)")
    return command


def _compile(
    cc: List[str], sources: List[Path], output: Path, flags: Tuple[str, ...]
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cc, *COMMON_FLAGS, f"-I{CSRC}", *flags, *map(str, sources), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns a function that builds (once) and returns the named variant."""
    cc = _compiler()
    out_dir = tmp_path_factory.mktemp("c_core")
    built: Dict[str, Path] = {}

    def build_variant(name: str) -> Path:
        if name in built:
            return built[name]
        variant = VARIANTS[name]
        if variant.sanitizer:
            probe = out_dir / f"probe_{name}.c"
            probe.write_text("int main(void) { return 0; }\n")
            result = _compile(cc, [probe], out_dir / f"probe_{name}", variant.flags)
            if result.returncode != 0:
                pytest.skip(
                    f"{cc[0]} cannot build with -fsanitize={variant.sanitizer}: "
                    f"{result.stderr.strip()[:500]}"
                )
        binary = out_dir / f"test_core_{name}"
        sources = [TEST_PROGRAM, *sorted(CSRC.glob("cbw_*.c"))]
        result = _compile(cc, sources, binary, variant.flags)
        assert result.returncode == 0, f"building the {name} variant failed:\n{result.stderr}"
        built[name] = binary
        return binary

    return build_variant


def _run(command: List[str], extra_env: Dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env}
    try:
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if exc.stdout else ""
        pytest.fail(f"{command[0]} did not finish within {RUN_TIMEOUT_S} s:\n{partial}")


def _assert_clean(result: subprocess.CompletedProcess, what: str) -> None:
    """Fails with the TAP failures and diagnostics first, then the output's tail."""
    output = result.stdout + result.stderr
    code = result.returncode
    reports = [report for report in SANITIZER_REPORTS if report in output]
    if code == 0 and not reports:
        return
    failures = [
        line for line in output.splitlines() if line.startswith(("not ok", "# ", "Bail out!"))
    ]
    pytest.fail(
        f"{what} exited with {code}"
        + (f" and printed {', '.join(map(repr, reports))}" if reports else "")
        + ":\n"
        + "\n".join(failures[:80])
        + f"\n--- last {OUTPUT_TAIL} characters of the output ---\n"
        + output[-OUTPUT_TAIL:],
        pytrace=False,
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_c_core_program_passes(build: Callable[[str], Path], name: str) -> None:
    binary = build(name)
    result = _run([str(binary)], VARIANTS[name].env)
    if "unexpected memory mapping" in result.stderr and shutil.which("setarch"):
        # Older ThreadSanitizer runtimes cannot place their shadow memory under
        # the address-space randomisation of newer kernels; without it they can.
        result = _run(["setarch", platform.machine(), "-R", str(binary)], VARIANTS[name].env)
    _assert_clean(result, f"the {name} build")


def test_c_core_program_is_clean_under_valgrind(build: Callable[[str], Path]) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    binary = build("plain")
    command = [
        valgrind,
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        str(binary),
    ]
    result = _run(command, {"CBW_STRESS_ITERS": VALGRIND_STRESS_ITERS})
    _assert_clean(result, "the plain build under valgrind")
