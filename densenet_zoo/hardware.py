"""What the processor can do, read once from torch's own probes, and the choices that depend on it.

Three sources, in the order they can only narrow what runs:

* the hardware (torch's cpuinfo probes: AVX2, AVX-512, AVX512_BF16, VNNI, AMX);
* ATen's vector kernels, capped by ``ATEN_CPU_CAPABILITY`` (``torch.backends.cpu.get_cpu_capability()``);
* oneDNN's kernels (convolutions, matmuls), capped by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``).

"Native bf16" means all three let bfloat16 run on bf16 instructions (AVX512_BF16 or AMX). Without them
oneDNN emulates bf16 with float32 arithmetic plus conversions (several times slower than float32: a
DenseNet-121 forward took 14x as long in bf16 as in float32 on an AVX2-only AMD EPYC), or, on a CPU
without AVX-512BW, refuses bf16 convolutions at the first call. So bf16 inference on such a CPU is
refused when the network is built (:func:`require_native_bf16`), and bf16 autocast training, which a
user may still want, says what it costs (:func:`bf16_cost_note`).

Example::

    caps = cpu_capabilities()
    caps.native_bf16, caps.isa             # (True, 'AVX512') on an AMD EPYC Zen 4
    print(describe_hardware())             # one line for reports and benchmark headers
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ._utils import ZooError

__all__ = ["CpuCapabilities", "HardwareError", "available_memory", "bf16_cost_note", "cpu_capabilities", "describe_hardware",
           "require_native_bf16"]

#: oneDNN's ISA names from the least to the most capable (the values ``ONEDNN_MAX_CPU_ISA`` takes).
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")
_UNCAPPED = ("", "ALL", "DEFAULT")


class HardwareError(ZooError, RuntimeError):
    """The machine lacks a capability the request needs (native bf16, CUDA...); the message names the faster choice."""


@dataclass(frozen=True)
class CpuCapabilities:
    """What this process's CPU kernels can use (hardware narrowed by the ATen and oneDNN caps).

    Attributes:
        name: the processor's model name.
        isa: ATen's kernel level in this process (``AVX512``, ``AVX2``, ``DEFAULT``...).
        onednn_cap: the ``ONEDNN_MAX_CPU_ISA`` cap in force, or ``None`` when oneDNN is not capped.
        avx2: the hardware has AVX2 (torch's cpuinfo probe, as the next four).
        avx512: the hardware has AVX-512 (F).
        avx512_bf16: the hardware has AVX512_BF16.
        vnni: AVX512-VNNI (int8 dot products), usable under the oneDNN cap.
        amx: AMX tiles, usable under the oneDNN cap.
        native_bf16: bfloat16 runs on bf16 instructions in both ATen and oneDNN.
        threads: torch's intra-op threads.
        logical_cpus: ``os.cpu_count()``.

    Example:
        cpu_capabilities().native_bf16   # False on an AVX2-only CPU
    """

    name: str
    isa: str
    onednn_cap: Optional[str]
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    vnni: bool
    amx: bool
    native_bf16: bool
    threads: int
    logical_cpus: int

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict (reports store it)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: ``AMD EPYC: kernels AVX512, native bf16 yes (AVX512_BF16), VNNI yes, AMX no, 2 threads``."""
        kind = "AMX" if self.amx else "AVX512_BF16" if self.avx512_bf16 else "none in hardware"
        bf16 = f"yes ({kind})" if self.native_bf16 else f"no ({self._bf16_gap()})"
        cap = f", oneDNN capped at {self.onednn_cap}" if self.onednn_cap else ""
        return (f"{self.name}: kernels {self.isa}{cap}, native bf16 {bf16}, VNNI {'yes' if self.vnni else 'no'}, "
                f"AMX {'yes' if self.amx else 'no'}, {self.threads} threads of {self.logical_cpus} logical CPUs")

    def _bf16_gap(self) -> str:
        if not (self.avx512_bf16 or self.amx):
            return "the CPU has neither AVX512_BF16 nor AMX"
        if not self.isa.startswith("AVX512"):
            return f"ATen kernels capped at {self.isa} (ATEN_CPU_CAPABILITY)"
        return f"oneDNN capped at {self.onednn_cap} (ONEDNN_MAX_CPU_ISA)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _onednn_cap() -> Optional[str]:
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if cap in _UNCAPPED else cap


def _onednn_allows(cap: Optional[str], isa: str) -> bool:
    """True when oneDNN, capped at ``cap``, may use ``isa`` (an unknown cap name is taken as uncapped)."""
    if cap is None or cap not in _ONEDNN_ISAS:
        return True
    return _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index(isa)


@functools.lru_cache(maxsize=None)
def _probe(threads: int) -> CpuCapabilities:
    import torch

    probes = torch.cpu
    hw = {name: bool(getattr(probes, f"_is_{name}_supported", lambda: False)())
          for name in ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile")}
    isa = torch.backends.cpu.get_cpu_capability()
    cap = _onednn_cap()
    native = ((hw["avx512_bf16"] or hw["amx_tile"]) and isa.startswith("AVX512")
              and _onednn_allows(cap, "AVX512_CORE_BF16"))
    return CpuCapabilities(
        name=_cpu_name(), isa=isa, onednn_cap=cap, avx2=hw["avx2"], avx512=hw["avx512"],
        avx512_bf16=hw["avx512_bf16"], vnni=hw["vnni"] and _onednn_allows(cap, "AVX512_CORE_VNNI"),
        amx=hw["amx_tile"] and _onednn_allows(cap, "AVX512_CORE_AMX"), native_bf16=native,
        threads=threads, logical_cpus=os.cpu_count() or 1)


def cpu_capabilities() -> CpuCapabilities:
    """The CPU's capabilities as this process's kernels see them (probed once per process).

    Returns:
        A :class:`CpuCapabilities`; ``threads`` is torch's thread count at the call.

    Example:
        if not cpu_capabilities().native_bf16:
            model = optimize_for_inference(model)   # float32: faster than emulated bf16 here
    """
    import torch

    return _probe(torch.get_num_threads())


def describe_hardware(device: Any = "cpu") -> str:
    """One line naming the machine for reports and benchmark headers: the CPU's capabilities, and the GPU on CUDA.

    Args:
        device: the device a measurement runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Returns:
        e.g. ``"AMD EPYC: kernels AVX512, native bf16 yes (AVX512_BF16), VNNI yes, AMX no, 2 threads of 2 logical CPUs"``.

    Example:
        print(f"# hardware: {describe_hardware('cpu')}")
    """
    import torch

    line = cpu_capabilities().summary()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        line += f"; GPU {torch.cuda.get_device_name(device)} (sm_{major}{minor}, native bf16 {bf16})"
    return line


def require_native_bf16(device: Any, what: str) -> None:
    """Refuse bfloat16 inference on a CPU without native bf16, naming what is missing and the faster choice.

    Args:
        device: where the bf16 network would run; only CPU devices are checked.
        what: the request, as the user wrote it (``"optimize_for_inference(dtype=torch.bfloat16)"``).

    Raises:
        HardwareError: on a CPU without native bf16 (see :class:`CpuCapabilities`).

    Example:
        require_native_bf16("cpu", "optimize_for_inference(dtype=torch.bfloat16)")
    """
    import torch

    if torch.device(device).type != "cpu":
        return
    caps = cpu_capabilities()
    if not caps.native_bf16:
        raise HardwareError(
            f"{what}: this CPU has no native bfloat16 ({caps._bf16_gap()}), where bf16 runs emulated, several times "
            f"slower than float32 or not at all; use float32 (optimize_for_inference(model) without dtype) or int8 "
            f"(densenet_zoo.quantize)")


def bf16_cost_note(device: Any) -> Optional[str]:
    """What bf16 autocast costs on this machine, or ``None`` where it runs natively (or not on a CPU).

    Training under bf16 autocast still works without native bf16, so this is said, not refused.

    Args:
        device: where the training or profiling runs.

    Returns:
        One sentence for the first line of a run's output, or ``None``.

    Example:
        note = bf16_cost_note("cpu")
    """
    import torch

    if torch.device(device).type != "cpu":
        return None
    caps = cpu_capabilities()
    if caps.native_bf16:
        return None
    return (f"bf16 autocast on this CPU runs emulated ({caps._bf16_gap()}): expect it several times slower than "
            f"float32 (4x in fine-tuning on an AVX2-only AMD EPYC); --amp none / no --autocast is faster here")


def _meminfo_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> Optional[int]:
    """What the cgroup (v2) still lets this process allocate, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def _address_space_room() -> Optional[int]:
    """What ``RLIMIT_AS`` (``ulimit -v``) still lets this process map, or None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            size = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    except (ImportError, OSError, ValueError, StopIteration):
        return None
    return max(soft - size, 0)


def available_memory(device: Any = "cpu") -> Optional[int]:
    """Bytes a new allocation of this process can still get on ``device``, or ``None`` when unknown.

    On a CPU, the least of the system's available memory (``MemAvailable``), the cgroup's room and the
    address-space limit (``ulimit -v``); on CUDA, the device's free memory.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        Bytes, or ``None`` where no figure can be read.

    Example:
        available_memory("cpu") / 2**30   # GiB
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    rooms = [r for r in (_meminfo_bytes("MemAvailable"), _cgroup_room(), _address_space_room()) if r is not None]
    return min(rooms) if rooms else None
