import sys
from pathlib import Path

import pytest
import torch

# Tests import helpers such as tests/_dist.py by module name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 and leaves torch's thread count as it found it."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (speed on a 2-core machine; results must not depend on it).

    Use it as ``pytestmark = pytest.mark.usefixtures("one_thread")``, never ``torch.set_num_threads`` at
    import: that would change the thread count of every test collected after the module.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
