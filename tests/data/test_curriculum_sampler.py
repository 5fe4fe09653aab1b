"""CurriculumSampler (batchops.data.curriculum): pacing, eligibility, class balance, step mode.

The generic contract properties (resume, sharding, len, reproducibility) are in
test_sampler_contract.py; this file checks the curriculum-specific behaviour and bad inputs.
"""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from batchops.data.curriculum import CurriculumSampler


def easiest(difficulty, k):
    return set(np.argsort(difficulty, kind="stable")[:k].tolist())


# ----------------------------------------------------------------------------- pacing formulas
@pytest.mark.parametrize("s0", [0.05, 0.1, 0.5, 1.0])
def test_pacing_formulas(s0):
    d = np.arange(100.0)
    lin = CurriculumSampler(d, "linear", start_fraction=s0, total_epochs=8)
    root = CurriculumSampler(d, "root", start_fraction=s0, total_epochs=8)
    exp = CurriculumSampler(d, "exp_step", start_fraction=s0, increase=1.9, step_length=3)
    for t in range(12):
        assert lin.fraction(t) == pytest.approx(min(1, s0 + (1 - s0) * t / 8))
        assert root.fraction(t) == pytest.approx(min(1, math.sqrt(s0**2 + (1 - s0**2) * t / 8)))
        assert exp.fraction(t) == pytest.approx(min(1, s0 * 1.9 ** (t // 3)))
    for s in (lin, root):
        assert s.fraction(0) == pytest.approx(s0) and s.fraction(8) == 1.0 and s.fraction(10**9) == 1.0
    assert exp.fraction(10**12) == 1.0  # no overflow for huge progress
    assert root.fraction(2) >= lin.fraction(2)  # root admits faster early on
    assert lin.fraction(-3) == lin.fraction(0)  # progress is clamped at 0


def test_callable_pacing():
    s = CurriculumSampler(np.arange(10.0), lambda t: [0.2, 0.5, 1.0][min(t, 2)])
    sizes = []
    for epoch in range(4):
        s.set_epoch(epoch)
        sizes.append(len(s))
        assert set(s) == set(range(len(s)))  # the easiest len(s) samples
    assert sizes == [2, 5, 10, 10]
    t = CurriculumSampler(np.arange(10.0), lambda t: torch.tensor(0.3, dtype=torch.float64))  # tensors work
    assert len(t) == 3


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, float("nan"), "0.5", None, True])
def test_callable_pacing_bad_values(bad):
    s = CurriculumSampler(np.arange(10.0), lambda t: bad)
    with pytest.raises(ValueError, match=r"pacing\(0\) must return a number in \(0, 1\]"):
        len(s)


def test_eligible_count_is_ceil_of_fraction_times_n():
    # f * N lands on integers in exact arithmetic but not in floating point (0.1 + 0.9 * t / 9 ...)
    for n in (7, 10, 100, 997):
        for s0 in (0.1, 0.3, 0.7):
            s = CurriculumSampler(np.arange(float(n)), start_fraction=s0, total_epochs=9)
            for t in range(11):
                exact = (s0 * 9 + (1 - s0) * t) / 9  # the same fraction, rounded differently
                want = min(n, max(1, math.ceil(round(exact * n, 6))))
                assert s.num_eligible(t) == want, (n, s0, t)
    tiny = CurriculumSampler(np.arange(10.0), start_fraction=1e-12, total_epochs=5)
    assert tiny.num_eligible(0) == 1  # at least one sample


# ----------------------------------------------------------------------------- epochs
def test_epochs_grow_from_easiest_and_are_shuffled():
    rng = np.random.default_rng(0)
    d = rng.normal(size=200)
    s = CurriculumSampler(d, "linear", start_fraction=0.2, total_epochs=4, seed=3)
    prev = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        items = list(s)
        k = math.ceil(round(min(1, 0.2 + 0.8 * epoch / 4) * 200, 9))  # 0.6 * 200 is 120.00000000000001
        assert len(items) == len(s) == k
        assert sorted(items) == sorted(easiest(d, k))  # each eligible sample exactly once
        assert prev <= set(items)  # the eligible set only grows
        prev = set(items)
        assert [d[i] for i in items] != sorted(d[i] for i in items)  # shuffled
        assert all(type(i) is int for i in items)
    assert prev == set(range(200))


def test_ties_broken_by_index_and_shuffle_false_is_easiest_first():
    s = CurriculumSampler([5, 5, 1, 5, 1, 3], "linear", start_fraction=0.5, total_epochs=1, shuffle=False)
    assert list(s) == [2, 4, 5]  # stable: among equal difficulties the lower index first
    s.set_epoch(1)
    assert list(s) == [2, 4, 5, 0, 1, 3]
    assert s.eligible_indices(0) == [2, 4, 5]


def test_difficulty_types_agree():
    d = np.random.default_rng(1).random(50)
    ref = list(CurriculumSampler(d, total_epochs=3, seed=2))
    for conv in (list, torch.tensor, lambda a: a.astype(np.float32).astype(np.float64)):
        assert list(CurriculumSampler(conv(d), total_epochs=3, seed=2)) == ref
    ints = list(CurriculumSampler(np.arange(20), total_epochs=3, shuffle=False))
    assert ints == list(range(2))


def test_num_samples_per_epoch_cycles_through_eligible():
    d = np.arange(50.0)
    s = CurriculumSampler(d, "linear", start_fraction=0.1, total_epochs=5, num_samples_per_epoch=23, seed=1)
    items = list(s)
    assert len(items) == len(s) == 23
    counts = collections.Counter(items)
    assert set(counts) == set(range(5)) and set(counts.values()) == {4, 5}  # passes over 5 samples
    assert all(len(set(items[i : i + 5])) == 5 for i in range(0, 20, 5))  # each pass a permutation
    s.set_epoch(10)
    assert len(s) == 23 and len(set(s)) == 23  # 23 distinct of 50 once all are eligible
    t = CurriculumSampler(d, start_fraction=0.1, total_epochs=5, num_samples_per_epoch=12, shuffle=False)
    assert list(t) == [0, 1, 2, 3, 4] * 2 + [0, 1]


# ----------------------------------------------------------------------------- class balance
def test_class_balance_takes_easiest_of_every_class():
    rng = np.random.default_rng(4)
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    d = rng.random(100) + labels * 10.0  # class 2 is entirely harder than classes 0 and 1
    s = CurriculumSampler(d, "linear", start_fraction=0.1, total_epochs=3, class_labels=labels, seed=0)
    unbalanced = CurriculumSampler(d, "linear", start_fraction=0.1, total_epochs=3)
    assert {labels[i] for i in unbalanced} == {0}  # without balance only the easy class
    for epoch in range(4):
        s.set_epoch(epoch)
        f = s.fraction(epoch)
        items = list(s)
        assert len(items) == len(set(items)) == len(s)
        for c, size in ((0, 60), (1, 30), (2, 10)):
            members = np.flatnonzero(labels == c)
            k = math.ceil(round(f * size, 9))
            got = {i for i in items if labels[i] == c}
            assert got == set(members[np.argsort(d[members], kind="stable")[:k]].tolist()), (epoch, c)


def test_class_balance_string_labels_and_ordering():
    labels = ["cat", "dog", "cat", "dog", "cat", "dog", "bird"]
    d = [0.9, 0.1, 0.5, 0.2, 0.7, 0.3, 5.0]
    s = CurriculumSampler(d, "linear", start_fraction=0.34, total_epochs=2, class_labels=labels, shuffle=False)
    # ceil(0.34 * 3) = 2 of cat and dog, ceil(0.34 * 1) = 1 bird; order by within-class quantile,
    # ties going to the globally easier sample: q=0 {dog 1, cat 2, bird 6}, q=1/3 {dog 3, cat 4}
    assert list(s) == [1, 2, 6, 3, 4]
    s.set_epoch(2)
    assert list(s) == [1, 2, 6, 3, 4, 5, 0]
    labels_t = torch.tensor([0, 1, 0, 1, 0, 1, 2])
    t = CurriculumSampler(d, "linear", start_fraction=0.34, total_epochs=2, class_labels=labels_t, shuffle=False)
    assert list(t) == [1, 2, 6, 3, 4]


# ----------------------------------------------------------------------------- per-step pacing
@pytest.mark.parametrize("num_replicas", [1, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_step_pacing_batches_follow_the_step(num_replicas, shuffle):
    n, B = 120, 4
    d = np.random.default_rng(5).random(n)
    kw = dict(start_fraction=0.05, total_steps=25, batch_size=B, num_replicas=num_replicas, seed=7, shuffle=shuffle)
    ranks = [CurriculumSampler(d, "root", rank=r, **kw) for r in range(num_replicas)]
    K = ranks[0].steps_per_epoch
    assert K == math.ceil(n / (num_replicas * B))
    assert ranks[0].pace_unit == "step"
    order = np.argsort(d, kind="stable")
    for epoch in range(3):
        batches = []
        for s in ranks:
            s.set_epoch(epoch)
            assert len(s) == math.ceil(n / num_replicas)
            loader = DataLoader(TensorDataset(torch.arange(n)), sampler=s, batch_size=B)
            batches.append([b[0].tolist() for b in loader])
        for k in range(K):
            step = epoch * K + k
            eligible = set(order[: ranks[0].num_eligible(step)].tolist())
            global_batch = [i for r in range(num_replicas) for i in (batches[r][k] if k < len(batches[r]) else [])]
            if (k + 1) * num_replicas * B <= n:  # full global batch: drawn for this step
                assert set(global_batch) <= eligible, (epoch, k)
                if shuffle and len(global_batch) <= len(eligible):
                    assert len(set(global_batch)) == len(global_batch)  # without replacement
    s = ranks[0]
    assert s.num_eligible(0) == math.ceil(0.05 * n) and s.num_eligible(25) == n


def test_step_pacing_total_epochs_converts_to_steps():
    d = np.arange(100.0)
    a = CurriculumSampler(d, total_epochs=3, batch_size=8, seed=1)
    b = CurriculumSampler(d, total_steps=3 * a.steps_per_epoch, batch_size=8, seed=1)
    assert a.steps_per_epoch == 13
    assert [a.fraction(t) for t in range(50)] == [b.fraction(t) for t in range(50)]
    assert list(a) == list(b)
    c = CurriculumSampler(d, "exp_step", step_length=13, batch_size=8)  # plateau = 1 epoch
    assert [c.fraction(t) for t in (0, 12, 13, 26)] == pytest.approx([0.1, 0.1, 0.2, 0.4])
    with pytest.raises(ValueError, match="steps_per_epoch is defined only with batch_size"):
        _ = CurriculumSampler(d, total_epochs=3).steps_per_epoch


def test_step_pacing_shuffle_false_cycles():
    s = CurriculumSampler(
        np.arange(10.0), "exp_step", start_fraction=0.3, step_length=1, increase=2, batch_size=2, shuffle=False
    )
    # steps 0..4 admit 3, 6, 10, 10, 10 samples; a cursor walks them cyclically
    assert list(s) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    t = CurriculumSampler(
        np.arange(10.0), "exp_step", start_fraction=0.2, step_length=2, increase=2, batch_size=3, shuffle=False
    )
    # steps 0, 1 admit 2 samples, steps 2, 3 admit 4; the cursor carries over between steps
    assert list(t) == [0, 1, 0, 1, 0, 1, 0, 1, 2, 3]


# ----------------------------------------------------------------------------- checkpointing
def test_resume_mid_epoch_through_dataloader():
    d = np.random.default_rng(8).random(64)
    make = lambda: CurriculumSampler(d, "root", start_fraction=0.2, total_epochs=3, batch_size=4, seed=9)
    s = make()
    s.set_epoch(1)
    loader = DataLoader(TensorDataset(torch.arange(64)), sampler=s, batch_size=4)
    expected = [b[0].tolist() for b in loader]
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["position"] == 20 and state["pacing"] == "root"
    s2 = make()
    s2.load_state_dict(state)
    rest = [b[0].tolist() for b in DataLoader(TensorDataset(torch.arange(64)), sampler=s2, batch_size=4)]
    assert rest == expected[5:]


def test_load_state_dict_rejects_other_curriculum():
    d = np.arange(30.0)
    state = CurriculumSampler(d, total_epochs=3).state_dict()
    with pytest.raises(ValueError, match="curriculum_digest"):
        CurriculumSampler(d[::-1].copy(), total_epochs=3).load_state_dict(state)
    with pytest.raises(ValueError, match="pacing"):
        CurriculumSampler(d, "root", total_epochs=3).load_state_dict(state)
    with pytest.raises(ValueError, match="total_epochs"):
        CurriculumSampler(d, total_epochs=4).load_state_dict(state)
    with pytest.raises(ValueError, match="curriculum_digest"):
        CurriculumSampler(d, total_epochs=3, class_labels=[0, 1] * 15).load_state_dict(state)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "difficulty, exc, match",
    [
        ([], ValueError, "difficulty is empty"),
        ([[1.0, 2.0]], ValueError, "difficulty must be 1-D"),
        ([1.0, float("nan")], ValueError, "difficulty must be finite, got nan at index 1"),
        (torch.tensor([0.0, float("inf")]), ValueError, "difficulty must be finite"),
        ([True, False], TypeError, "difficulty must hold real numbers"),
        (["a", "b"], TypeError, "difficulty must hold real numbers"),
        ([1 + 2j], TypeError, "difficulty must hold real numbers"),
    ],
)
def test_difficulty_errors(difficulty, exc, match):
    with pytest.raises(exc, match=match):
        CurriculumSampler(difficulty, total_epochs=2)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("cosine",), {"total_epochs": 2}, ValueError, "pacing must be one of 'linear', 'root', 'exp_step'"),
        ((3,), {"total_epochs": 2}, TypeError, "pacing must be a str or a callable"),
        (("linear",), {}, ValueError, "pacing='linear' needs a pace length"),
        (("root",), {}, ValueError, "pacing='root' needs a pace length"),
        (("exp_step",), {}, ValueError, "pacing='exp_step' needs step_length"),
        (("exp_step",), {"step_length": 2, "increase": 1.0}, ValueError, "increase must be greater than 1"),
        (("exp_step",), {"step_length": 0}, ValueError, "step_length must be at least 1"),
        (
            ("linear",),
            {"total_epochs": 2, "step_length": 2},
            ValueError,
            "step_length applies only to pacing='exp_step'",
        ),
        ((), {"total_epochs": 2, "start_fraction": 0.0}, ValueError, r"start_fraction must be in \(0, 1\]"),
        ((), {"total_epochs": 2, "start_fraction": 1.5}, ValueError, r"start_fraction must be in \(0, 1\]"),
        ((), {"total_epochs": 2, "start_fraction": float("nan")}, ValueError, "start_fraction must be finite"),
        ((), {"total_epochs": 2, "start_fraction": "0.1"}, TypeError, "start_fraction must be a real number"),
        ((), {"total_epochs": 0}, ValueError, "total_epochs must be at least 1"),
        ((), {"total_epochs": 2.0}, TypeError, "total_epochs must be an int"),
        ((), {"total_steps": 10}, ValueError, "total_steps needs batch_size"),
        ((), {"total_steps": 10, "total_epochs": 2, "batch_size": 2}, ValueError, "exclusive"),
        ((), {"total_epochs": 2, "batch_size": 0}, ValueError, "batch_size must be at least 1"),
        ((), {"total_epochs": 2, "num_samples_per_epoch": 0}, ValueError, "num_samples_per_epoch must be at least 1"),
        (
            (),
            {"total_epochs": 2, "class_labels": [0, 1]},
            ValueError,
            "class_labels has 2 entries but difficulty has 4",
        ),
        ((), {"total_epochs": 2, "class_labels": [[0, 1], [0, 1]]}, ValueError, "class_labels must be 1-D"),
        ((), {"total_epochs": 2, "num_replicas": 2, "rank": 2}, ValueError, "Invalid rank 2"),
        ((), {"total_epochs": 2, "seed": 0.5}, TypeError, "seed must be an int"),
    ],
)
def test_argument_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CurriculumSampler([0.4, 0.1, 0.3, 0.2], *args, **kwargs)
