"""torch.ops.batchops.batch_norm_{forward,backward}: fake kernels and autograd; and the two ops
SyncBatchNorm adds (batch_norm_stats, batch_norm_backward_elemt), used inside its own
autograd.Function (batchops/nn/sync_batch_norm.py), so they carry no autograd of their own.

The forward op is functional: it returns the new running statistics instead of writing
them, because torch.library.register_autograd refuses ops that mutate inputs. The caller
copies them into the buffers (batchops.functional.batch_norm does).
"""
from __future__ import annotations

import torch

from batchops._extension import extension_available, require_extension
from batchops.ops.common import kernel_memory_format, stat_dtype

_DOUBLE_BACKWARD_ERROR = (
    "batchops.batch_norm: double backward (a gradient of the gradient) is not supported. "
    "Use torch.nn.functional.batch_norm where second derivatives are needed."
)


def batch_norm_forward(input, weight, bias, residual, running_mean, running_var, training, momentum,
                       momentum_tensor, eps, activation):
    """-> (output, save_mean, save_invstd, new_running_mean, new_running_var)."""
    require_extension()
    return torch.ops.batchops.batch_norm_forward(
        input, weight, bias, residual, running_mean, running_var, training, momentum, momentum_tensor, eps, activation
    )


def batch_norm_backward(grad_output, input, weight, bias, residual, save_mean, save_invstd, training, activation,
                        output_mask):
    """-> (grad_input, grad_weight, grad_bias, grad_residual); unrequested ones are empty."""
    require_extension()
    return torch.ops.batchops.batch_norm_backward(
        grad_output, input, weight, bias, residual, save_mean, save_invstd, training, activation, output_mask
    )


def batch_norm_stats(input):
    """-> (mean, m2): per-channel mean and sum of squared deviations (float32, float64 for
    float64 input); zeros for an empty batch. The count is input.numel() // input.size(1)."""
    require_extension()
    return torch.ops.batchops.batch_norm_stats(input)


def batch_norm_backward_elemt(grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g,
                              mean_gxhat, activation, output_mask):
    """-> (grad_input, grad_residual) from the given per-channel mean(g) and mean(g * xhat) of the
    whole (distributed) batch; unrequested ones are empty."""
    require_extension()
    return torch.ops.batchops.batch_norm_backward_elemt(
        grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g, mean_gxhat, activation,
        output_mask,
    )


def _stats_fake(input):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)
    return input.new_empty((C,), dtype=stat), input.new_empty((C,), dtype=stat)


def _backward_elemt_fake(grad_output, input, weight, bias, residual, save_mean, save_invstd, mean_g, mean_gxhat,
                         activation, output_mask):
    fmt = kernel_memory_format(input)

    def full():
        return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    def none():
        return input.new_empty((0,))

    return (full() if output_mask[0] else none(), full() if output_mask[1] else none())


def _forward_fake(input, weight, bias, residual, running_mean, running_var, training, momentum, momentum_tensor,
                  eps, activation):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)
    output = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                         memory_format=kernel_memory_format(input))
    save_mean = input.new_empty((C,), dtype=stat)
    save_invstd = input.new_empty((C,), dtype=stat)
    if training and running_mean is not None:
        new_mean = input.new_empty((C,), dtype=running_mean.dtype)
        new_var = input.new_empty((C,), dtype=running_var.dtype)
    else:
        new_mean = input.new_empty((0,), dtype=stat)
        new_var = input.new_empty((0,), dtype=stat)
    return output, save_mean, save_invstd, new_mean, new_var


def _backward_fake(grad_output, input, weight, bias, residual, save_mean, save_invstd, training, activation,
                   output_mask):
    C = input.shape[1]
    stat = stat_dtype(input.dtype)
    fmt = kernel_memory_format(input)

    def full():
        return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    def none():
        return input.new_empty((0,))

    return (
        full() if output_mask[0] else none(),
        input.new_empty((C,), dtype=weight.dtype if weight is not None else stat) if output_mask[1] else none(),
        input.new_empty((C,), dtype=bias.dtype if bias is not None else stat) if output_mask[2] else none(),
        full() if output_mask[3] else none(),
    )


def _forward_setup_context(ctx, inputs, output):
    input, weight, bias, residual, _rm, _rv, training, _m, _mt, _eps, activation = inputs
    _, save_mean, save_invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(input, weight, bias, residual, save_mean, save_invstd)
    ctx.training = training
    ctx.activation = activation
    # Only the output is differentiable: backward takes no gradients of the statistics, so a
    # loss built on them must not silently get none, and autograd must not zero-fill a gradient
    # for each of them every backward.
    ctx.mark_non_differentiable(save_mean, save_invstd, new_running_mean, new_running_var)
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_rm, _grad_rv):
    input, weight, bias, residual, save_mean, save_invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1] and weight is not None, need[2] and bias is not None, need[3] and residual is not None]
    grads = [None] * 11
    if any(mask) and grad_output is not None:  # None: only the statistics were used (no gradient)
        results = torch.ops.batchops.batch_norm_backward(
            grad_output, input, weight, bias, residual, save_mean, save_invstd, ctx.training, ctx.activation, mask
        )
        for i in range(4):
            if mask[i]:
                grads[i] = results[i]
    return tuple(grads)


def _backward_setup_context(ctx, inputs, output):
    pass


def _backward_backward(ctx, *grads):
    # Without this registration autograd would only warn and hand back None gradients.
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


if extension_available():
    torch.library.register_fake("batchops::batch_norm_forward")(_forward_fake)
    torch.library.register_fake("batchops::batch_norm_backward")(_backward_fake)
    torch.library.register_fake("batchops::batch_norm_stats")(_stats_fake)
    torch.library.register_fake("batchops::batch_norm_backward_elemt")(_backward_elemt_fake)
    torch.library.register_autograd("batchops::batch_norm_forward", _forward_backward,
                                    setup_context=_forward_setup_context)
    torch.library.register_autograd("batchops::batch_norm_backward", _backward_backward,
                                    setup_context=_backward_setup_context)
