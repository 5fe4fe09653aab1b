"""Length-bucketed batching: batches of similar lengths, so little of each batch is padding."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchops.data.sampler_contract import ResumableDistributedSampler

__all__ = ["BucketBatchSampler"]


def _as_lengths(lengths: Any) -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"BucketBatchSampler: lengths must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("BucketBatchSampler: lengths is empty")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or (np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0))
    ):
        raise TypeError(f"BucketBatchSampler: lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(
            f"BucketBatchSampler: lengths must be non-negative, got {int(arr.min())} at index {int(arr.argmin())}"
        )
    return arr


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"BucketBatchSampler: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"BucketBatchSampler: {name} must be positive, got {value}")
    return int(value)


class BucketBatchSampler(ResumableDistributedSampler[list[int]]):
    """Batch sampler that groups sequences of similar length (for ``DataLoader(batch_sampler=)``).

    Each epoch (``rng = default_rng((seed, epoch))``):

    1. shuffle all indices; cut the shuffled list into *mega-buckets* of about
       ``batches_per_bucket`` batches each (``batches_per_bucket * batch_size`` samples, or
       samples totalling ``batches_per_bucket * max_tokens`` tokens);
    2. sort each mega-bucket by length (stable, so ties stay in random order) and cut it into
       batches in that order: ``batch_size`` rows each, or greedily as many rows as keep
       ``rows * max(lengths in batch) <= max_tokens`` (a sequence longer than ``max_tokens`` forms
       a batch of its own; length 0 counts as 1 in this budget);
    3. shuffle the order of all batches, then deal them to ranks (see
       :class:`~batchops.data.sampler_contract.ResumableDistributedSampler`: round-robin, padded
       by repeating batches from the start, or cut with ``drop_last``).

    Which samples share a mega-bucket changes each epoch, so batches differ between epochs yet
    stay length-homogeneous. With ``shuffle=False`` the whole data set is one bucket sorted by
    (length, index) and batches come out in that order, shortest first.

    Args:
        lengths: non-negative int length of every sample (list, 1-D ndarray or tensor).
        max_tokens: padded-token budget per batch; exclusive with ``batch_size``.
        batch_size: rows per batch (the last batch of the epoch may be smaller).
        shuffle, seed, num_replicas, rank, drop_last: the sampler contract; ``drop_last`` drops
            the tail batches that would not divide evenly among ranks.
        batches_per_bucket: mega-bucket size in batches (larger: less padding, less randomness).
    """

    def __init__(
        self,
        lengths: Any,
        *,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        # The sampler contract's keywords, restated in every sampler so that its signature shows them.
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        batches_per_bucket: int = 64,
    ) -> None:
        if (max_tokens is None) == (batch_size is None):
            raise ValueError(
                "BucketBatchSampler: exactly one of max_tokens and batch_size must be given, "
                f"got max_tokens={max_tokens!r}, batch_size={batch_size!r}"
            )
        self.max_tokens = None if max_tokens is None else _positive("max_tokens", max_tokens)
        self.batch_size = None if batch_size is None else _positive("batch_size", batch_size)
        self.batches_per_bucket = _positive("batches_per_bucket", batches_per_bucket)
        self.lengths = _as_lengths(lengths)
        super().__init__(shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    # ------------------------------------------------------------------ the plan
    def _split(self, order: np.ndarray) -> list[np.ndarray]:
        """Cut ``order`` (indices sorted by length) into consecutive batches."""
        if self.batch_size is not None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        eff = np.maximum(self.lengths[order], 1)
        cap = self.max_tokens // eff  # rows allowed when the batch's longest is eff[j]
        # A batch [s, e) fits iff e - s <= cap[e - 1]; g(e) = e - cap[e - 1] increases with e
        # (lengths ascend, so cap descends), hence the greedy end is the last e with g(e) <= s.
        g = np.arange(1, len(order) + 1) - cap
        out, s, n = [], 0, len(order)
        while s < n:
            e = max(int(np.searchsorted(g, s, side="right")), s + 1)
            out.append(order[s:e])
            s = e
        return out

    def _buckets(self, perm: np.ndarray) -> list[np.ndarray]:
        """Cut the shuffled indices into mega-buckets; a remainder under half a bucket joins
        the bucket before it."""
        if self.batch_size is not None:
            size = np.ones(len(perm), dtype=np.int64)  # measured in samples
            budget = self.batch_size * self.batches_per_bucket
        else:
            size = np.maximum(self.lengths[perm], 1)  # measured in tokens
            budget = self.max_tokens * self.batches_per_bucket
        csum = np.cumsum(size)
        total = int(csum[-1])
        bounds = np.arange(budget, total, budget)
        if len(bounds) and total - bounds[-1] < budget // 2:
            bounds = bounds[:-1]
        cuts = np.searchsorted(csum, bounds, side="right")
        return [b for b in np.split(perm, cuts) if len(b)]

    def global_items(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in global order (identical on all ranks)."""
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return [b.tolist() for b in self._split(order)]
        rng = self.rng(epoch)
        batches: list[np.ndarray] = []
        for bucket in self._buckets(rng.permutation(len(self.lengths))):
            batches += self._split(bucket[np.argsort(self.lengths[bucket], kind="stable")])
        return [batches[i].tolist() for i in rng.permutation(len(batches))]

    def _output(self, item: list[int]) -> list[int]:
        return list(item)  # a copy, so a consumer cannot alter the cached plan

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "max_tokens": self.max_tokens,
            "batch_size": self.batch_size,
            "batches_per_bucket": self.batches_per_bucket,
            "num_samples": int(len(self.lengths)),
        }

    # ------------------------------------------------------------------ reporting
    def padding_stats(self, all_ranks: bool = False) -> dict[str, int]:
        """``{"tokens", "padded", "batches"}`` summed over the current epoch's batches.

        ``tokens = sum(lengths)``, ``padded = sum(rows * max length)`` per batch. By default over
        this rank's batches (repeats included); ``all_ranks=True``: every global batch once.
        """
        items: Sequence[list[int]] = self.global_items(self.epoch) if all_ranks else self.rank_items()
        if not items:
            return {"tokens": 0, "padded": 0, "batches": 0}
        sizes = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        flat = self.lengths[np.fromiter((i for b in items for i in b), dtype=np.int64)]
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        tokens = int(flat.sum())
        padded = int((np.maximum.reduceat(flat, starts) * sizes).sum())
        return {"tokens": tokens, "padded": padded, "batches": len(items)}

    def padding_efficiency(self, all_ranks: bool = False) -> float:
        """``sum(real tokens) / sum(rows * longest length)`` over the current epoch's batches.

        This rank's batches by default, every global batch once with ``all_ranks=True``;
        1.0 when there are no padded slots.
        """
        stats = self.padding_stats(all_ranks)
        return stats["tokens"] / stats["padded"] if stats["padded"] else 1.0
