"""batchops.tuning.noise_scale: the two-batch estimators and the GradientNoiseScale tracker.

The tracker is checked on a noisy quadratic, loss_i(w) = 0.5 * |w - x_i|^2 with x_i ~ N(mu, Sigma):
the per-sample gradient w - x_i has mean G = w - mu and covariance Sigma, so at a fixed w the
simple noise scale is exactly tr(Sigma) / |w - mu|^2 -- in one process (gradient accumulation)
and on two gloo ranks (no-DDP all-reduce route and the DDP comm-hook route).
"""

from __future__ import annotations

import gc
import math
import statistics

import pytest
import torch
from torch import nn

from batchops.testing import run_ranks
from batchops.tuning import GradientNoiseScale, estimate_noise_scale

D = 32
TRACE = 16.0  # tr(Sigma); |G|^2 = 1 below, so B_simple = 16
TOLERANCE = 0.2  # relative; the estimate's spread over seeds is about 4 % (max 8 % over 20 seeds)


def _problem():
    std = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    std = std * math.sqrt(TRACE / float(std.square().sum()))
    w0 = torch.randn(D, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    w0 = (w0 / w0.norm()).float()  # |w0 - mu|^2 = 1 with mu = 0
    return std.float(), w0


class Quadratic(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return 0.5 * (self.w - x).square().sum(1).mean()


# ----------------------------------------------------------------------------- estimators
def test_estimator_is_unbiased_on_synthetic_gradients():
    """Average the estimators over many (small, big) batch pairs drawn from N(G, Sigma) per
    sample, the small batch being part of the big one as in accumulation: the averages match
    |G|^2 and tr(Sigma) within a few standard errors."""
    g = torch.Generator().manual_seed(0)
    d, draws, b_small, b_big = 8, 40_000, 4, 16
    G = torch.randn(d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    sigma = A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)  # a full covariance
    samples = G + torch.randn(draws, b_big, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    small = samples[:, :b_small].mean(1).square().sum(1)
    big = samples.mean(1).square().sum(1)
    grad_sq, trace = estimate_noise_scale(small, big, b_small, b_big)  # tensors: one estimate per draw
    assert grad_sq.shape == trace.shape == (draws,)
    for estimate, truth in ((grad_sq, float(G.square().sum())), (trace, float(torch.trace(sigma)))):
        stderr = float(estimate.std()) / math.sqrt(draws)
        assert abs(float(estimate.mean()) - truth) < 4 * stderr, (float(estimate.mean()), truth, stderr)


def test_estimator_on_floats_exact_expectations():
    # Plugging in the exact expectations E|G_b|^2 = |G|^2 + tr/b returns |G|^2 and tr exactly.
    G2, tr = 3.0, 40.0
    grad_sq, trace = estimate_noise_scale(G2 + tr / 8, G2 + tr / 32, 8, 32)
    assert isinstance(grad_sq, float) and isinstance(trace, float)
    assert grad_sq == pytest.approx(G2, rel=1e-12) and trace == pytest.approx(tr, rel=1e-12)
    grad_sq, trace = estimate_noise_scale(G2 + tr / 2.5, G2 + tr / 7.5, 2.5, 7.5)  # non-integer sizes
    assert grad_sq == pytest.approx(G2) and trace == pytest.approx(tr)


@pytest.mark.parametrize(
    "b_small, b_big, error",
    [
        (8, 8, ValueError),
        (16, 8, ValueError),
        (0, 8, ValueError),
        (-1, 8, ValueError),
        (1, float("inf"), ValueError),
        (True, 8, TypeError),
        ("4", 8, TypeError),
    ],
)
def test_estimator_rejects_bad_sizes(b_small, b_big, error):
    with pytest.raises(error):
        estimate_noise_scale(1.0, 0.5, b_small, b_big)


# ----------------------------------------------------------------------------- tracker basics
def test_tracker_ema_with_bias_correction():
    t = GradientNoiseScale(beta=0.5)
    assert t.noise_scale is None and t.grad_sq is None and t.trace_sigma is None and t.steps == 0
    # exact expectations with |G|^2 = 2, tr = 10, then |G|^2 = 4, tr = 30
    t.update(2 + 10 / 4, 2 + 10 / 16, 4, 16)
    assert t.grad_sq == pytest.approx(2) and t.trace_sigma == pytest.approx(10)  # bias-corrected: exact
    assert t.noise_scale == pytest.approx(5)
    t.update(4 + 30 / 4, 4 + 30 / 16, 4, 16)
    # m = 0.5*0.5*x1 + 0.5*x2, corrected by 1 - 0.25
    assert t.grad_sq == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)
    assert t.trace_sigma == pytest.approx((0.25 * 10 + 0.5 * 30) / 0.75)
    assert t.noise_scale == pytest.approx(t.trace_sigma / t.grad_sq)
    assert t.last_grad_sq == pytest.approx(4) and t.last_trace_sigma == pytest.approx(30)
    t.update(torch.tensor(1.0), torch.tensor(1.0), 4, 16)  # 0-d tensors are fine
    assert t.steps == 3


def test_tracker_negative_signal_and_state_dict():
    t = GradientNoiseScale(beta=0.0)
    t.update(1.0, 1.2, 4, 16)  # |G_big|^2 > |G_small|^2: negative trace estimate, positive |G|^2
    assert t.trace_sigma < 0 and t.noise_scale < 0
    t.update(2.0, 0.1, 4, 16)  # |G|^2 estimate negative, trace positive
    assert t.grad_sq < 0 < t.trace_sigma and t.noise_scale == math.inf
    state = t.state_dict()
    u = GradientNoiseScale(beta=0.9)
    u.load_state_dict(state)
    assert u.state_dict() == state and u.beta == 0.0 and u.noise_scale == math.inf
    assert t.update(float("inf"), 1.0, 4, 16) == math.inf  # overflowed gradients: skipped
    assert t.skipped == 1 and t.steps == 2
    with pytest.raises(ValueError):
        GradientNoiseScale(beta=1.0)
    with pytest.raises(ValueError):
        GradientNoiseScale(loss_scaling="avg")


def test_single_micro_step_records_nothing_and_errors():
    std, w0 = _problem()
    model = Quadratic(w0)
    t = GradientNoiseScale(model)
    with pytest.raises(RuntimeError, match="no accumulate_micro_step"):
        t.step()
    model(torch.randn(8, D)).backward()
    t.accumulate_micro_step(model, 8)
    assert t.pending_micro_steps == 1
    assert t.step() is None and t.steps == 0 and t.pending_micro_steps == 0
    model.zero_grad()
    for _ in range(2):
        (model(torch.randn(8, D)) / 2).backward()
        t.accumulate_micro_step(8)  # short form: the constructor's parameters
    with pytest.raises(ValueError, match="add up to 16"):
        t.step(total_batch_size=24)


# ----------------------------------------------------------------------------- accumulation path
def _accumulation_run(seed, *, steps=300, micro_sizes=(8, 8, 8, 8), loss_scaling="mean", beta=0.99):
    std, w0 = _problem()
    g = torch.Generator().manual_seed(seed)
    model = Quadratic(w0)
    tracker = GradientNoiseScale(model, beta=beta, loss_scaling=loss_scaling)
    n = len(micro_sizes)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        for b in micro_sizes:
            x = std * torch.randn(b, D, generator=g)
            loss = model(x)
            (loss / n if loss_scaling == "mean" else loss).backward()
            tracker.accumulate_micro_step(model, b)
        tracker.step(total_batch_size=sum(micro_sizes))
    return tracker


def test_accumulation_noise_scale_matches_analytic():
    tracker = _accumulation_run(0)
    assert tracker.steps == 300
    assert tracker.noise_scale == pytest.approx(TRACE, rel=TOLERANCE)
    assert tracker.grad_sq == pytest.approx(1.0, rel=TOLERANCE)
    assert tracker.trace_sigma == pytest.approx(TRACE, rel=0.1)
    assert tracker.last_b_small == 8 and tracker.last_b_big == 32


def test_loss_scaling_conventions_agree():
    mean = _accumulation_run(1, steps=40)
    summed = _accumulation_run(1, steps=40, loss_scaling="sum")
    # both report the true magnitudes (the convention says how .grad was scaled)
    assert summed.grad_sq == pytest.approx(mean.grad_sq, rel=1e-3)
    assert summed.trace_sigma == pytest.approx(mean.trace_sigma, rel=1e-4)


def test_accumulation_unequal_micro_batches_unbiased():
    """Raw per-step estimates averaged over many steps, micro-batches of 4, 12, 8 and 6 samples
    given as plain accumulated-gradient tensors (the 'grads' form)."""
    std, w0 = _problem()
    g = torch.Generator().manual_seed(5)
    sizes = (4, 12, 8, 6)
    tracker = GradientNoiseScale(beta=0.0)
    grad_est, trace_est = [], []
    for _ in range(1500):
        acc = torch.zeros(D)
        for b in sizes:
            x = std * torch.randn(b, D, generator=g)
            acc += (w0 - x).mean(0) / len(sizes)  # what backward of (mean loss / n) adds to .grad
            tracker.accumulate_micro_step([acc], b)
        tracker.step(model_or_grads=[acc])
        grad_est.append(tracker.last_grad_sq)
        trace_est.append(tracker.last_trace_sigma)
    for est, truth in ((grad_est, 1.0), (trace_est, TRACE)):
        stderr = statistics.pstdev(est) / math.sqrt(len(est))
        assert abs(statistics.fmean(est) - truth) < 4 * stderr, (statistics.fmean(est), truth, stderr)
    harmonic = len(sizes) / sum(1 / b for b in sizes)
    assert tracker.last_b_small == pytest.approx(harmonic)
    assert tracker.last_b_big == pytest.approx(len(sizes) * harmonic)


# ----------------------------------------------------------------------------- two gloo ranks
def _ranks_noise_scale(rank, world_size, steps, local_batch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    std, w0 = _problem()
    out = {}
    # update_ddp with unequal local batches (4 and 12): b_small = 2 / (1/4 + 1/12) = 6, b_big = 12
    t = GradientNoiseScale(beta=0.0)
    t.update_ddp(2.0 + rank, 1.0, 4 if rank == 0 else 12)
    out["unequal"] = (t.last_b_small, t.last_b_big, t.last_grad_sq, t.last_trace_sigma)
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 1.0)  # |G_big|^2 = 3 read from .grad
    t = GradientNoiseScale([p], beta=0.0)
    t.update_from_ranks(torch.tensor(7.0), 8, global_batch=24)
    out["from_ranks"] = (t.last_b_small, t.last_b_big, t.last_grad_sq, t.last_trace_sigma)
    for route in ("allreduce", "ddp_hook"):
        g = torch.Generator().manual_seed(1000 * (route == "ddp_hook") + rank)
        model = Quadratic(w0)
        tracker = GradientNoiseScale(model, beta=0.99)
        if route == "ddp_hook":
            model = DistributedDataParallel(model)
            tracker.register_comm_hook(model)
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            x = std * torch.randn(local_batch, D, generator=g)
            model(x).backward()
            local_grad = None
            if route == "allreduce":
                local_grad = model.w.grad.clone()
            tracker.step_ddp(model, local_batch)
            if route == "allreduce" and step == 0:  # .grad now holds the ranks' average
                expected = local_grad.clone()
                dist.all_reduce(expected)
                out["averaged"] = torch.allclose(model.w.grad, expected / world_size, rtol=1e-6, atol=1e-7)
        out[route] = tracker.state_dict()
        out[route]["noise_scale"] = tracker.noise_scale
        # A DDP model must be gone before the harness destroys the process group: left to the
        # cycle collector at interpreter exit, DDP + gloo occasionally aborts the process.
        del model, tracker
        gc.collect()
    return out


@pytest.mark.slow
def test_two_gloo_ranks_noise_scale():
    results = run_ranks(_ranks_noise_scale, 2, args=(300, 16), timeout=120)
    values = [r.value for r in results]
    for v in values:
        assert v["averaged"]
        b_small, b_big, grad_sq, trace = v["unequal"]
        assert (b_small, b_big) == (pytest.approx(6.0), pytest.approx(12.0))
        assert (grad_sq, trace) == pytest.approx(estimate_noise_scale(2.5, 1.0, 6.0, 12.0))  # mean of 2.0 and 3.0
        assert v["from_ranks"] == pytest.approx((8.0, 24.0, *estimate_noise_scale(7.0, 3.0, 8, 24)))
    for route in ("allreduce", "ddp_hook"):
        a, b = values[0][route], values[1][route]
        assert a == b  # bit-identical trackers on both ranks
        assert a["steps"] == 300 and a["last_b_small"] == 16 and a["last_b_big"] == 32
        assert a["noise_scale"] == pytest.approx(TRACE, rel=TOLERANCE), route
