"""The machine a run happens on: which device to use, what it is called, and the facts a
results file records (device and CPU names, cache size, git revision, the time).

Shared by the benchmarks (batchops.bench), the sweep (batchops.tuning.sweep) and the command
line (batchops.cli); it knows nothing about any of them.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess

import torch

from batchops._extension import build_info
from batchops._version import __version__

__all__ = [
    "resolve_device",
    "synchronize",
    "cpu_model",
    "device_name",
    "device_tag",
    "last_level_cache_bytes",
    "git_revision",
    "utcnow",
    "environment_lines",
]


def resolve_device(name: str = "auto") -> torch.device:
    """ "cpu", "cuda" (or "cuda:N"), or "auto": CUDA when a GPU is present and batchops was
    built with CUDA kernels, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available() and build_info()["cuda_kernels"]:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (expected cpu, cuda or auto)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor only
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, else what the platform module says. Virtual
    machines often report only the brand ("AMD EPYC") for processors as different as AVX2-only and
    AVX-512 ones, so the family / model numbers and the widest vector extension follow:
    "AMD EPYC (family 25, model 1, AVX2)"."""
    fields = _cpuinfo_fields()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    details = [f"family {fields['cpu family']}"] if "cpu family" in fields else []
    if "model" in fields:
        details.append(f"model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    if flags:
        details.append("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{name} ({', '.join(details)})" if details else name


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, the CPU model on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device) -> str:
    """A file-name-friendly tag: "cpu-2threads", "cuda-nvidia-h100-80gb-hbm3"."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return f"cpu-{torch.get_num_threads()}threads"


def last_level_cache_bytes(device: torch.device) -> int | None:
    """L2 size on CUDA; the largest cache that sysfs lists for cpu0 on the CPU (None if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size"), encoding="utf-8") as f:
                    text = f.read().strip()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                size = int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
                best = size if best is None else max(best, size)
    except OSError:
        return None
    return best


def git_revision() -> str | None:
    """The short commit of the checkout batchops is imported from, with "+dirty" when tracked
    files differ from it; None outside a git checkout (an installed package) or without git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def utcnow() -> _dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return _dt.datetime.now(_dt.timezone.utc)


def environment_lines(device: torch.device, when: _dt.datetime) -> list[str]:
    """Markdown list items for a results file: the device (with torch's threads), the torch and
    batchops versions (git revision, the extension's build), the date and python."""
    info = build_info()
    rev = git_revision()
    version = f"batchops {__version__}" + (f" (git {rev})" if rev else "")
    kernels = "CUDA kernels for " + ", ".join(info["cuda_archs"]) if info["cuda_kernels"] else "CPU kernels only"
    return [
        f"- device: {device.type}, {device_name(device)}"
        + (
            f" (torch threads: {torch.get_num_threads()}, os.cpu_count: {os.cpu_count()};"
            f" batchops CPU kernels: {info['cpu_kernel_isa']})"
            if device.type == "cpu"
            else f" (CUDA {torch.version.cuda}, torch threads: {torch.get_num_threads()})"
        ),
        f"- torch {torch.__version__}; {version}, extension built with torch {info['built_with_torch']}, {kernels}",
        f"- date: {when.strftime('%Y-%m-%d %H:%M')} UTC; python {platform.python_version()}",
    ]
