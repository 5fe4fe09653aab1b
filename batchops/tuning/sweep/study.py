"""The sweep itself: `batch_size_sweep` trains the same model from the same initial weights on the
same stream of samples once per batch size, measuring losses, throughput and the gradient noise
scale along the way, then has the runs analysed and, with an out_dir, written out."""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from batchops.environment import device_name, resolve_device, utcnow
from batchops.tuning.noise_scale import estimate_noise_scale
from batchops.tuning.sweep.analysis import fill_target, fit_tradeoff, median_noise_scale_at_target, pick_target
from batchops.tuning.sweep.inputs import (
    LR_RULES,
    Batcher,
    default_model,
    load_digits_dataset,
    lr_for,
    sample_stream,
    split_dataset,
)
from batchops.tuning.sweep.report import write_outputs
from batchops.tuning.sweep.results import RunResult, SweepResult

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "OPTIMIZERS",
    "DEFAULT_BASE_LR",
    "DEFAULT_EPOCHS",
    "NOISE_ESTIMATOR",
    "batch_size_sweep",
    "half_batch_grad_norms",
]

DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256)
OPTIMIZERS = ("sgd", "adam")
DEFAULT_BASE_LR = {"sgd": 0.05, "adam": 1e-3}
DEFAULT_EPOCHS = 15.0
# What the noise-scale measurements use; sweep.json's config names it.
NOISE_ESTIMATOR = "batchops.tuning.noise_scale.estimate_noise_scale"


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
            train_set, test_set = split_dataset(dataset, seed, test_fraction)
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

        train = Batcher(train_set, dev)
        test = Batcher(test_set, dev)
        eval_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))[:eval_train_samples]
        eval_idx = sorted(eval_idx.tolist())

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
                    seed=seed,
                    device=dev,
                    progress=progress,
                )
            )
        threads = torch.get_num_threads()
    finally:
        rng.__exit__(None, None, None)
        torch.set_num_threads(old_threads)

    target, auto = pick_target(runs, target_loss)
    for r in runs:
        fill_target(r, target)
    reached = [r for r in runs if r.steps_to_target is not None]
    s_min, e_min = fit_tradeoff([(r.batch_size, r.steps_to_target) for r in reached])

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
        "noise_estimator": NOISE_ESTIMATOR,
        "seed": seed,
        "device": str(dev),
        "device_name": device_name(dev),
        "torch_threads": threads,
        "device_label": f"{dev.type} ({threads} threads)" if dev.type == "cpu" else device_name(dev),
        "torch": torch.__version__,
        "when": utcnow().strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": time.perf_counter() - started,
    }
    result = SweepResult(
        runs=runs,
        target_loss=target,
        target_auto=auto,
        noise_scale=median_noise_scale_at_target(runs),
        critical_batch_size=(e_min / s_min) if s_min else None,
        min_steps=s_min,
        min_samples=e_min,
        config=config,
    )
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result


def _train_one(
    batch_size: int,
    *,
    model_fn: Callable[[], nn.Module],
    init_state: dict[str, Any],
    loss_fn: Callable[[Any, Any], Tensor],
    train: Batcher,
    test: Batcher,
    eval_idx: Sequence[int],
    lr: float,
    optimizer: str,
    momentum: float,
    weight_decay: float,
    warmup_samples: int,
    max_samples: int,
    eval_points: int,
    noise_scale: bool,
    noise_every: int | None,
    noise_points: int,
    noise_beta: float,
    seed: int,
    device: torch.device,
    progress: bool,
) -> RunResult:
    """One batch size's run from the shared initial weights and sample stream: the training
    steps (timed), evaluations on the grid, and every `noise_every` steps a noise-scale
    measurement, kept off the training clock."""
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
                g_small_sq, g_big_sq, b_small, b_big = half_batch_grad_norms(model, params, loss_fn, x, y)
                grad_sq, trace = (float(v) for v in estimate_noise_scale(g_small_sq, g_big_sq, b_small, b_big))
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


def half_batch_grad_norms(
    model: nn.Module, params: Sequence[nn.Parameter], loss_fn: Callable[[Any, Any], Tensor], x: Any, y: Any
) -> tuple[float, float, int, int]:
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


def _flat_grad(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def _index(obj: Any, part: slice) -> Any:
    if isinstance(obj, Tensor):
        return obj[part]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_index(o, part) for o in obj)
    if isinstance(obj, dict):
        return {k: _index(v, part) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    train: Batcher,
    test: Batcher,
    eval_idx: Sequence[int],
    *,
    step: int,
    samples: int,
    time_s: float,
    chunk: int = 1024,
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


def _score(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Batcher, indices: Iterable[int], chunk: int
) -> tuple[float, float | None]:
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
