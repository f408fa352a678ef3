"""Ctrl-C (or SIGTERM) during training: finish the optimizer step, save the resumable state, then stop.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives, and code a
training step runs through may swallow it (a figure being drawn) or turn it into another error (a
module being imported): the run would then train on, or end with an error that is not the user's.
While a run trains, :class:`StopRequest` takes SIGINT instead and only records it; the trainer
agrees on it across ranks at the next optimizer step, saves the state there and raises
:class:`RunInterrupted` (a ``KeyboardInterrupt``) itself. A second Ctrl-C raises at once (files are
written atomically, so the last saved state stays whole).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

#: What a run takes over while it trains: Ctrl-C, and the polite kill (torchrun passes Ctrl-C on as SIGTERM;
#: schedulers send it before they preempt).
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class RunInterrupted(KeyboardInterrupt):
    """What a run raises once it stopped on a signal and saved its state; ``signum`` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class StopRequest:
    """Context manager: SIGINT and SIGTERM set :attr:`requested` (the signal) instead of stopping the process.

    The same signal a second time raises :class:`RunInterrupted` at once; the other one then changes
    nothing (torchrun follows a Ctrl-C with SIGTERM). A signal the process has its own handler for,
    or any signal where this is not the main thread, is left alone.

    Args:
        announce: write one line to stderr on the first signal (the main process of a run).
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested: Optional[int] = None
        self.announce = announce
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def error(self) -> RunInterrupted:
        """The exception to stop with (SIGINT where another rank had the signal)."""
        return RunInterrupted(self.requested or signal.SIGINT)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested == signum:
            raise RunInterrupted(signum)
        if self.requested is None:
            self.requested = signum
            if self.announce:  # os.write, not print(): this may run inside a write to sys.stderr
                name = _NAMES.get(signal.Signals(signum), signal.Signals(signum).name)
                os.write(2, f"finetune: {name}: stopping after this step, once the state is saved ({name} again stops at once)\n".encode())


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches every process of the terminal's group; loader workers
    leave it to the run, which stops them when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
