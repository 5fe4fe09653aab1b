"""Measuring one `Case`: check its providers' outputs, time them interleaved, record their peak
memory, and keep the result as a `Row` (with the ratio, bandwidth and FLOP rate derived from it)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from batchops.bench.case import REFERENCE, Case
from batchops.bench.checks import check_providers
from batchops.bench.stats import Stats
from batchops.bench.timing import TimingSettings, peak_memory_bytes, time_interleaved

__all__ = ["Row", "run_case"]


@dataclass
class Row:
    """A measured case: timings and peak memory per provider, and a note (a failed check, an error)."""

    case: Case
    times: dict[str, Stats] = field(default_factory=dict)
    peak: dict[str, int | None] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if "torch" in self.times and "batchops" in self.times and self.times["torch"].median > 0:
            return self.times["batchops"].median / self.times["torch"].median
        return None

    def flop_rate(self, provider: str) -> float | None:
        t = self.times.get(provider)
        if t is None or not self.case.flops or t.median <= 0:
            return None
        return self.case.flops / (t.median * 1e-3)

    def bandwidth(self) -> float | None:
        t = self.times.get("batchops")
        if t is None or not self.case.bytes_moved or t.median <= 0:
            return None
        return self.case.bytes_moved / (t.median * 1e-3)


def run_case(case: Case, device: torch.device, settings: TimingSettings, check: bool = True) -> Row:
    """Build the case's callables on `device`, check them (unless not `check`), time them and
    measure their peak memory. An exception is caught and written into the row's note: one
    failing case must not lose the whole table."""
    row = Row(case)
    fns = None
    try:
        fns = case.build(device)
        if check:
            row.note = check_providers(fns, case.dtype)
        fns.pop(REFERENCE, None)  # free the float64 copies before timing
        gc.collect()
        row.times = time_interleaved(fns, device, settings)
        row.peak = {name: peak_memory_bytes(fn, device) for name, fn in fns.items()}
    except Exception as exc:  # one failing case must not lose the whole table
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row.note = (row.note + "; " if row.note else "") + f"error: {type(exc).__name__}: {msg}"
    finally:
        fns = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row
