"""The GPU machine's scripts (scripts/gpu-check.sh, gpu_smoke.py, gpu_quick_bench.py,
gpu_model_bench.py), run here
as dry runs on the CPU: a GPU is lent rarely and briefly, so their Python must already work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("kernels")


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_gpu_smoke_calls_every_op_on_cpu():
    done = _run(["scripts/gpu_smoke.py", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    assert "op calls on cpu completed" in done.stdout


def test_gpu_quick_bench_writes_rows_as_it_goes(tmp_path):
    out = tmp_path / "quick.md"
    done = _run(["scripts/gpu_quick_bench.py", str(out), "--device", "cpu", "--tiny", "--reps", "2"])
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 12  # header + every case
    assert not any("error:" in row for row in rows), rows


@pytest.mark.slow
def test_gpu_model_bench_writes_a_checked_row_per_case(tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "models.md"
    done = _run(["scripts/gpu_model_bench.py", str(out), "--device", "cpu", "--tiny", "--reps", "2"])
    assert done.returncode == 0, done.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| resnet")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| resnet50", "channels_last"],
        ["| resnet50", "NCHW"],
        ["| resnet18", "channels_last"],
        ["| resnet18", "NCHW"],
    ]
    # every row timed (a ratio) and its check passed (a failed check or an error is in the note)
    assert all(float(row.split(" | ")[5]) > 0 for row in rows), rows
    assert not any(bad in row for row in rows for bad in ("DIFFER", "FAILED", "error:")), rows


def test_gpu_check_without_gpu_skips_gpu_stages_and_summarises(tmp_path):
    env = dict(
        os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_STAGES="kernels tests sanitizer bench models"
    )
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    summary = done.stdout.split("===== gpu-check summary")[-1]
    if "gpu: none" in summary:
        assert "stages skipped" in summary
    assert (tmp_path / "environment.txt").exists()
