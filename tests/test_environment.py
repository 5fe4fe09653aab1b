"""batchops.environment: the device to run on and the machine facts a results file records."""

from __future__ import annotations

import datetime
import re

import pytest
import torch

import batchops
from batchops.environment import (
    cpu_model,
    device_name,
    device_tag,
    environment_lines,
    git_revision,
    last_level_cache_bytes,
    resolve_device,
    utcnow,
)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda").index == torch.cuda.current_device()


def test_device_tag_and_name():
    cpu = torch.device("cpu")
    assert device_tag(cpu) == f"cpu-{torch.get_num_threads()}threads"
    assert device_name(cpu) == cpu_model() != ""
    cache = last_level_cache_bytes(cpu)
    assert cache is None or cache > 0


@pytest.mark.parametrize(
    "fields, expected",
    [
        (
            {"model name": "AMD EPYC", "cpu family": "25", "model": "17", "flags": "fpu avx2 avx512f"},
            "AMD EPYC (family 25, model 17, AVX-512)",
        ),
        (
            {"model name": "AMD EPYC", "cpu family": "25", "model": "1", "flags": "fpu avx avx2"},
            "AMD EPYC (family 25, model 1, AVX2)",
        ),
        ({"model name": "Some CPU", "flags": "fpu sse2"}, "Some CPU (no AVX2)"),
        ({"model name": "Some CPU"}, "Some CPU"),
    ],
)
def test_cpu_model_says_which_processor(monkeypatch, fields, expected):
    """VMs name AVX2-only and AVX-512 processors alike ("AMD EPYC"): results say which it was."""
    import batchops.environment as environment

    monkeypatch.setattr(environment, "_cpuinfo_fields", lambda: fields)
    assert environment.cpu_model() == expected


def test_environment_lines_and_revision():
    when = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    device, versions, date = environment_lines(torch.device("cpu"), when)
    assert device.startswith(f"- device: cpu, {cpu_model()} (torch threads: {torch.get_num_threads()}")
    assert device.endswith(f"batchops CPU kernels: {batchops.build_info()['cpu_kernel_isa']})")
    assert versions.startswith(f"- torch {torch.__version__}; batchops ")
    assert date.startswith("- date: 2026-01-02 03:04 UTC; python ")
    rev = git_revision()
    assert rev is None or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", rev), rev
    assert utcnow().tzinfo is not None
