"""torch.nn.functional-compatible entry points backed by batchops kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from batchops.ops import batch_norm_forward
from batchops.ops.common import check_activation

__all__ = ["batch_norm"]


def _verify_batch_size(size: torch.Size) -> None:
    # torch.nn.functional._verify_batch_size: same check, same ValueError.
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """torch.nn.functional.batch_norm, plus two fusions: returns act(bn(input) + residual).

    Same signature and semantics as torch's: in training the batch statistics normalise and
    running_mean / running_var (when given) are updated in place with the unbiased variance.
    `momentum` may also be a one-element tensor (e.g. 1 / num_batches_tracked for a cumulative
    average), which keeps the update free of host synchronisation and traceable by
    torch.compile. `activation` is None, "relu", "silu", "gelu" or "gelu_tanh"; `residual` has
    the input's shape and is added before the activation.
    """
    if input.dim() < 2:
        raise ValueError(f"batchops.batch_norm: expected input with at least 2 dimensions (N, C, *), got {input.dim()}-D")
    check_activation("batchops.batch_norm", activation)
    if training:
        _verify_batch_size(input.size())
    if isinstance(momentum, Tensor):
        momentum_value, momentum_tensor = 0.0, momentum
    else:
        momentum_value, momentum_tensor = float(momentum), None
    output, _, _, new_mean, new_var = batch_norm_forward(
        input, weight, bias, residual, running_mean, running_var, training, momentum_value, momentum_tensor, eps,
        activation,
    )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return output
