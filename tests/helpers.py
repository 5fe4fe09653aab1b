"""What several test modules share: the devices and activations tests are parametrized over,
torch's reference for each activation, readable dtype ids, a recorder of dispatched ops, the
CPU instruction-set levels, and the runner of the scripts under examples/.

Test modules import these names from here (``from tests.helpers import DEVICES``); conftest.py
holds only fixtures, hooks and markers.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess

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
    "hardswish": F.hardswish,
    "relu6": F.relu6,
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


# ---------------------------------------------------------------------------------------
# CPU instruction-set levels: every compiled level (baseline, AVX2, AVX-512) is checked on
# machines that have it; BATCHOPS_CPU_ISA caps the level the CPU kernels use (read at each call).

ISA_LEVELS = ["default", "avx2", "avx512"]
_ISA_ORDER = {name: i for i, name in enumerate(ISA_LEVELS)}


def cap_cpu_isa(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """Make the CPU kernels run at level `isa` for the rest of the test (BATCHOPS_CPU_ISA); skip
    the test when this processor's best level is below it."""
    best = batchops.build_info()["cpu_kernel_isa"]
    if _ISA_ORDER[isa] > _ISA_ORDER[best]:
        pytest.skip(f"this processor supports CPU kernels up to {best}")
    monkeypatch.setenv("BATCHOPS_CPU_ISA", isa)
    assert batchops.build_info()["cpu_kernel_isa"] == isa


# ---------------------------------------------------------------------------------------
# The scripts under examples/, run end to end in a subprocess


def example_path(name: str) -> str:
    return str(ROOT / "examples" / name)


def _example_env(extra: dict[str, str]) -> dict[str, str]:
    # The package may be used from the checkout without being installed.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(batchops.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]), **extra}


def run_example(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` from the checkout's root with batchops importable (plus `env`), in a session of
    its own, so that on a timeout the processes it started (torchrun's workers) go too. Fails the
    test on a timeout or a non-zero exit, with the tail of the output."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_example_env(env or {}),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def example_results(stdout: str) -> list[dict[str, str]]:
    """The fields of each machine-readable `RESULT key=value ...` line an example prints."""
    return [
        dict(f.split("=", 1) for f in line.split()[1:]) for line in stdout.splitlines() if line.startswith("RESULT ")
    ]
