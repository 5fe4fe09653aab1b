"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d on batchops kernels.

They share torch's base class _NormBase, so the constructor, parameters, buffers,
state_dict keys (and the loading of old state_dicts), reset_* and extra_repr are torch's own.
They deliberately do not subclass torch's _BatchNorm: code that special-cases torch batch
norm (conv-bn folding, convert_sync_batchnorm) would silently drop the fused activation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from batchops import functional as F
from batchops.nn._compat import NORM_TAKES_BIAS, emulate_bias_flag, make_norm
from batchops.ops.common import check_activation

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert_batchnorm",
    "revert_batchnorm",
    "replace_norm",
    "BATCHOPS_FOR_TORCH",
    "TORCH_FOR_BATCHOPS",
]


class BatchNormBase(_NormBase):
    """What batchops' BatchNorm1d/2d/3d and SyncBatchNorm share (torch's _BatchNorm, on our kernels)."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        check_activation(type(self).__name__, activation)
        if NORM_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        else:  # torch 2.11: emulate bias=False as newer releases implement it (see nn/_compat.py)
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            emulate_bias_flag(self, bias)
        self.activation = activation

    def reset_parameters(self) -> None:
        # torch 2.11's version zero-fills self.bias unconditionally; bias=False makes it None.
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            expected = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation is not None else "")

    def _training_momentum(self) -> float | Tensor:
        """Count a training batch in num_batches_tracked and return the running-statistics
        momentum: the module's, or 1 / num_batches_tracked (cumulative average) when it is None."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                if self.momentum is None:
                    # A tensor factor, not 1/float(buffer): no host sync, and torch.compile(fullgraph=True)
                    # can trace it (torch's module breaks there).
                    momentum = 1.0 / tracked.to(torch.float64)
        return momentum

    def forward(
        self, input: Tensor, residual: Tensor | None = None, *, max_pool: tuple[Any, ...] | None = None
    ) -> Tensor:
        """act(bn(input) + residual); with ``max_pool`` = (kernel_size, stride, padding, dilation,
        ceil_mode), that output max-pooled as ``F.max_pool2d`` would (4-D input, no residual,
        activation None or "relu"; ``batchops.fuse`` passes it for resnet's stem)."""
        self._check_input_dim(input)
        momentum = self._training_momentum()
        # Parameters and buffers read once: each read goes through nn.Module.__getattr__.
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        track = not self.training or self.track_running_stats
        args = (
            input,
            running_mean if track else None,
            running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        if max_pool is None:
            return F.batch_norm(*args, activation=self.activation, residual=residual)
        if residual is not None:
            raise ValueError(f"{type(self).__name__}: max_pool cannot be combined with a residual")
        kernel_size, stride, padding, dilation, ceil_mode = max_pool
        return F.batch_norm_max_pool2d(
            *args,
            activation=self.activation,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
        )


class BatchNorm1d(BatchNormBase):
    """torch.nn.BatchNorm1d on batchops kernels; forward(input, residual=None) returns
    activation(bn(input) + residual)."""

    _expected_dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """torch.nn.BatchNorm2d on batchops kernels (NCHW and channels-last natively)."""

    _expected_dims = (4,)


class BatchNorm3d(BatchNormBase):
    """torch.nn.BatchNorm3d on batchops kernels (NCDHW and channels-last-3d natively)."""

    _expected_dims = (5,)


# torch's batch norm classes and batchops' drop-ins, both ways (convert/revert here, fuse/unfuse).
BATCHOPS_FOR_TORCH = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
TORCH_FOR_BATCHOPS = {v: k for k, v in BATCHOPS_FOR_TORCH.items()}


def replace_norm(module: nn.Module, cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """A ``cls`` batch norm that takes the place of ``module`` (any torch or batchops batch norm):
    built with its num_features, eps, momentum, affine, track_running_stats and bias, then
    ``args`` and ``kwargs``; its parameters and buffers are ``module``'s own, shared, not copied,
    so optimizer state and devices carry over; its train/eval mode and qconfig are ``module``'s."""
    new = make_norm(
        cls,
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        *args,
        bias=module.bias is not None or not module.affine,
        **kwargs,
    )
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in `module` (or `module` itself) with the
    batchops equivalent, keeping parameters, buffers and train/eval mode. Returns the new
    module; like SyncBatchNorm.convert_sync_batchnorm, use the return value."""
    out = module
    if type(module) in BATCHOPS_FOR_TORCH:
        out = replace_norm(module, BATCHOPS_FOR_TORCH[type(module)])
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child))
    return out


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """The reverse of convert_batchnorm: batchops batch norms become torch's. A fused
    activation has no torch equivalent inside BatchNorm, so those raise a ValueError."""
    out = module
    if type(module) in TORCH_FOR_BATCHOPS:
        if module.activation is not None:
            raise ValueError(
                f"revert_batchnorm: {type(module).__name__} with activation={module.activation!r} has no "
                "torch.nn equivalent; set activation=None first or keep the batchops module"
            )
        out = replace_norm(module, TORCH_FOR_BATCHOPS[type(module)])
    for name, child in module.named_children():
        out.add_module(name, revert_batchnorm(child))
    return out
