"""The ``callbackworker`` command (also ``python -m callbackworker``).

Subcommands:
  demo   a short guided tour of the Worker API on the embedded default
  bench  throughput and latency against ThreadPoolExecutor and a bare loop
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence

from . import Worker
from .asyncmeta import JobMetaKey, Profile, supports_blob_job
from .errors import JobFailedError, JobTimeoutError


def _say(title: str) -> None:
    print(f"\n== {title}")


def _echo(request: memoryview) -> int:
    """The reference's Echo callback: leaves the request as the response."""
    return 1


def _shout(request: memoryview) -> None:
    request[:] = bytes(request).upper()


def _fail(request: memoryview) -> None:
    raise ValueError(f"cannot handle {bytes(request)!r}")


def demo(args: argparse.Namespace) -> int:
    """Runs the tour; every line it prints is checked by the test suite."""
    with Worker() as w:
        _say("capabilities")
        mask = w.capabilities()
        print(f"capabilities() = {mask}  supports blob-job profile "
              f"({int(Profile.BLOB_JOB)}): {supports_blob_job(mask)}")

        _say("start + wait (one step; wait destroys the job)")
        job = w.start(_echo, bytes([65, 66, 67]), 5000)
        resp = w.wait(job, 5000)
        print(f"start(Echo, [65, 66, 67], 5000) -> job {job}")
        print(f"wait(job) -> {list(resp)} (length {len(resp)}); job_known -> {w.job_known(job)}")

        _say("start_text + wait_complete + take (two steps)")
        job = w.start_text(_shout, "hello", 5000)
        print(f"wait_complete(job) -> {w.wait_complete(job, 5000)}")
        print(f"phase_text={w.phase_text(job)} status_text={w.status_text(job)} "
              f"state={w.state(job).name} job_blob_result_size={w.job_blob_result_size(job)}")
        print(f"job_meta(TIMEOUT) -> {w.job_meta(job, JobMetaKey.TIMEOUT)}")
        print(f"info(job) -> {w.info(job)}")
        print(f"take(job) -> {w.take(job)!r}")

        _say("cancel (only queued jobs can be cancelled)")
        gate = threading.Event()
        blocker = w.start(lambda r: gate.wait(), b"", 5000)
        queued = w.start(_echo, b"later", 5000)
        print(f"cancel(queued job) -> {w.cancel(queued)}; status_text -> {w.status_text(queued)}")
        gate.set()
        w.wait_complete(blocker, 5000)
        print(f"cancel(completed job) -> {w.cancel(blocker)}")
        w.take(blocker)

        _say("a timeout (the callback's run-time limit)")
        job = w.start(_spin_forever, b"", 100)
        started = time.monotonic()
        try:
            w.wait(job)
        except JobTimeoutError as exc:
            print(f"wait(job) raised JobTimeoutError after "
                  f"{(time.monotonic() - started) * 1000:.0f} ms: {exc.error_text}")

        _say("a failure (the callback raises)")
        job = w.start(_fail, b"bad input", 5000)
        w.wait_complete(job, 5000)
        print(f"status_text={w.status_text(job)} error_text={w.error_text(job)!r}")
        try:
            w.take(job)
        except JobFailedError as exc:
            print(f"take(job) raised {type(exc).__name__}; __cause__ = {exc.__cause__!r}")

        _say("close (queued jobs are shut down)")
        gate = threading.Event()
        w.start(lambda r: gate.wait(0.2), b"", 5000)
        pending = [w.start(_echo, b"x") for _ in range(3)]
        print(f"{len(pending)} jobs queued; close() -> {w.close()}")
    print("\ndemo finished")
    return 0


def _spin_forever(request: memoryview) -> None:
    while True:
        pass


def bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbackworker",
        description="A C-accelerated job runner for Python.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="a short tour: start/wait, take, cancel, a timeout, a failure",
                       description="A short tour of the Worker API; prints each step.")
    p.set_defaults(func=demo)

    p = sub.add_parser("bench", help="benchmarks against ThreadPoolExecutor and a bare loop",
                       description="Runs the benchmarks side by side with their baselines in "
                                   "one process and prints medians and ratios.")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


__all__: List[str] = ["main"]

if __name__ == "__main__":
    sys.exit(main())
