"""examples/image_classification.py: >= 95% test accuracy on the digits set, in one process and
under torchrun with two gloo ranks (the env:// path of batchops.train)."""

import os
import shutil
import sys

import pytest

from tests.helpers import example_path, example_results, run_example

SCRIPT = example_path("image_classification.py")

pytestmark = [pytest.mark.usefixtures("kernels"), pytest.mark.slow]


def _run(cmd, timeout=120):
    return run_example(cmd, timeout=timeout, env={"OMP_NUM_THREADS": "1"})


def _result(stdout: str) -> dict:
    lines = example_results(stdout)
    assert len(lines) == 1, stdout  # printed by rank 0 only
    return {k: float(v) for k, v in lines[0].items()}


def test_image_classification_single_process(tmp_path):
    ckpt = tmp_path / "digits.pt"
    proc = _run(
        [sys.executable, SCRIPT, "--device", "cpu", "--no-progress", "--threads", "1", "--checkpoint", str(ckpt)]
    )
    r = _result(proc.stdout)
    assert r["test_acc"] >= 0.95, proc.stdout
    assert r["world_size"] == 1 and r["epochs"] == 8
    assert "amp torch.bfloat16" in proc.stdout  # bf16 autocast on the CPU by default
    assert proc.stdout.count("eval accuracy") == 8 and "epoch 8/8" in proc.stdout
    assert ckpt.exists()


def test_image_classification_torchrun_two_ranks():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    proc = _run(
        [torchrun, "--standalone", "--nproc_per_node=2", SCRIPT, "--device", "cpu", "--no-progress"], timeout=120
    )
    r = _result(proc.stdout)
    assert r["world_size"] == 2 and r["test_acc"] >= 0.95, proc.stdout
    assert proc.stdout.count("epoch 8/8") == 1  # per-epoch lines from rank 0 only
