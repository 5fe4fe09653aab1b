"""Choosing a batch size: how large fits, how large helps, and growing it during training.

* :func:`find_batch_size` -- the largest batch size whose training step runs: doubling then
  binary search, catching out-of-memory errors on GPUs and, on the CPU (where running out of
  memory kills the process), extrapolating measured peak memory against a budget so that no
  trial that would not fit is run. Restores the model's and optimizer's state afterwards.
* :func:`estimate_noise_scale` -- the unbiased two-batch estimates of ``|G|^2`` and
  ``tr(Sigma)`` (McCandlish et al. 2018), whose ratio is the simple noise scale ``B_simple``,
  the batch size beyond which larger batches stop paying off.
* :class:`GradientNoiseScale` -- tracks ``B_simple`` during training at no extra cost, from
  gradient accumulation (micro-batch vs. accumulated gradient) or from several ranks (local
  vs. all-reduced gradient, with or without DDP).
* :class:`AdaptiveBatchSize` -- grows the effective batch toward ``B_simple`` by accumulating
  more micro-batches of a fixed size, and scales the learning rate (linear, sqrt, AdaScale).
* :func:`batch_size_sweep` -- the convergence study: train at several batch sizes and compare
  steps and samples to a target loss.

Pure Python + torch: none of it needs batchops' compiled kernels, except the default model of
:func:`batch_size_sweep` (a CNN on ``batchops.BatchNorm2d``; a ``model_fn`` of your own does not).
"""

from batchops.tuning.adaptive import AdaptiveBatchSize
from batchops.tuning.finder import FindBatchSizeResult, TrialRecord, find_batch_size, is_oom_error
from batchops.tuning.noise_scale import GradientNoiseScale, estimate_noise_scale
from batchops.tuning.sweep import batch_size_sweep

__all__ = [
    "AdaptiveBatchSize",
    "FindBatchSizeResult",
    "GradientNoiseScale",
    "TrialRecord",
    "batch_size_sweep",
    "estimate_noise_scale",
    "find_batch_size",
    "is_oom_error",
]
