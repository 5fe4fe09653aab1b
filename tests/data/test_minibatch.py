"""ShuffledBatchSampler, minibatches and the NumPy mini-batch GD reference (batchops.data.minibatch).

Generic contract properties of ShuffledBatchSampler are in test_sampler_contract.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from batchops.data.minibatch import ShuffledBatchSampler, minibatch_gd_linear_regression, minibatches

from tests.helpers import DEVICES


# ----------------------------------------------------------------------------- ShuffledBatchSampler
@pytest.mark.parametrize("n, batch_size", [(0, 3), (1, 1), (10, 3), (12, 4), (5, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_like_torch_batch_sampler(n, batch_size, drop_last):
    """shuffle=False gives exactly BatchSampler(SequentialSampler); shuffle=True the same sizes
    over a permutation."""
    ref = list(BatchSampler(SequentialSampler(range(n)), batch_size, drop_last))
    assert list(ShuffledBatchSampler(n, batch_size, shuffle=False, drop_last=drop_last)) == ref
    s = ShuffledBatchSampler(n, batch_size, drop_last=drop_last, seed=4)
    got = list(s)
    assert len(s) == len(got) == len(ref)
    assert [len(b) for b in got] == [len(b) for b in ref]
    flat = [i for b in got for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    if not drop_last:
        assert sorted(flat) == list(range(n))
    assert all(type(i) is int for i in flat)


def test_shuffled_per_epoch_and_seed():
    s = ShuffledBatchSampler(50, 5, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(50))
    assert sum(e0, []) != list(range(50))
    assert list(ShuffledBatchSampler(50, 5, seed=1)) == e0
    assert list(ShuffledBatchSampler(50, 5, seed=2)) != e0


def test_drop_last_drops_short_batch_then_uneven_batches():
    # 23 samples, batch 4: 5 full batches + a batch of 3; 3 ranks
    ranks = [ShuffledBatchSampler(23, 4, drop_last=True, num_replicas=3, rank=r, seed=0) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert [len(b) for b in per_rank] == [1, 1, 1]  # floor(5 / 3) full batches each
    assert all(len(b) == 4 for p in per_rank for b in p)
    ranks = [ShuffledBatchSampler(23, 4, num_replicas=3, rank=r, seed=0) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # 6 batches, the last one short
    assert sorted(i for p in per_rank for b in p for i in b) == list(range(23))


def test_dataloader_batch_sampler_and_resume():
    data = TensorDataset(torch.arange(40))
    s = ShuffledBatchSampler(40, 6, seed=3)
    s.set_epoch(2)
    expected = list(s)
    loader = DataLoader(data, batch_sampler=s)
    assert [b[0].tolist() for b in loader] == expected and len(loader) == 7
    it = iter(loader)
    next(it), next(it)
    s2 = ShuffledBatchSampler(40, 6)
    s2.load_state_dict(s.state_dict())
    assert [b[0].tolist() for b in DataLoader(data, batch_sampler=s2)] == expected[2:]
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatchSampler(40, 5).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="n="):
        ShuffledBatchSampler(41, 6).load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((-1, 2), {}, ValueError, "ShuffledBatchSampler: n must be at least 0"),
        ((3.0, 2), {}, TypeError, "ShuffledBatchSampler: n must be an int"),
        ((10, 0), {}, ValueError, "ShuffledBatchSampler: batch_size must be at least 1"),
        ((10, True), {}, TypeError, "ShuffledBatchSampler: batch_size must be an int"),
        ((10, 2), {"num_replicas": 2, "rank": 5}, ValueError, "Invalid rank 5"),
        ((10, 2), {"seed": None}, TypeError, "seed must be an int"),
    ],
)
def test_sampler_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ShuffledBatchSampler(*args, **kwargs)


# ----------------------------------------------------------------------------- minibatches
@pytest.mark.parametrize("device", DEVICES)
def test_minibatches_mixed_arrays_and_tensors(device):
    X = np.arange(30.0).reshape(10, 3)
    y = torch.arange(10, device=device)
    z = torch.arange(20, dtype=torch.float32).reshape(10, 2)  # on the CPU
    batches = list(minibatches(X, y, z, batch_size=4, seed=5, epoch=1))
    s = ShuffledBatchSampler(10, 4, seed=5)
    s.set_epoch(1)
    assert len(batches) == 3
    for (xb, yb, zb), idx in zip(batches, s):
        assert isinstance(xb, np.ndarray) and np.array_equal(xb, X[idx])
        assert yb.device == y.device and yb.tolist() == idx
        assert zb.device.type == "cpu" and torch.equal(zb, z[idx])


def test_minibatches_single_array_yields_tuples_and_epochs_differ():
    a = np.arange(12)
    e0 = [b for (b,) in minibatches(a, batch_size=5)]
    e1 = [b for (b,) in minibatches(a, batch_size=5, epoch=1)]
    assert [len(b) for b in e0] == [5, 5, 2]
    assert np.array_equal(np.sort(np.concatenate(e0)), a)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    again = [b for (b,) in minibatches(a, batch_size=5)]
    assert all(np.array_equal(p, q) for p, q in zip(e0, again))
    assert [len(b) for (b,) in minibatches(a, batch_size=5, drop_last=True)] == [5, 5]
    assert list(minibatches(np.zeros((0, 3)), batch_size=2)) == []


def test_minibatches_unshuffled_are_views():
    a = np.arange(10.0)
    t = torch.arange(10.0)
    batches = list(minibatches(a, t, batch_size=4, shuffle=False))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(np.shares_memory(xb, a) for xb, _ in batches)
    assert all(tb.data_ptr() == t[4 * i].data_ptr() for i, (_, tb) in enumerate(batches))


@pytest.mark.parametrize(
    "arrays, kwargs, exc, match",
    [
        ((), {"batch_size": 2}, ValueError, "arrays must contain at least one"),
        ((np.zeros(3), np.zeros(4)), {"batch_size": 2}, ValueError, r"same first dimension, got \[3, 4\]"),
        ((np.zeros(3), torch.zeros(2, 5)), {"batch_size": 2}, ValueError, "same first dimension"),
        (
            (np.zeros(3), [1, 2, 3]),
            {"batch_size": 2},
            TypeError,
            r"arrays\[1\] must be a numpy.ndarray or torch.Tensor",
        ),
        ((np.float64(3.0),), {"batch_size": 2}, TypeError, r"arrays\[0\]"),
        ((np.array(3.0),), {"batch_size": 2}, ValueError, r"arrays\[0\] is 0-d"),
        ((np.zeros(3),), {"batch_size": 0}, ValueError, "minibatches: batch_size must be at least 1"),
        ((np.zeros(3),), {"batch_size": 2, "epoch": 0.5}, TypeError, "epoch must be an int"),
    ],
)
def test_minibatches_errors_raise_at_call(arrays, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        minibatches(*arrays, **kwargs)  # not iterated: checked eagerly


# ----------------------------------------------------------------------------- reference GD
def problem(n=200, d=5, noise=0.1, k=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))  # well conditioned: eig(A^T A / n) within about [0.6, 1.3]
    w = rng.normal(size=(d,) if k is None else (d, k))
    y = X @ w + 0.7 + noise * rng.normal(size=(n,) if k is None else (n, k))
    return X, y


def lstsq(X, y, fit_intercept=True):
    A = np.c_[X, np.ones(len(X))] if fit_intercept else X
    return np.linalg.lstsq(A, y, rcond=None)[0]


def rel_err(w, b, ref):
    got = np.vstack([w, np.atleast_1d(b)[None]]) if w.ndim == 2 else np.r_[w, b]
    return np.abs(got - ref).max() / np.abs(ref).max()


def test_full_batch_gd_matches_closed_form():
    X, y = problem()
    w, b, hist = minibatch_gd_linear_regression(X, y, batch_size=len(X), lr=0.9, epochs=100)
    assert rel_err(w, b, lstsq(X, y)) < 1e-6
    assert isinstance(b, float) and w.shape == (5,) and hist.shape == (101,)
    assert np.all(np.diff(hist) <= 1e-15)  # full-batch GD with a safe step never increases L
    r = X @ w + b - y
    assert hist[-1] == pytest.approx(0.5 * np.mean(r**2))
    assert hist[0] == pytest.approx(0.5 * np.mean(y**2))  # starts at w = 0, b = 0


def test_minibatch_gd_consistent_system_matches_closed_form():
    X, y = problem(noise=0.0)  # zero residual at the optimum: constant-lr SGD converges exactly
    for batch_size in (1, 16, 37):
        w, b, _ = minibatch_gd_linear_regression(X, y, batch_size=batch_size, lr=0.05, epochs=150, seed=2)
        assert rel_err(w, b, lstsq(X, y)) < 1e-6, batch_size


def test_minibatch_gd_noisy_with_decaying_lr():
    X, y = problem()
    w, b, hist = minibatch_gd_linear_regression(
        X, y, batch_size=16, lr=lambda epoch: 0.2 / (1 + epoch), epochs=300, seed=1
    )
    ref = lstsq(X, y)
    assert rel_err(w, b, ref) < 1e-3
    r_opt = np.c_[X, np.ones(len(X))] @ ref - y
    assert hist[-1] == pytest.approx(0.5 * np.mean(r_opt**2), rel=1e-5)
    again = minibatch_gd_linear_regression(X, y, batch_size=16, lr=lambda e: 0.2 / (1 + e), epochs=300, seed=1)
    assert np.array_equal(again[0], w) and again[1] == b  # reproducible from the seed
    other = minibatch_gd_linear_regression(X, y, batch_size=16, lr=lambda e: 0.2 / (1 + e), epochs=3, seed=2)
    assert not np.array_equal(
        other[0], minibatch_gd_linear_regression(X, y, batch_size=16, lr=lambda e: 0.2 / (1 + e), epochs=3, seed=1)[0]
    )


def test_gd_without_intercept_and_multi_output():
    X, y = problem()
    w, b, _ = minibatch_gd_linear_regression(X, y, batch_size=500, lr=0.9, epochs=100, fit_intercept=False)
    assert b == 0.0 and rel_err(w, 0.0, np.r_[lstsq(X, y, fit_intercept=False), 0.0]) < 1e-6
    X, Y = problem(k=3)
    W, B, hist = minibatch_gd_linear_regression(torch.from_numpy(X), Y, batch_size=200, lr=0.9, epochs=100)
    assert W.shape == (5, 3) and B.shape == (3,)
    assert rel_err(W, B, lstsq(X, Y)) < 1e-6
    w0, b0, h0 = minibatch_gd_linear_regression(X, Y, batch_size=8, lr=0.1, epochs=0)
    assert np.all(w0 == 0) and np.all(b0 == 0) and h0.shape == (1,)


@pytest.mark.parametrize(
    "X, y, kwargs, exc, match",
    [
        (np.zeros(4), np.zeros(4), {}, ValueError, r"X must have 2 dimensions, got shape \(4,\)"),
        (np.zeros((4, 2)), np.zeros((4, 2, 1)), {}, ValueError, "y must have 1 or 2 dimensions"),
        (np.zeros((4, 2)), np.zeros(3), {}, ValueError, "X has 4 rows but y has 3"),
        (np.zeros((0, 2)), np.zeros(0), {}, ValueError, "X has no rows"),
        (np.full((4, 2), np.nan), np.zeros(4), {}, ValueError, "X must be finite"),
        (np.zeros((4, 2)), ["a", "b", "c", "d"], {}, TypeError, "y must be a real array"),
        (np.zeros((4, 2)), np.zeros(4), {"batch_size": 0}, ValueError, "batch_size must be at least 1"),
        (np.zeros((4, 2)), np.zeros(4), {"epochs": -1}, ValueError, "epochs must be at least 0"),
        (np.zeros((4, 2)), np.zeros(4), {"lr": -0.1}, ValueError, "lr must be positive and finite"),
        (np.zeros((4, 2)), np.zeros(4), {"lr": float("inf")}, ValueError, "lr must be positive and finite"),
        (np.zeros((4, 2)), np.zeros(4), {"lr": "0.1"}, TypeError, "lr must be a float or a callable"),
        (np.zeros((4, 2)), np.zeros(4), {"lr": lambda e: 0.0}, ValueError, r"lr\(0\) must be a positive"),
    ],
)
def test_gd_errors(X, y, kwargs, exc, match):
    args = {"batch_size": 2, "lr": 0.1, "epochs": 1, **kwargs}
    with pytest.raises(exc, match=f"minibatch_gd_linear_regression: {match}"):
        minibatch_gd_linear_regression(X, y, **args)
