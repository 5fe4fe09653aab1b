"""The sweep's files: the PNG plots (drawn by plots.py), report.md (the setup, the table, the
headline and the plots embedded) and sweep.json (every raw record, one line per record)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from batchops._version import __version__
from batchops.tuning.sweep.inputs import LR_RULES
from batchops.tuning.sweep.plots import plot_all
from batchops.tuning.sweep.results import SweepResult

__all__ = ["DEFAULT_OUT_DIR", "PLOT_FILES", "REPORT_FILE", "JSON_FILE", "write_outputs"]

# `batchops sweep`'s default folder (git-ignored). The committed example results live in
# benchmarks/sweep/ and are reproduced with an explicit --out, never overwritten by default.
DEFAULT_OUT_DIR = "sweep-results"
# The files a sweep writes into out_dir, by role.
PLOT_FILES = {
    "overview": "sweep.png",
    "loss_vs_steps": "loss_vs_steps.png",
    "loss_vs_samples": "loss_vs_samples.png",
    "loss_vs_time": "loss_vs_time.png",
    "steps_vs_samples": "steps_vs_samples.png",
    "throughput": "throughput.png",
    "noise_scale": "noise_scale.png",
}
REPORT_FILE = "report.md"
JSON_FILE = "sweep.json"


def write_outputs(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write the plots, report.md and sweep.json into out_dir (created if missing); returns
    role -> path."""
    os.makedirs(out_dir, exist_ok=True)
    files = {role: os.path.join(out_dir, name) for role, name in PLOT_FILES.items()}
    plot_all(result, files)
    files["report"] = os.path.join(out_dir, REPORT_FILE)
    files["json"] = os.path.join(out_dir, JSON_FILE)
    result.files = dict(files)
    with open(files["report"], "w", encoding="utf-8") as f:
        f.write(_report(result))
    with open(files["json"], "w", encoding="utf-8") as f:
        f.write(_dumps(_jsonable(result.to_dict())))
        f.write("\n")
    return files


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):  # 7 significant digits (float32 precision); null for nan and inf
        return float(f"{obj:.7g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _dumps(obj: Any, indent: str = "") -> str:
    """JSON with one line per record: dicts and lists nest with indentation, but a dict or list
    of scalars (a step, an evaluation, a noise measurement) stays on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and any(isinstance(v, (dict, list)) for v in obj.values()):
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [inner + _dumps(v, inner) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(obj)


def _report(result: SweepResult) -> str:
    c = result.config
    rel = {role: os.path.basename(path) for role, path in result.files.items()}
    lines = [
        "# Batch size sweep",
        "",
        f"{c['when']}, batchops {__version__}, torch {c['torch']}, {c['device_label']} ({c['device_name']}).",
        "",
        f"- data: {c['dataset']}, {c['train_size']} train / {c['test_size']} test",
        f"- model: {c['model']}, the same initial weights (seed {c['seed']}) and the same sample order for "
        "every batch size",
        f"- optimizer: {c['optimizer']}, lr rule `{c['lr_rule']}`: lr = {c['base_lr']:g} * (B / "
        f"{c['base_batch_size']})^{LR_RULES[c['lr_rule']]:g}",
        f"- {c['samples_per_run']} samples per run ({c['epochs']:.1f} epochs), linear learning-rate warm-up over "
        f"the first {c['warmup_samples']} samples; wall time of the sweep {c['wall_time_s']:.0f} s",
        f"- {result.headline().replace(chr(10), chr(10) + '- ')}",
        "",
        result.table(),
        "",
        "Losses are measured in eval mode on a fixed set of training samples; the steps, samples and time to "
        "the target are interpolated between evaluation points. Time counts training steps only (no evaluation, "
        "no noise-scale measurement). B_noise is the gradient noise scale B_simple = tr(Sigma) / |G|^2, from "
        "the two halves of a batch every few steps (exponential moving average of both estimates, each divided by "
        "that measurement's half-batch squared gradient norm so that the average is scale-free), taken at "
        "the last measurement before the run reached the target. McCandlish et al. (2018) predict "
        "S = S_min (1 + B_crit / B) and E = E_min (1 + B / B_crit) with B_crit close to B_noise: below it, "
        "doubling the batch nearly halves the steps; above it, it mostly doubles the samples. "
        "B_noise final is the estimate at the run's last measurement; n/a there means the running |G|^2 "
        "estimate was not positive: near convergence the true gradient is smaller than the noise of its "
        "unbiased estimate, so no gradient signal is detected and B_simple is unbounded, not a number.",
        "",
        f"![overview]({rel['overview']})",
        "",
        f"![steps and samples to target]({rel['steps_vs_samples']})",
        "",
        f"![loss vs steps]({rel['loss_vs_steps']})",
        "",
        f"![loss vs samples]({rel['loss_vs_samples']})",
        "",
        f"![loss vs wall time]({rel['loss_vs_time']})",
        "",
        f"![throughput]({rel['throughput']})",
        "",
        f"![noise scale]({rel['noise_scale']})",
        "",
        f"Raw records (every step, evaluation and noise measurement): `{rel['json']}`.",
        "",
    ]
    return "\n".join(lines)
