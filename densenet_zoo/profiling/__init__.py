"""The memory/time profiler of the memory strategies: the runner, its worker processes
(``python -m densenet_zoo.profiling``), resident-memory sampling, and reports with tables and plots."""

from .report import DepthSweepReport, MaxBatchReport, ProfileReport
from .runner import depth_sweep, max_batch, profile, resolve_modes

__all__ = ["DepthSweepReport", "MaxBatchReport", "ProfileReport", "depth_sweep", "max_batch", "profile", "resolve_modes"]
