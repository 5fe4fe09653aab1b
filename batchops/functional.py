"""torch.nn.functional-compatible entry points backed by batchops kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from batchops._extension import cpu_kernel_isa, extension_available
from batchops.ops import batch_norm_forward, grouped_linear_forward, linear_forward
from batchops.ops import max_pool2d as max_pool2d_op
from batchops.ops.batch_norm import batch_norm_stats
from batchops.ops.batch_norm_max_pool import BatchNormMaxPool2d
from batchops.ops.common import KERNEL_DTYPES, check_activation, kernel_memory_format, torch_activation

__all__ = [
    "batch_norm",
    "batch_norm_max_pool2d",
    "linear",
    "grouped_linear",
    "max_pool2d",
    "set_compiled_batch_norm",
    "compiled_batch_norm",
]


def _verify_batch_size(size: torch.Size) -> None:
    # torch.nn.functional._verify_batch_size: same check, same ValueError.
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


# How batch norm meets torch.compile, decided by measurement (benchmarks/results/compile/):
# "auto" (the default): on the CPU batchops' op stays in the compiled graph when it normalises
# with the batch's statistics (training); otherwise (eval, or other devices),
# while dynamo traces, batch norm is written as torch's own F.batch_norm (+ add, + activation),
# which inductor decomposes and fuses with its neighbours. To inductor our op is a wall it
# cannot fuse across, but on the CPU inductor's code for the decomposition (its reductions and
# the fused pointwise work around them) took longer than our fused kernels: a compiled resnet18
# training step with batchops.fuse ran at 0.95x (NCHW) and 0.97x (channels-last) of torch's
# compiled step with our op in the graph, 0.98x and 1.00x with the decomposition. That needs the
# ops' flexible_layout tag (csrc/batch_norm/schema.cpp), without which inductor copied every
# batch norm's input and output between its channels-last convolutions and NCHW. On CUDA
# batchops' kernels have not been measured against inductor's generated Triton code, so "auto"
# leaves it inductor's. "torch" and "batchops" force one or the other everywhere. Eager calls
# always run batchops' kernels.
_COMPILED_BATCH_NORM = "auto"
_COMPILED_BATCH_NORM_MODES = ("auto", "torch", "batchops")


def set_compiled_batch_norm(mode: str) -> None:
    """Choose what batch norm becomes inside torch.compile: "auto" (default: batchops' op for CPU
    tensors in training, torch's decomposition otherwise), "torch" (torch's decomposition, which inductor
    fuses with neighbouring work) or "batchops" (batchops' op). Set it before compiling: a graph
    keeps what it was traced with."""
    global _COMPILED_BATCH_NORM
    if mode not in _COMPILED_BATCH_NORM_MODES:
        raise ValueError(f"set_compiled_batch_norm: mode must be one of {_COMPILED_BATCH_NORM_MODES}, got {mode!r}")
    _COMPILED_BATCH_NORM = mode


def compiled_batch_norm() -> str:
    """What batch norm becomes inside torch.compile (see set_compiled_batch_norm)."""
    return _COMPILED_BATCH_NORM


def _decomposed_when_compiled(input: Tensor, training: bool) -> bool:
    """Whether batch norm on `input` is written as torch's inside torch.compile."""
    if _COMPILED_BATCH_NORM == "auto":
        # Normalising with running statistics is one multiply-add per value, which inductor fuses
        # into its neighbours' kernels: a compiled resnet18 inference (eval, no_grad) ran at 1.09x
        # (NCHW) and 1.03x (channels-last) torch's with our op, 1.04x and 1.00x with this.
        return input.device.type != "cpu" or not training
    return _COMPILED_BATCH_NORM == "torch"


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual):
    """The same function in torch's ops, for inductor to decompose (see _COMPILED_BATCH_NORM)."""
    if isinstance(momentum, Tensor):
        # torch's batch norm takes a float momentum: normalise with the batch statistics and
        # update the running ones here, as batchops' op does (unbiased variance; an empty
        # batch leaves them alone).
        output = torch.nn.functional.batch_norm(input, None, None, weight, bias, training, 0.0, eps)
        if training and running_mean is not None and input.numel() > 0:
            with torch.no_grad():
                dims = [0, *range(2, input.dim())]
                var, mean = torch.var_mean(input, dim=dims, correction=1)
                factor = momentum.to(running_mean.dtype)
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                running_var.lerp_(var.to(running_var.dtype), factor)
    else:
        output = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        output = output + residual
    return torch_activation(activation, output)


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
    torch.compile. `activation` is None, "relu", "silu", "gelu", "gelu_tanh", "hardswish" or "relu6"; `residual` has
    the input's shape and is added before the activation.
    """
    check_activation("batchops.batch_norm", activation)
    if input.dim() == 1 and input.numel() == 0:
        # torch returns a copy of any empty input before looking at its shape (its OpInfo
        # samples include a (0,) input with size-0 running statistics); the gradient chain stays.
        output = input.clone()
        if weight is not None:
            output = output * weight[0]
        if bias is not None:
            output = output + bias[0]
        return output
    if input.dim() < 2:
        raise ValueError(
            f"batchops.batch_norm: expected input with at least 2 dimensions (N, C, *), got {input.dim()}-D"
        )
    if training:
        _verify_batch_size(input.size())
    if torch.compiler.is_compiling() and _decomposed_when_compiled(input, training):
        return _torch_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual
        )
    if isinstance(momentum, Tensor):
        momentum_value, momentum_tensor = 0.0, momentum
    else:
        momentum_value, momentum_tensor = float(momentum), None
    output, _, _, new_mean, new_var = batch_norm_forward(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        training,
        momentum_value,
        momentum_tensor,
        eps,
        activation,
    )
    if training and running_mean is not None:
        # No torch.no_grad() needed (1.5 us, as much as both copies): new_mean and new_var never
        # require grad, and the op refuses running statistics that require grad while grad mode
        # is on, as torch's does. (_foreach_copy_ of the two took 2.1 us.)
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return output


def batch_norm_max_pool2d(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = "relu",
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
) -> Tensor:
    """``max_pool2d(batch_norm(input, ..., activation=activation), kernel_size, ...)`` (resnet's
    stem), activation None or "relu": the same values, computed without the full-size batch
    norm output where batchops' max pool runs (batchops/ops/batch_norm_max_pool.py says how; on
    the CPU, 4-D inputs; eager, and compiled where batch norm stays batchops' op: training, see
    set_compiled_batch_norm); elsewhere the two calls as they are."""
    if activation not in (None, "relu"):
        raise ValueError(f"batchops.batch_norm_max_pool2d: activation must be None or 'relu', got {activation!r}")
    fused = (
        input.dim() == 4
        and input.numel() > 0
        and _runs_batchops_max_pool(input)
        and not (torch.compiler.is_compiling() and _decomposed_when_compiled(input, training))
    )
    if not fused:
        output = batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation=activation
        )
        return max_pool2d(output, kernel_size, stride, padding, dilation, ceil_mode)
    if training:
        _verify_batch_size(input.size())
    batch_statistics = training or running_mean is None
    if batch_statistics:
        # The batch's statistics; the running ones updated as batch_norm_forward does (momentum
        # times the new value plus 1 - momentum times the old, the unbiased variance).
        mean, m2 = batch_norm_stats(input.detach())
        count = input.numel() // input.shape[1]
        var = m2 / count
        if training and running_mean is not None:
            with torch.no_grad():
                new_mean = momentum * mean + (1 - momentum) * running_mean
                new_var = momentum * (m2 / max(count - 1, 1)) + (1 - momentum) * running_var
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    else:
        mean, var = running_mean.detach(), running_var.detach()
    return BatchNormMaxPool2d.apply(
        input,
        weight,
        bias,
        mean,
        var,
        batch_statistics,
        eps,
        activation,
        _int_list(kernel_size),
        [] if stride is None else _int_list(stride),
        _int_list(padding),
        _int_list(dilation),
        ceil_mode,
    )


def _autocast(input: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under torch.autocast, cast floating tensors to the autocast dtype as it does for
    F.linear (custom ops are not on autocast's lists); otherwise return them unchanged."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return (input, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (input, *tensors))


def _needs_saving(*tensors: Tensor | None) -> bool:
    """Whether autograd will run backward through the op: forward then saves the activation's
    derivative; without it (inference, no_grad, frozen layers) the kernels skip that work."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None) -> Tensor:
    """``act(input @ weight.T + bias)`` with the bias and activation fused into one pass after the
    product, and the activation's derivative and the bias gradient fused in backward.

    With ``activation=None`` this is exactly :func:`torch.nn.functional.linear`. ``activation`` is
    None, "relu", "silu", "gelu", "gelu_tanh", "hardswish" or "relu6". ``input`` may have any leading shape.
    """
    check_activation("batchops.linear", activation)
    if activation is None:
        return torch.nn.functional.linear(input, weight, bias)
    input, weight, bias = _autocast(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        return linear_forward(input, weight, bias, activation, _needs_saving(input, weight, bias))[0]


def _group_sizes_tensor(group_sizes, input: Tensor) -> Tensor:
    if isinstance(group_sizes, Tensor):
        return group_sizes
    if not isinstance(group_sizes, (list, tuple)):
        raise TypeError(
            f"batchops.grouped_linear: group_sizes must be a list of ints or an integer tensor, "
            f"got {type(group_sizes).__name__}"
        )
    for i, s in enumerate(group_sizes):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"batchops.grouped_linear: group_sizes[{i}] must be an int, got {type(s).__name__}")
    # On the CPU: checked there (negative sizes, the sum) and copied to the input's device by the op.
    return torch.tensor(list(group_sizes), dtype=torch.int64)


def grouped_linear(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, group_sizes=None, *, activation: str | None = None
) -> Tensor:
    """G linear layers in one call: group g computes ``act(x_g @ weight[g].T + bias[g])``.

    ``weight`` is (G, out_features, in_features), ``bias`` (G, out_features) or None.

    * Uniform groups (``group_sizes=None``): ``input`` is (G, ..., in_features) and
      ``output[g] = act(input[g] @ weight[g].T + bias[g])``, like ``torch.baddbmm`` plus the activation.
    * Ragged groups (mixture-of-experts routing): ``input`` is (total_rows, in_features) with the
      rows of group 0 first, then group 1, ...; ``group_sizes`` (a list of ints or an integer tensor
      with G entries, zeros allowed) says how many rows each group has. A tensor on the input's GPU
      avoids a host sync; its values are then checked on the device (a device-side assert) instead
      of raising here.
    """
    check_activation("batchops.grouped_linear", activation)
    if group_sizes is not None:
        group_sizes = _group_sizes_tensor(group_sizes, input)
    input, weight, bias = _autocast(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        return grouped_linear_forward(input, weight, bias, group_sizes, activation, _needs_saving(input, weight, bias))[
            0
        ]


def _runs_batchops_max_pool(input: Tensor) -> bool:
    """Whether max_pool2d runs batchops' kernel: where it beats torch's. On the CPU for contiguous
    (NCHW) and unbatched inputs, eager (~10x at resnet's stem pool) and inside torch.compile too
    (inductor's own code for that pool is about as slow as torch's eager kernel: fwd+bwd 11.8 ms
    against ours 2.4 in the graph). For channels-last float32 where the AVX-512 kernels run:
    forward 0.6 ms against torch's 1.0 at resnet's stem pool (a Xeon, 2026-12-07), and resnet18's
    compiled channels-last step 0.94-0.96x torch's compiled step with ours in the graph against
    0.96-0.97x with inductor's pool; its AVX2 build measured 0.8-1.0x torch's there and has not
    been timed on an AMD processor, so AVX2 and baseline processors keep torch's. batchops' CUDA
    kernel has not run on a GPU yet: torch's. torch.ops.batchops.max_pool2d itself takes every
    layout on both devices."""
    if not (extension_available() and input.device.type == "cpu" and input.dtype in KERNEL_DTYPES):
        return False
    layout = kernel_memory_format(input)
    if layout == torch.contiguous_format:
        return True
    return layout == torch.channels_last and input.dtype == torch.float32 and _avx512_cpu_kernels()


@torch.compiler.assume_constant_result
def _avx512_cpu_kernels() -> bool:
    # A C call dynamo cannot trace: it calls this while tracing and keeps the answer in the
    # graph (BATCHOPS_CPU_ISA set later does not change a compiled graph).
    return cpu_kernel_isa() == "avx512"


def _int_list(value) -> list[int]:
    """An int or a sequence of ints, as a list (torch's int[2] arguments)."""
    return [value] if isinstance(value, int) else list(value)


def max_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """torch.nn.functional.max_pool2d: the same signature, values, indices and gradient. On the
    CPU, for contiguous (NCHW) inputs, batchops' kernel (torch.ops.batchops.max_pool2d), ~10x
    faster than torch's at resnet's stem pool and keeping only the indices and the input's size
    for backward, eager and under torch.compile; for channels-last float32 where the AVX-512
    kernels run, too (~0.6x torch's forward), eager and compiled; elsewhere (channels-last on
    other processors, CUDA, other dtypes) torch's.
    """
    if not _runs_batchops_max_pool(input):
        return torch.nn.functional.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    output, indices = max_pool2d_op(
        input,
        _int_list(kernel_size),
        [] if stride is None else _int_list(stride),
        _int_list(padding),
        _int_list(dilation),
        ceil_mode,
    )
    return (output, indices) if return_indices else output
