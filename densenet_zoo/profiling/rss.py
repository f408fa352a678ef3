"""Resident memory of this process: current, and the peak during a block of code."""

from __future__ import annotations

import threading


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB: ``rss_kib("VmRSS")``, ``rss_kib("VmHWM")``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakRss:
    """Peak resident memory during a step: VmHWM after a reset, or a 1 ms sampling thread."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after writing 5 to /proc/self/clear_refs"
        except OSError:
            self.method = "VmRSS sampled every 1 ms by a thread"

    def __enter__(self) -> "PeakRss":
        self.peak = rss_kib("VmRSS")
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_kib("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = max(self.peak, rss_kib("VmHWM"))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_kib("VmRSS"))
