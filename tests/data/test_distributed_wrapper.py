"""DistributedSamplerWrapper (batchops.data.distributed): shard any sampler like DistributedSampler.

Generic contract properties are in test_sampler_contract.py; this file checks agreement with
DistributedSampler, epoch forwarding and reseeding, batch samplers, and bad inputs.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from batchops.data.bucket import BucketBatchSampler
from batchops.data.distributed import DistributedSamplerWrapper


def wrap_all(make_sampler, num_replicas, **kw):
    return [
        DistributedSamplerWrapper(make_sampler(), num_replicas=num_replicas, rank=r, **kw) for r in range(num_replicas)
    ]


@pytest.mark.parametrize("n", [1, 7, 10, 33])
@pytest.mark.parametrize("num_replicas", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_matches_distributed_sampler(n, num_replicas, drop_last):
    """Wrapping an unsharded DistributedSampler reproduces the sharded one exactly: the
    wrapper forwards set_epoch and shards the same way."""
    for rank in range(num_replicas):
        inner = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=5)
        ours = DistributedSamplerWrapper(inner, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        theirs = DistributedSampler(
            range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=5, drop_last=drop_last
        )
        for epoch in (0, 1, 4):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)
            assert inner.epoch == epoch


def test_weighted_sampler_ranks_agree_despite_different_global_rng():
    weights = [0.1] * 50 + [5.0] * 10
    ranks = []
    for r in range(3):
        torch.manual_seed(100 + r)  # each rank's global RNG differs, as in a real job
        user_gen = torch.Generator().manual_seed(r)  # so do the generators users pass
        inner = WeightedRandomSampler(weights, 40, replacement=True, generator=user_gen)
        ranks.append(DistributedSamplerWrapper(inner, num_replicas=3, rank=r, seed=11))
    for epoch in range(3):
        for s in ranks:
            s.set_epoch(epoch)
        globals_ = [s.global_items(epoch) for s in ranks]
        assert globals_[0] == globals_[1] == globals_[2]
        per_rank = [list(s) for s in ranks]
        assert [len(p) for p in per_rank] == [14, 14, 14]  # ceil(40 / 3), padded
        assert sorted(i for p in per_rank for i in p) == sorted(globals_[0] + globals_[0][:2])
    # the weights are honoured: the 10 heavy samples dominate
    heavy = sum(i >= 50 for i in ranks[0].global_items(0))
    assert heavy > 30


def test_epochs_differ_and_repeat():
    s = DistributedSamplerWrapper(RandomSampler(range(30)), num_replicas=2, rank=0, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[0] == orders[2] != orders[1]
    other_seed = DistributedSamplerWrapper(RandomSampler(range(30)), num_replicas=2, rank=0, seed=4)
    assert list(other_seed) != orders[0]
    s.set_epoch(0)
    assert sorted(s.global_items(0)) == list(range(30))


def test_reseed_false_keeps_user_generator():
    g = torch.Generator().manual_seed(0)
    s = DistributedSamplerWrapper(RandomSampler(range(20), generator=g), num_replicas=1, rank=0, reseed=False)
    assert s.sampler.generator is g
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(s) == expected


def test_set_epoch_forwarded_through_nested_samplers():
    class Recorder(SequentialSampler):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    inner = Recorder(range(6))
    s = DistributedSamplerWrapper(BatchSampler(inner, 2, drop_last=False), num_replicas=2, rank=1)
    s.set_epoch(3)
    assert list(s) == [[2, 3], [0, 1]]  # 3 batches padded to 4 by repeating the first
    assert inner.epochs[-1] == 3
    s2 = DistributedSamplerWrapper(BatchSampler(SubsetRandomSampler([1, 3, 5, 7]), 3, False), num_replicas=2, rank=0)
    assert s2.sampler.sampler.generator is None  # installed lazily, when an epoch is computed
    list(s2)
    assert isinstance(s2.sampler.sampler.generator, torch.Generator)  # installed for the epoch


@pytest.mark.parametrize("drop_last_batches", [False, True])
@pytest.mark.parametrize("num_replicas", [2, 3])
def test_batch_sampler_through_dataloader(drop_last_batches, num_replicas):
    n = 23
    data = TensorDataset(torch.arange(n))
    seen = collections.Counter()
    lens = set()
    for r in range(num_replicas):
        inner = BatchSampler(RandomSampler(range(n)), 4, drop_last=drop_last_batches)
        s = DistributedSamplerWrapper(inner, num_replicas=num_replicas, rank=r, seed=1)
        s.set_epoch(2)
        batches = [b[0].tolist() for b in DataLoader(data, batch_sampler=s)]
        assert batches == list(s)
        lens.add(len(batches))
        seen.update(i for b in batches for i in b)
    assert len(lens) == 1  # equal number of batches on every rank
    if not drop_last_batches:
        assert set(seen) == set(range(n))


def test_resume_with_freshly_built_wrapped_sampler():
    def make(seed=0):
        return DistributedSamplerWrapper(
            WeightedRandomSampler(torch.linspace(0.1, 1, 25), 25), num_replicas=2, rank=1, seed=seed
        )

    ref = make(seed=6)
    ref.set_epoch(5)
    full = list(ref)
    first = make(seed=6)
    first.set_epoch(5)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sampler"] == "WeightedRandomSampler" and state["shuffle"] is False
    resumed = make()  # constructor seed differs: the state's seed wins
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    with pytest.raises(ValueError, match="sampler"):
        DistributedSamplerWrapper(RandomSampler(range(25)), num_replicas=2, rank=1).load_state_dict(state)


def test_wraps_contract_samplers_and_plain_iterables():
    bucket = BucketBatchSampler(np.arange(1, 41), batch_size=4, num_replicas=1, rank=0, seed=2)
    s = DistributedSamplerWrapper(bucket, num_replicas=2, rank=0)
    s.set_epoch(1)
    bucket_epoch1 = BucketBatchSampler(np.arange(1, 41), batch_size=4, seed=2)
    bucket_epoch1.set_epoch(1)
    assert list(s) == list(bucket_epoch1)[0::2]
    assert list(DistributedSamplerWrapper(range(5), num_replicas=2, rank=1)) == [1, 3, 0]
    assert list(DistributedSamplerWrapper([], num_replicas=2, rank=1)) == []


def test_yielded_batches_are_copies():
    s = DistributedSamplerWrapper(BatchSampler(SequentialSampler(range(6)), 3, False), num_replicas=1, rank=0)
    first = next(iter(s))
    first.append(99)
    assert list(s) == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "sampler, kwargs, exc, match",
    [
        (5, {}, TypeError, "sampler must be an iterable sampler, got int"),
        (DistributedSampler(range(10), num_replicas=2, rank=0), {}, ValueError, "already sharded"),
        (
            BatchSampler(DistributedSampler(range(10), num_replicas=2, rank=0), 2, False),
            {},
            ValueError,
            "already sharded",
        ),
        (BucketBatchSampler([1, 2, 3], batch_size=1, num_replicas=3, rank=0), {}, ValueError, "already sharded"),
        (range(5), {"num_replicas": 2, "rank": 2}, ValueError, "Invalid rank 2"),
        (range(5), {"num_replicas": 0, "rank": 0}, ValueError, "num_replicas must be at least 1"),
        (range(5), {"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_argument_errors(sampler, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DistributedSamplerWrapper(sampler, **kwargs)
