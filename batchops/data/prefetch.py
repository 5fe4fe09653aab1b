"""DevicePrefetcher: overlap data loading (and host-to-device copies) with compute.

The CUDA path is NVIDIA apex's ``data_prefetcher`` (examples/imagenet/main_amp.py) with its gaps
closed:

* apex copies from whatever memory the loader returns; a ``non_blocking`` copy from pageable
  memory is staged through a driver buffer and is not truly asynchronous. Here a background
  thread pins every CPU tensor (unless it is pinned already), off the consumer's critical path.
* apex issues batch k+1's copy from the consumer thread, after batch k was handed out, and
  makes the consumer wait for the whole side stream (``wait_stream``). Here the background thread
  issues the copies on a side stream as soon as a batch is pinned, records one CUDA event per
  batch, and the consumer's current stream waits on that batch's event only, so up to ``depth``
  copies can be in flight without serialising on each other.
* like apex, every device tensor handed out is ``record_stream``-ed on the consumer's stream:
  the memory was allocated on the side stream, and without it the caching allocator could hand
  the block to the side stream again while the consumer's kernels still read it.
* the host (pinned) source of each copy is kept alive until the copy's event has completed, so
  a pinned buffer the caching host allocator does not track (e.g. ``cudaHostRegister``-ed) is
  never freed under a running copy.

Everything else (CPU, or any other device) is a plain background thread feeding a bounded
queue, which overlaps loading with compute as long as the two do not fight over the GIL (I/O,
sleeping, torch / numpy ops and DataLoader worker processes all release it).

No compiled code is involved: this module imports with torch alone.
"""

from __future__ import annotations

import atexit
import collections
import copy
import dataclasses
import inspect
import itertools
import numbers
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["DevicePrefetcher", "apply_to_tensors"]

# How often blocked queue operations wake up to check the stop flag: bounds how long a producer
# stuck on a full queue keeps running after close().
_POLL_S = 0.05

# At interpreter exit, how long to wait in all for loader threads that were still running: long
# enough for those parked on the queue to see the stop flag, short enough that a thread stuck in
# its loader does not delay the exit noticeably (it is a daemon thread and is abandoned).
_EXIT_JOIN_S = 0.25

_thread_ids = itertools.count()


# ---------------------------------------------------------------------------------------------
# Nested batches


def _is_packed_sequence(obj: Any) -> bool:
    return isinstance(obj, torch.nn.utils.rnn.PackedSequence)


def apply_to_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any, memo: dict | None = None) -> Any:
    """Return `obj` with every tensor ``t`` inside it replaced by ``fn(t)``.

    Walks tensors, mappings (dict subclasses keep their type and state, e.g. defaultdict's
    factory), namedtuples, tuples, lists and dataclass instances; any other object is a leaf
    and is returned as is. A container none of whose tensors changed is returned itself (not a
    copy). A tensor that appears several times is mapped once (``memo``, keyed by ``id``).
    A PackedSequence keeps its ``batch_sizes`` untouched: torch requires them on the CPU.
    """
    if memo is None:
        memo = {}
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, fn(obj))  # obj kept in the memo so its id is not recycled
        return memo[key][1]
    if _is_packed_sequence(obj):
        fields = [obj.data, obj.batch_sizes, obj.sorted_indices, obj.unsorted_indices]
        new = [f if i == 1 else apply_to_tensors(fn, f, memo) for i, f in enumerate(fields)]
        return obj if all(a is b for a, b in zip(fields, new)) else type(obj)(*new)
    if isinstance(obj, Mapping):
        items = {k: apply_to_tensors(fn, v, memo) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        if isinstance(obj, dict):
            try:  # copy.copy keeps the subclass and its extra state (defaultdict, OrderedDict)
                out = copy.copy(obj)
                out.update(items)
                return out
            except Exception:
                return items
        try:
            return type(obj)(items)
        except Exception:
            return items
    if isinstance(obj, (tuple, list)):
        new = [apply_to_tensors(fn, v, memo) for v in obj]
        if all(a is b for a, b in zip(obj, new)):
            return obj
        if isinstance(obj, tuple):
            if hasattr(obj, "_fields"):  # namedtuple: positional constructor
                return type(obj)(*new)
            if type(obj) is tuple:
                return tuple(new)
            try:
                return type(obj)(new)
            except Exception:
                return tuple(new)
        if type(obj) is list:
            return new
        try:
            out = copy.copy(obj)
            out[:] = new
            return out
        except Exception:
            return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj)]
        old = [getattr(obj, name) for name in fields]
        new = [apply_to_tensors(fn, v, memo) for v in old]
        if all(a is b for a, b in zip(old, new)):
            return obj
        # copy + object.__setattr__ rather than dataclasses.replace: it also works for frozen
        # dataclasses and fields declared with init=False.
        out = copy.copy(obj)
        for name, value in zip(fields, new):
            object.__setattr__(out, name, value)
        return out
    return obj


def _each_tensor(obj: Any, fn: Callable[[torch.Tensor], None]) -> None:
    """Call fn on every tensor of `obj` (same traversal as apply_to_tensors), for side effects."""

    def visit(t: torch.Tensor) -> torch.Tensor:
        fn(t)
        return t

    apply_to_tensors(visit, obj)


def _pin(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


# ---------------------------------------------------------------------------------------------
# The producer thread


class _End:
    """Queue sentinel: the loader is exhausted."""


_END = _End()


class _Failure:
    """Queue item carrying an exception raised in the producer thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _CudaBatch:
    """A batch whose host-to-device copies were issued on the side stream; `event` marks their end."""

    __slots__ = ("batch", "event")

    def __init__(self, batch: Any, event: torch.cuda.Event) -> None:
        self.batch = batch
        self.event = event


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item`, waking up regularly so a stop request is noticed even when the queue stays
    full. Returns False when stopped before the item went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    it: Iterator, q: queue.Queue, stop: threading.Event, transfer: Callable[[Any], Any], device: torch.device
) -> None:
    """Thread body. It holds no reference to the prefetcher or its iterator, so those can be
    garbage-collected (and their finalizer stop this thread) while it runs."""
    # Copies not yet known to be complete: (event, host batch), keeping the host source alive.
    pending: collections.deque[tuple] = collections.deque()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # per thread: pinning and copies use this device's context
        while not stop.is_set():
            try:
                batch = next(it)
            except StopIteration:
                _put(q, _END, stop)
                return
            item = transfer(batch)
            if isinstance(item, _CudaBatch):
                # The loader's own tensors: the pinned copies made by _pin come from torch's
                # caching host allocator, which already keeps them until their copy is done.
                pending.append((item.event, batch))
                while pending and pending[0][0].query():
                    pending.popleft()
            if not _put(q, item, stop):
                return
    except BaseException as exc:  # noqa: B036 -- everything reaches the consumer, re-raised there
        _put(q, _Failure(exc), stop)
    finally:
        for event, _ in pending:  # do not free host memory under a running copy
            try:
                event.synchronize()
            except Exception:
                pass
        pending.clear()
        if inspect.isgenerator(it):
            try:  # run the generator's finally blocks / context managers now, in this thread
                it.close()
            except Exception:
                pass


class _Producer:
    """The thread, its queue and its stop flag. Shared by the iterator and its finalizer."""

    def __init__(self, it: Iterator, depth: int, transfer: Callable[[Any], Any], device: torch.device) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=_produce,
            args=(it, self.queue, self.stop_event, transfer, device),
            name=f"batchops-DevicePrefetcher-{next(_thread_ids)}",
            daemon=True,
        )
        _LIVE.add(self)
        self.thread.start()

    def stop(self, timeout: float | None) -> None:
        """Ask the thread to stop, free the queued batches, wait up to `timeout` s for it to end.

        A producer blocked inside the loader's ``__next__`` cannot be interrupted; it is a
        daemon thread, so it never keeps the interpreter from exiting, and it stops at its next
        check of the flag."""
        self.stop_event.set()
        self._drain()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self._drain()  # an item put between the first drain and the thread's exit

    def _drain(self) -> None:
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass


_LIVE: weakref.WeakSet[_Producer] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every running loader thread at once, then give them _EXIT_JOIN_S in all to end
    (rather than each iterator's full join_timeout, one after the other)."""
    producers = list(_LIVE)
    for p in producers:
        p.stop_event.set()
        p._drain()
    deadline = time.monotonic() + _EXIT_JOIN_S
    for p in producers:
        p.thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------------
# Public API


class _PrefetchIterator:
    """One pass over the loader (what ``iter(DevicePrefetcher)`` returns)."""

    def __init__(self, owner: DevicePrefetcher) -> None:
        self.device = owner.device
        self._join_timeout = owner.join_timeout
        it = iter(owner.loader)  # in the caller's thread, so errors of iter() surface here
        self._producer = _Producer(it, owner.depth, owner._make_transfer(), self.device)
        del it
        # Runs on close() and on garbage collection (e.g. after `break`).
        self._finalizer = weakref.finalize(self, self._producer.stop, self._join_timeout)
        self._finalizer.atexit = False  # _stop_all_at_exit does it, with a short overall wait
        self._done = False

    def __iter__(self) -> _PrefetchIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            exc = item.exc
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note("(raised in the loader thread of batchops.data.DevicePrefetcher)")
            # Raising the original object keeps its type, message and traceback (which shows the
            # loader's frames); this frame is appended to it.
            raise exc
        if isinstance(item, _CudaBatch):
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(item.event)  # the consumer's work starts after the copies end
            # Allocated on the side stream, used on the consumer's: tell the caching allocator so
            # the memory is not reused before the consumer's work queued until its free is done.
            _each_tensor(item.batch, lambda t: t.record_stream(stream) if t.is_cuda else None)
            return item.batch
        return item

    def _get(self) -> Any:
        producer = self._producer
        while True:
            try:
                return producer.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._done:  # closed (e.g. from another thread) while waiting
                    raise StopIteration from None
                if producer.thread.is_alive():
                    continue
                try:  # it may have put its last item just before ending
                    return producer.queue.get_nowait()
                except queue.Empty:
                    self.close()
                    raise RuntimeError("DevicePrefetcher: the loader thread ended without a result") from None

    def close(self) -> None:
        """Stop the loader thread and drop the prefetched batches (idempotent)."""
        self._done = True
        self._finalizer()

    def __enter__(self) -> _PrefetchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DevicePrefetcher:
    """Iterate over `loader` with its batches moved to `device` ahead of time.

    Args:
        loader: any iterable of batches, typically a ``torch.utils.data.DataLoader``. A batch
            is a tensor or a nesting of tuples, lists, dicts, namedtuples and dataclasses of
            tensors; every tensor is moved, every other object is passed through unchanged.
        device: where batches go (anything ``torch.device`` accepts).
        depth: how many prepared batches may wait for the consumer (the queue's size, >= 1);
            the thread may hold one more while it waits for room. On CUDA each of them is a
            device copy: budget ``depth + 2`` batches of device memory with the consumer's.
        non_blocking: CUDA only: asynchronous host-to-device copies (needs pinned memory).
        pin_memory: CUDA only: pin CPU tensors that are not pinned yet, in the loader thread.
        join_timeout: how long ``close()`` waits for the loader thread to end, in seconds
            (None: wait indefinitely). A thread stuck in the loader is left behind as a
            daemon thread; it stops after its current batch.

    A background thread pulls batches from the loader into a queue of ``depth`` batches, so
    loading overlaps compute. For CUDA, that thread also pins the batch and issues its copies
    on a side stream; the consumer's current stream waits for a batch's copies (an event, not a
    host synchronisation) when the batch is handed out, and every tensor handed out is
    ``record_stream``-ed on it, so the caching allocator keeps the memory until the consumer's
    work is done.

    Each ``iter()`` starts a new pass over the loader and stops the previous pass, if one is
    still running. Breaking out of the loop (the pass's iterator is then garbage-collected),
    ``close()`` on the prefetcher or on the iterator, or leaving a ``with`` block stop the loader
    thread promptly (within ``join_timeout``, or once the loader returns its current batch).
    An exception raised by the loader is re-raised in the consumer, the same object with its
    traceback. ``len()`` is the loader's.

    Example::

        loader = DataLoader(dataset, batch_size=256, num_workers=4)
        for x, y in DevicePrefetcher(loader, "cuda"):
            loss = criterion(model(x), y)  # x, y already on the GPU, copied during the last step
    """

    def __init__(
        self,
        loader: Iterable,
        device: Any,
        depth: int = 2,
        *,
        non_blocking: bool = True,
        pin_memory: bool = True,
        join_timeout: float | None = 1.0,
    ) -> None:
        if not (isinstance(loader, Iterable) or hasattr(type(loader), "__getitem__")):
            raise TypeError(f"DevicePrefetcher: loader must be iterable, got {type(loader).__name__}")
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
            raise TypeError(f"DevicePrefetcher: depth must be an int, got {type(depth).__name__}")
        if depth < 1:
            raise ValueError(f"DevicePrefetcher: depth must be >= 1, got {depth}")
        for name, value in (("non_blocking", non_blocking), ("pin_memory", pin_memory)):
            if not isinstance(value, bool):
                raise TypeError(f"DevicePrefetcher: {name} must be a bool, got {type(value).__name__}")
        if join_timeout is not None:
            if isinstance(join_timeout, bool) or not isinstance(join_timeout, numbers.Real):
                raise TypeError(
                    f"DevicePrefetcher: join_timeout must be a number or None, got {type(join_timeout).__name__}"
                )
            if not join_timeout >= 0:
                raise ValueError(f"DevicePrefetcher: join_timeout must be >= 0, got {join_timeout}")
        if isinstance(device, bool):  # torch.device(True) would mean cuda:1
            raise TypeError("DevicePrefetcher: device must be a torch.device, str or int, got bool")
        device = torch.device(device)  # torch's own error for a malformed device string
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"DevicePrefetcher: device {device} requested, but torch.cuda.is_available() is False"
                )
            if device.index is None:  # the current device now, not whatever is current later
                device = torch.device("cuda", torch.cuda.current_device())
        self.loader = loader
        self.device = device
        self.depth = int(depth)
        self.non_blocking = non_blocking
        self.pin_memory = pin_memory
        self.join_timeout = None if join_timeout is None else float(join_timeout)
        self._stream: torch.cuda.Stream | None = None
        self._active: weakref.ref | None = None  # weak: a `break` must let the iterator die

    def _make_transfer(self) -> Callable[[Any], Any]:
        """The per-batch work of the loader thread."""
        device = self.device
        if device.type != "cuda":
            # Blocking copies: a non_blocking device-to-host copy would hand out a tensor before
            # its data arrived (there is no stream to wait on here).
            return lambda batch: apply_to_tensors(lambda t: t.to(device), batch)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        stream, pin, non_blocking = self._stream, self.pin_memory, self.non_blocking

        def transfer(batch: Any) -> _CudaBatch:
            host = apply_to_tensors(_pin, batch) if pin else batch
            # GPU work the loader itself launched (in this thread, on its current stream) must
            # be done before the copies, and before the consumer, which waits for `event` only.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                out = apply_to_tensors(lambda t: t.to(device, non_blocking=non_blocking), host)
                event = torch.cuda.Event()
                event.record(stream)
            return _CudaBatch(out, event)

        return transfer

    def __iter__(self) -> _PrefetchIterator:
        self.close()  # one pass at a time: the loader is not read by two threads at once
        it = _PrefetchIterator(self)
        self._active = weakref.ref(it)
        return it

    def __len__(self) -> int:
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"DevicePrefetcher: the loader ({type(self.loader).__name__}) has no len()") from None

    def close(self) -> None:
        """Stop the current pass, if any: its loader thread ends and its queued batches are freed."""
        it = self._active() if self._active is not None else None
        self._active = None
        if it is not None:
            it.close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DevicePrefetcher({type(self.loader).__name__}, device={str(self.device)!r}, depth={self.depth}, "
            f"non_blocking={self.non_blocking}, pin_memory={self.pin_memory})"
        )
