"""How long a user waits before anything happens: the command line's help and version, and the imports.

    python benchmarks/startup.py              # best of 5 fresh processes per row
    python benchmarks/startup.py --repeat 10

Each row starts a fresh interpreter (this checkout first on PYTHONPATH) and takes the best wall time
of ``--repeat`` runs: the best run is the one least disturbed by other work on the machine. Targets:
``densenet-zoo --help`` within 0.3 s; ``import densenet_zoo`` within ``import torch`` + 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
HELP_BUDGET_S = 0.3
IMPORT_OVER_TORCH_S = 0.3


def best_time(cmd: List[str], repeat: int) -> float:
    """The smallest wall time in seconds of ``repeat`` runs of ``cmd`` (each must exit 0)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def console_script() -> Optional[str]:
    """The installed ``densenet-zoo`` script beside this interpreter (or on PATH), if there is one."""
    beside = Path(sys.executable).parent / "densenet-zoo"
    return str(beside) if beside.is_file() else shutil.which("densenet-zoo")


def rows(repeat: int) -> Dict[str, float]:
    py = sys.executable
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "densenet-zoo --help": [console_script() or "", "--help"],
        "densenet-zoo --version": [console_script() or "", "--version"],
        "python -m densenet_zoo --help": [py, "-m", "densenet_zoo", "--help"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "python -c 'import densenet_zoo'": [py, "-c", "import densenet_zoo"],
        "python -c 'import densenet_zoo, torch'": [py, "-c", "import densenet_zoo, torch"],
        "... and first use of the models (dz.DenseNet)": [py, "-c", "import densenet_zoo as dz; dz.DenseNet"],
        "python -c 'import timm'": [py, "-c", "import timm"],
    }
    return {name: best_time(cmd, repeat) for name, cmd in commands.items() if cmd[0]}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per row; the best is reported")
    args = parser.parse_args(argv)
    t = rows(args.repeat)
    help_s = t.get("densenet-zoo --help", t["python -m densenet_zoo --help"])
    extra = t["python -c 'import densenet_zoo, torch'"] - t["python -c 'import torch'"]
    print(f"# startup, best of {args.repeat} fresh processes; {cpu_name()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'command':48s} {'seconds':>8s}")
    for name, seconds in t.items():
        print(f"{name:48s} {seconds:8.3f}")
    print(f"--help: {help_s:.3f} s (target <= {HELP_BUDGET_S}) {'ok' if help_s <= HELP_BUDGET_S else 'OVER'}")
    print(f"import densenet_zoo, torch - import torch: {extra:+.3f} s (target <= {IMPORT_OVER_TORCH_S}) "
          f"{'ok' if extra <= IMPORT_OVER_TORCH_S else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
