"""Batch norm benchmark: batchops vs torch (the same as `batchops bench --op batch_norm`).

    python benchmarks/bench_batch_norm.py [--device cpu|cuda|auto] [--quick] [--out DIR]

The harness and the cases live in the package (batchops/bench/), so the installed
`batchops bench` command runs exactly this.
"""

import os
import sys

try:
    import batchops  # noqa: F401
except ImportError:  # run from a checkout without installing: use the package next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchops.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "batch_norm", *sys.argv[1:]]))
