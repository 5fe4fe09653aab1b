"""SyncBatchNorm on two gloo CPU ranks: batchops.nn.SyncBatchNorm against a pure-torch version of
the same statistics (per-rank var_mean, one differentiable all_gather of [count, mean, m2], Chan's
merge, the normalisation + residual + relu in torch ops; torch.nn.SyncBatchNorm itself refuses CPU
input), with batchops.BatchNorm2d without any synchronisation as the floor.

Run it with `python -m batchops.bench.sync_batch_norm [--quick|--smoke] [--iters N]`: it prints a
markdown table. A step is one training forward + backward (relu(bn(x) + z), gradients w.r.t. x, z,
weight and bias) on each rank, timed on rank 0 between barriers; the collectives keep the two
ranks in step. Each rank runs with one thread (OMP_NUM_THREADS=1), so this measures the kernels
and the collectives' overhead, not the multi-core scaling. The batch is uneven (rank 1 gets one
sample more). Before timing, each rank checks that the two synchronised providers agree (the
table's last column, relative to max(1, max |value|), float32); the unsynchronised floor
normalises with local statistics and is not compared.

This does not fit the shared in-process timing (batchops.bench.timing times callables in one
process), so `cases()` returns no rows; the numbers come from `run()` / the command line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

__all__ = ["OP", "PROVIDERS", "shapes_for", "TorchAllGatherSyncBN", "run", "markdown", "cases", "NOTES", "main"]

OP = "sync_batch_norm"

PROVIDERS = ("torch_allgather", "batchops", "batchops_local")


def shapes_for(quick: bool = False, smoke: bool = False) -> list[tuple[int, int, int, int]]:
    """Per-rank shapes (rank 1 gets one sample more)."""
    if smoke:
        return [(2, 8, 6, 6)]
    if quick:
        return [(8, 64, 28, 28)]
    return [(8, 64, 28, 28), (16, 64, 56, 56), (64, 256, 7, 7)]


class TorchAllGatherSyncBN(torch.nn.Module):
    """The same statistics in plain torch ops: one all_gather forward (its backward is one more
    collective), everything else differentiated by autograd."""

    def __init__(self, C: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(C))
        self.bias = torch.nn.Parameter(torch.zeros(C))
        self.eps = eps

    def forward(self, x, z):
        import torch.distributed.nn.functional as dnn

        C = x.size(1)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // C
        local = torch.cat([x.new_full((1,), float(n)), mean, var * n])
        rows = torch.stack(dnn.all_gather(local))
        counts, means, m2s = rows[:, :1], rows[:, 1 : C + 1], rows[:, C + 1 :]
        total = counts.sum(0)
        gmean = (counts * means).sum(0) / total
        gvar = (m2s.sum(0) + (counts * (means - gmean) ** 2).sum(0)) / total
        shape = (1, C) + (1,) * (x.dim() - 2)
        scale = (self.weight * torch.rsqrt(gvar + self.eps)).view(shape)
        y = (x - gmean.view(shape)) * scale + self.bias.view(shape)
        return torch.relu(y + z)


def _rank_bench(rank, world_size, shape, iters, warmup):
    import torch.distributed as dist

    from batchops.nn.batch_norm import BatchNorm2d
    from batchops.nn.sync_batch_norm import SyncBatchNorm

    N, C, H, W = shape
    g = torch.Generator().manual_seed(rank)
    n = N + rank
    x = torch.randn((n, C, H, W), generator=g).requires_grad_()
    z = torch.randn((n, C, H, W), generator=g).requires_grad_()
    dy = torch.randn((n, C, H, W), generator=g)
    mods = {
        "torch_allgather": TorchAllGatherSyncBN(C),
        "batchops": SyncBatchNorm(C, activation="relu"),
        "batchops_local": BatchNorm2d(C, activation="relu"),
    }
    with torch.no_grad():
        w = torch.rand(C, generator=torch.Generator().manual_seed(9)) + 0.5
        for m in mods.values():
            m.weight.copy_(w)

    def step(name):
        m = mods[name]
        y = m(x, z)
        return torch.autograd.grad(y, [x, z, m.weight, m.bias], dy)

    # agreement of the synchronised providers (float32)
    ref, ours = step("torch_allgather"), step("batchops")
    err = max(float((a - b).abs().max() / max(1.0, float(a.abs().max()))) for a, b in zip(ref, ours))
    times = {p: [] for p in PROVIDERS}
    for i in range(warmup + iters):
        for p in PROVIDERS:
            dist.barrier()
            t0 = time.perf_counter()
            step(p)
            t1 = time.perf_counter()
            if i >= warmup:
                times[p].append(t1 - t0)
    dist.barrier()
    return {
        "err": err,
        "median_ms": {p: 1e3 * statistics.median(v) for p, v in times.items()},
        "min_ms": {p: 1e3 * min(v) for p, v in times.items()},
    }


def run(quick: bool = False, smoke: bool = False, iters: int | None = None) -> list[dict]:
    """One row per shape: {shape, dtype, err, median_ms: {provider: ms}, min_ms: {...}} (rank 0)."""
    from batchops.testing import run_ranks

    iters = iters or (3 if smoke else 20 if quick else 40)
    warmup = 1 if smoke else 3
    rows = []
    for shape in shapes_for(quick, smoke):
        results = run_ranks(
            f"{__name__ if __name__ != '__main__' else 'batchops.bench.sync_batch_norm'}:_rank_bench",
            2,
            args=(shape, iters, warmup),
            timeout=600,
            failure_grace=10,
        )
        rows.append({"shape": shape, "dtype": "float32", **results[0].value})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| per-rank shape (rank 1: N+1) | dtype | torch all_gather (ms) | batchops SyncBatchNorm (ms) "
        "| batchops BatchNorm2d, no sync (ms) | batchops / torch | max rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["median_ms"]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {t['torch_allgather']:.2f} | {t['batchops']:.2f} "
            f"| {t['batchops_local']:.2f} | {t['batchops'] / t['torch_allgather']:.2f} | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list:
    """No in-process cases: see the module docstring (`run()` / the command line)."""
    return []


NOTES = __doc__.split("\n\n", 1)[1].strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    print(
        "Step = forward + backward of relu(bn(x) + z) on each of 2 gloo CPU ranks, 1 thread each; "
        "median over iterations, rank 0.\n"
    )
    print(markdown(run(args.quick, args.smoke, args.iters)))


if __name__ == "__main__":
    main()
