"""Where a callable's time goes: one torch.profiler run, the time of its ops summed by family
(convolution/matmul, normalization, activations, adds, copies, batchops' own ops, the
optimizer, inductor's compiled code, the rest), per call.

Each profiled op contributes its *self* time (its time minus its children's) to one family:
the nearest op, going from it up through its parents, whose name has a family, except that
everything under an optimizer's step or zero_grad counts as "optimizer". So the allocations and
format conversions inside a convolution count as conv/matmul, relu's clamp_min as an activation,
and the GEMM that batchops' linear calls as conv/matmul, while its epilogue is "ours". Self
times add up to the profiled wall time of the calling thread (intra-op worker threads are not
recorded separately), so the families sum to the time per call, profiler overhead included.

On the CPU the time is self CPU time; on CUDA it is self device time (the kernels an op
launched), the CPU time being mostly launch overhead there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from batchops.environment import synchronize

__all__ = ["FAMILIES", "family_of", "profile_families"]

FAMILIES = (
    "conv/matmul",
    "batch/layer norm",
    "activations",
    "adds",
    "copies",
    "ours",
    "optimizer",
    "compiled",
    "other",
)

# First match wins; names are profiler event names ("aten::relu", "batchops::linear", ...).
_PATTERNS = [
    ("ours", r"batchops::"),
    ("optimizer", r"Optimizer\.(step|zero_grad)#|aten::_foreach_|aten::_fused_(sgd|adam)"),
    ("compiled", r"## Call CompiledFxGraph|Torch-Compiled Region|CompiledFunction|TorchDynamo"),
    (
        "conv/matmul",
        r"aten::(_?convolution|conv\w*|_conv\w*|mkldnn_\w+|cudnn_conv\w*|slow_conv\w*|thnn_conv\w*"
        r"|addmm|_addmm_activation|mm|bmm|baddbmm|addbmm|matmul|linear|_?scaled_dot_product\w*"
        r"|_flash_attention\w*|_efficient_attention\w*|cudnn_rnn\w*|_cudnn_rnn\w*)$",
    ),
    (
        "batch/layer norm",
        r"aten::(_?native_batch_norm\w*|_?batch_norm\w*|cudnn_batch_norm\w*|miopen_batch_norm\w*"
        r"|native_layer_norm\w*|layer_norm|native_group_norm\w*|group_norm)$",
    ),
    (
        "activations",
        r"aten::(relu_?|threshold_?|threshold_backward|silu_?|silu_backward|gelu_?|gelu_backward"
        r"|hardswish_?|hardswish_backward|hardsigmoid_?|hardsigmoid_backward|sigmoid_?|sigmoid_backward"
        r"|tanh_?|tanh_backward|elu_?|elu_backward|leaky_relu_?|leaky_relu_backward|mish_?|mish_backward)$",
    ),
    ("adds", r"aten::add_?$"),
    ("copies", r"aten::(copy_|to|_to_copy|contiguous|clone|_copy_from\w*)$"),
]
_COMPILED = [(family, re.compile(pattern)) for family, pattern in _PATTERNS]
_OUTERMOST = "optimizer"  # wins over anything below it (the SGD update's add_ is the optimizer's)


@functools.lru_cache(maxsize=4096)
def family_of(name: str) -> str | None:
    """The family of one profiler event name, or None when the name alone does not say."""
    for family, pattern in _COMPILED:
        if pattern.match(name):
            return family
    return None


def _attribute(event) -> str:
    nearest = None
    node = event
    while node is not None:
        family = family_of(node.name)
        if family == _OUTERMOST:
            return family
        if nearest is None:
            nearest = family
        node = node.cpu_parent
    return nearest or "other"


def profile_families(fn: Callable[[], object], device: torch.device, calls: int = 1) -> dict[str, float]:
    """Run `fn` `calls` times under torch.profiler and return milliseconds per call by family
    (every key of FAMILIES, zeros included; see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    totals = dict.fromkeys(FAMILIES, 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels count through the op that launched them (self_device_time_total)
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us:
            totals[_attribute(event)] += us
    return {family: us / 1e3 / calls for family, us in totals.items()}
