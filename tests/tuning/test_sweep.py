"""batchops.tuning.sweep: the batch size convergence study and `batchops sweep` (tiny configurations)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import batchops
from batchops import cli
from batchops.tuning import sweep as sw
from batchops.tuning.noise_scale import estimate_noise_scale
from batchops.tuning.sweep import analysis, study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small and single-threaded: the suite shares two cores.
TINY = dict(max_samples=256, eval_points=4, noise_points=4, eval_train_samples=256, progress=False, num_threads=1)


def _check_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, path
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 100 and height > 100, (path, width, height)


def _check_outputs(files, batch_sizes):
    for role in sw.PLOT_FILES:
        _check_png(files[role])
    with open(files["report"], encoding="utf-8") as f:
        report = f.read()
    for b in batch_sizes:
        assert f"| {b} |" in report
    for name in sw.PLOT_FILES.values():
        assert f"]({name})" in report  # embedded
    with open(files["json"], encoding="utf-8") as f:
        data = json.load(f)
    assert [r["batch_size"] for r in data["runs"]] == list(batch_sizes)
    for run in data["runs"]:
        assert run["steps"] and run["evals"]
        assert {"step", "samples", "loss", "lr", "time_s"} <= set(run["steps"][0])
        assert {"step", "samples", "train_loss", "test_loss", "test_accuracy"} <= set(run["evals"][0])
    return report, data


@pytest.mark.slow
@pytest.mark.usefixtures("kernels")
def test_default_sweep_end_to_end_writes_its_files(tmp_path):
    result = sw.batch_size_sweep((32, 16), out_dir=tmp_path, **TINY)
    assert result.batch_sizes == [16, 32]
    report, data = _check_outputs(result.files, (16, 32))
    for run in result.runs:
        assert run.num_steps == math.ceil(256 / run.batch_size) and not run.diverged
        assert [s["step"] for s in run.steps] == list(range(1, run.num_steps + 1))
        assert [s["samples"] for s in run.steps] == [k * run.batch_size for k in range(1, run.num_steps + 1)]
        times = [s["time_s"] for s in run.steps]
        assert times == sorted(times) and run.train_time_s == times[-1] > 0
        assert run.throughput > 0
        assert run.evals[0]["step"] == 0 and run.evals[-1]["step"] == run.num_steps
        assert 0.0 <= run.final_test_accuracy <= 1.0
        assert run.noise and all(
            n["b_big"] == run.batch_size and n["b_small"] == run.batch_size // 2 for n in run.noise
        )
    # sqrt rule around base batch 32.
    assert result.run(16).lr == pytest.approx(sw.DEFAULT_BASE_LR["sgd"] / math.sqrt(2))
    assert result.run(32).lr == pytest.approx(sw.DEFAULT_BASE_LR["sgd"])
    assert math.isfinite(result.target_loss)
    assert data["target_loss"] == pytest.approx(result.target_loss)
    assert data["config"]["noise_estimator"] == study.NOISE_ESTIMATOR
    assert f"batchops {batchops.__version__}, torch {torch.__version__}" in report
    summary = result.summary()
    assert "| 16 |" in summary and "| 32 |" in summary and "target loss" in summary


@pytest.mark.slow
@pytest.mark.usefixtures("kernels")
def test_every_batch_size_starts_from_the_same_weights_and_sample_order():
    result = sw.batch_size_sweep((8, 16), noise_scale=False, **{**TINY, "max_samples": 32})
    a, b = result.runs
    # The same initial model on the same evaluation data: bit-identical.
    assert a.evals[0]["train_loss"] == b.evals[0]["train_loss"]
    assert a.evals[0]["test_loss"] == b.evals[0]["test_loss"]
    # The first step's loss is the initial model's loss on the first B samples of the shared stream.
    train, _ = sw.load_digits_dataset()
    torch.manual_seed(0)
    model = sw.default_model()
    stream = sw.sample_stream(len(train), 0)
    first = [next(stream) for _ in range(16)]
    x, y = train.tensors[0][first], train.tensors[1][first]
    with torch.no_grad():
        loss8 = nn.functional.cross_entropy(model(x[:8]), y[:8]).item()
        loss16 = nn.functional.cross_entropy(model(x), y).item()
    assert a.steps[0]["loss"] == pytest.approx(loss8, rel=1e-5)
    assert b.steps[0]["loss"] == pytest.approx(loss16, rel=1e-5)


def test_sample_stream_is_shared_and_crosses_epochs():
    s1, s2 = sw.sample_stream(10, 3), sw.sample_stream(10, 3)
    first = [next(s1) for _ in range(25)]
    assert first == [next(s2) for _ in range(25)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a fresh permutation each epoch


class _Blobs(Dataset):
    """A map-style dataset that is not a TensorDataset: (x, y) items, two Gaussian blobs."""

    def __init__(self, n=200, dim=6):
        gen = torch.Generator().manual_seed(1)
        self.y = torch.randint(0, 2, (n,), generator=gen)
        self.x = torch.randn(n, dim, generator=gen) + 2.0 * self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.slow
def test_custom_dataset_and_model_fn(tmp_path):
    rng_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    result = sw.batch_size_sweep(
        (4, 16),
        dataset=_Blobs(),
        model_fn=_mlp,
        optimizer="adam",
        lr_rule="linear",
        base_batch_size=4,
        out_dir=tmp_path,
        **{**TINY, "max_samples": 160},
    )
    assert result.config["train_size"] == 160 and result.config["test_size"] == 40
    assert result.run(4).lr == pytest.approx(1e-3) and result.run(16).lr == pytest.approx(4e-3)
    for run in result.runs:
        assert run.num_steps == 160 // run.batch_size and run.final_test_accuracy is not None
    assert result.runs[0].evals[0]["train_loss"] == result.runs[1].evals[0]["train_loss"]
    _check_outputs(result.files, (4, 16))
    # The caller's random state and thread count are restored.
    assert torch.equal(rng_state, torch.random.get_rng_state()) and torch.get_num_threads() == threads
    # A (train, test) pair is used as given; nothing is written without out_dir.
    blobs = _Blobs(100)
    pair = sw.batch_size_sweep(
        (8,), dataset=(blobs, _Blobs(30)), model_fn=_mlp, noise_scale=False, **{**TINY, "max_samples": 40}
    )
    assert (pair.config["train_size"], pair.config["test_size"]) == (100, 30)
    assert pair.files == {} and pair.runs[0].noise == []


def test_argument_errors():
    with pytest.raises(ValueError, match="lr_rule"):
        sw.batch_size_sweep((8,), lr_rule="cubic")
    with pytest.raises(ValueError, match="optimizer"):
        sw.batch_size_sweep((8,), optimizer="rmsprop")
    with pytest.raises(ValueError, match="model_fn"):
        sw.batch_size_sweep((8,), dataset=_Blobs())
    with pytest.raises(ValueError, match="batch_sizes"):
        sw.batch_size_sweep((0, 8))
    assert sw.lr_for(128, base_lr=0.1, base_batch_size=32, lr_rule="sqrt") == pytest.approx(0.2)
    assert sw.lr_for(128, base_lr=0.1, base_batch_size=32, lr_rule="linear") == pytest.approx(0.4)
    assert sw.lr_for(128, base_lr=0.1, base_batch_size=32, lr_rule="none") == pytest.approx(0.1)


def test_noise_scale_estimator_recovers_known_values():
    grad_sq, trace, b_small, b_big = 3.0, 120.0, 8, 32
    g_small, g_big = grad_sq + trace / b_small, grad_sq + trace / b_big
    g, t = estimate_noise_scale(g_small, g_big, b_small, b_big)
    assert (float(g), float(t)) == pytest.approx((grad_sq, trace))
    assert study.NOISE_ESTIMATOR == f"{estimate_noise_scale.__module__}.{estimate_noise_scale.__name__}"


def test_two_half_batch_measurement_matches_the_exact_noise_scale():
    # Least squares on a fixed data set: per-example gradients are known exactly, so the true
    # |G|^2 and tr(Sigma) are too; averaged over many batches the half-batch estimates match them.
    gen = torch.Generator().manual_seed(0)
    n, dim = 4096, 5
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = x @ torch.ones(dim, dtype=torch.float64) + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.7)
    loss_fn = lambda out, t: ((out.squeeze(1) - t) ** 2).mean()  # noqa: E731
    with torch.no_grad():
        per_example = 2 * (x @ model.weight[0] - y)[:, None] * x  # (n, dim)
    mean = per_example.mean(0)
    true_grad_sq = float(mean.square().sum())
    true_trace = float((per_example - mean).square().sum(1).mean())
    params = list(model.parameters())
    sums = [0.0, 0.0]
    for _ in range(400):
        idx = torch.randint(0, n, (64,), generator=gen)
        g_small, g_big, b_small, b_big = study.half_batch_grad_norms(model, params, loss_fn, x[idx], y[idx])
        g, t = estimate_noise_scale(g_small, g_big, b_small, b_big)
        sums[0] += g
        sums[1] += t
    assert sums[1] / sums[0] == pytest.approx(true_trace / true_grad_sq, rel=0.2)
    assert all(p.grad is None for p in params)  # the measurement leaves no gradients behind


def _run(b, points):
    run = sw.RunResult(
        batch_size=b,
        lr=0.1,
        num_steps=points[-1][0],
        samples=points[-1][0] * b,
        train_time_s=1.0,
        throughput=1.0,
        diverged=False,
    )
    run.evals = [
        {"step": s, "samples": s * b, "time_s": s * 0.1, "train_loss": loss, "test_loss": loss, "test_accuracy": None}
        for s, loss in points
    ]
    run.noise = [{"step": s, "samples": s * b, "noise_scale": 10.0 + s} for s, _ in points]
    return run


def test_target_crossing_is_interpolated_and_the_tradeoff_fit_is_exact():
    run = _run(10, [(0, 2.0), (10, 1.0), (20, 0.5), (30, 0.4), (40, 0.3)])
    analysis.fill_target(run, 0.75)
    assert run.steps_to_target == pytest.approx(15.0)
    assert run.samples_to_target == pytest.approx(150.0)
    assert run.time_to_target_s == pytest.approx(1.5)
    assert run.noise_scale_at_target == 20.0  # the last measurement before the crossing
    analysis.fill_target(run, 0.1)
    assert run.steps_to_target is None and run.noise_scale_at_target is None
    # Auto target: the loosest loss every run reached within half its samples.
    slow = _run(10, [(0, 2.0), (10, 1.5), (20, 0.9), (30, 0.6), (40, 0.5)])
    assert analysis.pick_target([run, slow], None) == (pytest.approx(0.9), True)
    assert analysis.pick_target([run, slow], 0.42) == (0.42, False)
    # The measured noise scale: the median over the runs that reached the target.
    analysis.fill_target(slow, 0.75)
    assert (run.noise_scale_at_target, slow.noise_scale_at_target) == (None, 30.0)
    assert analysis.median_noise_scale_at_target([run, slow]) == 30.0
    analysis.fill_target(run, 0.75)
    assert analysis.median_noise_scale_at_target([run, slow]) == 25.0
    analysis.fill_target(slow, 0.1)
    analysis.fill_target(run, 0.1)
    assert analysis.median_noise_scale_at_target([run, slow]) is None
    # S = S_min (1 + B_crit / B) exactly: the fit returns S_min and E_min = S_min * B_crit.
    s_min, b_crit = 40.0, 100.0
    pts = [(b, s_min * (1 + b_crit / b)) for b in (16, 32, 64, 128)]
    fit_s, fit_e = analysis.fit_tradeoff(pts)
    assert (fit_s, fit_e / fit_s) == (pytest.approx(s_min), pytest.approx(b_crit))
    assert analysis.fit_tradeoff(pts[:1]) == (None, None)


@pytest.mark.usefixtures("kernels")
def test_cli_sweep_quick_writes_files(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--quick", "--out", str(out), "--no-progress", "--max-samples", "192"]) == 0
    captured = capsys.readouterr()
    assert "| 16 |" in captured.out and "| 64 |" in captured.out
    assert "written to" in captured.err
    files = {role: str(out / name) for role, name in sw.PLOT_FILES.items()}
    files.update(report=str(out / sw.REPORT_FILE), json=str(out / sw.JSON_FILE))
    _check_outputs(files, (16, 64))


def test_cli_sweep_arguments():
    parser = cli._parser()
    args = parser.parse_args(["sweep", "--batch-sizes", "8,32", "--lr-rule", "linear", "--epochs", "2"])
    assert args.batch_sizes == (8, 32) and args.lr_rule == "linear" and args.epochs == 2.0
    assert args.out == sw.DEFAULT_OUT_DIR and args.device == "cpu" and not args.quick
    # a bare run never overwrites the committed example results
    assert os.path.abspath(args.out) != os.path.abspath(os.path.join("benchmarks", "sweep"))
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--batch-sizes", "8,x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--lr-rule", "cubic"])
    # The other commands are untouched.
    assert parser.parse_args(["bench", "--quick"]).command == "bench"
    assert parser.parse_args(["info"]).command == "info"


def test_importing_the_sweep_needs_neither_matplotlib_nor_scikit_learn():
    code = "import sys, batchops.tuning.sweep; print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
