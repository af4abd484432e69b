"""The real extension module (C core + cffi bridge), built with sanitizers and
driven from Python threads.

``tests/test_c_core.py`` runs the core under sanitizers with a pure-C
executor.  This module covers what that cannot: the bridge (``bridge.c``,
the interpreter-lock hand-offs, retain/release of callables, the timer's
asynchronous interrupts) and the core as the Python API drives it.

What a test does
----------------
1. Builds ``callbackworker._cbw_native`` from ``ffibuild/build_native.py``
   with ``CBW_EXTRA_CFLAGS`` / ``CBW_EXTRA_LDFLAGS`` carrying the sanitizer
   flags, in a subprocess run from the repository root: the build script's
   ``ffi`` is loaded with ``runpy`` and ``ffi.compile(tmpdir=...)`` writes
   the module into a temporary directory.
2. Copies the ``callbackworker`` package (without its compiled module) next
   to it and puts the sanitized ``_cbw_native*.so`` inside the copy.
3. Runs ``STRESS_SCRIPT`` in a subprocess with ``PYTHONPATH`` pointing at the
   copy and the sanitizer runtime in ``LD_PRELOAD`` (an uninstrumented
   ``python`` must load it first).  The script checks that it imported the
   sanitized module, then: four threads start (``start``, ``start_text``,
   ``start_many``, two routes, callbacks that edit in place, return longer
   responses, fail, run past a route timeout, or start and wait for jobs
   from inside a callback), cancel, wait (and wait_many) with short timeouts,
   ``wait_complete`` + ``take`` and query jobs picked at random from a
   shared pool; then 20 rounds of ``close()`` racing with threads blocked in
   ``wait`` (bounded and unbounded), starting, cancelling and taking —
   plain close, ``close(drain=True)`` and the interrupting close of
   interpreter exit, which abandons stuck callbacks; then 10 rounds
   (``CBW_SAN_COLLECT_ROUNDS``) of an unclosed worker with queued jobs
   dropped in a reference cycle and collected on its own route thread as
   the bridge allocates a job's request view (its finalizer releases the
   worker there), and of two closes at once, every pairing of plain, drain
   and interrupting, one of them sometimes from inside a callback.
   Finally every core block must be freed (``lib.cbw_live_allocations()``).
4. Asserts exit status 0 and no sanitizer report in the output.

``test_memory_safety_tests_under_asan_and_ubsan`` runs
``tests/test_memory_safety.py`` (callbacks that keep views of their request
past retries, replays, suspensions and a failing bridge) with pytest in the
same sanitized environment: a view reading freed memory is a
heap-use-after-free report there.

``test_stress_under_tsan_with_the_free_threading_locks`` (Python 3.13 and
later) runs the ThreadSanitizer stress against a build with
``-DCBWPY_LOCKS_WITH_GIL``: the locks that a free-threaded build compiles in
instead of relying on the interpreter lock (no free-threaded interpreter is
at hand to run them where they matter).

Two workarounds in step 1, both for ``ffi.compile`` outside setuptools:
the build script's source and include paths are relative to the repository
root and cffi compiles from inside ``tmpdir``, so ``csrc/`` is copied into
``tmpdir`` (objects then land in the copy, never in the repository); and
``py_limited_api=False`` only takes effect through cffi's setuptools hook,
so ``-D_CFFI_NO_LIMITED_API`` is added to the flags (without it the
bridge's ``PyUnicode_AsUTF8AndSize`` is not declared and ``-Werror`` stops
the build).  ``python ffibuild/build_native.py`` fails for the same two
reasons.

AddressSanitizer + UndefinedBehaviorSanitizer
---------------------------------------------
Flags ``-fsanitize=address,undefined -fno-omit-frame-pointer``;
``ASAN_OPTIONS=detect_leaks=0:halt_on_error=1`` (the interpreter leaks by
design at exit, so LeakSanitizer is off; the core's own heap is checked
with ``cbw_live_allocations`` instead) and
``UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1``.

ThreadSanitizer
---------------
Flags ``-fsanitize=thread``; ``TSAN_OPTIONS=halt_on_error=1
second_deadlock_stack=1 suppressions=<file>``.  The interpreter is not
instrumented, so TSan only sees the accesses of the extension and the
synchronisation of intercepted calls (the interpreter lock is a pthread
mutex + condition variable, which TSan does see).  That is enough for this
stress to run clean with ONE suppression, ``race:_dl_deallocate_tls``: a
worker thread's ``__thread`` variable (``cbw__self``) lives in glibc's
dynamic TLS (the module is dlopen'ed); when a finished *detached* thread's
stack is reused, the creating thread frees that block under glibc's
internal stack-cache lock, which TSan cannot see, so it reports the
thread's last TLS write (``thread_main``: ``cbw__self = NULL``) as racing
with the ``free``.  The block is only reused after the kernel reported the
thread's exit, so it is a false positive.  If a TSan runtime cannot map its
shadow memory (``unexpected memory mapping`` on kernels with high ASLR
entropy) the run is retried under ``setarch -R``, else skipped.  Should
TSan ever report races whose stacks are all inside ``libpython`` (an
uninstrumented interpreter can cause that), that is not a finding about
this project: the test prints the full report either way.

Either test is skipped, with the compiler's message, when ``gcc`` (the
compiler cffi uses, from ``sysconfig``) cannot build with the sanitizer or
has no runtime library to preload.  Durations: each build ~4 s, each stress
run ~10 s (``CBW_SAN_SECONDS``, default 3 s of mixed load, plus the close
rounds, ``CBW_SAN_CLOSE_ROUNDS``, default 20).

Running the other Python tests against a sanitizer build
--------------------------------------------------------
This file doubles as the build helper::

    cd /work/main
    /tmp/dev/bin/python tests/test_sanitized_extension.py asan /tmp/cbw-asan
    # builds /tmp/cbw-asan/pkg/callbackworker/ and prints the lines below
    PYTHONPATH=/tmp/cbw-asan/pkg \\
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) \\
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \\
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \\
    /tmp/dev/bin/python -P -m pytest -q -p no:cacheprovider \\
        tests/test_stress.py tests/test_timeouts.py tests/test_lifecycle.py

``-P`` matters: ``python -m`` otherwise puts the current directory (the
repository, with its uninstrumented module) in front of ``PYTHONPATH``.
Check with ``... python -P -c "import callbackworker._cbw_native as n;
print(n.__file__)"``: it must print the path under ``/tmp/cbw-asan``.  Use
``tsan`` instead of ``asan`` for ThreadSanitizer (the helper prints the
matching ``LD_PRELOAD`` / ``TSAN_OPTIONS`` and writes the suppression
file).  Under a sanitizer, ``tests/test_leaks.py``'s RSS test skips itself
(ASan's quarantine keeps freed memory, so RSS grows by design), and
``tests/test_c_core.py`` is pointless (it builds its own binaries).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300
OUTPUT_TAIL = 12000
REPORT_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "WARNING: ThreadSanitizer",
    "ERROR: ThreadSanitizer",
    "FATAL: ThreadSanitizer",
)
# ``-P`` (Python 3.11+) keeps the stress script's directory off sys.path.
# Older interpreters go without it: that directory holds no callbackworker
# package to shadow the copy, and the script checks which module it loaded.
SAFE_PATH_OPTION: Tuple[str, ...] = ("-P",) if sys.version_info >= (3, 11) else ()
TSAN_SUPPRESSIONS = textwrap.dedent("""\
    # glibc frees a finished detached thread's dynamic TLS block (cbw__self)
    # when another thread reuses its cached stack, under a lock TSan cannot
    # see: see tests/test_sanitized_extension.py.
    race:_dl_deallocate_tls
""")


@dataclass(frozen=True)
class Sanitizer:
    name: str
    cflags: Tuple[str, ...]
    ldflags: Tuple[str, ...]
    runtime: str                          # the library to LD_PRELOAD
    env: Dict[str, str] = field(default_factory=dict)
    suppressions: str = ""


SANITIZERS = {
    "asan": Sanitizer(
        name="asan",
        cflags=("-fsanitize=address,undefined", "-fno-omit-frame-pointer"),
        ldflags=("-fsanitize=address,undefined",),
        runtime="libasan.so",
        env={
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        },
    ),
    "tsan": Sanitizer(
        name="tsan",
        cflags=("-fsanitize=thread",),
        ldflags=("-fsanitize=thread",),
        runtime="libtsan.so",
        env={"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"},
        suppressions=TSAN_SUPPRESSIONS,
    ),
}
# ThreadSanitizer over the locks a free-threaded build compiles in.
SANITIZERS["tsan_locks"] = replace(
    SANITIZERS["tsan"], name="tsan_locks",
    cflags=(*SANITIZERS["tsan"].cflags, "-DCBWPY_LOCKS_WITH_GIL"))
# For ffi.compile outside setuptools (see the module docstring).
BUILD_WORKAROUND_CFLAGS = ("-D_CFFI_NO_LIMITED_API",)

BUILD_SNIPPET = textwrap.dedent("""\
    import runpy, sys
    ffi = runpy.run_path("ffibuild/build_native.py")["ffi"]
    print(ffi.compile(tmpdir=sys.argv[1]))
""")


# ---- the stress script, run inside the sanitized process ---------------------

STRESS_SCRIPT = textwrap.dedent('''\
    import faulthandler
    import gc
    import os
    import random
    import sys
    import threading
    import time

    faulthandler.dump_traceback_later(float(os.environ.get("CBW_SAN_WATCHDOG", "240")),
                                      exit=True)

    import callbackworker
    from callbackworker import (DeadlockError, JobFailedError, JobNotCompleteError,
                                ShutdownError, UnknownJobError, WaitTimeoutError, Worker,
                                WorkerClosedError)
    from callbackworker._native import lib

    SECONDS = float(os.environ.get("CBW_SAN_SECONDS", "3"))
    THREADS = int(os.environ.get("CBW_SAN_THREADS", "4"))
    CLOSE_ROUNDS = int(os.environ.get("CBW_SAN_CLOSE_ROUNDS", "20"))
    COLLECT_ROUNDS = int(os.environ.get("CBW_SAN_COLLECT_ROUNDS", "10"))
    BENIGN = (WaitTimeoutError, UnknownJobError, JobNotCompleteError, JobFailedError,
              WorkerClosedError, DeadlockError)

    # Refuse to run against anything but the sanitized build.
    native = sys.modules["callbackworker._cbw_native"].__file__
    expected_dir = os.environ["CBW_SAN_EXPECT_DIR"]
    with open("/proc/self/maps") as f:
        maps = f.read()
    runtime = os.environ["CBW_SAN_RUNTIME"]
    print("native module:", native, flush=True)
    if not os.path.realpath(native).startswith(os.path.realpath(expected_dir)):
        sys.exit(f"SETUP: imported {native}, not the sanitized build under {expected_dir}")
    if runtime not in maps:
        sys.exit(f"SETUP: {runtime} is not loaded")

    errors = []
    errors_lock = threading.Lock()
    counts = {}


    def problem(text):
        with errors_lock:
            errors.append(text)


    def count(what, n=1):
        with errors_lock:
            counts[what] = counts.get(what, 0) + n


    def cb_upper(m):
        m[:] = bytes(m).upper()


    def cb_long(m):
        return bytes(m) * 50  # > 256 bytes: allocated by the core, slow wait path


    def cb_grow(m):
        return bytes(m) + b"!"


    def cb_fail(m):
        raise ValueError(bytes(m).decode())


    def cb_overdue(m):
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            time.sleep(0.001)


    def make_nested(w):
        def cb_nested(m):  # starts, and sometimes waits for, a job from a callback
            try:
                jid = w.start(cb_upper, bytes(m))
                if random.random() < 0.5:
                    w.wait(jid, 20)
            except BENIGN:
                pass
        return cb_nested


    EXPECT = {
        cb_upper: lambda r: r.upper(),
        cb_long: lambda r: r * 50,
        cb_grow: lambda r: r + b"!",
    }


    def client(w, pool, pool_lock, stop, seed):
        rng = random.Random(seed)
        expected = {}
        nested = make_nested(w)
        n = 0
        while not stop.is_set():
            n += 1
            op = rng.random()
            try:
                if op < 0.35:
                    cb = rng.choice([cb_upper, cb_long, cb_grow, cb_fail, cb_upper, nested])
                    req = b"c%d-%d" % (seed, n)
                    how = rng.random()
                    if how < 0.6:
                        ids = [(w.start(cb, req, route=rng.choice([None, "side"])), req)]
                    elif how < 0.8:
                        text = req.decode() + "\\u00e9"
                        ids = [(w.start_text(cb, text), text.encode())]
                    else:
                        reqs = [req + b".%d" % k for k in range(rng.randint(1, 8))]
                        # every kind of buffer: bytes are read in place, the
                        # others through the buffer protocol
                        given = [[r, bytearray(r), memoryview(r)][k % 3]
                                 for k, r in enumerate(reqs)]
                        ids = list(zip(w.start_many(cb, given), reqs))
                    count("started", len(ids))
                    with pool_lock:
                        for jid, r in ids:
                            pool.append(jid)
                            if cb in EXPECT:
                                expected[jid] = EXPECT[cb](r)
                elif op < 0.40:
                    jid = w.start(cb_overdue, b"late", route="slow")
                    count("started")
                    with pool_lock:
                        pool.append(jid)
                elif op < 0.50:
                    with pool_lock:
                        jid = rng.choice(pool) if pool else None
                    if jid is not None and w.cancel(jid):
                        count("cancelled")
                elif op < 0.85:
                    with pool_lock:
                        jid = pool.pop(rng.randrange(len(pool))) if pool else None
                        more = [pool.pop(rng.randrange(len(pool)))
                                for _ in range(min(len(pool), rng.randint(1, 5)))]
                    if jid is None:
                        continue
                    how = rng.random()
                    if how >= 0.15:
                        with pool_lock:
                            pool.extend(more)
                    else:
                        # a batch: it sleeps on its last job, woken early by
                        # a failure or cancel of another job in it
                        batch = [jid] + more
                        try:
                            got_all = w.wait_many(batch, rng.choice([0, 5, 50, 500]))
                        except BENIGN:
                            with pool_lock:
                                pool.extend(batch)  # some are gone: unknown later
                            continue
                        count("succeeded", len(batch))
                        for j, got in zip(batch, got_all):
                            if j in expected and got != expected.pop(j):
                                problem(f"job {j}: wrong response {got!r:.60}")
                        continue
                    try:
                        if how < 0.35:
                            got = w.wait(jid, rng.choice([0, 1, 5, 50]))
                        elif how < 0.5:
                            got = w.wait_many([jid], rng.choice([0, 1, 5, 50]))[0]
                        else:
                            if not w.wait_complete(jid, rng.choice([0, 5, 50])):
                                raise WaitTimeoutError()
                            got = w.take(jid)
                    except (WaitTimeoutError, JobNotCompleteError):
                        with pool_lock:
                            pool.append(jid)  # again later
                        continue
                    except JobFailedError:
                        count("failed")
                        continue
                    count("succeeded")
                    if jid in expected and got != expected.pop(jid):
                        problem(f"job {jid}: wrong response {got!r:.60}")
                else:
                    with pool_lock:
                        jid = rng.choice(pool) if pool else None
                    if jid is not None:
                        w.info(jid)
                        w.job_known(jid)
                        w.status(jid)
            except BENIGN:
                pass
            except Exception as exc:  # anything else is a finding
                problem(f"client {seed}: {type(exc).__name__}: {exc}")


    def phase_mixed():
        w = Worker(concurrency=2)
        w.open_route("side", concurrency=2)
        w.open_route("slow", concurrency=1, timeout_ms=10)
        pool, pool_lock, stop = [], threading.Lock(), threading.Event()
        threads = [threading.Thread(target=client, args=(w, pool, pool_lock, stop, i))
                   for i in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join()
        for jid in pool:  # what is left, bounded
            try:
                w.wait(jid, 5000)
            except BENIGN:
                pass
        w.close()


    def phase_close_races():
        for r in range(CLOSE_ROUNDS):
            w = Worker(concurrency=2)
            w.open_route("slow", concurrency=1, timeout_ms=5)
            ids = [w.start(cb_overdue if k % 4 == 0 else cb_grow, b"r%d" % k)
                   for k in range(16)]
            ids += [w.start(cb_overdue, b"s", route="slow") for _ in range(2)]
            go = threading.Barrier(5)

            def waiter(jid, timeout):
                go.wait()
                try:
                    w.wait(jid, timeout)
                except (ShutdownError, WorkerClosedError, UnknownJobError, JobFailedError,
                        WaitTimeoutError):
                    pass

            def starter():
                go.wait()
                for k in range(200):
                    try:
                        jid = w.start(cb_upper, b"x")
                        if k % 3 == 0:
                            w.cancel(jid)
                        elif k % 3 == 1:
                            w.take(jid)
                    except (WorkerClosedError, JobNotCompleteError, UnknownJobError,
                            JobFailedError):
                        pass

            threads = [threading.Thread(target=waiter, args=(ids[0], -1)),
                       threading.Thread(target=waiter, args=(ids[-1], -1)),
                       threading.Thread(target=waiter, args=(ids[5], 30)),
                       threading.Thread(target=starter)]
            for t in threads:
                t.start()
            go.wait()
            time.sleep(random.random() * 0.01)
            if r % 3 == 0:
                w.close()
            elif r % 3 == 1:
                w.close(drain=True)
            else:
                w._close(lib.CBW_CLOSE_INTERRUPT, 1)  # what interpreter exit does
            count("closes")
            for t in threads:
                t.join(30)
                if t.is_alive():
                    problem(f"close round {r}: a thread is still blocked after close")
            del w
            gc.collect()


    def collected_on_own_thread(r):
        # An unclosed worker with queued jobs, dropped in a reference cycle:
        # the collector runs on its route thread as the next job's request
        # view is allocated, and the finalizer releases the worker there,
        # with that job's callback held by nothing but the registry.
        gate = threading.Lock()
        gate.acquire()

        def first(m):
            gate.acquire()
            gc.set_threshold(1)
            gc.enable()  # the next allocation collects, on this thread

        gc.collect()
        gc.disable()
        w = Worker(concurrency=1)
        w.itself = w  # the cycle: a Worker alone is freed by its last reference
        w.start(first, b"")
        if r % 2:
            w.start(cb_overdue, b"o", timeout_ms=5)
        w.start_many(lambda m: None, [b"q"] * 100)
        del w
        gate.release()
        time.sleep(0.05)
        gc.set_threshold(700, 10, 10)
        gc.enable()
        gc.collect()
        count("collected")


    def closed_from_two_threads(r):
        # Two closes at once, with every pairing of strengths (an interrupting
        # one escalates a weaker one), one of them sometimes from inside a
        # callback; then the worker is dropped unreferenced.
        w = Worker(concurrency=2)
        plain, drain, interrupt = 0, int(lib.CBW_CLOSE_DRAIN), int(lib.CBW_CLOSE_INTERRUPT)
        first, second = [(plain, interrupt), (drain, interrupt), (plain, plain),
                         (drain, plain), (interrupt, interrupt)][r % 5]
        closers = [threading.Thread(target=w._close, args=(flags, 1),
                                    kwargs={"interruptible": False})
                   for flags in (first, second)]
        inside = threading.Event()

        def closes_inside(m):
            inside.set()
            w._close(interrupt, 1, interruptible=False)

        w.start(cb_overdue, b"o")
        w.start_many(cb_grow, [b"q"] * 100)
        if r % 2:
            w.start(closes_inside, b"i")
        closers[0].start()
        time.sleep(random.random() * 0.005)
        closers[1].start()
        for t in closers:
            t.join(30)
            if t.is_alive():
                problem(f"two closers, round {r}: a close did not return")
        if r % 2 and inside.is_set():
            count("closed inside")
        del w
        gc.collect()
        count("closed twice")


    def phase_collected(rounds):
        for r in range(rounds):
            collected_on_own_thread(r)
            closed_from_two_threads(r)


    def main():
        base = lib.cbw_live_allocations()
        t0 = time.monotonic()
        phase_mixed()
        t1 = time.monotonic()
        phase_close_races()
        phase_collected(COLLECT_ROUNDS)
        t2 = time.monotonic()
        gc.collect()
        # Abandoned threads leave by themselves once their callback returns.
        deadline = time.monotonic() + 30
        while lib.cbw_live_allocations() != base and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        live = lib.cbw_live_allocations() - base
        if live:
            problem(f"{live} core block(s) still live after every worker was freed")
        print(f"mixed {t1 - t0:.1f} s, close races {t2 - t1:.1f} s, counts {counts}, "
              f"errors {len(errors)}", flush=True)
        for e in errors[:20]:
            print("STRESS ERROR:", e, flush=True)
        if (counts.get("succeeded", 0) < 100 or counts.get("closes", 0) != CLOSE_ROUNDS
                or counts.get("collected", 0) != COLLECT_ROUNDS
                or counts.get("closed twice", 0) != COLLECT_ROUNDS):
            print("STRESS ERROR: the stress did too little", flush=True)
            return 1
        return 1 if errors else 0


    sys.exit(main())
''')


# ---- building ----------------------------------------------------------------


def compiler() -> list:
    """The compiler cffi/setuptools will use (sysconfig's CC)."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[:1]!r} is not on PATH)")
    return cc


def runtime_library(cc: list, san: Sanitizer) -> str:
    out = subprocess.run([*cc, f"-print-file-name={san.runtime}"], capture_output=True,
                         text=True, timeout=60).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        pytest.skip(f"{cc[0]} has no {san.runtime} to preload (got {out!r})")
    return out


def check_compiler_supports(cc: list, san: Sanitizer, scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    probe = scratch / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    result = subprocess.run([*cc, *san.cflags, *san.ldflags, str(probe), "-o",
                             str(scratch / "probe")], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        pytest.skip(f"{cc[0]} cannot build with {' '.join(san.cflags)}: "
                    f"{result.stderr.strip()[:500]}")


def build_tree(san: Sanitizer, dest: Path) -> Path:
    """Builds the sanitized module and a package copy around it; returns the
    directory to put on PYTHONPATH."""
    build_dir = dest / "build"
    if build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True)
    # cffi compiles from inside tmpdir: the relative csrc/ paths must resolve there.
    shutil.copytree(ROOT / "csrc", build_dir / "csrc")
    env = {
        **os.environ,
        "CBW_EXTRA_CFLAGS": " ".join((*san.cflags, *BUILD_WORKAROUND_CFLAGS)),
        "CBW_EXTRA_LDFLAGS": " ".join(san.ldflags),
    }
    env.pop("LD_PRELOAD", None)
    result = subprocess.run([sys.executable, "-c", BUILD_SNIPPET, str(build_dir)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, (
        f"building the {san.name} extension failed:\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-8000:]}")
    built = sorted(build_dir.glob("_cbw_native*.so"))
    assert len(built) == 1, f"expected one _cbw_native*.so in {build_dir}, found {built}"
    pkg_root = dest / "pkg"
    if pkg_root.exists():
        shutil.rmtree(pkg_root)
    shutil.copytree(ROOT / "callbackworker", pkg_root / "callbackworker",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copy2(built[0], pkg_root / "callbackworker" / built[0].name)
    if san.suppressions:
        (dest / "tsan.supp").write_text(san.suppressions)
    return pkg_root


def sanitizer_env(san: Sanitizer, runtime: str, pkg_root: Path) -> Dict[str, str]:
    env = dict(san.env)
    if san.suppressions:
        supp = pkg_root.parent / "tsan.supp"
        env["TSAN_OPTIONS"] = f"{env['TSAN_OPTIONS']} suppressions={supp}"
    env["LD_PRELOAD"] = runtime
    env["PYTHONPATH"] = str(pkg_root)
    return env


# ---- running -----------------------------------------------------------------


def run_stress(san: Sanitizer, runtime: str, pkg_root: Path,
               prefix: Tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    script = pkg_root.parent / "stress.py"
    script.write_text(STRESS_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "ASAN_", "UBSAN_", "TSAN_", "LD_PRELOAD"))}
    env.update(sanitizer_env(san, runtime, pkg_root))
    env["CBW_SAN_EXPECT_DIR"] = str(pkg_root)
    env["CBW_SAN_RUNTIME"] = Path(runtime).name.split(".so")[0]
    for key in ("CBW_SAN_SECONDS", "CBW_SAN_THREADS", "CBW_SAN_CLOSE_ROUNDS",
                "CBW_SAN_COLLECT_ROUNDS"):
        if key in os.environ:
            env[key] = os.environ[key]
    command = [*prefix, sys.executable, *SAFE_PATH_OPTION, str(script)]
    try:
        return subprocess.run(command, cwd=pkg_root.parent, env=env, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else (exc.stderr or "")
        pytest.fail(f"the {san.name} stress did not finish within {RUN_TIMEOUT_S} s (hang?)\n"
                    f"{out[-4000:]}\n{err[-OUTPUT_TAIL:]}", pytrace=False)


def assert_clean(result: subprocess.CompletedProcess, san: Sanitizer) -> None:
    output = result.stdout + result.stderr
    reports = [m for m in REPORT_MARKERS if m in result.stderr]
    if result.returncode == 0 and not reports:
        return
    key_lines = [line for line in output.splitlines()
                 if any(m in line for m in REPORT_MARKERS)
                 or line.startswith(("SUMMARY:", "STRESS ERROR", "SETUP", "    #"))][:80]
    pytest.fail(
        f"the {san.name} stress exited with {result.returncode}"
        + (f" and printed {', '.join(map(repr, reports))}" if reports else "") + ":\n"
        + "\n".join(key_lines)
        + f"\n--- stdout ---\n{result.stdout[-4000:]}"
        + f"\n--- last {OUTPUT_TAIL} characters of stderr ---\n{result.stderr[-OUTPUT_TAIL:]}",
        pytrace=False)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory):
    """Builds (once per sanitizer) and returns (sanitizer, runtime, pkg_root)."""
    built: Dict[str, Tuple[Sanitizer, str, Path]] = {}

    def get(name: str) -> Tuple[Sanitizer, str, Path]:
        if name not in built:
            san = SANITIZERS[name]
            cc = compiler()
            dest = tmp_path_factory.mktemp(f"cbw_{name}")
            check_compiler_supports(cc, san, dest / "probe")
            runtime = runtime_library(cc, san)
            built[name] = (san, runtime, build_tree(san, dest))
        return built[name]

    return get


def test_stress_under_asan_and_ubsan(sanitized) -> None:
    san, runtime, pkg_root = sanitized("asan")
    result = run_stress(san, runtime, pkg_root)
    assert_clean(result, san)
    print(result.stdout.strip())


# Runs a test module against the sanitized package, after checking that it
# is the sanitized module that gets imported.  -s: a sanitizer report is
# written to fd 2 by a dying process, which pytest's capture would swallow.
PYTEST_SNIPPET = textwrap.dedent('''\
    import os, sys
    import callbackworker._cbw_native as native
    if not native.__file__.startswith(os.environ["CBW_SAN_EXPECT_DIR"]):
        sys.exit(f"SETUP: imported {native.__file__}, not the sanitized module")
    import pytest
    sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))
''')


def run_test_module(san: Sanitizer, runtime: str, pkg_root: Path,
                    module: str) -> subprocess.CompletedProcess:
    """Runs tests/<module> with pytest inside the sanitized process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "ASAN_", "UBSAN_", "TSAN_", "LD_PRELOAD"))}
    env.update(sanitizer_env(san, runtime, pkg_root))
    env["CBW_SAN_EXPECT_DIR"] = str(pkg_root)
    # Started beside the package copy, not in the checkout: without -P (before
    # 3.11) the working directory comes first on sys.path.
    command = [sys.executable, *SAFE_PATH_OPTION, "-c", PYTEST_SNIPPET,
               str(ROOT / "tests" / module)]
    try:
        return subprocess.run(command, cwd=pkg_root.parent, env=env, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tests/{module} under {san.name} did not finish within "
                    f"{RUN_TIMEOUT_S} s (hang?)", pytrace=False)


def test_memory_safety_tests_under_asan_and_ubsan(sanitized) -> None:
    """tests/test_memory_safety.py: every kept view reads live memory."""
    san, runtime, pkg_root = sanitized("asan")
    result = run_test_module(san, runtime, pkg_root, "test_memory_safety.py")
    assert_clean(result, san)
    print(result.stdout.strip()[-2000:])


def test_stress_under_tsan(sanitized) -> None:
    tsan_stress(sanitized, "tsan")


def test_stress_under_tsan_with_the_free_threading_locks(sanitized) -> None:
    """The locks a free-threaded build compiles in (ffibuild/bridge.c,
    DESIGN), built into this interpreter with CBWPY_LOCKS_WITH_GIL."""
    if sys.version_info < (3, 13):
        pytest.skip("the free-threading locks are PyMutex, new in Python 3.13")
    tsan_stress(sanitized, "tsan_locks")


def tsan_stress(sanitized, name: str) -> None:
    """Runs the stress under a ThreadSanitizer build (retried without
    address-space randomisation where the runtime needs that)."""
    san, runtime, pkg_root = sanitized(name)
    result = run_stress(san, runtime, pkg_root)
    if "unexpected memory mapping" in result.stderr:
        if shutil.which("setarch") is None:
            pytest.skip("the ThreadSanitizer runtime cannot map its shadow memory under this "
                        "kernel's address-space randomisation, and setarch is missing")
        result = run_stress(san, runtime, pkg_root, ("setarch", platform.machine(), "-R"))
        if "unexpected memory mapping" in result.stderr:
            pytest.skip("the ThreadSanitizer runtime cannot map its shadow memory here")
    assert_clean(result, san)
    print(result.stdout.strip())


# ---- developer helper --------------------------------------------------------


def _main(argv: list) -> int:
    """python tests/test_sanitized_extension.py {asan|tsan|tsan_locks} DEST"""
    if len(argv) != 2 or argv[0] not in SANITIZERS:
        print(_main.__doc__, file=sys.stderr)
        return 2
    san = SANITIZERS[argv[0]]
    dest = Path(argv[1]).resolve()
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    runtime = subprocess.run([*cc, f"-print-file-name={san.runtime}"], capture_output=True,
                             text=True).stdout.strip()
    pkg_root = build_tree(san, dest)
    env = sanitizer_env(san, runtime, pkg_root)
    print(f"built {san.name} package under {pkg_root}; run the tests from {ROOT} with:\n")
    print(" \\\n".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " \\")
    print(f"{sys.executable} -P -m pytest -q -p no:cacheprovider tests/test_stress.py")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
