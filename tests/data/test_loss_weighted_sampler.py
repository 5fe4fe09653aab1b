"""LossWeightedSampler (batchops.data.loss_weighted): hard-example mining on the sampler contract."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from batchops.data.loss_weighted import LossWeightedSampler
from batchops.testing import run_ranks
from batchops.testing.isolation import run_isolated


def formula(losses, temperature=1.0, floor=0.1, eps=1e-8, initial_loss=None):
    """The docstring's formula, written out naively in float64."""
    losses = np.asarray(losses, dtype=np.float64).copy()
    n = len(losses)
    unseen = np.isnan(losses)
    if unseen.all() and initial_loss is None:
        return np.full(n, 1.0 / n)
    losses[unseen] = np.nanmax(losses) if initial_loss is None else initial_loss
    s = (np.maximum(losses, 0) + eps) ** (1.0 / temperature)
    return floor / n + (1 - floor) * s / s.sum()


def loss_of(index, step):
    """A deterministic per-sample loss for simulated training."""
    return ((index * 7 + step * 3) % 11) / 3.0


def epoch_probs(sampler, epoch):
    sampler.set_epoch(epoch)
    return sampler.probabilities().numpy()


# ----------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("floor", [0.0, 0.1, 0.7])
def test_probabilities_match_formula(temperature, floor):
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 1.0, 200)
    losses[:5] = [0.0, -1.0, 0.0, 1e-3, 30.0]  # negative losses clamp to 0
    s = LossWeightedSampler(200, temperature=temperature, floor=floor)
    s.update(np.arange(200), losses)
    p = epoch_probs(s, 1)
    expected = formula(losses.astype(np.float32), temperature, floor)  # the table is float32
    np.testing.assert_allclose(p, expected, rtol=1e-10, atol=0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert (p >= floor / 200 * (1 - 1e-12)).all()
    assert p[0] == p[1] == p[2]  # max(loss, 0): -1 counts as 0
    order = np.argsort(losses, kind="stable")
    assert (np.diff(p[order]) >= 0).all()  # monotone in the loss
    distinct = np.diff(np.maximum(losses[order], 0)) > 0
    assert (np.diff(p[order])[distinct] > 0).all()  # strictly, for floor < 1


def test_temperature_and_floor_limits():
    losses = np.array([0.0, 1.0, 2.0, 10.0, 3.0])

    def probs(**kw):
        s = LossWeightedSampler(5, **kw)
        s.update(np.arange(5), losses)
        return epoch_probs(s, 1)

    assert (probs(temperature=math.inf) == 0.2).all()  # exactly uniform
    assert (probs(floor=1.0) == 0.2).all()
    np.testing.assert_allclose(probs(temperature=1e9), 0.2, rtol=1e-7)  # towards uniform
    sharp = probs(temperature=1e-4, floor=0.1)  # towards the largest loss only; no overflow
    assert np.isfinite(sharp).all()
    np.testing.assert_allclose(sharp, [0.02, 0.02, 0.02, 0.02 + 0.9, 0.02], atol=1e-12)
    np.testing.assert_allclose(probs(floor=0.0, eps=1e-12), (losses + 1e-12) / (losses + 1e-12).sum())


def test_initial_loss_and_smoothing():
    s = LossWeightedSampler(4)
    assert (s.probabilities().numpy() == 0.25).all()  # before any update: uniform
    s.update([0, 1], [1.0, 4.0])
    s.set_epoch(1)
    table = [1.0, 4.0, np.nan, np.nan]
    np.testing.assert_allclose(s.probabilities().numpy(), formula(table))  # unseen -> max seen (4)
    t = LossWeightedSampler(4, initial_loss=0.5)
    t.update([0, 1], [1.0, 4.0])
    t.set_epoch(1)
    np.testing.assert_allclose(t.probabilities().numpy(), formula(table, initial_loss=0.5))

    e = LossWeightedSampler(3, smoothing=0.75)
    e.update([0, 0, 2], [1.0, 3.0, 8.0])  # duplicates in one update: their mean (2.0)
    np.testing.assert_allclose(e.losses.numpy(), [2.0, np.nan, 8.0])
    e.update(torch.tensor([0, 1]), torch.tensor([6.0, 5.0]))
    np.testing.assert_allclose(e.losses.numpy(), [0.75 * 2 + 0.25 * 6, 5.0, 8.0])  # EMA; new: as is


# ----------------------------------------------------------------------------- importance weights
@pytest.mark.parametrize("temperature, floor", [(1.0, 0.1), (0.3, 0.0), (2.0, 0.5)])
def test_importance_weights_are_exactly_unbiased(temperature, floor):
    rng = np.random.default_rng(1)
    n = 300
    losses = rng.exponential(1.0, n)
    s = LossWeightedSampler(n, temperature=temperature, floor=floor)
    s.update(torch.arange(n), torch.from_numpy(losses))
    s.set_epoch(1)
    p = s.probabilities()
    w = s.importance_weights(torch.arange(n), dtype=torch.float64)
    table = torch.from_numpy(losses.astype(np.float32)).double()
    # E_{i~p}[w_i * loss_i] == the uniform mean loss
    torch.testing.assert_close((p * w * table).sum(), table.mean(), rtol=1e-12, atol=0)
    if floor > 0:
        assert w.max() <= 1 / floor + 1e-9
    # Monte Carlo over the epoch's actual draws agrees as well
    mc = LossWeightedSampler(n, num_draws=200_000, temperature=temperature, floor=floor)
    mc.update(np.arange(n), losses)
    mc.set_epoch(1)
    draws = torch.tensor(list(mc))
    estimate = (mc.importance_weights(draws, dtype=torch.float64) * table[draws]).mean()
    assert abs(estimate.item() - table.mean().item()) < 0.02 * table.mean().item()


def test_importance_weights_shape_dtype_device():
    s = LossWeightedSampler(10)
    s.update(np.arange(10), np.arange(10.0))
    s.set_epoch(1)
    idx = torch.tensor([[1, 2], [3, 9]])
    w = s.importance_weights(idx)
    assert w.shape == (2, 2) and w.dtype == torch.float32 and w.device.type == "cpu"
    assert s.importance_weights([4, 5], dtype=torch.float64).dtype == torch.float64
    assert s.importance_weights(np.array(7)).shape == ()
    with pytest.raises(IndexError, match="index 10 is out of bounds"):
        s.importance_weights([10])


# ----------------------------------------------------------------------------- draws
def test_draws_follow_the_probabilities():
    n = 20
    s = LossWeightedSampler(n, num_draws=100_000, floor=0.2, seed=3)
    s.update(np.arange(n), np.arange(n) % 5)
    s.set_epoch(1)
    counts = np.bincount(list(s), minlength=n)
    p = s.probabilities().numpy()
    expected = p * 100_000
    assert (np.abs(counts - expected) < 5 * np.sqrt(expected) + 1).all()
    assert all(type(i) is int for i in s.global_items(1)[:10])


def test_without_replacement():
    n = 30
    s = LossWeightedSampler(n, num_draws=12, replacement=False, seed=4, floor=0.0, temperature=0.2)
    s.update(np.arange(n), np.arange(n, dtype=float))
    s.set_epoch(1)
    draws = list(s)
    assert len(draws) == len(set(draws)) == 12
    assert np.mean(draws) > 20  # sharp weights: mostly the high-loss (high-index) samples
    full = LossWeightedSampler(n, replacement=False, seed=4)
    assert sorted(full) == list(range(n))  # num_draws == N: a permutation
    with pytest.raises(ValueError, match="num_draws=31 exceeds num_samples=30"):
        LossWeightedSampler(n, 31, replacement=False)


def test_more_than_2_pow_24_samples():
    n = 2**24 + 7  # beyond torch.multinomial's category limit
    s = LossWeightedSampler(n, num_draws=2000, initial_loss=0.0, floor=0.5, seed=9)
    assert len(list(s)) == 2000  # uniform epoch 0
    s.update([n - 1, n - 2, 5], [100.0, 100.0, 0.0])
    s.set_epoch(1)
    draws = np.array(list(s))
    assert draws.min() >= 0 and draws.max() == n - 1
    share = np.isin(draws, [n - 1, n - 2]).mean()
    assert 0.44 < share < 0.56  # (1 - floor) of the mass is on the two high-loss samples
    w = s.importance_weights(torch.tensor([n - 1, 0]), dtype=torch.float64)
    total = 2 * (100 + 1e-8) + (n - 2) * 1e-8  # sum of s_j; unseen samples have s = eps
    p = [0.5 / n + 0.5 * (100 + 1e-8) / total, 0.5 / n + 0.5 * 1e-8 / total]
    torch.testing.assert_close(w, 1 / (n * torch.tensor(p, dtype=torch.float64)), rtol=1e-9, atol=0)


def test_epoch_draws_are_frozen_against_updates():
    s = LossWeightedSampler(50, num_draws=40, seed=2)
    s.update(np.arange(50), np.arange(50) % 7)
    s.set_epoch(1)
    draws, probs = list(s), s.probabilities()
    weights = s.importance_weights(draws)
    s.update(np.arange(50), np.full(50, 3.0))  # during epoch 1
    assert list(s) == draws and s.global_items(1) == draws and len(s) == 40
    assert torch.equal(s.probabilities(), probs) and torch.equal(s.importance_weights(draws), weights)
    s.set_epoch(1)  # same epoch again: still frozen
    assert list(s) == draws
    s.set_epoch(2)  # the next epoch uses the updated (all equal) losses
    np.testing.assert_allclose(s.probabilities().numpy(), 1 / 50, rtol=1e-12)
    # going back to an earlier epoch number replans it from the live table, consistently
    s.set_epoch(1)
    np.testing.assert_allclose(s.probabilities().numpy(), 1 / 50, rtol=1e-12)
    assert list(s) == s.global_items(1) != draws


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("num_draws", [1, 10, 37])
@pytest.mark.parametrize("drop_last", [False, True])
def test_multi_rank_shards(num_replicas, num_draws, drop_last):
    ranks = [
        LossWeightedSampler(25, num_draws, seed=6, num_replicas=num_replicas, rank=r, drop_last=drop_last)
        for r in range(num_replicas)
    ]
    for s in ranks:  # with torch.distributed, update() all-gathers: every rank has this table
        s.update(np.arange(25), np.arange(25) % 4)
        s.set_epoch(1)
    draws = ranks[0].global_items(1)
    assert all(s.global_items(1) == draws for s in ranks)
    per_rank = [list(s) for s in ranks]
    if drop_last:
        per = num_draws // num_replicas
        padded = draws[: per * num_replicas]
    else:
        per = math.ceil(num_draws / num_replicas)
        padded = (draws * num_replicas)[: per * num_replicas]
    assert [len(b) for b in per_rank] == [len(s) for s in ranks] == [per] * num_replicas
    for r, b in enumerate(per_rank):
        assert b == padded[r::num_replicas]


def test_dataloader():
    s = LossWeightedSampler(20, num_draws=18, seed=1)
    s.update(np.arange(20), np.arange(20.0))
    s.set_epoch(1)
    expected = list(s)
    batches = list(DataLoader(list(range(100, 120)), sampler=s, batch_size=4))
    assert len(batches) == 5
    assert torch.cat(batches).tolist() == [100 + i for i in expected]


# ----------------------------------------------------------------------------- resumption
def train_epoch(sampler, epoch, start=0, stop=None):
    """Iterate (the rest of) an epoch, feeding a loss after every drawn index."""
    out = []
    for j, i in enumerate(sampler, start=start):
        out.append(i)
        sampler.update([i], [loss_of(i, epoch * 1000 + j)])
        if stop is not None and j + 1 == stop:
            break
    return out


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("num_replicas", [1, 3])
@pytest.mark.parametrize("replacement", [True, False])
def test_resume_at_every_position(num_replicas, replacement):
    kw = dict(num_draws=14, seed=8, num_replicas=num_replicas, replacement=replacement, smoothing=0.5)
    epoch = 2
    for rank in range(num_replicas):
        ref = LossWeightedSampler(20, rank=rank, **kw)
        ref.set_epoch(1)
        train_epoch(ref, 1)
        reference_state = roundtrip(ref.state_dict())
        ref.set_epoch(epoch)
        full = train_epoch(ref, epoch)
        ref.set_epoch(epoch + 1)
        next_full, next_probs = list(ref), ref.probabilities()
        for k in range(len(full) + 1):
            first = LossWeightedSampler(20, rank=rank, **kw)
            first.load_state_dict(reference_state)
            first.set_epoch(epoch)
            head = train_epoch(first, epoch, stop=k) if k else []
            state = roundtrip(first.state_dict())
            assert state["position"] == k and state["plan_epoch"] == epoch
            resumed = LossWeightedSampler(20, rank=rank, **kw)
            resumed.load_state_dict(state)
            resumed.set_epoch(epoch)
            tail = train_epoch(resumed, epoch, start=k)
            assert head + tail == full, (rank, k)
            resumed.set_epoch(epoch + 1)
            assert list(resumed) == next_full
            assert torch.equal(resumed.probabilities(), next_probs)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    num_draws=st.integers(0, 40),
    num_replicas=st.integers(1, 3),
    rank_seed=st.integers(0, 2),
    position=st.integers(0, 40),
    temperature=st.sampled_from([0.5, 1.0, 2.0, math.inf]),
    floor=st.sampled_from([0.0, 0.1, 1.0]),
    replacement=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
    updates=st.lists(st.tuples(st.integers(0, 29), st.floats(-1, 100)), max_size=20),
)
def test_resume_property(
    n, num_draws, num_replicas, rank_seed, position, temperature, floor, replacement, drop_last, seed, updates
):
    if not replacement:
        num_draws = min(num_draws, n)
    kw = dict(
        num_draws=num_draws,
        num_replicas=num_replicas,
        rank=rank_seed % num_replicas,
        temperature=temperature,
        floor=floor,
        replacement=replacement,
        drop_last=drop_last,
        seed=seed,
    )
    idx = [i % n for i, _ in updates]
    losses = [v for _, v in updates]
    ref = LossWeightedSampler(n, **kw)
    ref.update(idx, losses)
    ref.set_epoch(1)
    full = list(ref)
    k = min(position, len(full))
    first = LossWeightedSampler(n, **kw)
    first.update(idx, losses)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    first.update(idx[::-1], [v + 1 for v in losses])  # mid-epoch updates: must not change the tail
    resumed = LossWeightedSampler(n, **kw)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert head + list(resumed) == full


def test_load_state_dict_errors_and_atomicity():
    s = LossWeightedSampler(10, 6, seed=1)
    s.update([1, 2], [3.0, 4.0])
    state = s.state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        LossWeightedSampler(11, 6).load_state_dict(state)
    with pytest.raises(ValueError, match="temperature"):
        LossWeightedSampler(10, 6, temperature=2.0).load_state_dict(state)
    other = LossWeightedSampler(10, 6)
    other.update([5], [9.0])
    before = other.losses
    with pytest.raises(ValueError, match="position"):
        other.load_state_dict({**state, "position": 99})
    assert torch.equal(other.losses.nan_to_num(-1), before.nan_to_num(-1))  # unchanged on error


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((0,), {}, ValueError, "num_samples must be positive"),
        ((2.5,), {}, TypeError, "num_samples must be an int"),
        ((5, -1), {}, ValueError, "num_draws must be non-negative"),
        ((5,), {"temperature": 0.0}, ValueError, "temperature must be positive"),
        ((5,), {"temperature": float("nan")}, ValueError, "temperature must be positive"),
        ((5,), {"floor": 1.5}, ValueError, r"floor must be in \[0, 1\]"),
        ((5,), {"floor": "0.1"}, TypeError, "floor must be a real number"),
        ((5,), {"smoothing": 1.0}, ValueError, r"smoothing must be in \[0, 1\)"),
        ((5,), {"eps": 0.0}, ValueError, "eps must be positive"),
        ((5,), {"initial_loss": math.inf}, ValueError, "initial_loss must be finite"),
        ((5,), {"num_replicas": 2, "rank": 2}, ValueError, "Invalid rank 2"),
    ],
)
def test_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LossWeightedSampler(*args, **kwargs)


def test_num_samples_from_a_dataset():
    assert LossWeightedSampler(list(range(7))).num_samples == 7
    assert len(LossWeightedSampler(range(7), num_draws=3)) == 3


@pytest.mark.parametrize(
    "indices, losses, exc, match",
    [
        ([0, 1], [1.0], ValueError, "same number of elements, got 2 and 1"),
        ([0, 5], [1.0, 2.0], IndexError, "index 5 is out of bounds"),
        (torch.tensor([-1]), torch.tensor([1.0]), IndexError, "index -1 is out of bounds"),
        ([0.0, 1.0], [1.0, 2.0], TypeError, "indices must be integers"),
        (torch.tensor([True]), [1.0], TypeError, "indices must be integers"),
        ([0, 1], [1.0, float("nan")], ValueError, "losses must be finite, got nan at position 1"),
        ([0], torch.tensor([float("inf")]), ValueError, "losses must be finite"),
        ([0], ["a"], TypeError, "losses must be real numbers"),
    ],
)
def test_update_errors(indices, losses, exc, match):
    s = LossWeightedSampler(5)
    with pytest.raises(exc, match=match):
        s.update(indices, losses)
    assert torch.isnan(s.losses).all()  # nothing recorded


def test_update_accepts_tensors_with_grad_and_low_precision():
    s = LossWeightedSampler(5)
    losses = torch.tensor([1.0, 2.0], requires_grad=True) * 2
    s.update(torch.tensor([3, 4], dtype=torch.int32), losses.bfloat16())
    s.update([], [])  # an empty batch is fine
    np.testing.assert_allclose(s.losses.numpy(), [np.nan, np.nan, np.nan, 2.0, 4.0])


# ----------------------------------------------------------------------------- two real ranks
def _two_rank_updates(rank, world_size):
    s = LossWeightedSampler(40, num_draws=30, seed=5, floor=0.2)
    assert (s.num_replicas, s.rank) == (2, rank)
    epoch0 = list(s)
    if rank == 0:
        s.update(torch.tensor([0, 1, 2, 3]), torch.tensor([5.0, 1.0, 2.0, 0.5], requires_grad=True))
        s.update([], [])
    else:  # a different length, one index shared with rank 0
        s.update(np.array([3, 10, 11]), [4.0, 8.0, 0.0])
        s.update([39], [3.0])
    s.set_epoch(1)
    return {
        "epoch0": epoch0,
        "probs": s.probabilities(),
        "losses": s.losses,
        "draws": s.global_items(1),
        "mine": list(s),
        "weights": s.importance_weights(torch.arange(40), dtype=torch.float64),
    }


@pytest.mark.slow
def test_two_gloo_ranks_share_one_table():
    a, b = (r.value for r in run_ranks(_two_rank_updates, 2, timeout=120))
    # what one process gets from all the updates of both ranks (index 3: mean of 0.5 and 4.0)
    ref = LossWeightedSampler(40, num_draws=30, seed=5, floor=0.2, num_replicas=2, rank=0)
    ref.update([0, 1, 2, 3, 3, 10, 11], [5.0, 1.0, 2.0, 0.5, 4.0, 8.0, 0.0])
    ref.update([39], [3.0])
    ref.set_epoch(1)
    for v in (a, b):
        assert torch.equal(v["losses"].nan_to_num(-1), ref.losses.nan_to_num(-1))
        assert torch.equal(v["probs"], ref.probabilities())
        assert v["draws"] == ref.global_items(1)
        assert torch.equal(v["weights"], ref.importance_weights(torch.arange(40), dtype=torch.float64))
    uniform = LossWeightedSampler(40, num_draws=30, seed=5, num_replicas=2, rank=0).global_items(0)
    assert a["epoch0"] == uniform[0::2] and b["epoch0"] == uniform[1::2]
    assert a["mine"] == a["draws"][0::2] and b["mine"] == b["draws"][1::2]
    assert len(a["mine"]) == len(b["mine"]) == 15


def test_imports_without_compiled_extension():
    out = run_isolated("""
        from batchops.data.loss_weighted import LossWeightedSampler
        import batchops.testing
        print(len(LossWeightedSampler(5, 3)))
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
