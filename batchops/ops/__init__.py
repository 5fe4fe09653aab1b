"""Thin wrappers over torch.ops.batchops.*, with their fake kernels and autograd.

Importing this package registers the Python side of every op (only when the compiled
module loaded: registering against a missing op would fail).
"""

from batchops.ops.batch_norm import batch_norm_backward, batch_norm_forward
from batchops.ops.linear import grouped_linear_forward, linear_forward
from batchops.ops.max_pool import max_pool2d, max_pool2d_backward
from batchops.ops.packing import gather_rows

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "gather_rows",
    "linear_forward",
    "grouped_linear_forward",
    "max_pool2d",
    "max_pool2d_backward",
]
