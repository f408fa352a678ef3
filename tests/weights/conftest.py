"""Fixtures shared by the weights tests."""

import pytest
from _weights_helpers import LoopbackServer


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 that serves what a test puts on it, closed afterwards."""
    srv = LoopbackServer()
    yield srv
    srv.close()
