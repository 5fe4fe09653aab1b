"""Max pool cases: batchops.functional.max_pool2d against torch.nn.functional.max_pool2d at
resnet's stem pool (kernel 3, stride 2, padding 1) on the 64-channel output of its first
convolution: 16x64x56x56 (batch 16 at 112x112, the model benchmark's resnet input) and
32x64x112x112 (batch 32 at 224x224), float32, contiguous (NCHW) and channels-last.
"forward" is the training forward (values and indices: a model that trains needs the
indices), "full" adds the backward (the input's gradient). The "stem" rows time the whole stem
after the convolution, batch norm + ReLU + pool (batchops: BatchNorm2d's ``max_pool``, which
pools x and normalises only the pooled quarter; batchops/ops/batch_norm_max_pool.py): "forward"
in eval without autograd, "full" a training forward and backward. For channels-last inputs
batchops.functional.max_pool2d runs batchops' kernel where the AVX-512 kernels run and torch's
elsewhere (the note says which), where those rows measure the routing, ~1.0. At 32x64x112x112
both sides spend much of their time faulting in the 51 MB of indices (above the 32 MiB malloc
is set to reuse).

Counting rule for "batchops bytes": S = the input's bytes, O = the output's values (S/4 here).
Forward: S read, O x 4 bytes of values and O x 8 of int64 indices written: S + 12 O = 1.75 S.
Backward: O x 4 of gradient and O x 8 of indices read, S written: 1.75 S. Full: 3.5 S. torch
moves the same bytes; its planar kernel is slow for another reason (csrc/max_pool/cpu.cpp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from batchops.bench.case import Case

__all__ = ["OP", "shapes_for", "cases", "NOTES"]

OP = "max_pool2d"
WINDOW = (3, 2, 1)  # kernel_size, stride, padding: resnet's stem


def shapes_for(device: torch.device, quick: bool = False, smoke: bool = False) -> list[tuple[int, int, int, int]]:
    if smoke:
        return [(2, 4, 10, 10)]
    if quick:
        return [(16, 64, 56, 56)]
    return [(16, 64, 56, 56), (32, 64, 112, 112)]


def _build(shape, layout: torch.memory_format, mode: str):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device).contiguous(memory_format=layout)
        if mode == "forward":
            return {
                "torch": lambda: F.max_pool2d(x, *WINDOW, return_indices=True),
                "batchops": lambda: batchops.functional.max_pool2d(x, *WINDOW, return_indices=True),
            }
        x.requires_grad_(True)
        out_shape = F.max_pool2d(x.detach(), *WINDOW).shape
        dy = torch.randn(out_shape, generator=g).to(device).contiguous(memory_format=layout)

        def full(f):
            return lambda: torch.autograd.grad(f(x, *WINDOW), x, dy)

        return {"torch": full(F.max_pool2d), "batchops": full(batchops.functional.max_pool2d)}

    return build


def _build_stem(shape, layout: torch.memory_format, mode: str):
    """Resnet's stem after its convolution: torch's BatchNorm2d, ReLU and MaxPool2d against
    batchops' BatchNorm2d with ReLU pooling its own output (``max_pool``, what ``batchops.fuse``
    puts there). "full": training forward and backward (input, weight and bias gradients);
    "forward": eval, no autograd."""

    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=g).to(device).contiguous(memory_format=layout)
        bn = torch.nn.BatchNorm2d(shape[1]).to(device)
        ours = batchops.BatchNorm2d(shape[1], activation="relu").to(device)
        ours.load_state_dict(bn.state_dict())
        max_pool = (*WINDOW, 1, False)

        def torch_stem(x):
            return F.max_pool2d(F.relu(bn(x)), *WINDOW)

        def batchops_stem(x):
            return ours(x, max_pool=max_pool)

        if mode == "forward":
            bn.eval(), ours.eval()

            def run(f):
                def call():
                    with torch.no_grad():
                        return f(x)

                return call

            return {"torch": run(torch_stem), "batchops": run(batchops_stem)}
        x.requires_grad_(True)
        dy = torch.randn(torch_stem(x.detach()).shape, generator=g).to(device).contiguous(memory_format=layout)

        def full(f, module):
            params = (x, module.weight, module.bias)
            return lambda: torch.autograd.grad(f(x), params, dy)

        return {"torch": full(torch_stem, bn), "batchops": full(batchops_stem, ours)}

    return build


def _channels_last_note(layout: torch.memory_format, device: torch.device) -> str:
    if layout == torch.contiguous_format:
        return ""
    from batchops.functional import _runs_batchops_max_pool

    probe = torch.empty(1, 2, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
    if _runs_batchops_max_pool(probe):
        return "batchops' channels-last kernel (AVX-512)"
    return "batchops runs torch's kernel here (as fast)"


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    dtype = torch.float32
    out = []
    for shape in shapes_for(device, quick, smoke):
        n, c, h, w = shape
        in_bytes = n * c * h * w * 4
        outputs = n * c * ((h + 1) // 2) * ((w + 1) // 2)
        one_way = in_bytes + 12 * outputs
        for layout, layout_name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
            note = _channels_last_note(layout, device)
            for mode in ("forward", "full"):
                common = dict(shape=tuple(shape), layout=layout_name, dtype=dtype, mode=mode)
                out.append(
                    Case(
                        op="max_pool2d 3x3 s2 p1",
                        build=_build(shape, layout, mode),
                        bytes_moved=one_way if mode == "forward" else 2 * one_way,
                        bytes_rule="S+12O" if mode == "forward" else "2(S+12O)",
                        note=note,
                        **common,
                    )
                )
                out.append(
                    Case(
                        op="stem: BatchNorm2d+ReLU+max_pool2d",
                        build=_build_stem(shape, layout, mode),
                        note="batchops pools x, then normalises the quarter" + (f"; {note}" if note else ""),
                        **common,
                    )
                )
    return out


NOTES = __doc__.split("\n\n", 1)[1].strip()
