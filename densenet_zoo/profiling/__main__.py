"""Entry point of the profiler's worker processes: ``python -m densenet_zoo.profiling CONFIG_JSON``."""

import sys

from .worker import worker_main

if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
