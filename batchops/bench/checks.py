"""Checking that the providers of a case compute the same outputs: against a float64
reference when the case has one, else against each other, within a tolerance per dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from batchops.bench.case import REFERENCE

__all__ = ["max_relative_error", "compare_outputs", "check_providers"]


def _flatten(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}.get(dtype, 2e-3)


def max_relative_error(out: object, ref: object) -> float:
    """Largest |out - ref| over all tensors of `out`, each scaled by max(1, max |ref|) of its
    tensor. Raises ValueError when the two do not have the same tensors and shapes."""
    ta, tb = _flatten(out), _flatten(ref)
    if len(ta) != len(tb):
        raise ValueError(f"{len(ta)} vs {len(tb)} output tensors")
    worst = 0.0
    for a, b in zip(ta, tb):
        if a.shape != b.shape:
            raise ValueError(f"output shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.numel() == 0:
            continue
        a, b = a.detach().double(), b.detach().double()
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        worst = err if not math.isfinite(err) else max(worst, err)
        if not math.isfinite(worst):
            break
    return worst


def compare_outputs(a: object, b: object, dtype: torch.dtype) -> str:
    """ "" when the outputs agree within a tolerance for `dtype` (see max_relative_error),
    else a short description of the mismatch."""
    try:
        err = max_relative_error(a, b)
    except ValueError as exc:
        return f"OUTPUTS DIFFER ({exc})"
    if not math.isfinite(err) or err > _tolerance(dtype):
        return f"OUTPUTS DIFFER (max relative error {err:.2e})"
    return ""


def check_providers(fns: dict[str, Callable[[], object]], dtype: torch.dtype) -> str:
    """Run every provider once and check its outputs: against the float64 REFERENCE callable
    when `fns` has one (the note then says which provider is off), else against each other.
    Returns "" when all agree within the tolerance for `dtype`."""
    names = [n for n in fns if n != REFERENCE]
    outs = {n: fns[n]() for n in names}
    if REFERENCE not in fns:
        if len(names) < 2:
            return ""
        return compare_outputs(outs[names[-1]], outs[names[0]], dtype)
    ref = fns[REFERENCE]()
    errs = {}
    for n in names:
        try:
            errs[n] = max_relative_error(outs[n], ref)
        except ValueError as exc:
            return f"CHECK FAILED: {n}: {exc}"
    tol = _tolerance(dtype)
    off = [n for n, e in errs.items() if not math.isfinite(e) or e > tol]
    if not off:
        return ""
    detail = ", ".join(f"{n} {e:.1e}" for n, e in errs.items())
    return (
        f"{' and '.join(off).upper()} OFF vs float64 (max error / max(1, max abs ref): {detail}; tolerance {tol:.0e})"
    )
