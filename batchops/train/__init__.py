"""A small, careful training loop: ``batchops.train.fit`` / :class:`Trainer`.

* **DDP** when launched by ``torchrun`` (``env://`` from ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; ``nccl`` on GPUs, ``gloo`` on the CPU,
  ``LOCAL_RANK`` picks the GPU) or inside an already initialized process group; one process
  otherwise.
* **Mixed precision**: ``amp=True`` is float16 autocast + ``GradScaler`` on CUDA and bfloat16
  autocast on the CPU; ``amp="bf16"`` / ``"fp16"`` choose explicitly.
* **Gradient accumulation** (an int, or :class:`batchops.tuning.AdaptiveBatchSize`), with DDP's
  ``no_sync`` on the non-final micro-batches.
* **Samplers** get ``set_epoch`` every epoch; **evaluation** sums (and optionally gathers
  outputs/targets of unequal sizes) across ranks; **tqdm** bars on rank 0 only.
* **Checkpoints**: model (unwrapped), optimizer, scheduler, scaler, sampler position (batches
  consumed, not prefetched), batch-size controller, every RNG state of every rank; loadable with
  ``torch.load(weights_only=True)``; written atomically by rank 0. A run interrupted mid-epoch
  resumes with no sample repeated or skipped and (on the CPU) a bitwise identical loss trajectory.
* **Uneven loaders**: DDP's ``Join`` context manager, or a clear error when the model has a
  SyncBatchNorm (which ``Join`` cannot shadow).
* **Failures are bounded**: a collective timeout is set when the group is created, and a failed
  collective (a peer died or stalled) raises :class:`DistributedTrainingError`, never hangs.

Pure Python + torch: nothing here needs batchops' compiled kernels.
"""

from batchops.train.checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from batchops.train.distributed import (
    DistInfo,
    DistributedTrainingError,
    gather_variable,
    is_collective_error,
    setup_distributed,
)
from batchops.train.trainer import (
    CHECKPOINT_FORMAT,
    Callback,
    FitResult,
    Trainer,
    UnevenInputsError,
    find_sync_batchnorm,
    fit,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "Callback",
    "DistInfo",
    "DistributedTrainingError",
    "FitResult",
    "Trainer",
    "UnevenInputsError",
    "atomic_save",
    "find_sync_batchnorm",
    "fit",
    "gather_variable",
    "get_rng_state",
    "is_collective_error",
    "load_checkpoint",
    "set_rng_state",
    "setup_distributed",
]
