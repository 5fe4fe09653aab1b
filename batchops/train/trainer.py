"""A small training loop: DDP, AMP, gradient accumulation, exact resume, bounded failures.

See :class:`Trainer` (and the :func:`fit` shortcut) for the behaviour in detail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from batchops.data.prefetch import apply_to_tensors
from batchops.train.checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from batchops.train.distributed import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    DistInfo,
    DistributedTrainingError,
    all_gather_ints,
    gather_variable,
    is_collective_error,
    setup_distributed,
)

__all__ = ["CHECKPOINT_FORMAT", "Callback", "FitResult", "Trainer", "UnevenInputsError", "fit", "find_sync_batchnorm"]

CHECKPOINT_FORMAT = "batchops.train/1"
_AMP_CHOICES = (False, True, "bf16", "bfloat16", "fp16", "float16")


class UnevenInputsError(RuntimeError):
    """The ranks' loaders give different numbers of batches and the model has a SyncBatchNorm,
    whose forward collectives DDP's ``Join`` cannot shadow (raised on every rank, before training)."""


class Callback:
    """Base class for callbacks (any object with some of these methods works; missing ones are
    skipped). ``trainer`` exposes ``rank``, ``world_size``, ``epoch``, ``global_step`` (optimizer
    steps so far), ``batch_in_epoch`` (batches consumed in the epoch) and ``should_stop``
    (set it to ``True`` to stop after the current optimizer step; a checkpoint is written then if
    ``checkpoint_path`` is set).

    Order within one optimizer step: ``on_batch_start``/``on_batch_end`` around every
    micro-batch (after its backward), then ``on_before_step`` (the accumulated, all-reduced and
    unscaled gradients are in ``.grad``: the place to update a gradient-noise-scale tracker),
    the optimizer step, the scheduler step, the batch-size controller's ``update``, then
    ``on_step_end`` with the step's loss."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_batch_start(self, trainer: Trainer, batch: Any) -> None: ...
    def on_batch_end(self, trainer: Trainer, batch: Any, loss: torch.Tensor) -> None: ...
    def on_before_step(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: Trainer, result: FitResult) -> None: ...


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        history: one dict per epoch completed in this call: ``epoch``, ``train_loss`` (mean over
            all ranks' micro-batches), ``steps``, ``seconds`` and, with an ``eval_loader``,
            ``eval_loss``, ``eval_accuracy`` (when the outputs are class scores), ``eval_count``.
        step_losses: this rank's loss of every optimizer step taken in this call (the mean of
            the step's micro-batch losses), as floats.
        global_step: optimizer steps taken in total (resumed ones included).
        epoch: the epoch the run is in (== ``epochs`` after a complete run).
        batch_in_epoch: batches consumed in ``epoch`` (0 at an epoch boundary).
        stopped_early: ``max_steps`` or ``should_stop`` ended the run before ``epochs``.
        resumed_from: the checkpoint loaded, if any.
        checkpoint_path: the last checkpoint written, if any.
        rank, world_size: this process's place.
    """

    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    step_losses: list[float] = dataclasses.field(default_factory=list)
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stopped_early: bool = False
    resumed_from: str | None = None
    checkpoint_path: str | None = None
    rank: int = 0
    world_size: int = 1


def find_sync_batchnorm(model: nn.Module) -> tuple[str, str] | None:
    """``(module name, class name)`` of the first module whose class name contains
    ``"SyncBatchNorm"`` (torch's, batchops', or any other implementation), else ``None``."""
    for name, module in model.named_modules():
        if "SyncBatchNorm" in type(module).__name__:
            return name or "<root>", type(module).__name__
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _default_split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "batchops.train: a batch must be (inputs, targets, ...) for the default batch_fn; got "
        f"{type(batch).__name__}. Pass batch_fn=lambda batch: (inputs, targets)."
    )


def _loader_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


class _Peek:
    """Iterator wrapper that knows whether the current item is the last one."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._next: Any = None
        self._has_next = False
        self._advance()

    def _advance(self) -> None:
        try:
            self._next = next(self._it)
            self._has_next = True
        except StopIteration:
            self._next, self._has_next = None, False

    def __iter__(self) -> _Peek:
        return self

    def __next__(self) -> tuple[Any, bool]:
        if not self._has_next:
            raise StopIteration
        item = self._next
        self._advance()
        return item, not self._has_next


class _Known:
    """``(item, is_last)`` for an iterator of known remaining length (no read-ahead)."""

    def __init__(self, it: Iterator[Any], remaining: int) -> None:
        self._it = it
        self._left = remaining

    def __iter__(self) -> _Known:
        return self

    def __next__(self) -> tuple[Any, bool]:
        item = next(self._it)
        self._left -= 1
        return item, self._left <= 0


class Trainer:
    """Train ``model`` with ``optimizer`` over a loader of ``(inputs, targets)`` batches.

    Args:
        model: the module (moved to ``device``; wrapped in DDP when there are several ranks).
        optimizer: built on ``model``'s parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with mean reduction (default
            ``torch.nn.functional.cross_entropy``); floating outputs are cast to float32 first
            and the loss is computed outside autocast.
        batch_fn: ``batch_fn(batch) -> (inputs, targets)`` (default ``batch[0], batch[1]``);
            ``inputs`` that is a tuple/list is unpacked into ``model(*inputs)``, a dict into
            ``model(**inputs)``. The batch is moved to ``device`` first.
        scheduler: an LR scheduler, stepped after every optimizer step
            (``scheduler_interval="step"``) or after every epoch (``"epoch"``).
        amp: ``False`` (default); ``True``: float16 autocast with a ``GradScaler`` on CUDA,
            bfloat16 autocast on the CPU; ``"bf16"``: bfloat16 autocast (no scaler);
            ``"fp16"``: float16 autocast (with a scaler on CUDA).
        accumulation_steps: micro-batches per optimizer step (an int), or an object with an
            ``accumulation_steps`` attribute read at the start of every cycle, such as
            :class:`batchops.tuning.AdaptiveBatchSize`: its ``update(optimizer, micro_steps=n)``
            is called after every optimizer step and its ``state_dict`` is checkpointed. With
            DDP the non-final micro-batches run under ``no_sync``. The last cycle of an epoch
            may be shorter; its loss is then divided by its own length.
        grad_clip_norm: clip the global gradient norm to this before each step.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
        distributed: ``None`` (auto: an initialized process group or torchrun's environment),
            ``True`` (require one) or ``False`` (single process even under torchrun).
        collective_timeout: seconds, given to ``init_process_group`` when this trainer creates
            the group: a collective that waits longer fails instead of hanging.
        join: uneven loaders across ranks. ``None``: the loaders' lengths are compared at the
            start of every epoch and DDP's ``Join`` context manager is used when they differ (or
            are unknown); ``True``: always use ``Join``; ``False``: never (different lengths
            raise ``ValueError``). ``Join`` cannot stand in for SyncBatchNorm's collectives, so
            where it would be needed a model with SyncBatchNorm raises ``RuntimeError``.
        checkpoint_path: where checkpoints go (rank 0 writes, atomically); written at the end of
            every epoch, every ``checkpoint_every`` optimizer steps, and when the run stops early.
        checkpoint_every: optimizer steps between mid-epoch checkpoints (``None``: none).
        sampler: the resumable sampler to checkpoint (default: found on the loader:
            ``loader.batch_sampler`` or ``loader.sampler`` with ``state_dict``).
        callbacks: :class:`Callback`-like objects.
        progress: tqdm progress bars on rank 0.
        verbose: print one line per epoch on rank 0.
        ddp_kwargs: extra arguments for ``DistributedDataParallel``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "step",
        amp: bool | str = False,
        accumulation_steps: Any = 1,
        grad_clip_norm: float | None = None,
        device: str | torch.device | None = None,
        distributed: bool | None = None,
        collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
        join: bool | None = None,
        checkpoint_path: str | None = None,
        checkpoint_every: int | None = None,
        sampler: Any = None,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        verbose: bool = True,
        ddp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"Trainer: scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if amp not in _AMP_CHOICES:
            raise ValueError(f"Trainer: amp must be one of {_AMP_CHOICES}, got {amp!r}")
        if isinstance(accumulation_steps, numbers.Integral) and not isinstance(accumulation_steps, bool):
            if accumulation_steps < 1:
                raise ValueError(f"Trainer: accumulation_steps must be >= 1, got {accumulation_steps}")
        elif not hasattr(accumulation_steps, "accumulation_steps"):
            raise TypeError(
                "Trainer: accumulation_steps must be an int or an object with an "
                "accumulation_steps attribute (e.g. batchops.tuning.AdaptiveBatchSize)"
            )
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"Trainer: checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if join not in (None, True, False):
            raise ValueError(f"Trainer: join must be None, True or False, got {join!r}")
        self.module = _unwrap(model)
        self._given_model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.batch_fn = batch_fn if batch_fn is not None else _default_split
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.amp = amp
        self.accumulation = accumulation_steps
        self.grad_clip_norm = grad_clip_norm
        self.join = join
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.checkpoint_every = checkpoint_every
        self.sampler = sampler
        self.callbacks = list(callbacks)
        self.progress = progress
        self.verbose = verbose
        self.ddp_kwargs = dict(ddp_kwargs or {})

        self.dist: DistInfo = setup_distributed(
            distributed=distributed, timeout=collective_timeout, device=None if device is None else torch.device(device)
        )
        if device is None:
            device = (
                torch.device("cuda", self.dist.local_rank % torch.cuda.device_count())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

        # autocast / scaler
        self.autocast_dtype: torch.dtype | None = None
        if amp is True:
            self.autocast_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        elif amp in ("bf16", "bfloat16"):
            self.autocast_dtype = torch.bfloat16
        elif amp in ("fp16", "float16"):
            self.autocast_dtype = torch.float16
        use_scaler = self.autocast_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=True) if use_scaler else None

        self.module.to(self.device)
        self.model: nn.Module = self.module  # the module training steps call (DDP when wrapped)
        self._wrapped = False

        # progress counters
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self._epoch_loss_sum = 0.0
        self._epoch_loss_count = 0
        self._pending_rng: dict[str, Any] | None = None
        self._pending_sampler: dict[str, Any] | None = None
        self._resumed_from: str | None = None
        self._last_checkpoint: str | None = None
        self._join_active = False
        self._warned: set = set()

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _callback(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    def _accumulation_steps(self) -> int:
        if isinstance(self.accumulation, numbers.Integral):
            return int(self.accumulation)
        return max(1, int(self.accumulation.accumulation_steps))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _wrap(self) -> None:
        if self._wrapped:
            return
        self._wrapped = True
        if self.dist.distributed:
            if isinstance(self._given_model, nn.parallel.DistributedDataParallel):
                self.model = self._given_model
            else:
                kwargs = dict(self.ddp_kwargs)
                if self.device.type == "cuda":
                    kwargs.setdefault("device_ids", [self.device.index])
                self.model = nn.parallel.DistributedDataParallel(self.module, **kwargs)

    # ------------------------------------------------------------------ data
    def _resumable_sampler(self, loader: Any) -> tuple[Any, int]:
        """``(sampler with state_dict, unit)``: unit = 1 for a batch sampler, else the batch size."""
        if self.sampler is not None:
            bs = getattr(loader, "batch_sampler", None)
            if self.sampler is bs or getattr(loader, "batch_size", None) is None:
                return self.sampler, 1
            return self.sampler, int(loader.batch_size)
        bs = getattr(loader, "batch_sampler", None)
        if bs is not None and hasattr(bs, "state_dict") and hasattr(bs, "load_state_dict"):
            return bs, 1
        s = getattr(loader, "sampler", None)
        if (
            s is not None
            and hasattr(s, "state_dict")
            and hasattr(s, "load_state_dict")
            and getattr(loader, "batch_size", None)
        ):
            return s, int(loader.batch_size)
        return None, 0

    @staticmethod
    def _set_epoch(loader: Any, epoch: int) -> None:
        seen = set()
        candidates = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
        bs = getattr(loader, "batch_sampler", None)
        if bs is not None:
            candidates.append(getattr(bs, "sampler", None))
        for obj in candidates:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            fn = getattr(obj, "set_epoch", None)
            if callable(fn):
                fn(epoch)

    def _epoch_iterator(self, loader: Any, epoch: int, start_batch: int) -> Iterator[Any]:
        self._set_epoch(loader, epoch)
        skip = 0
        if start_batch:
            sampler, unit = self._resumable_sampler(loader)
            if sampler is not None:
                state = dict(self._pending_sampler or sampler.state_dict())
                state["epoch"] = epoch
                state["position"] = (
                    min(start_batch * unit, len(sampler)) if hasattr(sampler, "__len__") else start_batch * unit
                )
                sampler.load_state_dict(state)
            else:
                self._warn_once(
                    "fast-forward",
                    (
                        "batchops.train: the loader has no resumable sampler (state_dict/load_state_dict); "
                        f"resuming mid-epoch by loading and skipping {start_batch} batches. This is exact only "
                        "if the loader's order is a function of the epoch (set_epoch) or of a seeded generator."
                    ),
                )
                skip = start_batch
        self._pending_sampler = None
        it = iter(loader)
        for _ in range(skip):
            next(it)
        return it

    # ------------------------------------------------------------------ one micro-batch
    def _forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any, Any]:
        non_blocking = self.device.type == "cuda"
        batch = apply_to_tensors(lambda t: t.to(self.device, non_blocking=non_blocking), batch)
        inputs, targets = self.batch_fn(batch)
        with self._autocast():
            if isinstance(inputs, dict):
                outputs = model(**inputs)
            elif isinstance(inputs, (list, tuple)):
                outputs = model(*inputs)
            else:
                outputs = model(inputs)
        out = outputs
        if (
            isinstance(out, torch.Tensor)
            and out.is_floating_point()
            and out.dtype != torch.float32
            and self.autocast_dtype is not None
        ):
            out = out.float()
        loss = self.loss_fn(out, targets)
        return loss, outputs, targets

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs except the RNG states of the other ranks (see
        :meth:`save_checkpoint`, which gathers them)."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "batch_size": (
                self.accumulation.state_dict()
                if not isinstance(self.accumulation, numbers.Integral) and hasattr(self.accumulation, "state_dict")
                else None
            ),
            "progress": {
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "epoch_loss_sum": float(self._epoch_loss_sum),
                "epoch_loss_count": int(self._epoch_loss_count),
            },
            "world_size": self.world_size,
            "sampler": None,
        }
        return state

    def save_checkpoint(self, path: str | None = None, *, loader: Any = None) -> str | None:
        """Write a checkpoint (collective: every rank must call it at the same point).

        Every rank's RNG states are gathered to rank 0, which writes the file atomically; the
        outcome is broadcast so that all ranks raise if the write failed. Returns the path.
        """
        import torch.distributed as dist

        path = path if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("save_checkpoint: no path (pass one or set checkpoint_path)")
        path = os.fspath(path)
        rng = get_rng_state()
        if self.dist.distributed:
            rngs: list[Any] = [None] * self.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        error: str | None = None
        if self.is_main:
            try:
                state = self.state_dict()
                state["rng"] = rngs
                if loader is not None:
                    sampler, unit = self._resumable_sampler(loader)
                    if sampler is not None:
                        s = dict(sampler.state_dict())
                        s["position"] = self.batch_in_epoch * unit  # consumed, not prefetched
                        s["unit"] = unit
                        state["sampler"] = s
                atomic_save(state, path)
            except Exception as exc:  # report on every rank, not only here
                error = f"{type(exc).__name__}: {exc}"
                if not self.dist.distributed:
                    raise
        if self.dist.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RuntimeError(f"batchops.train: rank 0 could not write the checkpoint {path!r}: {error}")
        self._last_checkpoint = path
        return path

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load a checkpoint (``weights_only=True``) into the model, optimizer, scheduler,
        scaler and batch-size controller; sampler position and RNG states are applied when the
        training loop reaches the saved point. Call before :meth:`fit` (which does it for
        ``resume=``)."""
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"batchops.train: {path!r} is not a {CHECKPOINT_FORMAT} checkpoint (format {ckpt.get('format')!r})"
            )
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("batch_size") is not None and hasattr(self.accumulation, "load_state_dict"):
            self.accumulation.load_state_dict(ckpt["batch_size"])
        p = ckpt["progress"]
        self.epoch = int(p["epoch"])
        self.batch_in_epoch = int(p["batch_in_epoch"])
        self.global_step = int(p["global_step"])
        self._epoch_loss_sum = float(p.get("epoch_loss_sum", 0.0))
        self._epoch_loss_count = int(p.get("epoch_loss_count", 0))
        rngs = ckpt.get("rng") or []
        saved_ws = int(ckpt.get("world_size", len(rngs) or 1))
        if saved_ws != self.world_size:
            warnings.warn(
                f"batchops.train: the checkpoint was written by {saved_ws} ranks, this run has "
                f"{self.world_size}; the RNG streams and the data order will differ",
                RuntimeWarning,
                stacklevel=2,
            )
        if rngs:
            self._pending_rng = rngs[self.rank] if self.rank < len(rngs) else rngs[0]
        sampler = ckpt.get("sampler")
        if sampler is not None:
            sampler = dict(sampler)
            sampler.pop("unit", None)
        self._pending_sampler = sampler
        self._resumed_from = os.fspath(path)
        return ckpt

    # ------------------------------------------------------------------ uneven data
    def _use_join(self, loader: Any, start_batch: int) -> bool:
        if not self.dist.distributed:
            return False
        n = _loader_len(loader)
        lengths = [v[0] for v in all_gather_ints([-1 if n is None else n - start_batch], self.device)]
        unknown = any(v < 0 for v in lengths)
        uneven = unknown or len(set(lengths)) > 1
        if self.join is False:
            if uneven and not unknown:
                raise ValueError(
                    f"batchops.train: the ranks' loaders give different numbers of batches {lengths} and "
                    "join=False; the ranks that run out would leave the others waiting in DDP's all-reduce. "
                    "Use join=None/True, or give every rank the same number of batches."
                )
            return False
        if not uneven and self.join is None:
            return False
        sbn = find_sync_batchnorm(self.module)
        if sbn is not None:
            if unknown and self.join is None:
                self._warn_once(
                    "sbn-unknown",
                    (
                        "batchops.train: the loader has no len(), so the ranks may see different numbers of "
                        f"batches, and the model has a SyncBatchNorm ({sbn[0]}: {sbn[1]}), which Join cannot "
                        "handle; training without Join: uneven data would fail at the collective timeout."
                    ),
                )
                return False
            what = f"give different numbers of batches {lengths}" if not unknown else "have no len()"
            raise UnevenInputsError(
                f"batchops.train: the ranks' loaders {what}, which needs DDP's Join context manager, but the "
                f"model contains a SyncBatchNorm (module {sbn[0]!r}, class {sbn[1]}): Join cannot shadow "
                "SyncBatchNorm's collectives in the forward pass, so the ranks that finish early would leave "
                "the others hanging until the collective timeout. Give every rank the same number of batches "
                "(batchops samplers and DistributedSampler do; or drop_last=True), or use a non-synchronized "
                "batch norm."
            )
        return True

    # ------------------------------------------------------------------ training
    def _train_epoch(self, loader: Any, epoch: int, max_steps: int | None) -> bool:
        """One (possibly resumed) epoch; returns True when it ran to the end of the data."""
        from torch.distributed.algorithms.join import Join, Joinable

        start_batch = self.batch_in_epoch
        resumed_mid_epoch = start_batch > 0
        if not resumed_mid_epoch and self._pending_rng is not None:
            set_rng_state(self._pending_rng)  # the saved state preceded the epoch's iter()
            self._pending_rng = None
        if not resumed_mid_epoch:
            self._epoch_loss_sum, self._epoch_loss_count = 0.0, 0
        use_join = self._use_join(loader, start_batch)
        self._join_active = use_join
        model = self.model
        model.train()
        it = self._epoch_iterator(loader, epoch, start_batch)
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)  # after iter(): the interrupted run had drawn its seed already
            self._pending_rng = None
        total = _loader_len(loader)
        bar = None
        if self.progress and self.is_main:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total,
                    initial=start_batch,
                    desc=f"epoch {epoch + 1}",
                    leave=False,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            except ImportError:  # pragma: no cover
                bar = None
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if use_join:
            joinables = [model] + ([self.optimizer] if isinstance(self.optimizer, Joinable) else [])
            join_ctx: Any = Join(joinables)
        else:
            join_ctx = contextlib.nullcontext()
        finished = True
        step_losses: list[torch.Tensor] = []
        try:
            with join_ctx:
                cycle_len = cycle_done = 0
                cycle_loss = None
                # Peek one batch ahead only when the length is unknown: loading a batch early would
                # move the RNG streams a dataset draws from relative to a resumed run.
                items = _Peek(it) if total is None else _Known(it, total - start_batch)
                for batch, is_last in items:
                    if cycle_done == 0:
                        accum = self._accumulation_steps()
                        cycle_len = accum if total is None else max(1, min(accum, total - self.batch_in_epoch))
                        cycle_loss = None
                    self._callback("on_batch_start", batch)
                    final = cycle_done + 1 >= cycle_len or is_last
                    sync_ctx = model.no_sync() if (ddp and not final) else contextlib.nullcontext()
                    with sync_ctx:
                        loss, _outputs, _targets = self._forward(model, batch)
                        scaled = loss / cycle_len if cycle_len > 1 else loss
                        if self.scaler is not None:
                            self.scaler.scale(scaled).backward()
                        else:
                            scaled.backward()
                    detached = loss.detach().float()
                    cycle_loss = detached if cycle_loss is None else cycle_loss + detached
                    cycle_done += 1
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    self._callback("on_batch_end", batch, detached)
                    if not final:
                        continue
                    if cycle_done < cycle_len:  # unknown length: a short last cycle
                        for p in self.module.parameters():
                            if p.grad is not None:
                                p.grad.mul_(cycle_len / cycle_done)
                    step_loss = cycle_loss / cycle_done if cycle_done > 1 else cycle_loss
                    self._optimizer_step()
                    used = cycle_done
                    cycle_done = 0
                    self.global_step += 1
                    step_losses.append(step_loss)
                    if self.scheduler is not None and self.scheduler_interval == "step":
                        self.scheduler.step()
                    if hasattr(self.accumulation, "update") and not isinstance(self.accumulation, numbers.Integral):
                        self.accumulation.update(self.optimizer, micro_steps=used)
                    self._callback("on_step_end", step_loss)
                    if bar is not None and (self.global_step % 10 == 0 or is_last):
                        bar.set_postfix(loss=f"{float(step_loss):.4f}", refresh=False)
                    stop = self.should_stop or (max_steps is not None and self.global_step >= max_steps)
                    if stop and not is_last:
                        finished = False
                        break
                    if (
                        self.checkpoint_every
                        and self.checkpoint_path
                        and not is_last
                        and self.global_step % self.checkpoint_every == 0
                    ):
                        if use_join:
                            self._warn_once(
                                "join-ckpt",
                                "batchops.train: mid-epoch checkpoints are skipped while Join handles uneven loaders",
                            )
                        else:
                            self._flush_losses(step_losses)
                            self.save_checkpoint(loader=loader)
        finally:
            if bar is not None:
                bar.close()
            self._flush_losses(step_losses)
            self._join_active = False
        return finished

    def _flush_losses(self, step_losses: list[torch.Tensor]) -> None:
        """Move the step losses (tensors, to avoid a device sync per step) into floats."""
        if not step_losses:
            return
        values = torch.stack([s.reshape(()) for s in step_losses]).cpu().tolist()
        self._result.step_losses.extend(values)
        self._epoch_loss_sum += sum(values)
        self._epoch_loss_count += len(values)
        step_losses.clear()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # callbacks and clipping see the true gradients
        self._callback("on_before_step")
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _reduce_sums(self, values: Sequence[float]) -> list[float]:
        if not self.dist.distributed:
            return list(values)
        import torch.distributed as dist

        from batchops.train.distributed import comm_device

        t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(self.device))
        dist.all_reduce(t)
        return t.cpu().tolist()

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any], *, gather: bool = False) -> dict[str, Any]:
        """Loss (and accuracy for class scores) over ``loader``, summed across ranks.

        Each rank evaluates its own loader (with the unwrapped model, so ranks may have different
        numbers of batches); the sums are all-reduced, so every rank gets the global ``loss``,
        ``accuracy`` (when outputs are ``(N, C, ...)`` scores and targets integer classes) and
        ``count``. With ``gather=True`` also ``outputs`` and ``targets``: every rank's tensors
        concatenated in rank order (sizes are gathered first, so unequal last batches are fine).
        A collective: every rank must call it.
        """
        module = self.module
        was_training = module.training
        module.eval()
        loss_sum = 0.0
        correct = 0
        count = 0
        classify = True
        outs: list[torch.Tensor] = []
        tgts: list[torch.Tensor] = []
        try:
            for batch in loader:
                loss, outputs, targets = self._forward(module, batch)
                n = int(targets.shape[0]) if isinstance(targets, torch.Tensor) and targets.dim() > 0 else 1
                loss_sum += float(loss) * n
                count += n
                if (
                    classify
                    and isinstance(outputs, torch.Tensor)
                    and isinstance(targets, torch.Tensor)
                    and outputs.dim() >= 2
                    and not targets.is_floating_point()
                    and tuple(targets.shape) == tuple(outputs.shape[:1]) + tuple(outputs.shape[2:])
                ):
                    correct += int((outputs.argmax(1) == targets).sum())
                else:
                    classify = False
                if gather:
                    outs.append(outputs.detach().float() if outputs.is_floating_point() else outputs.detach())
                    tgts.append(targets.detach())
        finally:
            module.train(was_training)
        flags = self._reduce_sums([loss_sum, float(correct), float(count), 0.0 if classify else 1.0])
        loss_total, correct_total, count_total, not_classify = flags
        result: dict[str, Any] = {"loss": loss_total / max(count_total, 1.0), "count": int(count_total)}
        if not_classify == 0.0 and count_total > 0:
            result["accuracy"] = correct_total / count_total
        if gather:
            local_out = torch.cat(outs, 0) if outs else torch.empty(0)
            local_tgt = torch.cat(tgts, 0) if tgts else torch.empty(0, dtype=torch.int64)
            result["outputs"] = gather_variable(local_out)
            result["targets"] = gather_variable(local_tgt)
        return result

    def fit(
        self,
        train_loader: Iterable[Any],
        *,
        epochs: int = 1,
        eval_loader: Iterable[Any] | None = None,
        max_steps: int | None = None,
        resume: bool | str | None = None,
    ) -> FitResult:
        """Train for ``epochs`` epochs in total (a resumed run continues where it stopped).

        ``resume``: a checkpoint path, or ``True`` for ``checkpoint_path`` when that file
        exists. ``max_steps``: stop after this many optimizer steps in total (a checkpoint is
        written then when ``checkpoint_path`` is set), e.g. to interrupt a run mid-epoch.

        A failed collective (a rank died, was killed, or stalled past the collective timeout)
        raises :class:`~batchops.train.DistributedTrainingError`, a ``RuntimeError``.
        """
        self._result = FitResult(rank=self.rank, world_size=self.world_size)
        try:
            return self._fit(train_loader, epochs, eval_loader, max_steps, resume)
        except (DistributedTrainingError, UnevenInputsError):
            raise
        except Exception as exc:
            if self.dist.distributed and is_collective_error(exc):
                raise DistributedTrainingError(
                    f"batchops.train: rank {self.rank} of {self.world_size}: a collective operation failed at "
                    f"epoch {self.epoch}, optimizer step {self.global_step} (batch {self.batch_in_epoch} of the "
                    "epoch): another rank probably died, was killed, or did not reach this collective within "
                    f"the collective timeout. Backend error: {type(exc).__name__}: {str(exc).strip()[:2000]}",
                    rank=self.rank,
                    world_size=self.world_size,
                    epoch=self.epoch,
                    step=self.global_step,
                ) from exc
            raise

    def _fit(self, train_loader, epochs, eval_loader, max_steps, resume) -> FitResult:
        result = self._result
        if resume:
            path = self.checkpoint_path if resume is True else os.fspath(resume)
            if path is None:
                raise ValueError("fit(resume=True) needs checkpoint_path")
            if resume is not True or os.path.exists(path):
                self.load_checkpoint(path)
        if self.dist.distributed and self.epoch < epochs:
            # Uneven loaders + SyncBatchNorm: refuse before DDP is even built (see _use_join).
            self._use_join(train_loader, self.batch_in_epoch)
        self._wrap()
        result.resumed_from = self._resumed_from
        self.optimizer.zero_grad(set_to_none=True)
        self._callback("on_train_start")
        stopped = False
        while self.epoch < epochs:
            epoch = self.epoch
            started = time.perf_counter()
            steps_before = self.global_step
            self._callback("on_epoch_start", epoch)
            finished = self._train_epoch(train_loader, epoch, max_steps)
            if not finished:
                stopped = True
                if self.checkpoint_path:
                    self.save_checkpoint(loader=train_loader)
                break
            sums = self._reduce_sums([self._epoch_loss_sum, float(self._epoch_loss_count)])
            metrics: dict[str, float] = {
                "epoch": epoch,
                "train_loss": sums[0] / max(sums[1], 1.0),
                "steps": self.global_step - steps_before,
            }
            if eval_loader is not None:
                ev = self.evaluate(eval_loader)
                metrics["eval_loss"] = ev["loss"]
                metrics["eval_count"] = ev["count"]
                if "accuracy" in ev:
                    metrics["eval_accuracy"] = ev["accuracy"]
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            metrics["seconds"] = time.perf_counter() - started
            result.history.append(metrics)
            if self.verbose and self.is_main:
                parts = [f"epoch {epoch + 1}/{epochs}", f"train loss {metrics['train_loss']:.4f}"]
                if "eval_loss" in metrics:
                    parts.append(f"eval loss {metrics['eval_loss']:.4f}")
                if "eval_accuracy" in metrics:
                    parts.append(f"eval accuracy {metrics['eval_accuracy']:.4f}")
                parts.append(f"{metrics['seconds']:.1f} s")
                print(", ".join(parts), flush=True)
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_loss_sum, self._epoch_loss_count = 0.0, 0
            self._callback("on_epoch_end", epoch, metrics)
            stop = self.should_stop or (max_steps is not None and self.global_step >= max_steps)
            if self.checkpoint_path:
                self.save_checkpoint(loader=train_loader)
            if stop and self.epoch < epochs:
                stopped = True
                break
        result.global_step = self.global_step
        result.epoch = self.epoch
        result.batch_in_epoch = self.batch_in_epoch
        result.stopped_early = stopped
        result.checkpoint_path = self._last_checkpoint
        self._callback("on_train_end", result)
        return result


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    *,
    # Trainer.fit's keywords, restated so that the one-call form has the method's signature.
    epochs: int = 1,
    eval_loader: Iterable[Any] | None = None,
    max_steps: int | None = None,
    resume: bool | str | None = None,
    **trainer_kwargs: Any,
) -> FitResult:
    """``Trainer(model, optimizer, **trainer_kwargs).fit(train_loader, epochs=..., ...)``."""
    trainer = Trainer(model, optimizer, **trainer_kwargs)
    return trainer.fit(train_loader, epochs=epochs, eval_loader=eval_loader, max_steps=max_steps, resume=resume)
