"""What several test modules share: the devices and activations tests are parametrized over,
torch's reference for each activation, readable dtype ids and a recorder of dispatched ops.

Test modules import these names from here (``from tests.helpers import DEVICES``); conftest.py
holds only fixtures, hooks and markers.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import batchops
import batchops.ops.common

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout: examples/, scripts/, build/
CUDA_AVAILABLE = torch.cuda.is_available()

# Use `@pytest.mark.parametrize("device", DEVICES)` (or the `device` fixture) to run a test on
# the CPU and, when a GPU is present, on CUDA; conftest skips the cuda params without one.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]

# The activation names every batchops op takes (from the kernels' table), and torch's reference
# for each (tests/test_package.py checks that every activation has one).
ACTIVATIONS = list(batchops.ops.common.ACTIVATIONS)
TORCH_ACT = {
    None: lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def dtype_id(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32: readable test ids."""
    return str(dtype).replace("torch.", "")


class RecordOps(TorchDispatchMode):
    """`with RecordOps() as rec:` records every op call that reaches the dispatcher, C++ callers
    such as the ops' autograd kernels included: rec.calls is [(op, args)], rec.ops their short
    names ("gather_rows", "mm", ...)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    @property
    def ops(self) -> list[str]:
        return [func.overloadpacket.__name__ for func, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))
