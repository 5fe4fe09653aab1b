"""Timing callables the same way for every benchmark, and the machine's conditions while doing so.

The method follows Liger-Kernel's benchmarks and triton.testing.do_bench:

* the callables of a case (its providers) are timed in the same process, interleaved sample by
  sample (the order alternates each round), so slow drifts of the machine hit all alike;
* the result is the median with the 20th and 80th percentiles, in milliseconds;
* CPU samples use time.perf_counter around one call; CUDA samples use torch.cuda.Event pairs
  recorded on the current stream after warm-up, the L2 flushed before each sample (as do_bench
  does), one synchronize per round;
* peak memory is the torch.cuda.max_memory_allocated delta of one call on CUDA; on CPU it is
  reported as n/a;
* the machine's copy bandwidth (dst.copy_(src) on tensors far larger than the last-level
  cache) is the physical limit of a memory-bound op, against which bytes moved / median time
  is reported;
* on the CPU, glibc's malloc can be told to keep freed blocks (reuse_freed_cpu_memory), and
  CpuContention says how busy other processes kept the machine during the run;
* Python's garbage collector is off while a case is timed, as in `timeit`: one full collection
  before the warm-up, the young generations between rounds (time_interleaved says why).
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchops.bench.formatting import fmt_bytes
from batchops.bench.stats import Stats
from batchops.environment import last_level_cache_bytes, synchronize

__all__ = [
    "TimingSettings",
    "time_interleaved",
    "peak_memory_bytes",
    "CopyBandwidth",
    "copy_bandwidth",
    "CpuContention",
    "reuse_freed_cpu_memory",
]


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
    in an order that alternates between rounds. Returns milliseconds per call.

    The garbage collector is off from the warm-up to the last sample (as in `timeit`); every 16
    rounds the young generations are collected, which frees the providers' cyclic garbage (made
    since the previous collection) in microseconds. A full collection walks every Python object
    (~180k with torch imported, ~50 ms) and evicts the caches: the calls after one ran up to 3x
    slower for about six calls, so it runs once, before the warm-up."""
    settings = settings or TimingSettings()
    names = list(fns)
    if not names:
        return {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return _time_interleaved(fns, names, device, settings)
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_interleaved(
    fns: dict[str, Callable[[], object]], names: list[str], device: torch.device, settings: TimingSettings
) -> dict[str, Stats]:
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
            if count % 16 == 0:
                gc.collect(1)  # the collector is off: free the warm-up's cyclic garbage as it goes
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
        if r % 16 == 15:
            gc.collect(1)  # between rounds, never inside a sample
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
    """The machine's copy bandwidth, read + write bytes per second of a large dst.copy_(src)."""

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


class CpuContention:
    """How many CPUs other processes kept busy while this one ran: the machine-wide busy time
    from /proc/stat minus this process's own CPU time, divided by the wall time. Linux only;
    `others()` is None elsewhere. On a shared machine a value well above 0 means the timings
    are noisy (a thread of a parallel region that loses its core stalls the whole region)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
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
        "see batchops.bench.timing.reuse_freed_cpu_memory; `batchops bench --default-malloc` leaves glibc's defaults"
    )
