"""The ``densenet-zoo`` command: each subcommand parses its flags, calls the library and prints."""

from .app import main

__all__ = ["main"]
