"""BucketBatchSampler and the shared sampler contract (batchops.data); pure Python, no kernels."""

from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from batchops.data import BucketBatchSampler, ResumableDistributedSampler
from batchops.testing.isolation import run_isolated

MODES = [
    pytest.param({"max_tokens": 1024}, id="max_tokens"),
    pytest.param({"batch_size": 7}, id="batch_size"),
]


def lognormal_lengths(n, seed=0, sigma=1.0, max_len=2048):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(5.0, sigma, n)), 1, max_len).astype(np.int64)


def samplers(lengths, num_replicas, **kw):
    return [BucketBatchSampler(lengths, num_replicas=num_replicas, rank=r, **kw) for r in range(num_replicas)]


# ----------------------------------------------------------------------------- batch shape
@pytest.mark.parametrize("shuffle", [True, False])
def test_max_tokens_budget(shuffle):
    lengths = lognormal_lengths(3000, seed=1).tolist()
    lengths[:5] = [5000, 4097, 4096, 0, 0]  # oversize, exactly at budget, empty sequences
    s = BucketBatchSampler(lengths, max_tokens=4096, shuffle=shuffle, seed=3)
    batches = list(s)
    for b in batches:
        longest = max(lengths[i] for i in b)
        if longest > 4096:
            assert len(b) == 1, "an oversize sequence must be alone"
        else:
            assert len(b) * max(longest, 1) <= 4096
    alone = {b[0] for b in batches if len(b) == 1}
    assert {0, 1} <= alone
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(lengths)))


def test_batch_size_rows():
    s = BucketBatchSampler(lognormal_lengths(1000), batch_size=32, seed=2)
    sizes = collections.Counter(len(b) for b in s)
    assert set(sizes) <= {32, 1000 % 32} and sizes[1000 % 32] == 1  # one short batch per epoch


def test_batches_are_length_homogeneous_within_sorted_buckets():
    lengths = lognormal_lengths(2000, seed=4)
    s = BucketBatchSampler(lengths, batch_size=16, shuffle=False)
    flat = [i for b in s for i in b]
    assert flat == np.argsort(lengths, kind="stable").tolist()  # shuffle=False: sorted order


# ----------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [1, 2, 13, 500])
def test_every_index_once_single_rank(mode, shuffle, n):
    s = BucketBatchSampler(lognormal_lengths(n, seed=n, max_len=600), shuffle=shuffle, **mode)
    for epoch in range(2):
        s.set_epoch(epoch)
        flat = [i for b in s for i in b]
        assert sorted(flat) == list(range(n))
        assert all(type(i) is int for i in flat)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 37, 400])
def test_multi_rank_equal_counts_and_coverage(mode, num_replicas, n):
    lengths = lognormal_lengths(n, seed=n, max_len=600)
    ranks = samplers(lengths, num_replicas, seed=5, **mode)
    global_batches = ranks[0].global_items(0)
    m = len(global_batches)
    per_rank = [list(s) for s in ranks]
    counts = {len(b) for b in per_rank}
    assert counts == {math.ceil(m / num_replicas)}
    assert all(len(s) == len(b) for s, b in zip(ranks, per_rank))
    # round-robin deal of the global list padded by repetition from its start (DistributedSampler)
    padded = (global_batches * num_replicas)[: math.ceil(m / num_replicas) * num_replicas]
    for r, b in enumerate(per_rank):
        assert b == padded[r::num_replicas]
    seen = collections.Counter(i for b in per_rank for batch in b for i in batch)
    assert set(seen) == set(range(n))
    if m % num_replicas == 0:
        assert set(seen.values()) == {1}
    else:
        repeated = collections.Counter(i for batch in padded[m:] for i in batch)
        assert seen == collections.Counter(range(n)) + repeated


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 37, 400])
def test_drop_last(mode, num_replicas, n):
    lengths = lognormal_lengths(n, seed=n, max_len=600)
    ranks = samplers(lengths, num_replicas, seed=5, drop_last=True, **mode)
    global_batches = ranks[0].global_items(0)
    m = len(global_batches)
    keep = m // num_replicas
    per_rank = [list(s) for s in ranks]
    assert [len(b) for b in per_rank] == [keep] * num_replicas
    assert [len(s) for s in ranks] == [keep] * num_replicas
    seen = collections.Counter(i for b in per_rank for batch in b for i in batch)
    assert set(seen.values()) <= {1}
    dropped = {i for batch in global_batches[keep * num_replicas :] for i in batch}
    assert set(seen) == set(range(n)) - dropped


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", MODES)
def test_seed_and_epoch(mode):
    lengths = lognormal_lengths(800, seed=7, max_len=600)

    def run(seed, epoch, shuffle=True):
        s = BucketBatchSampler(lengths, seed=seed, shuffle=shuffle, **mode)
        s.set_epoch(epoch)
        return list(s)

    assert run(1, 3) == run(1, 3)
    assert run(1, 3) != run(1, 4)
    assert run(1, 3) != run(2, 3)
    # batch composition changes between epochs, not only the batch order
    assert sorted(map(tuple, run(1, 0))) != sorted(map(tuple, run(1, 1)))
    # batch order is shuffled: not sorted by length
    first = [lengths[b[0]] for b in run(1, 0)]
    assert first != sorted(first)
    # shuffle=False: the same sorted order in every epoch and for every seed
    assert run(1, 0, False) == run(2, 5, False)
    flat = [lengths[i] for b in run(1, 0, False) for i in b]
    assert flat == sorted(flat)


@pytest.mark.parametrize("lengths_type", [list, tuple, np.asarray, torch.tensor])
def test_lengths_types(lengths_type):
    lengths = lognormal_lengths(300, seed=8).tolist()
    ref = list(BucketBatchSampler(lengths, max_tokens=2048, seed=1))
    assert list(BucketBatchSampler(lengths_type(lengths), max_tokens=2048, seed=1)) == ref
    assert list(BucketBatchSampler(np.asarray(lengths, dtype=np.float32), max_tokens=2048, seed=1)) == ref


# ----------------------------------------------------------------------------- efficiency
@pytest.mark.parametrize("sigma", [1.0, 1.3])
@pytest.mark.parametrize("mode", [{"max_tokens": 16384}, {"batch_size": 32}], ids=["max_tokens", "batch_size"])
def test_padding_efficiency_long_tail(mode, sigma):
    lengths = lognormal_lengths(20_000, seed=9, sigma=sigma)
    s = BucketBatchSampler(lengths, seed=0, **mode)
    for epoch in range(2):
        s.set_epoch(epoch)
        eff = s.padding_efficiency()
        assert eff >= 0.9, eff
        batches = list(s)
        real = sum(int(lengths[b].sum()) for b in batches)
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        assert eff == pytest.approx(real / padded)
        assert s.padding_efficiency(all_ranks=True) == pytest.approx(eff)
    # unsorted random batches, for contrast, are far worse
    perm = np.random.default_rng(0).permutation(len(lengths))
    chunks = np.array_split(perm, len(s))
    naive = lengths.sum() / sum(len(c) * lengths[c].max() for c in chunks)
    assert naive < 0.5


def test_padding_efficiency_per_rank_and_empty_sequences():
    lengths = lognormal_lengths(500, seed=10)
    ranks = samplers(lengths, 3, max_tokens=4096)
    stats = [s.padding_stats() for s in ranks]
    assert sum(st["batches"] for st in stats) >= len(ranks[0].global_items(0))
    for s, st in zip(ranks, stats):
        assert s.padding_efficiency() == pytest.approx(st["tokens"] / st["padded"])
    assert BucketBatchSampler([0, 0, 0], batch_size=2).padding_efficiency() == 1.0


# ----------------------------------------------------------------------------- exact len
def test_len_matches_iteration_many_configs():
    rng = np.random.default_rng(11)
    for n, mode, num_replicas, drop_last, shuffle in itertools.product(
        [1, 3, 64, 257],
        [{"max_tokens": 700}, {"max_tokens": 64}, {"batch_size": 1}, {"batch_size": 10}],
        [1, 2, 3, 5],
        [False, True],
        [False, True],
    ):
        lengths = rng.integers(0, 300, n)
        for rank in range(num_replicas):
            s = BucketBatchSampler(
                lengths, num_replicas=num_replicas, rank=rank, drop_last=drop_last, shuffle=shuffle, seed=n, **mode
            )
            for epoch in (0, 1):
                s.set_epoch(epoch)
                assert len(s) == sum(1 for _ in s), (n, mode, num_replicas, rank, drop_last, shuffle, epoch)


# ----------------------------------------------------------------------------- resumption
@pytest.mark.parametrize("num_replicas", [1, 3])
@pytest.mark.parametrize("mode", [{"max_tokens": 2048}, {"batch_size": 9}], ids=["max_tokens", "batch_size"])
def test_resume_at_every_position(mode, num_replicas):
    lengths = lognormal_lengths(150, seed=12, max_len=1000)
    kw = dict(seed=21, num_replicas=num_replicas, **mode)
    epoch = 2
    for rank in range(num_replicas):
        ref = BucketBatchSampler(lengths, rank=rank, **kw)
        ref.set_epoch(epoch)
        full = list(ref)
        assert len(full) >= 5
        for k in range(len(full) + 1):
            first = BucketBatchSampler(lengths, rank=rank, **kw)
            first.set_epoch(epoch)
            it = iter(first)
            head = [next(it) for _ in range(k)]
            state = json.loads(json.dumps(first.state_dict()))  # plain, serialisable values
            assert state["position"] == k and state["epoch"] == epoch and state["seed"] == 21
            resumed = BucketBatchSampler(lengths, rank=rank, num_replicas=num_replicas, seed=0, **mode)
            resumed.load_state_dict(state)
            resumed.set_epoch(epoch)  # the usual loop calls set_epoch(epoch) again: keeps position
            assert len(resumed) == len(full)
            tail = list(resumed)
            assert head + tail == full and tail == full[k:]
            assert resumed.state_dict()["position"] == 0  # epoch complete
            # the next epoch continues as in the uninterrupted run
            resumed.set_epoch(epoch + 1)
            ref.set_epoch(epoch + 1)
            assert list(resumed) == list(ref)
            ref.set_epoch(epoch)


def test_position_convention():
    s = BucketBatchSampler(lognormal_lengths(200), batch_size=10)
    it = iter(s)
    next(it), next(it)
    assert s.position == 2
    assert len(list(iter(s))) == len(s)  # a fresh iter restarts the epoch
    assert s.position == 0
    it = iter(s)
    next(it)
    s.set_epoch(0)  # same epoch: position kept
    assert s.position == 1
    s.set_epoch(1)  # new epoch: position reset
    assert s.position == 0
    # an older iterator no longer moves the position
    old, new = iter(s), iter(s)
    next(old), next(old), next(new)
    assert s.position == 1


def test_load_state_dict_errors():
    lengths = lognormal_lengths(200)
    state = BucketBatchSampler(lengths, batch_size=10, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="num_replicas"):
        BucketBatchSampler(lengths, batch_size=10, num_replicas=3, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(lengths, batch_size=11, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        BucketBatchSampler(lengths[:-1], batch_size=10, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        BucketBatchSampler(lengths, batch_size=10, num_replicas=2, rank=1).load_state_dict({**state, "position": 99})


# ----------------------------------------------------------------------------- DataLoader
class _Seqs(Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return torch.full((int(self.lengths[i]),), i, dtype=torch.long)


def _pad(items):
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=-1)


def test_dataloader_batch_sampler():
    lengths = lognormal_lengths(300, seed=13, max_len=800)
    sampler = BucketBatchSampler(lengths, max_tokens=2048, seed=4)
    loader = DataLoader(_Seqs(lengths), batch_sampler=sampler, collate_fn=_pad)
    sampler.set_epoch(1)
    expected = list(sampler)
    assert len(loader) == len(expected)
    got = list(loader)
    assert len(got) == len(expected)
    for x, b in zip(got, expected):
        assert x.shape == (len(b), lengths[b].max()) and x.numel() <= 2048
        assert x[:, 0].tolist() == b
    # resume a loader mid-epoch through the sampler's state
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = sampler.state_dict()
    sampler2 = BucketBatchSampler(lengths, max_tokens=2048, seed=4)
    sampler2.load_state_dict(state)
    rest = [x[:, 0].tolist() for x in DataLoader(_Seqs(lengths), batch_sampler=sampler2, collate_fn=_pad)]
    assert rest == expected[3:]


# ----------------------------------------------------------------------------- the base class
class _IndexSampler(ResumableDistributedSampler[int]):
    """DistributedSampler re-expressed on the contract: items are shuffled sample indices."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def global_items(self, epoch):
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33])
@pytest.mark.parametrize("num_replicas", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_contract_matches_distributed_sampler(n, num_replicas, drop_last, shuffle):
    for rank in range(num_replicas):
        kw = dict(num_replicas=num_replicas, rank=rank, drop_last=drop_last, shuffle=shuffle, seed=3)
        ours, theirs = _IndexSampler(n, **kw), DistributedSampler(range(n), **kw)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_replicas_default_from_torch_distributed(monkeypatch):
    s = BucketBatchSampler([1, 2, 3], batch_size=1)
    assert (s.num_replicas, s.rank) == (1, 0)  # not initialized: one process
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 2)
    s = BucketBatchSampler([1, 2, 3], batch_size=1)
    assert (s.num_replicas, s.rank) == (4, 2)
    assert BucketBatchSampler([1, 2, 3], batch_size=1, rank=1).num_replicas == 4
    with pytest.raises(ValueError, match="Invalid rank 5"):
        BucketBatchSampler([1, 2, 3], batch_size=1, rank=5)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({}, ValueError, "exactly one of max_tokens and batch_size"),
        ({"max_tokens": 10, "batch_size": 2}, ValueError, "exactly one of max_tokens and batch_size"),
        ({"max_tokens": 0}, ValueError, "max_tokens must be positive"),
        ({"batch_size": -1}, ValueError, "batch_size must be positive"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"batch_size": 2, "num_replicas": 2, "rank": 2}, ValueError, r"Invalid rank 2.*\[0, 1\]"),
        ({"batch_size": 2, "num_replicas": 2, "rank": -1}, ValueError, "Invalid rank -1"),
        ({"batch_size": 2, "num_replicas": 0, "rank": 0}, ValueError, "num_replicas must be at least 1"),
        ({"batch_size": 2, "seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BucketBatchSampler([3, 1, 2], **kwargs)


@pytest.mark.parametrize(
    "lengths, exc, match",
    [
        ([], ValueError, "empty"),
        (np.zeros((0,), dtype=np.int64), ValueError, "empty"),
        ([3, -1, 2], ValueError, "non-negative.*-1 at index 1"),
        (torch.tensor([1, -2]), ValueError, "non-negative"),
        ([[1, 2], [3, 4]], ValueError, "1-D"),
        ([1.5, 2.0], TypeError, "integers"),
        ([True, False], TypeError, "integers"),
    ],
)
def test_lengths_errors(lengths, exc, match):
    with pytest.raises(exc, match=match):
        BucketBatchSampler(lengths, batch_size=2)


def test_imports_without_compiled_extension():
    """batchops.data needs only torch and numpy: block batchops._C and batchops.ops and import it."""
    out = run_isolated("""
        from batchops.data import BucketBatchSampler
        print(len(BucketBatchSampler([1, 2, 3], batch_size=2)))
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
