"""Benchmarks of batchops against torch, shared by the `batchops bench` command and the
scripts under benchmarks/: `run` measures the cases of the benchmarks asked for and writes the
report.

Each benchmark lives in a module batchops.bench.<op> that provides `cases(device, quick, smoke)`
(a list of batchops.bench.case.Case) and `NOTES` (how its bytes are counted). To add one, write
that module and add it to OPS; the rest is shared:

* case.py: Case, the providers and modes (what a benchmark module builds);
* measure.py: run_case, one case checked (checks.py), timed and measured into a Row;
* timing.py: interleaved timing, peak memory, copy bandwidth, the CPU's malloc and contention;
* profiling.py: where a case's time goes by op family (for cases with profile_calls);
* stats.py, formatting.py, report.py: the statistics, how they print, the tables and their file;
* batchops.environment: the device and the machine facts every results file records.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

from batchops.bench.formatting import dtype_name
from batchops.bench.measure import Row, run_case
from batchops.bench.report import format_breakdown, format_table, write_results
from batchops.bench.timing import CpuContention, TimingSettings, copy_bandwidth, reuse_freed_cpu_memory
from batchops.environment import environment_lines, resolve_device, utcnow

__all__ = ["OPS", "LONG_OPS", "DEFAULT_OPS", "DEFAULT_OUT_DIR", "run", "settings_for"]

OPS = {
    "batch_norm": "batchops.bench.batch_norm",
    "packing": "batchops.bench.packing",
    "linear": "batchops.bench.linear",
    "memmap": "batchops.bench.memmap",
    "prefetch": "batchops.bench.prefetch",
    "max_pool": "batchops.bench.max_pool",
    "batch_norm_resnet50": "batchops.bench.batch_norm_shapes",
    "models": "batchops.bench.models",
}
# What a run without ops measures: all but the long ones, asked for by name: whole-model
# training steps ("models": minutes, torch.compile's compilation included, needs torchvision)
# and batch norm at all 12 of resnet50's layer shapes ("batch_norm_resnet50": 72 cases, 24 of them on inputs cycled from memory).
LONG_OPS = ("batch_norm_resnet50", "models")
DEFAULT_OPS = tuple(op for op in OPS if op not in LONG_OPS)

DEFAULT_OUT_DIR = os.path.join("benchmarks", "results")


def settings_for(quick: bool = False, smoke: bool = False, reps: int | None = None) -> TimingSettings:
    """The timing settings of a run; `reps` fixes the samples per provider (instead of sizing
    them to the time budget), for fewer repeats of slow cases."""
    settings = _settings(quick, smoke)
    if reps is not None:
        if reps < 1:
            raise ValueError(f"reps must be a positive number of samples, got {reps}")
        settings.min_reps = settings.max_reps = reps
    return settings


def _settings(quick: bool, smoke: bool) -> TimingSettings:
    if smoke:  # tests: tiny shapes, three samples, a small copy
        return TimingSettings(
            warmup_s=0.0, min_warmup=1, budget_s=0.0, min_reps=3, max_reps=3, copy_bytes=4 * 2**20, copy_reps=3
        )
    if quick:  # CI smoke runs
        return TimingSettings(
            warmup_s=0.05, min_warmup=2, budget_s=0.5, min_reps=5, max_reps=25, copy_bytes=64 * 2**20, copy_reps=5
        )
    # The full run: about 5 s per case, so the 12 CPU batch norm cases take ~1.5 minutes.
    return TimingSettings(warmup_s=0.3, min_warmup=3, budget_s=5.0, min_reps=20, max_reps=400)


def run(
    ops: Sequence[str] = ("batch_norm",),
    device: str = "auto",
    quick: bool = False,
    out_dir: str | os.PathLike | None = DEFAULT_OUT_DIR,
    *,
    smoke: bool = False,
    log: Callable[[str], None] | None = None,
    default_malloc: bool = False,
    reps: int | None = None,
) -> tuple[str, str | None]:
    """Run the benchmarks of `ops` on `device` ("cpu", "cuda" or "auto"). Returns the markdown
    report and the path it was written to (out_dir/<device-tag>-<YYYY-MM-DD>.md, with
    "-<op>-<op>..." before ".md" when `ops` is not DEFAULT_OPS; None when out_dir is None).
    `reps` fixes the samples per provider (see settings_for).
    `log`, when given, receives one line per finished case. On the CPU the run first fixes
    glibc's malloc thresholds (batchops.bench.timing.reuse_freed_cpu_memory) unless `default_malloc`.

    Raises the RuntimeError of batchops._extension.require_extension() when the compiled kernels
    are unavailable.
    """
    import torch

    from batchops._extension import build_info, require_extension

    require_extension()
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; available: {sorted(OPS)}")
    dev = resolve_device(device)
    if dev.type == "cuda" and not build_info()["cuda_kernels"]:
        raise RuntimeError(
            "--device cuda, but batchops._C was built without CUDA kernels; rebuild with a "
            "CUDA toolkit (see README.md, 'Build options') or use --device cpu"
        )
    settings = settings_for(quick, smoke, reps)
    when = utcnow()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    # CPU: fixed malloc thresholds, so that page faults on recycled buffers do not decide ratios.
    malloc_note = None
    if dev.type == "cpu" and not default_malloc:
        malloc_note = reuse_freed_cpu_memory()
    contention = CpuContention() if dev.type == "cpu" else None
    copy_bw = copy_bandwidth(dev, settings)
    if log:
        log(f"copy bandwidth: {copy_bw.bytes_per_s / 1e9:.1f} GB/s")

    tables: list[str] = []
    all_rows = []
    for op in ops:
        module = importlib.import_module(OPS[op])
        rows = []
        for case in module.cases(dev, quick=quick, smoke=smoke):
            row = run_case(case, dev, settings)
            rows.append(row)
            if log:
                log(_progress(row))
        all_rows.append((op, module, rows))
    # Measured again after the cases: on a shared machine one measurement can fall in a busy
    # moment, and the best one is the closest to the physical limit.
    copy_bw = copy_bw.combined(copy_bandwidth(dev, settings))
    for op, module, rows in all_rows:
        tables += [f"## {op}", "", format_table(rows, copy_bw), ""]
        breakdown = format_breakdown(rows)
        if breakdown:
            tables += [f"### {op}: where the time goes (torch.profiler, ms per call by op family)", "", breakdown, ""]
        summary = getattr(module, "summary", None)  # optional: a module's own summary of its rows
        if summary is not None:
            tables += [f"### {op}: summary", "", summary(rows), ""]
        notes = getattr(module, "NOTES", "")
        if notes:
            tables += [notes, ""]

    kind = "smoke" if smoke else "quick" if quick else "full"
    sections = [f"# batchops benchmarks ({kind} run): {', '.join(ops)}", ""]
    sections += environment_lines(dev, when)
    sections.append(f"- copy bandwidth: {copy_bw.describe()}")
    if dev.type == "cpu":
        sections.append("- memory: " + (malloc_note or "the C library's default malloc settings"))
    others = contention.others() if contention is not None else None
    if others is not None:
        sections.append(
            f"- other processes kept {others:.2f} of {os.cpu_count()} CPUs busy on average during the run "
            "(/proc/stat minus this process)"
            + (
                ": the machine was shared, so the timings are noisy (a parallel region stalls when one of its "
                "threads loses its core), and ratios reflect how each provider copes with that too"
                if others > 0.2
                else ""
            )
        )
    sections += [
        f"- timing: providers interleaved in one process, alternating order each round; "
        f"{'CUDA events after warm-up, L2 flushed before each sample' if dev.type == 'cuda' else 'time.perf_counter'}; "
        f"warm-up {settings.warmup_s:g} s, {settings.min_warmup} calls or more; samples per provider (n) "
        + (
            f"fixed at {settings.min_reps}"
            if settings.min_reps == settings.max_reps
            else f"sized to about {settings.budget_s:g} s per case, within [{settings.min_reps}, {settings.max_reps}]"
        ),
        "- ratio = batchops median / torch median (lower is better); GB/s = batchops bytes / batchops median; "
        '"of copy BW" = that as a fraction of the copy bandwidth above (it can pass 100% when a case\'s tensors fit in '
        "the last-level cache, as they are reused from call to call); peak memory = "
        + ("torch.cuda.max_memory_allocated increase during one call" if dev.type == "cuda" else "n/a on CPU"),
        "- absolute times compare only within one run on one machine",
        "",
    ]
    sections += tables
    text = "\n".join(sections)
    # A run of other ops than the default ones gets their names in the file name, so that it
    # does not overwrite the day's full run.
    suffix = "" if set(ops) == set(DEFAULT_OPS) else "-" + "-".join(ops)
    path = write_results(text, out_dir, dev, when, suffix) if out_dir is not None else None
    return text, path


def _progress(row: Row) -> str:
    c = row.case
    t = {k: f"{v.median:.3f}" for k, v in row.times.items()}
    return (
        f"  {c.op} {'x'.join(map(str, c.shape))} {c.layout} {dtype_name(c.dtype)} {c.mode}: "
        f"torch {t.get('torch', '-')} ms, batchops {t.get('batchops', '-')} ms {row.note}"
    ).rstrip()
