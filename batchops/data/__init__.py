"""Data-side batching utilities (torch.utils.data conventions); no compiled kernels needed.

Samplers (all on one contract: seed + ``set_epoch``, rank sharding as DistributedSampler, exact
``len``, exact mid-epoch resume through ``state_dict`` / ``load_state_dict``):

* :class:`ResumableDistributedSampler` -- the shared contract, the base class of the others.
* :class:`BucketBatchSampler` -- length-bucketed batches under a token budget or a batch size.
* :class:`LossWeightedSampler` -- hard-example mining with unbiased importance weights.
* :class:`CurriculumSampler` -- easiest-first pacing (linear, root, exponential step, callable).
* :class:`ShuffledBatchSampler` -- plain shuffled mini-batches (``minibatches`` for arrays).
* :class:`DistributedSamplerWrapper` -- shards any sampler and forwards ``set_epoch``.

Datasets and loading: :class:`MemmapDataset` (+ writers) and :class:`DevicePrefetcher`.
"""

from batchops.data.bucket import BucketBatchSampler
from batchops.data.curriculum import PACING_FUNCTIONS, CurriculumSampler
from batchops.data.distributed import DistributedSamplerWrapper
from batchops.data.loss_weighted import LossWeightedSampler
from batchops.data.memmap import (
    MemmapBatch,
    MemmapDataset,
    MemmapWriter,
    memmap_collate,
    write_memmap_batches,
    write_memmap_dataset,
)
from batchops.data.minibatch import ShuffledBatchSampler, minibatch_gd_linear_regression, minibatches
from batchops.data.prefetch import DevicePrefetcher, apply_to_tensors
from batchops.data.sampler_contract import ResumableDistributedSampler, resolve_replicas

__all__ = [
    "BucketBatchSampler",
    "CurriculumSampler",
    "DevicePrefetcher",
    "DistributedSamplerWrapper",
    "LossWeightedSampler",
    "MemmapBatch",
    "MemmapDataset",
    "MemmapWriter",
    "PACING_FUNCTIONS",
    "ResumableDistributedSampler",
    "ShuffledBatchSampler",
    "apply_to_tensors",
    "memmap_collate",
    "minibatch_gd_linear_regression",
    "minibatches",
    "resolve_replicas",
    "write_memmap_batches",
    "write_memmap_dataset",
]
