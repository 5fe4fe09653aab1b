"""Measuring one `Case`: check its providers' outputs, time them interleaved, record their peak
memory (and, when the case asks, where their time goes by op family), and keep the result as a
`Row` (with the ratio, bandwidth and FLOP rate derived from it)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from batchops.bench.case import REFERENCE, Case, Skip
from batchops.bench.checks import check_providers
from batchops.bench.profiling import profile_families
from batchops.bench.stats import Stats
from batchops.bench.timing import TimingSettings, peak_memory_bytes, time_interleaved
from batchops.environment import synchronize

__all__ = ["Row", "run_case"]


@dataclass
class Row:
    """A measured case: timings and peak memory per provider, and a note (a failed check, an
    error, a skip). `first_ms`: each provider's first call (the check's), one-time costs such as
    torch.compile's compilation included; `families`: ms per call by op family, when the case
    asked for a profile (batchops.bench.profiling)."""

    case: Case
    times: dict[str, Stats] = field(default_factory=dict)
    peak: dict[str, int | None] = field(default_factory=dict)
    note: str = ""
    first_ms: dict[str, float] = field(default_factory=dict)
    families: dict[str, dict[str, float]] = field(default_factory=dict)

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
    measure their peak memory, and profile them when the case asks. An exception is caught and
    written into the row's note (a Skip as "skipped: ..."): one failing case must not lose the
    whole table."""
    row = Row(case)
    fns = None
    try:
        fns = case.build(device)
        if check:
            timed = {
                n: fn if n == REFERENCE else _first_call_timed(n, fn, device, row.first_ms) for n, fn in fns.items()
            }
            row.note = check_providers(timed, case.dtype)
        row.note = "; ".join(n for n in (case.note, row.note) if n)
        fns.pop(REFERENCE, None)  # free the float64 copies before timing (which starts with a full collection)
        row.times = time_interleaved(fns, device, settings)
        row.peak = {name: peak_memory_bytes(fn, device) for name, fn in fns.items()}
        if case.profile_calls > 0:
            row.families = {name: profile_families(fn, device, case.profile_calls) for name, fn in fns.items()}
    except Skip as exc:
        row.note = f"skipped: {exc}"
    except Exception as exc:  # one failing case must not lose the whole table
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row.note = "; ".join(n for n in (row.note or case.note, f"error: {type(exc).__name__}: {msg}") if n)
    finally:
        fns = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _first_call_timed(
    name: str, fn: Callable[[], object], device: torch.device, into: dict[str, float]
) -> Callable[[], object]:
    """`fn`, recording the wall time of its first call in into[name] (ms)."""

    def call():
        if name in into:
            return fn()
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        into[name] = (time.perf_counter() - start) * 1e3
        return out

    return call
