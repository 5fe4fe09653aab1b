"""Property tests of the shared sampler contract, run against every sampler built on it.

Each entry of SAMPLER_FACTORIES builds one sampler from ``(n, seed=, num_replicas=, rank=,
drop_last=)``; the same properties (exact resume, rank sharding, reproducibility, exact len) are
checked for all of them with hypothesis, under a small, derandomized profile so the file stays
fast and never flakes. Pure Python: no compiled kernels needed.
"""

from __future__ import annotations

import collections
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, RandomSampler, WeightedRandomSampler

from batchops.data.bucket import BucketBatchSampler
from batchops.data.curriculum import CurriculumSampler
from batchops.data.distributed import DistributedSamplerWrapper
from batchops.data.loss_weighted import LossWeightedSampler
from batchops.data.minibatch import ShuffledBatchSampler
from batchops.data.sampler_contract import ResumableDistributedSampler
from batchops.testing.isolation import run_isolated

PROFILE = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    # the autouse torch.manual_seed fixture in conftest is harmless to share between examples
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# ----------------------------------------------------------------------------- the samplers
# Every factory: (n, *, seed, num_replicas, rank, drop_last) -> a ResumableDistributedSampler
# over a data set of n samples. Data are derived from n only, so equal arguments give equal
# samplers (as on every rank of a real job).
def _bucket(n, **kw):
    lengths = np.random.default_rng(n).integers(1, 60, n)
    return BucketBatchSampler(lengths, batch_size=3, batches_per_bucket=2, **kw)


def _curriculum_epoch(n, **kw):
    difficulty = np.random.default_rng(n).random(n)
    return CurriculumSampler(difficulty, "linear", start_fraction=0.3, total_epochs=3, **kw)


def _curriculum_step_balanced(n, **kw):
    rng = np.random.default_rng(n)
    return CurriculumSampler(
        rng.integers(0, 5, n),  # many ties
        "exp_step",
        start_fraction=0.2,
        step_length=2,
        class_labels=rng.integers(0, 3, n),
        batch_size=2,
        num_samples_per_epoch=n + 3,
        **kw,
    )


def _curriculum_root_cycled(n, **kw):
    difficulty = np.random.default_rng(n).normal(size=n)
    return CurriculumSampler(difficulty, "root", start_fraction=0.1, total_epochs=4, num_samples_per_epoch=2 * n, **kw)


def _shuffled(n, **kw):
    return ShuffledBatchSampler(n, 3, **kw)


def _wrapped_weighted(n, **kw):
    weights = np.random.default_rng(n).random(n) + 0.1
    return DistributedSamplerWrapper(WeightedRandomSampler(weights.tolist(), n + 2), **kw)


def _wrapped_batch(n, **kw):
    return DistributedSamplerWrapper(BatchSampler(RandomSampler(range(n)), 4, drop_last=False), **kw)


def _loss_weighted(n, **kw):
    sampler = LossWeightedSampler(n, n + 3, temperature=0.5, floor=0.2, **kw)
    rng = np.random.default_rng(n)
    sampler.update(np.arange(0, n, 2), rng.random(len(range(0, n, 2))) * 3.0)
    return sampler


# Add new contract samplers here: every test below is
# parametrized over this list, so one factory line is all a new sampler needs.
SAMPLER_FACTORIES = [
    pytest.param(_bucket, id="BucketBatchSampler"),
    pytest.param(_curriculum_epoch, id="CurriculumSampler-epoch"),
    pytest.param(_curriculum_step_balanced, id="CurriculumSampler-step-balanced"),
    pytest.param(_curriculum_root_cycled, id="CurriculumSampler-root-cycled"),
    pytest.param(_shuffled, id="ShuffledBatchSampler"),
    pytest.param(_wrapped_weighted, id="DistributedSamplerWrapper-WeightedRandomSampler"),
    pytest.param(_wrapped_batch, id="DistributedSamplerWrapper-BatchSampler"),
    pytest.param(_loss_weighted, id="LossWeightedSampler"),
]

sizes = st.integers(min_value=1, max_value=40)
replicas = st.integers(min_value=1, max_value=4)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
epochs = st.integers(min_value=0, max_value=6)


def _checkpoint_round_trip(state):
    """What a checkpoint does to a state: torch.save, then torch.load(weights_only=True), which
    accepts plain Python values and tensors only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def key(item):
    """Hashable form of an item (batch samplers yield lists)."""
    return tuple(item) if isinstance(item, list) else item


def ranks_of(factory, n, num_replicas, **kw):
    return [factory(n, num_replicas=num_replicas, rank=r, **kw) for r in range(num_replicas)]


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("factory", SAMPLER_FACTORIES)
@PROFILE
@given(n=sizes, num_replicas=replicas, seed=seeds, epoch=epochs, drop_last=st.booleans(), data=st.data())
def test_resume_at_every_position(factory, n, num_replicas, seed, epoch, drop_last, data):
    rank = data.draw(st.integers(0, num_replicas - 1), label="rank")
    kw = dict(num_replicas=num_replicas, rank=rank, drop_last=drop_last)
    ref = factory(n, seed=seed, **kw)
    assert isinstance(ref, ResumableDistributedSampler)
    ref.set_epoch(epoch)
    full = list(ref)
    ref.set_epoch(epoch + 1)
    following = list(ref)
    for k in range(len(full) + 1):
        first = factory(n, seed=seed, **kw)
        first.set_epoch(epoch)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = _checkpoint_round_trip(first.state_dict())
        assert (state["position"], state["epoch"], state["seed"]) == (k, epoch, seed)
        resumed = factory(n, seed=seed + 1, **kw)  # the seed comes back from the state
        resumed.load_state_dict(state)
        resumed.set_epoch(epoch)  # the usual loop calls set_epoch(epoch) again: position kept
        assert len(resumed) == len(full)
        tail = list(resumed)
        assert head + tail == full
        assert resumed.position == 0  # epoch complete
        resumed.set_epoch(epoch + 1)  # and the run continues as if never interrupted
        assert list(resumed) == following


@pytest.mark.parametrize("factory", SAMPLER_FACTORIES)
@PROFILE
@given(n=sizes, num_replicas=replicas, seed=seeds, epoch=epochs, drop_last=st.booleans())
def test_ranks_equal_counts_disjoint_and_covering(factory, n, num_replicas, seed, epoch, drop_last):
    ranks = ranks_of(factory, n, num_replicas, seed=seed, drop_last=drop_last)
    for s in ranks:
        s.set_epoch(epoch)
    global_items = [key(i) for i in ranks[0].global_items(epoch)]
    for s in ranks[1:]:  # every rank computes the same global order
        assert [key(i) for i in s.global_items(epoch)] == global_items
    m = len(global_items)
    per_rank = [[key(i) for i in s] for s in ranks]
    expected = m // num_replicas if drop_last else math.ceil(m / num_replicas)
    assert [len(items) for items in per_rank] == [expected] * num_replicas
    assert [len(s) for s in ranks] == [expected] * num_replicas
    # exactly the round-robin deal of the padded (or cut) global list
    total = expected * num_replicas
    padded = (global_items * (total // max(m, 1) + 1))[:total]
    for r, items in enumerate(per_rank):
        assert items == padded[r::num_replicas]
    dealt = collections.Counter(i for items in per_rank for i in items)
    if drop_last or m % num_replicas == 0:  # no padding: each global position on one rank
        assert dealt == collections.Counter(global_items[:total])
        if len(set(global_items)) == m:
            assert sum(dealt.values()) == len(dealt)  # disjoint shards
    if not drop_last:
        assert set(dealt) == set(global_items)  # every item of the epoch is seen


@pytest.mark.parametrize("factory", SAMPLER_FACTORIES)
@PROFILE
@given(n=sizes, num_replicas=replicas, seed=seeds, drop_last=st.booleans(), data=st.data())
def test_len_equals_items_yielded_every_epoch(factory, n, num_replicas, seed, drop_last, data):
    rank = data.draw(st.integers(0, num_replicas - 1), label="rank")
    s = factory(n, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
    for epoch in range(5):
        s.set_epoch(epoch)
        assert len(s) == sum(1 for _ in s)
        assert len(s) == sum(1 for _ in s)  # a second pass over the same epoch: same length


@pytest.mark.parametrize("factory", SAMPLER_FACTORIES)
@PROFILE
@given(n=st.integers(20, 40), seed=seeds, epoch=epochs)
def test_reproducible_per_seed_and_epoch(factory, n, seed, epoch):
    def run(seed, epoch):
        s = factory(n, seed=seed, num_replicas=1, rank=0, drop_last=False)
        s.set_epoch(epoch)
        return [key(i) for i in s]

    assert run(seed, epoch) == run(seed, epoch)
    assert run(seed, epoch) != run(seed, epoch + 1)
    assert run(seed, epoch) != run(seed + 1, epoch)
    # the epoch's order does not depend on what was iterated before it
    s = factory(n, seed=seed, num_replicas=1, rank=0, drop_last=False)
    for e in (epoch + 2, epoch + 1):
        s.set_epoch(e)
        list(s)
    s.set_epoch(epoch)
    assert [key(i) for i in s] == run(seed, epoch)


def test_imports_without_compiled_extension():
    """The new samplers need only torch and numpy: block batchops._C and batchops.ops."""
    out = run_isolated("""
        from batchops.data.curriculum import CurriculumSampler
        from batchops.data.distributed import DistributedSamplerWrapper
        from batchops.data.minibatch import ShuffledBatchSampler, minibatches, minibatch_gd_linear_regression
        print(len(CurriculumSampler([3, 1, 2], total_epochs=2)), len(ShuffledBatchSampler(5, 2)),
              len(DistributedSamplerWrapper(range(5), num_replicas=2, rank=1)))
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3", "3"]
