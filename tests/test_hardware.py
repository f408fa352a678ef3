"""What the CPU can do, read from torch's probes, and the bf16 refusals where it cannot run bf16 natively.

The refusals are checked for real in a child process whose kernels are capped at AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``): what an AVX2-only user meets, on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from densenet_zoo.hardware import CpuCapabilities, HardwareError, cpu_capabilities, describe_hardware, require_native_bf16

pytestmark = pytest.mark.numerics  # run again with kernels capped at AVX2 (Makefile: make test)

REPO = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _cpuinfo_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    line = next((l for l in text.splitlines() if l.startswith("flags")), None)
    if line is None:
        pytest.skip("/proc/cpuinfo names no CPU flags (not an x86 Linux machine)")
    return set(line.split(":", 1)[1].split())


def _child(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def test_capabilities_agree_with_the_kernel_flags_the_os_reports():
    flags, caps = _cpuinfo_flags(), cpu_capabilities()
    assert caps.avx2 == ("avx2" in flags)
    assert caps.avx512 == ("avx512f" in flags)
    assert caps.avx512_bf16 == ("avx512_bf16" in flags)
    if caps.onednn_cap is None:  # a cap narrows what oneDNN may use, not what the hardware has
        assert caps.amx == ("amx_tile" in flags) and caps.vnni == ("avx512_vnni" in flags)
    assert caps.isa == torch.backends.cpu.get_cpu_capability()
    assert caps.native_bf16 == (("avx512_bf16" in flags or "amx_bf16" in flags) and caps.isa.startswith("AVX512")
                                and caps.onednn_cap in (None, "AVX512_CORE_BF16", "AVX512_CORE_AMX"))


def test_the_summary_names_the_cpu_its_kernels_and_bf16():
    caps = cpu_capabilities()
    line = describe_hardware("cpu")
    assert line.startswith(caps.name) and f"kernels {caps.isa}" in line
    assert f"native bf16 {'yes' if caps.native_bf16 else 'no'}" in line and f"{caps.threads} threads" in line
    assert json.loads(json.dumps(caps.as_dict()))["isa"] == caps.isa


def test_the_avx2_cap_takes_effect_in_aten_and_onednn():
    """The cap the CI step relies on: ATen and oneDNN both run AVX2 kernels, and bf16 counts as not native."""
    flags = _cpuinfo_flags()
    if "avx2" not in flags:
        pytest.skip("this CPU has no AVX2 to cap at")
    proc = _child("""
        import json, torch
        from densenet_zoo.hardware import cpu_capabilities
        x = torch.randn(2, 64, 32, 32).to(memory_format=torch.channels_last)
        torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3), padding=1)   # a oneDNN convolution
        print(json.dumps(cpu_capabilities().as_dict()))
    """, dict(AVX2, ONEDNN_VERBOSE="1"))
    assert proc.returncode == 0, proc.stderr
    isa_lines = [l for l in proc.stdout.splitlines() if l.startswith("onednn_verbose") and ",isa:" in l]
    assert isa_lines and isa_lines[0].rsplit("isa:", 1)[1].strip() == "Intel AVX2", isa_lines
    caps = CpuCapabilities(**json.loads(proc.stdout.splitlines()[-1]))
    assert caps.isa == "AVX2" and caps.onednn_cap == "AVX2" and not caps.native_bf16 and not caps.amx


@pytest.mark.skipif(not os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("ONEDNN_MAX_CPU_ISA"),
                    reason="runs in the CI step whose kernels are capped (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)")
def test_the_cap_of_this_process_takes_effect(capfd):
    """In a capped test run: the caps hold in this very process, so the run proves what it claims."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    if aten:
        assert torch.backends.cpu.get_cpu_capability() == aten.upper()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if onednn:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            x = torch.randn(2, 64, 16, 16).to(memory_format=torch.channels_last)
            torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3), padding=1)
        out = capfd.readouterr().out
        assert "onednn_verbose" in out and ",exec," in out, out[:500]
        assert cpu_capabilities().onednn_cap == onednn.upper()
    assert not cpu_capabilities().native_bf16 or not aten or aten.upper().startswith("AVX512")


def test_require_native_bf16_passes_where_bf16_is_native_and_on_other_devices():
    require_native_bf16("meta", "a request")  # only CPUs are checked
    if cpu_capabilities().native_bf16:
        require_native_bf16("cpu", "a request")
    else:
        with pytest.raises(HardwareError, match="a request: this CPU has no native bfloat16"):
            require_native_bf16("cpu", "a request")


_REFUSALS = """
    import json, sys, tempfile, torch
    import densenet_zoo as dz
    from densenet_zoo.infer.predict import Predictor
    from densenet_zoo.train import finetune
    sys.path.insert(0, "tests")
    from _train_helpers import base_options, digits_subset
    torch.manual_seed(0)
    model = dz.densenet121(num_classes=3, growth_rate=8, block_config=(2, 2), num_init_features=16).eval()
    outcome = {}
    def attempt(name, fn):
        try:
            fn()
            outcome[name] = "ran"
        except dz.ZooError as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"
    tmp = tempfile.mkdtemp()
    attempt("optimize", lambda: dz.optimize_for_inference(model, dtype=torch.bfloat16))
    attempt("export", lambda: dz.export(model.to(torch.bfloat16), tmp + "/m.pt", "torchscript", image_size=32))
    attempt("predict", lambda: Predictor(model.to(torch.bfloat16), lambda im: im, optimize=False))
    model.float()
    opts = base_options(digits_subset(__import__("pathlib").Path(tmp) / "d", classes=2, train_per_class=4,
                                      val_per_class=2), __import__("pathlib").Path(tmp) / "run", epochs=1, amp="bf16")
    print("--- finetune", flush=True)
    finetune(**opts)
    print(json.dumps(outcome))
"""


def test_bf16_is_refused_at_build_and_its_cost_said_where_the_cpu_has_no_native_bf16():
    """Capped at AVX2: inference in bf16 is refused when the network is built (one line naming what is missing
    and the faster choice), nothing crashes at a first call, and bf16 autocast training says its cost first."""
    if "avx2" not in _cpuinfo_flags():
        pytest.skip("this CPU has no AVX2 to cap at")
    proc = _child(_REFUSALS, dict(AVX2, DENSENET_ZOO_CACHE=os.environ.get("DENSENET_ZOO_CACHE", "/nonexistent")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout.splitlines()[-1])
    assert set(outcome) == {"optimize", "export", "predict"}
    flags = _cpuinfo_flags()
    # what is missing: the instructions themselves on an AVX2-only CPU, the cap where the CPU has them
    gap = ("ATen kernels capped at AVX2" if {"avx512_bf16", "amx_bf16"} & flags
           else "the CPU has neither AVX512_BF16 nor AMX")
    for name, text in outcome.items():
        assert text.startswith("HardwareError: ") and "\n" not in text, (name, text)
        assert f"no native bfloat16 ({gap}" in text and "float32" in text and "int8" in text, (name, text)
    run = proc.stdout.split("--- finetune\n", 1)[1].splitlines()
    assert run[0].startswith("warning: bf16 autocast on this CPU runs emulated") and "--amp none" in run[0], run[:2]


def test_profile_says_what_bf16_costs_before_measuring(tmp_path):
    proc = _child("""
        from densenet_zoo.cli import main
        raise SystemExit(main(["profile", "--model", "densenet_bc_100", "--batch-size", "2", "--image-size", "32",
                               "--modes", "none", "--steps", "1", "--warmup", "0", "--rounds", "0", "--autocast", "bfloat16"]))
    """, AVX2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# note: bf16 autocast on this CPU runs emulated"), lines[:3]
    assert any(l.startswith("# hardware: ") and "kernels AVX2" in l for l in lines)
