"""Process-group setup and the few collectives the trainer needs (pure Python + torch).

* :func:`setup_distributed` -- use an initialized process group (the test harness, or the
  user's own code), or initialize one from the ``env://`` variables ``torchrun`` sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with a
  collective timeout; otherwise a single process.
* :func:`gather_variable` -- ``all_gather`` of tensors whose first dimension differs between
  ranks (sizes are gathered first, then padded blocks).
* :class:`DistributedTrainingError` and :func:`is_collective_error` -- what the trainer raises
  when a collective fails because a peer died, was killed or stalled past the timeout.

Failure behaviour: a rank that dies closes its sockets, so with ``gloo`` its peers' next
collective fails at once with a connection error; a rank that is alive but stuck makes its
peers' collectives fail after the collective ``timeout`` (``gloo`` raises; ``nccl``'s watchdog
aborts the communicator and, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default, ends the
process). ``torchrun`` itself stops the remaining workers as soon as one exits with an error.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DistInfo",
    "DistributedTrainingError",
    "gather_variable",
    "is_collective_error",
    "setup_distributed",
]

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_COLLECTIVE_TIMEOUT = 300.0


class DistributedTrainingError(RuntimeError):
    """A collective operation failed during distributed training: another rank died, was
    killed, or did not reach the same collective within the collective timeout.

    Attributes: ``rank``, ``world_size``, ``epoch``, ``step`` (where this rank was), and
    ``__cause__`` holds the backend's own exception.
    """

    def __init__(
        self, message: str, *, rank: int, world_size: int, epoch: int | None = None, step: int | None = None
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.step = step


@dataclasses.dataclass
class DistInfo:
    """Where this process stands: ``rank``/``world_size`` (0/1 in a single process),
    ``local_rank`` (``LOCAL_RANK``, else 0), ``backend`` (``None`` without a process group),
    ``initialized_here`` (the group was created by :func:`setup_distributed`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


_COLLECTIVE_MARKERS = (
    "gloo",
    "nccl",
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "processgroup",
    "watchdog",
    "communicator",
    "c10d",
)


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed collective (a ``torch.distributed.DistError``, or a
    ``RuntimeError`` whose message names the backend, a closed connection or a timeout)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _COLLECTIVE_MARKERS)


def _destroy_if_ours() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            import gc

            gc.collect()  # a DDP reducer still holding the group must go first
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - a failed peer can make this raise too
        pass


def setup_distributed(
    *,
    distributed: bool | None = None,
    backend: str | None = None,
    timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
    device: torch.device | None = None,
) -> DistInfo:
    """Join the process group this process belongs to, if any.

    * A process group that is already initialized is used as it is (``timeout`` is then the
      creator's business).
    * Otherwise, when ``distributed`` is not ``False`` and ``RANK``, ``WORLD_SIZE``,
      ``MASTER_ADDR`` and ``MASTER_PORT`` are set (``torchrun``), the group is initialized with
      ``init_method="env://"``, ``backend`` (default: ``"nccl"`` when CUDA is available and
      ``device`` is not a CPU device, else ``"gloo"``) and ``timeout`` seconds as the collective
      timeout; for ``nccl`` ``LOCAL_RANK`` selects the current CUDA device first. The group is
      destroyed at interpreter exit.
    * Otherwise (or with ``distributed=False``): a single process.

    ``distributed=True`` without a group or the variables raises ``RuntimeError``.
    """
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if distributed is False or not dist.is_available():
        if distributed:
            raise RuntimeError("batchops.train: torch.distributed is not available in this build of torch")
        return DistInfo(local_rank=0)
    if dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            backend=str(dist.get_backend()),
        )
    if not all(os.environ.get(k) for k in _ENV_VARS):
        if distributed:
            missing = [k for k in _ENV_VARS if not os.environ.get(k)]
            raise RuntimeError(
                "batchops.train: distributed=True but no process group is initialized and the env:// "
                f"variables {missing} are not set (launch with torchrun, or call init_process_group first)"
            )
        return DistInfo(local_rank=0)
    if backend is None:
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        backend = "nccl" if use_cuda else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=float(timeout)))
    atexit.register(_destroy_if_ours)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=str(dist.get_backend()),
        initialized_here=True,
    )


def comm_device(tensor_device: torch.device | None = None, group: Any = None) -> torch.device:
    """The device the collectives of ``group`` (default: the whole world) run on: CUDA for
    nccl (``tensor_device`` itself when it is a CUDA device), the CPU for gloo and the rest."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower():
        if tensor_device is not None and tensor_device.type == "cuda":
            return tensor_device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[int], device: torch.device = torch.device("cpu")) -> list[list[int]]:  # noqa: B008 (an immutable value)
    """Each rank's list of ints (same length on every rank), in rank order."""
    import torch.distributed as dist

    comm = comm_device(device)
    t = torch.tensor(list(values), dtype=torch.int64, device=comm)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (along dim 0, in rank order) every rank's ``tensor``; the first dimension may
    differ between ranks, the others and the dtype may not. Every rank gets the result, on
    ``tensor``'s device. Without a process group the tensor itself is returned."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    comm = comm_device(tensor.device)
    sizes = [s[0] for s in all_gather_ints([int(tensor.shape[0])], comm)]
    longest = max(sizes)
    local = tensor.detach().to(comm)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0],) + tuple(local.shape[1:]))
        local = torch.cat([local, pad], 0)
    local = local.contiguous()
    blocks = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(blocks, local)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)], 0).to(tensor.device)
