"""Reports of the profiler: tables, JSON, CSV and plots."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .._utils import PathLike, atomic_write, csv_kind, json_kind, save_figure
from ..hardware import bf16_cost_note, cpu_capabilities, describe_hardware

MB = 2**20


def environment(device: str, threads: Optional[int], autocast: Optional[str] = None) -> Dict[str, Any]:
    """Machine, threads, CPU capabilities and versions that a report states (and what bf16 costs where it is emulated)."""
    import torchvision

    caps = cpu_capabilities()
    info = {
        "machine": platform.node(), "platform": platform.platform(), "cpu": caps.name, "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "device": device, "hardware": describe_hardware(device),
        "capabilities": caps.as_dict(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    note = bf16_cost_note(device) if autocast == "bfloat16" else None
    if note:
        info["note"] = note
    return info


def _write(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _header(meta: Dict[str, Any]) -> str:
    bits = [f"{meta.get('model', '')}".strip(), f"device={meta.get('device')}", f"cpu={meta.get('cpu')}",
            f"threads={meta.get('threads')}", f"torch={meta.get('torch')}", f"torchvision={meta.get('torchvision')}"]
    if meta.get("gpu"):
        bits.insert(2, f"gpu={meta['gpu']}")
    if meta.get("allocator"):
        bits.append(f"allocator={meta['allocator']}")
    if meta.get("autocast"):
        bits.append(f"autocast={meta['autocast']}")
    lines = ["# " + "  ".join(b for b in bits if b)]
    if meta.get("hardware"):
        lines.append(f"# hardware: {meta['hardware']}")
    if meta.get("note"):
        lines.append(f"# note: {meta['note']}")
    return "\n".join(lines)


def _savefig(fig: Any, path: PathLike) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, overwrite=True, dpi=100)


#: What ``densenet-zoo profile --out`` writes (checked before measuring: a foreign file is never replaced).
REPORT_JSON = json_kind("a profiler report", "meta")
REPORT_CSV = {"profile": csv_kind("a profiler table", "mode"), "max_batch": csv_kind("a max-batch table", "mode"),
              "depth_sweep": csv_kind("a depth-sweep table", "depth")}


def _figure(ncols: int = 1) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(6 * ncols, 4))


def _timing_note(rounds: int) -> str:
    if rounds == 0:
        return ", every mode in one process, the modes taking turns step by step"
    return f" x {rounds} interleaved rounds (fresh processes)" if rounds > 1 else ""


class ProfileReport:
    """Rows of :func:`densenet_zoo.profile` (one per mode) with ratios against normal mode ``"none"``."""

    columns = ["mode", "peak_mb", "saved_mb", "step_s", "img_per_s", "mem_ratio", "saved_ratio", "time_ratio"]

    def __init__(self, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
        self.meta = meta
        self.rows = [dict(r) for r in rows]
        normal = next((r for r in self.rows if r.get("mode") == "none" and "error" not in r), None)
        for r in self.rows:
            if "error" in r:
                continue
            r["peak_mb"] = r["peak_bytes"] / MB
            r["saved_mb"] = r["saved_bytes"] / MB
            r["img_per_s"] = r["batch_size"] / r["step_s"] if r["step_s"] > 0 else math.inf
            if normal is not None:
                r["mem_ratio"] = r["peak_bytes"] / normal["peak_bytes"] if normal["peak_bytes"] > 0 else math.nan
                r["saved_ratio"] = r["saved_bytes"] / normal["saved_bytes"] if normal["saved_bytes"] > 0 else math.nan
                r["time_ratio"] = r["step_s"] / normal["step_s"]

    def row(self, mode: str) -> Dict[str, Any]:
        """The measurements of one mode: ``report.row("efficient")["saved_bytes"]``."""
        for r in self.rows:
            if r["mode"] == mode:
                return r
        raise KeyError(f"mode {mode!r} is not in this report; it has {', '.join(r['mode'] for r in self.rows)}")

    @property
    def modes(self) -> List[str]:
        return [r["mode"] for r in self.rows]

    def table(self) -> str:
        """Plain-text table: mode, peak MB above baseline, saved MB, step s, img/s, ratios vs normal."""
        first = self.rows[0] if self.rows else {}
        lines = [_header(self.meta),
                 f"# batch {first.get('batch_size')}, {first.get('image_size')}x{first.get('image_size')}, one SGD step; "
                 f"peak = {first.get('peak_method', 'n/a')}, highest of {self.meta.get('memory_steps', 1)} steps after warm-up, "
                 f"minus the loaded baseline; growth = last step's peak minus the first's; time = median of "
                 f"{self.meta.get('steps')} steps" + _timing_note(self.meta.get("rounds", 1)),
                 f"{'mode':30s} {'peak MB':>9s} {'growth':>7s} {'saved MB':>9s} {'step s':>8s} {'img/s':>8s} {'mem x':>6s} "
                 f"{'saved x':>8s} {'time x':>7s}"]
        for r in self.rows:
            if "error" in r:
                lines.append(f"{r['mode']:30s} error: {r['error']}")
                continue
            lines.append(
                f"{r['mode']:30s} {r['peak_mb']:9.1f} {r.get('peak_growth_bytes', 0) / MB:7.1f} {r['saved_mb']:9.1f} {r['step_s']:8.3f} {r['img_per_s']:8.2f} "
                f"{r.get('mem_ratio', math.nan):6.2f} {r.get('saved_ratio', math.nan):8.3f} {r.get('time_ratio', math.nan):7.2f}"
            )
        return "\n".join(lines)

    def to_json(self, path: PathLike) -> Path:
        return _write(path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str))

    def to_csv(self, path: PathLike) -> Path:
        keys = ["mode", "batch_size", "image_size", "peak_bytes", "peak_growth_bytes", "saved_bytes", "step_s",
                "img_per_s", "mem_ratio", "saved_ratio", "time_ratio", "baseline_bytes", "allocator", "autocast", "error"]

        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

        return atomic_write(path, write, binary=False)

    def plot(self, path: PathLike) -> Path:
        """Bar charts: peak and saved memory per mode, and step time per mode."""
        rows = [r for r in self.rows if "error" not in r]
        fig, (ax_mem, ax_time) = _figure(2)
        names = [r["mode"] for r in rows]
        pos = range(len(rows))
        ax_mem.bar([p - 0.2 for p in pos], [r["peak_mb"] for r in rows], 0.4, label="peak above baseline")
        ax_mem.bar([p + 0.2 for p in pos], [r["saved_mb"] for r in rows], 0.4, label="saved for backward")
        ax_mem.set_ylabel("MB")
        ax_mem.legend()
        ax_time.bar(list(pos), [r["step_s"] for r in rows])
        ax_time.set_ylabel("step time (s)")
        for ax in (ax_mem, ax_time):
            ax.set_xticks(list(pos))
            ax.set_xticklabels(names, rotation=45, ha="right")
        ax_mem.set_title("memory per mode")
        return _savefig(fig, path)


class MaxBatchReport:
    """Largest batch per mode within a budget, with every probe (batch size -> peak)."""

    def __init__(self, results: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> None:
        self.results, self.meta = results, meta

    def table(self) -> str:
        lines = [_header(self.meta), f"# budget {self.meta['budget_bytes'] / MB:.0f} MiB (absolute peak of a training step), "
                 f"{self.meta['image_size']}x{self.meta['image_size']}", f"{'mode':30s} {'max batch':>9s} {'probes':>7s}"]
        for mode, r in self.results.items():
            lines.append(f"{mode:30s} {r['max_batch']:9d} {len(r['probes']):7d}")
        return "\n".join(lines)

    def to_json(self, path: PathLike) -> Path:
        return _write(path, json.dumps({"meta": self.meta, "results": self.results}, indent=2, default=str))

    def to_csv(self, path: PathLike) -> Path:
        lines = ["mode,batch_size,absolute_peak_bytes,fits"]
        for mode, r in self.results.items():
            for p in r["probes"]:
                lines.append(f"{mode},{p['batch_size']},{p.get('absolute_peak_bytes', '')},{p['fits']}")
        return _write(path, "\n".join(lines) + "\n")

    def plot(self, path: PathLike) -> Path:
        """Memory vs batch size per mode, with the budget line."""
        fig, ax = _figure()
        for mode, r in self.results.items():
            pts = sorted((p["batch_size"], p["absolute_peak_bytes"] / MB) for p in r["probes"] if "absolute_peak_bytes" in p)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.axhline(self.meta["budget_bytes"] / MB, color="k", linestyle="--", label="budget")
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak MB")
        ax.set_title("memory vs batch size")
        ax.legend()
        return _savefig(fig, path)


class DepthSweepReport:
    """Saved-for-backward bytes per (depth, mode) and the fitted exponent of bytes ~ depth**p."""

    def __init__(self, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
        self.rows, self.meta = rows, meta

    def modes(self) -> List[str]:
        return list(dict.fromkeys(r["mode"] for r in self.rows))

    def exponents(self) -> Dict[str, Optional[float]]:
        """Least-squares slope of log(bytes) against log(depth), per mode."""
        out: Dict[str, Optional[float]] = {}
        for mode in self.modes():
            pts = [(math.log(r["depth"]), math.log(r["saved_bytes"])) for r in self.rows if r["mode"] == mode and r["saved_bytes"] > 0]
            if len(pts) < 2:
                out[mode] = None
                continue
            mx = sum(p[0] for p in pts) / len(pts)
            my = sum(p[1] for p in pts) / len(pts)
            den = sum((p[0] - mx) ** 2 for p in pts)
            out[mode] = sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None
        return out

    def table(self) -> str:
        depths = sorted({r["depth"] for r in self.rows})
        exps = self.exponents()
        lines = [_header(self.meta), f"# DenseNet-BC k={self.meta['growth_rate']}, {self.meta['image_size']}x{self.meta['image_size']}, "
                 f"batch {self.meta['batch_size']}: MB saved for backward (exact); exponent p of bytes ~ depth**p",
                 f"{'mode':14s}" + "".join(f"{'L=' + str(d):>10s}" for d in depths) + f"{'p':>7s}"]
        for mode in self.modes():
            by_depth = {r["depth"]: r["saved_bytes"] for r in self.rows if r["mode"] == mode}
            p = exps[mode]
            lines.append(f"{mode:14s}" + "".join(f"{by_depth[d] / MB:10.1f}" for d in depths) + (f"{p:7.2f}" if p is not None else f"{'-':>7s}"))
        return "\n".join(lines)

    def to_json(self, path: PathLike) -> Path:
        return _write(path, json.dumps({"meta": self.meta, "rows": self.rows, "exponents": self.exponents()}, indent=2, default=str))

    def to_csv(self, path: PathLike) -> Path:
        return _write(path, "depth,mode,saved_bytes\n" + "".join(f"{r['depth']},{r['mode']},{r['saved_bytes']}\n" for r in self.rows))

    def plot(self, path: PathLike) -> Path:
        """Saved bytes vs depth per mode (log-log)."""
        fig, ax = _figure()
        exps = self.exponents()
        for mode in self.modes():
            pts = sorted((r["depth"], r["saved_bytes"] / MB) for r in self.rows if r["mode"] == mode)
            label = f"{mode} (p={exps[mode]:.2f})" if exps[mode] is not None else mode
            ax.loglog(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("depth")
        ax.set_ylabel("MB saved for backward")
        ax.set_title("memory vs depth")
        ax.legend()
        return _savefig(fig, path)
