from batchops.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm, revert_batchnorm
from batchops.nn.linear import GroupedLinear, Linear

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm", "revert_batchnorm", "Linear",
           "GroupedLinear"]
