"""Per-op times inside one model's training step, torch's model against batchops', on the CPU.

    python scripts/model_op_times.py resnet50 NCHW [--steps 5]
    python scripts/model_op_times.py efficientnet_b0 channels_last   # any torchvision classifier

Every op of a step is timed by a TorchDispatchMode (time.perf_counter around the call, both
providers alike), per op and input shape, and summed per step with the slowest 40% of each
op's calls left out (this VM's scheduler hiccups). Unlike torch.profiler, whose events inflated
batchops' ops 2-3x inside steps, this ranks ours against torch's: it is how the cold-data cost
of the channel-by-channel planar batch norm showed (benchmarks/README.md). A diagnostic, not a
benchmark: the mode itself slows every call by a few microseconds.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchops.bench import models
from batchops.bench.timing import reuse_freed_cpu_memory

# Torch's ops that batchops replaces: batch norm, the activations it fuses (ReLU, ReLU6 =
# hardtanh, SiLU, GELU, hardswish) and their backwards, max pool, and the residual adds
# (add_ on a 4-D tensor in grad mode, i.e. in the forward; the optimizer's add_ runs without grad
# mode and is on both sides). Both providers' totals count these families, batchops' with its
# own ops, so that activations fuse leaves as torch's (a squeeze-excitation's SiLU after a
# convolution) count on both sides. (Until 2026-12-06 the list had ReLU only and batchops' total
# its own ops only: on efficientnet_b0 that read torch 24.1 ms against ours 29.4, where torch's
# batch norms and SiLUs take 38.1 and ours 29.9.) Meant for the convnets: in the transformer
# batchops' Linear + GELU is one op, products included, against torch's GELU alone.
REPLACED = ("native_batch_norm", "threshold_backward", "relu", "hardtanh", "silu", "gelu", "hardswish", "max_pool2d")
RESIDUAL_ADD = " (residual add)"


def replaced_by_batchops(key: str) -> bool:
    return any(name in key for name in REPLACED) or key.endswith(RESIDUAL_ADD)


class OpTimes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[float]] = collections.defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        # Keyed by the first input's shape too: the slowest calls are dropped per key, and with
        # one key for all of an op's shapes (relu_ at 16x64x56x56 and at 16x256x7x7) the large
        # calls were the ones dropped, which undercounted torch's ReLUs and adds.
        key = str(func)
        if args and isinstance(args[0], torch.Tensor):
            key += " " + "x".join(map(str, args[0].shape))
            if func is torch.ops.aten.add_.Tensor and args[0].dim() == 4 and torch.is_grad_enabled():
                key += RESIDUAL_ADD  # the optimizer's add_ runs without grad mode
        self.calls[key].append(time.perf_counter() - start)
        return out


def per_step_ms(step, steps: int) -> dict[str, float]:
    mode = OpTimes()
    with mode:
        for _ in range(steps):
            step()
    out = {}
    for key, times in mode.calls.items():
        kept = sorted(times)[: max(1, len(times) * 3 // 5)]
        out[key] = sum(kept) / len(kept) * len(times) / steps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"one of {', '.join(models.MODELS)}, or any torchvision image classifier")
    parser.add_argument("layout", nargs="?", help="NCHW or channels_last for the convnets (default: the first)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30, help="ops listed per provider")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    reuse_freed_cpu_memory()
    steps = models.model_case(args.model, torch.device("cpu"), args.layout).build(torch.device("cpu"))
    for step in steps.values():  # warm-up, twice each
        step()
        step()
    totals = {}
    for provider, step in steps.items():
        times = per_step_ms(step, args.steps)
        totals[provider] = sum(v for k, v in times.items() if "batchops." in k or replaced_by_batchops(k))
        print(f"== {provider}: ms per step")
        for key, ms in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {ms:8.2f}  {key}")
    print(
        f"batch norm, its activations, max pool and the residual adds, ms per step: torch {totals['torch']:.1f}, "
        f"batchops {totals['batchops']:.1f} (its ops and what fuse left as torch's)"
    )


if __name__ == "__main__":
    main()
