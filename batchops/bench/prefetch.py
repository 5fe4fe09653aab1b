"""Prefetch cases: one epoch of a training-style loop, plain against batchops.data.DevicePrefetcher.

One timed call = one epoch of N batches (a new pass over the loader each call, so the thread
start-up and the pipeline filling up are included). The output of a call is the stacked
per-batch results, checked equal between the providers before timing (same batches, same order).

CPU (loading is the bottleneck the prefetcher hides): the loader is a torch DataLoader
(num_workers=0, batch_size=None) over a dataset whose __getitem__ sleeps P ms (standing in for
I/O, decoding in another process or a remote store: anything that leaves the GIL free) and
returns a ready (x, y) batch; the compute step is C ms of real work, chained tanh(1.5 h + 0.1)
over the (B, H) float32 batch in numpy (one thread, GIL released; see _cpu_step for why not a
multi-threaded torch op), repeated a number of times calibrated on this machine before the cases
are built (the layout column gives the calibrated C).
  * torch: `for x, y in loader: step(x, y)`, load and compute in turn: N x (P + C).
  * batchops: the same loop over `DevicePrefetcher(loader, "cpu", depth=2)`: the thread loads
    batch k+1 while batch k is computed. Ideal: P + (N - 1) x max(P, C) + C (the first load and
    the last compute cannot overlap anything), i.e. about N x max(P, C) rather than N x (P + C).
    The layout column gives both; ratio = batchops / torch, so the ideal ratio is
    ideal / serial (0.56 for P = C = 20 ms, N = 8).

CUDA (the host-to-device copies are the bottleneck): N batches of x (B, 4096) float32 and
y (B,) int64 in pageable host memory (a DataLoader without pin_memory); the step is a training
step of a 4-layer MLP (3 x Linear(4096, 4096) + ReLU, Linear(4096, 16), cross-entropy, SGD
update), weights restored from a snapshot at the start of each epoch so that every call computes
the same losses.
  * "H2D loop": torch = the usual `x.to(device)` per batch (a synchronous copy from pageable
    memory: the GPU idles during the copy, the host during the step); batchops = the loop over
    DevicePrefetcher (pinned in its thread, copied on a side stream while the previous step
    runs).
  * "vs compute only": torch = the same steps on batches already resident on the GPU (no copy
    at all: the floor); batchops = the prefetched loop from host memory. Target: ratio <= 1.05
    (the copies hidden behind compute).

No byte counts: the figure of merit is wall time per epoch against max(load, compute).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from batchops.bench.case import Case

__all__ = ["OP", "calibrate_reps", "cases", "NOTES"]

OP = "prefetch"


# ---------------------------------------------------------------------------------------------
# CPU: slow loader + compute


class _SleepyBatches(torch.utils.data.Dataset):
    """Pre-built batches; fetching one takes `delay_s` of sleep (GIL released)."""

    def __init__(self, batches, delay_s: float) -> None:
        self.batches = batches
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return self.batches[i]


def _cpu_step(reps: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The compute step: `reps` x tanh(1.5 h + 0.1) over the batch, in numpy.

    numpy's elementwise loops run on one thread and release the GIL. A multi-threaded torch op
    would do too, but on a shared machine an OpenMP region stalls whenever one of its threads
    loses its core (a 256 x 256 matmul measured 0.2 ms on one thread, 13-24 ms on two), which
    would drown the overlap this benchmark measures."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        h = x.numpy()
        for _ in range(reps):
            h = np.tanh(h * 1.5 + 0.1)
        return float(h.sum(dtype=np.float64)) + float(y.numpy().sum())

    return step


def calibrate_reps(B: int, H: int, target_ms: float, samples: int = 7) -> tuple[int, float]:
    """How many repetitions of the step's body on a (B, H) batch take about `target_ms` on this
    machine now: (reps, their estimated ms)."""
    x = torch.randn(B, H, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(B, dtype=torch.int64)
    probe_reps = 10
    probe = _cpu_step(probe_reps)
    probe(x, y)  # first-call overheads out of the way
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        probe(x, y)
        times.append((time.perf_counter() - start) * 1e3 / probe_reps)
    per = sorted(times)[len(times) // 2]
    reps = max(1, round(target_ms / per))
    return reps, reps * per


def _build_cpu(n: int, B: int, H: int, load_ms: float, reps: int):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        from batchops.data.prefetch import DevicePrefetcher

        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(B, H, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]
        loader = torch.utils.data.DataLoader(_SleepyBatches(batches, load_ms / 1e3), batch_size=None, num_workers=0)
        step = _cpu_step(reps)
        prefetcher = DevicePrefetcher(loader, device, depth=2)

        def epoch(it) -> torch.Tensor:
            return torch.tensor([step(x, y) for x, y in it], dtype=torch.float64)

        return {"torch": lambda: epoch(loader), "batchops": lambda: epoch(prefetcher)}

    return build


# ---------------------------------------------------------------------------------------------
# CUDA: host-to-device copies + a training step


def _build_cuda(n: int, B: int, H: int, variant: str):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        from batchops.data.prefetch import DevicePrefetcher

        g = torch.Generator().manual_seed(2)
        host = [(torch.randn(B, H, generator=g), torch.randint(0, 16, (B,), generator=g)) for _ in range(n)]
        torch.manual_seed(3)
        model = torch.nn.Sequential(
            torch.nn.Linear(H, H),
            torch.nn.ReLU(),
            torch.nn.Linear(H, H),
            torch.nn.ReLU(),
            torch.nn.Linear(H, H),
            torch.nn.ReLU(),
            torch.nn.Linear(H, 16),
        ).to(device)
        snapshot = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        def epoch(batches) -> torch.Tensor:
            with torch.no_grad():  # every epoch starts from the same weights
                for p, s in zip(model.parameters(), snapshot):
                    p.copy_(s)
            return torch.stack([step(x, y) for x, y in batches])

        prefetcher = DevicePrefetcher(host, device, depth=2)
        prefetched = lambda: epoch(prefetcher)  # noqa: E731
        if variant == "h2d":
            plain = lambda: epoch((x.to(device), y.to(device)) for x, y in host)  # noqa: E731
            return {"torch": plain, "batchops": prefetched}
        resident = [(x.to(device), y.to(device)) for x, y in host]
        return {"torch": lambda: epoch(resident), "batchops": prefetched}

    return build


# ---------------------------------------------------------------------------------------------


def _cpu_plan(quick: bool, smoke: bool):
    """(batches per epoch, B, H, [(load ms, compute ms), ...])."""
    if smoke:
        return 3, 64, 1024, [(2.0, 2.0)]
    if quick:
        return 6, 256, 1024, [(20.0, 20.0)]
    return 8, 256, 1024, [(20.0, 20.0), (10.0, 30.0), (30.0, 10.0)]


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    out = []
    if device.type == "cuda":
        n, B, H = (2, 64, 256) if smoke else (10, 1024, 4096) if quick else (20, 1024, 4096)
        mib = B * H * 4 / 2**20
        for variant, op, torch_side in (
            ("h2d", "prefetch: H2D loop", "x.to(device) per batch"),
            ("resident", "prefetch: vs compute only", "batches already on the GPU"),
        ):
            layout = (
                f"{n} batches of {mib:.0f} MiB pageable host memory; torch: {torch_side}; "
                "batchops: DevicePrefetcher(depth=2)"
            )
            out.append(
                Case(
                    op=op,
                    shape=(n, B, H),
                    layout=layout,
                    dtype=torch.float32,
                    mode="full",
                    build=_build_cuda(n, B, H, variant),
                )
            )
        return out

    n, B, H, plan = _cpu_plan(quick, smoke)
    for load_ms, compute_ms in plan:
        reps, measured = calibrate_reps(B, H, compute_ms)
        serial = n * (load_ms + measured)
        ideal = load_ms + (n - 1) * max(load_ms, measured) + measured
        layout = (
            f"load {load_ms:g} ms (sleep) + compute {measured:.1f} ms (calibrated) per batch: "
            f"serial {serial:.0f} ms, ideal {ideal:.0f} ms (ratio {ideal / serial:.2f})"
        )
        out.append(
            Case(
                op="prefetch: epoch",
                shape=(n, B, H),
                layout=layout,
                dtype=torch.float32,
                mode="forward",
                build=_build_cpu(n, B, H, load_ms, reps),
            )
        )
    return out


NOTES = __doc__.split("\n\n", 1)[1].strip()
