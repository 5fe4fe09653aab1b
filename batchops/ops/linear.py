"""torch.ops.batchops.{linear,grouped_linear}_{forward,backward}: fake kernels (autograd is in
C++: csrc/linear/autograd.cpp).

Each forward returns (output, saved): `saved` is the activation's derivative
act'(input @ weight^T + bias) for silu / gelu / gelu_tanh / hardswish / relu6, computed with the activation so
that backward is a multiply, and an empty tensor otherwise (relu's backward reads the
output) or when save_for_backward is False (no autograd: batchops.functional decides). See
csrc/linear/linear.h. The grouped forward also returns the groups' row offsets (int64, G + 1,
on the input's device), which its backward takes instead of making them again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchops._extension import compiled_module, extension_available
from batchops.ops.common import op_caller

__all__ = ["linear_forward", "grouped_linear_forward"]

_linear_forward = op_caller("linear_forward")
_grouped_linear_forward = op_caller("grouped_linear_forward")


def linear_forward(
    input: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, save_for_backward: bool = True
) -> tuple[Tensor, Tensor]:
    """-> (output, saved)."""
    return _linear_forward(input, weight, bias, activation, save_for_backward)


def grouped_linear_forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    group_sizes: Tensor | None,
    activation: str | None,
    save_for_backward: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (output, saved, group_offsets)."""
    return _grouped_linear_forward(input, weight, bias, group_sizes, activation, save_for_backward)


def _out_shape(input, out_features):
    return (*input.shape[:-1], out_features)


def _forward_outputs(input, out_features, activation, save_for_backward):
    shape = _out_shape(input, out_features)
    output = input.new_empty(shape)
    saves = save_for_backward and activation in compiled_module().linear_saves_derivative
    saved = input.new_empty(shape) if saves else input.new_empty((0,))
    return output, saved


def _linear_forward_fake(input, weight, bias, activation, save_for_backward=True):
    return _forward_outputs(input, weight.shape[0], activation, save_for_backward)


def _grouped_forward_fake(input, weight, bias, group_sizes, activation, save_for_backward=True):
    output, saved = _forward_outputs(input, weight.shape[1], activation, save_for_backward)
    return output, saved, input.new_empty((weight.shape[0] + 1,), dtype=torch.long)


def _backward_outputs(input, weight, bias, output_mask):
    def empty():
        return input.new_empty((0,))

    return (
        input.new_empty(input.shape) if output_mask[0] else empty(),
        weight.new_empty(weight.shape) if output_mask[1] else empty(),
        bias.new_empty(bias.shape) if output_mask[2] and bias is not None else empty(),
    )


def _linear_backward_fake(grad_output, input, weight, bias, output, saved, activation, output_mask):
    return _backward_outputs(input, weight, bias, output_mask)


def _grouped_backward_fake(
    grad_output, input, weight, bias, group_sizes, output, saved, activation, output_mask, group_offsets=None
):
    return _backward_outputs(input, weight, bias, output_mask)


if extension_available():
    torch.library.register_fake("batchops::linear_forward")(_linear_forward_fake)
    torch.library.register_fake("batchops::linear_backward")(_linear_backward_fake)
    torch.library.register_fake("batchops::grouped_linear_forward")(_grouped_forward_fake)
    torch.library.register_fake("batchops::grouped_linear_backward")(_grouped_backward_fake)
    # Autograd is registered in C++ (csrc/linear/autograd.cpp): a Python autograd step costs
    # as much as a small layer's whole forward + backward.
