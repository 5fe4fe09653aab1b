"""torch.ops.batchops.max_pool2d and its backward: fake kernels (autograd is C++:
csrc/max_pool/autograd.cpp).

Same values and indices as torch's max_pool2d_with_indices; the backward takes the indices and
the input's size (not the input) and, for CUDA's gather, the window arguments.
max_pool2d_batch_norm_backward is that backward with a batch norm's full-size backward pass
applied to its result, and max_pool2d_by_weight_sign a pool that takes the minimum on channels
with a negative weight (batchops/ops/batch_norm_max_pool.py uses both; no autograd of their own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from batchops._extension import extension_available
from batchops.ops.common import kernel_memory_format, op_caller

__all__ = ["max_pool2d", "max_pool2d_backward", "max_pool2d_batch_norm_backward", "max_pool2d_by_weight_sign"]

_max_pool2d = op_caller("max_pool2d")
_max_pool2d_backward = op_caller("max_pool2d_backward")
_max_pool2d_batch_norm_backward = op_caller("max_pool2d_batch_norm_backward")
_max_pool2d_by_weight_sign = op_caller("max_pool2d_by_weight_sign")


def max_pool2d(
    input: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """input (N, C, H, W) or (C, H, W) -> (output, indices), as torch's max_pool2d_with_indices."""
    return _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)


def max_pool2d_backward(
    grad_output: Tensor,
    indices: Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """The input's gradient: each output's gradient added at its index."""
    return _max_pool2d_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation)


def max_pool2d_batch_norm_backward(
    grad_output: Tensor,
    indices: Tensor,
    input: Tensor,
    coefficients: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """``alpha * g + beta * (input - center) + gamma`` per channel, with g =
    max_pool2d_backward(grad_output, indices, input.shape, ...) and coefficients = (alpha; beta;
    center; gamma), (4, C) in the statistics' dtype (float; double for double input): the pool's
    backward and a batch norm's full-size backward pass in one (csrc/max_pool/max_pool.h)."""
    return _max_pool2d_batch_norm_backward(
        grad_output, indices, input, coefficients, kernel_size, stride, padding, dilation
    )


def max_pool2d_by_weight_sign(
    input: Tensor,
    weight: Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """max_pool2d, except that channels with a negative weight take each window's smallest value
    (and its index): where batch norm then ReLU keep their largest (csrc/max_pool/max_pool.h)."""
    return _max_pool2d_by_weight_sign(input, weight, kernel_size, stride, padding, dilation, ceil_mode)


def _fake_forward(input, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    # torch's meta kernel: its shapes, its checks and its choice of layout, which the kernels
    # share (csrc/max_pool/plan.cpp).
    return torch.ops.aten.max_pool2d_with_indices.default(input, kernel_size, stride, padding, dilation, ceil_mode)


def _fake_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation):
    # The gradient takes the layout the indices have (plan_max_pool2d_backward).
    fmt = kernel_memory_format(indices)
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


def _fake_batch_norm_backward(grad_output, indices, input, coefficients, kernel_size, stride, padding, dilation):
    return _fake_backward(grad_output, indices, input.shape, kernel_size, stride, padding, dilation)


if extension_available():
    torch.library.register_fake("batchops::max_pool2d")(_fake_forward)
    torch.library.register_fake("batchops::max_pool2d_backward")(_fake_backward)
    torch.library.register_fake("batchops::max_pool2d_batch_norm_backward")(_fake_batch_norm_backward)
    torch.library.register_fake("batchops::max_pool2d_by_weight_sign")(
        lambda input, weight, *window: _fake_forward(input, *window)
    )
