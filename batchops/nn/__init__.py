from batchops.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm, revert_batchnorm
from batchops.nn.fuse import FusionReport, fuse, unfuse
from batchops.nn.linear import GroupedLinear, Linear
from batchops.nn.pooling import MaxPool2d
from batchops.nn.sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert_batchnorm",
    "revert_batchnorm",
    "Linear",
    "GroupedLinear",
    "MaxPool2d",
    "SyncBatchNorm",
    "fuse",
    "unfuse",
    "FusionReport",
]
