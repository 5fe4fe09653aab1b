"""Conventions every batchops op shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from batchops._extension import compiled_module, extension_available, require_extension

__all__ = [
    "ACTIVATIONS",
    "KERNEL_DTYPES",
    "TORCH_ACTIVATION_CALLS",
    "check_activation",
    "kernel_memory_format",
    "op_caller",
    "stat_dtype",
    "torch_activation",
]

# One set of activation names for every op (None = identity), read from the kernels' own table
# (csrc/common/activation.h): fused activations exist only where the compiled module does.
ACTIVATIONS: tuple[str | None, ...] = (None, *compiled_module().activations) if extension_available() else (None,)

# torch's call for each activation name, as (function, keyword arguments): what batch norm's
# compiled path computes in torch's ops and what unfuse puts back into a graph. (The tests keep
# their own reference table, so that a wrong entry here cannot hide.)
TORCH_ACTIVATION_CALLS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, Any]]] = {
    "relu": (torch.relu, {}),
    "silu": (F.silu, {}),
    "gelu": (F.gelu, {}),
    "gelu_tanh": (F.gelu, {"approximate": "tanh"}),
    "hardswish": (F.hardswish, {}),
    "relu6": (F.relu6, {}),
}


def torch_activation(activation: str | None, t: torch.Tensor) -> torch.Tensor:
    """``t`` through torch's version of a batchops activation (None: ``t`` itself)."""
    if activation is None:
        return t
    fn, kwargs = TORCH_ACTIVATION_CALLS[activation]
    return fn(t, **kwargs)


# The dtypes every batchops kernel computes in (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16):
# common/cpu_dtypes.h, the CUDA files).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def op_caller(name: str) -> Callable[..., Any]:
    """torch.ops.batchops.<name>, called with positional arguments. Plain tensors in eager mode go
    in through batchops._C's entry for the op (csrc/common/python_entry.h): the same dispatcher
    call without torch.ops' argument parsing, about 2.5 us less per call (a small batch norm's
    whole kernel time). Anything else (tensor subclasses such as FakeTensor, torch-function modes,
    fx proxies, torch.compile's tracing, arguments of the wrong type) goes through torch.ops,
    which handles it and raises torch's errors."""
    if not extension_available():

        def unavailable(*args: Any) -> Any:
            require_extension()

        return unavailable
    entry = getattr(compiled_module(), name, None)
    overload = getattr(torch.ops.batchops, name).default
    if entry is None:  # a _C built before the entries existed (not rebuilt after an update)
        return overload
    is_compiling = torch.compiler.is_compiling

    def call(*args: Any) -> Any:
        if not is_compiling():
            out = entry(*args)
            if out is not NotImplemented:
                return out
        return overload(*args)

    call.__name__ = call.__qualname__ = name
    return call


def check_activation(op: str, activation) -> None:
    if activation is not None:
        require_extension()
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a kernel works in and returns; mirrors choose_format() in
    csrc/common/layout.h: channels-last(-3d) only when x is laid out that way and is not also
    plainly contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated and saved in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
