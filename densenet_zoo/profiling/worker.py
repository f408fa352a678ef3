"""The measuring half of the profiler: builds one configuration and measures its training steps.

Runs inside the fresh worker processes that :mod:`densenet_zoo.profiling.runner` starts (one per
configuration on CPU, started with the chosen allocator), or in the calling process on CUDA.

Memory on CPU: the *baseline* is VmRSS once the model, the SGD optimizer with its momentum state,
the input and the targets exist, before the first step. Warm-up steps run; then, for each measured
step, the high-water mark is reset (``5`` written to ``/proc/self/clear_refs``), the step runs
(forward, backward, optimizer step) and its peak is VmHWM after it. Reported: the highest peak
minus the baseline, every step's peak and resident memory after it, and how much the peak grew
from the first measured step to the last (memory the allocator keeps from step to step).
On CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``
with the model, optimizer state and data loaded.

A mode may end in ``:channels_last`` (model and input in channels-last memory format) and in
``:compile`` (the model under ``torch.compile``) or ``:compile=B`` (compiled with the partitioner's
``activation_memory_budget`` B, between 0 and 1). A compiled mode's warm-up step compiles; on CPU
its baseline is taken after it, so that the compiler's own memory is not counted as the step's.
"""

from __future__ import annotations

import gc
import importlib
import json
import statistics
import sys
import time
import contextlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .._utils import UsageError
from ..allocator import active_allocator, describe
from ..memory import SavedTensorBytes
from ..models import create_model
from .rss import PeakRss, rss_kib

#: ``"none:channels_last"``: a mode run with the model and the input in channels-last memory format.
CHANNELS_LAST = ":channels_last"
#: ``"fused:compile"``: a mode under ``torch.compile``; ``"none:compile=0.3"``: with that activation memory budget.
COMPILE = ":compile"
#: The compiled rows ``modes="compiled"`` stands for: normal mode compiled, with the compiler's own answer
#: to activation memory at three budgets, and the fused strategies compiled.
COMPILED_MODES = ("none:compile", "none:compile=0.5", "none:compile=0.3", "none:compile=0.1", "fused:compile",
                  "fused_lean:compile")


class ModeSpec(NamedTuple):
    """A measured mode: a strategy (or torchvision reference) name and how it runs."""

    name: str
    channels_last: bool = False
    compiled: bool = False
    budget: Optional[float] = None  #: the compiler's ``activation_memory_budget``; None: its default

    def budget_patch(self) -> contextlib.AbstractContextManager:
        """Where the compiler partitions this mode's graphs (the budget is read when it compiles)."""
        if self.budget is None:
            return contextlib.nullcontext()
        import torch._functorch.config as functorch_config

        return functorch_config.patch(activation_memory_budget=self.budget)


def parse_mode(spec: str) -> ModeSpec:
    """``"fused:channels_last:compile"`` -> ``ModeSpec("fused", True, True, None)``; raises :class:`UsageError`
    for a suffix other than ``:channels_last``, ``:compile`` and ``:compile=B`` (0 < B <= 1)."""
    name, *suffixes = spec.split(":")
    mode = ModeSpec(name)
    for suffix in suffixes:
        key, has_value, value = suffix.partition("=")
        if suffix == CHANNELS_LAST[1:]:
            mode = mode._replace(channels_last=True)
        elif key == COMPILE[1:] and not has_value:
            mode = mode._replace(compiled=True)
        elif key == COMPILE[1:]:
            try:
                budget = float(value)
            except ValueError:
                budget = -1.0
            if not 0 < budget <= 1:
                raise UsageError(f"mode {spec!r}: the budget after ':compile=' must be a number in (0, 1], e.g. 0.3")
            mode = mode._replace(compiled=True, budget=budget)
        else:
            raise UsageError(f"mode {spec!r}: unknown suffix ':{suffix}'; expected {CHANNELS_LAST!r}, {COMPILE!r} "
                             f"or '{COMPILE}=B'")
    return mode
TORCHVISION_ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: The one Python statement a worker process runs (``python -c``; the config is its first argument).
#: How the runner starts a worker process (the package's __main__ calls :func:`worker_main`).
WORKER_COMMAND = ("-m", "densenet_zoo.profiling")


def build(ref: str, mode: str, kwargs: Dict[str, Any]) -> nn.Module:
    """Model ``ref`` (a zoo name or ``module:builder``) in memory mode ``mode`` (or a torchvision reference),
    channels-last if the mode says so (not compiled: :func:`setup` compiles)."""
    spec = parse_mode(mode)
    if spec.channels_last:
        return build(ref, spec.name, kwargs).to(memory_format=torch.channels_last)
    mode = spec.name
    if mode.startswith("torchvision"):
        import torchvision

        arch = ref.rsplit(":", 1)[-1]
        if arch not in TORCHVISION_ARCHS:
            raise UsageError(f"torchvision has no reference for {arch!r}; use one of {', '.join(TORCHVISION_ARCHS)}")
        tv_kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "drop_rate")}
        return getattr(torchvision.models, arch)(memory_efficient=mode.endswith("memory_efficient"), **tv_kwargs)
    if ":" in ref:
        module, qualname = ref.split(":", 1)
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        model = obj(**kwargs)
    else:
        model = create_model(ref, **kwargs)
    set_mode = getattr(model, "set_memory_efficient", None)
    if set_mode is None:
        raise UsageError(f"model {ref!r} has no set_memory_efficient(); memory modes apply to densenet_zoo models")
    return set_mode(mode)


def setup(config: Dict[str, Any]) -> Tuple[torch.device, nn.Module, Any, torch.Tensor, Callable[[], None]]:
    """Model, SGD optimizer (momentum state allocated), input and one training step of a configuration."""
    device = torch.device(config.get("device", "cpu"))
    spec = parse_mode(config["mode"])
    torch.manual_seed(0)
    model = build(config["model"], config["mode"], config.get("model_kwargs", {})).to(device).train()
    run = model
    if spec.compiled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one model per mode
        run = torch.compile(model, dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():  # zeros: the first step computes what SGD's lazily created state would
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    n, s = config["batch_size"], config["image_size"]
    x = torch.randn(n, 3, s, s, device=device)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    classes = getattr(model, "num_classes", 1000) or 1
    y = torch.randint(0, classes, (n,), device=device)
    dtype = AUTOCAST_DTYPES.get(config.get("autocast") or "")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), spec.budget_patch():
            out = run(x)
        nn.functional.cross_entropy(out.float(), y).backward()
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)

    return device, run, opt, x, step


def measure_together(configs: List[Dict[str, Any]], steps: int, warmup: int) -> Dict[str, List[float]]:
    """Step times of every configuration in this one process, the modes taking turns step by step.

    A shared machine whose speed drifts over minutes slows every mode alike, not the one measured then.
    """
    setups = [(c["mode"], setup(c)) for c in configs]
    for _, (_, _, _, _, step) in setups:
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {mode: [] for mode, _ in setups}
    for i in range(steps):
        for mode, (device, _, _, _, step) in setups[i % len(setups):] + setups[: i % len(setups)]:
            gc.collect()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _baseline(device: torch.device) -> int:
    gc.collect()
    _sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_kib("VmRSS") * 1024


def _measured_step(device: torch.device, step: Callable[[], None], baseline: int) -> Tuple[float, int, int]:
    """(seconds, peak above baseline, resident memory after the step above baseline) of one step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated(device) - baseline, torch.cuda.memory_allocated(device) - baseline
    with PeakRss() as peak:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return seconds, peak.peak * 1024 - baseline, rss_kib("VmRSS") * 1024 - baseline


def measure(config: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one configuration in this process (see the module docstring): a dict of results."""
    device, model, _, x, step = setup(config)
    compiled = parse_mode(config["mode"]).compiled
    baseline = _baseline(device)
    start = time.perf_counter()
    for _ in range(max(config.get("warmup", 1), 1 if compiled else 0)):
        step()
    warmup_s = time.perf_counter() - start
    if compiled and device.type == "cpu":  # the compiler's own memory is not the step's
        baseline = _baseline(device)
    gc.collect()
    times, peaks, after = [], [], []
    count = config.get("steps", 5) if config.get("phase") == "time" else config.get("memory_steps", config.get("steps", 5))
    for _ in range(max(count, 1)):
        seconds, peak, resident = _measured_step(device, step, baseline)
        times.append(seconds)
        peaks.append(peak)
        after.append(resident)
    if config.get("phase") == "time":
        return {"step_s": statistics.median(times), "step_times_s": times}
    cuda = device.type == "cuda"
    method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if cuda
              else f"VmHWM per step ({PeakRss().method})" + ("; baseline after compiling" if compiled else ""))
    dtype = AUTOCAST_DTYPES.get(config.get("autocast") or "")
    with SavedTensorBytes(exclude=model.parameters()) as saved, \
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    del out
    return {
        "mode": config["mode"], "batch_size": config["batch_size"], "image_size": config["image_size"],
        "peak_bytes": max(peaks), "step_peaks_bytes": peaks, "step_after_bytes": after,
        "peak_growth_bytes": peaks[-1] - peaks[0], "step_s": statistics.median(times), "step_times_s": times,
        "saved_bytes": saved.bytes, "baseline_bytes": baseline, "absolute_peak_bytes": baseline + max(peaks),
        "peak_method": method, "allocator": "cuda caching allocator" if cuda else describe(active_allocator()),
        "autocast": config.get("autocast"), "params": sum(p.numel() for p in model.parameters()),
        "warmup_s": warmup_s,
    }


def worker_main(argv: List[str]) -> int:
    """``python -m densenet_zoo.profiling CONFIG_JSON``: print the measurements of one config as one JSON line."""
    if len(argv) != 1:
        print("usage: python -m densenet_zoo.profiling CONFIG_JSON", file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if config.get("phase") == "together":
        result: Dict[str, Any] = {"times": measure_together(config["configs"], config["steps"], config["warmup"])}
    else:
        result = measure(config)
    print(json.dumps(result), flush=True)
    return 0
