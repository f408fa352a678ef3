"""Entry point of the profiler's worker processes: ``python -m densenet_zoo.profiling worker CONFIG``."""

import sys

from .runner import _worker_main

if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
