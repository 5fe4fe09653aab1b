"""examples/image_classification.py: >= 95% test accuracy on the digits set, in one process and
under torchrun with two gloo ranks (the env:// path of batchops.train)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

import batchops

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "examples", "image_classification.py")

pytestmark = [pytest.mark.usefixtures("kernels"), pytest.mark.slow]


def _env():
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(batchops.__file__)))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout  # printed by rank 0 only
    return {k: float(v) for k, v in (f.split("=", 1) for f in lines[0].split()[1:])}


def _run(cmd, timeout=120):
    """Run in a session of its own, so that on a timeout torchrun's workers go too."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
