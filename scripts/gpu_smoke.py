"""Call every batchops kernel once on small inputs: the program compute-sanitizer runs in
`make gpu-check` (memcheck, racecheck), so every CUDA kernel is launched under it at least
once. Small on purpose: under the sanitizer each launch is slow. The calls are recorded at the
dispatcher: an op registered in batchops but never called here (a new op someone forgot to add)
fails the run, on the CPU dry run (tests/test_gpu_scripts.py) as on the GPU.

usage: python scripts/gpu_smoke.py [--device cuda|cpu]   (cpu: a dry run of the same calls)
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batchops
from batchops import functional as F


class CalledOps(TorchDispatchMode):
    """The names of the ops that reach the dispatcher inside the `with` (C++ callers included)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name().split(".")[0])  # "batchops::max_pool2d.default" -> "batchops::max_pool2d"
        return func(*args, **(kwargs or {}))


def run(device: str) -> int:
    with CalledOps() as called:
        calls = call_every_op(device)
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("batchops::")}
    missing = sorted(registered - called.names)
    if missing:
        print(f"gpu_smoke: registered ops this script never called: {missing}", file=sys.stderr)
        return 1
    print(f"gpu_smoke: {calls} op calls on {device} completed ({len(registered)} ops, every one called)")
    return 0


def call_every_op(device: str) -> int:
    torch.manual_seed(0)
    calls = 0
    ops = torch.ops.batchops
    for layout in ("planar", "rows"):  # both CUDA views of batch norm
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, 6, 5, 3, device=device, dtype=dtype)
            if layout == "rows":
                x = x.contiguous(memory_format=torch.channels_last)
            z = torch.randn_like(x)
            w = torch.rand(6, device=device) + 0.5
            b = torch.randn(6, device=device)
            rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
            y, mean, invstd, _, _ = ops.batch_norm_forward(x, w, b, z, rm, rv, True, 0.1, None, 1e-5, "gelu_tanh")
            ops.batch_norm_backward(
                torch.randn_like(y), x, w, b, z, mean, invstd, True, "gelu_tanh", [True, True, True, True]
            )
            ops.batch_norm_forward(x, w, b, None, rm, rv, False, 0.1, None, 1e-5, None)  # eval
            m, m2 = ops.batch_norm_stats(x)
            ops.batch_norm_backward_elemt(
                torch.randn_like(y), x, w, b, z, mean, invstd, mean, invstd, "relu", [True, True]
            )
            calls += 5
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 24, device=device, dtype=dtype)
        w = torch.randn(40, 24, device=device, dtype=dtype) / 5
        b = torch.randn(40, device=device, dtype=dtype)
        out, saved = ops.linear_forward(x, w, b, "silu", True)
        ops.linear_backward(torch.randn_like(out), x, w, b, out, saved, "silu", [True, True, True])
        # ragged groups: the grouped GEMM (several K tiles, > 64 output features) and its epilogues
        sizes = torch.tensor([5, 0, 70, 3], device=device)
        xg = torch.randn(78, 72, device=device, dtype=dtype)
        wg = torch.randn(4, 80, 72, device=device, dtype=dtype) / 8
        bg = torch.randn(4, 80, device=device, dtype=dtype)
        out, saved, offsets = ops.grouped_linear_forward(xg, wg, bg, sizes, "gelu", True)
        ops.grouped_linear_backward(
            torch.randn_like(out), xg, wg, bg, sizes, out, saved, "gelu", [True, True, True], offsets
        )
        calls += 4
    tokens = torch.randn(3, 7, 5, device=device)
    packed, indices, cu_seqlens, max_seqlen = batchops.packing.unpad(tokens, [7, 2, 4])
    batchops.packing.pad(packed, indices, 3, 7)
    calls += 2
    F.batch_norm(torch.randn(2, 3, 4, device=device), None, None, training=True)
    calls += 1
    for channels_last in (False, True):  # both layouts of max pool, a window over the border
        x = torch.randn(2, 3, 9, 7, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, idx = ops.max_pool2d(x, [3], [2], [1], [1], True)
        grad = torch.randn_like(out)
        ops.max_pool2d_backward(grad, idx, list(x.shape), [3], [2], [1], [1])
        # resnet's stem ops: a pool taking the minimum on negative-weight channels, and the pool's
        # backward with a batch norm's pass applied (coefficients alpha, beta, center, gamma)
        weight = torch.tensor([1.0, -0.5, 2.0], device=device)
        ops.max_pool2d_by_weight_sign(x, weight, [3], [2], [1], [1], True)
        coefficients = torch.randn(4, 3, device=device)
        ops.max_pool2d_batch_norm_backward(grad, idx, x, coefficients, [3], [2], [1], [1])
        calls += 4
    stem = batchops.BatchNorm2d(3, activation="relu").to(device)  # the fused stem, forward and backward
    x = torch.randn(2, 3, 9, 9, device=device, requires_grad=True)
    stem(x, max_pool=(3, 2, 1, 1, False)).sum().backward()
    calls += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    return run(args.device)


if __name__ == "__main__":
    sys.exit(main())
