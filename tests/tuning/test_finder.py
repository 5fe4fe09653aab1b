"""batchops.tuning.find_batch_size: search modes, OOM handling, the CPU memory guard, state restore.

No test runs out of memory for real: a simulated allocator raises torch.OutOfMemoryError above a
known limit and reports fake memory use through the probe protocol (``__call__`` / ``reset_peak``
/ ``peak``), so every search is deterministic.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import batchops.tuning.finder as finder_module
from batchops.tuning import FindBatchSizeResult, find_batch_size, is_oom_error
from batchops.tuning.finder import OOM_MESSAGES, ProcessMemoryProbe


@pytest.fixture(autouse=True)
def count_frees(monkeypatch):
    """Count the finder's gc.collect + empty_cache calls (and skip them: ~0.1 s each here)."""
    calls = []
    monkeypatch.setattr(finder_module, "_free_memory", lambda: calls.append(1))
    return calls


class SimulatedAllocator:
    """A step function and memory probe in one: ``step(b)`` "allocates" ``overhead + per_sample * b``
    bytes above ``base`` for the duration of the step, and raises ``torch.OutOfMemoryError`` when
    ``b > limit`` (``limit=None``: never)."""

    def __init__(self, limit=None, per_sample=1000, overhead=0, base=50_000_000, error=None):
        self.limit = limit
        self.per_sample = per_sample
        self.overhead = overhead
        self.in_use = base
        self._peak = base
        self.attempted = []
        self.error = error or (
            lambda b: torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {b * per_sample} bytes (simulated)"
            )
        )

    def step(self, b):
        self.attempted.append(b)
        if self.limit is not None and b > self.limit:
            raise self.error(b)
        held = self.overhead + self.per_sample * b
        self.in_use += held
        self._peak = max(self._peak, self.in_use)
        self.in_use -= held

    # probe protocol
    def __call__(self):
        return self.in_use

    def reset_peak(self):
        self._peak = self.in_use

    def peak(self):
        return self._peak


# ----------------------------------------------------------------------------- catching OOM (GPU path)
def test_binsearch_finds_exact_limit(count_frees):
    alloc = SimulatedAllocator(limit=300)
    result = find_batch_size(
        alloc.step, mode="binsearch", margin=0.0, memory_guard=False, device="cpu", return_details=True
    )
    assert isinstance(result, FindBatchSizeResult)
    assert result.batch_size == 300 and result.largest_ok == 300 and result.smallest_failed == 301
    assert alloc.attempted[:10] == [2**k for k in range(10)]  # doubling up to the first failure (512)
    assert len(alloc.attempted) == len(set(alloc.attempted))  # no size is tried twice
    assert result.budget is None and all(t.peak_bytes is None for t in result.trials)
    assert len(count_frees) == sum(t.outcome == "oom" for t in result.trials) == 6  # after every OOM


def test_power_returns_last_power_of_two():
    alloc = SimulatedAllocator(limit=300)
    assert find_batch_size(alloc.step, mode="power", margin=0.0, memory_guard=False, device="cpu") == 256
    assert alloc.attempted == [2**k for k in range(10)]
    alloc = SimulatedAllocator(limit=300)
    assert find_batch_size(alloc.step, start=3, mode="power", margin=0.0, memory_guard=False, device="cpu") == 192


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 64, 65, 1000, 4095])
def test_binsearch_any_limit(limit):
    alloc = SimulatedAllocator(limit=limit)
    assert find_batch_size(alloc.step, margin=0.0, memory_guard=False, device="cpu", max_batch_size=10_000) == limit
    assert max(b for b in alloc.attempted if b <= limit) == limit


def test_margin_is_floor_of_fraction():
    for margin, expected in [(0.05, 285), (0.1, 270), (0.5, 150), (0.999, 1)]:
        alloc = SimulatedAllocator(limit=300)
        assert find_batch_size(alloc.step, margin=margin, memory_guard=False, device="cpu") == expected
        assert expected == max(1, math.floor(300 * (1 - margin)))
    alloc = SimulatedAllocator(limit=300)
    assert find_batch_size(alloc.step, memory_guard=False, device="cpu") == 285  # default margin 0.05


def test_max_batch_size_caps_the_search():
    for mode in ("binsearch", "power"):
        alloc = SimulatedAllocator(limit=None)
        assert (
            find_batch_size(alloc.step, mode=mode, margin=0.0, max_batch_size=100, memory_guard=False, device="cpu")
            == 100
        )
        assert max(alloc.attempted) == 100


def test_start_that_fails_searches_below():
    alloc = SimulatedAllocator(limit=5)
    assert find_batch_size(alloc.step, start=64, margin=0.0, memory_guard=False, device="cpu") == 5
    alloc = SimulatedAllocator(limit=5)
    assert find_batch_size(alloc.step, start=64, mode="power", margin=0.0, memory_guard=False, device="cpu") == 4
    assert alloc.attempted == [64, 32, 16, 8, 4]
    for mode in ("binsearch", "power"):
        alloc = SimulatedAllocator(limit=0)
        with pytest.raises(RuntimeError, match="no batch size runs"):
            find_batch_size(alloc.step, start=8, mode=mode, memory_guard=False, device="cpu")


def test_trials_steps_per_size_and_callback():
    alloc = SimulatedAllocator(limit=10)
    seen = []
    find_batch_size(alloc.step, trials=3, margin=0.0, memory_guard=False, device="cpu", on_trial=seen.append)
    assert alloc.attempted[:6] == [1, 1, 1, 2, 2, 2]
    assert [t.batch_size for t in seen] == [1, 2, 4, 8, 16, 12, 10, 11]
    assert [t.outcome for t in seen] == ["ok"] * 4 + ["oom", "oom", "ok", "oom"]


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: out of memory",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1",
    ],
)
def test_allocator_runtime_errors_count_as_oom(message):
    alloc = SimulatedAllocator(limit=40, error=lambda b: RuntimeError(message))
    assert find_batch_size(alloc.step, margin=0.0, memory_guard=False, device="cpu") == 40
    assert is_oom_error(RuntimeError(message))


def test_oom_classification():
    assert is_oom_error(torch.OutOfMemoryError("anything"))
    assert not is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), ["CUDNN_STATUS_INTERNAL_ERROR"])
    assert not is_oom_error(ValueError("CUDA out of memory"))  # only RuntimeErrors
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert "CUDA out of memory" in OOM_MESSAGES


def test_non_oom_errors_propagate():
    def step(b):
        if b >= 16:
            raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        find_batch_size(step, memory_guard=False, device="cpu")
    alloc = SimulatedAllocator(limit=40, error=lambda b: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    with pytest.raises(RuntimeError, match="INTERNAL_ERROR"):
        find_batch_size(alloc.step, memory_guard=False, device="cpu")
    alloc = SimulatedAllocator(limit=40, error=lambda b: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    assert (
        find_batch_size(
            alloc.step, memory_guard=False, device="cpu", margin=0.0, oom_messages=["CUDNN_STATUS_INTERNAL_ERROR"]
        )
        == 40
    )


# ----------------------------------------------------------------------------- model / optimizer restore
def _tiny_training(limit, fail_with=None):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def step(b):
        if b > limit:
            raise (fail_with or torch.OutOfMemoryError)("CUDA out of memory (simulated)")
        x = torch.randn(max(b, 2), 5)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        optimizer.param_groups[0]["lr"] = 123.0  # trials may change anything

    return model, optimizer, step


@pytest.mark.parametrize("fail_with", [None, KeyError])
def test_model_optimizer_and_rng_restored(fail_with):
    model, optimizer, step = _tiny_training(limit=24, fail_with=fail_with)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = optimizer.state_dict()
    rng = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(rng)
    if fail_with is None:
        assert find_batch_size(step, margin=0.0, model=model, optimizer=optimizer, memory_guard=False) == 24
    else:
        with pytest.raises(KeyError):
            find_batch_size(step, margin=0.0, model=model, optimizer=optimizer, memory_guard=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # weights and BatchNorm statistics
    assert not model.training  # the training flag too
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == {} and opt_before["state"] == {}
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.rand(3), expected_next)  # the RNG is where it was


def test_optimizer_state_restored_exactly():
    model, optimizer, step = _tiny_training(limit=8)
    step(4)  # some Adam state exists before the search
    saved = optimizer.state_dict()
    state_before = {
        k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in saved["state"].items()
    }
    weights = [p.detach().clone() for p in model.parameters()]
    find_batch_size(step, model=model, optimizer=optimizer, memory_guard=False)
    state_after = optimizer.state_dict()["state"]
    for k, s in state_before.items():
        for n, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_after[k][n])), (k, n)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


# ----------------------------------------------------------------------------- CPU memory guard
@pytest.mark.parametrize("overhead", [0, 40_000])
def test_cpu_guard_never_runs_a_trial_over_budget(overhead):
    # memory = base + overhead + 1000 * b; budget admits b <= 300 exactly
    budget = overhead + 300 * 1000 + 500
    alloc = SimulatedAllocator(limit=None, overhead=overhead)
    result = find_batch_size(
        alloc.step, margin=0.0, memory_budget=budget, memory_probe=alloc, device="cpu", return_details=True
    )
    assert result.batch_size == 300 and result.budget == budget
    assert max(alloc.attempted) == 300 == result.max_attempted
    ran = [t for t in result.trials if t.ran]
    assert all(t.outcome == "ok" and t.peak_bytes == overhead + 1000 * t.batch_size for t in ran)
    refused = [t for t in result.trials if not t.ran]
    assert refused and all(t.outcome == "predicted_over" and t.predicted_bytes > budget for t in refused)
    assert not set(alloc.attempted) & {t.batch_size for t in refused}

    alloc = SimulatedAllocator(limit=None, overhead=overhead)
    assert (
        find_batch_size(alloc.step, mode="power", margin=0.0, memory_budget=budget, memory_probe=alloc, device="cpu")
        == 256
    )
    assert max(alloc.attempted) == 256


def test_cpu_guard_counts_a_measured_overrun_as_failure():
    # Memory that is flat up to 16 then jumps: the line fitted on small sizes under-predicts 32,
    # which runs, is measured over budget, and is not returned.
    class Jumpy(SimulatedAllocator):
        def step(self, b):
            self.per_sample = 1000 if b <= 16 else 100_000
            super().step(b)

    alloc = Jumpy()
    result = find_batch_size(alloc.step, margin=0.0, memory_budget=1_000_000, memory_probe=alloc, return_details=True)
    outcomes = {t.batch_size: t.outcome for t in result.trials}
    assert outcomes[32] == "over_budget"
    assert result.largest_ok < 32 and all(b <= 32 for b in alloc.attempted)
    assert result.largest_ok == 16  # sizes 17..31 take 100_000 per sample: 1.7e6 > 1e6


def test_cpu_guard_also_catches_cpu_oom_errors():
    alloc = SimulatedAllocator(limit=100, error=lambda b: RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert find_batch_size(alloc.step, margin=0.0, memory_budget=10**9, memory_probe=alloc) == 100


@pytest.mark.slow
def test_cpu_guard_real_process_memory():
    """The default probe (psutil RSS + VmHWM) with real allocations of 128 KiB per sample and a
    32 MiB budget: the answer is near 256 and no trial ran far over the budget. In a fresh
    process: glibc's dynamic mmap threshold remembers the blocks earlier tests freed, and then
    serves these allocations from memory already resident, which the probe cannot see (the test
    failed that way once the test files were reordered)."""
    code = textwrap.dedent("""
        import torch
        from batchops.tuning import find_batch_size
        per_sample = 128 * 1024

        def step(b):
            t = torch.ones(b * per_sample // 4)  # touched, so resident
            assert float(t[-1]) == 1.0
            del t

        r = find_batch_size(step, margin=0.0, memory_budget=32 * 2**20, device="cpu", max_batch_size=4096,
                            return_details=True)
        ran = [t for t in r.trials if t.ran]
        print(r.batch_size, r.max_attempted, all(t.peak_bytes is not None for t in ran))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    batch_size, max_attempted, peaks_known = out.stdout.split()
    # Tolerant: RSS moves in pages and with the allocator's own bookkeeping; 256 is exact.
    assert 64 <= int(batch_size) <= 320, out.stdout
    assert int(max_attempted) <= 384, out.stdout
    assert peaks_known == "True"


def test_process_memory_probe_reads_rss():
    probe = ProcessMemoryProbe()
    assert probe() > 1_000_000
    probe.reset_peak()
    peak = probe.peak()
    if sys.platform.startswith("linux"):  # VmHWM, reset through /proc/self/clear_refs
        assert peak is not None and peak >= 1_000_000
    else:
        assert peak is None or peak >= 1_000_000


def test_default_budget_is_fraction_of_available():
    alloc = SimulatedAllocator(limit=64)
    result = find_batch_size(alloc.step, margin=0.0, memory_probe=alloc, budget_fraction=0.5, return_details=True)
    import psutil

    available = psutil.virtual_memory().available
    assert 0.3 * available < result.budget <= 0.5 * psutil.virtual_memory().total
    assert result.batch_size == 64


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(start=0), ValueError),
        (dict(start=1.5), TypeError),
        (dict(start=True), TypeError),
        (dict(max_batch_size=0), ValueError),
        (dict(start=8, max_batch_size=4), ValueError),
        (dict(mode="linear"), ValueError),
        (dict(margin=1.0), ValueError),
        (dict(margin=-0.1), ValueError),
        (dict(margin="0.1"), TypeError),
        (dict(trials=0), ValueError),
        (dict(memory_budget=0), ValueError),
        (dict(budget_fraction=0.0), ValueError),
        (dict(budget_fraction=1.5), ValueError),
        (dict(sample_interval=0), ValueError),
        (dict(model="model"), TypeError),
        (dict(optimizer=object()), TypeError),
        (dict(memory_probe=5), TypeError),
        (dict(device="nonsense"), ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    alloc = SimulatedAllocator(limit=10)
    with pytest.raises(error):
        find_batch_size(alloc.step, **kwargs)
    assert alloc.attempted == []  # rejected before any trial


def test_step_fn_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        find_batch_size(42)


# ----------------------------------------------------------------------------- a real GPU
@pytest.mark.cuda
def test_cuda_real_out_of_memory():
    free, _ = torch.cuda.mem_get_info()
    chunk = max(2**26, free // 200)  # bytes per "sample": the limit lands around 150-200

    def step(b):
        t = torch.empty(b * chunk, dtype=torch.uint8, device="cuda")
        t.fill_(1)
        torch.cuda.synchronize()

    b = find_batch_size(step, margin=0.0, device="cuda", max_batch_size=4096)
    assert 0.5 * free / chunk <= b <= free / chunk + 1
    assert torch.cuda.memory_allocated() == 0


# ----------------------------------------------------------------------------- no compiled kernels
def test_tuning_imports_without_compiled_extension():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class BlockC:
            def find_spec(self, name, path=None, target=None):
                if name == "batchops._C":
                    raise ImportError("simulated: no compiled module")
        sys.meta_path.insert(0, BlockC())
        import batchops.tuning as tuning
        assert "batchops._C" not in sys.modules
        assert tuning.find_batch_size(lambda b: None, max_batch_size=64, memory_guard=False, margin=0) == 64
        t = tuning.GradientNoiseScale(beta=0.0)
        t.update(2.0, 1.0, 4, 16)
        a = tuning.AdaptiveBatchSize(4, base_batch_size=8, noise_scale=t, world_size=1)
        assert a.update() == round(t.noise_scale / 4)
        print("ok", callable(tuning.batch_size_sweep))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok True"
