import sys
from pathlib import Path

import pytest
import torch

# Tests import helpers such as tests/_dist.py by module name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
