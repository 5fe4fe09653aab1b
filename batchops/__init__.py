"""batchops: fused batch-processing kernels (CPU and CUDA) for PyTorch training."""

from batchops import (
    data,
    functional,
    ops,  # noqa: F401  (importing registers the fake kernels of every op)
    train,
    tuning,
)
from batchops._extension import build_info, extension_available
from batchops._version import __version__
from batchops.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FusionReport,
    GroupedLinear,
    Linear,
    MaxPool2d,
    SyncBatchNorm,
    convert_batchnorm,
    fuse,
    revert_batchnorm,
    unfuse,
)
from batchops.packing import pack_padded_sequence, pad, pad_packed_sequence, unpad

__all__ = [
    "__version__",
    "build_info",
    "extension_available",
    "data",
    "train",
    "tuning",
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "Linear",
    "GroupedLinear",
    "MaxPool2d",
    "convert_batchnorm",
    "revert_batchnorm",
    "fuse",
    "unfuse",
    "FusionReport",
    "pack_padded_sequence",
    "pad_packed_sequence",
    "unpad",
    "pad",
]
