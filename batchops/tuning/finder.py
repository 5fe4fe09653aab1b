"""Find the largest batch size that runs: trial steps at growing sizes, OOM-safe on GPU and CPU.

:func:`find_batch_size` calls ``step_fn(batch_size)`` (one training step: forward, backward,
optimizer step, at that batch size) at growing batch sizes and returns the largest size that
ran, less a safety ``margin``. Two ways a size can fail:

* **Out of memory, caught.** On a GPU running out of memory raises an exception and the
  process survives. :func:`is_oom_error` recognises ``torch.OutOfMemoryError`` and the
  allocator messages that PyTorch Lightning (``is_oom_error``) and Hugging Face accelerate
  (``should_reduce_batch_size``) treat as out-of-memory (see :data:`OOM_MESSAGES`). After such
  a failure the exception (and the frames holding the trial's tensors) is dropped, then
  ``gc.collect()`` and ``torch.cuda.empty_cache()`` run. Any other exception propagates.
* **Over the memory budget, predicted.** On the CPU running out of memory usually means the
  kernel's OOM killer ends the process, so there is nothing to catch. With the memory guard
  (on by default for the CPU) the finder measures each trial's peak memory growth above the
  level at the start of the search (resident set size, sampled by a background thread and, on
  Linux, the kernel's exact peak ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
  fits a line ``peak(b) = a + c * b`` through the trials so far (through the origin while there
  is only one), and never runs a size whose predicted peak exceeds the budget
  (``memory_budget`` bytes, by default ``budget_fraction`` of ``psutil.virtual_memory().available``
  at the start). A size that ran but whose measured peak exceeded the budget also counts as
  failed. The first trial (``start``) has nothing to extrapolate from and always runs.

Search (``mode``), like Lightning's ``BatchSizeFinder``:

* ``"power"``: ``start, 2*start, 4*start, ...`` until a size fails (or ``max_batch_size``);
  the result is the last size that succeeded.
* ``"binsearch"``: the same doubling, then a binary search between the last success and the
  first failure; the result is the largest size that succeeds (exactly, for a monotone limit).

If ``start`` itself fails, the search continues below it (halving for ``"power"``, a binary
search in ``[1, start)`` for ``"binsearch"``). Returned: ``max(1, floor(b * (1 - margin)))``
for the largest good size ``b``.

State: the trials train the model. When ``model`` and/or ``optimizer`` are given, their
``state_dict()`` is copied (to CPU memory, so the copy takes no device memory from the trials)
before the first trial and loaded back after the last, whatever happened (also when an
exception propagates); the model's ``training`` flag is restored too, and its gradients are
cleared (``zero_grad(set_to_none=True)``) since they are trial leftovers. With
``restore_rng=True`` the torch CPU (and, if initialised, CUDA) random-number generator states
are restored as well, so searching does not change the run that follows.

Everything is injectable for testing without real out-of-memory conditions: ``step_fn`` may
raise ``torch.OutOfMemoryError`` itself (a simulated allocator), and ``memory_probe`` replaces
the RSS reading (see :class:`ProcessMemoryProbe` for the protocol).

This module needs only torch and psutil, not batchops' compiled kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchops._checks import check_int, check_real

__all__ = [
    "OOM_MESSAGES",
    "CudaMemoryProbe",
    "FindBatchSizeResult",
    "ProcessMemoryProbe",
    "TrialRecord",
    "find_batch_size",
    "is_oom_error",
]

#: Substrings of ``RuntimeError`` messages treated as out-of-memory (in addition to
#: ``torch.OutOfMemoryError``). The first three are accelerate's ``should_reduce_batch_size``
#: list (Lightning's ``is_oom_error`` accepts the same, matching "CUDA" + "out of memory");
#: ``CUBLAS_STATUS_ALLOC_FAILED`` is cuBLAS failing to allocate its handle or workspace, and
#: the rest are the other backends' caching-allocator messages. ``CUDNN_STATUS_INTERNAL_ERROR``
#: is deliberately not here (it also reports real bugs); pass it in ``oom_messages`` to add it.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
    "DefaultCPUAllocator: can't allocate memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "HIP out of memory",
    "XPU out of memory",
    "MPS backend out of memory",
)

_MODES = ("binsearch", "power")


def is_oom_error(exc: BaseException, extra_messages: Sequence[str] = ()) -> bool:
    """True for ``torch.OutOfMemoryError`` and for a ``RuntimeError`` whose message contains one
    of :data:`OOM_MESSAGES` (or ``extra_messages``)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    if "CUDA" in message and "out of memory" in message:  # Lightning's is_cuda_out_of_memory
        return True
    return any(m in message for m in (*OOM_MESSAGES, *extra_messages))


# ----------------------------------------------------------------------------- memory probes
class ProcessMemoryProbe:
    """This process's resident memory in bytes (``psutil``), the CPU memory guard's default probe.

    Probe protocol (what :func:`find_batch_size` needs from ``memory_probe``): calling it returns
    the memory in use now, in bytes. It is read before each trial and by a background thread
    every ``sample_interval`` seconds during it. Optionally a probe has ``reset_peak()`` (called
    right before each trial) and ``peak()`` (called right after; the highest usage since the
    reset in bytes, or ``None`` if unknown), which makes the measurement exact instead of
    sampled. Here ``peak`` is the kernel's ``VmHWM`` on Linux, reset by writing ``5`` to
    ``/proc/self/clear_refs``; elsewhere it returns ``None``.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._hwm = self._hwm_works()

    def __call__(self) -> int:
        return int(self._process.memory_info().rss)

    @staticmethod
    def _read_hwm() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _hwm_works(self) -> bool:
        if not os.path.exists("/proc/self/clear_refs") or self._read_hwm() is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def reset_peak(self) -> None:
        if self._hwm:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self._hwm = False

    def peak(self) -> int | None:
        return self._read_hwm() if self._hwm else None


class CudaMemoryProbe:
    """Memory reserved by torch's CUDA caching allocator on ``device``, with its exact peak."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device("cuda") if device is None else torch.device(device)

    def __call__(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_reserved(self.device))


class _PeakSampler:
    """Context manager: the probe's highest reading during the block (thread + exact peak)."""

    def __init__(self, probe: Callable[[], int], interval: float) -> None:
        self.probe = probe
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, int(self.probe()))
        except BaseException as exc:  # reported on exit; the trial itself goes on
            self._error = exc

    def __enter__(self) -> _PeakSampler:
        reset = getattr(self.probe, "reset_peak", None)
        if reset is not None:
            reset()
        self.peak = int(self.probe())
        self._thread = threading.Thread(target=self._run, name="batchops-memory-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, int(self.probe()))
        exact = getattr(self.probe, "peak", None)
        if exact is not None:
            value = exact()
            if value is not None:
                self.peak = max(self.peak, int(value))
        if self._error is not None and exc_info[0] is None:
            raise RuntimeError(f"find_batch_size: the memory probe failed: {self._error!r}") from self._error


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class TrialRecord:
    """One batch size the search considered.

    ``outcome``: ``"ok"`` (ran, within budget), ``"oom"`` (an out-of-memory error was caught),
    ``"over_budget"`` (ran, but its measured peak exceeded the budget) or ``"predicted_over"``
    (not run: the fitted line predicted ``predicted_bytes`` above the budget).
    ``peak_bytes``: measured peak growth above the start of the search (memory guard only).
    """

    batch_size: int
    outcome: str
    peak_bytes: int | None = None
    predicted_bytes: float | None = None
    seconds: float = 0.0

    @property
    def ran(self) -> bool:
        return self.outcome != "predicted_over"


@dataclasses.dataclass
class FindBatchSizeResult:
    """What :func:`find_batch_size` found (``return_details=True``).

    ``batch_size``: the answer (``largest_ok`` less the margin); ``largest_ok``: the largest size
    that succeeded; ``smallest_failed``: the smallest size that failed (``None`` if none did);
    ``budget``: the memory budget in bytes (``None`` without the memory guard); ``trials``: every
    size considered, in order.
    """

    batch_size: int
    largest_ok: int
    smallest_failed: int | None
    budget: int | None
    trials: list[TrialRecord]

    @property
    def max_attempted(self) -> int:
        """The largest batch size that was actually run."""
        return max((t.batch_size for t in self.trials if t.ran), default=0)


# ----------------------------------------------------------------------------- state snapshot
def _to_cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        try:
            out = type(obj)((k, _to_cpu_copy(v)) for k, v in obj.items())
        except TypeError:  # a dict subclass with another constructor
            out = {k: _to_cpu_copy(v) for k, v in obj.items()}
        metadata = getattr(obj, "_metadata", None)  # module state_dict versions
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)
        return out
    if isinstance(obj, list):
        return [_to_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _Snapshot:
    def __init__(self, model: torch.nn.Module | None, optimizer: Any, restore_rng: bool) -> None:
        self.model = model
        self.optimizer = optimizer
        self.model_state = _to_cpu_copy(model.state_dict()) if model is not None else None
        self.training = model.training if model is not None else None
        self.optimizer_state = _to_cpu_copy(optimizer.state_dict()) if optimizer is not None else None
        self.cpu_rng = torch.get_rng_state() if restore_rng else None
        self.cuda_rng = None
        if restore_rng and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_rng = torch.cuda.get_rng_state_all()

    def restore(self) -> None:
        if self.model is not None:
            self.model.load_state_dict(self.model_state)
            self.model.train(self.training)
            self.model.zero_grad(set_to_none=True)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- argument checks
def _int_arg(name: str, value: Any, minimum: int) -> int:
    return check_int(f"find_batch_size: {name}", value, minimum)


def _real_arg(name: str, value: Any) -> float:
    return check_real(f"find_batch_size: {name}", value, finite=True, expected="a number")


def _resolve_device(device: Any, model: torch.nn.Module | None) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"find_batch_size: bad device {device!r}: {exc}") from exc
    if model is not None:
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """``(intercept, slope)`` of peak growth vs batch size; through the origin for one size."""
    sizes = sorted({b for b, _ in points})
    if len(sizes) == 1:
        b = sizes[0]
        peak = max(p for s, p in points if s == b)
        return 0.0, max(0.0, peak / b)
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_p = sum(p for _, p in points) / n
    sbb = sum((b - mean_b) ** 2 for b, _ in points)
    sbp = sum((b - mean_b) * (p - mean_p) for b, p in points)
    slope = max(0.0, sbp / sbb)
    return mean_p - slope * mean_b, slope


# ----------------------------------------------------------------------------- the finder
def find_batch_size(
    step_fn: Callable[[int], Any],
    *,
    start: int = 1,
    max_batch_size: int = 65536,
    mode: str = "binsearch",
    margin: float = 0.05,
    trials: int = 1,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    budget_fraction: float = 0.8,
    memory_guard: bool | None = None,
    memory_probe: Callable[[], int] | None = None,
    sample_interval: float = 0.002,
    oom_messages: Sequence[str] = (),
    restore_rng: bool = True,
    on_trial: Callable[[TrialRecord], Any] | None = None,
    return_details: bool = False,
) -> int | FindBatchSizeResult:
    """Largest batch size for which ``step_fn(batch_size)`` runs, less a safety margin.

    Args:
        step_fn: runs one training step at the given batch size (build the batch inside).
            Its return value is ignored.
        start: first size tried (``>= 1``).
        max_batch_size: never try more than this (``>= start``).
        mode: ``"binsearch"`` (doubling, then binary search: the exact largest size) or
            ``"power"`` (doubling only: the largest power-of-two multiple of ``start``).
        margin: safety fraction in ``[0, 1)``; the result is
            ``max(1, floor(largest_ok * (1 - margin)))``.
        trials: steps run per size (``>= 1``); use 2 or more when memory peaks after the first
            step (e.g. optimizer state created by the first ``optimizer.step()``).
        model, optimizer: restored to their state before the search afterwards (see the module
            docstring); the model's device is also the default ``device``.
        device: where the steps run: decides the memory guard's default (on for CPU, off for
            accelerators, where out-of-memory raises) and its default probe. Default: the
            model's device, else CUDA if available, else CPU.
        memory_budget: bytes of peak memory growth (above the level at the start) a trial may
            reach; turns the memory guard on. Default (guard on):
            ``budget_fraction * psutil.virtual_memory().available`` for the CPU,
            ``budget_fraction * free device memory`` for CUDA.
        budget_fraction: fraction in ``(0, 1]`` of the available memory used as the default budget.
        memory_guard: force the memory guard on (``True``) or off (``False``); ``None`` decides
            by ``device`` (on for CPU), or on when ``memory_budget`` or ``memory_probe`` is given.
        memory_probe: memory in use now, in bytes (see :class:`ProcessMemoryProbe` for the
            protocol, including the optional exact ``reset_peak()`` / ``peak()``). Default:
            :class:`ProcessMemoryProbe` for the CPU, :class:`CudaMemoryProbe` for CUDA.
        sample_interval: seconds between the background thread's probe readings.
        oom_messages: extra ``RuntimeError`` message substrings to treat as out-of-memory.
        restore_rng: restore torch's RNG states after the search.
        on_trial: called with each :class:`TrialRecord` as it is decided (progress, logging).
        return_details: return a :class:`FindBatchSizeResult` instead of the int.

    Returns:
        The batch size (an int), or a :class:`FindBatchSizeResult`.

    Raises:
        TypeError, ValueError: bad arguments.
        RuntimeError: not even batch size 1 runs (or fits the budget).
        Any non-out-of-memory exception ``step_fn`` raises (after restoring the state).
    """
    if not callable(step_fn):
        raise TypeError(f"find_batch_size: step_fn must be callable, got {type(step_fn).__name__}")
    start = _int_arg("start", start, 1)
    max_batch_size = _int_arg("max_batch_size", max_batch_size, 1)
    if max_batch_size < start:
        raise ValueError(f"find_batch_size: max_batch_size ({max_batch_size}) is below start ({start})")
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"find_batch_size: mode must be one of {_MODES}, got {mode!r}")
    margin = _real_arg("margin", margin)
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"find_batch_size: margin must be in [0, 1), got {margin}")
    trials = _int_arg("trials", trials, 1)
    budget_fraction = _real_arg("budget_fraction", budget_fraction)
    if not 0.0 < budget_fraction <= 1.0:
        raise ValueError(f"find_batch_size: budget_fraction must be in (0, 1], got {budget_fraction}")
    if memory_budget is not None:
        memory_budget = _int_arg("memory_budget", memory_budget, 1)
    sample_interval = _real_arg("sample_interval", sample_interval)
    if sample_interval <= 0:
        raise ValueError(f"find_batch_size: sample_interval must be positive, got {sample_interval}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"find_batch_size: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not (hasattr(optimizer, "state_dict") and hasattr(optimizer, "load_state_dict")):
        raise TypeError(
            f"find_batch_size: optimizer must have state_dict() and load_state_dict(), got {type(optimizer).__name__}"
        )
    if memory_probe is not None and not callable(memory_probe):
        raise TypeError(f"find_batch_size: memory_probe must be callable, got {type(memory_probe).__name__}")
    if isinstance(oom_messages, str):
        oom_messages = (oom_messages,)
    oom_messages = tuple(oom_messages)
    dev = _resolve_device(device, model)

    if memory_guard is None:
        memory_guard = dev.type == "cpu" or memory_budget is not None or memory_probe is not None
    budget: int | None = None
    if memory_guard:
        if memory_probe is None:
            memory_probe = CudaMemoryProbe(dev) if dev.type == "cuda" else ProcessMemoryProbe()
        if memory_budget is not None:
            budget = memory_budget
        elif dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            budget = int(budget_fraction * free)
        else:
            import psutil

            budget = int(budget_fraction * psutil.virtual_memory().available)

    records: list[TrialRecord] = []
    points: list[tuple[int, int]] = []  # (batch size, peak growth) of trials that ran
    decided: dict[int, bool] = {}

    def emit(record: TrialRecord) -> None:
        records.append(record)
        if on_trial is not None:
            on_trial(record)

    snapshot = _Snapshot(model, optimizer, bool(restore_rng))
    if memory_guard:
        # Garbage still waiting for the collector (tensors in reference cycles) would otherwise
        # count in the baseline and, once collected mid-search, hide that much of a trial's peak.
        _free_memory()
    base_level = int(memory_probe()) if memory_guard else 0

    def good(b: int) -> bool:
        """Run (or refuse) size ``b``; True when it ran within memory."""
        if b in decided:
            return decided[b]
        predicted: float | None = None
        if memory_guard and points:
            intercept, slope = _fit_line(points)
            predicted = intercept + slope * b
            if predicted > budget:
                emit(TrialRecord(b, "predicted_over", predicted_bytes=predicted))
                decided[b] = False
                return False
        oom = False
        peak: int | None = None
        t0 = time.perf_counter()
        try:
            if memory_guard:
                with _PeakSampler(memory_probe, sample_interval) as sampler:
                    for _ in range(trials):
                        step_fn(b)
                peak = max(0, sampler.peak - base_level)
            else:
                for _ in range(trials):
                    step_fn(b)
        except Exception as exc:  # noqa: BLE001 - filtered right here
            if not is_oom_error(exc, oom_messages):
                raise
            oom = True
            exc = None  # drop the traceback (and the trial's tensors it holds) before collecting
        seconds = time.perf_counter() - t0
        if oom:
            _free_memory()
            emit(TrialRecord(b, "oom", predicted_bytes=predicted, seconds=seconds))
            decided[b] = False
            return False
        if peak is not None:
            points.append((b, peak))
            if peak > budget:
                emit(TrialRecord(b, "over_budget", peak, predicted, seconds))
                decided[b] = False
                return False
        emit(TrialRecord(b, "ok", peak, predicted, seconds))
        decided[b] = True
        return True

    try:
        lo, hi = 0, None  # largest success, smallest failure
        b = start
        if good(b):
            lo = b
            while b < max_batch_size:
                b = min(2 * b, max_batch_size)
                if good(b):
                    lo = b
                else:
                    hi = b
                    break
        else:
            hi = b
            if mode == "power":
                while b > 1:
                    b //= 2
                    if good(b):
                        lo = b
                        break
                    hi = b
        if mode == "binsearch" and hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if good(mid):
                    lo = mid
                else:
                    hi = mid
    finally:
        snapshot.restore()
        if dev.type != "cpu":
            _free_memory()  # hand the trials' cached blocks back to the device

    if lo < 1:
        tried = ", ".join(f"{r.batch_size}: {r.outcome}" for r in records)
        raise RuntimeError(f"find_batch_size: no batch size runs within memory (trials: {tried})")
    result = max(1, math.floor(lo * (1.0 - margin)))
    if not return_details:
        return result
    return FindBatchSizeResult(batch_size=result, largest_ok=lo, smallest_failed=hi, budget=budget, trials=records)
