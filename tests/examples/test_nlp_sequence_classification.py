"""examples/nlp_sequence_classification.py runs end to end (its --quick mode, in a subprocess):
the bucketed+packed loader against the plain padded one."""

import re
import sys

import pytest

from tests.helpers import example_path, example_results, run_example

pytestmark = [pytest.mark.usefixtures("kernels"), pytest.mark.slow]


def _results(stdout: str) -> dict[str, dict[str, float]]:
    """{loader: {key: value}} from the example's `RESULT loader=... key=value ...` lines."""
    out = {}
    for fields in example_results(stdout):
        loader = fields.pop("loader")
        out[loader] = {k: float(v) for k, v in fields.items()}
    return out


def test_nlp_sequence_classification_quick():
    proc = run_example([sys.executable, example_path("nlp_sequence_classification.py"), "--quick", "--device", "cpu"])
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
