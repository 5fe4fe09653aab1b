"""torch.ops.batchops.max_pool2d and its backward: fake kernels (autograd is C++:
csrc/max_pool/autograd.cpp).

Same values and indices as torch's max_pool2d_with_indices; the backward takes the indices and
the input's size (not the input) and, for CUDA's gather, the window arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from batchops._extension import extension_available
from batchops.ops.common import kernel_memory_format, op_caller

__all__ = ["max_pool2d", "max_pool2d_backward"]

_max_pool2d = op_caller("max_pool2d")
_max_pool2d_backward = op_caller("max_pool2d_backward")


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


def _fake_forward(input, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    # torch's meta kernel: its shapes, its checks and its choice of layout, which the kernels
    # share (csrc/max_pool/plan.cpp).
    return torch.ops.aten.max_pool2d_with_indices.default(input, kernel_size, stride, padding, dilation, ceil_mode)


def _fake_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation):
    # The gradient takes the layout the indices have (plan_max_pool2d_backward).
    fmt = kernel_memory_format(indices)
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


if extension_available():
    torch.library.register_fake("batchops::max_pool2d")(_fake_forward)
    torch.library.register_fake("batchops::max_pool2d_backward")(_fake_backward)
