"""What differs between the torch releases batchops supports (2.11 to the newest tested, 2.14)."""

from __future__ import annotations

import inspect

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_TAKES_BIAS", "emulate_bias_flag", "make_norm"]

# The batch-norm constructors' keyword-only `bias` is newer than torch 2.11, whose _NormBase
# has no such argument. Where it is missing, bias=False is emulated the way newer releases
# implement it: the module keeps `weight` and registers `bias` as None.
NORM_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


def emulate_bias_flag(module: nn.Module, bias: bool) -> None:
    """What ``bias=False`` does where the constructor takes it, for a module built without it."""
    if module.affine and not bias:
        module.register_parameter("bias", None)


def make_norm(cls: type[nn.Module], *args, bias: bool = True, **kwargs) -> nn.Module:
    """``cls(*args, bias=bias, **kwargs)`` for torch's batch-norm classes (BatchNorm1d/2d/3d,
    SyncBatchNorm) on every supported torch, including those whose constructors lack `bias`."""
    if NORM_TAKES_BIAS:
        return cls(*args, bias=bias, **kwargs)
    module = cls(*args, **kwargs)
    emulate_bias_flag(module, bias)
    return module
