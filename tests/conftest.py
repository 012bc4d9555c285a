import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("KCOMPILE_QUIET", "1")

from torch_threads import torch_threads  # noqa: E402  (tests/ is on sys.path from here)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a whole test module (the machine is shared: it keeps the
    training and multi-process tests fast and steady); the previous count is restored."""
    with torch_threads(1):
        yield
