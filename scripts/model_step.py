"""One model's training step, torch's model against batchops', in one process on the CPU.

    python scripts/model_step.py resnet18 channels_last [--compiled] [--reps 40] [--budget 25]
    python scripts/model_step.py efficientnet_b0 NCHW        # any torchvision image classifier

The benchmark's case (batchops.bench.models.model_case: the same model, batch, optimizer,
prepare_batchops and interleaved timing as `batchops bench --op models`) for one model, layout
and mode, with the first step's loss and gradient norm checked equal, printed as one line: the
torch version, medians and [p20, p80] in ms, the ratio. For A/B comparisons (two builds, two
torch versions) run it in alternating processes: one process's ratio moves by 0.02-0.05 on
these shared 2-core machines.
"""

from __future__ import annotations

import argparse

import torch

from batchops.bench import models
from batchops.bench.measure import run_case
from batchops.bench.timing import TimingSettings, reuse_freed_cpu_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"one of {', '.join(models.MODELS)}, or any torchvision image classifier")
    parser.add_argument("layout", nargs="?", help="NCHW or channels_last for the convnets (default: the first)")
    parser.add_argument("--compiled", action="store_true", help="torch.compile the step on both sides")
    parser.add_argument("--reps", type=int, default=40, help="at most this many steps per provider")
    parser.add_argument("--budget", type=float, default=25.0, help="seconds of timed steps, both providers")
    parser.add_argument("--size", choices=("default", "quick", "smoke"), default="default")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's adaptive malloc thresholds, as a plain training script has them (by default they "
        "are fixed as in `batchops bench`: batchops.bench.timing.reuse_freed_cpu_memory)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.default_malloc:
        reuse_freed_cpu_memory()
    device = torch.device("cpu")
    case = models.model_case(args.model, device, args.layout, compiled=args.compiled, size=args.size)
    case.profile_calls = 0  # the timing only; `batchops bench --op models` has the profile
    settings = TimingSettings(budget_s=args.budget, max_reps=args.reps)
    row = run_case(case, device, settings, check=True)
    # run_case adds a failed check, an error or a skip to the case's note (what fuse did).
    if "torch" not in row.times or row.note != case.note:
        raise SystemExit(f"{args.model}: {row.note}")
    t, o = row.times["torch"], row.times["batchops"]
    print(
        f"torch {torch.__version__} {args.model} {case.layout} {case.mode}: "
        f"torch {t.median:.1f} [{t.p20:.1f}, {t.p80:.1f}] ms, batchops {o.median:.1f} [{o.p20:.1f}, {o.p80:.1f}] ms, "
        f"ratio {row.ratio:.3f} ({case.note})"
    )


if __name__ == "__main__":
    main()
