"""Batch norm cases: batchops.BatchNorm2d against torch.nn.BatchNorm2d (targets: README, "Benchmarks").

Both modules hold the same state (torch's, loaded into ours), so they compute the same thing.
Before timing, each case checks both providers once against torch's composition in float64
(the table's note names a provider that is off). Inputs are randn, never zeros.

Counting rule for "batchops bytes" (S = numel x element size of one input-sized tensor). It
counts what batchops' kernels actually move, pass by pass (they are not persistent: a tile does
not stay on chip between the statistics pass and the apply pass):
  * training forward: the statistics pass reads x, the apply pass reads x again and writes y:
    3S; a residual z is read once more by the apply pass: 4S.
  * backward: the reduction pass reads dy and x, the apply pass reads them again and writes dx:
    5S; a fused activation is recomputed from x (no extra tensor); with a residual, z is read
    by both passes and dz is written: 8S.
  * full = forward + backward: 8S, or 12S with a residual.
  * eval forward: x read once, y written: 2S.
The minimum for a persistent kernel would be 2S forward and 3S backward. Per-channel vectors
(weight, statistics) are negligible and not counted.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchops.bench.case import REFERENCE, Case

__all__ = ["OP", "LAYOUTS", "COLD_BYTES", "shapes_for", "dtypes_for", "batch_norm_case", "cases", "NOTES"]

OP = "batch_norm"

LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class _Variant:
    """What a case fuses: its rows' name, batchops' activation, whether a residual z is added
    before it, torch's function after bn(x) (+ z), and (forward, backward) bytes in units of S."""

    name: str
    activation: str | None
    residual: bool
    torch_after: Callable[[torch.Tensor], torch.Tensor]
    fwd_bwd: tuple[int, int]


_VARIANTS = {
    "plain": _Variant("BatchNorm2d", None, False, lambda t: t, (3, 5)),
    "relu": _Variant("BatchNorm2d+ReLU", "relu", False, torch.relu, (3, 5)),
    "silu": _Variant("BatchNorm2d+SiLU", "silu", False, torch.nn.functional.silu, (3, 5)),
    "residual_relu": _Variant("BatchNorm2d+add+ReLU", "relu", True, torch.relu, (4, 8)),
}


def shapes_for(device: torch.device, quick: bool = False, smoke: bool = False) -> list[tuple[int, int, int, int]]:
    if smoke:
        return [(2, 8, 6, 6)]
    if quick:
        return [(8, 64, 28, 28)] if device.type == "cpu" else [(32, 64, 56, 56)]
    if device.type == "cpu":
        return [(32, 64, 56, 56)]
    # 64x256x56x56 float32 is 205 MB, >= 4x the L2 of current GPUs (50 MB on H100).
    return [(32, 64, 56, 56), (64, 256, 56, 56)]


def dtypes_for(device: torch.device, quick: bool = False, smoke: bool = False) -> list[torch.dtype]:
    if device.type == "cpu" or smoke:
        return [torch.float32]
    return [torch.float32, torch.bfloat16, torch.float16]


def _modules(C: int, activation: str | None, device: torch.device):
    import batchops

    ref = torch.nn.BatchNorm2d(C, device=device)
    g = torch.Generator(device="cpu").manual_seed(C)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=g) + 0.5)
        ref.bias.copy_(torch.rand(C, generator=g) - 0.5)
        ref.running_mean.copy_(torch.rand(C, generator=g) * 0.2 - 0.1)
        ref.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    ours = batchops.BatchNorm2d(C, activation=activation, device=device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _composed(bn: torch.nn.Module, variant: str) -> Callable:
    """torch's way to write the variant: bn(x), relu(bn(x)), silu(bn(x)), relu(bn(x) + z)."""
    v = _VARIANTS[variant]
    if v.residual:
        return lambda x, z: v.torch_after(bn(x) + z)
    return lambda x, z: v.torch_after(bn(x))


# Cold cases cycle each provider through input sets of at least this many bytes in all (x, and
# z and dy where the case has them, per set), more than the last-level cache (32 MiB here), so
# that every call reads its tensors from memory, as a layer in a training step does.
COLD_BYTES = 96 * 2**20


def _cycled(f: Callable, m: torch.nn.Module, sets: list, mode: str, training: bool) -> Callable[[], object]:
    """A provider's call that takes the next (x, z, dy) input set each time: _callable's call on
    each set in turn."""
    order = itertools.cycle([_callable(f, m, x, z, dy, mode, training) for x, z, dy in sets])
    return lambda: next(order)()


def _callable(f: Callable, m: torch.nn.Module, x, z, dy, mode: str, training: bool) -> Callable[[], object]:
    """One provider's call for a mode: the output (forward) or the gradients w.r.t. x, weight,
    bias and z (backward: through a graph built once and retained; full: forward + backward)."""
    if not training:  # inference: no autograd

        def infer():
            with torch.no_grad():
                return f(x, z)

        return infer
    ins = tuple(t for t in (x, m.weight, m.bias, z) if t is not None)
    if mode == "forward":
        return lambda: f(x, z)
    if mode == "backward":
        y = f(x, z)
        return lambda: torch.autograd.grad(y, ins, dy, retain_graph=True)
    return lambda: torch.autograd.grad(f(x, z), ins, dy)


def _build(shape, layout: str, dtype: torch.dtype, mode: str, variant: str, training: bool, cold: bool = False):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        fmt = LAYOUTS[layout]
        ref, ours = _modules(shape[1], _VARIANTS[variant].activation, device)
        ref.train(training)
        ours.train(training)
        # The check's float64 reference: torch's composition in double precision, same state.
        ref64 = copy.deepcopy(ref).double()

        g = torch.Generator(device="cpu").manual_seed(0)

        def randn() -> torch.Tensor:
            t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            return t.contiguous(memory_format=fmt)

        x = randn()
        z = randn() if _VARIANTS[variant].residual else None
        dy = randn() if training else None

        def f_ours(x, z):
            return ours(x, z)

        def double(t):
            return None if t is None else t.detach().double()

        x64, z64, dy64 = double(x), double(z), double(dy)
        if training:
            for t in (x, z, x64, z64):
                if t is not None:
                    t.requires_grad_(True)
        reference = _callable(_composed(ref64, variant), ref64, x64, z64, dy64, mode, training)
        if cold:
            per_set = sum(t.numel() * t.element_size() for t in (x, z, dy) if t is not None)
            count = min(max(2, math.ceil(COLD_BYTES / per_set)), 1024)  # the cap: tiny smoke shapes only

            def input_sets():  # each provider its own copies: neither finds the other's in cache
                def copy_of(t):
                    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

                return [tuple(copy_of(t) for t in (x, z, dy)) for _ in range(count)]

            return {
                "torch": _cycled(_composed(ref, variant), ref, input_sets(), mode, training),
                "batchops": _cycled(f_ours, ours, input_sets(), mode, training),
                REFERENCE: reference,
            }
        return {
            "torch": _callable(_composed(ref, variant), ref, x, z, dy, mode, training),
            "batchops": _callable(f_ours, ours, x, z, dy, mode, training),
            REFERENCE: reference,
        }

    return build


def batch_norm_case(shape, layout, dtype, mode, variant, training=True, cold=False) -> Case:
    """One case: batchops.BatchNorm2d (variant: plain, relu, silu or residual_relu) against torch's
    composition at `shape` in `layout`, timed in `mode` (forward, backward, full; eval: forward).
    `cold`: every call takes the next of the provider's own input sets, COLD_BYTES in all, so
    its tensors come from memory (training full and eval forward only)."""
    if cold and (mode != "full" if training else mode != "forward"):
        raise ValueError(f"batch_norm_case: cold inputs are for training 'full' and eval 'forward', got {mode!r}")
    v = _VARIANTS[variant]
    op = v.name + ("" if training else " (eval)") + (" (cold)" if cold else "")
    if training:
        fwd, bwd = v.fwd_bwd
        units = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
    else:
        units = 2 + (1 if v.residual else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    S = math.prod(shape) * itemsize
    return Case(
        op=op,
        shape=tuple(shape),
        layout=layout,
        dtype=dtype,
        mode=mode,
        build=_build(shape, layout, dtype, mode, variant, training, cold),
        bytes_moved=units * S,
        bytes_rule=f"{units}S",
    )


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    out = []
    for dtype in dtypes_for(device, quick, smoke):
        for shape in shapes_for(device, quick, smoke):
            for layout in LAYOUTS:
                for mode in ("forward", "backward", "full"):
                    out.append(batch_norm_case(shape, layout, dtype, mode, "plain"))
                out.append(batch_norm_case(shape, layout, dtype, "full", "relu"))
                # SiLU's math, not memory, bounds this one (EfficientNet's layers): until 0d7b4d4
                # ours was 1.17x torch's batch norm then silu, and no row showed it.
                out.append(batch_norm_case(shape, layout, dtype, "full", "silu"))
                out.append(batch_norm_case(shape, layout, dtype, "full", "residual_relu"))
                out.append(batch_norm_case(shape, layout, dtype, "forward", "plain", training=False))
    return out


NOTES = __doc__.split("\n\n", 2)[2].strip()
