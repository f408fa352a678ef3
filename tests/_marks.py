"""Test marks that depend on the machine."""

import pytest

from densenet_zoo.hardware import cpu_capabilities

#: A test that runs bfloat16 on the CPU: skipped, with the reason, where the CPU has no native bf16
#: (tests/test_hardware.py checks the refusal there).
needs_native_bf16 = pytest.mark.skipif(
    not cpu_capabilities().native_bf16,
    reason=f"no native bfloat16 here ({cpu_capabilities().summary()}); tests/test_hardware.py checks the refusal")
