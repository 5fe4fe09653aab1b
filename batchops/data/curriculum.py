"""Curriculum learning: sample the easiest samples first, admitting harder ones as training goes on.

:class:`CurriculumSampler` sorts the data set by a per-sample difficulty score and, at training
progress ``t``, draws only from the easiest fraction ``f(t)`` of it. The *pacing function* ``f``
is one of

* ``"linear"``:   ``f(t) = min(1, s0 + (1 - s0) * t / T)``
* ``"root"``:     ``f(t) = min(1, sqrt(s0**2 + (1 - s0**2) * t / T))``  (Platanios et al., 2019,
  "Competence-based curriculum learning for neural machine translation")
* ``"exp_step"``: ``f(t) = min(1, s0 * increase ** floor(t / step_length))``  (Hacohen &
  Weinshall, 2019, "On the power of curriculum learning in training deep networks")
* a callable ``pacing(t) -> fraction`` returning a number in ``(0, 1]``,

with ``s0 = start_fraction`` and ``T`` the pace length (``total_epochs`` / ``total_steps``).
Progress ``t`` is the epoch number (the default) or the optimizer step (when ``batch_size`` is
given); see :class:`CurriculumSampler`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchops._checks import check_int, check_real
from batchops.data.sampler_contract import ResumableDistributedSampler

__all__ = ["CurriculumSampler", "PACING_FUNCTIONS"]

PACING_FUNCTIONS = ("linear", "root", "exp_step")

# A fraction f admits the samples whose difficulty quantile q (see CurriculumSampler) satisfies
# q < f. The pacing formulas are evaluated in floating point, so "0.3" may come out as
# 0.30000000000000004; comparing against f - _TOL keeps such values from admitting one extra sample.
_TOL = 1e-9


def _name(arg: str) -> str:
    return f"CurriculumSampler: {arg}"


def _check_real(arg: str, value: Any) -> float:
    return check_real(_name(arg), value, finite=True)


def _to_numpy(arg: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{_name(arg)} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def _as_difficulty(difficulty: Any) -> np.ndarray:
    arr = _to_numpy("difficulty", difficulty)
    if arr.size == 0:
        raise ValueError(f"{_name('difficulty')} is empty")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{_name('difficulty')} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{_name('difficulty')} must be finite, got {arr[i]} at index {i}")
    return arr


class CurriculumSampler(ResumableDistributedSampler[int]):
    """Index sampler (for ``DataLoader(sampler=)``) that paces samples from easy to hard.

    **Curriculum order.** Samples are ranked by ``difficulty`` (ascending, stable: equal scores
    keep index order). Each sample gets a difficulty quantile ``q = r / N``, where ``r`` is its
    rank and ``N = len(difficulty)``. A fraction ``f`` makes eligible exactly the samples with
    ``q < f``, i.e. the ``ceil(f * N)`` easiest (at least one).

    With ``class_labels`` the rank is taken *within the sample's class*: ``q = r_c / N_c`` for a
    sample of rank ``r_c`` among the ``N_c`` samples of its class. Fraction ``f`` then admits the
    ``ceil(f * N_c)`` easiest samples of every class -- at least one of each, and each class in
    proportion to its size -- even when one class is on the whole harder than another. Ties in
    ``q`` between classes go to the globally easier sample. Either way the eligible set at any
    ``f`` is a prefix of the curriculum order (samples sorted by ``q``), and it only grows with
    ``f``.

    **Pacing.** ``f = fraction(t)`` (module docstring for the formulas), evaluated at progress
    ``t`` (clamped at 0):

    * *per epoch* (``batch_size=None``, the default): ``t`` is the epoch given to
      :meth:`set_epoch`; ``T = total_epochs``. The epoch is the eligible set at ``f(epoch)``,
      shuffled with :meth:`rng` ``(epoch)``; ``len(sampler)`` therefore grows as the curriculum
      advances (``DataLoader`` reads it every epoch). With ``num_samples_per_epoch=S`` the epoch
      has ``S`` samples instead: passes of fresh permutations of the eligible set, cut to ``S``.
    * *per step* (``batch_size=B``): ``t`` is the global optimizer step. An epoch has ``S``
      samples (``num_samples_per_epoch``, default ``N``) grouped into ``K = ceil(S / (R * B))``
      global batches of ``R * B`` samples (``R = num_replicas``; the last may be shorter), and
      global batch ``k`` of epoch ``e`` is step ``t = e * K + k``. Its samples are drawn
      uniformly without replacement from the eligible set at ``f(t)`` (in passes when the set is
      smaller than the batch), as in Hacohen & Weinshall. Round-robin sharding gives rank ``r``
      exactly its ``B`` samples of every global batch, so batch ``k`` of a
      ``DataLoader(batch_size=B)`` on every rank belongs to step ``e * K + k``. ``T`` is
      ``total_steps``, or ``total_epochs * K``. There is no ``step()`` method: the step is
      derived from the epoch and the position in it, so it is exact under DataLoader prefetching
      and restored by :meth:`load_state_dict` with nothing extra in the state.

    ``exp_step``'s ``step_length`` counts the same unit as ``t`` (epochs or steps).

    With ``shuffle=False`` samples come in curriculum order instead of shuffled (per epoch: the
    eligible set easiest first, cycled up to ``S``; per step: a cursor that walks the eligible
    set cyclically across the epoch's batches).

    Sharding, ``drop_last``, ``len`` and resumption follow
    :class:`~batchops.data.sampler_contract.ResumableDistributedSampler`; every epoch depends
    only on the arguments, ``seed`` and the epoch, so resumption is exact in both modes.

    Args:
        difficulty: finite real score per sample (list, 1-D ndarray or tensor); lower is easier.
        pacing: ``"linear"``, ``"root"``, ``"exp_step"`` or a deterministic callable
            ``progress -> fraction in (0, 1]`` (it must give the same value on every rank and
            after a restart; it is called with an int).
        start_fraction: ``s0`` in ``(0, 1]``, the fraction eligible at ``t = 0``.
        total_epochs: pace length ``T`` in epochs (``linear`` / ``root``).
        total_steps: pace length ``T`` in steps; needs ``batch_size``.
        increase: ``exp_step`` growth factor, ``> 1``.
        step_length: ``exp_step`` plateau length, in epochs or steps.
        class_labels: optional label per sample (ints or strings); enables class balance.
        num_samples_per_epoch: samples per epoch (all ranks together); see above.
        batch_size: per-rank batch size of the DataLoader; switches to per-step pacing.
        shuffle, seed, num_replicas, rank, drop_last: the sampler contract.
    """

    def __init__(
        self,
        difficulty: Any,
        pacing: str | Callable[[int], float] = "linear",
        *,
        start_fraction: float = 0.1,
        total_epochs: int | None = None,
        total_steps: int | None = None,
        increase: float = 2.0,
        step_length: int | None = None,
        class_labels: Any = None,
        num_samples_per_epoch: int | None = None,
        batch_size: int | None = None,
        # The sampler contract's keywords, restated in every sampler so that its signature shows them.
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.difficulty = _as_difficulty(difficulty)
        n = len(self.difficulty)

        if callable(pacing):
            self.pacing: str | Callable[[int], float] = pacing
        elif isinstance(pacing, str):
            if pacing not in PACING_FUNCTIONS:
                raise ValueError(
                    f"{_name('pacing')} must be one of {', '.join(map(repr, PACING_FUNCTIONS))} "
                    f"or a callable, got {pacing!r}"
                )
            self.pacing = pacing
        else:
            raise TypeError(f"{_name('pacing')} must be a str or a callable, got {type(pacing).__name__}")

        self.start_fraction = _check_real("start_fraction", start_fraction)
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"{_name('start_fraction')} must be in (0, 1], got {start_fraction}")
        self.increase = _check_real("increase", increase)
        if self.increase <= 1.0:
            raise ValueError(f"{_name('increase')} must be greater than 1, got {increase}")
        self.step_length = None if step_length is None else check_int(_name("step_length"), step_length, 1)
        self.total_epochs = None if total_epochs is None else check_int(_name("total_epochs"), total_epochs, 1)
        self.total_steps = None if total_steps is None else check_int(_name("total_steps"), total_steps, 1)
        self.batch_size = None if batch_size is None else check_int(_name("batch_size"), batch_size, 1)
        self.num_samples_per_epoch = (
            None
            if num_samples_per_epoch is None
            else check_int(_name("num_samples_per_epoch"), num_samples_per_epoch, 1)
        )
        if self.total_epochs is not None and self.total_steps is not None:
            raise ValueError(f"{_name('total_epochs')} and total_steps are exclusive; give one")
        if self.total_steps is not None and self.batch_size is None:
            raise ValueError(
                f"{_name('total_steps')} needs batch_size (per-step pacing); use total_epochs for per-epoch pacing"
            )
        if self.pacing in ("linear", "root") and self.total_epochs is None and self.total_steps is None:
            raise ValueError(
                f"{_name('pacing')}={self.pacing!r} needs a pace length: total_epochs (or total_steps with batch_size)"
            )
        if self.pacing == "exp_step" and self.step_length is None:
            raise ValueError(f"{_name('pacing')}='exp_step' needs step_length")
        if self.pacing != "exp_step" and self.step_length is not None:
            raise ValueError(f"{_name('step_length')} applies only to pacing='exp_step'")

        # The curriculum order and each sample's difficulty quantile, sorted ascending.
        rank_of = np.empty(n, dtype=np.int64)
        by_difficulty = np.argsort(self.difficulty, kind="stable")
        rank_of[by_difficulty] = np.arange(n)
        if class_labels is None:
            self.class_labels: np.ndarray | None = None
            self.num_classes = 1
            quantile = rank_of / n
        else:
            labels = _to_numpy("class_labels", class_labels)
            if len(labels) != n:
                raise ValueError(f"{_name('class_labels')} has {len(labels)} entries but difficulty has {n}")
            try:
                classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
            except TypeError as exc:  # unorderable mixed labels
                raise TypeError(f"{_name('class_labels')} must be sortable labels: {exc}") from None
            self.class_labels = labels
            self.num_classes = len(classes)
            inverse = inverse.reshape(-1)
            # rank within class: order samples by (class, global rank) and count from each start
            by_class = np.lexsort((rank_of, inverse))
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            within = np.empty(n, dtype=np.int64)
            within[by_class] = np.arange(n) - np.repeat(starts, counts)
            quantile = within / counts[inverse]
        self._order = np.lexsort((rank_of, quantile))  # ties in q: globally easier first
        self._quantile = quantile[self._order]
        # checked on load_state_dict: same difficulty ranking and class assignment
        digest = hashlib.sha1(self._order.tobytes())
        if class_labels is not None:
            digest.update(inverse.astype(np.int64).tobytes())
        self._digest = digest.hexdigest()[:16]

        super().__init__(shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    # ------------------------------------------------------------------ pacing
    @property
    def pace_unit(self) -> str:
        """``"step"`` when ``batch_size`` was given, else ``"epoch"``."""
        return "epoch" if self.batch_size is None else "step"

    @property
    def epoch_size(self) -> int:
        """Global samples in an epoch before sharding (per-epoch pacing: of a full epoch, f=1)."""
        return self.num_samples_per_epoch or len(self.difficulty)

    @property
    def steps_per_epoch(self) -> int:
        """``K = ceil(S / (num_replicas * batch_size))`` global batches per epoch (per-step pacing)."""
        if self.batch_size is None:
            raise ValueError(f"{_name('steps_per_epoch')} is defined only with batch_size (per-step pacing)")
        return math.ceil(self.epoch_size / (self.num_replicas * self.batch_size))

    def _pace_length(self) -> int | None:
        if self.total_steps is not None:
            return self.total_steps
        if self.total_epochs is not None and self.batch_size is not None:
            return self.total_epochs * self.steps_per_epoch
        return self.total_epochs

    def fraction(self, progress: int) -> float:
        """The pacing function: fraction of samples eligible at ``progress`` (epoch or step)."""
        t = max(int(progress), 0)
        s0 = self.start_fraction
        if callable(self.pacing):
            f = self.pacing(t)
            if isinstance(f, torch.Tensor) and f.numel() == 1:
                f = f.item()
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) <= 1.0:
                raise ValueError(f"{_name('pacing')}({t}) must return a number in (0, 1], got {f!r}")
            return float(f)
        if self.pacing == "exp_step":
            # exponent capped: once s0 * increase**k >= 1 more growth changes nothing
            k = min(t // self.step_length, math.ceil(-math.log(s0) / math.log(self.increase)) + 1)
            return min(1.0, s0 * self.increase**k)
        T = self._pace_length()
        if self.pacing == "linear":
            return min(1.0, s0 + (1.0 - s0) * t / T)
        return min(1.0, math.sqrt(s0 * s0 + (1.0 - s0 * s0) * t / T))  # root

    def num_eligible(self, progress: int) -> int:
        """Number of eligible samples at ``progress``: those with quantile ``q < fraction``."""
        f = self.fraction(progress)
        return max(int(np.searchsorted(self._quantile, f - min(_TOL, f / 2), side="left")), 1)

    def eligible_indices(self, progress: int) -> list[int]:
        """The eligible samples at ``progress``, in curriculum order (easiest first)."""
        return self._order[: self.num_eligible(progress)].tolist()

    # ------------------------------------------------------------------ the plan
    @staticmethod
    def _passes(rng: np.random.Generator | None, n: int, count: int) -> np.ndarray:
        """``count`` positions in ``[0, n)``: fresh permutations (identity without rng), cut."""
        parts, need = [], count
        while need > 0:
            take = min(need, n)
            if rng is None:
                parts.append(np.arange(take))
            elif take < n:
                parts.append(rng.choice(n, size=take, replace=False))
            else:
                parts.append(rng.permutation(n))
            need -= take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def global_items(self, epoch: int) -> list[int]:
        """Sample indices of ``epoch`` in global order (identical on all ranks)."""
        rng = self.rng(epoch) if self.shuffle else None
        if self.batch_size is None:
            n = self.num_eligible(epoch)
            positions = self._passes(rng, n, self.num_samples_per_epoch or n)
            return self._order[positions].tolist()
        size, k_steps = self.num_replicas * self.batch_size, self.steps_per_epoch
        total, cursor, out = self.epoch_size, 0, []
        for k in range(k_steps):
            n = self.num_eligible(epoch * k_steps + k)
            count = min(size, total - k * size)
            if rng is None:
                positions = (cursor + np.arange(count)) % n
                cursor = (cursor + count) % n
            else:
                positions = self._passes(rng, n, count)
            out.append(self._order[positions])
        return np.concatenate(out).tolist()

    def _config(self) -> dict[str, Any]:
        pacing = (
            self.pacing
            if isinstance(self.pacing, str)
            else getattr(self.pacing, "__qualname__", type(self.pacing).__name__)
        )
        return {
            **super()._config(),
            "num_samples": int(len(self.difficulty)),
            "curriculum_digest": self._digest,
            "pacing": pacing,
            "start_fraction": self.start_fraction,
            "total_epochs": self.total_epochs,
            "total_steps": self.total_steps,
            "increase": self.increase,
            "step_length": self.step_length,
            "num_samples_per_epoch": self.num_samples_per_epoch,
            "batch_size": self.batch_size,
        }
