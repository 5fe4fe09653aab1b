"""The contract every batchops sampler follows, implemented once.

:class:`ResumableDistributedSampler` is the base class. A subclass only says which items one
epoch contains, in global order, by overriding :meth:`~ResumableDistributedSampler.global_items`
(items are sample indices for an index sampler, lists of indices for a batch sampler). The base
class does the rest, the same way for every sampler:

* **Seed and epoch.** ``global_items(epoch)`` must depend only on the sampler's configuration,
  ``seed`` and ``epoch``; :meth:`rng` gives the NumPy generator seeded from ``(seed, epoch)``.
  Call :meth:`set_epoch` at the start of every epoch, as with
  :class:`torch.utils.data.distributed.DistributedSampler`.
* **Sharding.** ``M`` global items are dealt to ``R = num_replicas`` ranks round-robin, rank
  ``r`` taking items ``r, r + R, r + 2R, ...``. Without ``drop_last`` the list is first padded
  to ``ceil(M / R) * R`` items by repeating items from its start; with ``drop_last`` it is cut to
  ``floor(M / R) * R`` items. Every rank therefore yields the same number of items, the shards
  are disjoint when ``R`` divides ``M``, and without ``drop_last`` every item appears on some rank.
  This is exactly what ``DistributedSampler`` does to sample indices.
* **Exact length.** ``len(sampler)`` is the number of items this rank yields in the current
  epoch; the epoch's shard is computed once and cached, so ``len`` and ``iter`` agree.
* **Exact resumption.** ``state_dict()["position"]`` is the number of items the live iterator
  has handed out in the current epoch. A sampler built with the same arguments that loads this
  state yields, on its next ``iter``, exactly the rest of the uninterrupted epoch. All ranks hold
  the same position, so one rank's state is enough to resume every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
from torch.utils.data import Sampler

from batchops._checks import check_int

__all__ = ["ResumableDistributedSampler", "resolve_replicas"]

T = TypeVar("T")


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Return ``(num_replicas, rank)``, filling ``None`` from :mod:`torch.distributed`.

    A ``None`` argument takes the default process group's world size / rank when
    ``torch.distributed`` is available and initialized, and ``1`` / ``0`` otherwise (a single
    process). Raises ``ValueError`` if ``num_replicas < 1`` or ``rank`` is outside
    ``[0, num_replicas - 1]`` (torch's DistributedSampler message).
    """
    if num_replicas is None or rank is None:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
    num_replicas = check_int("num_replicas", num_replicas)
    rank = check_int("rank", rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if rank >= num_replicas or rank < 0:
        raise ValueError(f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]")
    return num_replicas, rank


class ResumableDistributedSampler(Sampler[T], Generic[T]):
    """Base class: seeded, epoch-aware, rank-sharded, exactly resumable sampler.

    Subclasses override :meth:`global_items` (and, if they have configuration that must match
    on resume, :meth:`_config`). See the module docstring for the contract.

    Args:
        shuffle: passed on to subclasses; stored in the state for checking.
        seed: base seed; each epoch draws from ``numpy.random.default_rng((seed, epoch))``.
        num_replicas, rank: see :func:`resolve_replicas`.
        drop_last: cut the global item list to a multiple of ``num_replicas`` instead of
            padding it by repetition.

    Position convention: the position counts items yielded by the most recent iterator in the
    current epoch. It returns to 0 when that iterator is exhausted (the epoch is complete) and
    when :meth:`set_epoch` changes the epoch; ``set_epoch`` with the current epoch keeps it, so
    the usual ``for epoch in range(start, E): sampler.set_epoch(epoch)`` loop resumes correctly.
    A fresh ``iter`` starts at 0 unless :meth:`load_state_dict` was called since the last one.
    With a multi-worker DataLoader the sampler runs ahead of the consumer by the prefetched
    batches; to resume exactly there, store the number of batches actually consumed as
    ``state["position"]``.
    """

    def __init__(
        self,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._position = 0
        self._resume_from: int | None = None
        self._iter_token = 0
        self._cache_key: tuple[int, int] | None = None
        self._cache: list[T] = []

    # ----------------------------------------------------------------- subclass hooks
    def global_items(self, epoch: int) -> Sequence[T]:
        """All items of ``epoch`` in global order, identical on every rank (override this)."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """Configuration that must match for a state to be loaded (extend in subclasses)."""
        return {"num_replicas": self.num_replicas, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def _output(self, item: T) -> T:
        """What ``__iter__`` yields for a stored item (e.g. a fresh copy)."""
        return item

    def invalidate(self) -> None:
        """Drop the cached epoch plan; call when state that ``global_items`` reads changes."""
        self._cache_key = None
        self._cache = []

    # ----------------------------------------------------------------- seed and epoch
    def rng(self, epoch: int | None = None) -> np.random.Generator:
        """``numpy.random.default_rng`` seeded by ``(seed, epoch)`` (current epoch by default)."""
        epoch = self.epoch if epoch is None else epoch
        mask = (1 << 64) - 1
        return np.random.default_rng(np.random.SeedSequence([self.seed & mask, epoch & mask]))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; changing it resets the position to 0 (same epoch: kept)."""
        epoch = check_int("epoch", epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0
            self._resume_from = None

    # ----------------------------------------------------------------- sharding
    @staticmethod
    def shard(items: Sequence[T], num_replicas: int, rank: int, drop_last: bool) -> list[T]:
        """This rank's items: pad by repetition (or cut with drop_last), then ``[rank::R]``."""
        items = list(items)
        m = len(items)
        if m == 0:
            return []
        if drop_last:
            total = (m // num_replicas) * num_replicas
            items = items[:total]
        else:
            total = math.ceil(m / num_replicas) * num_replicas
            pad = total - m
            if pad:
                items += (items * math.ceil(pad / m))[:pad]
        return items[rank:total:num_replicas]

    def rank_items(self) -> list[T]:
        """This rank's items for the current epoch (cached; do not mutate)."""
        key = (self.epoch, self.seed)
        if self._cache_key != key:
            self._cache = self.shard(self.global_items(self.epoch), self.num_replicas, self.rank, self.drop_last)
            self._cache_key = key
        return self._cache

    def __len__(self) -> int:
        """Number of items this rank yields in a full pass over the current epoch."""
        return len(self.rank_items())

    # ----------------------------------------------------------------- iteration
    @property
    def position(self) -> int:
        """Items handed out so far in the current epoch by the live iterator."""
        return self._position

    def __iter__(self) -> Iterator[T]:
        items = self.rank_items()
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._position = start
        self._iter_token += 1
        return self._generate(items, start, self._iter_token)

    def _generate(self, items: list[T], start: int, token: int) -> Iterator[T]:
        for i in range(start, len(items)):
            if token == self._iter_token:  # only the newest iterator moves the position
                self._position = i + 1
            yield self._output(items[i])
        if token == self._iter_token:
            self._position = 0  # epoch complete

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "seed", "position", "length", **config}``; plain Python values."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "position": self._position,
            "length": len(self),
            **self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch, seed and position; the next ``iter`` yields the rest of that epoch.

        Raises ``ValueError`` if the saved configuration (``num_replicas``, ``drop_last``,
        ``shuffle``, subclass settings) or the epoch's length differs from this sampler's.
        """
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: saved {key}={state[key]!r} "
                    f"but this sampler has {key}={value!r}"
                )
        self.epoch = check_int("epoch", state["epoch"])
        self.seed = check_int("seed", state["seed"])
        position = check_int("position", state["position"])
        length = len(self)
        if "length" in state and state["length"] != length:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: saved epoch has {state['length']} items "
                f"per rank but this sampler computes {length} (different data or settings?)"
            )
        if not 0 <= position <= length:
            raise ValueError(f"{type(self).__name__}.load_state_dict: position {position} outside [0, {length}]")
        self._position = position
        self._resume_from = position
