"""Shared test configuration: fixtures, hooks and markers (device parametrization, seeding, and
the compiled-kernel guard). Names test modules import (DEVICES, ACTIVATIONS, TORCH_ACT,
RecordOps, ...) live in tests/helpers.py.

Use `@pytest.mark.parametrize("device", DEVICES)` (or the `device` fixture) to run a test on
the CPU and, when a GPU is present, on CUDA. CUDA params carry `pytest.mark.cuda` and are
skipped on machines without a GPU, so the same suite runs everywhere.

Tests of kernel-backed code request the `kernels` fixture (test modules usually do so with
`pytestmark = pytest.mark.usefixtures("kernels")`). When batchops' compiled module is missing
or stale, those tests FAIL with the load error: CI must not go green by skipping them.
"""

from __future__ import annotations

import logging

import pytest
import torch

import batchops

from tests.helpers import CUDA_AVAILABLE, DEVICES


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the marker is known when pytest runs
    # with another rootdir/inifile.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: examples, torchrun, multi-process and sweep tests")
    # torch.compile's structured-trace logger emits DEBUG records that pytest would otherwise
    # capture and print, hundreds of lines, in every failing compile test's report.
    logging.getLogger("torch.__trace").propagate = False


def pytest_report_header(config):
    info = batchops.build_info()
    return (
        f"batchops {info['batchops_version']}: extension_loaded={info['extension_loaded']} "
        f"cuda_kernels={info['cuda_kernels']} cuda_archs={info['cuda_archs']} "
        f"built_with_torch={info['built_with_torch']} running_torch={info['running_torch']} "
        f"cuda_available={CUDA_AVAILABLE}"
    )


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip_cuda = pytest.mark.skip(reason="CUDA is not available (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on; a test may parametrize "device" itself with DEVICES."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernels(request):
    """Fail (never skip) when the compiled kernels are unavailable for the test's device."""
    info = batchops.build_info()
    if not batchops.extension_available():
        pytest.fail(f"batchops' compiled extension is unavailable: {info['error']}", pytrace=False)
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if device is not None and str(device).startswith("cuda") and not info["cuda_kernels"]:
        pytest.fail(
            f"a CUDA device is available but batchops._C was built without CUDA kernels (build_info: {info})",
            pytrace=False,
        )
