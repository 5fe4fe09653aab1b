"""Data-side batching utilities (torch.utils.data conventions); no compiled kernels needed.

* :class:`ResumableDistributedSampler` -- the shared sampler contract (seed + ``set_epoch``,
  rank sharding as DistributedSampler, exact ``len``, exact mid-epoch resume).
* :class:`BucketBatchSampler` -- length-bucketed batches under a token budget or a batch size.
"""
from batchops.data.bucket import BucketBatchSampler
from batchops.data.sampler_contract import ResumableDistributedSampler, resolve_replicas

__all__ = ["BucketBatchSampler", "ResumableDistributedSampler", "resolve_replicas"]
