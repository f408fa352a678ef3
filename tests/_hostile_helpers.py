"""Helpers for the hostile-input tests: small checkpoints, forged metadata, a child process under a memory cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import densenet_zoo as dz

REPO = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = Path(dz.__file__).resolve().parent.parent  # the densenet_zoo under test, for child processes
SMALL = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, small_inputs=True, num_classes=5)


def small_model(seed: int = 0) -> dz.DenseNet:
    torch.manual_seed(seed)
    return dz.DenseNet(**SMALL).eval()


def tensors_and_meta(path: Path) -> tuple:
    """Tensors and the raw metadata dict of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def forge(path: Path, out: Path, *, meta_text: Any = None, edit: Mapping[str, Any] = (), tensors: Dict = None) -> Path:
    """Copy of a safetensors file with its ``densenet_zoo`` metadata replaced by ``meta_text`` or edited model_args."""
    state, raw = tensors_and_meta(path)
    if meta_text is None:
        meta = json.loads(raw["densenet_zoo"])
        meta["model_args"].update(edit)
        meta_text = json.dumps(meta)
    save_file(tensors if tensors is not None else state, str(out), metadata={"densenet_zoo": meta_text})
    return out


# Runs in a fresh interpreter: imports first, then caps the address space at what it uses now plus
# the allowance, so that a load that tries to allocate without bound fails fast instead of
# swapping the machine. Prints one JSON line: the outcome of each case.
_CHILD = textwrap.dedent("""
    import json, resource, sys, time, traceback
    import torch
    torch.set_num_threads(1)
    import densenet_zoo as dz
    from densenet_zoo.train import run_files as train_io
    cases = __CASES__
    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + __ALLOW__, resource.RLIM_INFINITY))
    out = []
    for code in cases:
        t0 = time.perf_counter()
        try:
            exec(code, {"dz": dz, "torch": torch, "train_io": train_io})
            res = {"ok": True}
        except BaseException as exc:
            res = {"ok": False, "type": type(exc).__name__, "zoo": isinstance(exc, dz.ZooError),
                   "msg": str(exc), "where": traceback.format_exc().splitlines()[-3][:300]}
        res["s"] = time.perf_counter() - t0
        out.append(res)
    print(json.dumps(out))
""")


def run_capped(cases: list, *, allow_mib: int = 768, timeout: float = 120.0) -> list:
    """Run each code string in one child process under an address-space cap; returns their outcomes."""
    script = _CHILD.replace("__CASES__", repr(list(cases))).replace("__ALLOW__", str(allow_mib << 20))
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
