"""Grow the effective batch toward the gradient noise scale by accumulating more micro-batches.

:class:`AdaptiveBatchSize` keeps the micro-batch size FIXED (what the model, the sampler and the
DataLoader see never changes, so they keep their exact lengths and need no rebuild) and changes
only how many micro-batches are accumulated per optimizer step::

    effective_batch_size = micro_batch_size * accumulation_steps * world_size

At each optimizer step :meth:`~AdaptiveBatchSize.update` reads the tracker's simple noise scale
``B_simple`` (:class:`~batchops.tuning.GradientNoiseScale`) and sets the next accumulation to
``round(B_simple / (micro_batch_size * world_size))`` clamped to
``[min_accumulation, max_accumulation]`` (and to ``max_batch_size``). By default the batch only
grows: ``B_simple`` rises as the loss falls, and a shrinking batch would undo learning-rate
decisions already taken (``shrink=True`` allows it). The learning rate follows the batch:

* ``"linear"``: ``lr = base_lr * S`` with ``S = effective_batch_size / base_batch_size``
  (Goyal et al. 2017);
* ``"sqrt"``: ``lr = base_lr * sqrt(S)`` (Krizhevsky 2014; Hoffer et al. 2017);
* ``"adascale"``: ``lr = base_lr * r`` with the AdaScale gain of Johnson et al. 2020,
  ``r = (tr(Sigma) + |G|^2) / (tr(Sigma) / S + |G|^2)`` from the tracker's averages, which
  goes from ``1`` (no noise: a bigger batch does not help) to ``S`` (pure noise: linear
  scaling); :attr:`~AdaptiveBatchSize.scale_invariant_steps` sums ``r`` over the steps taken
  (AdaScale's progress measure, to drive a learning-rate schedule);
* ``"constant"``: ``lr = base_lr``.

A training loop (one process; with DDP use ``tracker.step_ddp`` instead of the two tracker
calls, after the synchronising backward)::

    tracker = GradientNoiseScale(model)
    adaptive = AdaptiveBatchSize(32, base_batch_size=64, base_lr=0.1, noise_scale=tracker,
                                 min_accumulation=2, max_accumulation=32, optimizer=optimizer)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch, step_now in adaptive.accumulate(loader):
            loss = loss_fn(model(batch)) / adaptive.accumulation_steps
            loss.backward()
            tracker.accumulate_micro_step(model, len(batch))
            if step_now:
                tracker.step()
                optimizer.step()
                optimizer.zero_grad()
                adaptive.update()  # next accumulation and learning rate

Accumulation cycles run across epoch boundaries (the micro-batches form one stream), and
``state_dict()`` / ``load_state_dict()`` save and restore everything needed to continue a run
identically after a checkpoint taken at an optimizer-step boundary.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from batchops._checks import check_int

__all__ = ["AdaptiveBatchSize", "LR_RULES"]

LR_RULES = ("linear", "sqrt", "adascale", "constant")
_GROWTHS = ("noise_scale", "fixed")


def _int_arg(name: str, value: Any, minimum: int) -> int:
    return check_int(f"AdaptiveBatchSize: {name}", value, minimum)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _finite_positive(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


class AdaptiveBatchSize:
    """Accumulation steps and learning rate that follow the gradient noise scale.

    Args:
        micro_batch_size: samples per micro-batch per rank (fixed).
        base_batch_size: the effective batch ``base_lr`` is tuned for (``S = 1``).
        base_lr: learning rate at ``base_batch_size``; a float, or one per optimizer param
            group. ``None``: no learning-rate management (:meth:`apply_lr` refuses).
        max_batch_size: cap on the effective batch (e.g. :func:`~batchops.tuning.find_batch_size`'s
            per-rank limit x ranks x the accumulation you accept); ``None``: no cap beyond
            ``max_accumulation``.
        lr_rule: ``"linear"``, ``"sqrt"``, ``"adascale"`` or ``"constant"`` (module docstring).
        noise_scale: a :class:`~batchops.tuning.GradientNoiseScale` (anything with a
            ``noise_scale`` attribute, in samples, ``None`` while unknown; ``"adascale"`` also
            reads ``grad_sq`` and ``trace_sigma`` when present).
        growth: ``"noise_scale"`` (target ``B_simple``; needs ``noise_scale``), ``"fixed"`` (never
            change the accumulation), or a callable ``growth(adaptive) -> target effective batch
            size`` (or ``None`` for no change), e.g. a schedule.
        min_accumulation, max_accumulation: bounds on the accumulation steps (``max_accumulation``
            ``None``: unbounded except by ``max_batch_size``). In a single process the tracker
            needs at least two micro-batches per step, so use ``min_accumulation=2`` there.
        initial_accumulation: accumulation of the first step; default
            ``round(base_batch_size / (micro_batch_size * world_size))`` (at least 1), clamped.
        world_size: data-parallel ranks; default the initialized process group's size, else 1.
        shrink: allow the accumulation to decrease when the target falls (default: only grow).
        max_growth: if set, one update multiplies the accumulation by at most this factor
            (always allowing ``+1``), to avoid sudden learning-rate jumps.
        update_every: re-read the target every this many optimizer steps (default every step).
        optimizer: if given, its learning rates are set now and by every :meth:`update`.

    Targets that are not finite positive numbers (no estimate yet, or ``B_simple`` infinite or
    undefined while the ``|G|^2`` average is not positive) leave the accumulation unchanged.
    Rounding is to the nearest integer with halves rounded up.
    """

    def __init__(
        self,
        micro_batch_size: int,
        *,
        base_batch_size: int,
        base_lr: float | Sequence[float] | None = None,
        max_batch_size: int | None = None,
        lr_rule: str = "linear",
        noise_scale: Any = None,
        growth: str | Callable[[AdaptiveBatchSize], float | None] | None = "noise_scale",
        min_accumulation: int = 1,
        max_accumulation: int | None = 64,
        initial_accumulation: int | None = None,
        world_size: int | None = None,
        shrink: bool = False,
        max_growth: float | None = None,
        update_every: int = 1,
        optimizer: Any = None,
    ) -> None:
        self.micro_batch_size = _int_arg("micro_batch_size", micro_batch_size, 1)
        self.base_batch_size = _int_arg("base_batch_size", base_batch_size, 1)
        if world_size is None:
            world_size = 1
            try:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    world_size = dist.get_world_size()
            except ImportError:  # pragma: no cover
                pass
        self.world_size = _int_arg("world_size", world_size, 1)
        if lr_rule not in LR_RULES:
            raise ValueError(f"AdaptiveBatchSize: lr_rule must be one of {LR_RULES}, got {lr_rule!r}")
        self.lr_rule = lr_rule
        if base_lr is None:
            self.base_lr: float | list[float] | None = None
        elif isinstance(base_lr, numbers.Real) and not isinstance(base_lr, bool):
            self.base_lr = float(base_lr)
        else:
            try:
                self.base_lr = [float(v) for v in base_lr]
            except (TypeError, ValueError):
                raise TypeError(
                    f"AdaptiveBatchSize: base_lr must be a number or a sequence of numbers, got {base_lr!r}"
                ) from None
        if growth is None:
            growth = "fixed"
        if not callable(growth) and growth not in _GROWTHS:
            raise ValueError(f"AdaptiveBatchSize: growth must be one of {_GROWTHS} or a callable, got {growth!r}")
        self.growth = growth
        if noise_scale is not None and not hasattr(noise_scale, "noise_scale"):
            raise TypeError(
                "AdaptiveBatchSize: noise_scale must be a GradientNoiseScale (or have a "
                f"noise_scale attribute), got {type(noise_scale).__name__}"
            )
        if noise_scale is None and (growth == "noise_scale" or lr_rule == "adascale"):
            raise ValueError(
                "AdaptiveBatchSize: growth='noise_scale' and lr_rule='adascale' need a noise_scale "
                "tracker (use growth='fixed' without one)"
            )
        self.noise_scale = noise_scale
        self.min_accumulation = _int_arg("min_accumulation", min_accumulation, 1)
        self.max_accumulation = (
            None if max_accumulation is None else _int_arg("max_accumulation", max_accumulation, self.min_accumulation)
        )
        self.max_batch_size = None if max_batch_size is None else _int_arg("max_batch_size", max_batch_size, 1)
        upper = self.upper_accumulation
        if upper is not None and upper < self.min_accumulation:
            raise ValueError(
                f"AdaptiveBatchSize: max_batch_size={self.max_batch_size} allows at most {upper} micro-batches of "
                f"{self.micro_batch_size} x {self.world_size} ranks per step, below min_accumulation="
                f"{self.min_accumulation}"
            )
        if max_growth is not None:
            if isinstance(max_growth, bool) or not isinstance(max_growth, numbers.Real) or not max_growth >= 1:
                raise ValueError(f"AdaptiveBatchSize: max_growth must be a number >= 1, got {max_growth!r}")
            max_growth = float(max_growth)
        self.max_growth = max_growth
        self.update_every = _int_arg("update_every", update_every, 1)
        self.shrink = bool(shrink)
        if initial_accumulation is None:
            initial = max(1, _round_half_up(self.base_batch_size / self.per_micro_step))
        else:
            initial = _int_arg("initial_accumulation", initial_accumulation, 1)
        self.accumulation_steps = self._clamp(initial)
        self.steps = 0  # optimizer steps taken (update() calls)
        self.micro_steps_done = 0  # micro-batches consumed by those steps
        self.micro_index = 0  # micro-batches handed out by accumulate()
        self.scale_invariant_steps = 0.0  # sum of the AdaScale gain over the steps taken
        self.history: list[tuple[int, int]] = [(0, self.accumulation_steps)]  # (step, accumulation) changes
        self.optimizer = optimizer
        if optimizer is not None:
            self.apply_lr(optimizer)

    # ----------------------------------------------------------------- sizes
    @property
    def per_micro_step(self) -> int:
        """Samples per micro-step across all ranks: ``micro_batch_size * world_size``."""
        return self.micro_batch_size * self.world_size

    @property
    def upper_accumulation(self) -> int | None:
        """The largest accumulation allowed by ``max_accumulation`` and ``max_batch_size``."""
        bounds = []
        if self.max_accumulation is not None:
            bounds.append(self.max_accumulation)
        if self.max_batch_size is not None:
            bounds.append(self.max_batch_size // self.per_micro_step)
        return min(bounds) if bounds else None

    def _clamp(self, accumulation: int) -> int:
        upper = self.upper_accumulation
        if upper is not None:
            accumulation = min(accumulation, upper)
        return max(accumulation, self.min_accumulation)

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: ``micro_batch_size * accumulation_steps * world_size``."""
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def scale(self) -> float:
        """``S = effective_batch_size / base_batch_size``."""
        return self.effective_batch_size / self.base_batch_size

    # ----------------------------------------------------------------- learning rate
    def gain(self, scale: float | None = None) -> float:
        """AdaScale gain ``r = (tr(Sigma) + |G|^2) / (tr(Sigma) / S + |G|^2)`` at ``scale``
        (default :attr:`scale`) from the tracker's averages: ``1`` without an estimate yet,
        ``S`` when the ``|G|^2`` average is not positive (noise only); negative
        ``tr(Sigma)`` averages count as 0."""
        s = self.scale if scale is None else float(scale)
        tracker = self.noise_scale
        if tracker is None:
            return 1.0
        g = getattr(tracker, "grad_sq", None)
        t = getattr(tracker, "trace_sigma", None)
        if g is not None and t is not None:
            g, t = float(g), max(float(t), 0.0)
            if not (math.isfinite(g) and math.isfinite(t)):
                return 1.0
            if g <= 0:
                return s if t > 0 else 1.0
            return (t + g) / (t / s + g)
        b = getattr(tracker, "noise_scale", None)  # duck-typed trackers: r = (B + 1) / (B / S + 1)
        if b is None:
            return 1.0
        b = float(b)
        if math.isnan(b):
            return 1.0
        if math.isinf(b):
            return s if b > 0 else 1.0
        b = max(b, 0.0)
        return (b + 1.0) / (b / s + 1.0)

    @property
    def lr_factor(self) -> float:
        """The factor the rule applies to ``base_lr`` at the current batch (to combine with a
        learning-rate schedule of your own: multiply)."""
        if self.lr_rule == "linear":
            return self.scale
        if self.lr_rule == "sqrt":
            return math.sqrt(self.scale)
        if self.lr_rule == "adascale":
            return self.gain()
        return 1.0

    @property
    def lr(self) -> float | list[float] | None:
        """``base_lr * lr_factor`` (a list when ``base_lr`` is one per param group)."""
        if self.base_lr is None:
            return None
        f = self.lr_factor
        if isinstance(self.base_lr, list):
            return [b * f for b in self.base_lr]
        return self.base_lr * f

    def apply_lr(self, optimizer: Any) -> list[float]:
        """Set every param group's ``"lr"`` to :attr:`lr`; returns the values set."""
        if self.base_lr is None:
            raise ValueError("AdaptiveBatchSize.apply_lr: no base_lr was given")
        groups = optimizer.param_groups
        lr = self.lr
        if isinstance(lr, list):
            if len(lr) != len(groups):
                raise ValueError(
                    f"AdaptiveBatchSize.apply_lr: {len(lr)} base learning rates for {len(groups)} param groups"
                )
            values = lr
        else:
            values = [lr] * len(groups)
        for group, value in zip(groups, values):
            group["lr"] = value
        return list(values)

    # ----------------------------------------------------------------- the loop
    def should_step(self, micro_step_index: int) -> bool:
        """True when the micro-batch with this index completes the current accumulation cycle.

        ``micro_step_index`` counts micro-batches from the start of training (0-based, not
        reset at epoch boundaries: cycles run across epochs); pure, it changes nothing. The
        cycle started at :attr:`micro_steps_done`, the micro-batches consumed by the optimizer
        steps so far (:meth:`update` advances it).
        """
        index = _int_arg("micro_step_index", micro_step_index, 0)
        return index + 1 - self.micro_steps_done >= self.accumulation_steps

    def accumulate(self, iterable: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """Yield ``(micro_batch, step_now)`` for each item of ``iterable``; ``step_now`` is
        :meth:`should_step` of the item's index (:attr:`micro_index`, which continues across
        calls, i.e. across epochs). Call :meth:`update` after each step."""
        for item in iterable:
            index = self.micro_index
            self.micro_index += 1
            yield item, self.should_step(index)

    def target_batch_size(self) -> float | None:
        """What the growth rule asks for now (effective batch, samples), or ``None``."""
        if callable(self.growth):
            return _finite_positive(self.growth(self))
        if self.growth == "noise_scale":
            return _finite_positive(getattr(self.noise_scale, "noise_scale", None))
        return None

    def update(self, optimizer: Any = None, micro_steps: int | None = None) -> int:
        """Call once per optimizer step (after the tracker's update for it): counts the step and
        sets the next step's accumulation and learning rate. Returns the new accumulation.

        ``optimizer`` (or the constructor's): its learning rates are set by :meth:`apply_lr`.
        ``micro_steps``: micro-batches the step consumed, if not :attr:`accumulation_steps`
        (e.g. a final partial cycle).
        """
        used = self.accumulation_steps if micro_steps is None else _int_arg("micro_steps", micro_steps, 1)
        self.scale_invariant_steps += self.gain() if self.lr_rule == "adascale" else 1.0
        self.steps += 1
        self.micro_steps_done += used
        self.micro_index = max(self.micro_index, self.micro_steps_done)
        if self.steps % self.update_every == 0:
            target = self.target_batch_size()
            if target is not None:
                current = self.accumulation_steps
                new = self._clamp(max(1, _round_half_up(target / self.per_micro_step)))
                if not self.shrink:
                    new = max(new, current)
                if self.max_growth is not None and new > current:
                    new = min(new, max(current + 1, int(math.floor(current * self.max_growth))))
                if new != current:
                    self.accumulation_steps = new
                    self.history.append((self.steps, new))
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is not None and self.base_lr is not None:
            self.apply_lr(optimizer)
        return self.accumulation_steps

    # ----------------------------------------------------------------- checkpointing
    def _config(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "base_batch_size": self.base_batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values; with the tracker's, model's, optimizer's, sampler's and RNG
        states it resumes the run exactly (save at an optimizer-step boundary)."""
        return {
            **self._config(),
            "accumulation_steps": self.accumulation_steps,
            "steps": self.steps,
            "micro_steps_done": self.micro_steps_done,
            "micro_index": self.micro_index,
            "scale_invariant_steps": self.scale_invariant_steps,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` if the micro-batch size, world size
        or base batch size differ from this object's (the accumulation would mean another batch)."""
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"AdaptiveBatchSize.load_state_dict: saved {key}={state[key]!r} but this object has {key}={value!r}"
                )
        self.accumulation_steps = _int_arg("accumulation_steps", state["accumulation_steps"], 1)
        self.steps = int(state["steps"])
        self.micro_steps_done = int(state["micro_steps_done"])
        self.micro_index = int(state.get("micro_index", self.micro_steps_done))
        self.scale_invariant_steps = float(state.get("scale_invariant_steps", float(self.steps)))
        self.history = [tuple(h) for h in state.get("history", [(self.steps, self.accumulation_steps)])]

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatchSize(micro_batch_size={self.micro_batch_size}, accumulation_steps="
            f"{self.accumulation_steps}, world_size={self.world_size}, effective_batch_size="
            f"{self.effective_batch_size}, lr_rule={self.lr_rule!r}, steps={self.steps})"
        )
