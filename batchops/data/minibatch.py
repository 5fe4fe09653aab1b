"""Plain shuffled mini-batches, and a NumPy mini-batch gradient-descent reference.

* :class:`ShuffledBatchSampler` -- ``BatchSampler(RandomSampler(...))`` on the shared sampler
  contract: seeded per epoch, sharded across ranks, exactly resumable.
* :func:`minibatches` -- the same batches as tuples of slices of arrays or tensors.
* :func:`minibatch_gd_linear_regression` -- least squares by mini-batch gradient descent in pure
  NumPy, a teaching example and a baseline for convergence studies.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from batchops._checks import check_int
from batchops.data.sampler_contract import ResumableDistributedSampler

__all__ = ["ShuffledBatchSampler", "minibatches", "minibatch_gd_linear_regression"]


class ShuffledBatchSampler(ResumableDistributedSampler[list[int]]):
    """Batch sampler of plain shuffled mini-batches (for ``DataLoader(batch_sampler=)``).

    Each epoch the indices ``0 .. n-1`` are permuted with :meth:`rng` ``(epoch)`` (kept in order
    with ``shuffle=False``) and cut into consecutive batches of ``batch_size`` -- what
    ``BatchSampler(RandomSampler(range(n)), batch_size, drop_last)`` does, but seeded by
    ``(seed, epoch)``. Batches are then dealt to ranks round-robin
    (:class:`~batchops.data.sampler_contract.ResumableDistributedSampler`), so each rank's
    batches hold ``batch_size`` samples and a step's global batch is ``num_replicas *
    batch_size``.

    ``drop_last`` does both things its name means in torch: it drops the final batch when it is
    smaller than ``batch_size`` (``BatchSampler``) and then the batches that would not divide
    evenly among ranks (``DistributedSampler``). Without it the last batch may be short and the
    batch list is padded by repeating batches from its start until every rank has as many.

    Args:
        n: number of samples (``len(dataset)``), ``>= 0``.
        batch_size: samples per batch, ``>= 1``.
        shuffle, seed, num_replicas, rank, drop_last: the sampler contract (see above).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.n = check_int("ShuffledBatchSampler: n", n, 0)
        self.batch_size = check_int("ShuffledBatchSampler: batch_size", batch_size, 1)
        super().__init__(shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    def global_items(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in global order (identical on all ranks)."""
        order = self.rng(epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        stop = (self.n // self.batch_size) * self.batch_size if self.drop_last else self.n
        return [order[i : min(i + self.batch_size, stop)].tolist() for i in range(0, stop, self.batch_size)]

    def _output(self, item: list[int]) -> list[int]:
        return list(item)  # a copy, so a consumer cannot alter the cached plan

    def _config(self):
        return {**super()._config(), "n": self.n, "batch_size": self.batch_size}


def minibatches(
    *arrays: np.ndarray | torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray | torch.Tensor, ...]]:
    """Yield one epoch of mini-batches as tuples ``(a[idx], b[idx], ...)`` of the given arrays.

    The batches are exactly those of ``ShuffledBatchSampler(n, batch_size, shuffle=shuffle,
    seed=seed, drop_last=drop_last)`` at ``epoch`` on a single rank, so a loop over epochs with
    ``epoch=e`` sees a new, reproducible order each epoch. A tuple is yielded even for a single
    array. Arrays are indexed along their first dimension (tensors with an index tensor on their
    own device); with ``shuffle=False`` the batches are basic slices, i.e. views.

    Args:
        *arrays: NumPy arrays and/or torch tensors with the same first dimension ``n``.
        batch_size, shuffle, seed, drop_last: as for :class:`ShuffledBatchSampler`.
        epoch: which epoch's order to produce.

    Raises:
        ValueError: no arrays, a 0-d array, or first dimensions that differ.
        TypeError: an argument that is neither a NumPy array nor a torch tensor.
    """
    if not arrays:
        raise ValueError("minibatches: arrays must contain at least one array or tensor")
    for i, a in enumerate(arrays):
        if not isinstance(a, (np.ndarray, torch.Tensor)):
            raise TypeError(f"minibatches: arrays[{i}] must be a numpy.ndarray or torch.Tensor, got {type(a).__name__}")
        if a.ndim == 0:
            raise ValueError(f"minibatches: arrays[{i}] is 0-d; arrays need a first (sample) dimension")
    sizes = [int(a.shape[0]) for a in arrays]
    if len(set(sizes)) != 1:
        raise ValueError(f"minibatches: arrays must have the same first dimension, got {sizes}")
    batch_size = check_int("minibatches: batch_size", batch_size, 1)
    sampler = ShuffledBatchSampler(
        sizes[0], batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=1, rank=0
    )
    sampler.set_epoch(epoch)  # validates epoch
    # A plain function returning a generator, so bad arguments raise at the call, not at next().
    return _generate_minibatches(arrays, sampler.global_items(epoch), shuffle)


def _generate_minibatches(arrays, batches, shuffle):
    for batch in batches:
        if not shuffle:  # consecutive indices: basic slices, i.e. views
            sl = slice(batch[0], batch[-1] + 1)
            yield tuple(a[sl] for a in arrays)
            continue
        idx_np = np.asarray(batch, dtype=np.int64)
        by_device = {}  # one index tensor per device, not one per array
        out = []
        for a in arrays:
            if isinstance(a, np.ndarray):
                out.append(a[idx_np])
            else:
                if a.device not in by_device:
                    by_device[a.device] = torch.from_numpy(idx_np).to(a.device)
                out.append(a[by_device[a.device]])
        yield tuple(out)


def _as_float_array(name: str, value: Any, ndims: tuple[int, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"minibatch_gd_linear_regression: {name} must be a real array, got {type(value).__name__}"
        ) from None
    if arr.ndim not in ndims:
        raise ValueError(
            f"minibatch_gd_linear_regression: {name} must have {' or '.join(map(str, ndims))} "
            f"dimensions, got shape {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"minibatch_gd_linear_regression: {name} must be finite")
    return arr


def minibatch_gd_linear_regression(
    X: Any,
    y: Any,
    *,
    batch_size: int,
    lr: float | Callable[[int], float],
    epochs: int,
    seed: int = 0,
    fit_intercept: bool = True,
    shuffle: bool = True,
    drop_last: bool = False,
) -> tuple[np.ndarray, float | np.ndarray, np.ndarray]:
    """Least squares by mini-batch gradient descent, in float64 NumPy (a reference, not fast).

    Minimizes ``L(w, b) = 1/(2n) * sum_i ||x_i w + b - y_i||^2`` starting from ``w = 0, b = 0``.
    Epoch ``e`` visits the batches of :func:`minibatches` ``(X, y, batch_size=batch_size,
    shuffle=shuffle, seed=seed, epoch=e, drop_last=drop_last)`` and for each batch ``B`` of
    ``m`` rows takes the step ::

        r = X_B w + b - y_B
        w <- w - lr_e * X_B^T r / m
        b <- b - lr_e * mean(r)            (only with fit_intercept)

    i.e. the gradient of the batch's mean loss. ``batch_size >= n`` is full-batch gradient
    descent, which converges to the closed-form solution (``np.linalg.lstsq`` on ``[X, 1]``)
    for ``lr < 2 / lambda_max(A^T A / n)``, ``A = [X, 1]``. Smaller batches converge to it when
    the system is consistent (zero residual at the optimum); otherwise gradient noise leaves
    them within ``O(lr)`` of it unless ``lr`` decays (pass a callable).

    Args:
        X: ``(n, d)`` features.
        y: ``(n,)`` targets, or ``(n, k)`` for ``k`` outputs fitted jointly.
        batch_size: rows per step.
        lr: step size, a positive float or a callable ``epoch -> step size``.
        epochs: number of passes over the data (``0`` returns the initial point).
        seed, shuffle, drop_last: batch order, as for :func:`minibatches`.
        fit_intercept: fit ``b``; otherwise ``b = 0``.

    Returns:
        ``(weights, bias, loss_history)``: ``weights`` of shape ``(d,)`` (``(d, k)`` for 2-D
        ``y``), ``bias`` a float (``(k,)`` array for 2-D ``y``; zero without ``fit_intercept``),
        and ``loss_history`` of length ``epochs + 1``: ``L`` on the full data at the start and
        after each epoch.
    """
    owner = "minibatch_gd_linear_regression"
    X = _as_float_array("X", X, (2,))
    y = _as_float_array("y", y, (1, 2))
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{owner}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError(f"{owner}: X has no rows")
    batch_size = check_int(f"{owner}: batch_size", batch_size, 1)
    epochs = check_int(f"{owner}: epochs", epochs, 0)
    if callable(lr):
        lr_at = lr
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{owner}: lr must be positive and finite, got {lr}")
        lr_at = lambda epoch: lr  # noqa: E731
    else:
        raise TypeError(f"{owner}: lr must be a float or a callable, got {type(lr).__name__}")

    n, d = X.shape
    w = np.zeros((d,) + y.shape[1:])
    b = np.zeros(y.shape[1:])

    def loss() -> float:
        r = X @ w + b - y
        return float(0.5 * np.mean(np.sum(r.reshape(n, -1) ** 2, axis=1)))

    history = [loss()]
    for epoch in range(epochs):
        step = lr_at(epoch)
        real = isinstance(step, numbers.Real) and not isinstance(step, bool)
        if not (real and math.isfinite(step) and step > 0):
            raise ValueError(f"{owner}: lr({epoch}) must be a positive finite number, got {step!r}")
        for Xb, yb in minibatches(
            X, y, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last
        ):
            r = Xb @ w + b - yb
            w -= step * (Xb.T @ r) / len(Xb)
            if fit_intercept:
                b -= step * r.mean(axis=0)
        history.append(loss())
    bias: float | np.ndarray = float(b) if b.ndim == 0 else b
    return w, bias, np.asarray(history)
