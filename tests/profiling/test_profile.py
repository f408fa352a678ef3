"""Profiler: every mode measured in its own process, exact saved-bytes counts, reports and bad input."""

import json
import random

import pytest
import torch

import densenet_zoo as dz
from densenet_zoo.cli import main
from densenet_zoo.memory import SavedTensorBytes
from densenet_zoo.profiling.rss import PeakRss
from densenet_zoo.profiling.runner import resolve_modes
from densenet_zoo.profiling.search import largest_fitting

TINY = dict(growth_rate=8, block_config=[2, 2, 2], num_init_features=16)


@pytest.mark.timeout(600)
def test_profile_every_mode_in_subprocesses(tmp_path):
    # 48 px: activations above glibc's 64 KiB mmap threshold, so every step raises resident memory
    report = dz.profile("densenet_bc_100", batch_size=2, image_size=48, modes="all", steps=1, threads=1,
                        separate_timing=False, model_kwargs=TINY)
    assert report.meta["subprocess"] is True and report.meta["torch"] == torch.__version__
    assert report.modes == dz.list_memory_strategies()
    for row in report.rows:
        assert "error" not in row, row
        assert row["peak_bytes"] > 0 and row["step_s"] > 0 and row["baseline_bytes"] > 0
    normal = report.row("none")["saved_bytes"]
    for mode in ("bottleneck", "efficient", "shared", "norms", "layer", "fused", "fused_lean", "block"):
        assert report.row(mode)["saved_bytes"] < normal, mode
    table = report.table()
    assert all(mode in table for mode in report.modes) and "threads=1" in table

    rows = json.loads(report.to_json(tmp_path / "p.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == report.modes
    csv_lines = report.to_csv(tmp_path / "p.csv").read_text().splitlines()
    assert csv_lines[0].startswith("mode,") and len(csv_lines) == 1 + len(report.modes)
    assert report.plot(tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(300)
def test_profile_times_and_measures_memory_in_separate_processes():
    # mmap-threshold: resident memory follows live tensors, so a tiny model's saving shows
    seen = []
    report = dz.profile("densenet_bc_100", batch_size=8, image_size=16, modes="none,layer", steps=2, threads=1,
                        model_kwargs=TINY, allocator="mmap-threshold", on_row=seen.append)
    # each row handed over as it was measured, with its times
    assert [(r["mode"], r["step_s"], r["peak_bytes"]) for r in seen] == [(r["mode"], r["step_s"], r["peak_bytes"]) for r in report.rows]
    for row in report.rows:
        assert len(row["step_times_s"]) == 2 and row["allocator"].startswith("mmap-threshold")
        assert len(row["step_peaks_bytes"]) == 5
    # Two-layer blocks: the peak is dominated by the stem and one-time buffers, not by what a strategy keeps
    assert report.row("layer")["peak_bytes"] > 0 and report.row("none")["peak_bytes"] > 0
    assert report.row("layer")["saved_bytes"] < report.row("none")["saved_bytes"]


def test_torchvision_reference_rows_match_our_modes():
    """torchvision's normal and memory_efficient networks keep exactly what our none/bottleneck keep."""
    report = dz.profile("densenet121", batch_size=2, image_size=32, modes="none,bottleneck", reference="torchvision",
                        steps=1, warmup=0, subprocess_mode=False)
    assert report.modes == ["none", "bottleneck", "torchvision", "torchvision_memory_efficient"]
    assert report.row("torchvision")["saved_bytes"] == report.row("none")["saved_bytes"]
    assert report.row("torchvision_memory_efficient")["saved_bytes"] == report.row("bottleneck")["saved_bytes"]


def test_saved_tensor_bytes_counts_unique_storages():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorBytes() as saved:
        y = x * x  # saves x twice: one storage
    assert saved.bytes == 4000
    with SavedTensorBytes(exclude=[x]) as saved:
        z = (x * x).sigmoid()  # x excluded; sigmoid saves its output
    assert saved.bytes == 4000
    y.sum().backward(), z.sum().backward()


def test_peak_rss_sees_a_large_temporary():
    with PeakRss() as peak:
        start = peak.peak
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
        del t
    assert (peak.peak - start) * 1024 >= 60 * 2**20


def _probes(shape):
    """``shape`` as a probe function that records the sizes it was asked for."""
    asked = []

    def peak(n):
        asked.append(n)
        return shape(n)

    return peak, asked


def test_largest_fitting_on_a_line_takes_four_probes():
    # Memory of a step: a constant (model, optimizer state) plus activations per image.
    peak, asked = _probes(lambda n: 1.5e9 + 120e6 * n)
    budget = 1.5e9 + 120e6 * 573 + 1
    found = largest_fitting(peak, budget, start=64, limit=4096, resolution=8)
    assert found <= 573 < found + 8 and len(asked) == 4  # doubling then bisection: 11 probes
    peak, asked = _probes(lambda n: 100 + 3 * n)
    assert largest_fitting(peak, 1000, start=64, resolution=1) == 300 and len(asked) == 4
    with pytest.raises(ValueError, match="resolution"):
        largest_fitting(peak, 1000, resolution=0)


def _doubling_and_bisection(start, limit, resolution):
    return (limit // start).bit_length() + 1 + max(limit - start, 1).bit_length() - resolution.bit_length() + 1


SHAPES = {
    "line": lambda n: 7 + 2 * n,
    "convex": lambda n: n * n,
    "concave": lambda n: 50 * n ** 0.5,
    "stairs": lambda n: (n // 37) * 37 + 1,
    "workspace jump": lambda n: n + (400 if n > 150 else 0),
    "flat then steep": lambda n: 10 if n < 200 else 10 + (n - 199) ** 3,
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("resolution", [1, 8])
def test_largest_fitting_holds_its_promise_on_any_rising_memory(shape, resolution):
    # Any peak that does not fall as the batch grows, readings that stop where a probe runs out of memory,
    # and budgets everywhere in the range: the size found fits, the largest is within the resolution,
    # every probe is a new size inside [start, limit], and the count stays within twice doubling and bisection's.
    rng = random.Random(f"{shape}{resolution}")
    for _ in range(60):
        start, limit = rng.choice([1, 4, 64]), rng.choice([100, 700, 4096])
        oom = rng.choice([None, rng.randint(start, limit)])  # from here on, the probe fails without a reading
        budget = rng.uniform(SHAPES[shape](start) * 0.9, SHAPES[shape](limit) * 1.1)

        def measured(n):
            return None if oom is not None and n >= oom else SHAPES[shape](n)

        peak, asked = _probes(measured)
        found = largest_fitting(peak, budget, start=start, limit=limit, resolution=resolution)
        fitting = [n for n in range(start, limit + 1) if measured(n) is not None and measured(n) <= budget]
        largest = max(fitting, default=0)
        assert (found == 0 and largest == 0) or (found in fitting and largest < found + resolution)
        assert len(set(asked)) == len(asked) and all(start <= n <= limit for n in asked)
        assert len(asked) <= 2 * _doubling_and_bisection(start, limit, resolution), (asked, budget, oom)


def test_largest_fitting_when_nothing_or_everything_fits():
    peak, asked = _probes(lambda n: n)
    assert largest_fitting(peak, 0.5, start=4) == 0 and asked == [4]
    assert largest_fitting(peak, 1e9, start=4, limit=100) == 100
    assert largest_fitting(peak, 1e9, start=200, limit=100) == 0


@pytest.mark.timeout(300)
def test_max_batch_finds_the_largest_batch_within_a_budget_in_few_probes():
    # A budget where normal mode fits about 64 images of 32x32, read off two probes of this machine; the
    # search must report a batch whose probe fitted, beside one that did not at most 8 images above it (or
    # the limit).
    kwargs = dict(growth_rate=12, block_config=[4, 4, 4], num_init_features=24)
    calibration = dz.max_batch("densenet_bc_100", budget="1TiB", image_size=32, modes="none", start=16, limit=32,
                               model_kwargs=kwargs)
    peaks = {p["batch_size"]: p["absolute_peak_bytes"] for p in calibration.results["none"]["probes"]}
    assert sorted(peaks) == [16, 32] and calibration.results["none"]["max_batch"] == 32
    budget = int(peaks[32] + 2 * (peaks[32] - peaks[16]))
    report = dz.max_batch("densenet_bc_100", budget=budget, image_size=32, modes="none,fused_lean", start=16,
                          limit=256, resolution=8, model_kwargs=kwargs)
    for mode, result in report.results.items():
        probes = {p["batch_size"]: p for p in result["probes"]}
        found = result["max_batch"]
        assert probes[found]["fits"] and probes[found]["absolute_peak_bytes"] <= budget, mode
        above = [n for n, p in probes.items() if not p["fits"] and found < n <= found + 8]
        # Near the limit nothing above it is probed: the search ends once the limit is within the resolution.
        assert above or 256 - found < 8, (mode, sorted(probes))
        # A process's peak is noisy, so the line's 4 probes become 8 at times: bound only by the search's promise.
        assert len(probes) <= 2 * _doubling_and_bisection(16, 256, 8), (mode, sorted(probes))
    assert report.results["fused_lean"]["max_batch"] > 2 * report.results["none"]["max_batch"]
    assert "fused_lean" in report.table() and report.meta["budget_bytes"] == budget


def test_depth_sweep_quadratic_vs_linear():
    report = dz.depth_sweep([16, 40, 64, 100], growth_rate=12, image_size=8, batch_size=1, modes="none,efficient,layer")
    exps = report.exponents()
    # Small depths mix the quadratic term with linear ones (stem, transitions), so normal mode's fit is
    # below 2 here; the gap to the strategies that keep only linear storage is the point.
    assert exps["none"] > 1.4 and exps["none"] - exps["layer"] > 0.4
    assert exps["layer"] < 1.15 and exps["efficient"] < 1.3
    assert "L=100" in report.table()


def test_bad_input_gives_one_line_errors(capsys):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        resolve_modes("none,fast")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        dz.profile("densenet_bc_100", batch_size=0, image_size=16, model_kwargs=TINY)
    with pytest.raises(ValueError, match="too small"):
        dz.profile("densenet121", batch_size=2, image_size=16)
    with pytest.raises(ValueError, match="below the model's own size"):
        dz.max_batch("densenet121", budget="10MB", image_size=224)
    for limit in (0, 7, 8.5, True):
        with pytest.raises(ValueError, match=r"limit must be an integer >= start \(8\)"):
            dz.max_batch("densenet_bc_100", budget="8GiB", image_size=32, start=8, limit=limit, model_kwargs=TINY)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        dz.depth_sweep([41])
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        dz.profile(lambda: None, batch_size=1, image_size=32)
    assert main(["profile", "--modes", "none,fast", "--model", "densenet_bc_100"]) == 1
    assert main(["profile", "--max-batch", "--budget", "1MiB"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown mode" in err[0] and "below the model's own size" in err[1]


def test_cli_depth_sweep_writes_files(tmp_path, capsys):
    assert main(["profile", "--depth-sweep", "16,28", "--image-size", "8", "--batch-size", "1", "--modes", "none,layer", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "L=28" in out
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"depth_sweep.{suffix}").stat().st_size > 0


@pytest.mark.timeout(300)
def test_interleaved_rounds_and_channels_last_rows():
    report = dz.profile("densenet_bc_100", batch_size=2, image_size=48, modes="none:channels_last", steps=2,
                        rounds=2, threads=1, model_kwargs=TINY)
    assert report.modes == ["none", "none:channels_last"]
    for row in report.rows:
        assert "error" not in row, row
        assert len(row["step_times_s"]) == 4 and row["peak_bytes"] > 0  # 48 px: every step raises resident memory
    # a channels_last row runs the same network in another layout: the same tensors saved for backward
    assert report.row("none:channels_last")["saved_bytes"] == report.row("none")["saved_bytes"] > 0
    assert "2 interleaved rounds" in report.table()
    assert resolve_modes("all,layer:channels_last")[-1] == "layer:channels_last"
    together = dz.profile("densenet_bc_100", batch_size=2, image_size=48, modes="fused", steps=3, rounds=0, threads=1,
                          model_kwargs=TINY)
    assert [len(r["step_times_s"]) for r in together.rows] == [3, 3] and "taking turns step by step" in together.table()
    with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
        dz.profile("densenet_bc_100", modes="none", rounds=-1, model_kwargs=TINY, image_size=48)
    with pytest.raises(ValueError, match="unknown mode 'fusd:channels_last'"):
        resolve_modes("fusd:channels_last")


@pytest.mark.timeout(120)
def test_failed_one_process_timing_reports_every_mode_by_name():
    seen = []
    report = dz.profile("densenet_bc_100", batch_size=2, image_size=48, modes="torchvision", steps=1, rounds=0,
                        threads=1, model_kwargs=TINY, on_row=seen.append)
    assert report.modes == ["none", "torchvision"] and [r["mode"] for r in seen] == report.modes
    assert all("torchvision has no reference" in r["error"] for r in report.rows)


@pytest.mark.timeout(300)
def test_report_names_the_allocator_and_the_steps_of_the_peak(tmp_path):
    from densenet_zoo.allocator import find_library

    allocator = "tcmalloc" if find_library("tcmalloc") else "mmap-threshold"
    report = dz.profile("densenet_bc_100", batch_size=2, image_size=32, modes="fused", steps=1, threads=1,
                        model_kwargs=TINY, allocator=allocator, separate_timing=False)
    assert report.meta["allocator"].startswith(allocator) and f"allocator={allocator}" in report.table()
    for row in report.rows:
        assert row["allocator"].startswith(allocator), row  # what the worker process itself found loaded
        assert len(row["step_peaks_bytes"]) == 5 and row["peak_bytes"] == max(row["step_peaks_bytes"])
        assert row["peak_growth_bytes"] == row["step_peaks_bytes"][-1] - row["step_peaks_bytes"][0]
    report.to_json(tmp_path / "p.json"), report.to_csv(tmp_path / "p.csv")
    assert "peak_growth_bytes" in (tmp_path / "p.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.json"]  # no temporary files left behind
    default = dz.profile("densenet_bc_100", batch_size=2, image_size=32, modes="none", steps=1, threads=1,
                         model_kwargs=TINY, separate_timing=False)
    assert default.meta["allocator"].startswith("default") and default.row("none")["allocator"].startswith("default")


def test_absent_allocator_is_refused_before_anything_runs(monkeypatch):
    from densenet_zoo import allocator

    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", ())
    with pytest.raises(ValueError, match="apt-get install libtcmalloc-minimal4"):
        dz.profile("densenet_bc_100", batch_size=2, image_size=32, modes="none", model_kwargs=TINY, allocator="tcmalloc")


@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], "steps must be an integer >= 1"), (["--steps", "0"], "steps must be an integer >= 1"),
    (["--warmup", "-2"], "warmup must be an integer >= 0"), (["--batch-size", "-2"], "batch_size must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"), (["--image-size", "0"], "--image-size must be >= 1"),
    (["--image-size", "-3"], "--image-size must be >= 1"), (["--threads", "0"], "threads must be an integer >= 1"),
    (["--autocast", "float16", "--steps", "-1"], "steps must be"),
])
def test_cli_bad_counts_exit_1_with_one_line(args, message, capsys):
    assert main(["profile", "--model", "densenet_bc_100", "--modes", "none"] + args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.timeout(600)
def test_fused_strategies_keep_their_saving_over_steps_in_a_default_process():
    # Default glibc malloc, nothing preloaded: what a user runs. Growth is the mean of the last two
    # steps' peaks minus the mean of the first two, bounded by 24 MiB (the peaks of this model are
    # ~130 MiB; single steps scatter by up to ~25 MiB on a shared machine, a leak grows every step).
    report = dz.profile("densenet_bc_100", batch_size=4, image_size=64, modes="fused,fused_lean", steps=1, threads=1,
                        separate_timing=False, model_kwargs=dict(growth_rate=12, block_config=[6, 6, 6], num_init_features=24))
    normal = report.row("none")
    for mode in ("fused", "fused_lean"):
        row = report.row(mode)
        peaks = row["step_peaks_bytes"]
        assert row["allocator"].startswith("default") and len(peaks) == 5
        growth = (peaks[-1] + peaks[-2]) / 2 - (peaks[0] + peaks[1]) / 2
        assert growth <= 24 * 2**20 and max(peaks) <= peaks[0] + 40 * 2**20, peaks
        assert row["peak_bytes"] < 0.85 * normal["peak_bytes"], (row["peak_bytes"], normal["peak_bytes"])


def test_mode_suffixes_parse_and_bad_ones_say_what_is_accepted():
    from densenet_zoo.profiling.worker import COMPILED_MODES, ModeSpec, parse_mode

    assert parse_mode("fused") == ModeSpec("fused")
    assert parse_mode("fused:channels_last:compile") == ModeSpec("fused", True, True, None)
    assert parse_mode("none:compile=0.3") == ModeSpec("none", False, True, 0.3)
    assert resolve_modes("compiled") == ["none", *COMPILED_MODES]
    assert resolve_modes("fused,compiled")[:3] == ["none", "fused", "none:compile"]
    for bad, message in [("none:compile=0", r"in \(0, 1\]"), ("none:compile=x", r"in \(0, 1\]"),
                         ("none:compile=1.5", r"in \(0, 1\]"), ("fused:compiled", "unknown suffix ':compiled'"),
                         ("fusd:compile", "unknown mode 'fusd:compile'")]:
        with pytest.raises(ValueError, match=message):
            resolve_modes(bad)


@pytest.mark.timeout(300)
def test_compiled_rows_measure_the_compiled_model():
    report = dz.profile("densenet_bc_100", batch_size=2, image_size=32, modes="none:compile=0.3,fused_lean:compile",
                        steps=1, threads=1, separate_timing=False, model_kwargs=TINY)  # one process per mode
    for row in report.rows:
        assert "error" not in row, row
    compiled, normal = report.row("fused_lean:compile"), report.row("none")
    assert "baseline after compiling" in compiled["peak_method"]
    assert compiled["warmup_s"] > normal["warmup_s"]  # its warm-up compiled
    # what the compiled graph saves: less than normal mode, with the fused blocks and with the budget
    assert compiled["saved_bytes"] < report.row("none:compile=0.3")["saved_bytes"] < normal["saved_bytes"]
