"""The gradient noise scale (McCandlish et al. 2018), estimated during training at no extra cost.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018), define
the *simple noise scale* ``B_simple = tr(Sigma) / |G|^2``, where ``G`` is the true (full-data)
gradient and ``Sigma`` the per-sample gradient covariance. Batch sizes well below ``B_simple``
are noise-dominated (doubling the batch nearly halves the steps needed); well above it, extra
samples are mostly wasted. ``B_simple`` is a practical estimate of the critical batch size.

A minibatch gradient of ``b`` samples has ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``. Given the
squared norms of gradients measured at two batch sizes ``b_small < b_big`` in the same step,
appendix A.1 of the paper solves these two equations for unbiased estimates
(:func:`estimate_noise_scale`)::

    |G|^2     ~ (b_big * |G_big|^2 - b_small * |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Both are noisy, so :class:`GradientNoiseScale` keeps exponential moving averages of each (with
Adam's bias correction) and reports the ratio of the averages. The two gradient sizes come for
free from data-parallel training (each rank's local gradient vs. the all-reduced one) or from
gradient accumulation (each micro-batch's gradient vs. the accumulated one). Everything here is
pure Python + torch; batchops' compiled kernels are not needed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch

from batchops.train.distributed import comm_device

__all__ = ["GradientNoiseScale", "estimate_noise_scale"]

Number = Union[float, torch.Tensor]  # noqa: UP007 (a runtime alias: X | Y needs no Union, but reads alike)
_LOSS_SCALINGS = ("mean", "sum")


def _check_size(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def estimate_noise_scale(g_small_sq: Number, g_big_sq: Number, b_small: float, b_big: float) -> tuple[Number, Number]:
    """Unbiased two-batch estimates ``(|G|^2, tr(Sigma))`` (McCandlish et al. 2018, app. A.1).

    Args:
        g_small_sq: ``|G_small|^2``, the squared norm of a gradient averaged over ``b_small``
            samples (or the mean of several such squared norms).
        g_big_sq: ``|G_big|^2``, the squared norm of a gradient averaged over ``b_big`` samples.
        b_small, b_big: the two batch sizes, ``0 < b_small < b_big`` (need not be integers:
            effective sizes such as harmonic means are fine).

    Works on Python numbers and on tensors (elementwise, e.g. a batch of estimates). The
    simple noise scale is ``tr(Sigma) / |G|^2`` (take ratios of averages, not averages of
    ratios: each estimate alone is very noisy and ``|G|^2`` may come out negative).

    Raises:
        ValueError: ``b_small`` or ``b_big`` not positive, or ``b_small >= b_big``.
        TypeError: a batch size that is not a number.
    """
    b_small = _check_size("estimate_noise_scale: b_small", b_small)
    b_big = _check_size("estimate_noise_scale: b_big", b_big)
    if b_small >= b_big:
        raise ValueError(f"estimate_noise_scale: b_small ({b_small:g}) must be below b_big ({b_big:g})")
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


# ----------------------------------------------------------------------------- helpers
def _params_of(model_or_params: Any) -> list[torch.Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        return [p for p in model_or_params.parameters() if p.requires_grad]
    if isinstance(model_or_params, torch.Tensor):
        return [model_or_params]
    try:
        items = list(model_or_params)
    except TypeError:
        raise TypeError(
            f"expected an nn.Module or an iterable of parameters/tensors, got {type(model_or_params).__name__}"
        ) from None
    out: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, dict) and "params" in item:  # optimizer-style parameter groups
            out.extend(_params_of(item["params"]))
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"expected tensors, got an item of type {type(item).__name__}")
    return out


def _is_param_list(tensors: Sequence[torch.Tensor]) -> bool:
    """Parameters (read their ``.grad``) rather than gradient tensors themselves."""
    return all(isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad) for t in tensors)


def _grads(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    if _is_param_list(tensors):
        return [None if t.grad is None else t.grad.detach() for t in tensors]
    return [t.detach() for t in tensors]


def _sq_norm_tensors(grads: Iterable[torch.Tensor | None]) -> dict[torch.device, torch.Tensor]:
    """Per-device float64 0-d tensors holding the sum of squares (no host sync)."""
    out: dict[torch.device, torch.Tensor] = {}
    for g in grads:
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()._values()
        s = torch.linalg.vector_norm(g, dtype=torch.float64).square()
        out[g.device] = out[g.device] + s if g.device in out else s
    return out


def _sq_norm(grads: Iterable[torch.Tensor | None]) -> float:
    return float(sum(t.item() for t in _sq_norm_tensors(grads).values()))


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    return float(value)


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "GradientNoiseScale: the distributed paths need an initialized torch.distributed process group"
        )
    return dist


class _CommHookState:
    """State of :meth:`GradientNoiseScale.register_comm_hook`'s DDP communication hook."""

    def __init__(self, process_group: Any, inner: Callable | None, inner_state: Any) -> None:
        self.process_group = process_group
        self.inner = inner
        self.inner_state = inner_state
        self.local_sq: list[torch.Tensor] = []  # one 0-d float64 tensor per bucket since the last take()

    def take(self) -> list[torch.Tensor]:
        out, self.local_sq = self.local_sq, []
        return out


def _noise_scale_comm_hook(state, bucket):  # unannotated: DDP rejects annotations other than its own
    """DDP comm hook: record the bucket's local squared norm, then all-reduce (average) it."""
    buffer = bucket.buffer()
    state.local_sq.append(torch.linalg.vector_norm(buffer.detach(), dtype=torch.float64).square())
    if state.inner is not None:
        return state.inner(state.inner_state, bucket)
    import torch.distributed as dist

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer.div_(dist.get_world_size(group))
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# ----------------------------------------------------------------------------- the tracker
class GradientNoiseScale:
    """Tracks the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` during training.

    Cheap: no extra forward or backward passes; it only takes squared norms of gradients that
    training computes anyway. Each update turns one pair ``(|G_small|^2, |G_big|^2)`` into the
    unbiased estimates of :func:`estimate_noise_scale` and folds them into two exponential
    moving averages ``m <- beta * m + (1 - beta) * x``, reported with Adam's bias correction
    ``m / (1 - beta^t)`` after ``t`` updates. :attr:`noise_scale` is the ratio of the two
    averages. All ranks of a distributed job hold identical trackers (the statistics are
    all-reduced), so decisions taken from them (e.g. :class:`~batchops.tuning.AdaptiveBatchSize`)
    agree across ranks.

    Ways to feed it (pick one per training loop):

    * **Gradient accumulation, one process.** After each micro-batch's ``backward()`` call
      :meth:`accumulate_micro_step` ``(model, micro_batch_size)``; it takes the squared norm of
      that micro-batch's gradient as the difference between the accumulated ``.grad`` now and
      after the previous micro-step (it keeps one copy of the accumulated gradient for that).
      At the optimizer step call :meth:`step`: ``b_small`` is the micro-batch, ``b_big`` the
      whole accumulated batch, ``|G_big|^2`` the accumulated gradient's squared norm. Needs at
      least two micro-batches per step (with one, :meth:`step` records nothing). Loss
      convention (``loss_scaling``): ``"mean"`` (default, the usual one) -- each micro-batch's
      loss is its mean over samples divided by the number of micro-steps, so ``.grad`` ends up
      the mean gradient; ``"sum"`` -- not divided, ``.grad`` is the sum of the micro-batch
      means. The convention only scales :attr:`grad_sq` and :attr:`trace_sigma` by a common
      factor; :attr:`noise_scale` is the same either way (likewise for a constant loss scale,
      e.g. AMP's, as long as it does not change during the accumulation). Micro-batches of
      different sizes are handled exactly (harmonic-mean effective sizes). Zero the gradients
      before each accumulation cycle, as usual. With AMP's ``GradScaler`` call :meth:`step`
      before ``scaler.unscale_(optimizer)``, so that both norms are in the same (scaled) units;
      an overflowed step is skipped (:attr:`skipped`).
    * **Several ranks, no DDP wrapper.** After ``backward()`` on each rank call
      :meth:`step_ddp` ``(model, local_batch_size)``: it takes the local squared norm, averages
      the gradients across ranks in place (one all-reduce, exactly what DDP would do, so the
      optimizer step that follows is ordinary data-parallel training), takes the global
      squared norm and updates. ``b_small`` is the local batch, ``b_big`` the global one.
    * **Several ranks with DistributedDataParallel.** DDP has already averaged the gradients
      when ``backward()`` returns, so call :meth:`register_comm_hook` ``(ddp_model)`` once: its
      communication hook records each bucket's local squared norm right before the all-reduce
      (a norm of a buffer that is being sent anyway). Then :meth:`step_ddp` ``(ddp_model,
      local_batch_size)`` after each synchronising backward. With DDP + ``no_sync()``
      accumulation, ``local_batch_size`` is the rank's whole batch for the step
      (micro-batch x accumulation steps).
    * **Anything else.** :meth:`update_ddp` / :meth:`update_from_ranks` take squared norms you
      computed; :meth:`update` takes one pair of squared norms and batch sizes directly.

    Args:
        model_or_params: the model (its parameters that require gradients) or an iterable of
            parameters (or of optimizer param groups); ``None`` if you only use :meth:`update`
            / :meth:`update_ddp` or always pass the model.
        beta: EMA decay in ``[0, 1)``; ``0`` keeps only the latest estimates.
        process_group: group for the distributed paths (default: the world).
        loss_scaling: ``"mean"`` or ``"sum"``, see above (accumulation path only).
    """

    def __init__(
        self,
        model_or_params: Any = None,
        *,
        beta: float = 0.99,
        process_group: Any = None,
        loss_scaling: str = "mean",
    ) -> None:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"GradientNoiseScale: beta must be in [0, 1), got {beta!r}")
        if loss_scaling not in _LOSS_SCALINGS:
            raise ValueError(f"GradientNoiseScale: loss_scaling must be one of {_LOSS_SCALINGS}, got {loss_scaling!r}")
        self.params: list[torch.Tensor] = [] if model_or_params is None else _params_of(model_or_params)
        self.beta = float(beta)
        self.process_group = process_group
        self.loss_scaling = loss_scaling
        self._hook_state: _CommHookState | None = None
        self._hooked: Any | None = None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every estimate (and any micro-steps not yet folded in by :meth:`step`)."""
        self.steps = 0  # updates folded into the averages
        self.skipped = 0  # updates dropped because of non-finite gradients
        self._ema_grad_sq = 0.0
        self._ema_trace = 0.0
        self.last_grad_sq: float | None = None
        self.last_trace_sigma: float | None = None
        self.last_b_small: float | None = None
        self.last_b_big: float | None = None
        self._clear_micro()

    def _clear_micro(self) -> None:
        self._prev: list[torch.Tensor | None] | None = None
        self._micro_sq: list[dict[torch.device, torch.Tensor]] = []
        self._micro_sizes: list[float] = []

    @property
    def grad_sq(self) -> float | None:
        """Bias-corrected EMA of the ``|G|^2`` estimates (``None`` before the first update)."""
        if self.steps == 0:
            return None
        return self._ema_grad_sq / (1.0 - self.beta**self.steps)

    @property
    def trace_sigma(self) -> float | None:
        """Bias-corrected EMA of the ``tr(Sigma)`` estimates (``None`` before the first update)."""
        if self.steps == 0:
            return None
        return self._ema_trace / (1.0 - self.beta**self.steps)

    @property
    def noise_scale(self) -> float | None:
        """``B_simple = trace_sigma / grad_sq``, in samples. ``None`` before the first update;
        ``inf`` while the ``|G|^2`` average is not positive but ``tr(Sigma)``'s is (no signal
        detected yet), ``nan`` when neither is positive."""
        if self.steps == 0:
            return None
        g, t = self.grad_sq, self.trace_sigma
        if g > 0:
            return t / g
        return math.inf if t > 0 else math.nan

    @property
    def pending_micro_steps(self) -> int:
        """Micro-steps recorded by :meth:`accumulate_micro_step` since the last :meth:`step`."""
        return len(self._micro_sizes)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the averages, the update count and the latest raw estimates.

        Save at an optimizer-step boundary: the copy of the accumulated gradient that
        :meth:`accumulate_micro_step` keeps between micro-steps is not saved (the gradient
        itself is not part of a checkpoint either)."""
        return {
            "beta": self.beta,
            "loss_scaling": self.loss_scaling,
            "steps": self.steps,
            "skipped": self.skipped,
            "ema_grad_sq": self._ema_grad_sq,
            "ema_trace_sigma": self._ema_trace,
            "last_grad_sq": self.last_grad_sq,
            "last_trace_sigma": self.last_trace_sigma,
            "last_b_small": self.last_b_small,
            "last_b_big": self.last_b_big,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (``beta`` and ``loss_scaling`` included)."""
        beta = float(state["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"GradientNoiseScale.load_state_dict: bad beta {beta!r}")
        self.beta = beta
        self.loss_scaling = state.get("loss_scaling", self.loss_scaling)
        self.steps = int(state["steps"])
        self.skipped = int(state.get("skipped", 0))
        self._ema_grad_sq = float(state["ema_grad_sq"])
        self._ema_trace = float(state["ema_trace_sigma"])
        self.last_grad_sq = state.get("last_grad_sq")
        self.last_trace_sigma = state.get("last_trace_sigma")
        self.last_b_small = state.get("last_b_small")
        self.last_b_big = state.get("last_b_big")
        self._clear_micro()

    def __repr__(self) -> str:
        return (
            f"GradientNoiseScale(steps={self.steps}, noise_scale={self.noise_scale}, "
            f"grad_sq={self.grad_sq}, trace_sigma={self.trace_sigma}, beta={self.beta})"
        )

    # ----------------------------------------------------------------- core update
    def update(self, g_small_sq: Number, g_big_sq: Number, b_small: float, b_big: float) -> float | None:
        """Fold one pair of squared gradient norms into the averages; returns :attr:`noise_scale`.

        ``g_small_sq``: ``|G_small|^2`` (or the mean over several small batches of that size),
        ``g_big_sq``: ``|G_big|^2``; ``0 < b_small < b_big``. Tensors are read with ``.item()``.
        A pair with a non-finite value (overflowed gradients) is not folded in; it is counted in
        :attr:`skipped`.
        """
        g_small_sq = _as_float("update: g_small_sq", g_small_sq)
        g_big_sq = _as_float("update: g_big_sq", g_big_sq)
        grad_sq, trace = estimate_noise_scale(g_small_sq, g_big_sq, b_small, b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            self.skipped += 1  # overflowed gradients (e.g. an AMP step the GradScaler will skip)
            return self.noise_scale
        self.steps += 1
        self._ema_grad_sq = self.beta * self._ema_grad_sq + (1.0 - self.beta) * grad_sq
        self._ema_trace = self.beta * self._ema_trace + (1.0 - self.beta) * trace
        self.last_grad_sq, self.last_trace_sigma = grad_sq, trace
        self.last_b_small, self.last_b_big = float(b_small), float(b_big)
        return self.noise_scale

    # ----------------------------------------------------------------- gradient accumulation
    def _tensors(self, model_or_grads: Any) -> list[torch.Tensor]:
        if model_or_grads is None:
            if not self.params:
                raise ValueError(
                    "GradientNoiseScale: no parameters: pass the model (or gradients), "
                    "or give model_or_params to the constructor"
                )
            return self.params
        module = getattr(model_or_grads, "module", None)  # DDP / DataParallel wrappers
        if isinstance(model_or_grads, torch.nn.Module) and isinstance(module, torch.nn.Module):
            model_or_grads = module
        return _params_of(model_or_grads)

    @staticmethod
    def _split_args(model_or_grads: Any, size: Any, name: str) -> tuple[Any, Any]:
        if size is None and isinstance(model_or_grads, numbers.Real) and not isinstance(model_or_grads, bool):
            return None, model_or_grads  # called as f(size)
        if size is None:
            raise TypeError(f"GradientNoiseScale: {name} is required")
        return model_or_grads, size

    def accumulate_micro_step(self, model_or_grads: Any = None, micro_batch_size: int | None = None) -> None:
        """Record one micro-batch's gradient; call right after its ``backward()``.

        ``model_or_grads``: the model, its parameters (their accumulated ``.grad`` is read) or
        the accumulated gradient tensors themselves; ``None``: the constructor's parameters.
        ``micro_batch_size``: samples in this micro-batch. ``accumulate_micro_step(8)`` is
        short for ``accumulate_micro_step(None, 8)``.
        """
        model_or_grads, micro_batch_size = self._split_args(model_or_grads, micro_batch_size, "micro_batch_size")
        size = _check_size("accumulate_micro_step: micro_batch_size", micro_batch_size)
        grads = _grads(self._tensors(model_or_grads))
        if self._prev is not None and len(self._prev) != len(grads):
            raise ValueError(
                "accumulate_micro_step: a different number of gradient tensors than in the "
                "previous micro-step of this accumulation cycle"
            )
        prev = self._prev if self._prev is not None else [None] * len(grads)
        deltas: list[torch.Tensor | None] = []
        for i, g in enumerate(grads):
            if g is None:
                deltas.append(None)
                continue
            p = prev[i]
            if p is None:
                deltas.append(g)
                prev[i] = g.detach().clone()
            else:
                deltas.append(g - p)
                p.copy_(g)
        self._micro_sq.append(_sq_norm_tensors(deltas))
        self._micro_sizes.append(size)
        self._prev = prev

    def step(self, total_batch_size: int | None = None, model_or_grads: Any = None) -> float | None:
        """At the optimizer step (after the last micro-batch's ``backward()``, before
        ``zero_grad``): fold this cycle's micro-steps into the averages.

        ``b_small`` is the micro-batch size (the harmonic mean if they differ), ``b_big`` the
        accumulated batch; ``total_batch_size``, if given, must equal the sum of the recorded
        micro-batch sizes. Returns :attr:`noise_scale`, or ``None`` (nothing recorded) when the
        cycle had a single micro-batch, which gives no second batch size to compare with.
        """
        n = len(self._micro_sizes)
        if n == 0:
            raise RuntimeError("GradientNoiseScale.step: no accumulate_micro_step since the last step")
        sizes = self._micro_sizes
        if total_batch_size is not None:
            total = _check_size("step: total_batch_size", total_batch_size)
            if abs(total - sum(sizes)) > 1e-9 * total:
                raise ValueError(
                    f"GradientNoiseScale.step: total_batch_size={total_batch_size} but the "
                    f"micro-steps add up to {sum(sizes):g} samples"
                )
        micro_sq = [float(sum(t.item() for t in d.values())) for d in self._micro_sq]
        big_sq = _sq_norm(_grads(self._tensors(model_or_grads)))
        self._clear_micro()
        if n < 2:
            return None
        small_sq = sum(micro_sq) / n
        if self.loss_scaling == "mean":
            small_sq *= n * n  # each micro-step added g_j / n to .grad
        else:
            big_sq /= n * n  # .grad holds the sum of the n micro-batch means
        harmonic = sum(1.0 / b for b in sizes) / n  # E mean|g_j|^2 = |G|^2 + tr(Sigma) * harmonic
        return self.update(small_sq, big_sq, 1.0 / harmonic, n / harmonic)

    # ----------------------------------------------------------------- several ranks
    def update_ddp(
        self,
        local_sq_norm: Number,
        global_sq_norm: Number,
        local_batch: float,
        global_batch: float | None = None,
    ) -> float | None:
        """Update from this rank's local and the all-reduced gradient's squared norms (collective:
        every rank of the process group must call it).

        One all-reduce of four numbers averages ``local_sq_norm`` over the ranks (the
        ``|G_small|^2`` term), averages ``global_sq_norm`` (identical on every rank already, up
        to rounding; averaging makes every rank's tracker bit-identical) and combines the local
        batch sizes: ``b_small = R / sum_r(1 / b_r)`` (``local_batch`` on every rank when they
        are equal) and ``b_big = global_batch`` if given (a sample-weighted average gradient)
        else ``R * b_small`` (DDP's plain average of the ranks' gradients). Returns
        :attr:`noise_scale`; ``None`` (no update) on a single rank.
        """
        dist = _dist()
        group = self.process_group
        world = dist.get_world_size(group)
        local_sq = _as_float("update_ddp: local_sq_norm", local_sq_norm)
        global_sq = _as_float("update_ddp: global_sq_norm", global_sq_norm)
        b_local = _check_size("update_ddp: local_batch", local_batch)
        if global_batch is not None:
            global_batch = _check_size("update_ddp: global_batch", global_batch)
        if world < 2:
            return None
        stats = torch.tensor(
            [local_sq, global_sq, 1.0 / b_local, b_local], dtype=torch.float64, device=comm_device(group=group)
        )
        dist.all_reduce(stats, group=group)
        stats = stats.cpu().tolist()
        small_sq, big_sq, inv_sum, b_sum = stats[0] / world, stats[1] / world, stats[2], stats[3]
        b_small = world / inv_sum
        b_big = global_batch if global_batch is not None else world * b_small
        if b_big <= b_small:
            raise ValueError(
                f"update_ddp: global_batch ({b_big:g}) must exceed the local batch ({b_small:g}); "
                f"the ranks' batches add up to {b_sum:g}"
            )
        return self.update(small_sq, big_sq, b_small, b_big)

    def update_from_ranks(
        self,
        local_sq_norm: Number,
        local_batch: float,
        global_sq_norm: Number | None = None,
        global_batch: float | None = None,
    ) -> float | None:
        """:meth:`update_ddp` with ``global_sq_norm`` defaulting to the squared norm of the
        tracker's parameters' current ``.grad`` (which must hold the averaged gradient)."""
        if global_sq_norm is None:
            global_sq_norm = _sq_norm(_grads(self._tensors(None)))
        return self.update_ddp(local_sq_norm, global_sq_norm, local_batch, global_batch)

    def register_comm_hook(self, ddp_model: Any, hook: Callable | None = None, hook_state: Any = None) -> None:
        """Install the DDP communication hook that records each rank's local gradient norm.

        The hook computes the squared norm of every gradient bucket right before it is
        communicated, then does what DDP's default hook does (divide by the world size,
        all-reduce), or calls ``hook(hook_state, bucket)`` if given (e.g.
        ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook`` with
        ``hook_state`` its process group). DDP accepts one comm hook per model, installed
        before the first backward. The tracker's parameters become the DDP model's.
        """
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                f"register_comm_hook: expected a DistributedDataParallel model, got {type(ddp_model).__name__}"
            )
        if hook is not None and not callable(hook):
            raise TypeError("register_comm_hook: hook must be callable")
        state = _CommHookState(self.process_group, hook, hook_state)
        ddp_model.register_comm_hook(state, _noise_scale_comm_hook)
        self._hook_state = state
        self._hooked = ddp_model
        self.params = _params_of(ddp_model.module)

    def step_ddp(self, model: Any = None, local_batch_size: float | None = None) -> float | None:
        """After ``backward()`` on every rank (collective): update from local vs. global gradients.

        With a DDP model carrying :meth:`register_comm_hook`'s hook, the local squared norm is
        the one the hook recorded and the global one is read from ``.grad`` (already averaged).
        With a plain (non-DDP) model the gradients are still local: their squared norm is taken,
        then they are averaged across the ranks in place (one flat all-reduce per dtype and
        device; a missing ``.grad`` counts as zeros and is created, so every rank sends the same
        layout) and the global squared norm is taken from the result; the optimizer step that
        follows is then ordinary data-parallel training. ``step_ddp(16)`` is short for
        ``step_ddp(None, 16)``. Returns :attr:`noise_scale` (``None`` on a single rank).
        """
        model, local_batch_size = self._split_args(model, local_batch_size, "local_batch_size")
        from torch.nn.parallel import DistributedDataParallel

        dist = _dist()
        hooked = self._hook_state is not None and (
            model is None or model is self._hooked or model is getattr(self._hooked, "module", None)
        )
        if hooked:
            recorded = self._hook_state.take()
            if not recorded:
                raise RuntimeError(
                    "step_ddp: the comm hook recorded no gradients since the last step_ddp; "
                    "call it after a backward that synchronises gradients (not under no_sync())"
                )
            local_sq = float(sum(t.item() for t in recorded))
            global_sq = _sq_norm(_grads(self._tensors(None)))
            return self.update_ddp(local_sq, global_sq, local_batch_size)
        if isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                "step_ddp: this DistributedDataParallel model has already averaged its "
                "gradients; call tracker.register_comm_hook(model) before training"
            )
        params = self._tensors(model)
        if not _is_param_list(params):
            raise TypeError("step_ddp: pass the model or its parameters (their .grad is averaged in place)")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        local_sq = _sq_norm(grads)
        group = self.process_group
        world = dist.get_world_size(group)
        if world > 1:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for g in grads:
                buckets.setdefault((g.device, g.dtype), []).append(g)
            for tensors in buckets.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                dist.all_reduce(flat, group=group)
                flat.div_(world)
                offset = 0
                for t in tensors:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t))
                    offset += n
        global_sq = _sq_norm(grads)
        return self.update_ddp(local_sq, global_sq, local_batch_size)
