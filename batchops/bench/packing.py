"""Packing cases: batchops' padded <-> packed conversions against torch.nn.utils.rnn and against
boolean-mask (un)padding (issue 3, "Tests and benchmarks").

Setup (the targets' shape on the CPU machine): x = randn(B, T, H) float32, batch_first=True,
lengths drawn uniformly from [1, T] (seeded), the same inputs for both providers.

  * pack_padded_sequence, enforce_sorted=False (random order) and with the lengths sorted in
    decreasing order (enforce_sorted=True): forward, and "full" = forward + backward (the
    gradient of the packed data w.r.t. x).
  * pad_packed_sequence of torch's PackedSequence of the same x (unsorted: it carries
    sorted/unsorted indices; sorted: it does not), forward.
  * unpad(x, mask=mask) against `x[mask]`; pad(tokens, indices, B, T) against the flash-attn
    idiom `out = zeros(B, T, H); out[mask] = tokens` (mask = steps < lengths). batchops.unpad
    also returns indices, cu_seqlens and max_seqlen; only the tokens are compared.
  * CUDA only: the same pack cases with the lengths on the device. torch needs them on the
    host, so its timed call includes `lengths.cpu()` (its device-to-host transfer and the
    synchronisation it implies); batchops receives the device tensor (one transfer inside).
    Also unpad with `max_seqlen` and `total` given, batchops' synchronisation-free form.
Before timing, each case runs both providers once and checks that their outputs agree (packing
is exact: data, batch_sizes, indices and lengths; gradients).

Counting rule for "batchops bytes". P = total tokens x H x 4 bytes (the packed size), S = B x T x
H x 4 (the padded size), N = total tokens, R = B x T padded rows. It counts the one row gather
that every conversion is (torch.ops.batchops.gather_rows): the rows it reads and writes plus the
int64 index map it reads (8 bytes a row of its output); building the index maps (prefix sums,
searchsorted over N or R int64 entries) is not counted, so it shows up as lost bandwidth.
  * pack and unpad: P read + P written + 8N of index: 2P+8N.
  * pad_packed_sequence and pad: P read + S written (padding rows are written too) + 8R: P+S+8R.
  * pack full = forward + backward (a pad of the gradient): 3P+S+8N+8R.
The minimum for any implementation is 2P (pack) and P+S (pad): the index bytes are small next
to them for H = 128 (8 bytes against 512 a row).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import rnn

from batchops.bench.case import Case

__all__ = ["OP", "shapes_for", "cases", "NOTES"]

OP = "packing"


def shapes_for(device: torch.device, quick: bool = False, smoke: bool = False) -> list[tuple[int, int, int]]:
    """(B, T, H) shapes."""
    if smoke:
        return [(4, 8, 4)]
    if quick:
        return [(64, 128, 64)] if device.type == "cpu" else [(256, 512, 128)]
    if device.type == "cpu":
        return [(256, 512, 128)]
    # 1024 x 1024 x 128 float32 is 512 MiB padded, far above the L2 of current GPUs (50 MB on H100).
    return [(256, 512, 128), (1024, 1024, 128)]


def _inputs(shape, device: torch.device, dtype: torch.dtype, sorted_lengths: bool):
    B, T, H = shape
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if sorted_lengths:
        lengths = lengths.sort(descending=True).values
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, lengths


def _lengths_arg(lengths: torch.Tensor, device: torch.device, device_lengths: bool):
    """(lengths for torch's call, lengths for batchops' call): host lengths for both, or the
    device tensor, which torch must copy to the host inside its timed call."""
    if not device_lengths:
        return (lambda: lengths), lengths
    dev = lengths.to(device)
    return (lambda: dev.cpu()), dev


def _build_pack(shape, dtype, mode: str, sorted_lengths: bool, device_lengths: bool):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        x, lengths = _inputs(shape, device, dtype, sorted_lengths)
        torch_lengths, ours_lengths = _lengths_arg(lengths, device, device_lengths)
        enforce = sorted_lengths

        def f_torch():
            return rnn.pack_padded_sequence(x, torch_lengths(), batch_first=True, enforce_sorted=enforce)

        def f_ours():
            return batchops.pack_padded_sequence(x, ours_lengths, batch_first=True, enforce_sorted=enforce)

        if mode == "forward":
            return {"torch": f_torch, "batchops": f_ours}
        x.requires_grad_(True)
        total = int(lengths.sum())
        g = torch.Generator(device="cpu").manual_seed(1)
        dy = torch.randn((total, *shape[2:]), generator=g).to(device=device, dtype=dtype)

        def full(f):
            return lambda: torch.autograd.grad(f().data, x, dy)

        return {"torch": full(f_torch), "batchops": full(f_ours)}

    return build


def _build_pad_packed(shape, dtype, sorted_lengths: bool):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        x, lengths = _inputs(shape, device, dtype, sorted_lengths)
        packed = rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=sorted_lengths)
        return {
            "torch": lambda: rnn.pad_packed_sequence(packed, batch_first=True),
            "batchops": lambda: batchops.pad_packed_sequence(packed, batch_first=True),
        }

    return build


def _mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    T = x.shape[1]
    return torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]


def _build_unpad(shape, dtype, bounds: bool):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        x, lengths = _inputs(shape, device, dtype, False)
        mask = _mask(x, lengths)
        kw = {"max_seqlen": shape[1], "total": int(lengths.sum())} if bounds else {}
        return {
            "torch": lambda: x[mask],
            "batchops": lambda: batchops.unpad(x, mask=mask, **kw)[0],
        }

    return build


def _build_pad(shape, dtype):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        import batchops

        B, T = shape[0], shape[1]
        x, lengths = _inputs(shape, device, dtype, False)
        mask = _mask(x, lengths)
        tokens, indices, _cu, _max = batchops.unpad(x, mask=mask)

        def f_torch():
            out = torch.zeros((B, T, *tokens.shape[1:]), dtype=tokens.dtype, device=tokens.device)
            out[mask] = tokens
            return out

        return {"torch": f_torch, "batchops": lambda: batchops.pad(tokens, indices, B, T)}

    return build


def _sizes(shape, dtype, sorted_lengths: bool) -> tuple[int, int, int, int]:
    """(P, S, N, R) of the counting rule, from the same seeded lengths the case uses."""
    B, T, H = shape
    _, lengths = _inputs((B, T, 1), torch.device("cpu"), torch.float32, sorted_lengths)
    itemsize = torch.empty((), dtype=dtype).element_size()
    N = int(lengths.sum())
    return N * H * itemsize, B * T * H * itemsize, N, B * T


def _bytes(kind: str, shape, dtype, sorted_lengths: bool) -> tuple[int, str]:
    P, S, N, R = _sizes(shape, dtype, sorted_lengths)
    if kind == "pack":
        return 2 * P + 8 * N, "2P+8N"
    if kind == "pad":
        return P + S + 8 * R, "P+S+8R"
    return 3 * P + S + 8 * N + 8 * R, "3P+S+8N+8R"  # pack full


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    dtype = torch.float32
    out = []
    for shape in shapes_for(device, quick, smoke):

        def case(op, layout, mode, build, kind, sorted_lengths=False):
            nbytes, rule = _bytes(kind, shape, dtype, sorted_lengths)
            # Case's fields by name, as every benchmark module fills them; only the values are this op's.
            return Case(
                op=op,
                shape=tuple(shape),
                layout=layout,
                dtype=dtype,
                mode=mode,
                build=build,
                bytes_moved=nbytes,
                bytes_rule=rule,
            )

        lengths_modes = [False, True] if device.type == "cuda" else [False]
        for sorted_lengths in (False, True):
            order = "sorted lengths" if sorted_lengths else "enforce_sorted=False"
            for device_lengths in lengths_modes:
                where = "device lengths (torch: .cpu() in the call)" if device_lengths else "host lengths"
                layout = f"batch_first, {where}"
                for mode in ("forward", "full"):
                    out.append(
                        case(
                            f"pack_padded_sequence ({order})",
                            layout,
                            mode,
                            _build_pack(shape, dtype, mode, sorted_lengths, device_lengths),
                            "pack" if mode == "forward" else "pack_full",
                            sorted_lengths,
                        )
                    )
            out.append(
                case(
                    f"pad_packed_sequence ({'sorted' if sorted_lengths else 'unsorted'})",
                    "batch_first",
                    "forward",
                    _build_pad_packed(shape, dtype, sorted_lengths),
                    "pad",
                    sorted_lengths,
                )
            )
        out.append(
            case(
                "unpad(mask) vs x[mask]",
                "batch_first, random lengths",
                "forward",
                _build_unpad(shape, dtype, False),
                "pack",
            )
        )
        if device.type == "cuda":
            out.append(
                case(
                    "unpad(mask, max_seqlen, total) vs x[mask]",
                    "batch_first, random lengths",
                    "forward",
                    _build_unpad(shape, dtype, True),
                    "pack",
                )
            )
        out.append(
            case("pad vs out[mask] = tokens", "batch_first, random lengths", "forward", _build_pad(shape, dtype), "pad")
        )
    return out


NOTES = __doc__.split("\n\n", 1)[1].strip()
