"""What the GPU check's benchmark scripts (gpu_quick_bench.py, gpu_model_bench.py) share: their
command line, and a results file that grows row by row (flushed and synced after each row, so
the stage's time cap loses nothing already measured)."""

from __future__ import annotations

import argparse
import datetime
import os
from typing import TextIO

import torch

from batchops.environment import device_name, git_revision


def parse_args(description: str, default_reps: int, argv: list[str] | None = None) -> argparse.Namespace:
    """OUT.md [--device cuda|cpu] [--tiny] [--reps N]; --device cpu --tiny is the CPU dry run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=default_reps)
    return parser.parse_args(argv)


def open_results(path: str, title: str, device: torch.device, preamble: str, columns: list[str]) -> TextIO:
    """Append a section to the results file at `path`: a heading naming the device, torch,
    batchops' commit and the date, `preamble`, and a table header with `columns`."""
    f = open(path, "a")  # noqa: SIM115 (the caller closes it: rows are appended one by one)
    f.write(
        f"\n# {title}: {device_name(device)}, torch {torch.__version__}, batchops {git_revision() or 'unknown'}, "
        f"{datetime.date.today().isoformat()}\n\n{preamble}\n\n"
        f"| {' | '.join(columns)} |\n|{'|'.join('---' for _ in columns)}|\n"
    )
    f.flush()
    return f


def write_row(f: TextIO, cells: list[str]) -> None:
    """One table row, on disk before the next case starts; also printed."""
    row = f"| {' | '.join(cells)} |"
    f.write(row + "\n")
    f.flush()
    os.fsync(f.fileno())
    print(row, flush=True)
