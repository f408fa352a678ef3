"""Memory and time of one training step per memory strategy, measured the same way for every mode.

What is measured, per configuration (model, mode, batch size, image size):

* CPU: two fresh ``python -m densenet_zoo.profiling`` processes per configuration. The first
  times the steps with the default allocator. The second runs with glibc returning every freed
  block of 64 KiB or more at once (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live
  tensors; its *baseline* is VmRSS with the model, the SGD optimizer (momentum state included), the
  input and the targets allocated after a warm-up step, gradients freed. The high-water mark is
  reset (``5`` written to ``/proc/self/clear_refs``), one step (forward, backward, optimizer step)
  runs, and the peak is VmHWM after it. Reported: peak minus baseline.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` before and ``max_memory_allocated`` after each
  step, minus ``memory_allocated`` at the same baseline.
* Saved for backward: unique storages packed by ``saved_tensors_hooks`` during one forward
  (parameters excluded); deterministic, the same on any machine.
* Time: median over the measured steps after warm-up.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..models import DenseNet, create_model
from ..models.configs import canonical_name
from ..memory import SavedTensorBytes, get_memory_strategy, list_memory_strategies, parse_bytes
from .rss import _PeakRss, _return_freed_memory, _rss_kib
from .report import DepthSweepReport, MaxBatchReport, ProfileReport, environment

__all__ = ["profile", "max_batch", "depth_sweep", "resolve_modes", "ProfileReport", "MaxBatchReport", "DepthSweepReport"]

REFERENCE_MODES = {"torchvision": ["torchvision", "torchvision_memory_efficient"]}
#: ``"none:channels_last"``: a mode run with the model and the input in channels-last memory format.
CHANNELS_LAST = ":channels_last"
_TORCHVISION_ARCHS = ("densenet121", "densenet161", "densenet169", "densenet201")
ModelSpec = Union[str, Callable[..., nn.Module]]


# -- arguments -------------------------------------------------------------------------------------
def resolve_modes(modes: Union[str, Sequence[str], None], reference: Optional[str] = None) -> List[str]:
    """``"all"``, ``"none,efficient"`` or a list -> validated mode names (normal mode always first)."""
    tokens = ["all"] if modes is None else [str(m).strip() for m in (modes.split(",") if isinstance(modes, str) else modes)]
    names = [n for t in tokens if t for n in (list_memory_strategies() if t == "all" else [t])]
    out = ["none"]
    for name in names:
        base = name[: -len(CHANNELS_LAST)] if name.endswith(CHANNELS_LAST) else name
        if base not in list_memory_strategies() + REFERENCE_MODES["torchvision"]:
            known = ", ".join(list_memory_strategies() + REFERENCE_MODES["torchvision"])
            raise ValueError(f"unknown mode {name!r}; expected 'all' or comma-separated names from: {known} "
                             f"(each may end in {CHANNELS_LAST!r})")
        out.append(name)
    if reference is not None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"unknown reference {reference!r}; expected one of {', '.join(REFERENCE_MODES)}")
        out += REFERENCE_MODES[reference]
    return list(dict.fromkeys(out))


def _model_ref(model: ModelSpec) -> str:
    if isinstance(model, str):
        return canonical_name(model)
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"model {model!r} cannot be rebuilt in a worker process; pass a model name such as 'densenet121' "
            "or a module-level builder function"
        )
    return f"{module}:{qualname}"


def _build(ref: str, mode: str, kwargs: Dict[str, Any]) -> nn.Module:
    if mode.endswith(CHANNELS_LAST):
        return _build(ref, mode[: -len(CHANNELS_LAST)], kwargs).to(memory_format=torch.channels_last)
    if mode.startswith("torchvision"):
        import torchvision

        arch = ref.rsplit(":", 1)[-1]
        if arch not in _TORCHVISION_ARCHS:
            raise ValueError(f"torchvision has no reference for {arch!r}; use one of {', '.join(_TORCHVISION_ARCHS)}")
        tv_kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "drop_rate")}
        return getattr(torchvision.models, arch)(memory_efficient=mode.endswith("memory_efficient"), **tv_kwargs)
    if ":" in ref:
        import importlib

        module, qualname = ref.split(":", 1)
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        model = obj(**kwargs)
    else:
        model = create_model(ref, **kwargs)
    set_mode = getattr(model, "set_memory_efficient", None)
    if set_mode is None:
        raise ValueError(f"model {ref!r} has no set_memory_efficient(); memory modes apply to densenet_zoo models")
    return set_mode(mode)


def _check_sizes(ref: str, kwargs: Dict[str, Any], batch_size: int, image_size: int) -> nn.Module:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model = _build(ref, "none", kwargs)
    low = getattr(model, "min_input_size", 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < low:
        raise ValueError(f"image_size {image_size!r} is too small for this model: it needs at least {low} pixels; raise --image-size")
    return model


# -- one configuration (runs inside the worker, or in-process on CUDA) ----------------------------
def _setup(config: Dict[str, Any]) -> tuple:
    """Model, optimizer, input and one training step (forward, backward, SGD step) of a configuration."""
    device = torch.device(config.get("device", "cpu"))
    torch.manual_seed(0)
    model = _build(config["model"], config["mode"], config.get("model_kwargs", {})).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n, s = config["batch_size"], config["image_size"]
    x = torch.randn(n, 3, s, s, device=device)
    if config["mode"].endswith(CHANNELS_LAST):
        x = x.contiguous(memory_format=torch.channels_last)
    classes = getattr(model, "num_classes", 1000) or 1
    y = torch.randint(0, classes, (n,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return device, model, opt, x, step


def measure_together(configs: List[Dict[str, Any]], steps: int, warmup: int) -> Dict[str, List[float]]:
    """Step times of every configuration in this one process, the modes taking turns step by step.

    A shared machine whose speed drifts over minutes slows every mode alike, not the one measured then.
    """
    setups = [(c["mode"], _setup(c)) for c in configs]
    for _, (_, _, opt, _, step) in setups:
        for _ in range(warmup):
            step()
            opt.zero_grad(set_to_none=True)
    times: Dict[str, List[float]] = {mode: [] for mode, _ in setups}
    for i in range(steps):
        for mode, (_, _, opt, _, step) in setups[i % len(setups):] + setups[: i % len(setups)]:
            gc.collect()
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
    return times


def measure(config: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one configuration in this process (see the module docstring): a dict of results."""
    device, model, opt, x, step = _setup(config)
    n, s = config["batch_size"], config["image_size"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(config.get("warmup", 1)):
        step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    sync()
    cuda = device.type == "cuda"
    times, peaks, method = [], [], None
    if cuda:
        baseline = torch.cuda.memory_allocated(device)
        for _ in range(config.get("steps", 3)):
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device) - baseline)
            opt.zero_grad(set_to_none=True)
        method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    else:
        phase = config.get("phase", "both")
        if phase != "memory":
            for _ in range(config.get("steps", 3)):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
                opt.zero_grad(set_to_none=True)
        if phase == "time":
            return {"step_s": statistics.median(times), "step_times_s": times}
        allocator = "allocator set by the environment" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else _return_freed_memory()
        gc.collect()
        baseline = _rss_kib("VmRSS") * 1024
        for _ in range(config.get("memory_steps", 1)):
            with _PeakRss() as peak:
                step()
            peaks.append(peak.peak * 1024 - baseline)
            opt.zero_grad(set_to_none=True)
        method = f"{peak.method} ({allocator})"
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        out = model(x)
    del out
    return {
        "mode": config["mode"], "batch_size": n, "image_size": s, "peak_bytes": max(peaks),
        "step_s": statistics.median(times) if times else None, "step_times_s": times, "saved_bytes": saved.bytes,
        "baseline_bytes": baseline, "absolute_peak_bytes": baseline + max(peaks), "peak_method": method,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _run_config(config: Dict[str, Any], subprocess_mode: bool, timeout: Optional[float] = None) -> Dict[str, Any]:
    """One configuration: in a fresh worker process (CPU) or here (CUDA, or subprocess_mode=False)."""
    if not subprocess_mode:
        return measure(config)
    # Two fresh processes: time with the default allocator, memory with glibc returning every freed
    # block of 64 KiB or more at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors.
    # With separate_timing=False one process does both (times then include the page faults).
    separate = config.get("separate_timing", True)
    timed = _worker(dict(config, phase="time"), {}, timeout) if separate and config.get("timed", True) else {}
    if "error" in timed:
        return timed
    phase = "memory" if separate else "both"
    result = _worker(dict(config, phase=phase), _MEMORY_ENV, timeout)
    if "error" not in result:
        result.update(timed)
    return result


_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _interleaved_times(configs: List[Dict[str, Any]], rounds: int) -> Dict[str, Any]:
    """Step times per mode from ``rounds`` rounds of fresh timing processes, modes taking turns.

    Taking turns spreads slow phases of a shared machine over every mode instead of one.
    """
    if rounds == 0:  # all modes in one process, taking turns step by step
        first = configs[0]
        together = dict(mode="together", batch_size=first["batch_size"], phase="together", configs=configs,
                        steps=first["steps"], warmup=first["warmup"], threads=first.get("threads"))
        result = _worker(together, {}, None)
        if "error" not in result:
            return result["times"]
        return {c["mode"]: dict(result, mode=c["mode"]) for c in configs}  # every row names its own mode
    times: Dict[str, Any] = {c["mode"]: [] for c in configs}
    for _ in range(rounds):
        for config in configs:
            mode = config["mode"]
            if isinstance(times[mode], dict):  # failed in an earlier round
                continue
            result = _worker(dict(config, phase="time"), {}, None)
            times[mode] = result if "error" in result else times[mode] + result["step_times_s"]
    return times


def _worker(config: Dict[str, Any], extra_env: Dict[str, str], timeout: Optional[float]) -> Dict[str, Any]:
    env = dict(os.environ, **extra_env)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    threads = config.get("threads")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "densenet_zoo.profiling", "worker", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": config["mode"], "batch_size": config["batch_size"], "error": "timed out"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"mode": config["mode"], "batch_size": config["batch_size"], "error": last}
    return json.loads(lines[-1])


# -- public entry points ---------------------------------------------------------------------------
def profile(
    model: ModelSpec = "densenet121",
    batch_size: int = 16,
    image_size: int = 224,
    modes: Union[str, Sequence[str], None] = "all",
    device: str = "cpu",
    reference: Optional[str] = None,
    *,
    steps: int = 3,
    warmup: int = 1,
    threads: Optional[int] = None,
    subprocess_mode: Optional[bool] = None,
    separate_timing: bool = True,
    rounds: int = 1,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> ProfileReport:
    """Peak memory, saved-for-backward bytes and step time of each mode; ratios against normal mode.

    On CPU, ``rounds > 1`` times every mode in that many fresh processes, the modes taking turns,
    and reports the median over all their steps; ``rounds=0`` times every mode in one process,
    the modes taking turns step by step (``steps`` each), which cancels a drifting machine speed best.

    >>> report = profile("densenet121", batch_size=16, image_size=224, modes="all", reference="torchvision")
    >>> print(report.table()); report.to_json("p.json"); report.to_csv("p.csv"); report.plot("p.png")
    """
    ref = _model_ref(model)
    kwargs = dict(model_kwargs or {})
    _check_sizes(ref, kwargs, batch_size, image_size)
    names = resolve_modes(modes, reference)
    subprocess_mode = not device.startswith("cuda") if subprocess_mode is None else subprocess_mode
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0 (0: all modes in one process, taking turns), got {rounds!r}")
    configs = [dict(model=ref, model_kwargs=kwargs, mode=mode, batch_size=batch_size, image_size=image_size,
                    device=device, steps=steps, warmup=warmup, threads=threads, separate_timing=separate_timing)
               for mode in names]
    interleaved = subprocess_mode and separate_timing
    times = _interleaved_times(configs, rounds) if interleaved else {}
    rows = []
    for config in configs:
        timed = times.get(config["mode"])
        if isinstance(timed, dict):  # the timing process failed: report its error
            rows.append(timed)
            continue
        row = _run_config(dict(config, timed=not interleaved), subprocess_mode)
        if interleaved and "error" not in row:
            row.update(step_s=statistics.median(timed), step_times_s=timed)
        rows.append(row)
    return ProfileReport(rows, dict(environment(device, threads), model=ref, subprocess=subprocess_mode, steps=steps,
                                    warmup=warmup, rounds=rounds))


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> int:
    """Largest ``n`` in [start, limit] with ``fits(n)`` (0 if none), assuming fitting is monotone.

    Doubling from ``start`` until a probe fails, then bisection between the last two probes.
    """
    best, n = 0, start
    while n <= limit and fits(n):
        best, n = n, n * 2
    low, high = best, min(n, limit + 1)
    if best == 0:
        return 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def max_batch(
    model: ModelSpec = "densenet121",
    budget: Union[int, str] = "8GiB",
    image_size: int = 224,
    modes: Union[str, Sequence[str], None] = "all",
    device: str = "cpu",
    *,
    start: int = 1,
    limit: int = 4096,
    threads: Optional[int] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> MaxBatchReport:
    """Largest batch per mode whose training step stays within ``budget`` (absolute peak of the step).

    Doubling from ``start`` until a probe does not fit, then bisection; every CPU probe is a fresh
    process (one warm-up and one measured step).

    >>> max_batch("densenet121", budget="8GiB", image_size=224, modes="none,efficient").table()
    """
    ref = _model_ref(model)
    kwargs = dict(model_kwargs or {})
    probe_model = _check_sizes(ref, kwargs, start, image_size)
    budget_bytes = parse_bytes(budget)
    own = sum(p.numel() * p.element_size() for p in probe_model.parameters())
    if budget_bytes <= own:
        raise ValueError(
            f"budget {budget!r} ({budget_bytes / 2**20:.1f} MiB) is below the model's own size "
            f"({own / 2**20:.1f} MiB of parameters); give a larger --budget"
        )
    subprocess_mode = not device.startswith("cuda")
    results: Dict[str, Any] = {}
    for mode in resolve_modes(modes):
        probes: List[Dict[str, Any]] = []

        def fits(n: int) -> bool:
            config = dict(model=ref, model_kwargs=kwargs, mode=mode, batch_size=n, image_size=image_size,
                          device=device, steps=1, warmup=1, threads=threads)
            row = _run_config(config, subprocess_mode)
            ok = "error" not in row and row["absolute_peak_bytes"] <= budget_bytes
            probes.append(dict(row, fits=ok))
            return ok

        results[mode] = dict(max_batch=largest_fitting(fits, start, limit), probes=probes)
    return MaxBatchReport(results, dict(environment(device, threads), model=ref, budget_bytes=budget_bytes, image_size=image_size))


def depth_sweep(
    depths: Sequence[int] = (40, 100, 160, 250),
    growth_rate: int = 12,
    image_size: int = 32,
    batch_size: int = 16,
    modes: Union[str, Sequence[str], None] = "all",
) -> DepthSweepReport:
    """Saved-for-backward bytes of DenseNet-BC (three blocks of (depth - 4) / 6 layers) per depth and mode.

    Exact counts, measured in this process; the report fits ``bytes ~ depth ** exponent`` per mode.

    >>> depth_sweep([40, 100, 160, 250], growth_rate=12, image_size=32).exponents()
    """
    # "auto" decides by measuring on its first forward, which is all a sweep point runs.
    names = [m for m in resolve_modes(modes) if not m.startswith("torchvision") and m != "auto"]
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    rows = []
    for depth in depths:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 100, 250), got {depth}")
        n = (depth - 4) // 6
        x = torch.randn(batch_size, 3, image_size, image_size)
        for mode in names:
            torch.manual_seed(0)
            model = DenseNet(growth_rate=growth_rate, block_config=(n, n, n), num_init_features=2 * growth_rate,
                             small_inputs=True, num_classes=10, memory_efficient=mode).train()
            with SavedTensorBytes(exclude=model.parameters()) as saved:
                out = model(x)
            del out
            rows.append(dict(depth=depth, mode=mode, saved_bytes=saved.bytes))
    return DepthSweepReport(rows, dict(environment("cpu", None), growth_rate=growth_rate, image_size=image_size, batch_size=batch_size))


def _worker_main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] != "worker":
        print("usage: python -m densenet_zoo.profiling worker CONFIG_JSON", file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    if config.get("phase") == "together":
        result: Dict[str, Any] = {"times": measure_together(config["configs"], config["steps"], config["warmup"])}
    else:
        result = measure(config)
    print(json.dumps(result), flush=True)
    return 0

