"""The ``densenet-zoo`` command: each subcommand parses its flags, calls the library and prints."""

from .main import main

__all__ = ["main"]
