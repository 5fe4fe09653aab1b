"""Batch norm on inputs streamed from memory, as in a training step, against torch on the CPU.

    python scripts/cold_batch_norm.py 16x256x28x28 channels_last [--rounds 3]

The benchmark table reuses one input per case, so a case's tensors stay in the last-level cache
from call to call; inside a model step each layer's input was written by the convolution before
it and mostly has to come from memory. Here every call takes the next of K input sets (K x the
tensor's size > 96 MiB), interleaved with torch, one process per round (timings on these VMs
move from process to process: compare the ratios within a round). Rows: the training forward,
forward + backward (grads of input, weight, bias) and batchops' statistics pass alone
(batch_norm_stats) next to torch.sum over the same tensors, the rate a pass that only reads
can stream at. A diagnostic, not a benchmark: benchmarks/README.md says what it found.
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys

import torch

import batchops
from batchops.bench.timing import TimingSettings, reuse_freed_cpu_memory, time_interleaved

CYCLED_BYTES = 96 * 2**20


def cycled(inputs: list, fn):
    """A callable that applies fn to the next input set each call."""
    order = itertools.cycle(range(len(inputs)))
    return lambda: fn(*inputs[next(order)])


def one_round(shape: tuple[int, ...], layout: str) -> None:
    torch.set_num_threads(2)
    reuse_freed_cpu_memory()  # as the benchmark harness: freed outputs reused, not faulted in anew
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    sets = max(2, math.ceil(CYCLED_BYTES / (math.prod(shape) * 4)))
    inputs = [
        (
            torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(),
            torch.randn(shape).contiguous(memory_format=fmt),
        )
        for _ in range(sets)
    ]
    ref, ours = torch.nn.BatchNorm2d(shape[1]), batchops.BatchNorm2d(shape[1])

    def forward(m):
        return cycled(inputs, lambda x, dy: m(x))

    def full(m):
        return cycled(inputs, lambda x, dy: torch.autograd.grad(m(x), (x, m.weight, m.bias), dy))

    rows = {
        "training forward": {"torch": forward(ref), "batchops": forward(ours)},
        "forward + backward": {"torch": full(ref), "batchops": full(ours)},
        "statistics pass": {
            "torch": cycled(inputs, lambda x, dy: x.detach().sum()),
            "batchops": cycled(inputs, lambda x, dy: torch.ops.batchops.batch_norm_stats(x.detach())),
        },
    }
    settings = TimingSettings(budget_s=3.0, max_reps=400)
    for name, fns in rows.items():
        t = time_interleaved(fns, torch.device("cpu"), settings)
        ratio = t["batchops"].median / t["torch"].median
        note = " (torch: torch.sum)" if name == "statistics pass" else ""
        print(
            f"{name:>20}: torch {t['torch'].median:.3f} ms, batchops {t['batchops'].median:.3f} ms, "
            f"ratio {ratio:.2f}{note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", help="NxCxHxW, e.g. 16x256x28x28")
    parser.add_argument("layout", choices=["NCHW", "channels_last"])
    parser.add_argument("--rounds", type=int, default=3, help="processes, one after another")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    if args.one_round:
        one_round(shape, args.layout)
        return
    for r in range(args.rounds):
        print(f"round {r + 1} ({args.shape}, {args.layout}, inputs cycled through >= 96 MiB)", flush=True)
        subprocess.run([sys.executable, __file__, args.shape, args.layout, "--one-round"], check=True)


if __name__ == "__main__":
    main()
