"""Shard any sampler across ranks the way :class:`~torch.utils.data.distributed.DistributedSampler`
shards a data set, with per-epoch seeding and exact mid-epoch resumption."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch.utils.data.distributed import DistributedSampler

from batchops.data.sampler_contract import ResumableDistributedSampler

__all__ = ["DistributedSamplerWrapper"]

T = TypeVar("T")

# BatchSampler keeps its index sampler in .sampler; follow at most this many levels of nesting.
_MAX_DEPTH = 8


def _chain(sampler: Any) -> list[Any]:
    """``sampler``, ``sampler.sampler``, ``sampler.sampler.sampler``, ... (each object once)."""
    out, seen = [], set()
    while sampler is not None and id(sampler) not in seen and len(out) < _MAX_DEPTH:
        out.append(sampler)
        seen.add(id(sampler))
        sampler = getattr(sampler, "sampler", None)
    return out


class DistributedSamplerWrapper(ResumableDistributedSampler[T]):
    """Shards any sampler -- index or batch sampler -- across ranks, like ``DistributedSampler``.

    Each epoch the wrapper iterates the wrapped sampler once to get the global item list (sample
    indices, or index lists for a batch sampler such as :class:`torch.utils.data.BatchSampler`)
    and deals it to ranks as
    :class:`~batchops.data.sampler_contract.ResumableDistributedSampler` does: round-robin,
    padded by repeating items from the start or cut with ``drop_last``. Use it with
    ``DataLoader(sampler=wrapper)`` for an index sampler and ``DataLoader(batch_sampler=wrapper)``
    for a batch sampler; call :meth:`set_epoch` every epoch. The wrapper adds no shuffling of its
    own (``shuffle`` is always ``False``): the order is the wrapped sampler's.

    **Keeping ranks in agreement.** Every rank must see the same global list, so before iterating
    the wrapped sampler for epoch ``e`` the wrapper, on the wrapped sampler and on every sampler
    nested in it through a ``.sampler`` attribute (as in ``BatchSampler``):

    * calls ``set_epoch(e)`` where there is one, and
    * when ``reseed=True`` (default), replaces a ``generator`` attribute (``None`` or a
      :class:`torch.Generator`, as on ``RandomSampler``, ``WeightedRandomSampler`` and
      ``SubsetRandomSampler``) with a new CPU ``torch.Generator`` seeded from ``(seed, e)``.
      Any generator the user passed is overwritten.

    What is required of the wrapped sampler: its iteration order must be a function of its
    constructor arguments, of the epoch given to ``set_epoch`` and of that ``generator`` only,
    and it must be finite. Samplers that draw from torch's or NumPy's *global* random state
    without a ``generator`` attribute give every rank a different list unless all ranks seed that
    state identically each epoch; samplers that depend on data a rank loaded differently disagree
    too. The same requirement makes :meth:`load_state_dict` exact: a wrapper built around an
    equally constructed sampler recomputes the same epoch. The wrapped sampler must not itself be
    sharded: a ``DistributedSampler`` or contract sampler with ``num_replicas > 1`` would shard
    twice and is rejected (with ``num_replicas=1`` they are fine and receive ``set_epoch``).

    The epoch's list is computed once and cached, so changes to the wrapped sampler (new
    ``WeightedRandomSampler.weights``, say) take effect at the next :meth:`set_epoch` to a new
    epoch, or at once after :meth:`invalidate`. For exact resumption, restore such state before
    :meth:`load_state_dict`.

    Args:
        sampler: the sampler (any finite iterable) to shard.
        num_replicas, rank, drop_last: the sampler contract.
        seed: seeds the per-epoch generators; must be the same on every rank.
        reseed: install seeded generators (see above); ``False`` leaves ``generator`` alone.
    """

    def __init__(
        self,
        sampler: Iterable[T],
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        reseed: bool = True,
    ) -> None:
        if not hasattr(sampler, "__iter__"):
            raise TypeError(
                f"DistributedSamplerWrapper: sampler must be an iterable sampler, got {type(sampler).__name__}"
            )
        for level in _chain(sampler):
            sharded = isinstance(level, (DistributedSampler, ResumableDistributedSampler))
            if sharded and level.num_replicas > 1:
                raise ValueError(
                    f"DistributedSamplerWrapper: sampler is already sharded "
                    f"({type(level).__name__} with num_replicas={level.num_replicas}); "
                    "wrap an unsharded sampler"
                )
        self.sampler = sampler
        self.reseed = bool(reseed)
        super().__init__(shuffle=False, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    def _prepare(self, epoch: int) -> None:
        """Forward the epoch and, with ``reseed``, install ``(seed, epoch)`` generators."""
        # One seed for the whole chain, drawn from the contract's (seed, epoch) stream.
        torch_seed = int(self.rng(epoch).integers(0, 2**63 - 1))
        for level in _chain(self.sampler):
            set_epoch = getattr(level, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            if self.reseed and hasattr(level, "generator"):
                current = level.generator
                if current is None or isinstance(current, torch.Generator):
                    g = torch.Generator()
                    g.manual_seed(torch_seed)
                    level.generator = g

    def global_items(self, epoch: int) -> list[T]:
        """Everything the wrapped sampler yields for ``epoch`` (identical on all ranks)."""
        self._prepare(epoch)
        return list(iter(self.sampler))

    def _output(self, item: T) -> T:
        # batch samplers yield lists: hand out copies so a consumer cannot alter the cached plan
        return list(item) if isinstance(item, list) else item  # type: ignore[return-value]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "sampler": type(self.sampler).__name__}
