"""torch.ops.batchops.gather_rows: fake kernel and autograd.

out[i] = input[index[i]] where index[i] >= 0, else a row of `fill`. The padded <-> packed
conversions (batchops.packing) are this one op with different index maps; each direction's
backward is the other direction, i.e. the same op with the two maps swapped.
"""
from __future__ import annotations

import torch

from batchops._extension import extension_available, require_extension


def gather_rows(input, index, inverse_index=None, fill=0):
    """input (R, *), index (M,) int64 with values in [-1, R) -> (M, *).

    `inverse_index` (R,) maps each input row to its output row (or -1); when given, the
    backward is one more gather (it must then be the exact inverse of an injective index)."""
    require_extension()
    return torch.ops.batchops.gather_rows(input, index, inverse_index, fill)


def _fake(input, index, inverse_index, fill):
    return input.new_empty((index.shape[0], *input.shape[1:]))


def _setup_context(ctx, inputs, output):
    input, index, inverse_index, _fill = inputs
    ctx.save_for_backward(index, inverse_index)
    ctx.input_rows = input.shape[0]


def _backward(ctx, grad):
    index, inverse_index = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    if inverse_index is not None:
        grad_input = torch.ops.batchops.gather_rows(grad, inverse_index, index, 0)
    else:  # general index (repeats allowed): scatter-add, -1 rows contribute nothing
        valid = (index >= 0).reshape(-1, *([1] * (grad.dim() - 1)))
        grad_input = grad.new_zeros((ctx.input_rows, *grad.shape[1:]))
        grad_input.index_add_(0, index.clamp(min=0), grad * valid)
    return grad_input, None, None, None


if extension_available():
    torch.library.register_fake("batchops::gather_rows")(_fake)
    torch.library.register_autograd("batchops::gather_rows", _backward, setup_context=_setup_context)
