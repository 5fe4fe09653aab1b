"""Linear cases: batchops.functional.linear / grouped_linear (fused bias + activation) against
torch's compositions (the linear-layers issue, "Numbers to beat").

Inputs: x = randn, weight = randn / sqrt(in_features), bias = 0.1 randn, seeded; the same
tensors for both providers. Before timing, each case runs every provider once and checks it
against the same computation in float64 (the table's note names a provider that is off).
"forward" is a training forward (inputs and parameters require grad, so torch records its
graph and batchops saves what its backward needs); "backward" replays a graph built once;
"full" = forward + backward, the gradients w.r.t. input, weight and bias.

  * Linear+act (dense): torch = act(F.linear(x, W, b)); batchops = linear(x, W, b,
    activation=act). "gelu" is the exact (erf) GELU in both.
  * grouped ragged vs loop: G groups of 1..max rows (sizes = randint(1, max + 1, (G,)),
    seeded), rows ordered by group. torch = the usual mixture-of-experts loop:
    cat([act(F.linear(x_g, W_g, b_g)) for x_g in x.split(sizes)]), each expert's W_g, b_g its
    own leaf (as in a ModuleList of nn.Linear); batchops = grouped_linear(x, W, b, sizes,
    activation=act), sizes an int64 tensor (on CUDA: on the device, batchops' sync-free form;
    the loop gets a host list, its .tolist() sync not counted). In "full" batchops' weight and
    bias gradients are returned split per group (unbind: views) to match the loop's outputs.
  * grouped ragged vs ONE dense GEMM: the practical floor (the issue measured one dense GEMM
    over the same rows at 0.54x the loop). torch = act(F.linear(x, W_0, b_0)) over all rows;
    batchops = the same grouped_linear call, its G weights being copies of one matrix (same
    values, separate memory: the same work as distinct experts) so the outputs can be checked.
    ratio = batchops time / dense GEMM time; the dense GEMM's FLOP/s over ours = 1 / ratio.
    In "full" only grad_input is returned (all three gradients are computed).
  * dense GEMM vs loop (reference row, no batchops kernel): torch = the loop, "batchops"
    column = the one dense GEMM + act (tied weights as above): its ratio is the floor for the
    "vs loop" rows.
  * grouped ragged vs torch._grouped_mm (CUDA only; a private torch API): _grouped_mm(x, W^T,
    offs=cumsum(sizes)) + bias gathered per row (repeat_interleave) + act.
  * grouped uniform vs baddbmm: x (G, B, K); torch = act(baddbmm(b[:, None], x, W^T)).

Targets (the issue): Linear+GELU full <= 0.95x torch; ragged forward <= 0.7x the loop on the
CPU; on CUDA (bfloat16) ragged >= 2x faster than the loop (ratio <= 0.5) and >= 60% of one
dense GEMM's FLOP/s over the same rows (ratio vs ONE dense GEMM <= 1.67).

Counting: these cases are compute-bound, so no byte counts; the layout column gives the FLOPs
of one call, 2*M*K*N per product (M = rows): forward 1 product, backward 2 (grad_input,
grad_weight), full 3. GFLOP/s = that / median time. Bias, activation and gathers not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from batchops.bench.case import REFERENCE, Case

__all__ = ["OP", "Shapes", "shape_sets", "ragged_sizes", "cases", "NOTES"]

OP = "linear"

_ACT = {"relu": F.relu, "gelu": F.gelu, None: lambda t: t}
_PRODUCTS = {"forward": 1, "backward": 2, "full": 3}

# ---------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    dense: Sequence[tuple[int, int, int]]  # (M, K, N)
    ragged: Sequence[tuple[int, int, int, int]]  # (G, max rows per group, K, N)
    uniform: Sequence[tuple[int, int, int, int]]  # (G, B, K, N)
    dtype: torch.dtype


def shape_sets(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Shapes]:
    f32, bf16 = torch.float32, torch.bfloat16
    if smoke:
        return [Shapes([(16, 8, 8)], [(4, 4, 8, 8)], [(2, 4, 8, 8)], f32)]
    # The CPU shapes.
    base = Shapes([(8192, 256, 256)], [(64, 64, 256, 256)], [(8, 512, 256, 256)], f32)
    if device.type == "cpu":
        if quick:
            return [Shapes([(2048, 256, 256)], [(64, 64, 256, 256)], [(8, 128, 256, 256)], f32)]
        return [base]
    # CUDA: bfloat16 at the sizes where a GPU is busy (64 experts of up to 512 rows, 1024 wide;
    # a 8192 x 4096 -> 4096 layer, the CUDA targets), plus the CPU shapes in float32
    # (the full run; there the loop and the launches dominate).
    big = Shapes([(8192, 4096, 4096)], [(64, 512, 1024, 1024)], [(8, 4096, 1024, 1024)], bf16)
    if quick:
        return [big]
    return [base, big]


# ---------------------------------------------------------------------------------------------
# Helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(shape, g: torch.Generator, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _params(G: int, K: int, N: int, device, dtype, seed: int, tied: bool = False):
    """(W (G, N, K), b (G, N)); tied: every group a copy of group 0 (separate memory)."""
    g = _gen(seed)
    W = torch.randn(G, N, K, generator=g) / math.sqrt(max(K, 1))
    b = torch.randn(G, N, generator=g) * 0.1
    if tied:
        W = W[:1].expand(G, N, K).contiguous()
        b = b[:1].expand(G, N).contiguous()
    return W.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def ragged_sizes(G: int, max_rows: int, seed: int = 0) -> list[int]:
    return torch.randint(1, max_rows + 1, (G,), generator=_gen(seed)).tolist()


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def _as_double(ts):
    return [t.detach().double() for t in ts]


def _timed(
    f: Callable[[], torch.Tensor], ins: Sequence[torch.Tensor], dy, mode: str, post: Callable = lambda gs: gs
) -> Callable[[], object]:
    """One provider's call for a mode: f() (forward), or post(gradients of f() w.r.t. ins) for
    backward (one graph, retained) and full (forward + backward)."""
    if mode == "forward":
        return f
    if mode == "backward":
        y = f()
        return lambda: post(torch.autograd.grad(y, ins, dy, retain_graph=True))
    return lambda: post(torch.autograd.grad(f(), ins, dy))


def _split_grads(G: int):
    """(gx, gW (G,N,K), gb (G,N)) -> (gx, gW_0 .. gW_{G-1}, gb_0 .. gb_{G-1}) as views."""
    return lambda gs: (gs[0], *gs[1].unbind(0), *gs[2].unbind(0))


def _first(gs):
    return gs[0]


def _loop(x, Ws, bs, sizes: list[int], act):
    """The mixture-of-experts loop: split the rows, one F.linear + activation per group, cat."""
    fn = _ACT[act]
    return torch.cat([fn(F.linear(xg, w, bb)) for xg, w, bb in zip(x.split(sizes), Ws, bs)])


# ---------------------------------------------------------------------------------------------
# Builders


def _build_dense(M: int, K: int, N: int, dtype, mode: str, act: str):
    def build(device: torch.device):
        from batchops import functional as bF

        grad = True
        g = _gen(M + 7 * K + 13 * N)
        x = _leaf(_randn((M, K), g, device, dtype), grad)
        W, b = _params(1, K, N, device, dtype, seed=1)
        W, b = _leaf(W[0], grad), _leaf(b[0], grad)
        dy = _randn((M, N), g, device, dtype)
        x64, W64, b64, dy64 = _as_double((x, W, b, dy))
        for t in (x64, W64, b64):
            t.requires_grad_(grad)
        fn = _ACT[act]
        return {
            "torch": _timed(lambda: fn(F.linear(x, W, b)), (x, W, b), dy, mode),
            "batchops": _timed(lambda: bF.linear(x, W, b, activation=act), (x, W, b), dy, mode),
            REFERENCE: _timed(lambda: fn(F.linear(x64, W64, b64)), (x64, W64, b64), dy64, mode),
        }

    return build


def _ragged_inputs(G, max_rows, K, N, device, dtype, tied: bool):
    sizes = ragged_sizes(G, max_rows)
    R = sum(sizes)
    g = _gen(R + 7 * K + 13 * N)
    x = _leaf(_randn((R, K), g, device, dtype), True)
    W, b = _params(G, K, N, device, dtype, seed=2, tied=tied)
    dy = _randn((R, N), g, device, dtype)
    return sizes, x, _leaf(W, True), _leaf(b, True), dy


def _sizes_arg(sizes: list[int], device: torch.device) -> torch.Tensor:
    # On CUDA the sizes live on the device (as routing produces them): no host sync.
    return torch.tensor(sizes, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")


def _build_ragged(G, max_rows, K, N, dtype, mode: str, act: str, against: str):
    """against: "loop" (torch = the loop), "dense" (torch = one dense GEMM over all rows),
    "dense_vs_loop" (torch = the loop, "batchops" = one dense GEMM; no batchops kernel) or
    "grouped_mm" (torch = torch._grouped_mm + bias + act)."""

    def build(device: torch.device):
        from batchops import functional as bF

        tied = against in ("dense", "dense_vs_loop")
        sizes, x, W, b, dy = _ragged_inputs(G, max_rows, K, N, device, dtype, tied)
        sizes_t = _sizes_arg(sizes, device)
        fn = _ACT[act]
        x64, W64, b64, dy64 = _as_double((x, W, b, dy))
        for t in (x64, W64, b64):
            t.requires_grad_(True)

        def ours():
            return bF.grouped_linear(x, W, b, sizes_t, activation=act)

        def per_group_leaves(W, b):
            return (
                [w.detach().requires_grad_(True) for w in W.unbind(0)],
                [v.detach().requires_grad_(True) for v in b.unbind(0)],
            )

        if against in ("loop", "dense_vs_loop"):
            Ws, bs = per_group_leaves(W, b)
            Ws64, bs64 = per_group_leaves(W64, b64)
            loop_ins, loop_ins64 = (x, *Ws, *bs), (x64, *Ws64, *bs64)

            def loop():
                return _loop(x, Ws, bs, sizes, act)

            def loop64():
                return _loop(x64, Ws64, bs64, sizes, act)

        if against == "loop":
            return {
                "torch": _timed(loop, loop_ins, dy, mode),
                "batchops": _timed(ours, (x, W, b), dy, mode, post=_split_grads(G)),
                REFERENCE: _timed(loop64, loop_ins64, dy64, mode),
            }

        # One dense GEMM over all rows with group 0's weights (every group holds a copy).
        W0, b0 = _leaf(W[0], True), _leaf(b[0], True)
        W064, b064 = _leaf(W64[0], True), _leaf(b64[0], True)

        def dense():
            return fn(F.linear(x, W0, b0))

        def dense64():
            return fn(F.linear(x64, W064, b064))

        if against == "dense":
            return {
                "torch": _timed(dense, (x, W0, b0), dy, mode, post=_first),
                "batchops": _timed(ours, (x, W, b), dy, mode, post=_first),
                REFERENCE: _timed(dense64, (x64, W064, b064), dy64, mode, post=_first),
            }
        if against == "dense_vs_loop":
            return {
                "torch": _timed(loop, loop_ins, dy, mode, post=_first),
                "batchops": _timed(dense, (x, W0, b0), dy, mode, post=_first),
                REFERENCE: _timed(dense64, (x64, W064, b064), dy64, mode, post=_first),
            }

        # against == "grouped_mm": torch's private grouped GEMM (CUDA).
        R = x.shape[0]

        def grouped_mm():
            offs = sizes_t.cumsum(0, dtype=torch.int32)
            y = torch._grouped_mm(x, W.transpose(1, 2), offs=offs)
            return fn(y + b.repeat_interleave(sizes_t, dim=0, output_size=R))

        def ref64():
            # float64: the loop over W64[g] (views of one leaf), so the gradients come back as
            # (gx, gW (G,N,K), gb (G,N)) like the two providers'.
            return _loop(x64, W64.unbind(0), b64.unbind(0), sizes, act)

        return {
            "torch": _timed(grouped_mm, (x, W, b), dy, mode),
            "batchops": _timed(ours, (x, W, b), dy, mode),
            REFERENCE: _timed(ref64, (x64, W64, b64), dy64, mode),
        }

    return build


def _build_uniform(G, B, K, N, dtype, mode: str, act: str):
    def build(device: torch.device):
        from batchops import functional as bF

        g = _gen(G * B + 7 * K + 13 * N)
        x = _leaf(_randn((G, B, K), g, device, dtype), True)
        W, b = _params(G, K, N, device, dtype, seed=3)
        W, b = _leaf(W, True), _leaf(b, True)
        dy = _randn((G, B, N), g, device, dtype)
        x64, W64, b64, dy64 = _as_double((x, W, b, dy))
        for t in (x64, W64, b64):
            t.requires_grad_(True)
        fn = _ACT[act]

        def composed(x, W, b):
            return lambda: fn(torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2)))

        return {
            "torch": _timed(composed(x, W, b), (x, W, b), dy, mode),
            "batchops": _timed(lambda: bF.grouped_linear(x, W, b, activation=act), (x, W, b), dy, mode),
            REFERENCE: _timed(composed(x64, W64, b64), (x64, W64, b64), dy64, mode),
        }

    return build


# ---------------------------------------------------------------------------------------------
# Cases


def _fmt_flops(flops: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.0f} FLOP"


def _case(op: str, shape, layout: str, dtype, mode: str, build, rows: int, K: int, N: int) -> Case:
    flops = 2 * rows * K * N * _PRODUCTS[mode]
    return Case(
        op=op,
        shape=tuple(shape),
        layout=f"{layout}; {_fmt_flops(flops)}/call",
        dtype=dtype,
        mode=mode,
        build=build,
        flops=flops,
    )


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    out: list[Case] = []
    cuda = device.type == "cuda"
    has_grouped_mm = cuda and hasattr(torch, "_grouped_mm")
    for s in shape_sets(device, quick, smoke):
        dt = s.dtype
        for M, K, N in s.dense:
            layout = f"dense, {K}->{N}"
            for mode in ("forward", "backward", "full"):
                if smoke and mode == "backward":
                    continue
                out.append(
                    _case("Linear+GELU", (M, K, N), layout, dt, mode, _build_dense(M, K, N, dt, mode, "gelu"), M, K, N)
                )
            for mode in ("forward", "full"):
                if smoke and mode == "forward":
                    continue
                out.append(
                    _case("Linear+ReLU", (M, K, N), layout, dt, mode, _build_dense(M, K, N, dt, mode, "relu"), M, K, N)
                )
        for G, max_rows, K, N in s.ragged:
            R = sum(ragged_sizes(G, max_rows))
            layout = f"ragged: {G} groups of 1-{max_rows} rows ({R} rows), {K}->{N}"
            shape = (R, K, N)
            modes = ("forward", "full") if smoke else ("forward", "backward", "full")
            for mode in modes:
                out.append(
                    _case(
                        "grouped_linear+ReLU vs loop",
                        shape,
                        layout,
                        dt,
                        mode,
                        _build_ragged(G, max_rows, K, N, dt, mode, "relu", "loop"),
                        R,
                        K,
                        N,
                    )
                )
                if mode == "backward":
                    continue
                out.append(
                    _case(
                        "grouped_linear+ReLU vs ONE dense GEMM (floor)",
                        shape,
                        layout,
                        dt,
                        mode,
                        _build_ragged(G, max_rows, K, N, dt, mode, "relu", "dense"),
                        R,
                        K,
                        N,
                    )
                )
                out.append(
                    _case(
                        "(reference: loop vs ONE dense GEMM+ReLU, no batchops kernel)",
                        shape,
                        layout,
                        dt,
                        mode,
                        _build_ragged(G, max_rows, K, N, dt, mode, "relu", "dense_vs_loop"),
                        R,
                        K,
                        N,
                    )
                )
                if has_grouped_mm and dt == torch.bfloat16:
                    out.append(
                        _case(
                            "grouped_linear+ReLU vs torch._grouped_mm",
                            shape,
                            layout,
                            dt,
                            mode,
                            _build_ragged(G, max_rows, K, N, dt, mode, "relu", "grouped_mm"),
                            R,
                            K,
                            N,
                        )
                    )
        for G, B, K, N in s.uniform:
            layout = f"uniform: {G} groups x {B} rows, {K}->{N}"
            for mode in ("forward",) if smoke else ("forward", "full"):
                out.append(
                    _case(
                        "grouped_linear+GELU vs baddbmm",
                        (G, B, K, N),
                        layout,
                        dt,
                        mode,
                        _build_uniform(G, B, K, N, dt, mode, "gelu"),
                        G * B,
                        K,
                        N,
                    )
                )
    return out


NOTES = __doc__.split("\n\n", 1)[1].strip()
