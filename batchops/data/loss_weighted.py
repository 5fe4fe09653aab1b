"""Hard-example mining: draw samples with probability that grows with their recent loss."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from batchops._checks import check_int, check_real
from batchops.data.sampler_contract import ResumableDistributedSampler

__all__ = ["LossWeightedSampler"]


def _real(name: str, value: Any) -> float:
    return check_real(f"LossWeightedSampler: {name}", value)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    """A flat NumPy copy of a tensor (any device, grad or not), array, list or scalar."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()  # NumPy has no bfloat16
        value = value.cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"LossWeightedSampler: {name} must be numeric, got dtype object")
    return arr.reshape(-1)


class LossWeightedSampler(ResumableDistributedSampler[int]):
    r"""Index sampler that draws high-loss samples more often (for ``DataLoader(sampler=...)``).

    The sampler keeps a table of the most recent loss of every sample, fed by :meth:`update`.
    Each epoch it draws ``num_draws`` sample indices from

    .. math::

        p_i = \frac{\text{floor}}{N} + (1 - \text{floor}) \frac{s_i}{\sum_j s_j},
        \qquad s_i = \left(\max(\ell_i, 0) + \text{eps}\right)^{1 / \text{temperature}}

    where :math:`\ell_i` is sample ``i``'s loss in the table (``initial_loss`` for a sample
    never updated; by default the largest loss seen, so unseen samples are explored first, and
    the uniform distribution before any update). Hence:

    * every sample has :math:`p_i \ge \text{floor} / N`, so none starves, and the importance
      weights :math:`1 / (N p_i)` are at most ``1 / floor``;
    * ``temperature = 1``: proportional to the loss; larger: flatter (``math.inf``: uniform);
      smaller: sharper (towards only the largest losses);
    * :math:`p_i` increases with :math:`\ell_i` (strictly for ``floor < 1``).

    Draws are made globally (identical on every rank) with ``rng = self.rng(epoch)``: with
    replacement by inverse CDF (``searchsorted`` of ``rng.random()`` in the float64 cumulative
    sum, so ``N`` may exceed the :math:`2^{24}` categories of ``torch.multinomial``), without
    replacement by Efraimidis-Spirakis keys :math:`u_i^{1/p_i}` (the ``num_draws`` largest, in
    decreasing key order, which is successive sampling proportional to :math:`p`). The draws are
    then dealt to the ranks like every batchops sampler
    (:class:`~batchops.data.sampler_contract.ResumableDistributedSampler`).

    **Which losses an epoch uses.** The probabilities of epoch ``E`` are frozen from the loss
    table as it is when the epoch is first planned: at the first ``iter``, ``len``,
    :meth:`importance_weights`, :meth:`probabilities` or ``state_dict`` after ``set_epoch(E)``.
    Updates made during epoch ``E`` change the table used by epoch ``E + 1``, never the draws
    (or weights) of the epoch in progress. ``state_dict`` holds both tables, so a run resumed
    mid-epoch yields exactly the rest of that epoch and the same later epochs, given the same
    updates.

    **Unbiased training.** Plain averaging of the loss over the draws over-weights the hard
    samples. Multiplying each drawn sample's loss by :meth:`importance_weights`,
    :math:`w_i = 1 / (N p_i)`, makes the weighted mean an unbiased estimate of the uniform mean
    loss, :math:`E_{i \sim p}[w_i \ell_i] = \frac{1}{N} \sum_i \ell_i` (Katharopoulos & Fleuret,
    2018). This is exact for draws with replacement; without replacement it is only an
    approximation (the inclusion probabilities are not :math:`k p_i`)::

        sampler = LossWeightedSampler(len(dataset), seed=0)
        # a dataset whose items are (index, x, y), so the loop knows which samples it drew
        loader = DataLoader(indexed_dataset, batch_size=64, sampler=sampler)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for idx, x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                (losses * sampler.importance_weights(idx).to(losses)).mean().backward()
                sampler.update(idx, losses)  # all-gathered across ranks when distributed

    **Distributed.** When ``torch.distributed`` is initialized and ``num_replicas > 1``,
    :meth:`update` all-gathers every rank's ``(indices, losses)``, so all ranks hold the same
    table and make the same draws; every rank must then call ``update`` the same number of
    times (with possibly different or empty batches), like any collective.

    Args:
        num_samples: ``N``, the data set size (an int, or a sized object such as the data set).
        num_draws: indices drawn per epoch over all ranks (default ``N``).
        temperature: > 0, see the formula; ``math.inf`` gives uniform sampling.
        floor: in ``[0, 1]``, the share of probability spread uniformly (``1``: uniform).
        replacement: draw with replacement (default); without it ``num_draws <= N``.
        initial_loss: loss assumed for samples never updated; ``None`` (default) uses the
            largest loss in the table (uniform while the table is empty).
        smoothing: in ``[0, 1)``; ``0`` replaces a sample's loss on each update, otherwise the
            table keeps an exponential moving average ``smoothing * old + (1 - smoothing) * new``.
        eps: > 0 added to the clamped losses, so zero-loss samples keep a chance even with
            ``floor=0``.
        seed, num_replicas, rank, drop_last: the sampler contract; ``drop_last`` cuts the draws
            to a multiple of ``num_replicas`` instead of padding them by repetition.
    """

    def __init__(
        self,
        num_samples: Any,
        num_draws: int | None = None,
        *,
        temperature: float = 1.0,
        floor: float = 0.1,
        replacement: bool = True,
        initial_loss: float | None = None,
        smoothing: float = 0.0,
        eps: float = 1e-8,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(num_samples, numbers.Integral) and hasattr(num_samples, "__len__"):
            num_samples = len(num_samples)
        n = check_int("num_samples", num_samples)
        if n < 1:
            raise ValueError(f"LossWeightedSampler: num_samples must be positive, got {n}")
        draws = n if num_draws is None else check_int("num_draws", num_draws)
        if draws < 0:
            raise ValueError(f"LossWeightedSampler: num_draws must be non-negative, got {draws}")
        self.replacement = bool(replacement)
        if not self.replacement and draws > n:
            raise ValueError(
                f"LossWeightedSampler: num_draws={draws} exceeds num_samples={n}; "
                "drawing without replacement needs num_draws <= num_samples"
            )
        self.temperature = _real("temperature", temperature)
        if not self.temperature > 0:  # also rejects nan
            raise ValueError(f"LossWeightedSampler: temperature must be positive, got {temperature}")
        self.floor = _real("floor", floor)
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"LossWeightedSampler: floor must be in [0, 1], got {floor}")
        self.smoothing = _real("smoothing", smoothing)
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"LossWeightedSampler: smoothing must be in [0, 1), got {smoothing}")
        self.eps = _real("eps", eps)
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"LossWeightedSampler: eps must be positive and finite, got {eps}")
        self.initial_loss = None if initial_loss is None else _real("initial_loss", initial_loss)
        if self.initial_loss is not None and not math.isfinite(self.initial_loss):
            raise ValueError(f"LossWeightedSampler: initial_loss must be finite, got {initial_loss}")
        self.num_samples = n
        self.num_draws = draws
        # Loss table, NaN = never updated. float32 keeps it at 4 bytes a sample.
        self._losses = np.full(n, np.nan, dtype=np.float32)
        # The frozen table of the planned epoch (the same array as _losses until the first update
        # after planning copies _losses: copy-on-write) and its probabilities, computed lazily.
        self._plan_epoch: int | None = None
        self._plan_losses: np.ndarray | None = None
        self._plan_probs: np.ndarray | None = None
        super().__init__(seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    # ------------------------------------------------------------------ probabilities
    def compute_probabilities(self, losses: Any) -> np.ndarray:
        """The formula of the class docstring applied to a loss table (NaN = never updated).

        Returns a float64 NumPy array of ``num_samples`` probabilities summing to 1 (up to
        rounding). Works in log space, so small temperatures do not overflow.
        """
        table = _as_numpy("losses", losses)
        if table.shape != (self.num_samples,):
            raise ValueError(
                f"LossWeightedSampler: losses must have num_samples={self.num_samples} entries, got {table.size}"
            )
        n = self.num_samples
        unseen = np.isnan(table)
        if math.isinf(self.temperature) or self.floor == 1.0 or (self.initial_loss is None and unseen.all()):
            return np.full(n, 1.0 / n)
        x = table.astype(np.float64)  # a copy: the arithmetic below is in place
        if unseen.any():
            x[unseen] = self.initial_loss if self.initial_loss is not None else np.nanmax(table)
        np.maximum(x, 0.0, out=x)
        x += self.eps
        np.log(x, out=x)
        x /= self.temperature  # log s_i
        x -= x.max()  # softmax of log s: s_i / sum_j s_j without overflow
        np.exp(x, out=x)
        x *= (1.0 - self.floor) / x.sum()
        x += self.floor / n
        return x

    def _epoch_probabilities(self) -> np.ndarray:
        """Probabilities of the current epoch's draws; freezes the table on first use."""
        if self._plan_epoch != self.epoch:
            self._plan_epoch = self.epoch
            self._plan_losses = self._losses
            self._plan_probs = None
            # The contract caches draws by (epoch, seed); returning to an earlier epoch number
            # must not reuse draws made from another table.
            self.invalidate()
        if self._plan_probs is None:
            self._plan_probs = self.compute_probabilities(self._plan_losses)
        return self._plan_probs

    def probabilities(self) -> torch.Tensor:
        """The current epoch's sampling distribution: float64 tensor of ``num_samples`` entries."""
        return torch.from_numpy(self._epoch_probabilities().copy())

    @property
    def losses(self) -> torch.Tensor:
        """A copy of the live loss table (float32, NaN for samples never updated)."""
        return torch.from_numpy(self._losses.copy())

    def importance_weights(
        self, indices: Any, *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        """``1 / (N p_i)`` for each index, with the current epoch's probabilities ``p``.

        Multiply the per-sample losses of drawn samples by these weights so that their mean is
        an unbiased estimate of the mean loss under uniform sampling. The result has the shape
        of ``indices``, ``dtype`` (float32 by default) and ``device`` (default: that of
        ``indices`` when it is a tensor, else the CPU).
        """
        if device is None:
            device = indices.device if isinstance(indices, torch.Tensor) else "cpu"
        shape = tuple(indices.shape) if isinstance(indices, (torch.Tensor, np.ndarray)) else None
        idx = self._check_indices(indices)
        weights = 1.0 / (self.num_samples * self._epoch_probabilities()[idx])
        out = torch.from_numpy(weights)
        if shape is not None:
            out = out.reshape(shape)
        return out.to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ updates
    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = _as_numpy("indices", indices)
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            if idx.size == 0:
                return idx.astype(np.int64)  # e.g. an empty Python list
            raise TypeError(f"LossWeightedSampler: indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size:
            bad = (idx < 0) | (idx >= self.num_samples)
            if bad.any():
                value = int(idx[np.argmax(bad)])
                raise IndexError(
                    f"LossWeightedSampler: index {value} is out of bounds for num_samples="
                    f"{self.num_samples} (indices must be in [0, {self.num_samples - 1}])"
                )
        return idx

    def _check_losses(self, losses: Any) -> np.ndarray:
        values = _as_numpy("losses", losses)
        if values.dtype == np.bool_ or not (
            np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
        ):
            if values.size == 0:
                return values.astype(np.float64)
            raise TypeError(f"LossWeightedSampler: losses must be real numbers, got dtype {values.dtype}")
        values = values.astype(np.float64, copy=False)
        finite = np.isfinite(values)
        if not finite.all():
            pos = int(np.argmin(finite))
            raise ValueError(f"LossWeightedSampler: losses must be finite, got {values[pos]} at position {pos}")
        return values

    def _sync(self, idx: np.ndarray, values: np.ndarray, group: Any) -> tuple[np.ndarray, np.ndarray]:
        """All-gather every rank's (indices, losses) in rank order (unequal lengths allowed)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # gloo exchanges CPU tensors, NCCL CUDA tensors
        if "nccl" in str(backend):
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        count = torch.tensor([idx.size], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        if longest == 0:
            return idx, values
        # One float64 message per rank: indices (exact below 2**53) in row 0, losses in row 1,
        # padded to the longest rank's length.
        mine = torch.zeros((2, longest), dtype=torch.float64)
        mine[0, : idx.size] = torch.from_numpy(idx.astype(np.float64))
        mine[1, : idx.size] = torch.from_numpy(values)
        mine = mine.to(device)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        both = torch.cat([g[:, :size] for g, size in zip(gathered, sizes)], dim=1).cpu().numpy()
        return both[0].astype(np.int64), both[1]

    def update(self, indices: Any, losses: Any, *, sync: bool | None = None, group: Any = None) -> None:
        """Record the losses of the samples ``indices`` (tensors, arrays or lists, any device).

        The arguments are flattened and must have the same number of elements. A sample that
        appears several times in one update (over all ranks) gets the mean of its losses.
        The new losses are used from the next epoch on (see the class docstring).

        Args:
            indices: sample indices in ``[0, num_samples)``.
            losses: finite per-sample losses (detached and copied; no gradient flows).
            sync: all-gather the updates of all ranks first; default: when ``torch.distributed``
                is initialized and ``num_replicas > 1``. Then every rank must call ``update``.
            group: the process group of the all-gather (default: the world).

        Raises:
            IndexError: an index is outside ``[0, num_samples)``.
            ValueError: lengths differ, or a loss is NaN or infinite.
            TypeError: non-integer indices or non-numeric losses.
        """
        idx = self._check_indices(indices)
        values = self._check_losses(losses)
        if idx.size != values.size:
            raise ValueError(
                f"LossWeightedSampler: indices and losses must have the same number of elements, "
                f"got {idx.size} and {values.size}"
            )
        if sync is None:
            import torch.distributed as dist

            sync = self.num_replicas > 1 and dist.is_available() and dist.is_initialized()
        if sync:
            idx, values = self._sync(idx, values, group)
        if idx.size == 0:
            return
        # Average duplicates so the result does not depend on the order of the updates.
        unique, inverse = np.unique(idx, return_inverse=True)
        mean = np.bincount(inverse, weights=values) / np.bincount(inverse)
        if self._losses is self._plan_losses:
            self._losses = self._losses.copy()  # the planned epoch keeps its frozen table
        old = self._losses[unique].astype(np.float64)
        if self.smoothing:
            seen = ~np.isnan(old)
            mean[seen] = self.smoothing * old[seen] + (1.0 - self.smoothing) * mean[seen]
        self._losses[unique] = mean

    # ------------------------------------------------------------------ the contract
    def global_items(self, epoch: int) -> list:
        """The ``num_draws`` sample indices of ``epoch`` (identical on all ranks).

        For the current epoch these come from its frozen probabilities; for another epoch
        from the live loss table (what that epoch would draw if planned now).
        """
        if epoch == self.epoch:
            p = self._epoch_probabilities()
        else:
            p = self.compute_probabilities(self._losses)
        rng = self.rng(epoch)
        k = self.num_draws
        if k == 0:
            return []
        if self.replacement:
            cdf = np.cumsum(p)
            # u in [0, total): side="right" never picks a zero-probability entry.
            picks = np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right")
            np.minimum(picks, self.num_samples - 1, out=picks)  # guard the u == total rounding
        else:
            # Efraimidis-Spirakis: the k largest keys log(u) / p_i, in decreasing order.
            with np.errstate(divide="ignore"):
                keys = np.log1p(-rng.random(self.num_samples)) / p
            top = np.argpartition(-keys, k - 1)[:k] if k < self.num_samples else np.arange(k)
            picks = top[np.argsort(-keys[top], kind="stable")]
        return picks.tolist()

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "num_samples": self.num_samples,
            "num_draws": self.num_draws,
            "temperature": self.temperature,
            "floor": self.floor,
            "replacement": self.replacement,
            "initial_loss": self.initial_loss,
            "smoothing": self.smoothing,
            "eps": self.eps,
        }

    def state_dict(self) -> dict[str, Any]:
        """The contract's state plus the loss tables (``torch.save(weights_only=True)``-safe).

        ``"losses"``: the live table; ``"plan_losses"``/``"plan_epoch"``: the table frozen for
        the current epoch's draws (the same tensor when no update happened since). Both are
        float32 tensors with NaN for samples never updated.
        """
        state = super().state_dict()  # plans the current epoch (len), freezing its table
        live = torch.from_numpy(self._losses.copy())
        state["losses"] = live
        state["plan_epoch"] = self._plan_epoch
        state["plan_losses"] = live if self._plan_losses is self._losses else torch.from_numpy(self._plan_losses.copy())
        return state

    def _table(self, state: dict[str, Any], key: str) -> np.ndarray:
        value = state[key]
        table = _as_numpy(key, value).astype(np.float32)
        if table.size != self.num_samples:
            raise ValueError(
                f"LossWeightedSampler.load_state_dict: saved num_samples={table.size} ({key!r}) "
                f"but this sampler has num_samples={self.num_samples}"
            )
        return table

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss tables, epoch, seed and position (see the contract).

        Raises ``ValueError`` when the saved configuration or table size differs.
        """
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"LossWeightedSampler.load_state_dict: saved num_samples={state['num_samples']!r} "
                f"but this sampler has num_samples={self.num_samples}"
            )
        live = self._table(state, "losses")
        plan_epoch = state.get("plan_epoch")
        if plan_epoch is None or state.get("plan_losses") is None:
            plan_epoch, plan = None, None  # no frozen table saved: plan from the live one
        elif state["plan_losses"] is state["losses"]:
            plan = live  # saved as one tensor (no update since planning): keep copy-on-write
        else:
            plan = self._table(state, "plan_losses")
        saved = (self._losses, self._plan_epoch, self._plan_losses, self._plan_probs)
        self._losses = live
        self._plan_epoch, self._plan_losses, self._plan_probs = plan_epoch, plan, None
        self.invalidate()  # the cached plan came from the old tables
        try:
            super().load_state_dict(state)  # len() replans the saved epoch from plan_losses
        except Exception:
            self._losses, self._plan_epoch, self._plan_losses, self._plan_probs = saved
            self.invalidate()
            raise
