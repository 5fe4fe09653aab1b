"""DevicePrefetcher (batchops.data.prefetch): pure Python + torch, no compiled kernels needed."""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import time
import traceback

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, Dataset

from batchops.data.prefetch import DevicePrefetcher, apply_to_tensors

THREAD_PREFIX = "batchops-DevicePrefetcher"
Pair = collections.namedtuple("Pair", ["x", "meta"])


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    name: str
    derived: int = dataclasses.field(init=False, default=7)


class Opaque:
    """A non-tensor leaf: must come out as the very same object."""


def nested_batch(i: int, leaf: Opaque):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(3, 4, generator=g)
    lengths = torch.tensor([3, 2, 1])
    d = collections.defaultdict(list, {"x": x * 2, "ids": torch.arange(i, i + 3)})
    return {
        "tensor": x,
        "tuple": (x + 1, "label", i),
        "list": [torch.full((2,), float(i)), None, leaf],
        "pair": Pair(x.long(), {"k": leaf}),
        "frozen": Frozen(x[0], f"b{i}"),
        "default": d,
        "packed": pack_padded_sequence(x.view(3, 4, 1), lengths, batch_first=True),
    }


def assert_same(a, b, device_type: str):
    """Recursively: same structure and types, tensors equal in value on `device_type`, other
    leaves identical objects (or equal for immutable scalars)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.device.type == device_type
        assert a.dtype == b.dtype and a.shape == b.shape
        if device_type != "meta":
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)
    elif isinstance(a, torch.nn.utils.rnn.PackedSequence):
        assert_same(a.data, b.data, device_type)
        assert a.batch_sizes.device.type == "cpu"  # torch requires host batch sizes
        assert torch.equal(a.batch_sizes, b.batch_sizes)
        assert_same(a.sorted_indices, b.sorted_indices, device_type)
        assert_same(a.unsorted_indices, b.unsorted_indices, device_type)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k], device_type)
        if isinstance(a, collections.defaultdict):
            assert a.default_factory is b.default_factory
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v, device_type)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), device_type)
    elif isinstance(a, (int, float, str)) or a is None:
        assert a == b
    else:
        assert a is b


def prefetch_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}


def wait_gone(threads, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


class Counting:
    """An endless loader that counts how many batches were pulled from it."""

    def __init__(self, limit: int | None = None):
        self.pulled = 0
        self.limit = limit

    def __iter__(self):
        i = 0
        while self.limit is None or i < self.limit:
            self.pulled += 1
            yield torch.tensor([i])
            i += 1


# ----------------------------------------------------------------------------- values and order
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_same_batches_in_order_cpu(depth):
    leaf = Opaque()
    batches = [nested_batch(i, leaf) for i in range(7)]
    out = list(DevicePrefetcher(batches, "cpu", depth=depth))
    assert len(out) == len(batches)
    for a, b in zip(out, batches):
        assert_same(a, b, "cpu")
        assert a is b  # nothing to move on the CPU: the batch itself is passed through


def test_nested_structures_are_rebuilt_when_moved():
    # The meta device exercises the generic (non-CUDA) path and forces every container to be
    # rebuilt: types, order and non-tensor leaves must survive.
    leaf = Opaque()
    batches = [nested_batch(i, leaf) for i in range(3)]
    out = list(DevicePrefetcher(batches, "meta"))
    for a, b in zip(out, batches):
        assert_same(a, b, "meta")
        assert a["frozen"].derived == 7 and a["frozen"].name == b["frozen"].name
        assert a["list"][2] is leaf and a["pair"].meta["k"] is leaf


def test_apply_to_tensors_maps_once_and_keeps_leaves():
    t = torch.ones(2)
    leaf = Opaque()
    calls = []

    def fn(x):
        calls.append(x)
        return x * 3

    out = apply_to_tensors(fn, {"a": t, "b": [t, leaf, "s"], "c": (1, 2.5)})
    assert len(calls) == 1  # the same tensor twice is mapped once
    assert out["a"] is out["b"][0]
    assert torch.equal(out["a"], torch.full((2,), 3.0))
    assert out["b"][1] is leaf and out["b"][2] == "s" and out["c"] == (1, 2.5)
    unchanged = {"x": [1, "a"], "y": leaf}
    assert apply_to_tensors(fn, unchanged) is unchanged


class RangeDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i)), "y": i}


def test_wraps_a_dataloader():
    loader = DataLoader(RangeDataset(), batch_size=4, num_workers=0)
    pf = DevicePrefetcher(loader, torch.device("cpu"))
    assert len(pf) == len(loader) == 3
    got = list(pf)
    want = list(loader)
    assert len(got) == 3
    for a, b in zip(got, want):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_len_forwards_or_raises():
    assert len(DevicePrefetcher([1, 2, 3], "cpu")) == 3
    with pytest.raises(TypeError, match="no len"):
        len(DevicePrefetcher(iter([1, 2]), "cpu"))


def test_empty_loader():
    assert list(DevicePrefetcher([], "cpu")) == []


# ----------------------------------------------------------------------------- errors
def failing_loader():
    for i in range(3):
        yield torch.tensor([i])
    raise_in_loader()


def raise_in_loader():
    raise KeyError("sample 3 is corrupt")


def test_loader_exception_reaches_consumer():
    before = prefetch_threads()
    pf = DevicePrefetcher(failing_loader(), "cpu")
    got = []
    with pytest.raises(KeyError, match="sample 3 is corrupt") as info:
        for batch in pf:
            got.append(int(batch))
    assert got == [0, 1, 2]  # the batches before the failure arrive first
    text = "".join(traceback.format_exception(info.value))
    assert "raise_in_loader" in text and "failing_loader" in text  # the loader's frames
    assert wait_gone(prefetch_threads() - before)


class BadIter:
    def __iter__(self):
        raise OSError("cannot open shard")


def test_iter_exception_is_raised_by_iter():
    with pytest.raises(OSError, match="cannot open shard"):
        iter(DevicePrefetcher(BadIter(), "cpu"))


# ----------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("depth", [1, 3])
def test_break_stops_the_producer(depth):
    loader = Counting()
    before = prefetch_threads()
    for i, _ in enumerate(DevicePrefetcher(loader, "cpu", depth=depth)):
        if i == 0:
            new = prefetch_threads() - before
            assert len(new) == 1
        if i == 4:
            break
    assert wait_gone(new), "the loader thread is still running after break"
    # 5 consumed, `depth` queued, one held by the thread waiting for room, one more it may
    # have pulled before seeing the stop flag.
    assert loader.pulled <= 5 + depth + 2
    time.sleep(0.1)
    pulled = loader.pulled
    time.sleep(0.1)
    assert loader.pulled == pulled


def test_close_and_context_manager_stop_the_producer():
    before = prefetch_threads()
    loader = Counting()
    with DevicePrefetcher(loader, "cpu") as pf:
        it = iter(pf)
        next(it)
        new = prefetch_threads() - before
    assert wait_gone(new, timeout=0.5)  # already joined by __exit__
    with pytest.raises(StopIteration):
        next(it)

    it = iter(DevicePrefetcher(Counting(), "cpu"))
    next(it)
    new = prefetch_threads() - before
    it.close()
    it.close()  # idempotent
    assert wait_gone(new, timeout=0.5)


def test_garbage_collected_iterator_stops_the_producer():
    before = prefetch_threads()
    pf = DevicePrefetcher(Counting(), "cpu")
    it = iter(pf)
    next(it)
    new = prefetch_threads() - before
    del it
    gc.collect()
    assert wait_gone(new)


class Blocking:
    """A loader whose second batch never comes (until the test releases it)."""

    def __init__(self):
        self.release = threading.Event()

    def __iter__(self):
        yield torch.zeros(1)
        self.release.wait()  # "forever"
        yield torch.ones(1)


def test_blocked_loader_does_not_hang_close():
    loader = Blocking()
    before = prefetch_threads()
    try:
        pf = DevicePrefetcher(loader, "cpu", join_timeout=0.2)
        it = iter(pf)
        assert torch.equal(next(it), torch.zeros(1))
        new = prefetch_threads() - before
        start = time.monotonic()
        pf.close()
        assert time.monotonic() - start < 10  # a hang guard: the loader would block forever
        with pytest.raises(StopIteration):
            next(it)
        assert all(t.daemon for t in new)  # cannot keep the interpreter from exiting
    finally:
        loader.release.set()
    assert wait_gone(new)  # it notices the stop flag once the loader returns


def test_full_queue_does_not_block_close():
    # The producer is parked on a full queue (depth 1, nothing consumed).
    before = prefetch_threads()
    pf = DevicePrefetcher(Counting(), "cpu", depth=1)
    it = iter(pf)
    time.sleep(0.1)
    new = prefetch_threads() - before
    start = time.monotonic()
    it.close()
    assert time.monotonic() - start < 10  # a hang guard: the producer is parked on a full queue
    assert wait_gone(new, timeout=5)


# ----------------------------------------------------------------------------- re-iteration
def test_reiteration_restarts():
    loader = DataLoader(RangeDataset(), batch_size=3)
    pf = DevicePrefetcher(loader, "cpu")
    first = [b["y"].tolist() for b in pf]
    second = [b["y"].tolist() for b in pf]
    assert first == second == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_new_pass_stops_the_previous_one():
    pf = DevicePrefetcher(Counting(limit=100), "cpu")
    before = prefetch_threads()
    old = iter(pf)
    assert int(next(old)) == 0
    old_threads = prefetch_threads() - before
    new = iter(pf)
    assert wait_gone(old_threads, timeout=0.5)
    with pytest.raises(StopIteration):
        next(old)
    assert [int(b) for b in new] == list(range(100))


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"depth": 0}, ValueError, "depth"),
        ({"depth": -3}, ValueError, "depth"),
        ({"depth": 1.5}, TypeError, "depth"),
        ({"depth": "2"}, TypeError, "depth"),
        ({"depth": True}, TypeError, "depth"),
        ({"pin_memory": "yes"}, TypeError, "pin_memory"),
        ({"non_blocking": 1}, TypeError, "non_blocking"),
        ({"join_timeout": -1.0}, ValueError, "join_timeout"),
        ({"join_timeout": "1"}, TypeError, "join_timeout"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DevicePrefetcher([1], "cpu", **kwargs)


def test_bad_loader_and_device():
    with pytest.raises(TypeError, match="loader"):
        DevicePrefetcher(5, "cpu")
    with pytest.raises(RuntimeError):
        DevicePrefetcher([1], "not-a-device")
    with pytest.raises(TypeError, match="device"):
        DevicePrefetcher([1], True)
    assert DevicePrefetcher([1], torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="cuda"):
        DevicePrefetcher([1], "cuda")


# ----------------------------------------------------------------------------- overlap
def test_loading_overlaps_compute_on_cpu():
    """Batch i + 1 is being loaded while batch i is computed on: an ordering of events, not a
    speed (a wall-clock bound fails on a busy shared machine)."""
    events = []  # (what, batch), appended from both threads (list.append is atomic)

    def slow_loader():
        for i in range(10):
            events.append(("load start", i))
            time.sleep(0.05)  # sleeping releases the GIL, like I/O or worker processes
            events.append(("load end", i))
            yield torch.tensor([i])

    seen = []
    for batch in DevicePrefetcher(slow_loader(), "cpu", depth=2):
        i = int(batch)
        events.append(("compute start", i))
        time.sleep(0.05)  # "compute"
        events.append(("compute end", i))
        seen.append(i)
    assert seen == list(range(10))
    position = {event: k for k, event in enumerate(events)}
    overlapped = [i for i in range(9) if position[("load start", i + 1)] < position[("compute end", i)]]
    # The producer starts loading batch i + 1 as soon as it handed over batch i (depth 2), so
    # only a loader that waited for the consumer would leave this (nearly) empty.
    assert len(overlapped) >= 8, f"loading overlapped compute for batches {overlapped} only: {events}"


# ----------------------------------------------------------------------------- CUDA
def cuda_batches(n: int, pinned: bool = False):
    out = []
    for i in range(n):
        b = {
            "x": torch.randn(256, 1024),
            "y": torch.arange(256) + i,
            "name": f"b{i}",
            "pair": Pair(torch.full((4,), float(i)), i),
        }
        if pinned:
            b = apply_to_tensors(lambda t: t.pin_memory(), b)
        out.append(b)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize(
    "pin_memory, non_blocking, depth", [(True, True, 2), (True, True, 4), (False, False, 1), (False, True, 2)]
)
def test_cuda_values_and_device(pin_memory, non_blocking, depth):
    batches = cuda_batches(12)
    pf = DevicePrefetcher(batches, "cuda", depth=depth, pin_memory=pin_memory, non_blocking=non_blocking)
    assert pf.device == torch.device("cuda", torch.cuda.current_device())
    got = []
    for b in pf:
        assert b["x"].device == pf.device and b["y"].device == pf.device and b["pair"].x.device == pf.device
        assert b["name"].startswith("b") and isinstance(b["pair"].meta, int)
        # Use the batch on the consumer stream right away, as a training step would.
        got.append({"x": (b["x"] * 2).cpu(), "y": b["y"].cpu(), "pair": b["pair"].x.cpu()})
    assert len(got) == len(batches)
    for g, b in zip(got, batches):
        torch.testing.assert_close(g["x"], b["x"] * 2)
        assert torch.equal(g["y"], b["y"]) and torch.equal(g["pair"], b["pair"].x)


@pytest.mark.cuda
def test_cuda_consumer_on_a_side_stream_and_memory_reuse():
    # The consumer runs on its own stream and frees each batch immediately while its kernels
    # may still be running: record_stream must keep the memory from being reused too early.
    batches = [torch.full((1 << 20,), float(i)) for i in range(40)]
    consumer = torch.cuda.Stream()
    sums = []
    with torch.cuda.stream(consumer):
        for b in DevicePrefetcher(batches, "cuda", depth=3):
            assert b.is_cuda
            torch.cuda._sleep(200_000)  # keep the consumer stream busy (~0.1 ms at 2 GHz)
            sums.append(b.sum())
            del b
    torch.cuda.synchronize()
    # A batch whose memory was reused early would carry another batch's value: far off.
    torch.testing.assert_close(torch.stack(sums).cpu(), torch.arange(40, dtype=torch.float32) * (1 << 20))


@pytest.mark.cuda
def test_cuda_host_side_is_pinned(monkeypatch):
    from batchops.data import prefetch
    from batchops.data.prefetch import _pin

    # Every host tensor goes through _pin in the loader thread and comes out pinned.
    seen = []

    def spy(t):
        out = _pin(t)
        seen.append((t.device.type, out.is_pinned()))
        return out

    monkeypatch.setattr(prefetch, "_pin", spy)
    batches = cuda_batches(3)
    assert not batches[0]["x"].is_pinned()
    for b, ref in zip(DevicePrefetcher(batches, "cuda"), batches):
        assert torch.equal(b["x"].cpu(), ref["x"])
    assert len(seen) == 3 * 3  # x, y and pair.x of each batch
    assert all(dev == "cpu" and pinned for dev, pinned in seen)
    seen.clear()
    list(DevicePrefetcher(batches, "cuda", pin_memory=False))
    assert seen == []
    monkeypatch.undo()

    x = torch.randn(8)
    assert not x.is_pinned()
    p = _pin(x)
    assert p.is_pinned() and torch.equal(p, x)
    assert _pin(p) is p  # already pinned: not copied again
    g = torch.zeros(2, device="cuda")
    assert _pin(g) is g  # device tensors are left alone
    # Already pinned loader output goes through unchanged and arrives intact.
    batches = cuda_batches(4, pinned=True)
    for b, ref in zip(DevicePrefetcher(batches, "cuda"), batches):
        assert ref["x"].is_pinned()
        assert torch.equal(b["x"].cpu(), ref["x"])


@pytest.mark.cuda
def test_cuda_break_and_exception():
    before = prefetch_threads()
    for i, b in enumerate(DevicePrefetcher(Counting(), "cuda")):
        assert b.is_cuda and int(b) == i
        if i == 3:
            break
    assert wait_gone(prefetch_threads() - before)

    def bad():
        yield torch.ones(2)
        raise_in_loader()

    with pytest.raises(KeyError, match="corrupt"):
        for _ in DevicePrefetcher(bad(), "cuda"):
            pass
