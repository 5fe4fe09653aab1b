"""Drop-in linear layers on batchops kernels: Linear (nn.Linear plus a fused activation) and
GroupedLinear (G independent linear layers, uniform or ragged groups, one call)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from batchops import functional as F
from batchops.ops.common import check_activation

__all__ = ["Linear", "GroupedLinear"]


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` with an optional fused activation.

    A subclass of torch's: the same parameters, initialisation, state_dict keys and repr (plus
    ``activation=`` when set), so ``load_state_dict`` works both ways. ``activation`` is None,
    "relu", "silu", "gelu", "gelu_tanh", "hardswish" or "relu6"; with None it computes exactly what nn.Linear does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
    ) -> None:
        check_activation("batchops.Linear", activation)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation is not None else "")


class GroupedLinear(nn.Module):
    """``num_groups`` independent linear layers evaluated in one call.

    Parameters: ``weight`` (num_groups, out_features, in_features) and ``bias``
    (num_groups, out_features), each group initialised as :class:`torch.nn.Linear` initialises
    its own (Kaiming-uniform weight, bias uniform in +-1/sqrt(in_features)).

    ``forward(input, group_sizes=None)``: uniform groups take input (num_groups, ..., in_features);
    ragged groups take input (total_rows, in_features), rows ordered by group, and
    ``group_sizes`` (list or integer tensor, zeros allowed). See
    :func:`batchops.functional.grouped_linear`.
    """

    def __init__(
        self,
        num_groups: int,
        # nn.Linear's arguments, as Linear takes them: both modules follow torch's constructor.
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
    ) -> None:
        check_activation("batchops.GroupedLinear", activation)
        for name, value in (("num_groups", num_groups), ("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"batchops.GroupedLinear: {name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"batchops.GroupedLinear: {name} must be non-negative, got {value}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_groups = num_groups
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty((num_groups, out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty((num_groups, out_features), **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear.reset_parameters, group by group (fan_in is in_features for every group).
        for g in range(self.num_groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, group_sizes=None) -> Tensor:
        return F.grouped_linear(input, self.weight, self.bias, group_sizes, activation=self.activation)

    def extra_repr(self) -> str:
        text = (
            f"num_groups={self.num_groups}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )
        return text + (f", activation={self.activation!r}" if self.activation is not None else "")
