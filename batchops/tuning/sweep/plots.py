"""The sweep's figures: loss against steps, samples and wall time, steps and samples to the
target against the batch size with the fitted trade-off, throughput, and the noise scale during
training. matplotlib is imported only when a figure is drawn (Agg canvas: no display, no pyplot
state), so the rest of the sweep works without it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from batchops.tuning.sweep.results import RunResult, SweepResult

__all__ = ["plot_all"]


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.4, 4.4)) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # the Agg canvas: no display, no pyplot state

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _log(ax: Any, axis: str, values: Iterable[float | None], base: float = 10) -> None:
    """Log scale on `axis` ("x" or "y") when some of `values` are positive (matplotlib cannot
    draw a log axis without positive data: an empty panel stays linear)."""
    if any(v is not None and math.isfinite(v) and v > 0 for v in values):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)


def _finish_log_log(ax: Any, has_data: bool, empty_note: str, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log scales when the panel has data, else `empty_note` in its middle; then the labels,
    title, grid and, when something is labelled, the legend."""
    if has_data:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _loss_axes(ax: Any, result: SweepResult, xkey: str, xlabel: str, logx: bool) -> None:
    ys = []
    for r, color in zip(result.runs, _colors(len(result.runs))):
        evals = [
            e for e in r.evals if math.isfinite(e["train_loss"]) and e["train_loss"] > 0 and (not logx or e[xkey] > 0)
        ]
        steps = [s for s in r.steps if math.isfinite(s["loss"]) and s["loss"] > 0 and (not logx or s[xkey] > 0)]
        if steps:
            ax.plot([s[xkey] for s in steps], [s["loss"] for s in steps], color=color, alpha=0.15, lw=0.7)
        ax.plot(
            [e[xkey] for e in evals],
            [e["train_loss"] for e in evals],
            color=color,
            marker="o",
            ms=2.5,
            lw=1.4,
            label=f"B={r.batch_size}",
        )
        ys += [e["train_loss"] for e in evals]
    if math.isfinite(result.target_loss) and result.target_loss > 0:
        ax.axhline(result.target_loss, color="crimson", ls="--", lw=1, label=f"target {result.target_loss:.3g}")
    _log(ax, "y", ys)
    if logx:
        _log(ax, "x", [e[xkey] for r in result.runs for e in r.evals])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (eval; faint: mini-batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _reached(result: SweepResult) -> list[RunResult]:
    return [r for r in result.runs if r.steps_to_target and r.samples_to_target]


def _tradeoff_axes(ax: Any, result: SweepResult) -> None:
    """Samples to target against steps to target, one point per batch size, with the fitted
    hyperbola (S / S_min - 1)(E / E_min - 1) = 1."""
    reached = _reached(result)
    for r, color in zip(result.runs, _colors(len(result.runs))):
        if r in reached:
            ax.scatter([r.steps_to_target], [r.samples_to_target], color=color, s=40, zorder=3)
            ax.annotate(
                f"B={r.batch_size}",
                (r.steps_to_target, r.samples_to_target),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    if result.critical_batch_size and reached:
        s_min, e_min, b_crit = result.min_steps, result.min_samples, result.critical_batch_size
        bs = [2 ** (k / 8) for k in range(-8 * 4, 8 * 14)]
        ax.plot(
            [s_min * (1 + b_crit / b) for b in bs],
            [e_min * (1 + b / b_crit) for b in bs],
            color="grey",
            lw=1,
            label=f"fit: B_crit = {b_crit:.0f}",
        )
        ax.axvline(s_min, color="grey", ls=":", lw=0.8)
        ax.axhline(e_min, color="grey", ls=":", lw=0.8)
        ax.scatter([2 * s_min], [2 * e_min], marker="x", color="grey", zorder=3, label="B = B_crit: 2 S_min, 2 E_min")
        if result.noise_scale and result.noise_scale > 0:
            b = result.noise_scale
            ax.scatter(
                [s_min * (1 + b_crit / b)],
                [e_min * (1 + b / b_crit)],
                marker="*",
                s=120,
                color="crimson",
                zorder=4,
                label=f"measured B_noise = {b:.0f}",
            )
        steps = [r.steps_to_target for r in reached]
        samples = [r.samples_to_target for r in reached]
        ax.set_xlim(min(steps + [s_min]) / 1.5, max(steps) * 1.5)
        ax.set_ylim(min(samples + [e_min]) / 1.5, max(samples) * 1.5)
    _finish_log_log(
        ax,
        bool(reached),
        "no run reached the target",
        "optimizer steps to target",
        "samples to target",
        "steps vs samples trade-off",
    )


def _to_target_vs_batch_axes(ax: Any, result: SweepResult) -> None:
    reached = _reached(result)
    bs = [r.batch_size for r in reached]
    ax.plot(bs, [r.steps_to_target for r in reached], "o-", color="tab:blue", label="steps to target")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to target", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(bs, [r.samples_to_target for r in reached], "s-", color="tab:orange", label="samples to target")
    ax2.set_ylabel("samples to target", color="tab:orange")
    if result.critical_batch_size and bs:
        grid = [min(bs) * (max(bs) / min(bs)) ** (k / 50) for k in range(51)]
        ax.plot(
            grid,
            [result.min_steps * (1 + result.critical_batch_size / b) for b in grid],
            color="tab:blue",
            lw=0.8,
            ls=":",
        )
        ax2.plot(
            grid,
            [result.min_samples * (1 + b / result.critical_batch_size) for b in grid],
            color="tab:orange",
            lw=0.8,
            ls=":",
        )
        ax.axvline(
            result.critical_batch_size,
            color="grey",
            ls="--",
            lw=1,
            label=f"fitted B_crit = {result.critical_batch_size:.0f}",
        )
    if bs and result.noise_scale and math.isfinite(result.noise_scale) and result.noise_scale > 0:
        ax.axvline(
            result.noise_scale, color="crimson", ls="--", lw=1, label=f"measured B_noise = {result.noise_scale:.0f}"
        )
    if bs:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax2.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", va="center", transform=ax.transAxes)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="upper center")
    ax.set_title("steps and samples to reach the target loss", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _throughput_axes(ax: Any, result: SweepResult) -> None:
    runs = [r for r in result.runs if math.isfinite(r.throughput) and r.throughput > 0]
    ax.plot([r.batch_size for r in runs], [r.throughput for r in runs], "o-", color="tab:green")
    _log(ax, "x", [r.batch_size for r in runs], base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("training samples / s")
    ax.set_title(f"throughput ({result.config['device_label']})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)


def _noise_axes(ax: Any, result: SweepResult) -> None:
    xs, ys = [], []
    for r, color in zip(result.runs, _colors(len(result.runs))):
        pts = [
            (n["samples"], n["noise_scale"])
            for n in r.noise
            if math.isfinite(n["noise_scale"]) and n["noise_scale"] > 0 and n["samples"] > 0
        ]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=1.2, label=f"B={r.batch_size}")
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
        if r.samples_to_target and r.noise_scale_at_target and r.noise_scale_at_target > 0:
            ax.scatter([r.samples_to_target], [r.noise_scale_at_target], color=color, marker="*", s=80, zorder=3)
            xs.append(r.samples_to_target)
            ys.append(r.noise_scale_at_target)
    _finish_log_log(
        ax,
        bool(xs),
        "no noise scale measured",
        "samples seen",
        "B_simple = tr(Sigma) / |G|^2 (EMA)",
        "gradient noise scale during training (stars: at the target)",
    )


def plot_all(result: SweepResult, files: dict[str, str]) -> None:
    """Draw every figure into the PNG file of its role in `files` (the roles of report.PLOT_FILES)."""
    title = (
        f"{result.config['dataset']}, {result.config['optimizer']}, lr rule {result.config['lr_rule']}, "
        f"{result.config['samples_per_run']} samples per run"
    )
    fig, (a, b, c, d) = _figure(2, 2)
    _loss_axes(a, result, "samples", "samples seen", logx=False)
    a.set_title("loss vs samples seen", fontsize=10)
    _loss_axes(b, result, "step", "optimizer steps", logx=True)
    b.set_title("loss vs steps", fontsize=10)
    _to_target_vs_batch_axes(c, result)
    _throughput_axes(d, result)
    fig.suptitle(f"batch size sweep: {title}", fontsize=11)
    fig.savefig(files["overview"], dpi=100)

    for role, key, label, logx in (
        ("loss_vs_steps", "step", "optimizer steps", True),
        ("loss_vs_samples", "samples", "samples seen", False),
        ("loss_vs_time", "time_s", "training wall time (s)", False),
    ):
        fig, (ax,) = _figure()
        _loss_axes(ax, result, key, label, logx)
        ax.set_title(f"loss vs {label}", fontsize=10)
        fig.savefig(files[role], dpi=100)

    fig, (a, b) = _figure(2, 1)
    _to_target_vs_batch_axes(a, result)
    _tradeoff_axes(b, result)
    fig.savefig(files["steps_vs_samples"], dpi=100)

    fig, (ax,) = _figure()
    _throughput_axes(ax, result)
    fig.savefig(files["throughput"], dpi=100)

    fig, (ax,) = _figure()
    _noise_axes(ax, result)
    fig.savefig(files["noise_scale"], dpi=100)
