"""The records of a sweep: `RunResult` (one batch size's run) and `SweepResult` (all runs, the
target, the noise scale and the trade-off fit), with their summary table and headline text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["RunResult", "SweepResult"]


@dataclass
class RunResult:
    """One batch size's run. `steps`, `evals` and `noise` are lists of flat dicts (see
    batch_size_sweep); the *_to_target fields are filled once the sweep has picked its target
    (None when the run never reached it)."""

    batch_size: int
    lr: float
    num_steps: int
    samples: int
    train_time_s: float
    throughput: float
    diverged: bool
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    noise: list[dict] = field(default_factory=list)
    steps_to_target: float | None = None
    samples_to_target: float | None = None
    time_to_target_s: float | None = None
    noise_scale_at_target: float | None = None

    @property
    def final_eval(self) -> dict:
        return self.evals[-1] if self.evals else {}

    @property
    def final_train_loss(self) -> float:
        return self.final_eval.get("train_loss", math.nan)

    @property
    def final_test_loss(self) -> float:
        return self.final_eval.get("test_loss", math.nan)

    @property
    def final_test_accuracy(self) -> float | None:
        return self.final_eval.get("test_accuracy")

    @property
    def noise_scale_final(self) -> float | None:
        return self.noise[-1]["noise_scale"] if self.noise else None

    def summary(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "num_steps": self.num_steps,
            "samples": self.samples,
            "train_time_s": self.train_time_s,
            "throughput": self.throughput,
            "diverged": self.diverged,
            "final_train_loss": self.final_train_loss,
            "final_test_loss": self.final_test_loss,
            "final_test_accuracy": self.final_test_accuracy,
            "steps_to_target": self.steps_to_target,
            "samples_to_target": self.samples_to_target,
            "time_to_target_s": self.time_to_target_s,
            "noise_scale_at_target": self.noise_scale_at_target,
            "noise_scale_final": self.noise_scale_final,
        }


@dataclass
class SweepResult:
    """What batch_size_sweep returns: the runs (ascending batch size), the target loss, the
    measured noise scale (median over the runs of B_simple where each reached the target), the
    fit of S = S_min * (1 + B_crit / B), the configuration and the files written (role -> path)."""

    runs: list[RunResult]
    target_loss: float
    target_auto: bool
    noise_scale: float | None
    critical_batch_size: float | None
    min_steps: float | None
    min_samples: float | None
    config: dict
    files: dict[str, str] = field(default_factory=dict)

    def run(self, batch_size: int) -> RunResult:
        for r in self.runs:
            if r.batch_size == batch_size:
                return r
        raise KeyError(batch_size)

    @property
    def batch_sizes(self) -> list[int]:
        return [r.batch_size for r in self.runs]

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "target_loss": self.target_loss,
            "target_auto": self.target_auto,
            "noise_scale": self.noise_scale,
            "critical_batch_size": self.critical_batch_size,
            "min_steps": self.min_steps,
            "min_samples": self.min_samples,
            "summary": [r.summary() for r in self.runs],
            "runs": [asdict(r) for r in self.runs],
            "files": self.files,
        }

    def table(self) -> str:
        """The per-batch-size markdown table (also the terminal summary's body)."""
        head = (
            "| batch | lr | steps | final train loss | test loss | test acc | steps to target | "
            "samples to target | time to target | samples/s | B_noise at target | B_noise final |"
        )
        lines = [head, "|" + "---|" * 12]
        for r in self.runs:
            acc = r.final_test_accuracy
            lines.append(
                f"| {r.batch_size} | {r.lr:.4g} | {r.num_steps} | {_fmt(r.final_train_loss, '.4f')}"
                f"{' (diverged)' if r.diverged else ''} | {_fmt(r.final_test_loss, '.4f')} | "
                f"{'n/a' if acc is None else f'{100 * acc:.1f}%'} | {_fmt(r.steps_to_target, '.0f')} | "
                f"{_fmt(r.samples_to_target, '.0f')} | {_fmt(r.time_to_target_s, '.2f', ' s')} | "
                f"{_fmt(r.throughput, '.0f')} | {_fmt(r.noise_scale_at_target, '.0f')} | "
                f"{_fmt(r.noise_scale_final, '.0f')} |"
            )
        return "\n".join(lines)

    def headline(self) -> str:
        """Two lines: the target, the measured noise scale and the fitted critical batch size."""
        if math.isfinite(self.target_loss):
            how = "auto: the loosest loss every run reached within half its samples" if self.target_auto else "given"
            target = (
                f"target loss {self.target_loss:.4g} ({how}; loss on {self.config['eval_train_samples']} "
                "training samples, eval mode)"
            )
        else:
            target = "no target loss: no run got below the initial loss"
        noise = f"noise scale B_simple at the target (median over batch sizes): {_fmt(self.noise_scale, '.0f')}"
        if self.critical_batch_size is not None:
            fit = (
                f"fit S = S_min (1 + B_crit / B): B_crit = {self.critical_batch_size:.0f}, "
                f"S_min = {self.min_steps:.1f} steps, E_min = {self.min_samples:.0f} samples"
            )
        else:
            fit = (
                "fit S = S_min (1 + B_crit / B): not possible (it needs 2 batch sizes that reached the target "
                "after some steps, and a positive fit)"
            )
        return f"{target}\n{noise}; {fit}"

    def summary(self) -> str:
        """The terminal summary: one line of setup, the table, the headline."""
        c = self.config
        setup = (
            f"batch size sweep: {c['dataset']} ({c['train_size']} train / {c['test_size']} test), "
            f"{c['model']}, {c['optimizer']}, lr rule {c['lr_rule']} (base lr {c['base_lr']:g} at batch "
            f"{c['base_batch_size']}), {c['samples_per_run']} samples per run, {c['device_label']}, "
            f"{c['wall_time_s']:.0f} s"
        )
        return f"{setup}\n\n{self.table()}\n\n{self.headline()}"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"
