"""Memory and time of training steps per memory strategy, measured the same way for every mode.

What is measured, per configuration (model, mode, batch size, image size):

* CPU: fresh worker processes per configuration, started with the chosen allocator (``default``:
  the process exactly as a user starts it; see :mod:`densenet_zoo.allocator`). The peak is the
  highest resident memory over the measured steps (>= 5 by default) after warm-up, above the
  baseline with the model, the optimizer state and the data loaded, before the first step; the
  growth of the per-step peak from the first measured step to the last is reported too
  (:mod:`densenet_zoo.profiling.worker` has the details).
* CUDA: ``torch.cuda.reset_peak_memory_stats`` before and ``max_memory_allocated`` after each
  step, minus ``memory_allocated`` at the same baseline.
* Saved for backward: unique storages packed by ``saved_tensors_hooks`` during one forward
  (parameters excluded); deterministic, the same on any machine.
* Time: median over the measured steps after warm-up; ``rounds=0`` runs every mode in one process,
  the modes taking turns step by step.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._utils import UsageError
from ..allocator import allocator_env, describe
from ..memory import SavedTensorBytes, list_memory_strategies, parse_bytes
from ..memory.estimate import check_fits
from ..models import DenseNet
from ..models.configs import canonical_name
from .report import DepthSweepReport, MaxBatchReport, ProfileReport, environment
from .search import largest_fitting
from .worker import AUTOCAST_DTYPES, CHANNELS_LAST, COMPILE, COMPILED_MODES, WORKER_COMMAND, build, measure, parse_mode

__all__ = ["profile", "max_batch", "depth_sweep", "resolve_modes"]

REFERENCE_MODES = {"torchvision": ["torchvision", "torchvision_memory_efficient"]}
ModelSpec = Union[str, Callable[..., nn.Module]]


# -- arguments -------------------------------------------------------------------------------------
def resolve_modes(modes: Union[str, Sequence[str], None], reference: Optional[str] = None) -> List[str]:
    """``"all"``, ``"compiled"``, ``"none,efficient,fused:compile"`` or a list -> validated mode names
    (normal mode always first). ``"compiled"`` stands for :data:`~.worker.COMPILED_MODES`; a name may end
    in ``:channels_last``, ``:compile`` or ``:compile=B`` (:func:`~.worker.parse_mode`)."""
    tokens = ["all"] if modes is None else [str(m).strip() for m in (modes.split(",") if isinstance(modes, str) else modes)]
    groups = {"all": list_memory_strategies(), "compiled": list(COMPILED_MODES)}
    names = [n for t in tokens if t for n in groups.get(t, [t])]
    out = ["none"]
    for name in names:
        base = parse_mode(name).name
        if base not in list_memory_strategies() + REFERENCE_MODES["torchvision"]:
            known = ", ".join(list_memory_strategies() + REFERENCE_MODES["torchvision"])
            raise UsageError(f"unknown mode {name!r}; expected 'all', 'compiled' or comma-separated names from: "
                             f"{known} (each may end in {CHANNELS_LAST!r}, {COMPILE!r} or '{COMPILE}=B')")
        out.append(name)
    if reference is not None:
        if reference not in REFERENCE_MODES:
            raise UsageError(f"unknown reference {reference!r}; expected one of {', '.join(REFERENCE_MODES)}")
        out += REFERENCE_MODES[reference]
    return list(dict.fromkeys(out))


def _model_ref(model: ModelSpec) -> str:
    if isinstance(model, str):
        return canonical_name(model)
    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or "<" in qualname:
        raise UsageError(
            f"model {model!r} cannot be rebuilt in a worker process; pass a model name such as 'densenet121' "
            "or a module-level builder function"
        )
    return f"{module}:{qualname}"


_LOWEST = {"steps": 1, "warmup": 0, "threads": 1, "rounds": 0}


def _check_counts(**counts: Any) -> None:
    """Each count an integer at or above its lowest value (:data:`_LOWEST`); ``threads`` may also be None."""
    for name, value in counts.items():
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < _LOWEST[name]:
            raise UsageError(f"{name} must be an integer >= {_LOWEST[name]}, got {value!r}; pass --{name} {max(_LOWEST[name], 1)} or more")


def _check_autocast(autocast: Optional[str]) -> Optional[str]:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "none": None, "": None}
    name = aliases.get(str(autocast).lower(), autocast) if autocast is not None else None
    if name is not None and name not in AUTOCAST_DTYPES:
        raise UsageError(f"autocast {autocast!r} is not understood; expected bfloat16 (bf16), float16 (fp16) or none")
    return name


def _check_sizes(ref: str, kwargs: Dict[str, Any], batch_size: int, image_size: int) -> nn.Module:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model = build(ref, "none", kwargs)
    low = getattr(model, "min_input_size", 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < low:
        raise UsageError(f"image_size {image_size!r} is too small for this model: it needs at least {low} pixels; raise --image-size")
    return model


def _prepared(model: ModelSpec, model_kwargs: Optional[Dict[str, Any]], batch_size: int, image_size: int,
              autocast: Optional[str], **counts: Any) -> Tuple[str, Dict[str, Any], nn.Module, Optional[str]]:
    """The checks :func:`profile` and :func:`max_batch` share, before anything runs.

    Returns the model's reference for worker processes, its builder's arguments, the model built in
    normal mode, and the autocast dtype's name.
    """
    ref, kwargs = _model_ref(model), dict(model_kwargs or {})
    _check_counts(**counts)
    built = _check_sizes(ref, kwargs, batch_size, image_size)
    return ref, kwargs, built, _check_autocast(autocast)


def _refuse_unfittable(model: DenseNet, names: List[str], image_size: int, batch_size: int, device: str) -> None:
    """Refuses a size that even the leanest mode asked for cannot hold (the other modes fail in their rows)."""
    saving = any(parse_mode(n).name in list_memory_strategies() and parse_mode(n).name != "none" for n in names)
    check_fits(model.set_memory_efficient("fused_lean" if saving else False), image_size, batch_size, torch.device(device),
               f"--batch-size {batch_size} at --image-size {image_size}")


def _budget_bytes(budget: Union[int, str], model: nn.Module) -> int:
    """The budget in bytes, refused when it cannot even hold the model's parameters."""
    budget_bytes = parse_bytes(budget)
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    if budget_bytes <= own:
        raise UsageError(
            f"budget {budget!r} ({budget_bytes / 2**20:.1f} MiB) is below the model's own size "
            f"({own / 2**20:.1f} MiB of parameters); give a larger --budget"
        )
    return budget_bytes


def _run_config(config: Dict[str, Any], subprocess_mode: bool, timeout: Optional[float] = None) -> Dict[str, Any]:
    """One configuration: in a fresh worker process (CPU) or here (CUDA, or subprocess_mode=False)."""
    if not subprocess_mode:
        return _measure_here(config)
    # Time and memory from separate processes (the high-water resets cost a little time), unless
    # separate_timing=False; both run with the configuration's allocator.
    env = allocator_env(config.get("allocator", "default"))
    separate = config.get("separate_timing", True)
    timed = _worker(dict(config, phase="time"), env, timeout) if separate and config.get("timed", True) else {}
    if "error" in timed:
        return timed
    result = _worker(dict(config, phase="memory" if separate else "both"), env, timeout)
    if "error" not in result:
        result.update(timed)
    return result


def _interleaved_times(configs: List[Dict[str, Any]], rounds: int) -> Dict[str, Any]:
    """Step times per mode from ``rounds`` rounds of fresh timing processes, modes taking turns.

    Taking turns spreads slow phases of a shared machine over every mode instead of one.
    """
    if rounds == 0:  # all modes in one process, taking turns step by step
        first = configs[0]
        together = dict(mode="together", batch_size=first["batch_size"], phase="together", configs=configs,
                        steps=first["steps"], warmup=first["warmup"], threads=first.get("threads"))
        result = _worker(together, allocator_env(first.get("allocator", "default")), None)
        if "error" not in result:
            return result["times"]
        return {c["mode"]: dict(result, mode=c["mode"]) for c in configs}  # every row names its own mode
    times: Dict[str, Any] = {c["mode"]: [] for c in configs}
    for _ in range(rounds):
        for config in configs:
            mode = config["mode"]
            if isinstance(times[mode], dict):  # failed in an earlier round
                continue
            result = _worker(dict(config, phase="time"), allocator_env(config.get("allocator", "default")), None)
            times[mode] = result if "error" in result else times[mode] + result["step_times_s"]
    return times


def _worker(config: Dict[str, Any], extra_env: Dict[str, str], timeout: Optional[float]) -> Dict[str, Any]:
    env = dict(os.environ, **extra_env)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    threads = config.get("threads")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, *WORKER_COMMAND, json.dumps(config)]
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
def profile(model: ModelSpec = "densenet121", batch_size: int = 16, image_size: int = 224,
            modes: Union[str, Sequence[str], None] = "all", device: str = "cpu", reference: Optional[str] = None, *,
            steps: int = 5, warmup: int = 1, threads: Optional[int] = None, subprocess_mode: Optional[bool] = None,
            separate_timing: bool = True, rounds: int = 1, model_kwargs: Optional[Dict[str, Any]] = None,
            allocator: str = "default", autocast: Optional[str] = None,
            on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> ProfileReport:
    """Peak memory, saved-for-backward bytes and step time of each mode; ratios against normal mode.

    Args:
        model: an architecture name, or a function that builds the model.
        batch_size: images per training step.
        image_size: side of the square input.
        modes: ``"all"``, ``"compiled"`` or comma-separated strategy names (each may end in
            ``":channels_last"``, ``":compile"`` or ``":compile=B"``: see :func:`resolve_modes`) or a list.
        device: ``"cpu"`` or ``"cuda"``.
        reference: ``"torchvision"`` adds torchvision's densenet, normal and ``memory_efficient=True``.
        steps: measured steps (memory on CPU: the peak over ``max(steps, 5)``).
        warmup: steps run before measuring.
        threads: torch CPU threads of each measurement.
        subprocess_mode: measure in fresh worker processes; ``None``: on CPU only.
        separate_timing: time and measure memory in separate processes.
        rounds: ``> 1``: every mode timed in that many fresh processes, the modes taking turns;
            ``0``: every mode in one process, taking turns step by step (best against a drifting machine).
        model_kwargs: arguments for the model's builder.
        allocator: ``"default"``, ``"tcmalloc"``, ``"jemalloc"`` or ``"mmap-threshold"`` for the workers.
        autocast: ``"bfloat16"`` or ``"float16"`` runs the forward under ``torch.autocast``.
        on_row: ``on_row(row)`` is called as each mode's row is measured (progress, partial results).

    Returns:
        A report: ``table()``, ``row(mode)``, ``to_json``, ``to_csv``, ``plot``.

    Raises:
        ValueError: an unknown mode, a size too small for the model, a bad count or allocator.

    Example:
        profile("densenet121", modes="all", reference="torchvision").table()
    """
    ref, kwargs, built, autocast = _prepared(model, model_kwargs, batch_size, image_size, autocast,
                                             steps=steps, warmup=warmup, threads=threads, rounds=rounds)
    names = resolve_modes(modes, reference)
    _refuse_unfittable(built, names, image_size, batch_size, device)
    subprocess_mode = not device.startswith("cuda") if subprocess_mode is None else subprocess_mode
    if subprocess_mode:
        allocator_env(allocator)  # refuses an unknown or absent allocator before anything runs
    configs = [dict(model=ref, model_kwargs=kwargs, mode=mode, batch_size=batch_size, image_size=image_size,
                    device=device, steps=steps, memory_steps=max(steps, 5), warmup=warmup, threads=threads,
                    separate_timing=separate_timing, allocator=allocator, autocast=autocast)
               for mode in names]
    return ProfileReport(_profile_rows(configs, subprocess_mode, rounds, on_row),
                         dict(environment(device, threads, autocast), model=ref, subprocess=subprocess_mode, steps=steps,
                              warmup=warmup, rounds=rounds, autocast=autocast, memory_steps=max(steps, 5),
                              allocator=describe(allocator) if subprocess_mode else "as this process runs"))


def _profile_rows(configs: List[Dict[str, Any]], subprocess_mode: bool, rounds: int,
                  on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """One row per configuration; where time and memory come from separate processes, the times come
    from processes in which the modes take turns (:func:`_interleaved_times`)."""
    interleaved = subprocess_mode and configs[0]["separate_timing"]
    times = _interleaved_times(configs, rounds) if interleaved else {}
    rows = []
    for config in configs:
        timed = times.get(config["mode"])
        if isinstance(timed, dict):  # the timing process failed: report its error
            row = timed
        else:
            row = _run_config(dict(config, timed=not interleaved), subprocess_mode)
            if interleaved and "error" not in row:
                row.update(step_s=statistics.median(timed), step_times_s=timed)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def max_batch(model: ModelSpec = "densenet121", budget: Union[int, str] = "8GiB", image_size: int = 224,
              modes: Union[str, Sequence[str], None] = "all", device: str = "cpu", *, start: int = 1, limit: int = 4096,
              threads: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None, allocator: str = "default",
              autocast: Optional[str] = None, probe_timeout: Optional[float] = None,
              on_mode: Optional[Callable[[str, Dict[str, Any]], None]] = None, resolution: int = 1) -> MaxBatchReport:
    """Largest batch per mode whose training step stays within ``budget`` (absolute peak of the step).

    Probes where the line through two measured probes reaches the budget (memory grows about
    linearly with the batch), within the bracket known so far (:func:`~.search.largest_fitting`);
    every probe is a fresh process (one warm-up and two measured steps), on CUDA too.

    Args:
        model: an architecture name, or a function that builds the model.
        budget: bytes, or a string such as ``"8GiB"``.
        image_size: side of the square input.
        modes: as for :func:`profile`.
        device: ``"cpu"`` or ``"cuda"``.
        start: the first batch size probed.
        limit: the largest batch size probed.
        threads: torch CPU threads of each probe.
        model_kwargs: arguments for the model's builder.
        allocator: as for :func:`profile`.
        autocast: as for :func:`profile`.
        probe_timeout: seconds after which a probe counts as not fitting.
        on_mode: ``on_mode(mode, result)`` is called as each mode is done.
        resolution: search to this many images (the batch reported fits, one ``resolution`` more may too).

    Returns:
        A report: ``table()``, ``to_json``, ``to_csv``, ``plot``.

    Raises:
        ValueError: a budget below the model's own size, or arguments :func:`profile` refuses.

    Example:
        max_batch("densenet121", budget="8GiB", image_size=224, modes="none,efficient").table()
    """
    ref, kwargs, built, autocast = _prepared(model, model_kwargs, start, image_size, autocast, threads=threads)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < start:
        raise UsageError(f"limit must be an integer >= start ({start}), got {limit!r}; raise the limit or lower the start")
    budget_bytes = _budget_bytes(budget, built)
    allocator_env(allocator)  # refuses an unknown or absent allocator before anything runs
    results: Dict[str, Any] = {}
    for mode in resolve_modes(modes):
        probe = dict(model=ref, model_kwargs=kwargs, mode=mode, image_size=image_size, device=device, steps=2, warmup=1,
                     threads=threads, allocator=allocator, autocast=autocast, separate_timing=False)
        results[mode] = _largest_batch(probe, budget_bytes, probe_timeout, start, limit, resolution)
        if on_mode is not None:  # e.g. to save partial results of a long search
            on_mode(mode, results[mode])
    meta = dict(model=ref, budget_bytes=budget_bytes, image_size=image_size, autocast=autocast, resolution=resolution)
    return MaxBatchReport(results, dict(environment(device, threads, autocast), **meta, allocator=describe(allocator)))


def _largest_batch(probe: Dict[str, Any], budget_bytes: int, timeout: Optional[float], start: int, limit: int,
                   resolution: int) -> Dict[str, Any]:
    """The largest batch of one mode within the budget, and every probe taken to find it.

    Every probe runs in a fresh process, on CUDA too: a probe that ran out of memory leaves nothing
    behind, and its error is a probe that does not fit.
    """
    probes: List[Dict[str, Any]] = []

    def peak(n: int) -> Optional[float]:
        row = _run_config(dict(probe, batch_size=n), True, timeout)
        measured = None if "error" in row else row["absolute_peak_bytes"]
        probes.append(dict(row, fits=measured is not None and measured <= budget_bytes))
        return measured

    return dict(max_batch=largest_fitting(peak, budget_bytes, start, limit, resolution), probes=probes)


def _measure_here(config: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`measure` in this process; a failure (CUDA out of memory included) becomes the row's error,
    as it does for a worker process, so one mode cannot stop the others."""
    try:
        return measure(config)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        first = (str(exc).strip().splitlines() or [""])[0]
        return {"mode": config["mode"], "batch_size": config["batch_size"], "error": f"{type(exc).__name__}: {first}"}
    finally:
        if config["device"].startswith("cuda"):
            gc.collect()  # a failed step's traceback holds its frames (and their tensors) in cycles
            torch.cuda.empty_cache()


def depth_sweep(
    depths: Sequence[int] = (40, 100, 160, 250),
    growth_rate: int = 12,
    image_size: int = 32,
    batch_size: int = 16,
    modes: Union[str, Sequence[str], None] = "all",
) -> DepthSweepReport:
    """Saved-for-backward bytes of DenseNet-BC (three blocks of (depth - 4) / 6 layers) per depth and mode.

    Exact counts, measured in this process; the report fits ``bytes ~ depth ** exponent`` per mode.

    Args:
        depths: network depths, each ``6n + 4``.
        growth_rate: k of the networks.
        image_size: side of the square input.
        batch_size: images per forward.
        modes: as for :func:`profile` (``auto`` and torchvision's are left out).

    Returns:
        A report: ``table()``, ``exponents()``, ``to_json``, ``to_csv``, ``plot``.

    Raises:
        ValueError: a depth that is not ``6n + 4``, or a size below 1.

    Example:
        depth_sweep([40, 100, 160, 250], growth_rate=12, image_size=32).exponents()
    """
    # "auto" decides by measuring on its first forward, which is all a sweep point runs.
    names = [m for m in resolve_modes(modes) if not m.startswith("torchvision") and m != "auto"]
    if image_size < 1 or batch_size < 1:
        raise UsageError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    rows = []
    for depth in depths:
        if depth < 10 or (depth - 4) % 6:
            raise UsageError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 100, 250), got {depth}")
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
