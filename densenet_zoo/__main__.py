"""``python -m densenet_zoo ...`` is the ``densenet-zoo`` command (and what torchrun runs)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
