"""The benchmark's markdown: the table of measured rows, the breakdown of profiled rows by op
family, and the results file they are written to (out_dir/<device-tag>-<date><suffix>.md)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable

import torch

from batchops.bench.case import PROVIDERS
from batchops.bench.formatting import dtype_name, fmt_bytes, fmt_ms
from batchops.bench.measure import Row
from batchops.bench.profiling import FAMILIES
from batchops.bench.timing import CopyBandwidth
from batchops.environment import device_tag

__all__ = ["format_table", "format_breakdown", "results_path", "write_results"]


def format_table(rows: Iterable[Row], copy_bw: CopyBandwidth | None) -> str:
    """One markdown row per measured case; "of copy BW" relates its bandwidth to `copy_bw`."""
    header = (
        "| op | shape | layout | dtype | mode | torch ms, median [p20, p80] | batchops ms, median [p20, p80] "
        "| ratio | batchops bytes | batchops GB/s | of copy BW | GFLOP/s torch / batchops | peak mem torch / batchops "
        "| n | note |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        c = row.case
        ratio = row.ratio
        bw = row.bandwidth()
        frac = f"{bw / copy_bw.bytes_per_s:.0%}" if bw is not None and copy_bw is not None else "-"
        peaks = [row.peak.get(p) for p in PROVIDERS]
        peak = "n/a" if all(p is None for p in peaks) else " / ".join(fmt_bytes(p) for p in peaks)
        n = "/".join(sorted({str(s.n) for s in row.times.values()})) or "-"
        rates = [row.flop_rate(p) for p in PROVIDERS]
        gflops = (
            "-"
            if all(r is None for r in rates)
            else " / ".join(f"{r / 1e9:.0f}" if r is not None else "-" for r in rates)
        )
        lines.append(
            f"| {c.op} | {'x'.join(map(str, c.shape))} | {c.layout} | {dtype_name(c.dtype)} | {c.mode} "
            f"| {fmt_ms(row.times.get('torch'))} | {fmt_ms(row.times.get('batchops'))} "
            f"| {f'{ratio:.2f}' if ratio is not None else '-'} "
            f"| {c.bytes_rule or '-'} ({fmt_bytes(c.bytes_moved) if c.bytes_moved else '-'}) "
            f"| {f'{bw / 1e9:.1f}' if bw is not None else '-'} | {frac} | {gflops} | {peak} | {n} | {row.note} |"
        )
    return "\n".join(lines)


def format_breakdown(rows: Iterable[Row]) -> str:
    """Where the time goes, for the rows that were profiled: one line per case and provider with
    its first call (one-time costs such as compilation included), the profiled ms per call, and
    ms (share) per op family; families that are zero throughout are left out. "" when no row
    was profiled."""
    profiled = [row for row in rows if row.families]
    if not profiled:
        return ""
    families = [f for f in FAMILIES if any(fam.get(f, 0.0) > 0 for row in profiled for fam in row.families.values())]
    header = "| case | provider | first call ms | profiled ms per call | " + " | ".join(families) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in profiled:
        c = row.case
        label = f"{c.op} {c.layout} {dtype_name(c.dtype)} {c.mode}"
        for provider, fam in row.families.items():
            total = sum(fam.values())
            first = row.first_ms.get(provider)
            cells = [f"{fam.get(f, 0.0):.1f} ({fam.get(f, 0.0) / total:.0%})" if total > 0 else "-" for f in families]
            lines.append(
                f"| {label} | {provider} | {f'{first:.0f}' if first is not None else '-'} | {total:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def results_path(out_dir: str | os.PathLike, device: torch.device, when: _dt.datetime, suffix: str = "") -> str:
    """out_dir/<device-tag>-<date><suffix>.md"""
    return os.path.join(os.fspath(out_dir), f"{device_tag(device)}-{when.strftime('%Y-%m-%d')}{suffix}.md")


def write_results(
    text: str, out_dir: str | os.PathLike, device: torch.device, when: _dt.datetime, suffix: str = ""
) -> str:
    """Write `text` to results_path(...) (out_dir created if missing); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = results_path(out_dir, device, when, suffix)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path
