"""The `batchops` console script (also `python -m batchops`).

batchops bench [--device cpu|cuda|auto] [--quick] [--op batch_norm] [--op models] [--reps N] [--out DIR]
batchops info
batchops sweep [--batch-sizes 16,32,64,128,256] [--epochs N] [--lr-rule sqrt] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from batchops.bench import DEFAULT_OPS, DEFAULT_OUT_DIR, OPS

    parser = argparse.ArgumentParser(
        prog="batchops", description="batchops: fused batch-processing kernels for PyTorch"
    )
    sub = parser.add_subparsers(dest="command", metavar="{bench,info,sweep}")

    bench = sub.add_parser(
        "bench",
        help="benchmark batchops against torch and write a markdown table",
        description="Time batchops against torch (interleaved, in one process), print a markdown "
        "table and write it to OUT/<device-tag>-<YYYY-MM-DD>.md. `--op models` times whole training "
        "steps of real architectures (torchvision's resnet18, resnet50 and mobilenet_v3_small, a "
        "TransformerEncoderLayer, an LSTM classifier on packed batches), eager and torch.compile, with a "
        "profiler breakdown of where the time goes; it takes minutes and is not part of the default run "
        "(e.g. `batchops bench --op models --out benchmarks/results/models`).",
    )
    bench.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to run (auto: CUDA when a GPU and CUDA kernels are present, else CPU)",
    )
    bench.add_argument("--quick", action="store_true", help="smaller shapes and fewer samples (CI smoke runs)")
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, 3 samples: tests
    bench.add_argument(
        "--op",
        action="append",
        choices=sorted(OPS),
        dest="ops",
        help=f"op to benchmark (repeatable; default: {', '.join(DEFAULT_OPS)}; only when asked for: "
        "'models' (whole training steps, minutes, needs torchvision) and 'batch_norm_resnet50' "
        "(batch norm at resnet50's 12 layer shapes, 72 cases, 24 on inputs from memory))",
    )
    bench.add_argument(
        "--reps",
        type=int,
        default=None,
        metavar="N",
        help="samples per provider and case, instead of sizing them to a time budget (fewer repeats of slow cases)",
    )
    bench.add_argument(
        "--out",
        default=DEFAULT_OUT_DIR,
        help=f"folder for the results file, created if missing (default: {DEFAULT_OUT_DIR})",
    )
    bench.add_argument("--no-write", action="store_true", help="print the table only")
    bench.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU: keep glibc's adaptive malloc thresholds (by default the run fixes them so that freed "
        "buffers are reused instead of faulted in again; see the report's 'memory' line)",
    )

    sub.add_parser("info", help="print how batchops was built and what torch and devices it sees")
    _add_sweep_parser(sub)
    return parser


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _add_sweep_parser(sub) -> None:
    # `import batchops` has loaded the sweep already; its scikit-learn and matplotlib imports wait
    # until a sweep runs, so `bench` and `info` never need them. The default folder is not
    # benchmarks/sweep, whose committed example a bare run must not overwrite.
    from batchops.tuning.sweep import DEFAULT_OUT_DIR as default_out

    sweep = sub.add_parser(
        "sweep",
        help="convergence study: train a small CNN at several batch sizes, plot and report",
        description="Train the same model (batchops.BatchNorm2d CNN on scikit-learn's digits) from the same "
        "initial weights at each batch size, with the learning rate scaled by a rule; measure the "
        "loss against steps, samples and wall time, the steps and samples to a target loss, the "
        "throughput and the gradient noise scale; print a summary table and write PNG plots, "
        "report.md and sweep.json to OUT.",
    )
    sweep.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=None,
        metavar="B1,B2,...",
        help="comma-separated batch sizes (default: 16,32,64,128,256; --quick: 16,64)",
    )
    sweep.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="epochs of data per batch size (the same samples for each; default: 15)",
    )
    sweep.add_argument("--max-samples", type=int, default=None, help="samples per batch size (overrides --epochs)")
    sweep.add_argument(
        "--lr-rule",
        default="sqrt",
        choices=("sqrt", "linear", "none"),
        help="lr = base_lr * (B / base_batch_size) ** {sqrt: 0.5, linear: 1, none: 0} (default: sqrt)",
    )
    sweep.add_argument(
        "--base-lr",
        type=float,
        default=None,
        help="learning rate at --base-batch-size (default: 0.05 for sgd, 0.001 for adam)",
    )
    sweep.add_argument("--base-batch-size", type=int, default=32, help="batch size of --base-lr (default: 32)")
    sweep.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="sgd (momentum 0.9) or adam")
    sweep.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="training loss that counts as reached (default: the loosest loss every run "
        "reached within half its samples)",
    )
    sweep.add_argument(
        "--out",
        default=default_out,
        help=f"folder for the plots, report.md and sweep.json, created if missing (default: {default_out})",
    )
    sweep.add_argument(
        "--device",
        default="cpu",
        choices=("auto", "cpu", "cuda"),
        help="where to train (default: cpu; auto: CUDA when a GPU and CUDA kernels are present)",
    )
    sweep.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the sample order")
    sweep.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads during the sweep (default: torch's; --quick: 1)"
    )
    sweep.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration (batch sizes 16,64, 640 samples each, 1 thread): a smoke run of seconds",
    )
    sweep.add_argument("--no-noise-scale", action="store_true", help="skip the gradient noise scale measurement")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")


def _info() -> int:
    import platform

    import torch

    import batchops
    from batchops.environment import cpu_model

    print(f"batchops {batchops.__version__} ({os.path.dirname(os.path.abspath(batchops.__file__))})")
    print("build_info:")
    for key, value in batchops.build_info().items():
        print(f"  {key}: {value}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
    print(f"cpu: {cpu_model()}, os.cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("cuda: not available")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from batchops import bench

    ops = tuple(dict.fromkeys(args.ops)) if args.ops else bench.DEFAULT_OPS
    try:
        text, path = bench.run(
            ops,
            device=args.device,
            quick=args.quick,
            smoke=args.smoke,
            out_dir=None if args.no_write else args.out,
            default_malloc=args.default_malloc,
            reps=args.reps,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (RuntimeError, ValueError) as exc:
        print(f"batchops bench: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    if path is not None:
        print(f"written to {path}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from batchops.tuning.sweep import DEFAULT_BATCH_SIZES, batch_size_sweep

    kwargs = {}
    batch_sizes = args.batch_sizes or ((16, 64) if args.quick else DEFAULT_BATCH_SIZES)
    # One thread for the smoke run: the model is tiny, and on a busy machine a second intra-op
    # thread mostly waits for a core.
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    max_samples = args.max_samples
    if args.quick:
        if max_samples is None and args.epochs is None:
            max_samples = 640
        kwargs.update(eval_points=6, noise_points=8, eval_train_samples=512)
    try:
        result = batch_size_sweep(
            batch_sizes,
            lr_rule=args.lr_rule,
            base_lr=args.base_lr,
            base_batch_size=args.base_batch_size,
            optimizer=args.optimizer,
            epochs=args.epochs,
            max_samples=max_samples,
            target_loss=args.target_loss,
            seed=args.seed,
            out_dir=args.out,
            device=args.device,
            num_threads=threads,
            progress=not args.no_progress,
            noise_scale=not args.no_noise_scale,
            **kwargs,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"batchops sweep: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    print(
        f"written to {args.out}: " + ", ".join(sorted(os.path.basename(p) for p in result.files.values())),
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "info":
        return _info()
    if args.command == "sweep":
        return _sweep(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
