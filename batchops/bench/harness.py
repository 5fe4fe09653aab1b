"""A small benchmark harness: two providers per case, timed interleaved in one process.

The shape follows Liger-Kernel's benchmarks and triton.testing.do_bench:

* every case has the providers ``torch`` and ``batchops`` and a mode (forward / backward /
  full); their callables are timed in the same process, interleaved sample by sample (the order
  alternates each round), so slow drifts of the machine hit both alike;
* the result is the median with the 20th and 80th percentiles, in milliseconds;
* CPU samples use time.perf_counter around one call; CUDA samples use torch.cuda.Event pairs
  recorded on the current stream after warm-up, the L2 flushed before each sample (as do_bench
  does), one synchronize per round;
* peak memory is the torch.cuda.max_memory_allocated delta of one call on CUDA; on CPU it is
  reported as n/a;
* bytes moved / median time is reported as a fraction of the machine's copy bandwidth
  (dst.copy_(src) on tensors far larger than the last-level cache), the physical limit of a
  memory-bound op.

Nothing here knows about a particular op: batchops.bench.<op> modules build `Case`s.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "PROVIDERS",
    "REFERENCE",
    "MODES",
    "quantile",
    "Stats",
    "resolve_device",
    "synchronize",
    "cpu_model",
    "device_name",
    "device_tag",
    "last_level_cache_bytes",
    "CpuContention",
    "TimingSettings",
    "reuse_freed_cpu_memory",
    "time_interleaved",
    "peak_memory_bytes",
    "CopyBandwidth",
    "copy_bandwidth",
    "Case",
    "Row",
    "max_relative_error",
    "compare_outputs",
    "check_providers",
    "run_case",
    "fmt_bytes",
    "fmt_ms",
    "dtype_name",
    "environment_lines",
    "format_table",
    "results_path",
    "write_results",
    "utcnow",
]

PROVIDERS = ("torch", "batchops")
# A case may add this key to its providers: a float64 callable used once to check the outputs,
# never timed.
REFERENCE = "reference"
MODES = ("forward", "backward", "full")

# ---------------------------------------------------------------------------------------------
# Statistics


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


# ---------------------------------------------------------------------------------------------
# Devices


def resolve_device(name: str = "auto") -> torch.device:
    """ "cpu", "cuda" (or "cuda:N"), or "auto": CUDA when a GPU is present and batchops was
    built with CUDA kernels, else the CPU."""
    if name == "auto":
        from batchops._extension import build_info

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
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
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


class CpuContention:
    """How many CPUs other processes kept busy while this one ran: the machine-wide busy time
    from /proc/stat minus this process's own CPU time, divided by the wall time. Linux only;
    `others()` is None elsewhere. On a shared machine a value well above 0 means the timings
    are noisy (a thread of a parallel region that loses its core stalls the whole region)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        busy = sum(fields[:3]) + sum(fields[5:8])
        ticks = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy / ticks, t.user + t.system, time.monotonic()

    def others(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[2] - self._start[2]
        if wall <= 0:
            return None
        return max(0.0, ((end[0] - self._start[0]) - (end[1] - self._start[1])) / wall)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class TimingSettings:
    """How long to warm up and measure. The number of samples per provider is chosen from the
    warm-up estimate so that one case takes about `budget_s`, within [min_reps, max_reps]."""

    warmup_s: float = 0.25
    min_warmup: int = 3
    budget_s: float = 3.0
    min_reps: int = 15
    max_reps: int = 200
    copy_bytes: int | None = None  # per tensor; None: 256 MiB on CPU, max(4 x L2, 256 MiB) on CUDA
    copy_reps: int = 15
    flush_l2: bool = True  # CUDA only: overwrite a buffer larger than L2 before each sample


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_cpu_memory(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> str | None:
    """Make glibc's malloc keep freed blocks of up to `mmap_threshold` bytes for reuse.

    torch's CPU tensors come from malloc. By default glibc serves large blocks with fresh mmaps,
    and returns freed memory at the top of its heap to the kernel, with thresholds that adapt to
    the program's history; a block that went back is faulted in again, page by page and zeroed,
    on its next use. Which provider of an interleaved pair pays for that changes from run to
    run (the same Linear+GELU build measured 0.88x, 0.99x and 1.01x minutes apart). Fixed thresholds
    let both reuse their buffers, as they do under jemalloc or tcmalloc (what
    `python -m torch.backends.xeon.run_cpu` preloads for CPU training), so the timings measure
    the kernels. Process-wide, for both providers alike. Returns a description for the report,
    or None where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) and libc.mallopt(
            _M_TRIM_THRESHOLD, int(trim_threshold)
        )
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    return (
        f"glibc malloc set to reuse freed blocks up to {mmap_threshold / 2**20:g} MiB (M_MMAP_THRESHOLD), "
        f"trimming only above {trim_threshold / 2**20:g} MiB (M_TRIM_THRESHOLD), for both providers: "
        "see harness.reuse_freed_cpu_memory; `batchops bench --default-malloc` leaves glibc's defaults"
    )


def _call_cpu(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    settings: TimingSettings | None = None,
) -> dict[str, Stats]:
    """Time each callable of `fns`, interleaved: every round takes one sample of each provider,
    in an order that alternates between rounds. Returns milliseconds per call."""
    settings = settings or TimingSettings()
    names = list(fns)
    if not names:
        return {}

    # Warm-up, which also estimates a call's cost to size the measurement.
    estimate = {}
    for name in names:
        fn = fns[name]
        synchronize(device)
        count, start = 0, time.perf_counter()
        while count < settings.min_warmup or (time.perf_counter() - start < settings.warmup_s and count < 1000):
            fn()
            count += 1
            if device.type == "cuda" and count == 1:
                synchronize(device)
        synchronize(device)
        estimate[name] = (time.perf_counter() - start) / count
    per_round = sum(estimate.values())
    reps = int(settings.budget_s / per_round) if per_round > 0 else settings.max_reps
    reps = max(settings.min_reps, min(settings.max_reps, reps))

    samples: dict[str, list[float]] = {name: [] for name in names}
    flush = None
    if device.type == "cuda" and settings.flush_l2:
        l2 = last_level_cache_bytes(device) or 50 * 2**20
        flush = torch.empty(2 * l2, dtype=torch.int8, device=device)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            order = names if r % 2 == 0 else names[::-1]
            if device.type == "cuda":
                events = []
                for name in order:
                    if flush is not None:
                        flush.zero_()
                    start_ev = torch.cuda.Event(enable_timing=True)
                    end_ev = torch.cuda.Event(enable_timing=True)
                    start_ev.record()
                    fns[name]()
                    end_ev.record()
                    events.append((name, start_ev, end_ev))
                torch.cuda.synchronize(device)
                for name, start_ev, end_ev in events:
                    samples[name].append(start_ev.elapsed_time(end_ev))
            else:
                for name in order:
                    samples[name].append(_call_cpu(fns[name]))
            if r % 16 == 15 and gc_was_enabled:
                gc.enable()  # let cyclic garbage go between rounds, never inside a sample
                gc.collect()
                gc.disable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Stats.of(samples[name]) for name in names}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated above the starting point at the peak of one call (CUDA); None on CPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


@dataclass(frozen=True)
class CopyBandwidth:
    bytes_per_s: float  # the best of the measurements: the closest to the physical limit
    tensor_bytes: int  # size of src (and of dst); one copy moves 2x this
    reps: int
    cache_bytes: int | None
    measurements: tuple[float, ...] = ()  # bytes/s of each measurement (e.g. before and after the cases)

    def describe(self) -> str:
        cache = f"; last-level cache {fmt_bytes(self.cache_bytes)}" if self.cache_bytes else ""
        each = ""
        if len(self.measurements) > 1:
            each = (
                " (best of "
                + " / ".join(f"{m / 1e9:.1f}" for m in self.measurements)
                + " GB/s, measured before / after the cases)"
            )
        return (
            f"{self.bytes_per_s / 1e9:.1f} GB/s{each}: median of {self.reps} `dst.copy_(src)` of "
            f"{fmt_bytes(self.tensor_bytes)} float32 tensors, counted as read + write = "
            f"{fmt_bytes(2 * self.tensor_bytes)} per copy{cache}"
        )

    def combined(self, other: CopyBandwidth) -> CopyBandwidth:
        ms = (self.measurements or (self.bytes_per_s,)) + (other.measurements or (other.bytes_per_s,))
        return CopyBandwidth(max(ms), self.tensor_bytes, self.reps, self.cache_bytes, ms)


def copy_bandwidth(device: torch.device, settings: TimingSettings | None = None) -> CopyBandwidth:
    """Read+write bytes per second of a large dst.copy_(src): the floor for memory-bound ops."""
    settings = settings or TimingSettings()
    cache = last_level_cache_bytes(device)
    nbytes = settings.copy_bytes
    if nbytes is None:
        nbytes = 256 * 2**20
        if device.type == "cuda" and cache:
            nbytes = max(nbytes, 4 * cache)
    numel = max(1, nbytes // 4)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch / page faults out of the way
    stats = time_interleaved(
        {"copy": functools.partial(dst.copy_, src)},
        device,
        TimingSettings(
            warmup_s=0.0,
            min_warmup=2,
            budget_s=0.0,
            min_reps=settings.copy_reps,
            max_reps=settings.copy_reps,
            flush_l2=False,
        ),
    )["copy"]
    del src, dst
    return CopyBandwidth(2 * numel * 4 / (stats.median * 1e-3), numel * 4, stats.n, cache)


# ---------------------------------------------------------------------------------------------
# Cases and results


@dataclass
class Case:
    """One row of the table. `build(device)` returns {provider: callable}; each callable runs
    the op once and returns its outputs. An optional REFERENCE entry computes the same outputs
    in float64; it is called once to check the providers and never timed.

    `bytes_moved` counts what batchops' kernels actually read and write (see the op module's
    counting rule); `bytes_rule` states it in units of S (the bytes of one input-sized tensor).
    """

    op: str
    shape: tuple[int, ...]
    layout: str
    dtype: torch.dtype
    mode: str
    build: Callable[[torch.device], dict[str, Callable[[], object]]]
    bytes_moved: int | None = None
    bytes_rule: str = ""
    flops: int | None = None  # floating-point operations per call (products: 2 M K N), for GFLOP/s


@dataclass
class Row:
    case: Case
    times: dict[str, Stats] = field(default_factory=dict)
    peak: dict[str, int | None] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if "torch" in self.times and "batchops" in self.times and self.times["torch"].median > 0:
            return self.times["batchops"].median / self.times["torch"].median
        return None

    def flop_rate(self, provider: str) -> float | None:
        t = self.times.get(provider)
        if t is None or not self.case.flops or t.median <= 0:
            return None
        return self.case.flops / (t.median * 1e-3)

    def bandwidth(self) -> float | None:
        t = self.times.get("batchops")
        if t is None or not self.case.bytes_moved or t.median <= 0:
            return None
        return self.case.bytes_moved / (t.median * 1e-3)


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}.get(dtype, 2e-3)


def max_relative_error(out, ref) -> float:
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


def compare_outputs(a, b, dtype: torch.dtype) -> str:
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


def run_case(case: Case, device: torch.device, settings: TimingSettings, check: bool = True) -> Row:
    row = Row(case)
    fns = None
    try:
        fns = case.build(device)
        if check:
            row.note = check_providers(fns, case.dtype)
        fns.pop(REFERENCE, None)  # free the float64 copies before timing
        gc.collect()
        row.times = time_interleaved(fns, device, settings)
        row.peak = {name: peak_memory_bytes(fn, device) for name, fn in fns.items()}
    except Exception as exc:  # one failing case must not lose the whole table
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row.note = (row.note + "; " if row.note else "") + f"error: {type(exc).__name__}: {msg}"
    finally:
        fns = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_ms(s: Stats | None) -> str:
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
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _git_revision() -> str | None:
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


def environment_lines(device: torch.device, copy_bw: CopyBandwidth | None, when: _dt.datetime) -> list[str]:
    import batchops
    from batchops._extension import build_info

    info = build_info()
    rev = _git_revision()
    version = f"batchops {batchops.__version__}" + (f" (git {rev})" if rev else "")
    kernels = "CUDA kernels for " + ", ".join(info["cuda_archs"]) if info["cuda_kernels"] else "CPU kernels only"
    lines = [
        f"- device: {device.type}, {device_name(device)}"
        + (
            f" (torch threads: {torch.get_num_threads()}, os.cpu_count: {os.cpu_count()})"
            if device.type == "cpu"
            else f" (CUDA {torch.version.cuda}, torch threads: {torch.get_num_threads()})"
        ),
        f"- torch {torch.__version__}; {version}, extension built with torch {info['built_with_torch']}, {kernels}",
        f"- date: {when.strftime('%Y-%m-%d %H:%M')} UTC; python {platform.python_version()}",
    ]
    if copy_bw is not None:
        lines.append(f"- copy bandwidth: {copy_bw.describe()}")
    return lines


def format_table(rows: Iterable[Row], copy_bw: CopyBandwidth | None) -> str:
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


def results_path(out_dir: str | os.PathLike, device: torch.device, when: _dt.datetime, suffix: str = "") -> str:
    """out_dir/<device-tag>-<date><suffix>.md"""
    return os.path.join(os.fspath(out_dir), f"{device_tag(device)}-{when.strftime('%Y-%m-%d')}{suffix}.md")


def write_results(
    text: str, out_dir: str | os.PathLike, device: torch.device, when: _dt.datetime, suffix: str = ""
) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = results_path(out_dir, device, when, suffix)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)
