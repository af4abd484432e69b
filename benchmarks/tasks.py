"""Persistent task queues against huey and persist-queue:
``python benchmarks/tasks.py [--quick] [--runs N]``.

The same as ``callbackworker bench --only tasks``; the baselines come with
``pip install -e '.[bench]'`` (each is skipped, saying so, when missing).
"""

import sys

from callbackworker.bench import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(["--only", "tasks", *sys.argv[1:]]))
