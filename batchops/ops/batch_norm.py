"""torch.ops.batchops.batch_norm_{forward,backward}: fake kernels (their autograd is C++:
csrc/batch_norm/autograd.cpp); and the two ops SyncBatchNorm adds (batch_norm_stats,
batch_norm_backward_elemt), used inside its own autograd.Function
(batchops/nn/sync_batch_norm.py), so they carry no autograd of their own.

The forward op is functional: it returns the new running statistics instead of writing them
(an op with autograd must not mutate its inputs). The caller copies them into the buffers
(batchops.functional.batch_norm does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchops._extension import extension_available
from batchops.ops.common import kernel_memory_format, op_caller, stat_dtype

__all__ = ["batch_norm_forward", "batch_norm_backward", "batch_norm_stats", "batch_norm_backward_elemt"]

_batch_norm_forward = op_caller("batch_norm_forward")
_batch_norm_backward = op_caller("batch_norm_backward")
_batch_norm_stats = op_caller("batch_norm_stats")
_batch_norm_backward_elemt = op_caller("batch_norm_backward_elemt")


def batch_norm_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    momentum_tensor: Tensor | None,
    eps: float,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (output, save_mean, save_invstd, new_running_mean, new_running_var)."""
    return _batch_norm_forward(
        input, weight, bias, residual, running_mean, running_var, training, momentum, momentum_tensor, eps, activation
    )


def batch_norm_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    activation: str | None,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_input, grad_weight, grad_bias, grad_residual); unrequested ones are empty."""
    return _batch_norm_backward(
        grad_output, input, weight, bias, residual, save_mean, save_invstd, training, activation, output_mask
    )


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """-> (mean, m2): per-channel mean and sum of squared deviations (float32, float64 for
    float64 input); zeros for an empty batch. The count is input.numel() // input.size(1)."""
    return _batch_norm_stats(input)


# The same leading arguments as batch_norm_backward: both ops' schemas take the forward's saved
# state (csrc/batch_norm/batch_norm.h), so the signatures look alike but the ops differ.
def batch_norm_backward_elemt(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    mean_g: Tensor,
    mean_gxhat: Tensor,
    activation: str | None,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """-> (grad_input, grad_residual) from the given per-channel mean(g) and mean(g * xhat) of the
    whole (distributed) batch; unrequested ones are empty."""
    return _batch_norm_backward_elemt(
        grad_output,
        input,
        weight,
        bias,
        residual,
        save_mean,
        save_invstd,
        mean_g,
        mean_gxhat,
        activation,
        output_mask,
    )


def _stats_fake(input):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)
    return input.new_empty((C,), dtype=stat), input.new_empty((C,), dtype=stat)


def _input_like(input, requested: bool = True):
    """What the kernels return for an input-shaped output: the input's shape and dtype in the
    kernels' memory format, or an empty tensor when the output mask did not request it."""
    if not requested:
        return input.new_empty((0,))
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=kernel_memory_format(input))


def _backward_elemt_fake(
    grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g, mean_gxhat, activation, output_mask
):
    return _input_like(input, output_mask[0]), _input_like(input, output_mask[1])


def _forward_fake(
    input, weight, bias, residual, running_mean, running_var, training, momentum, momentum_tensor, eps, activation
):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)
    output = _input_like(input)
    save_mean = input.new_empty((C,), dtype=stat)
    save_invstd = input.new_empty((C,), dtype=stat)
    if training and running_mean is not None:
        new_mean = input.new_empty((C,), dtype=running_mean.dtype)
        new_var = input.new_empty((C,), dtype=running_var.dtype)
    else:
        new_mean = input.new_empty((0,), dtype=stat)
        new_var = input.new_empty((0,), dtype=stat)
    return output, save_mean, save_invstd, new_mean, new_var


def _backward_fake(
    grad_output, input, weight, bias, residual, save_mean, save_invstd, training, activation, output_mask
):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)

    def per_channel(param, requested):  # grad_weight / grad_bias, in the parameter's dtype
        if not requested:
            return input.new_empty((0,))
        return input.new_empty((C,), dtype=param.dtype if param is not None else stat)

    return (
        _input_like(input, output_mask[0]),
        per_channel(weight, output_mask[1]),
        per_channel(bias, output_mask[2]),
        _input_like(input, output_mask[3]),
    )


if extension_available():
    torch.library.register_fake("batchops::batch_norm_forward")(_forward_fake)
    torch.library.register_fake("batchops::batch_norm_backward")(_backward_fake)
    torch.library.register_fake("batchops::batch_norm_stats")(_stats_fake)
    torch.library.register_fake("batchops::batch_norm_backward_elemt")(_backward_elemt_fake)
    # Autograd for batch_norm_forward / batch_norm_backward is registered in C++
    # (csrc/batch_norm/autograd.cpp; why: csrc/common/autograd.h).
