"""torch.ops.batchops.gather_rows: fake kernel (its autograd is C++: csrc/packing/autograd.cpp).

out[i] = input[index[i]] where index[i] >= 0, else a row of `fill`. The padded <-> packed
conversions (batchops.packing) are this one op with different index maps; each direction's
backward is the other direction, i.e. the same op with the two maps swapped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchops._extension import extension_available
from batchops.ops.common import op_caller

__all__ = ["gather_rows"]

_gather_rows = op_caller("gather_rows")


def gather_rows(input: Tensor, index: Tensor, inverse_index: Tensor | None = None, fill: float = 0) -> Tensor:
    """input (R, *), index (M,) int64 with values in [-1, R) -> (M, *).

    `inverse_index` (R,) maps each input row to its output row (or -1); when given, the
    backward is one more gather (it must then be the exact inverse of an injective index)."""
    return _gather_rows(input, index, inverse_index, fill)


def _fake(input, index, inverse_index, fill):
    return input.new_empty((index.shape[0], *input.shape[1:]))


if extension_available():
    torch.library.register_fake("batchops::gather_rows")(_fake)
    # Autograd is C++: csrc/packing/autograd.cpp (why: csrc/common/autograd.h).
