"""What a benchmark provides: `Case`s, each a row of the table with a callable per provider.

A benchmark is a module batchops.bench.<name> with `cases(device, quick, smoke)` returning a
list of `Case` (and optionally `NOTES`, how it counts bytes); listing it in batchops.bench.OPS
is all it takes for `batchops bench` to check, time and report it. Nothing here knows about a
particular op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PROVIDERS", "REFERENCE", "MODES", "Case", "Skip"]

PROVIDERS = ("torch", "batchops")
# A case may add this key to its providers: a float64 callable used once to check the outputs,
# never timed.
REFERENCE = "reference"
# "step": one whole training step (forward, loss, backward, optimizer step); "compiled step":
# the same with the model and loss under torch.compile.
MODES = ("forward", "backward", "full", "step", "compiled step")


class Skip(Exception):
    """Raised by a case's build when the case cannot run here (a missing optional dependency):
    the row is reported as skipped, with the message, instead of as an error."""


@dataclass
class Case:
    """One row of the table. `build(device)` returns {provider: callable}; each callable runs
    the op once and returns its outputs. An optional REFERENCE entry computes the same outputs
    in float64; it is called once to check the providers and never timed.

    `note` goes into the table's note column whatever the check finds (the build may fill it
    in, e.g. with what it set up); `profile_calls` > 0 asks for a breakdown of where the time goes: after timing, each
    provider runs that many calls under torch.profiler (batchops.bench.profiling).

    `bytes_moved` counts what batchops' kernels actually read and write (see the op module's
    counting rule); `bytes_rule` states it in units of S (the bytes of one input-sized tensor).
    """

    op: str
    shape: tuple[int, ...]
    layout: str
    dtype: torch.dtype
    mode: str
    build: Callable[[torch.device], dict[str, Callable[[], object]]]
    bytes_moved: int | None = None
    bytes_rule: str = ""
    flops: int | None = None  # floating-point operations per call (products: 2 M K N), for GFLOP/s
    note: str = ""
    profile_calls: int = 0
