"""Summary statistics of timing samples: quantiles and the median with the 20th and 80th
percentiles that every benchmark table reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["quantile", "Stats"]


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics, the
    default of numpy.quantile and torch.quantile."""
    if not samples:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must lie in [0, 1], got {q}")
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles of a list of samples (milliseconds for timings)."""

    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        return cls(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8), len(samples))
