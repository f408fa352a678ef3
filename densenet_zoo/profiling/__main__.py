"""Entry point of the profiler's worker processes: ``python -m densenet_zoo.profile_worker worker CONFIG``.

Separate from :mod:`densenet_zoo.profile` so that the package's ``profile`` function and the module
of the same name never meet inside one ``-m`` run.
"""

import sys

from .profile import _worker_main

if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
