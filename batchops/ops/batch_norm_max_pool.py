"""Batch norm, ReLU, then 2-D max pooling, as one autograd step built from batchops' ops (no
kernel of its own): resnet's stem, ``maxpool(relu(bn1(x)))``.

Why it pays: ``y = relu((x - mean) * scale + shift)`` never decreases as x grows when
``scale >= 0`` (rounding included), so the largest y of a window comes from the largest x. The
pool can run on x itself and the normalisation on the pooled quarter, and the full-size y is
never written or read again. Channels with ``scale < 0`` (a negative weight) take their smallest
x: those channels are pooled on -x (``max_pool2d_by_weight_sign``). Backward: only the pooled positions have a gradient, so the per-channel sums
(the weight's and bias's gradients) are taken on the pooled grid, at the pooled x (the x at each
index), and the full-size pass is one: ``max_pool2d_batch_norm_backward`` spreads the gradient
to its indices and applies batch norm's training formula with those sums while it is in cache
(csrc/max_pool/max_pool.h). Unfused, the batch norm's sums read the full-size gradient and
input, and its pass reads the pool's full-size gradient back.

Same values as the unfused modules (the pooled y are the same numbers). Where two inputs of one
window give the same y after rounding (a tie torch's pool breaks by taking the first), the
gradient goes to the larger input here; a tie of equal inputs goes to the first, as in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from batchops.ops.batch_norm import batch_norm_backward, batch_norm_forward
from batchops.ops.max_pool import max_pool2d_batch_norm_backward, max_pool2d_by_weight_sign

__all__ = ["BatchNormMaxPool2d"]


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class BatchNormMaxPool2d(torch.autograd.Function):
    """apply(input, weight, bias, mean, var, training, eps, activation, kernel_size, stride,
    padding, dilation, ceil_mode) -> max_pool2d(act(batch_norm(input))), act None or "relu".

    mean and var (biased) are the batch's statistics in training, the running ones in eval; they
    are not differentiated through here: in training the backward applies batch norm's own
    formula, which accounts for them."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        activation: str | None,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        ceil_mode: bool,
    ) -> Tensor:
        window = (kernel_size, stride, padding, dilation)
        # scale = weight * invstd has the weight's sign (invstd > 0).
        pooled, indices = max_pool2d_by_weight_sign(input, weight, *window, ceil_mode)
        # The normalisation of the pooled quarter: batch norm with the given statistics as
        # "running" ones (its eval path), the activation fused; it returns the invstd it used.
        output, _, invstd, _, _ = batch_norm_forward(
            pooled, weight, bias, None, mean, var, False, 0.0, None, eps, activation
        )
        ctx.save_for_backward(input, pooled, indices, weight, bias, mean, invstd)
        ctx.training, ctx.activation, ctx.window = training, activation, window
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor | None):
        nones = (None,) * 10
        if grad_output is None:
            return None, None, None, *nones
        input, pooled, indices, weight, bias, mean, invstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        # On the pooled grid: the gradient through the activation (returned as "grad_residual":
        # what reaches the add before the activation) and its per-channel sums.
        mask = [False, True, True, True]
        _, grad_weight, grad_bias, grad_pre = batch_norm_backward(
            grad_output, pooled, weight, bias, None, mean, invstd, ctx.training, ctx.activation, mask
        )
        grad_input = None
        if needs_input:
            # grad_input = scale * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))),
            # g the pool's gradient at full size, made and normalised in one pass.
            scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
            if ctx.training:
                count = input.numel() // input.shape[1]
                mean_g = grad_bias.to(mean.dtype) / count
                proj = grad_weight.to(mean.dtype) * invstd / count  # invstd^2 mean(g (x - mean))
                coefficients = torch.stack((scale, -scale * proj, mean, -scale * mean_g))
            else:
                zeros = torch.zeros_like(scale)
                coefficients = torch.stack((scale, zeros, mean, zeros))
            grad_input = max_pool2d_batch_norm_backward(grad_pre, indices, input, coefficients, *ctx.window)
        return (
            grad_input,
            grad_weight if needs_weight and weight is not None else None,
            grad_bias if needs_bias and bias is not None else None,
            *nones,
        )
