"""The `batchops` console script (also `python -m batchops`).

    batchops bench [--device cpu|cuda|auto] [--quick] [--op batch_norm] [--out DIR]
    batchops info
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    from batchops.bench import DEFAULT_OUT_DIR, OPS

    parser = argparse.ArgumentParser(prog="batchops", description="batchops: fused batch-processing kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info}")

    bench = sub.add_parser("bench", help="benchmark batchops against torch and write a markdown table",
                           description="Time batchops against torch (interleaved, in one process), print a markdown "
                                       "table and write it to OUT/<device-tag>-<YYYY-MM-DD>.md.")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to run (auto: CUDA when a GPU and CUDA kernels are present, else CPU)")
    bench.add_argument("--quick", action="store_true", help="smaller shapes and fewer samples (CI smoke runs)")
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, 3 samples: tests
    bench.add_argument("--op", action="append", choices=sorted(OPS), dest="ops",
                       help="op to benchmark (repeatable; default: all)")
    bench.add_argument("--out", default=DEFAULT_OUT_DIR,
                       help=f"folder for the results file, created if missing (default: {DEFAULT_OUT_DIR})")
    bench.add_argument("--no-write", action="store_true", help="print the table only")

    sub.add_parser("info", help="print how batchops was built and what torch and devices it sees")
    return parser


def _info() -> int:
    import platform

    import torch

    import batchops
    from batchops.bench.harness import cpu_model

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

    ops = tuple(dict.fromkeys(args.ops)) if args.ops else tuple(bench.OPS)
    try:
        text, path = bench.run(ops, device=args.device, quick=args.quick, smoke=args.smoke,
                               out_dir=None if args.no_write else args.out,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    except (RuntimeError, ValueError) as exc:
        print(f"batchops bench: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    if path is not None:
        print(f"written to {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "info":
        return _info()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
