"""The model table for `make gpu-check` (issue 16): whole training steps of torchvision's
resnet50 (and resnet18), batchops (`batchops.fuse`) against torch with cuDNN's batch norm, AMP
(bfloat16 autocast) on CUDA, channels-last first, eager; the same cases as `batchops bench --op
models` (batchops.bench.models), checked (losses and gradient norms equal) and timed interleaved
with a fixed number of samples, without the profiler. Each row is appended to the results file
as soon as it is measured (flushed), so the stage's time cap loses nothing already measured.

usage: python scripts/gpu_model_bench.py OUT.md [--device cuda|cpu] [--tiny] [--reps N]
       (--device cpu --tiny: a dry run of the same code with the smoke-sized models)
"""

from __future__ import annotations

import sys

import torch
from gpu_results import open_results, parse_args, write_row

from batchops.bench import settings_for
from batchops.bench.case import Skip
from batchops.bench.measure import run_case
from batchops.bench.models import model_case, torchvision_or_skip

# Most important first: the stage may be cut off by its time cap.
CASES = (("resnet50", "channels_last"), ("resnet50", "NCHW"), ("resnet18", "channels_last"), ("resnet18", "NCHW"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], default_reps=15, argv=argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_model_bench: no CUDA device", file=sys.stderr)
        return 2
    try:
        torchvision_or_skip()
    except Skip as exc:  # torchvision missing, or not built for this torch
        print(f"gpu_model_bench: {exc}", file=sys.stderr)
        return 3
    device = torch.device(args.device)
    settings = settings_for(smoke=args.tiny, reps=args.reps)
    size = "smoke" if args.tiny else "default"
    preamble = (
        "One training step (forward, cross-entropy, backward, optimizer), eager, batchops.fuse(model) "
        "against the same model with torch's modules; AMP (bfloat16 autocast) on CUDA; medians of "
        f"{args.reps} interleaved samples; ratio = batchops / torch (lower is better)."
    )
    columns = ["model", "layout", "input", "batchops ms", "torch ms", "ratio", "note"]
    with open_results(args.out, "Model training steps", device, preamble, columns) as f:
        for name, layout in CASES:
            case = model_case(name, device, layout, size=size)
            case.profile_calls = 0
            row = run_case(case, device, settings)
            shape = "x".join(map(str, case.shape))
            if row.ratio is None:
                write_row(f, [name, layout, shape, "", "", "", row.note])
            else:
                ours, theirs = row.times["batchops"].median, row.times["torch"].median
                write_row(f, [name, layout, shape, f"{ours:.2f}", f"{theirs:.2f}", f"{row.ratio:.2f}", row.note])
    return 0


if __name__ == "__main__":
    sys.exit(main())
