"""Convergence study: train one model at several batch sizes and compare how fast each learns.

`batch_size_sweep` trains the same model, from the same initial weights and on the same stream
of samples, once per batch size (with the learning rate scaled by a rule), and records:

* per step: the mini-batch training loss, the samples seen so far, the learning rate and the
  training wall time (evaluation and noise-scale measurements are kept off that clock);
* per evaluation point: the loss on a fixed subset of the training set and the test loss and
  accuracy, all in eval mode (evaluation points lie on a grid of samples seen, the same for every
  batch size, plus the steps 1, 2, 4, 8, ...);
* the throughput (training samples per second: the batch size over the median step time);
* the gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical
  Model of Large-Batch Training", appendix A): every few steps the batch is split into two halves,
  the gradient of each half is computed, and the unbiased two-batch estimators of |G|^2 and
  tr(Sigma) are fed from the halves' squared norms (batch B/2) and their mean's (batch B). The
  two estimates are smoothed with an exponential moving average and B_simple is their ratio.

A target loss (on the training subset; by default the loosest loss every run reached within half
its samples)
then gives, per batch size, the steps, samples and time to reach it. The steps S and samples
E = S * B to reach the target should follow McCandlish's trade-off curve
(S / S_min - 1) * (E / E_min - 1) = 1, i.e. S = S_min * (1 + B_crit / B); the sweep fits S_min and
B_crit = E_min / S_min by least squares on S = S_min + E_min / B and marks both the fitted B_crit
and the measured noise scale on the plots. (The theory assumes a learning rate tuned per batch
size; a fixed rule such as sqrt scaling is an approximation of that.)

With `out_dir`, the sweep writes PNG plots (matplotlib, Agg canvas, no display), `report.md`
(a table per batch size with the images embedded) and `sweep.json` (every raw record).
`batchops sweep` on the command line runs the default study (see batchops/cli.py).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from batchops.data.prefetch import apply_to_tensors

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEFAULT_BATCH_SIZES",
    "LR_RULES",
    "OPTIMIZERS",
    "DEFAULT_BASE_LR",
    "DEFAULT_EPOCHS",
    "SPLIT_SEED",
    "PLOT_FILES",
    "REPORT_FILE",
    "JSON_FILE",
    "load_digits_dataset",
    "default_model",
    "lr_for",
    "sample_stream",
    "RunResult",
    "SweepResult",
    "batch_size_sweep",
    "write_outputs",
]

# `batchops sweep`'s default folder (git-ignored). The committed example results live in
# benchmarks/sweep/ and are reproduced with an explicit --out, never overwritten by default.
DEFAULT_OUT_DIR = "sweep-results"
DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256)
LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
OPTIMIZERS = ("sgd", "adam")
DEFAULT_BASE_LR = {"sgd": 0.05, "adam": 1e-3}
DEFAULT_EPOCHS = 15.0
# The split of the default data set is fixed (not tied to `seed`): every sweep scores on the same
# test images.
SPLIT_SEED = 0
# The files a sweep writes into out_dir, by role.
PLOT_FILES = {
    "overview": "sweep.png",
    "loss_vs_steps": "loss_vs_steps.png",
    "loss_vs_samples": "loss_vs_samples.png",
    "loss_vs_time": "loss_vs_time.png",
    "steps_vs_samples": "steps_vs_samples.png",
    "throughput": "throughput.png",
    "noise_scale": "noise_scale.png",
}
REPORT_FILE = "report.md"
JSON_FILE = "sweep.json"


# ---------------------------------------------------------------------------------------------
# Data and model defaults


def load_digits_dataset(
    test_fraction: float = 0.2, split_seed: int = SPLIT_SEED
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (1797 8x8 grey images of the digits 0-9, shipped with scikit-learn:
    no download) as (train, test) TensorDatasets of float32 images (N, 1, 8, 8) and int64 labels.

    The split is stratified with a fixed seed; pixels are standardised with the training set's
    mean and standard deviation (one scalar each, so images keep their structure)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # an optional dependency: pip install "batchops[sweep]"
        raise ImportError(
            "batchops' default sweep data needs scikit-learn: pip install scikit-learn "
            "(or batchops[sweep]), or pass dataset="
        ) from exc

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    mean, std = float(x_train.mean()), float(x_train.std())

    def to_tensors(x, y):
        images = torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(y, dtype=torch.int64))

    return to_tensors(x_train, y_train), to_tensors(x_test, y_test)


def default_model(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 8) -> nn.Module:
    """A small CNN on batchops' fused batch norm + ReLU: conv(in->w) + BN-ReLU, conv(w->2w) +
    BN-ReLU, 2x2 max-pool, linear. About 30k parameters for the 8x8 digits."""
    from batchops.nn import BatchNorm2d

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        BatchNorm2d(width, activation="relu"),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        BatchNorm2d(2 * width, activation="relu"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (image_size // 2) ** 2, num_classes),
    )


def lr_for(batch_size: int, *, base_lr: float, base_batch_size: int, lr_rule: str) -> float:
    """base_lr * (batch_size / base_batch_size) ** p with p = 0 ("none"), 0.5 ("sqrt") or 1 ("linear")."""
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {sorted(LR_RULES)}, got {lr_rule!r}")
    return base_lr * (batch_size / base_batch_size) ** LR_RULES[lr_rule]


def sample_stream(n: int, seed: int):
    """An endless stream of dataset indices: epoch after epoch, each a fresh permutation of
    range(n) drawn from a generator seeded with `seed`. Every batch size reads the same stream
    (batches may straddle epochs), so the first k samples seen are the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


class _Batcher:
    """Turns index lists into (x, y) batches on the device; TensorDatasets (and Subsets of one)
    are indexed directly, any other map-style dataset goes through default_collate."""

    def __init__(self, dataset: Dataset, device: torch.device) -> None:
        self.dataset = dataset
        self.device = device
        self.tensors: list[Tensor] | None = None
        base, indices = dataset, None
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
            base, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.int64)
        if isinstance(base, TensorDataset):
            tensors = base.tensors if indices is None else [t[indices] for t in base.tensors]
            self.tensors = [t.to(device) for t in tensors]

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int]) -> tuple[Any, Any]:
        if self.tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
            x, y = (t.index_select(0, idx) for t in self.tensors[:2])
            return x, y
        from torch.utils.data import default_collate

        x, y = default_collate([self.dataset[i] for i in indices])[:2]
        return apply_to_tensors(lambda t: t.to(self.device, non_blocking=True), (x, y))


def _split(dataset, seed: int, test_fraction: float) -> tuple[Dataset, Dataset]:
    if isinstance(dataset, (tuple, list)):
        if len(dataset) != 2:
            raise ValueError("dataset must be a Dataset or a (train, test) pair of Datasets")
        return dataset[0], dataset[1]
    n = len(dataset)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise ValueError(f"dataset has {n} items: too few to split into train and test")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[n_test:]), Subset(dataset, perm[:n_test])


# ---------------------------------------------------------------------------------------------
# Noise scale


def _noise_estimator() -> tuple[Callable, str]:
    """batchops.tuning.noise_scale.estimate_noise_scale when it imports, else the same two
    formulas here (McCandlish et al. 2018, eqs. A.2-A.3)."""
    try:
        from batchops.tuning.noise_scale import estimate_noise_scale

        return estimate_noise_scale, "batchops.tuning.noise_scale.estimate_noise_scale"
    except Exception:  # not there (yet), or broken: the formula is two lines
        return _estimate_noise_scale, "batchops.tuning.sweep._estimate_noise_scale"


def _estimate_noise_scale(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates of |G|^2 and tr(Sigma) from the squared gradient norms at two batch sizes."""
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


def _flat_grad(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class RunResult:
    """One batch size's run. `steps`, `evals` and `noise` are lists of flat dicts (see
    batch_size_sweep); the *_to_target fields are filled once the sweep has picked its target
    (None when the run never reached it)."""

    batch_size: int
    lr: float
    num_steps: int
    samples: int
    train_time_s: float
    throughput: float
    diverged: bool
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    noise: list[dict] = field(default_factory=list)
    steps_to_target: float | None = None
    samples_to_target: float | None = None
    time_to_target_s: float | None = None
    noise_scale_at_target: float | None = None

    @property
    def final_eval(self) -> dict:
        return self.evals[-1] if self.evals else {}

    @property
    def final_train_loss(self) -> float:
        return self.final_eval.get("train_loss", math.nan)

    @property
    def final_test_loss(self) -> float:
        return self.final_eval.get("test_loss", math.nan)

    @property
    def final_test_accuracy(self) -> float | None:
        return self.final_eval.get("test_accuracy")

    @property
    def noise_scale_final(self) -> float | None:
        return self.noise[-1]["noise_scale"] if self.noise else None

    def summary(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "num_steps": self.num_steps,
            "samples": self.samples,
            "train_time_s": self.train_time_s,
            "throughput": self.throughput,
            "diverged": self.diverged,
            "final_train_loss": self.final_train_loss,
            "final_test_loss": self.final_test_loss,
            "final_test_accuracy": self.final_test_accuracy,
            "steps_to_target": self.steps_to_target,
            "samples_to_target": self.samples_to_target,
            "time_to_target_s": self.time_to_target_s,
            "noise_scale_at_target": self.noise_scale_at_target,
            "noise_scale_final": self.noise_scale_final,
        }


@dataclass
class SweepResult:
    """What batch_size_sweep returns: the runs (ascending batch size), the target loss, the
    measured noise scale (median over the runs of B_simple where each reached the target), the
    fit of S = S_min * (1 + B_crit / B), the configuration and the files written (role -> path)."""

    runs: list[RunResult]
    target_loss: float
    target_auto: bool
    noise_scale: float | None
    critical_batch_size: float | None
    min_steps: float | None
    min_samples: float | None
    config: dict
    files: dict[str, str] = field(default_factory=dict)

    def run(self, batch_size: int) -> RunResult:
        for r in self.runs:
            if r.batch_size == batch_size:
                return r
        raise KeyError(batch_size)

    @property
    def batch_sizes(self) -> list[int]:
        return [r.batch_size for r in self.runs]

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "target_loss": self.target_loss,
            "target_auto": self.target_auto,
            "noise_scale": self.noise_scale,
            "critical_batch_size": self.critical_batch_size,
            "min_steps": self.min_steps,
            "min_samples": self.min_samples,
            "summary": [r.summary() for r in self.runs],
            "runs": [asdict(r) for r in self.runs],
            "files": self.files,
        }

    def table(self) -> str:
        """The per-batch-size markdown table (also the terminal summary's body)."""
        head = (
            "| batch | lr | steps | final train loss | test loss | test acc | steps to target | "
            "samples to target | time to target | samples/s | B_noise at target | B_noise final |"
        )
        lines = [head, "|" + "---|" * 12]
        for r in self.runs:
            acc = r.final_test_accuracy
            lines.append(
                f"| {r.batch_size} | {r.lr:.4g} | {r.num_steps} | {_fmt(r.final_train_loss, '.4f')}"
                f"{' (diverged)' if r.diverged else ''} | {_fmt(r.final_test_loss, '.4f')} | "
                f"{'n/a' if acc is None else f'{100 * acc:.1f}%'} | {_fmt(r.steps_to_target, '.0f')} | "
                f"{_fmt(r.samples_to_target, '.0f')} | {_fmt(r.time_to_target_s, '.2f', ' s')} | "
                f"{_fmt(r.throughput, '.0f')} | {_fmt(r.noise_scale_at_target, '.0f')} | "
                f"{_fmt(r.noise_scale_final, '.0f')} |"
            )
        return "\n".join(lines)

    def headline(self) -> str:
        """Two lines: the target, the measured noise scale and the fitted critical batch size."""
        if math.isfinite(self.target_loss):
            how = "auto: the loosest loss every run reached within half its samples" if self.target_auto else "given"
            target = (
                f"target loss {self.target_loss:.4g} ({how}; loss on {self.config['eval_train_samples']} "
                "training samples, eval mode)"
            )
        else:
            target = "no target loss: no run got below the initial loss"
        noise = f"noise scale B_simple at the target (median over batch sizes): {_fmt(self.noise_scale, '.0f')}"
        if self.critical_batch_size is not None:
            fit = (
                f"fit S = S_min (1 + B_crit / B): B_crit = {self.critical_batch_size:.0f}, "
                f"S_min = {self.min_steps:.1f} steps, E_min = {self.min_samples:.0f} samples"
            )
        else:
            fit = (
                "fit S = S_min (1 + B_crit / B): not possible (it needs 2 batch sizes that reached the target "
                "after some steps, and a positive fit)"
            )
        return f"{target}\n{noise}; {fit}"

    def summary(self) -> str:
        """The terminal summary: one line of setup, the table, the headline."""
        c = self.config
        setup = (
            f"batch size sweep: {c['dataset']} ({c['train_size']} train / {c['test_size']} test), "
            f"{c['model']}, {c['optimizer']}, lr rule {c['lr_rule']} (base lr {c['base_lr']:g} at batch "
            f"{c['base_batch_size']}), {c['samples_per_run']} samples per run, {c['device_label']}, "
            f"{c['wall_time_s']:.0f} s"
        )
        return f"{setup}\n\n{self.table()}\n\n{self.headline()}"


def _fmt(value, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


# ---------------------------------------------------------------------------------------------
# The sweep


def batch_size_sweep(
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    dataset: Dataset | tuple[Dataset, Dataset] | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    lr_rule: str = "sqrt",
    base_lr: float | None = None,
    base_batch_size: int = 32,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_samples: int | None = None,
    epochs: float | None = None,
    max_samples: int | None = None,
    target_loss: float | None = None,
    eval_points: int = 40,
    eval_train_samples: int = 2048,
    noise_scale: bool = True,
    noise_every: int | None = None,
    noise_points: int = 60,
    noise_beta: float = 0.9,
    test_fraction: float = 0.2,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train the same model at each batch size and compare convergence; see the module docstring.

    dataset: None (scikit-learn's digits, standardised, fixed stratified split), a map-style
        Dataset of (x, y) items (split into train/test with `test_fraction`, seeded by `seed`), or a
        (train, test) pair. Pass a `model_fn` with a custom dataset.
    model_fn: builds the model (called once per run; the weights of the first build, made under
        torch.manual_seed(seed), are loaded into every run). Default: `default_model()`.
    loss_fn: mean loss of (output, y); default cross entropy. Accuracy is reported when the output
        is (N, C) logits and y integer class labels.
    lr_rule, base_lr, base_batch_size: lr = base_lr * (B / base_batch_size) ** {none: 0, sqrt: .5,
        linear: 1}. base_lr defaults to 0.05 (sgd) or 1e-3 (adam).
    optimizer: "sgd" (with `momentum`) or "adam"; `weight_decay` for either.
    warmup_samples: the learning rate rises linearly over the first warmup_samples samples (the
        same for every batch size, as in Goyal et al. 2017); None: one epoch, at most a tenth of
        the samples per run; 0: no warm-up.
    epochs / max_samples: how much data each run sees (the same for every batch size: each run
        takes ceil(max_samples / B) steps). max_samples wins; default 15 epochs.
    target_loss: the loss (on up to `eval_train_samples` training samples, eval mode) that counts
        as reached; None: the loosest loss that every run reached within half its samples.
    eval_points: evaluations on a grid of samples seen (plus steps 1, 2, 4, ...).
    noise_scale, noise_every, noise_points, noise_beta: measure B_simple every `noise_every` steps
        (default: about `noise_points` measurements per run) with an EMA of factor `noise_beta`.
    out_dir: where to write the plots, report.md and sweep.json (None: write nothing).
    device: "cpu", "cuda", "cuda:N" or "auto". num_threads: torch threads during the sweep
        (restored afterwards; None leaves them as they are).
    progress: tqdm bars on stderr.
    """
    from batchops.environment import resolve_device

    started = time.perf_counter()
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {sorted(LR_RULES)}, got {lr_rule!r}")
    if dataset is not None and model_fn is None:
        raise ValueError("a custom dataset needs a model_fn")
    if base_lr is None:
        base_lr = DEFAULT_BASE_LR[optimizer]
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    # The sweep seeds torch's generators itself; the caller's random state is left as it was.
    rng = torch.random.fork_rng(devices=[dev.index] if dev.type == "cuda" else [])
    rng.__enter__()
    try:
        if dataset is None:
            train_set, test_set = load_digits_dataset(test_fraction)
            dataset_name = "sklearn digits (8x8, 10 classes)"
        else:
            train_set, test_set = _split(dataset, seed, test_fraction)
            dataset_name = type(dataset[0] if isinstance(dataset, (tuple, list)) else dataset).__name__
        model_fn = model_fn or default_model
        model_name = (
            "CNN conv16-BN(relu)-conv32-BN(relu)-pool-linear, batchops.BatchNorm2d"
            if model_fn is default_model
            else getattr(model_fn, "__name__", "model_fn")
        )
        loss_fn = loss_fn or nn.functional.cross_entropy
        n_train = len(train_set)
        if max_samples is None:
            max_samples = int(round((DEFAULT_EPOCHS if epochs is None else epochs) * n_train))
        if max_samples < 1:
            raise ValueError("epochs / max_samples must give at least one sample per run")
        if warmup_samples is None:
            warmup_samples = min(n_train, max_samples // 10)

        torch.manual_seed(seed)
        init_state = copy.deepcopy(model_fn().state_dict())

        train = _Batcher(train_set, dev)
        test = _Batcher(test_set, dev)
        eval_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))[:eval_train_samples]
        eval_idx = sorted(eval_idx.tolist())
        estimator, estimator_name = _noise_estimator()

        runs = []
        for b in batch_sizes:
            runs.append(
                _train_one(
                    b,
                    model_fn=model_fn,
                    init_state=init_state,
                    loss_fn=loss_fn,
                    train=train,
                    test=test,
                    eval_idx=eval_idx,
                    lr=lr_for(b, base_lr=base_lr, base_batch_size=base_batch_size, lr_rule=lr_rule),
                    optimizer=optimizer,
                    momentum=momentum,
                    weight_decay=weight_decay,
                    warmup_samples=warmup_samples,
                    max_samples=max_samples,
                    eval_points=eval_points,
                    noise_scale=noise_scale,
                    noise_every=noise_every,
                    noise_points=noise_points,
                    noise_beta=noise_beta,
                    estimator=estimator,
                    seed=seed,
                    device=dev,
                    progress=progress,
                )
            )
        threads = torch.get_num_threads()
    finally:
        rng.__exit__(None, None, None)
        torch.set_num_threads(old_threads)

    target, auto = _pick_target(runs, target_loss)
    for r in runs:
        _fill_target(r, target)
    reached = [r for r in runs if r.steps_to_target is not None]
    at_target = [
        r.noise_scale_at_target
        for r in reached
        if r.noise_scale_at_target is not None and math.isfinite(r.noise_scale_at_target)
    ]
    measured = statistics.median(at_target) if at_target else None
    s_min, e_min = _fit_tradeoff([(r.batch_size, r.steps_to_target) for r in reached])
    from batchops.environment import device_name

    config = {
        "batch_sizes": batch_sizes,
        "dataset": dataset_name,
        "train_size": n_train,
        "test_size": len(test_set),
        "model": model_name,
        "optimizer": optimizer if optimizer != "sgd" else f"sgd (momentum {momentum:g})",
        "lr_rule": lr_rule,
        "base_lr": base_lr,
        "base_batch_size": base_batch_size,
        "weight_decay": weight_decay,
        "warmup_samples": warmup_samples,
        "max_samples": max_samples,
        "samples_per_run": max_samples,
        "epochs": max_samples / n_train,
        "eval_points": eval_points,
        "eval_train_samples": len(eval_idx),
        "noise_scale": noise_scale,
        "noise_every": "auto" if noise_every is None else noise_every,
        "noise_points": noise_points,
        "noise_beta": noise_beta,
        "noise_estimator": estimator_name,
        "seed": seed,
        "device": str(dev),
        "device_name": device_name(dev),
        "torch_threads": threads,
        "device_label": f"{dev.type} ({threads} threads)" if dev.type == "cpu" else device_name(dev),
        "torch": torch.__version__,
        "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": time.perf_counter() - started,
    }
    result = SweepResult(
        runs=runs,
        target_loss=target,
        target_auto=auto,
        noise_scale=measured,
        critical_batch_size=(e_min / s_min) if s_min else None,
        min_steps=s_min,
        min_samples=e_min,
        config=config,
    )
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result


def _train_one(
    batch_size,
    *,
    model_fn,
    init_state,
    loss_fn,
    train,
    test,
    eval_idx,
    lr,
    optimizer,
    momentum,
    weight_decay,
    warmup_samples,
    max_samples,
    eval_points,
    noise_scale,
    noise_every,
    noise_points,
    noise_beta,
    estimator,
    seed,
    device,
    progress,
) -> RunResult:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = model_fn()
    model.load_state_dict(init_state)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    num_steps = math.ceil(max_samples / batch_size)
    eval_grid = max_samples / max(1, eval_points)
    if noise_every is None:
        noise_every = max(1, round(num_steps / max(1, noise_points)))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    run = RunResult(
        batch_size=batch_size, lr=lr, num_steps=0, samples=0, train_time_s=0.0, throughput=math.nan, diverged=False
    )
    run.evals.append(_evaluate(model, loss_fn, train, test, eval_idx, step=0, samples=0, time_s=0.0))
    stream = sample_stream(len(train), seed)
    ema_grad_sq = ema_trace = 0.0
    next_eval = eval_grid
    clock = 0.0
    bar = tqdm(
        total=num_steps,
        desc=f"batch {batch_size:>4}",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    )
    try:
        for step in range(1, num_steps + 1):
            indices = [next(stream) for _ in range(batch_size)]
            if noise_scale and batch_size >= 2 and (step - 1) % noise_every == 0:
                x, y = train.batch(indices)
                g_small_sq, g_big_sq, b_small, b_big = _two_batch_norms(model, params, loss_fn, x, y)
                grad_sq, trace = (float(v) for v in estimator(g_small_sq, g_big_sq, b_small, b_big))
                # The gradient norms fall by orders of magnitude during training, so a plain EMA of
                # the two estimates would be frozen at its first, largest terms. Both estimates are
                # linear in the squared norms: dividing them by this measurement's |g_small|^2 makes
                # the average scale-free (the ratio of averages of the normalised estimates).
                scale = g_small_sq if g_small_sq > 0 else 1.0
                ema_grad_sq = noise_beta * ema_grad_sq + (1 - noise_beta) * grad_sq / scale
                ema_trace = noise_beta * ema_trace + (1 - noise_beta) * trace / scale
                b_simple = ema_trace / ema_grad_sq if ema_grad_sq > 0 else math.nan
                run.noise.append(
                    {
                        "step": step - 1,
                        "samples": (step - 1) * batch_size,
                        "g_small_sq": g_small_sq,
                        "g_big_sq": g_big_sq,
                        "b_small": b_small,
                        "b_big": b_big,
                        "grad_sq": grad_sq,
                        "trace_sigma": trace,
                        "noise_scale_step": trace / grad_sq if grad_sq > 0 else math.nan,
                        "noise_scale": b_simple,
                    }
                )

            step_lr = lr * min(1.0, step * batch_size / warmup_samples) if warmup_samples > 0 else lr
            for group in opt.param_groups:
                group["lr"] = step_lr
            sync()
            t0 = time.perf_counter()
            x, y = train.batch(indices)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())  # also synchronises a CUDA stream
            sync()
            dt = time.perf_counter() - t0
            clock += dt
            samples = step * batch_size
            run.steps.append({"step": step, "samples": samples, "loss": loss_value, "lr": step_lr, "time_s": clock})
            run.num_steps, run.samples = step, samples
            bar.update(1)
            if not math.isfinite(loss_value):
                run.diverged = True
                bar.set_postfix_str("diverged")
                break
            if samples >= next_eval or step == num_steps or (step & (step - 1)) == 0:
                run.evals.append(
                    _evaluate(model, loss_fn, train, test, eval_idx, step=step, samples=samples, time_s=clock)
                )
                while next_eval <= samples:
                    next_eval += eval_grid
                bar.set_postfix_str(f"loss {run.evals[-1]['train_loss']:.4f}")
    finally:
        bar.close()
    run.train_time_s = clock
    # Throughput: batch size over the median step time, leaving out the first step (allocator and
    # kernel warm-up). The median shrugs off steps slowed by other processes on a shared machine.
    durations = [later["time_s"] - earlier["time_s"] for earlier, later in zip(run.steps, run.steps[1:])] or [clock]
    median = statistics.median(durations)
    if median > 0:
        run.throughput = batch_size / median
    return run


def _two_batch_norms(model: nn.Module, params, loss_fn, x, y) -> tuple[float, float, int, int]:
    """|g|^2 of the two halves of a batch (averaged; batch B/2) and of their mean (batch B). The
    model's buffers (batch norm running statistics) are restored afterwards and the gradients
    cleared, so training is not affected."""
    half = x.shape[0] // 2 if isinstance(x, Tensor) else len(y) // 2
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    grads = []
    for part in (slice(0, half), slice(half, 2 * half)):
        for p in params:
            p.grad = None
        loss_fn(model(_index(x, part)), _index(y, part)).backward()
        grads.append(_flat_grad(params))
    for p in params:
        p.grad = None
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    g_small_sq = 0.5 * (float(grads[0].square().sum()) + float(grads[1].square().sum()))
    g_big_sq = float(((grads[0] + grads[1]) * 0.5).square().sum())
    return g_small_sq, g_big_sq, half, 2 * half


def _index(obj, part: slice):
    if isinstance(obj, Tensor):
        return obj[part]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_index(o, part) for o in obj)
    if isinstance(obj, dict):
        return {k: _index(v, part) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _evaluate(
    model, loss_fn, train: _Batcher, test: _Batcher, eval_idx, *, step, samples, time_s, chunk: int = 1024
) -> dict:
    was_training = model.training
    model.eval()
    try:
        train_loss, _ = _score(model, loss_fn, train, eval_idx, chunk)
        test_loss, test_acc = _score(model, loss_fn, test, range(len(test)), chunk)
    finally:
        model.train(was_training)
    return {
        "step": step,
        "samples": samples,
        "time_s": time_s,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }


def _score(model, loss_fn, data: _Batcher, indices, chunk: int) -> tuple[float, float | None]:
    indices = list(indices)
    total, correct, n, acc_ok = 0.0, 0, 0, True
    for i in range(0, len(indices), chunk):
        part = indices[i : i + chunk]
        x, y = data.batch(part)
        out = model(x)
        total += float(loss_fn(out, y)) * len(part)
        if (
            acc_ok
            and isinstance(out, Tensor)
            and out.dim() == 2
            and isinstance(y, Tensor)
            and y.dim() == 1
            and not y.is_floating_point()
        ):
            correct += int((out.argmax(1) == y).sum())
        else:
            acc_ok = False
        n += len(part)
    return total / n, (correct / n if acc_ok else None)


# ---------------------------------------------------------------------------------------------
# Target, noise scale at the target, trade-off fit


def _pick_target(runs: Sequence[RunResult], target_loss: float | None) -> tuple[float, bool]:
    """The given target, or the loosest loss that every (non-diverged) run reached within the
    first half of its samples: the largest over runs of the lowest evaluated loss in
    (0, samples_per_run / 2]. Every run then crosses it with room to spare, and it does not drift
    to the memorisation regime when the runs are long. When that is no lower than the initial
    loss (runs too short to make progress by half-time), the runs' best losses over the whole
    run are used instead."""
    if target_loss is not None:
        return float(target_loss), False
    runs = [r for r in runs if r.evals]
    ok = [r for r in runs if not r.diverged] or runs
    if not ok:
        return math.nan, True
    initial = min(r.evals[0]["train_loss"] for r in ok)

    def loosest(fraction: float) -> float:
        bests = []
        for r in ok:
            limit = fraction * max(e["samples"] for e in r.evals)
            losses = [e["train_loss"] for e in r.evals if 0 < e["samples"] <= limit and math.isfinite(e["train_loss"])]
            bests.append(min(losses) if losses else math.inf)
        return max(bests)

    for fraction in (0.5, 1.0):
        target = loosest(fraction)
        if math.isfinite(target) and not target >= initial:
            return target, True
    return math.nan, True


def _fill_target(run: RunResult, target: float) -> None:
    """First crossing of the eval training loss below `target`, interpolated linearly between
    evaluation points (in samples; steps and time alike)."""
    run.steps_to_target = run.samples_to_target = run.time_to_target_s = run.noise_scale_at_target = None
    if not math.isfinite(target):
        return
    prev = None
    for e in run.evals:
        if math.isfinite(e["train_loss"]) and e["train_loss"] <= target:
            if prev is None:
                frac = 0.0
                prev = e
            else:
                span = prev["train_loss"] - e["train_loss"]
                frac = (prev["train_loss"] - target) / span if span > 0 else 1.0
            lerp = lambda k: prev[k] + frac * (e[k] - prev[k])  # noqa: E731
            run.steps_to_target = lerp("step")
            run.samples_to_target = lerp("samples")
            run.time_to_target_s = lerp("time_s")
            break
        prev = e
    if run.samples_to_target is not None and run.noise:
        before = [n for n in run.noise if n["samples"] <= run.samples_to_target]
        rec = before[-1] if before else run.noise[0]
        run.noise_scale_at_target = rec["noise_scale"]


def _fit_tradeoff(points: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """Least squares S = S_min + E_min / B over (B, S) points; (S_min, E_min), or (None, None)
    when there are fewer than two batch sizes or the fit is not positive."""
    pts = [(b, s) for b, s in points if s is not None and s > 0]
    if len(pts) < 2 or len({b for b, _ in pts}) < 2:
        return None, None
    xs = [1.0 / b for b, _ in pts]
    ys = [s for _, s in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    if intercept <= 0 or slope <= 0:
        return None, None
    return intercept, slope


# ---------------------------------------------------------------------------------------------
# Output files


def write_outputs(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write the plots, report.md and sweep.json into out_dir (created if missing); returns
    role -> path."""
    os.makedirs(out_dir, exist_ok=True)
    files = {role: os.path.join(out_dir, name) for role, name in PLOT_FILES.items()}
    _plot_all(result, files)
    files["report"] = os.path.join(out_dir, REPORT_FILE)
    files["json"] = os.path.join(out_dir, JSON_FILE)
    result.files = dict(files)
    with open(files["report"], "w", encoding="utf-8") as f:
        f.write(_report(result))
    with open(files["json"], "w", encoding="utf-8") as f:
        f.write(_dumps(_jsonable(result.to_dict())))
        f.write("\n")
    return files


def _jsonable(obj):
    if isinstance(obj, float):  # 7 significant digits (float32 precision); null for nan and inf
        return float(f"{obj:.7g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _dumps(obj, indent: str = "") -> str:
    """JSON with one line per record: dicts and lists nest with indentation, but a dict or list
    of scalars (a step, an evaluation, a noise measurement) stays on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and any(isinstance(v, (dict, list)) for v in obj.values()):
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [inner + _dumps(v, inner) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(obj)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def _figure(ncols: int = 1, nrows: int = 1, size=(6.4, 4.4)):
    from matplotlib.figure import Figure  # the Agg canvas: no display, no pyplot state

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _log(ax, axis: str, values, base: float = 10) -> None:
    """Log scale on `axis` ("x" or "y") when some of `values` are positive (matplotlib cannot
    draw a log axis without positive data: an empty panel stays linear)."""
    if any(v is not None and math.isfinite(v) and v > 0 for v in values):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)


def _loss_axes(ax, result: SweepResult, xkey: str, xlabel: str, logx: bool) -> None:
    ys = []
    for r, color in zip(result.runs, _colors(len(result.runs))):
        evals = [
            e for e in r.evals if math.isfinite(e["train_loss"]) and e["train_loss"] > 0 and (not logx or e[xkey] > 0)
        ]
        steps = [s for s in r.steps if math.isfinite(s["loss"]) and s["loss"] > 0 and (not logx or s[xkey] > 0)]
        if steps:
            ax.plot([s[xkey] for s in steps], [s["loss"] for s in steps], color=color, alpha=0.15, lw=0.7)
        ax.plot(
            [e[xkey] for e in evals],
            [e["train_loss"] for e in evals],
            color=color,
            marker="o",
            ms=2.5,
            lw=1.4,
            label=f"B={r.batch_size}",
        )
        ys += [e["train_loss"] for e in evals]
    if math.isfinite(result.target_loss) and result.target_loss > 0:
        ax.axhline(result.target_loss, color="crimson", ls="--", lw=1, label=f"target {result.target_loss:.3g}")
    _log(ax, "y", ys)
    if logx:
        _log(ax, "x", [e[xkey] for r in result.runs for e in r.evals])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (eval; faint: mini-batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _reached(result: SweepResult) -> list[RunResult]:
    return [r for r in result.runs if r.steps_to_target and r.samples_to_target]


def _tradeoff_axes(ax, result: SweepResult) -> None:
    """Samples to target against steps to target, one point per batch size, with the fitted
    hyperbola (S / S_min - 1)(E / E_min - 1) = 1."""
    reached = _reached(result)
    for r, color in zip(result.runs, _colors(len(result.runs))):
        if r in reached:
            ax.scatter([r.steps_to_target], [r.samples_to_target], color=color, s=40, zorder=3)
            ax.annotate(
                f"B={r.batch_size}",
                (r.steps_to_target, r.samples_to_target),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    if result.critical_batch_size and reached:
        s_min, e_min, b_crit = result.min_steps, result.min_samples, result.critical_batch_size
        bs = [2 ** (k / 8) for k in range(-8 * 4, 8 * 14)]
        ax.plot(
            [s_min * (1 + b_crit / b) for b in bs],
            [e_min * (1 + b / b_crit) for b in bs],
            color="grey",
            lw=1,
            label=f"fit: B_crit = {b_crit:.0f}",
        )
        ax.axvline(s_min, color="grey", ls=":", lw=0.8)
        ax.axhline(e_min, color="grey", ls=":", lw=0.8)
        ax.scatter([2 * s_min], [2 * e_min], marker="x", color="grey", zorder=3, label="B = B_crit: 2 S_min, 2 E_min")
        if result.noise_scale and result.noise_scale > 0:
            b = result.noise_scale
            ax.scatter(
                [s_min * (1 + b_crit / b)],
                [e_min * (1 + b / b_crit)],
                marker="*",
                s=120,
                color="crimson",
                zorder=4,
                label=f"measured B_noise = {b:.0f}",
            )
        steps = [r.steps_to_target for r in reached]
        samples = [r.samples_to_target for r in reached]
        ax.set_xlim(min(steps + [s_min]) / 1.5, max(steps) * 1.5)
        ax.set_ylim(min(samples + [e_min]) / 1.5, max(samples) * 1.5)
    if reached:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer steps to target")
    ax.set_ylabel("samples to target")
    ax.set_title("steps vs samples trade-off", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _to_target_vs_batch_axes(ax, result: SweepResult) -> None:
    reached = _reached(result)
    bs = [r.batch_size for r in reached]
    ax.plot(bs, [r.steps_to_target for r in reached], "o-", color="tab:blue", label="steps to target")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(bs, [r.samples_to_target for r in reached], "s-", color="tab:orange", label="samples to target")
    ax2.set_ylabel("samples to target", color="tab:orange")
    if result.critical_batch_size and bs:
        grid = [min(bs) * (max(bs) / min(bs)) ** (k / 50) for k in range(51)]
        ax.plot(
            grid,
            [result.min_steps * (1 + result.critical_batch_size / b) for b in grid],
            color="tab:blue",
            lw=0.8,
            ls=":",
        )
        ax2.plot(
            grid,
            [result.min_samples * (1 + b / result.critical_batch_size) for b in grid],
            color="tab:orange",
            lw=0.8,
            ls=":",
        )
        ax.axvline(
            result.critical_batch_size,
            color="grey",
            ls="--",
            lw=1,
            label=f"fitted B_crit = {result.critical_batch_size:.0f}",
        )
    if bs and result.noise_scale and math.isfinite(result.noise_scale) and result.noise_scale > 0:
        ax.axvline(
            result.noise_scale, color="crimson", ls="--", lw=1, label=f"measured B_noise = {result.noise_scale:.0f}"
        )
    if bs:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax2.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="upper center")
    ax.set_title("steps and samples to reach the target loss", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _throughput_axes(ax, result: SweepResult) -> None:
    runs = [r for r in result.runs if math.isfinite(r.throughput) and r.throughput > 0]
    ax.plot([r.batch_size for r in runs], [r.throughput for r in runs], "o-", color="tab:green")
    _log(ax, "x", [r.batch_size for r in runs], base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("training samples / s")
    ax.set_title(f"throughput ({result.config['device_label']})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)


def _noise_axes(ax, result: SweepResult) -> None:
    xs, ys = [], []
    for r, color in zip(result.runs, _colors(len(result.runs))):
        pts = [
            (n["samples"], n["noise_scale"])
            for n in r.noise
            if math.isfinite(n["noise_scale"]) and n["noise_scale"] > 0 and n["samples"] > 0
        ]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=1.2, label=f"B={r.batch_size}")
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
        if r.samples_to_target and r.noise_scale_at_target and r.noise_scale_at_target > 0:
            ax.scatter([r.samples_to_target], [r.noise_scale_at_target], color=color, marker="*", s=80, zorder=3)
            xs.append(r.samples_to_target)
            ys.append(r.noise_scale_at_target)
    if xs:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no noise scale measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2 (EMA)")
    ax.set_title("gradient noise scale during training (stars: at the target)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_all(result: SweepResult, files: dict[str, str]) -> None:
    title = (
        f"{result.config['dataset']}, {result.config['optimizer']}, lr rule {result.config['lr_rule']}, "
        f"{result.config['samples_per_run']} samples per run"
    )
    fig, (a, b, c, d) = _figure(2, 2)
    _loss_axes(a, result, "samples", "samples seen", logx=False)
    a.set_title("loss vs samples seen", fontsize=10)
    _loss_axes(b, result, "step", "optimizer steps", logx=True)
    b.set_title("loss vs steps", fontsize=10)
    _to_target_vs_batch_axes(c, result)
    _throughput_axes(d, result)
    fig.suptitle(f"batch size sweep: {title}", fontsize=11)
    fig.savefig(files["overview"], dpi=100)

    for role, key, label, logx in (
        ("loss_vs_steps", "step", "optimizer steps", True),
        ("loss_vs_samples", "samples", "samples seen", False),
        ("loss_vs_time", "time_s", "training wall time (s)", False),
    ):
        fig, (ax,) = _figure()
        _loss_axes(ax, result, key, label, logx)
        ax.set_title(f"loss vs {label}", fontsize=10)
        fig.savefig(files[role], dpi=100)

    fig, (a, b) = _figure(2, 1)
    _to_target_vs_batch_axes(a, result)
    _tradeoff_axes(b, result)
    fig.savefig(files["steps_vs_samples"], dpi=100)

    fig, (ax,) = _figure()
    _throughput_axes(ax, result)
    fig.savefig(files["throughput"], dpi=100)

    fig, (ax,) = _figure()
    _noise_axes(ax, result)
    fig.savefig(files["noise_scale"], dpi=100)


def _report(result: SweepResult) -> str:
    c = result.config
    rel = {role: os.path.basename(path) for role, path in result.files.items()}
    lines = [
        "# Batch size sweep",
        "",
        f"{c['when']}, batchops {_version()}, torch {c['torch']}, {c['device_label']} ({c['device_name']}).",
        "",
        f"- data: {c['dataset']}, {c['train_size']} train / {c['test_size']} test",
        f"- model: {c['model']}, the same initial weights (seed {c['seed']}) and the same sample order for "
        "every batch size",
        f"- optimizer: {c['optimizer']}, lr rule `{c['lr_rule']}`: lr = {c['base_lr']:g} * (B / "
        f"{c['base_batch_size']})^{LR_RULES[c['lr_rule']]:g}",
        f"- {c['samples_per_run']} samples per run ({c['epochs']:.1f} epochs), linear learning-rate warm-up over "
        f"the first {c['warmup_samples']} samples; wall time of the sweep {c['wall_time_s']:.0f} s",
        f"- {result.headline().replace(chr(10), chr(10) + '- ')}",
        "",
        result.table(),
        "",
        "Losses are measured in eval mode on a fixed set of training samples; the steps, samples and time to "
        "the target are interpolated between evaluation points. Time counts training steps only (no evaluation, "
        "no noise-scale measurement). B_noise is the gradient noise scale B_simple = tr(Sigma) / |G|^2, from "
        "the two halves of a batch every few steps (exponential moving average of both estimates, each divided by "
        "that measurement's half-batch squared gradient norm so that the average is scale-free), taken at "
        "the last measurement before the run reached the target. McCandlish et al. (2018) predict "
        "S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit) with B_crit close to B_noise: below it, "
        "doubling the batch nearly halves the steps; above it, it mostly doubles the samples. "
        "B_noise final is the estimate at the run's last measurement; n/a there means the running |G|^2 "
        "estimate was not positive: near convergence the true gradient is smaller than the noise of its "
        "unbiased estimate, so no gradient signal is detected and B_simple is unbounded, not a number.",
        "",
        f"![overview]({rel['overview']})",
        "",
        f"![steps and samples to target]({rel['steps_vs_samples']})",
        "",
        f"![loss vs steps]({rel['loss_vs_steps']})",
        "",
        f"![loss vs samples]({rel['loss_vs_samples']})",
        "",
        f"![loss vs wall time]({rel['loss_vs_time']})",
        "",
        f"![throughput]({rel['throughput']})",
        "",
        f"![noise scale]({rel['noise_scale']})",
        "",
        f"Raw records (every step, evaluation and noise measurement): `{rel['json']}`.",
        "",
    ]
    return "\n".join(lines)


def _version() -> str:
    try:
        from batchops._version import __version__

        return __version__
    except Exception:
        return "?"
