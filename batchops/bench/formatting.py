"""How the benchmark tables print quantities: byte counts, timings (median [p20, p80]) and
dtypes."""

from __future__ import annotations

import torch

from batchops.bench.stats import Stats

__all__ = ["fmt_bytes", "fmt_ms", "dtype_name"]


def fmt_bytes(n: int | None) -> str:
    """1.5 GiB, 3.0 MiB, 12.0 KiB, 512 B; "n/a" for None."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_ms(s: Stats | None) -> str:
    """ "median [p20, p80]" with 3, 2 or 1 decimals by magnitude; "-" for None."""
    if s is None:
        return "-"

    def f(v: float) -> str:
        return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"

    return f"{f(s.median)} [{f(s.p20)}, {f(s.p80)}]"


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32", "bfloat16", ...: torch's name without the "torch." prefix."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
