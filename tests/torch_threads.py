"""``torch_threads(n)``: run a block with n intra-op torch threads, restoring the old count."""

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
