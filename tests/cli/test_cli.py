"""The `batchops` command line: info, bench (no timing assertions), help. The benchmark parts are
tested in tests/bench/test_bench.py, the device helpers in tests/test_environment.py."""

import os
import platform
import subprocess
import sys

import pytest
import torch

import batchops
from batchops import cli

needs_extension = pytest.mark.skipif(not batchops.extension_available(), reason="batchops._C is not built")


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"batchops {batchops.__version__}" in out
    assert "extension_loaded" in out and torch.__version__ in out


def _env():
    # The package may be used from the checkout without being installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(batchops.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def test_python_dash_m_batchops_info():
    proc = subprocess.run(
        [sys.executable, "-m", "batchops", "info"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "build_info" in proc.stdout


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


@pytest.mark.slow
@needs_extension
def test_bench_smoke_writes_a_table_with_both_providers(tmp_path, capsys):
    out_dir = tmp_path / "results"  # does not exist yet: bench creates it
    # --default-malloc: the fixed thresholds are process-wide, so they are tested in a subprocess below.
    assert cli.main(["bench", "--device", "cpu", "--smoke", "--default-malloc", "--out", str(out_dir)]) == 0
    files = list(out_dir.iterdir())
    assert len(files) == 1
    name = files[0].name
    assert name.startswith(f"cpu-{torch.get_num_threads()}threads-") and name.endswith(".md")
    text = files[0].read_text()
    assert capsys.readouterr().out.strip() == text.strip()  # what is printed is what is written
    header = next(line for line in text.splitlines() if line.startswith("| op |"))
    assert "torch ms" in header and "batchops ms" in header and "ratio" in header
    rows = [line for line in text.splitlines() if line.startswith("| BatchNorm2d")]
    assert len(rows) == 14  # per layout: 3 modes plain, ReLU, SiLU, add+ReLU, eval
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5] != "-" and cells[6] != "-", row  # both providers were timed
        assert "error" not in cells[-1] and "DIFFER" not in cells[-1], row
    assert "copy bandwidth" in text and "torch " + torch.__version__ in text
    assert "- memory: the C library's default malloc settings" in text


@needs_extension
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc thresholds are glibc's")
def test_bench_fixes_glibc_malloc_thresholds_for_cpu_runs(tmp_path):
    """By default a CPU run makes malloc keep freed blocks (see batchops.bench.timing.reuse_freed_cpu_memory)
    and says so in the report; run in a subprocess, since the setting is process-wide. A run of
    one op writes a file named after it (it must not overwrite the day's full run)."""
    code = (
        "from batchops import cli; import sys; "
        f"sys.exit(cli.main(['bench', '--device', 'cpu', '--smoke', '--op', 'linear', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "- memory: glibc malloc set to reuse freed blocks up to 32 MiB (M_MMAP_THRESHOLD)" in proc.stdout
    assert "| Linear+GELU" in proc.stdout
    files = [f.name for f in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].endswith("-linear.md"), files


def test_bench_without_extension_fails_with_the_build_hint(monkeypatch, tmp_path, capsys):
    from batchops import _extension

    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(
        _extension,
        "_load_error",
        "batchops' compiled kernels (batchops._C) could not be imported: test; " + _extension.BUILD_HINT,
    )
    assert cli.main(["bench", "--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-build-isolation" in err
    assert not list(tmp_path.iterdir())


@needs_extension
def test_bench_batch_norm_resnet50_prints_its_summary(tmp_path, capsys):
    """The resnet50-shapes benchmark runs on request and ends its table with the geometric mean
    and the worst ratio per mode and layout (the issue's targets)."""
    out_dir = tmp_path / "results"
    args = ["bench", "--device", "cpu", "--smoke", "--default-malloc", "--op", "batch_norm_resnet50"]
    assert cli.main([*args, "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "### batch_norm_resnet50: summary" in text
    summary = [line for line in text.splitlines() if line.startswith("| training forward+backward |")]
    assert {line.split("|")[2].strip() for line in summary} == {"NCHW", "channels_last"}
    cold = [line for line in text.splitlines() if line.startswith("| training forward+backward, inputs from memory |")]
    assert {line.split("|")[2].strip() for line in cold} == {"NCHW", "channels_last"}
    assert "BatchNorm2d (cold)" in text  # the cold rows, checked against float64 like the others
    from batchops.bench import DEFAULT_OPS

    assert "batch_norm_resnet50" not in DEFAULT_OPS  # 72 cases: only when asked for
