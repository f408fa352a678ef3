"""Seeded fuzzing of every loading path with damaged real checkpoints, under a memory cap and a time limit.

Every outcome must be a working model or one of the package's one-line errors (``ZooError``);
the training-state reader (``load_run_state``) included. ``OSError`` does
not count as acceptable: the files are readable, only their content is damaged.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _hostile_helpers import PACKAGE_ROOT

WORKER = Path(__file__).resolve().parents[1] / "_fuzz_worker.py"


CASES = 300


@pytest.mark.timeout(150)
def test_damaged_checkpoints_load_or_fail_cleanly(tmp_path, seed=0):
    """300 damaged files (seeded), each through every loader that reads its format, capped at +1 GiB."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), str(seed), str(CASES), "1024"], env=env,
                          capture_output=True, text=True, timeout=140)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bad"] == [], json.dumps(result["bad"][:5], indent=1)
    counts = result["counts"]
    # The damage reached every loader, and both ways out were taken.
    for loader in ("load_model", "load_weights", "convert_checkpoint", "load_run_state"):
        outcomes = {k.split(" ")[1] for k in counts if k.startswith(loader + " ")}
        assert "ok" in outcomes and outcomes - {"ok"}, (loader, counts)
    # The cases themselves take seconds; the child's start (importing torch) is not counted.
    assert result["slowest_s"] < 5 and result["total_s"] < 30, (result["slowest_s"], result["total_s"], elapsed)
