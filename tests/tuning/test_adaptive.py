"""batchops.tuning.AdaptiveBatchSize: growth toward the noise scale, learning-rate rules, the loop
helpers, and exact (bitwise) resumption of an adaptive training run from a mid-run checkpoint."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from batchops.data import ShuffledBatchSampler
from batchops.tuning import AdaptiveBatchSize, GradientNoiseScale


def fake(noise_scale=None, grad_sq=None, trace_sigma=None):
    return SimpleNamespace(noise_scale=noise_scale, grad_sq=grad_sq, trace_sigma=trace_sigma)


# ----------------------------------------------------------------------------- accumulation growth
def test_initial_accumulation_and_sizes():
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, growth="fixed")
    assert a.accumulation_steps == 2 and a.effective_batch_size == 8 and a.scale == 1.0
    a = AdaptiveBatchSize(4, base_batch_size=32, world_size=2, growth="fixed")
    assert a.accumulation_steps == 4 and a.effective_batch_size == 32 and a.per_micro_step == 8
    a = AdaptiveBatchSize(4, base_batch_size=2, world_size=1, growth="fixed", min_accumulation=3)
    assert a.accumulation_steps == 3 and a.scale == 6.0
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, growth="fixed", initial_accumulation=5)
    assert a.accumulation_steps == 5
    a = AdaptiveBatchSize(4, base_batch_size=6, world_size=1, growth="fixed")  # 1.5 rounds half up
    assert a.accumulation_steps == 2


def test_grows_toward_fixed_noise_scale_and_clamps():
    tracker = fake(noise_scale=None)
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, max_accumulation=16)
    assert a.update() == 2  # no estimate yet: unchanged
    tracker.noise_scale = 30.0
    assert a.update() == 8  # round(30 / 4) = 7.5 -> 8
    tracker.noise_scale = 100.0
    assert a.update() == 16  # round(25) clamped to max_accumulation
    assert a.effective_batch_size == 64
    tracker.noise_scale = 10.0
    assert a.update() == 16  # only grows by default
    for bad in (math.inf, math.nan, -5.0, 0.0):
        tracker.noise_scale = bad
        assert a.update() == 16
    assert a.steps == 8 and a.micro_steps_done == 2 + 2 + 8 + 16 * 5
    assert a.history == [(0, 2), (2, 8), (3, 16)]


def test_growth_limits_world_size_and_shrink():
    tracker = fake(noise_scale=100.0)
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=2, noise_scale=tracker, max_accumulation=None)
    assert a.accumulation_steps == 1 and a.update() == 13  # round(100 / 8) = 12.5 -> 13
    a = AdaptiveBatchSize(
        4, base_batch_size=8, world_size=2, noise_scale=tracker, max_batch_size=48, max_accumulation=None
    )
    assert a.update() == 6 and a.effective_batch_size == 48  # 48 // (4 * 2)
    a = AdaptiveBatchSize(4, base_batch_size=4, world_size=1, noise_scale=tracker, max_growth=2.0)
    assert [a.update() for _ in range(6)] == [2, 4, 8, 16, 25, 25]
    a = AdaptiveBatchSize(4, base_batch_size=4, world_size=1, noise_scale=tracker, max_growth=1.2)
    assert [a.update() for _ in range(3)] == [2, 3, 4]  # at least +1 per update
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, shrink=True)
    assert a.update() == 25
    tracker.noise_scale = 10.0
    assert a.update() == 3  # round(2.5) = 3
    tracker.noise_scale = 1.0
    assert a.update() == 1
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, shrink=True, min_accumulation=2)
    assert a.update() == 2
    tracker.noise_scale = 40.0
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, update_every=3)
    assert [a.update() for _ in range(4)] == [2, 2, 10, 10]


def test_callable_growth_schedule():
    a = AdaptiveBatchSize(8, base_batch_size=8, world_size=1, growth=lambda ad: 8 * 2**ad.steps, max_accumulation=8)
    assert [a.update() for _ in range(5)] == [2, 4, 8, 8, 8]


def test_world_size_default_is_one_without_process_group():
    assert AdaptiveBatchSize(4, base_batch_size=8, growth="fixed").world_size == 1


# ----------------------------------------------------------------------------- learning rate
def test_lr_rules():
    kw = dict(base_batch_size=8, base_lr=0.1, world_size=1, growth="fixed", initial_accumulation=8)  # S = 4
    assert AdaptiveBatchSize(4, lr_rule="linear", **kw).lr == pytest.approx(0.4)
    assert AdaptiveBatchSize(4, lr_rule="sqrt", **kw).lr == pytest.approx(0.2)
    assert AdaptiveBatchSize(4, lr_rule="constant", **kw).lr == pytest.approx(0.1)
    tracker = fake(noise_scale=64.0, grad_sq=1.0, trace_sigma=64.0)
    a = AdaptiveBatchSize(4, lr_rule="adascale", noise_scale=tracker, **kw)
    assert a.gain() == pytest.approx((64 + 1) / (64 / 4 + 1))
    assert a.lr == pytest.approx(0.1 * 65 / 17)
    assert a.gain(1.0) == pytest.approx(1.0)
    tracker.trace_sigma = 0.0  # no noise: a larger batch gives nothing
    assert a.gain() == pytest.approx(1.0)
    tracker.grad_sq, tracker.trace_sigma = 0.0, 5.0  # noise only: linear scaling
    assert a.gain() == pytest.approx(4.0)
    tracker.grad_sq = tracker.trace_sigma = tracker.noise_scale = None  # no estimate yet
    assert a.gain() == 1.0
    a.noise_scale = SimpleNamespace(noise_scale=64.0)  # a tracker with the ratio only
    assert a.gain() == pytest.approx(65 / 17)
    a.noise_scale = SimpleNamespace(noise_scale=math.inf)
    assert a.gain() == pytest.approx(4.0)


def test_apply_lr_and_update_set_param_groups():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 1.0}], lr=1.0)
    tracker = fake(noise_scale=64.0)
    a = AdaptiveBatchSize(
        4, base_batch_size=8, base_lr=[0.1, 0.01], world_size=1, noise_scale=tracker, lr_rule="linear", optimizer=opt
    )
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])  # set at construction
    a.update()  # accumulation 16: S = 8
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.08])
    b = AdaptiveBatchSize(
        4, base_batch_size=8, base_lr=0.1, world_size=1, growth="fixed", lr_rule="sqrt", initial_accumulation=4
    )
    assert b.apply_lr(opt) == pytest.approx([0.1 * math.sqrt(2)] * 2)
    with pytest.raises(ValueError, match="3 base learning rates"):
        AdaptiveBatchSize(4, base_batch_size=8, base_lr=[0.1] * 3, growth="fixed", optimizer=opt)
    with pytest.raises(ValueError, match="no base_lr"):
        AdaptiveBatchSize(4, base_batch_size=8, growth="fixed").apply_lr(opt)


def test_adascale_scale_invariant_steps():
    tracker = fake(noise_scale=64.0, grad_sq=1.0, trace_sigma=64.0)
    a = AdaptiveBatchSize(
        4,
        base_batch_size=4,
        base_lr=0.1,
        world_size=1,
        noise_scale=tracker,
        lr_rule="adascale",
        growth="fixed",
        initial_accumulation=4,
    )
    a.update()
    a.update()
    assert a.scale_invariant_steps == pytest.approx(2 * 65 / 17)


# ----------------------------------------------------------------------------- loop helpers
def test_should_step_and_accumulate_across_epochs():
    tracker = fake(noise_scale=None)
    a = AdaptiveBatchSize(1, base_batch_size=3, world_size=1, noise_scale=tracker)
    assert [a.should_step(i) for i in range(4)] == [False, False, True, True]
    flags = []
    for _epoch in range(3):  # 4 items per "epoch": cycles of 3 run across epochs
        for _item, step_now in a.accumulate(range(4)):
            flags.append(step_now)
            if step_now:
                tracker.noise_scale = 5.0  # grow to 5 after the first step
                a.update()
    assert flags == [False, False, True] + [False] * 4 + [True] + [False] * 4
    assert a.micro_index == 12 and a.micro_steps_done == 8 and a.steps == 2
    a.update(micro_steps=4)  # a final partial cycle of 4 micro-batches
    assert a.micro_steps_done == 12 and a.should_step(16) and not a.should_step(15)


def test_state_dict_round_trip_and_config_check():
    tracker = fake(noise_scale=50.0)
    a = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, lr_rule="adascale", base_lr=0.1)
    for _ in range(3):
        a.update()
    state = a.state_dict()
    b = AdaptiveBatchSize(4, base_batch_size=8, world_size=1, noise_scale=tracker, lr_rule="adascale", base_lr=0.1)
    b.load_state_dict(state)
    assert b.state_dict() == state and b.accumulation_steps == 13 and b.lr == a.lr
    with pytest.raises(ValueError, match="micro_batch_size"):
        AdaptiveBatchSize(8, base_batch_size=8, world_size=1, noise_scale=tracker).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        AdaptiveBatchSize(4, base_batch_size=8, world_size=2, noise_scale=tracker).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(micro_batch_size=0), ValueError),
        (dict(micro_batch_size=2.0), TypeError),
        (dict(base_batch_size=0), ValueError),
        (dict(lr_rule="cubic"), ValueError),
        (dict(growth="doubling"), ValueError),
        (dict(noise_scale=None), ValueError),  # growth="noise_scale" needs a tracker
        (dict(noise_scale=None, growth="fixed", lr_rule="adascale"), ValueError),
        (dict(noise_scale=42), TypeError),
        (dict(min_accumulation=0), ValueError),
        (dict(min_accumulation=4, max_accumulation=2), ValueError),
        (dict(max_batch_size=4, world_size=2), ValueError),  # below one micro-step of 4 x 2
        (dict(max_growth=0.5), ValueError),
        (dict(update_every=0), ValueError),
        (dict(base_lr="fast"), TypeError),
        (dict(world_size=0), ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    args = dict(micro_batch_size=4, base_batch_size=8, noise_scale=fake(10.0), world_size=1)
    args.update(kwargs)
    micro = args.pop("micro_batch_size")
    with pytest.raises(error):
        AdaptiveBatchSize(micro, **args)


# ----------------------------------------------------------------------------- exact resumption
N, DIM, MICRO = 96, 6, 4
_g = torch.Generator().manual_seed(7)
X = torch.randn(N, DIM, generator=_g)
Y = X @ torch.randn(DIM, 1, generator=_g) + 0.5 * torch.randn(N, 1, generator=_g)


def _build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    tracker = GradientNoiseScale(model, beta=0.9)
    adaptive = AdaptiveBatchSize(
        MICRO,
        base_batch_size=8,
        base_lr=0.01,
        lr_rule="adascale",
        noise_scale=tracker,
        min_accumulation=2,
        max_accumulation=8,
        max_growth=2.0,
        world_size=1,
        optimizer=opt,
    )
    sampler = ShuffledBatchSampler(N, MICRO, seed=3, num_replicas=1, rank=0, drop_last=True)
    return SimpleNamespace(model=model, opt=opt, tracker=tracker, adaptive=adaptive, sampler=sampler)


def _train(run, until_step, losses):
    """Train until ``adaptive.steps == until_step`` (an optimizer-step boundary)."""
    m, opt, tracker, adaptive, sampler = run.model, run.opt, run.tracker, run.adaptive, run.sampler
    while adaptive.steps < until_step:
        for idx, step_now in adaptive.accumulate(sampler):
            loss = nn.functional.mse_loss(m(X[idx]), Y[idx])
            losses.append(loss.item())
            (loss / adaptive.accumulation_steps).backward()
            tracker.accumulate_micro_step(m, len(idx))
            if step_now:
                tracker.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
                adaptive.update()
                if adaptive.steps == until_step:
                    return
        sampler.set_epoch(sampler.epoch + 1)


def _checkpoint(run):
    buffer = io.BytesIO()
    torch.save(
        {
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "tracker": run.tracker.state_dict(),
            "adaptive": run.adaptive.state_dict(),
            "sampler": run.sampler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    return buffer.getvalue()


def _restore(blob):
    run = _build(seed=12345)  # different initial weights and RNG: everything must come from the checkpoint
    state = torch.load(io.BytesIO(blob), weights_only=False)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.tracker.load_state_dict(state["tracker"])
    run.adaptive.load_state_dict(state["adaptive"])
    run.sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"])
    return run


def test_resume_mid_run_is_bitwise_identical():
    total, stop = 40, 17
    reference = _build(seed=0)
    ref_losses = []
    _train(reference, total, ref_losses)
    accumulations = [acc for _, acc in reference.adaptive.history]
    assert len(accumulations) >= 3 and accumulations[-1] > accumulations[0]  # the batch did grow
    assert any(step > stop for step, _ in reference.adaptive.history)  # ... also after the checkpoint

    first = _build(seed=0)
    losses = []
    _train(first, stop, losses)
    assert 0 < first.sampler.position < len(first.sampler) or first.sampler.epoch > 0  # mid-run
    resumed = _restore(_checkpoint(first))
    del first
    _train(resumed, total, losses)

    assert losses == ref_losses  # every micro-batch loss, bit for bit
    assert resumed.adaptive.state_dict() == reference.adaptive.state_dict()
    assert resumed.tracker.state_dict() == reference.tracker.state_dict()
    assert resumed.opt.param_groups[0]["lr"] == reference.opt.param_groups[0]["lr"]
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)
