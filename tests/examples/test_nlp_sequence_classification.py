"""The examples under examples/ run end to end (their --quick mode, in a subprocess)."""

import os
import re
import subprocess
import sys

import pytest

import batchops

from tests.helpers import ROOT

pytestmark = [pytest.mark.usefixtures("kernels"), pytest.mark.slow]


def _env():
    # The package may be used from the checkout without being installed.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(batchops.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}


def _results(stdout: str) -> dict[str, dict[str, float]]:
    """{loader: {key: value}} from the example's `RESULT loader=... key=value ...` lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            loader = fields.pop("loader")
            out[loader] = {k: float(v) for k, v in fields.items()}
    return out


def test_nlp_sequence_classification_quick():
    script = os.path.join(ROOT, "examples", "nlp_sequence_classification.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(proc.stdout)
    assert {"bucketed", "plain"} <= set(results), proc.stdout
    for loader, r in results.items():
        # Balanced binary labels: chance is 0.5; the LSTM must clearly beat it.
        assert r["chance"] == 0.5
        assert r["val_acc"] >= 0.7, (loader, proc.stdout)
        assert r["train_acc"] >= 0.65, (loader, proc.stdout)
        assert r["tokens_per_s"] > 0
    assert results["bucketed"]["padding_efficiency"] >= 0.9, proc.stdout
    # The plain loader pads random batches to their longest sentence: far less efficient.
    assert results["plain"]["padding_efficiency"] < results["bucketed"]["padding_efficiency"]
    # The human-readable report is there too.
    assert re.search(r"\| bucketed\+packed \| [0-9.]+ \| [0-9.]+ \| [0-9,]+ \| 0\.9\d\d \|", proc.stdout), proc.stdout
    assert "epoch 2/2" in proc.stdout
