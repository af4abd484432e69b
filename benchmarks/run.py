"""Runs the callbackworker benchmarks: ``python benchmarks/run.py [--quick]``.

The same as ``callbackworker bench``; see ``callbackworker/bench.py`` for the
workloads and baselines.
"""

import sys

from callbackworker.bench import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
