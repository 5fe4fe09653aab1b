"""The headline benchmarks in a minute or two, for `make gpu-check`: batch norm, linear,
packing and max pool at their headline shapes, batchops against torch, interleaved in one process, medians
of CUDA-event timings. Each row is appended to the results file as soon as it is measured
(flushed), so a time-out loses nothing already measured. The full table is `batchops bench`.

usage: python scripts/gpu_quick_bench.py OUT.md [--device cuda|cpu] [--tiny] [--reps N]
       (--device cpu --tiny: a dry run of the same code with small shapes)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as TF
from gpu_results import open_results, parse_args, write_row

import batchops
from batchops import functional as F
from batchops.bench.timing import TimingSettings, time_interleaved


def compare(device: torch.device, ours, theirs, reps: int) -> tuple[float, float]:
    """Median ms of each: the benchmarks' interleaved timing (CUDA events, L2 flushed
    before each sample), a fixed number of samples."""
    settings = TimingSettings(warmup_s=0.0, min_warmup=3, budget_s=0.0, min_reps=reps, max_reps=reps)
    stats = time_interleaved({"batchops": ours, "torch": theirs}, device, settings)
    return stats["batchops"].median, stats["torch"].median


def fwd_bwd(module_or_fn, x, gy, *extra):
    def step():
        xi = x.detach().requires_grad_()
        y = module_or_fn(xi, *extra)
        y.backward(gy)

    return step


def cases(device: str, tiny: bool):
    """(name, shape text, batchops callable, torch callable)."""
    bn_shape = (2, 8, 6, 6) if tiny else (32, 64, 56, 56)
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("NCHW", "channels_last"):
            x = torch.randn(bn_shape, device=device, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            gy = torch.randn_like(x)
            C = bn_shape[1]
            ours = batchops.BatchNorm2d(C, device=device, dtype=dtype)
            ref = torch.nn.BatchNorm2d(C, device=device, dtype=dtype)
            yield (
                f"BatchNorm2d train fwd+bwd {str(dtype)[6:]} {layout}",
                "x".join(map(str, bn_shape)),
                fwd_bwd(ours, x, gy),
                fwd_bwd(ref, x, gy),
            )
            if dtype == torch.float32 and layout == "NCHW":
                ours_relu = batchops.BatchNorm2d(C, device=device, activation="relu")
                yield (
                    "BatchNorm2d+ReLU train fwd+bwd float32 NCHW",
                    "x".join(map(str, bn_shape)),
                    fwd_bwd(ours_relu, x, gy),
                    fwd_bwd(lambda t: TF.relu(ref(t)), x, gy),
                )
                ours_eval, ref_eval = (
                    batchops.BatchNorm2d(C, device=device).eval(),
                    torch.nn.BatchNorm2d(C, device=device).eval(),
                )

                def eval_ours(m=ours_eval, t=x):
                    with torch.no_grad():
                        m(t)

                def eval_ref(m=ref_eval, t=x):
                    with torch.no_grad():
                        m(t)

                yield ("BatchNorm2d eval forward float32 NCHW", "x".join(map(str, bn_shape)), eval_ours, eval_ref)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    M, K, N = (64, 32, 48) if tiny else (8192, 4096, 4096)
    x = torch.randn(M, K, device=device, dtype=dt)
    w = (torch.randn(N, K, device=device, dtype=dt) / K**0.5).requires_grad_()
    b = torch.randn(N, device=device, dtype=dt).requires_grad_()
    gy = torch.randn(M, N, device=device, dtype=dt)
    yield (
        f"Linear+GELU fwd+bwd {str(dt)[6:]}",
        f"{M}x{K}->{N}",
        fwd_bwd(lambda t: F.linear(t, w, b, activation="gelu"), x, gy),
        fwd_bwd(lambda t: TF.gelu(TF.linear(t, w, b)), x, gy),
    )
    G, max_rows, K, N = (4, 16, 32, 24) if tiny else (64, 512, 1024, 1024)
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, max_rows + 1, (G,), generator=gen)
    xg = torch.randn(int(sizes.sum()), K, device=device, dtype=dt)
    wg = (torch.randn(G, N, K, device=device, dtype=dt) / K**0.5).requires_grad_()
    bg = torch.randn(G, N, device=device, dtype=dt).requires_grad_()
    gyg = torch.randn(xg.shape[0], N, device=device, dtype=dt)
    size_list = sizes.tolist()

    def loop(t):
        parts = torch.split(t, size_list)
        return torch.cat([TF.gelu(TF.linear(p, wg[g], bg[g])) for g, p in enumerate(parts)])

    yield (
        f"grouped ragged fwd+bwd {str(dt)[6:]} vs per-group loop",
        f"G={G} rows<={max_rows} {K}->{N}",
        fwd_bwd(lambda t: F.grouped_linear(t, wg, bg, size_list, activation="gelu"), xg, gyg),
        fwd_bwd(loop, xg, gyg),
    )
    B, T, H = (4, 16, 8) if tiny else (256, 512, 128)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    padded = torch.randn(B, T, H, device=device)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    tokens, indices, _, _ = batchops.packing.unpad(padded, lengths.tolist())

    def torch_unpad():
        padded.reshape(B * T, H)[mask.reshape(-1)]

    def torch_pad():
        out = torch.zeros(B * T, H, device=device)
        out[indices] = tokens

    yield ("unpad(lengths)", f"{B}x{T}x{H}", lambda: batchops.packing.unpad(padded, lengths.tolist()), torch_unpad)
    yield ("pad", f"{B}x{T}x{H}", lambda: batchops.packing.pad(tokens, indices, B, T), torch_pad)
    # resnet's stem pool; the op itself (batchops.MaxPool2d runs torch's on CUDA until this says
    # ours is as fast).
    shape = (2, 4, 10, 10) if tiny else (64, 64, 112, 112)
    for layout in (torch.contiguous_format, torch.channels_last):
        xp = torch.randn(shape, device=device).contiguous(memory_format=layout)
        gyp = torch.randn_like(TF.max_pool2d(xp, 3, 2, 1))
        yield (
            f"max_pool2d 3x3 s2 fwd+bwd, {'NCHW' if layout == torch.contiguous_format else 'channels_last'}",
            "x".join(map(str, shape)),
            fwd_bwd(lambda t: torch.ops.batchops.max_pool2d(t, [3], [2], [1], [1], False)[0], xp, gyp),
            fwd_bwd(lambda t: TF.max_pool2d(t, 3, 2, 1), xp, gyp),
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], default_reps=20, argv=argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_quick_bench: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    preamble = (
        "Medians of interleaved timings (batchops.bench.timing.time_interleaved); "
        "ratio = batchops / torch (lower is better)."
    )
    with open_results(
        args.out, "Quick benchmark", device, preamble, ["case", "shape", "batchops ms", "torch ms", "ratio"]
    ) as f:
        for case, shape, ours, theirs in cases(args.device, args.tiny):
            try:
                a, b = compare(device, ours, theirs, args.reps)
                cells = [case, shape, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}"]
            except Exception as exc:  # one failing case must not hide the others
                cells = [case, shape, f"error: {type(exc).__name__}: {str(exc)[:120]}", "", ""]
            write_row(f, cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
