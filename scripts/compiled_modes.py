"""A compiled model's training step, torch's against batchops' in each set_compiled_batch_norm mode.

    python scripts/compiled_modes.py resnet18 NCHW [--rounds 15] [--modes torch,batchops] [--families]

One process: torch's model and batchops' (prepare_batchops: convert_batchnorm + fuse), each step
under torch.compile (inductor) as in the model benchmark, one compiled step per mode; rounds
interleaved in alternating order; medians and the spread of each side's steps. --families adds a
torch.profiler breakdown per side (batchops.bench.profiling: inductor's own code is "compiled").
Run it with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 after changing an op's tags or kernels: inductor's
cache key does not cover them. How the "auto" default was chosen: benchmarks/results/compile/.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import batchops
from batchops.bench import models
from batchops.bench.profiling import profile_families
from batchops.bench.timing import reuse_freed_cpu_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small"])
    parser.add_argument("layout", choices=["NCHW", "channels_last"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--modes", default="torch,batchops", help="set_compiled_batch_norm modes for batchops' side")
    parser.add_argument("--families", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reuse_freed_cpu_memory()
    device = torch.device("cpu")
    work = models.workload(args.model, device)
    torch.manual_seed(models.SEED)
    base = work.make_model().to(memory_format=models.LAYOUTS[args.layout]).train()
    inputs, target = work.make_batch(device)
    inputs = tuple(x.contiguous(memory_format=models.LAYOUTS[args.layout]) for x in inputs)

    def side(model, mode):
        step = models._step(model, inputs, target, work.optimizer(model.parameters()), device, True, False)

        def run():
            # The mode is read while dynamo traces, and dynamo guards on it: set it for every call.
            batchops.functional.set_compiled_batch_norm(mode)
            return step()

        return run

    sides = {"torch": side(copy.deepcopy(base), "auto")}
    for mode in args.modes.split(","):
        sides[f"batchops ({mode})"] = side(models.prepare_batchops(copy.deepcopy(base))[0], mode)
    for name, run in sides.items():
        start = time.perf_counter()
        run()
        print(f"{name}: first step (compiles) {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides.items())
        for name, run in order if r % 2 else reversed(order):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    torch_ms = statistics.median(times["torch"]) * 1e3
    for name, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        median = statistics.median(ms)
        print(f"{name:22s} {median:7.1f} ms  ratio {median / torch_ms:.3f}  [{ms[0]:.0f} .. {ms[-1]:.0f}]")
    if args.families:
        for name, run in sides.items():
            families = profile_families(run, device, calls=3)
            print(name, " ".join(f"{k}={v:.1f}" for k, v in families.items() if v >= 0.05))


if __name__ == "__main__":
    main()
