"""What the runs say, once they are done: the target loss, when each run reached it (steps,
samples, time, the noise scale there), and the fit of McCandlish's trade-off S = S_min (1 + B_crit / B)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from batchops.tuning.sweep.results import RunResult

__all__ = ["pick_target", "fill_target", "median_noise_scale_at_target", "fit_tradeoff"]


def pick_target(runs: Sequence[RunResult], target_loss: float | None) -> tuple[float, bool]:
    """The given target, or the loosest loss that every (non-diverged) run reached within the
    first half of its samples: the largest over runs of the lowest evaluated loss in
    (0, samples_per_run / 2]. Every run then crosses it with room to spare, and it does not drift
    to the memorisation regime when the runs are long. When that is no lower than the initial
    loss (runs too short to make progress by half-time), the runs' best losses over the whole
    run are used instead."""
    if target_loss is not None:
        return float(target_loss), False
    runs = [r for r in runs if r.evals]
    ok = [r for r in runs if not r.diverged] or runs
    if not ok:
        return math.nan, True
    initial = min(r.evals[0]["train_loss"] for r in ok)

    def loosest(fraction: float) -> float:
        bests = []
        for r in ok:
            limit = fraction * max(e["samples"] for e in r.evals)
            losses = [e["train_loss"] for e in r.evals if 0 < e["samples"] <= limit and math.isfinite(e["train_loss"])]
            bests.append(min(losses) if losses else math.inf)
        return max(bests)

    for fraction in (0.5, 1.0):
        target = loosest(fraction)
        if math.isfinite(target) and not target >= initial:
            return target, True
    return math.nan, True


def fill_target(run: RunResult, target: float) -> None:
    """First crossing of the eval training loss below `target`, interpolated linearly between
    evaluation points (in samples; steps and time alike)."""
    run.steps_to_target = run.samples_to_target = run.time_to_target_s = run.noise_scale_at_target = None
    if not math.isfinite(target):
        return
    prev = None
    for e in run.evals:
        if math.isfinite(e["train_loss"]) and e["train_loss"] <= target:
            if prev is None:
                frac = 0.0
                prev = e
            else:
                span = prev["train_loss"] - e["train_loss"]
                frac = (prev["train_loss"] - target) / span if span > 0 else 1.0
            lerp = lambda k: prev[k] + frac * (e[k] - prev[k])  # noqa: E731
            run.steps_to_target = lerp("step")
            run.samples_to_target = lerp("samples")
            run.time_to_target_s = lerp("time_s")
            break
        prev = e
    if run.samples_to_target is not None and run.noise:
        before = [n for n in run.noise if n["samples"] <= run.samples_to_target]
        rec = before[-1] if before else run.noise[0]
        run.noise_scale_at_target = rec["noise_scale"]


def median_noise_scale_at_target(runs: Sequence[RunResult]) -> float | None:
    """The median over the runs that reached the target of their noise scale there (finite ones
    only); None when there is none."""
    at_target = [
        r.noise_scale_at_target
        for r in runs
        if r.steps_to_target is not None
        and r.noise_scale_at_target is not None
        and math.isfinite(r.noise_scale_at_target)
    ]
    return statistics.median(at_target) if at_target else None


def fit_tradeoff(points: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """Least squares S = S_min + E_min / B over (B, S) points; (S_min, E_min), or (None, None)
    when there are fewer than two batch sizes or the fit is not positive."""
    pts = [(b, s) for b, s in points if s is not None and s > 0]
    if len(pts) < 2 or len({b for b, _ in pts}) < 2:
        return None, None
    xs = [1.0 / b for b, _ in pts]
    ys = [s for _, s in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    if intercept <= 0 or slope <= 0:
        return None, None
    return intercept, slope
