"""Batch norm at the shapes a real model uses: every batch-norm layer shape of torchvision's
resnet50 at 112x112 input, batch 16 (C from 64 to 2048, H*W from 56x56 down to 4x4), in both
memory formats, training forward+backward and eval forward, against torch's BatchNorm2d (the
cases of batchops.bench.batch_norm at other shapes). The summary gives the geometric mean of
the ratios and the worst one per mode and layout: targets, geometric mean <= 0.8 and no shape
above 1.05 (issue 16).

Those cases reuse one input per provider, so from the second call on its tensors sit in the
last-level cache; in a training step a layer's input was written by the convolution before it
and comes mostly from memory. The "(cold)" rows time training forward+backward again with each
call taking the next of its provider's own input sets (batch_norm.COLD_BYTES in all), the cache
state a step sees.
"""

from __future__ import annotations

import math

import torch

from batchops.bench.batch_norm import LAYOUTS, batch_norm_case
from batchops.bench.case import Case

__all__ = ["OP", "RESNET50_SHAPES", "cases", "summary", "NOTES"]

OP = "batch_norm_resnet50"

# (shape, how many of resnet50's 53 batch-norm layers have it), from forward hooks on
# torchvision.models.resnet50(num_classes=10) at 16x3x112x112.
RESNET50_SHAPES = [
    ((16, 64, 56, 56), 1),
    ((16, 64, 28, 28), 6),
    ((16, 128, 28, 28), 1),
    ((16, 256, 28, 28), 4),
    ((16, 128, 14, 14), 7),
    ((16, 256, 14, 14), 1),
    ((16, 512, 14, 14), 5),
    ((16, 256, 7, 7), 11),
    ((16, 512, 7, 7), 1),
    ((16, 1024, 7, 7), 7),
    ((16, 512, 4, 4), 5),
    ((16, 2048, 4, 4), 4),
]


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    shapes = [((2, 8, 4, 4), 1)] if smoke else RESNET50_SHAPES
    out = []
    for layout in LAYOUTS:
        for shape, _ in shapes:
            out.append(batch_norm_case(shape, layout, torch.float32, "full", "plain"))
            out.append(batch_norm_case(shape, layout, torch.float32, "forward", "plain", training=False))
    for layout in LAYOUTS:
        for shape, _ in shapes:
            out.append(batch_norm_case(shape, layout, torch.float32, "full", "plain", cold=True))
    return out


def summary(rows) -> str:
    """Geometric mean and worst ratio per (mode, layout) over the measured shapes."""
    groups: dict[tuple[str, str], list[tuple[float, tuple]]] = {}
    for row in rows:
        if row.ratio is None:
            continue
        mode = "eval forward" if "(eval)" in row.case.op else "training forward+backward"
        if "(cold)" in row.case.op:
            mode += ", inputs from memory"
        groups.setdefault((mode, row.case.layout), []).append((row.ratio, row.case.shape))
    lines = ["| mode | layout | shapes | geometric mean ratio | worst ratio (shape) |", "|---|---|---|---|---|"]
    for (mode, layout), items in sorted(groups.items()):
        geomean = math.exp(sum(math.log(r) for r, _ in items) / len(items))
        worst, shape = max(items)
        lines.append(
            f"| {mode} | {layout} | {len(items)} | {geomean:.2f} | {worst:.2f} ({'x'.join(map(str, shape))}) |"
        )
    return "\n".join(lines)


NOTES = (
    "Targets (issue 16): geometric mean of the ratios at most 0.8 and no shape above 1.05, per mode and layout. "
    "Bytes are counted as in the batch_norm benchmark. (cold) rows: each call takes the next of its provider's "
    "own input sets, 96 MiB in all, so that the tensors come from memory as in a training step; the other rows "
    "reuse one input (cache-warm)."
)
