"""Padded <-> packed sequences (batchops.packing) and the op behind them, gather_rows.

References:
- torch.nn.utils.rnn.pack_padded_sequence / pad_packed_sequence: batchops must match them bit
  for bit (data, batch_sizes, sorted/unsorted indices, padded output, returned lengths) and
  raise torch's exception types for bad lengths.
- The flash-attn varlen layout (unpad / pad): references are built here from boolean-mask
  indexing, x[mask] and torch.nonzero (the library itself must not use nonzero).
Every conversion is a copy, so outputs and gradients are compared exactly, not with tolerances.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import rnn
from torch.nn.utils.rnn import PackedSequence

import batchops

from tests.helpers import DEVICES, RecordOps
from tests.helpers import dtype_id as _dtype_id

pytestmark = pytest.mark.usefixtures("kernels")

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [f32, f64, f16, bf16, torch.int64, torch.bool]
TRAILING = [pytest.param((), id="feat()"), pytest.param((5,), id="feat(5)"), pytest.param((3, 2), id="feat(3,2)")]
CUDA_ONLY = [p for p in DEVICES if p.id == "cuda"]
CPU_ONLY = [p for p in DEVICES if p.id == "cpu"]


# ---------------------------------------------------------------------------------------
# Helpers


def make_data(shape, dtype, device) -> torch.Tensor:
    """Random data of any dtype: normal floats, token ids, or a random boolean mask."""
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 30000, shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=f64).to(dtype)


def make_lengths(kind: str, B: int, T: int) -> list[int]:
    """Lengths in [1, T] of a given pattern (B and T are adjusted by the caller for 'b1')."""
    if kind == "sorted":  # decreasing, with ties, the longest not necessarily T
        lengths = torch.randint(1, T + 1, (B,)).sort(descending=True).values.tolist()
        if B >= 2:
            lengths[1] = lengths[0]
        return lengths
    if kind == "unsorted":  # random order, with ties, guaranteed not sorted
        lengths = torch.randint(1, T + 1, (B,)).tolist()
        lengths[-1] = lengths[0]
        if all(a >= b for a, b in zip(lengths, lengths[1:])):
            lengths[0], lengths[-1] = 1, T
        return lengths
    if kind == "ones":
        return [1] * B
    if kind == "all_T":
        return [T] * B
    if kind == "b1":
        return [int(torch.randint(1, T + 1, ()))]
    if kind == "with_ones":  # long and length-1 sequences mixed, unsorted
        lengths = torch.randint(1, T + 1, (B,)).tolist()
        lengths[0], lengths[-1] = 1, T
        return lengths
    raise AssertionError(kind)


def is_sorted_desc(lengths) -> bool:
    return all(a >= b for a, b in zip(lengths, lengths[1:]))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, device and bits (NaN padding compares equal to itself)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.dtype.is_floating_point:
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def assert_bitwise_equal(ours: torch.Tensor, ref: torch.Tensor, what: str = "tensor"):
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.device == ref.device, f"{what}: device {ours.device} != {ref.device}"
    assert bitwise_equal(ours, ref), f"{what}: values differ\nours={ours}\nref={ref}"


def assert_packed_equal(ours, ref: PackedSequence):
    assert isinstance(ours, PackedSequence), type(ours)
    assert_bitwise_equal(ours.data, ref.data, "data")
    assert ours.batch_sizes.device.type == "cpu" and ours.batch_sizes.dtype == torch.int64
    assert_bitwise_equal(ours.batch_sizes, ref.batch_sizes, "batch_sizes")
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), f"{name}: ours {a} vs torch {b}"
        if b is not None:
            assert_bitwise_equal(a, b, name)


def padded_shape(B, T, trailing, batch_first):
    return (B, T, *trailing) if batch_first else (T, B, *trailing)


def length_mask(lengths, T, device) -> torch.Tensor:
    """(B, T) boolean mask of the first lengths[b] steps."""
    lengths = torch.as_tensor(lengths, device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


def masked(x: torch.Tensor, mask_bt: torch.Tensor, batch_first: bool, fill=0) -> torch.Tensor:
    """x (B, T, *) or (T, B, *) with the positions outside the (B, T) mask set to `fill`.

    x * mask would be the same up to signed zeros (-x * 0 = -0.0); the kernels write +0.0."""
    m = mask_bt if batch_first else mask_bt.t()
    m = m.reshape(*m.shape, *([1] * (x.dim() - 2)))
    return torch.where(m, x, torch.full_like(x, fill))


# ---------------------------------------------------------------------------------------
# pack_padded_sequence vs torch

LENGTH_CASES = [
    pytest.param("sorted", True, id="sorted-enforce"),
    pytest.param("sorted", False, id="sorted-noenforce"),
    pytest.param("unsorted", False, id="unsorted"),
    pytest.param("with_ones", False, id="with_ones"),
    pytest.param("ones", True, id="ones-enforce"),
    pytest.param("ones", False, id="ones-noenforce"),
    pytest.param("all_T", True, id="allT-enforce"),
    pytest.param("all_T", False, id="allT-noenforce"),
    pytest.param("b1", True, id="B1-enforce"),
    pytest.param("b1", False, id="B1-noenforce"),
]


def random_case(kind: str, seed: int, min_T: int = 1):
    g = torch.Generator().manual_seed(1000 + seed)
    B = 1 if kind == "b1" else int(torch.randint(2, 10, (), generator=g))
    T = int(torch.randint(max(min_T, 3 if kind in ("unsorted", "with_ones") else 1), 13, (), generator=g))
    return B, T, make_lengths(kind, B, T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,enforce_sorted", LENGTH_CASES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_matches_torch(device, kind, enforce_sorted, batch_first, trailing, seed):
    B, T, lengths = random_case(kind, seed)
    x = make_data(padded_shape(B, T, trailing, batch_first), f32, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    ours = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    assert_packed_equal(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False), ("with_ones", False)])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pack_dtypes(device, dtype, kind, enforce_sorted, batch_first):
    B, T, lengths = random_case(kind, 7)
    x = make_data(padded_shape(B, T, (4,), batch_first), dtype, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    ours = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    assert_packed_equal(ours, ref)


LENGTH_FORMS = ["list", "tuple", "numpy", "cpu_int64", "cpu_int32", "device"]


def lengths_as(lengths: list[int], form: str, device):
    if form == "list":
        return list(lengths)
    if form == "tuple":
        return tuple(lengths)
    if form == "numpy":
        return np.asarray(lengths, dtype=np.int64)
    if form == "cpu_int64":
        return torch.tensor(lengths, dtype=torch.int64)
    if form == "cpu_int32":
        return torch.tensor(lengths, dtype=torch.int32)
    if form == "device":
        return torch.tensor(lengths, dtype=torch.int64, device=device)
    raise AssertionError(form)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", LENGTH_FORMS)
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False)])
def test_pack_lengths_forms(device, form, kind, enforce_sorted):
    B, T, lengths = random_case(kind, 3)
    x = make_data((B, T, 3), f32, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    ours = batchops.pack_padded_sequence(
        x, lengths_as(lengths, form, device), batch_first=True, enforce_sorted=enforce_sorted
    )
    assert_packed_equal(ours, ref)


NONCONTIGUOUS = ["transposed", "strided_time", "strided_feature", "expanded"]


def noncontiguous(B, T, H, how, batch_first, device):
    shape = padded_shape(B, T, (H,), batch_first)
    if how == "transposed":  # feature dim outermost in memory
        x = make_data((H, *shape[:2]), f32, device).permute(1, 2, 0)
    elif how == "strided_time":  # every other step of a longer padded tensor
        big = make_data(padded_shape(B, 2 * T, (H,), batch_first), f32, device)
        x = big[:, ::2] if batch_first else big[::2]
    elif how == "strided_feature":
        x = make_data((*shape[:2], 2 * H), f32, device)[..., ::2]
    elif how == "expanded":  # stride 0 along the batch dim
        one = make_data(padded_shape(1, T, (H,), batch_first), f32, device)
        x = one.expand(*shape)
    else:
        raise AssertionError(how)
    assert x.shape == shape and not x.is_contiguous()
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", NONCONTIGUOUS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pack_noncontiguous(device, how, batch_first):
    B, T, lengths = random_case("unsorted", 5)
    x = noncontiguous(B, T, 4, how, batch_first, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ours = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    assert_packed_equal(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pack_pad_large_matches_torch(device, batch_first):
    # Enough rows that the CPU kernel splits the gather across threads.
    B, T, H = 64, 200, 16
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    x = make_data(padded_shape(B, T, (H,), batch_first), f32, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ours = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    assert_packed_equal(ours, ref)
    a, la = batchops.pad_packed_sequence(ref, batch_first=batch_first, padding_value=-1.0, total_length=T)
    b, lb = rnn.pad_packed_sequence(ref, batch_first=batch_first, padding_value=-1.0, total_length=T)
    assert_bitwise_equal(a, b, "padded")
    assert_bitwise_equal(la, lb, "lengths")
    xb = x if batch_first else x.transpose(0, 1)
    check_unpad(batchops.unpad(xb, lengths), xb, length_mask(lengths, T, device))


# ---------------------------------------------------------------------------------------
# pad_packed_sequence vs torch

PADDING = {  # padding values per data kind: zero, non-zero, and NaN for floats
    "float": [0.0, -7.5, float("nan")],
    "int": [0, -1],
    "bool": [0, True],
}


def pad_params():
    for dtype in DTYPES:
        kind = "bool" if dtype == torch.bool else ("float" if dtype.is_floating_point else "int")
        for value in PADDING[kind]:
            yield pytest.param(dtype, value, id=f"{_dtype_id(dtype)}-pad{value}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,padding_value", list(pad_params()))
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False), ("b1", False)])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("extra", [None, 0, 3], ids=["total_None", "total_max", "total_max+3"])
def test_pad_matches_torch(device, dtype, padding_value, kind, enforce_sorted, batch_first, extra):
    B, T, lengths = random_case(kind, 11)
    x = make_data(padded_shape(B, T, (3,), batch_first), dtype, device)
    packed = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    total_length = None if extra is None else max(lengths) + extra
    kw = dict(batch_first=batch_first, padding_value=padding_value, total_length=total_length)
    ref_padded, ref_lengths = rnn.pad_packed_sequence(packed, **kw)
    padded, out_lengths = batchops.pad_packed_sequence(packed, **kw)
    assert_bitwise_equal(padded, ref_padded, "padded")
    # lengths: CPU int64, original batch order, exactly torch's
    assert out_lengths.device.type == "cpu" and out_lengths.dtype == torch.int64
    assert_bitwise_equal(out_lengths, ref_lengths, "lengths")
    assert out_lengths.tolist() == lengths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pad_of_batchops_pack_trailing_shapes(device, trailing, batch_first):
    B, T, lengths = random_case("with_ones", 2)
    x = make_data(padded_shape(B, T, trailing, batch_first), f16, device)
    ours = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    a, la = batchops.pad_packed_sequence(ours, batch_first=batch_first, padding_value=2.0)
    b, lb = rnn.pad_packed_sequence(ref, batch_first=batch_first, padding_value=2.0)
    assert_bitwise_equal(a, b, "padded")
    assert_bitwise_equal(la, lb, "lengths")


@pytest.mark.parametrize("device", DEVICES)
def test_pad_total_length_too_short_raises(device):
    x = make_data((4, 6, 2), f32, device)
    packed = rnn.pack_padded_sequence(x, [5, 2, 4, 1], batch_first=True, enforce_sorted=False)
    with pytest.raises(ValueError):
        rnn.pad_packed_sequence(packed, batch_first=True, total_length=4)
    with pytest.raises(ValueError, match="total_length"):
        batchops.pad_packed_sequence(packed, batch_first=True, total_length=4)
    # exactly the longest is fine
    padded, _ = batchops.pad_packed_sequence(packed, batch_first=True, total_length=5)
    assert padded.shape == (4, 5, 2)


# ---------------------------------------------------------------------------------------
# Round trip and gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, bf16, torch.int64, torch.bool], ids=_dtype_id)
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False), ("with_ones", False)])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_round_trip_equals_masked_input(device, dtype, kind, enforce_sorted, batch_first):
    B, T, lengths = random_case(kind, 4)
    T += 2  # padding beyond the longest sequence
    x = make_data(padded_shape(B, T, (2, 3), batch_first), dtype, device)
    packed = batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    padded, out_lengths = batchops.pad_packed_sequence(packed, batch_first=batch_first, total_length=T)
    assert_bitwise_equal(padded, masked(x, length_mask(lengths, T, device), batch_first), "round trip")
    assert out_lengths.tolist() == lengths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False), ("b1", True)])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pack_gradient_matches_torch(device, kind, enforce_sorted, batch_first):
    B, T, lengths = random_case(kind, 8)
    x = make_data(padded_shape(B, T, (3,), batch_first), f64, device)
    grads = []
    for impl in (rnn.pack_padded_sequence, batchops.pack_padded_sequence):
        xi = x.clone().requires_grad_(True)
        packed = impl(xi, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
        if not grads:
            torch.manual_seed(1)
            w = torch.randn_like(packed.data)
        (packed.data * w).sum().backward()
        grads.append(xi.grad)
    assert_bitwise_equal(grads[1], grads[0], "grad wrt padded input")
    # positions outside the lengths get exactly zero
    outside = ~masked(torch.ones_like(x, dtype=torch.bool), length_mask(lengths, T, device), batch_first)
    assert torch.all(grads[1][outside] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False)])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_pad_gradient_matches_torch(device, kind, enforce_sorted, batch_first):
    B, T, lengths = random_case(kind, 9)
    x = make_data(padded_shape(B, T, (3,), batch_first), f64, device)
    ref = rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    grads = []
    for impl in (rnn.pad_packed_sequence, batchops.pad_packed_sequence):
        data = ref.data.clone().requires_grad_(True)
        seq = PackedSequence(data, ref.batch_sizes, ref.sorted_indices, ref.unsorted_indices)
        padded, _ = impl(seq, batch_first=batch_first, padding_value=3.0, total_length=T + 2)
        if not grads:
            torch.manual_seed(2)
            w = torch.randn_like(padded)
        (padded * w).sum().backward()
        grads.append(data.grad)
    assert_bitwise_equal(grads[1], grads[0], "grad wrt packed data")


GRADCHECK_LENGTHS = [3, 1, 4, 3]  # unsorted, with a tie and a length-1 sequence


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_gradcheck_pack(device, batch_first):
    B, T = len(GRADCHECK_LENGTHS), 5
    x = make_data(padded_shape(B, T, (2,), batch_first), f64, device).requires_grad_(True)

    def fn(x):
        return batchops.pack_padded_sequence(x, GRADCHECK_LENGTHS, batch_first=batch_first, enforce_sorted=False).data

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_gradcheck_pad(device, batch_first):
    B, T = len(GRADCHECK_LENGTHS), 5
    x = make_data(padded_shape(B, T, (2,), batch_first), f64, device)
    ref = rnn.pack_padded_sequence(x, GRADCHECK_LENGTHS, batch_first=batch_first, enforce_sorted=False)
    data = ref.data.clone().requires_grad_(True)

    def fn(data):
        seq = PackedSequence(data, ref.batch_sizes, ref.sorted_indices, ref.unsorted_indices)
        return batchops.pad_packed_sequence(seq, batch_first=batch_first, padding_value=0.5, total_length=T + 1)[0]

    assert torch.autograd.gradcheck(fn, (data,))
    assert torch.autograd.gradgradcheck(fn, (data,))


def gradcheck_mask(device):
    return torch.tensor(
        [[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool, device=device
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("by", ["mask", "lengths"])
def test_gradcheck_unpad(device, by):
    mask = gradcheck_mask(device)
    B, T = mask.shape
    x = make_data((B, T, 2), f64, device).requires_grad_(True)
    kw = dict(mask=mask) if by == "mask" else dict(lengths=[2, 0, 5, 1])

    def fn(x):
        return batchops.unpad(x, **kw)[0]

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_pad_flash(device):
    mask = gradcheck_mask(device)
    B, T = mask.shape
    indices = torch.nonzero(mask.flatten()).flatten()
    tokens = make_data((indices.numel(), 3), f64, device).requires_grad_(True)

    def fn(tokens):
        return batchops.pad(tokens, indices, B, T)

    assert torch.autograd.gradcheck(fn, (tokens,))
    assert torch.autograd.gradgradcheck(fn, (tokens,))


# ---------------------------------------------------------------------------------------
# Through nn.LSTM / nn.GRU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("kind,enforce_sorted", [("sorted", True), ("unsorted", False)])
def test_rnn_module(device, cell, batch_first, kind, enforce_sorted):
    B, T, lengths = random_case(kind, 6, min_T=4)
    H, hidden = 5, 7
    module_cls = nn.LSTM if cell == "lstm" else nn.GRU
    module = module_cls(H, hidden, num_layers=2, batch_first=batch_first, bidirectional=True).to(device)
    x = make_data(padded_shape(B, T, (H,), batch_first), f32, device)
    results = []
    for mod in (rnn, batchops):
        xi = x.clone().requires_grad_(True)
        packed = mod.pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
        out, state = module(packed)
        assert isinstance(out, PackedSequence)
        padded, out_lengths = mod.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        h = state[0] if cell == "lstm" else state
        if not results:
            torch.manual_seed(3)
            w_out, w_h = torch.randn_like(padded), torch.randn_like(h)
        ((padded * w_out).sum() + (h * w_h).sum()).backward()
        results.append((out.data, padded, out_lengths, h, xi.grad))
    names = ("packed output", "padded output", "lengths", "h_n", "input grad")
    for name, ours, ref in zip(names, results[1], results[0]):
        assert_bitwise_equal(ours, ref, name)


# ---------------------------------------------------------------------------------------
# Errors: torch's exception types for bad lengths, ValueError for lengths > T


def _raises_like_torch(exc, x, lengths, **kw):
    with pytest.raises(exc):
        rnn.pack_padded_sequence(x, lengths, **kw)
    with pytest.raises(exc):
        batchops.pack_padded_sequence(x, lengths, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_pack_zero_length_raises(device, batch_first, enforce_sorted):
    x = make_data(padded_shape(3, 4, (2,), batch_first), f32, device)
    _raises_like_torch(RuntimeError, x, [4, 2, 0], batch_first=batch_first, enforce_sorted=enforce_sorted)
    if not enforce_sorted:
        _raises_like_torch(RuntimeError, x, [0, 4, 2], batch_first=batch_first, enforce_sorted=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("lengths", [[4, 2], [4, 3, 2, 1]], ids=["too_few", "too_many"])
def test_pack_wrong_count_raises(device, batch_first, lengths):
    x = make_data(padded_shape(3, 4, (2,), batch_first), f32, device)
    _raises_like_torch(RuntimeError, x, lengths, batch_first=batch_first, enforce_sorted=True)
    # With enforce_sorted=False torch first gathers the batch by the sorted lengths, so too few
    # lengths silently drop rows and too many raise an IndexError; batchops raises torch's
    # RuntimeError of the sorted path in both cases.
    with pytest.raises(RuntimeError, match="len\\(lengths\\)"):
        batchops.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", LENGTH_FORMS)
def test_pack_unsorted_with_enforce_sorted_raises(device, form):
    x = make_data((3, 4, 2), f32, device)
    with pytest.raises(RuntimeError):
        rnn.pack_padded_sequence(x, [2, 4, 1], batch_first=True, enforce_sorted=True)
    with pytest.raises(RuntimeError, match="enforce_sorted"):
        batchops.pack_padded_sequence(x, lengths_as([2, 4, 1], form, device), batch_first=True, enforce_sorted=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_pack_empty_batch_raises(device, batch_first, enforce_sorted):
    x = make_data(padded_shape(0, 4, (2,), batch_first), f32, device)
    _raises_like_torch(RuntimeError, x, [], batch_first=batch_first, enforce_sorted=enforce_sorted)
    _raises_like_torch(
        RuntimeError, x, torch.empty(0, dtype=torch.int64), batch_first=batch_first, enforce_sorted=enforce_sorted
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("form", ["list", "cpu_int64", "device"])
def test_pack_lengths_longer_than_T_raise_value_error(device, batch_first, enforce_sorted, form):
    # torch builds a malformed PackedSequence here without complaint; batchops refuses.
    x = make_data(padded_shape(3, 4, (2,), batch_first), f32, device)
    with pytest.raises(ValueError):
        batchops.pack_padded_sequence(
            x, lengths_as([5, 3, 1], form, device), batch_first=batch_first, enforce_sorted=enforce_sorted
        )
    with pytest.raises(ValueError):
        batchops.pack_padded_sequence(
            x, lengths_as([1, 3, 9], form, device), batch_first=batch_first, enforce_sorted=False
        )


# ---------------------------------------------------------------------------------------
# unpad / pad (the flash-attn varlen layout)


def reference_unpad(x: torch.Tensor, mask: torch.Tensor):
    """tokens, indices, cu_seqlens (int32, B+1) and max_seqlen from boolean indexing."""
    counts = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(counts, 0)
    max_seqlen = int(counts.max()) if counts.numel() else 0
    return x[mask], torch.nonzero(mask.flatten()).flatten(), cu, max_seqlen


def check_unpad(result, x, mask, max_seqlen=None):
    tokens, indices, cu_seqlens, ms = result
    ref_tokens, ref_indices, ref_cu, ref_ms = reference_unpad(x, mask)
    assert_bitwise_equal(tokens, ref_tokens, "tokens")
    assert_bitwise_equal(indices, ref_indices, "indices")
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (x.shape[0] + 1,)
    assert_bitwise_equal(cu_seqlens, ref_cu, "cu_seqlens")
    assert type(ms) is int, f"max_seqlen must be a Python int, got {type(ms)}"
    assert ms == (ref_ms if max_seqlen is None else max_seqlen)


UNPAD_LENGTH_CASES = {
    "random_with_zeros": lambda B, T: torch.randint(0, T + 1, (B,)).tolist()[:-1] + [0],
    "all_zero": lambda B, T: [0] * B,
    "all_T": lambda B, T: [T] * B,
    "ones": lambda B, T: [1] * B,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(UNPAD_LENGTH_CASES))
@pytest.mark.parametrize("form", ["list", "cpu_int64", "device"])
@pytest.mark.parametrize("B", [1, 5])
def test_unpad_lengths(device, case, form, B):
    T = 7
    lengths = UNPAD_LENGTH_CASES[case](B, T)
    x = make_data((B, T, 3), f32, device)
    mask = length_mask(lengths, T, device)
    check_unpad(batchops.unpad(x, lengths_as(lengths, form, device)), x, mask)
    # a given bound is returned as is
    check_unpad(batchops.unpad(x, lengths_as(lengths, form, device), max_seqlen=T), x, mask, max_seqlen=T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("trailing", TRAILING)
def test_unpad_pad_dtypes_and_shapes(device, dtype, trailing):
    B, T = 4, 6
    lengths = [6, 0, 2, 5]
    x = make_data((B, T, *trailing), dtype, device)
    mask = length_mask(lengths, T, device)
    result = batchops.unpad(x, lengths)
    check_unpad(result, x, mask)
    tokens, indices = result[0], result[1]
    assert_bitwise_equal(batchops.pad(tokens, indices, B, T), masked(x, mask, True), "pad(unpad(x))")


def mask_patterns(B, T, device):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    right = torch.arange(T)[None, :] < lengths[:, None]
    patterns = {
        "random": torch.rand(B, T, generator=g) > 0.4,
        "right_padding": right,
        "left_padding": right.flip(1),
        "all_false_rows": (torch.rand(B, T, generator=g) > 0.3) & (torch.arange(B) % 2 == 0)[:, None],
        "all_true": torch.ones(B, T, dtype=torch.bool),
        "all_false": torch.zeros(B, T, dtype=torch.bool),
        "holes": (torch.arange(T)[None, :] % 3 != 1).expand(B, T).clone(),
    }
    return {k: v.to(device) for k, v in patterns.items()}


MASK_NAMES = ["random", "right_padding", "left_padding", "all_false_rows", "all_true", "all_false", "holes"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", MASK_NAMES)
@pytest.mark.parametrize("B,T", [(1, 9), (6, 11)])
@pytest.mark.parametrize("bounds", ["none", "max_seqlen", "max_seqlen+total", "total"])
def test_unpad_mask(device, pattern, B, T, bounds):
    mask = mask_patterns(B, T, device)[pattern]
    x = make_data((B, T, 2, 3), f32, device)
    kw = {}
    if "max_seqlen" in bounds:
        kw["max_seqlen"] = T  # an upper bound is fine
    if "total" in bounds:
        kw["total"] = int(mask.sum())
    result = batchops.unpad(x, mask=mask, **kw)
    check_unpad(result, x, mask, max_seqlen=kw.get("max_seqlen"))
    tokens, indices = result[0], result[1]
    assert_bitwise_equal(batchops.pad(tokens, indices, B, T), masked(x, mask, True), "pad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, bf16], ids=_dtype_id)
def test_unpad_mask_dtypes(device, dtype):
    B, T = 5, 8
    mask = mask_patterns(B, T, device)["left_padding"]
    x = make_data((B, T), dtype, device)
    result = batchops.unpad(x, mask=mask)
    check_unpad(result, x, mask)
    assert_bitwise_equal(batchops.pad(result[0], result[1], B, T), masked(x, mask, True), "pad")


@pytest.mark.parametrize("device", DEVICES)
def test_unpad_noncontiguous(device):
    B, T = 4, 6
    base = make_data((T, B, 5), f32, device)
    x = base.transpose(0, 1)[..., ::2]  # (B, T, 3), non-contiguous
    mask = mask_patterns(B, T, device)["random"]
    check_unpad(batchops.unpad(x, mask=mask), x, mask)
    lengths = [6, 1, 0, 3]
    check_unpad(batchops.unpad(x, lengths), x, length_mask(lengths, T, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("by", ["mask", "lengths"])
def test_unpad_pad_gradients(device, by):
    B, T = 5, 7
    mask = mask_patterns(B, T, device)["left_padding" if by == "mask" else "right_padding"]
    lengths = mask.sum(1).tolist()
    x = make_data((B, T, 3), f64, device).requires_grad_(True)
    tokens, indices, _, _ = batchops.unpad(x, mask=mask) if by == "mask" else batchops.unpad(x, lengths)
    w = torch.randn_like(tokens)
    (tokens * w).sum().backward()
    expected = torch.zeros_like(x)
    expected[mask] = w
    assert_bitwise_equal(x.grad, expected, "grad of unpad")

    t = tokens.detach().clone().requires_grad_(True)
    out = batchops.pad(t, indices, B, T)
    assert_bitwise_equal(out, masked(x.detach(), mask, True), "pad")
    w2 = torch.randn_like(out)
    (out * w2).sum().backward()
    assert_bitwise_equal(t.grad, w2[mask], "grad of pad")


@pytest.mark.parametrize("device", DEVICES)
def test_unpad_empty_batch(device):
    for B, T in [(0, 5), (3, 0)]:
        x = make_data((B, T, 2), f32, device)
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        check_unpad(batchops.unpad(x, mask=mask), x, mask)
        check_unpad(batchops.unpad(x, [0] * B), x, mask)
        tokens, indices = batchops.unpad(x, mask=mask)[:2]
        assert_bitwise_equal(batchops.pad(tokens, indices, B, T), x, "pad")


@pytest.mark.parametrize("device", DEVICES)
def test_unpad_zero_width_features(device):
    # "any trailing feature shape": a trailing dim of size 0 must give (total, *, 0) tokens.
    B, T = 3, 4
    x = torch.zeros(B, T, 2, 0, device=device)
    lengths = [1, 4, 0]
    mask = length_mask(lengths, T, device)
    check_unpad(batchops.unpad(x, lengths), x, mask)
    check_unpad(batchops.unpad(x, mask=mask), x, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_unpad_errors(device):
    B, T = 3, 4
    x = make_data((B, T, 2), f32, device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    with pytest.raises(ValueError):
        batchops.unpad(x)  # neither
    with pytest.raises(ValueError):
        batchops.unpad(x, [1, 2, 3], mask=mask)  # both
    with pytest.raises(ValueError):
        batchops.unpad(x, [1, 5, 3])  # longer than T
    with pytest.raises(ValueError):
        batchops.unpad(x, torch.tensor([1, 5, 3], device=device))
    with pytest.raises(ValueError):
        batchops.unpad(x, [1, -1, 3])
    with pytest.raises(ValueError):
        batchops.unpad(x, [1, 2])  # wrong count
    for bad in (
        torch.ones(B, T + 1, dtype=torch.bool),
        torch.ones(B + 1, T, dtype=torch.bool),
        torch.ones(B * T, dtype=torch.bool),
        torch.ones(B, T, 1, dtype=torch.bool),
    ):
        with pytest.raises(ValueError):
            batchops.unpad(x, mask=bad.to(device))


# ---------------------------------------------------------------------------------------
# Structure: one gather each way, index maps by prefix sums (no nonzero, no per-step loop)


# nonzero / masked_select: data-dependent sizes (a sync on a GPU); index_add / scatter_add: a
# scatter-add backward instead of one more gather.
FORBIDDEN_OPS = {"nonzero", "nonzero_static", "masked_select", "index_add", "index_add_", "scatter_add", "scatter_add_"}
CONVERSIONS = ["pack_sorted", "pack_unsorted", "pad_packed", "unpad_lengths", "unpad_mask", "pad"]


def _conversion(name: str, B: int, T: int, device):
    """(forward thunk, leaf requiring grad) for one conversion on a random (B, T, 3) batch."""
    g = torch.Generator().manual_seed(B * 1000 + T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    x = make_data((B, T, 3), f32, device).requires_grad_(True)
    if name == "pack_sorted":
        sorted_lengths = lengths.sort(descending=True).values.tolist()
        return (lambda: batchops.pack_padded_sequence(x, sorted_lengths, batch_first=True).data), x
    if name == "pack_unsorted":
        return (lambda: batchops.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False).data), x
    if name == "pad_packed":
        ref = rnn.pack_padded_sequence(x.detach(), lengths, batch_first=True, enforce_sorted=False)
        data = ref.data.clone().requires_grad_(True)
        seq = PackedSequence(data, ref.batch_sizes, ref.sorted_indices, ref.unsorted_indices)
        return (lambda: batchops.pad_packed_sequence(seq, batch_first=True)[0]), data
    if name == "unpad_lengths":
        host = (lengths - 1).tolist()  # zeros allowed
        return (lambda: batchops.unpad(x, host)[0]), x
    mask = (torch.rand(B, T, generator=g) > 0.5).to(device)
    if name == "unpad_mask":
        return (lambda: batchops.unpad(x, mask=mask)[0]), x
    if name == "pad":
        indices = torch.nonzero(mask.flatten()).flatten()
        tokens = make_data((indices.numel(), 3), f32, device).requires_grad_(True)
        return (lambda: batchops.pad(tokens, indices, B, T)), tokens
    raise AssertionError(name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CONVERSIONS)
def test_one_gather_each_way_no_nonzero(device, name):
    counts = []
    for B, T in [(4, 8), (48, 96)]:
        fwd, leaf = _conversion(name, B, T, device)
        with RecordOps() as forward:
            out = fwd()
        with RecordOps() as backward:
            out.backward(torch.ones_like(out))
        assert leaf.grad is not None
        for phase, rec in (("forward", forward), ("backward", backward)):
            assert rec.ops.count("gather_rows") == 1, f"{phase}: {rec.ops}"
            # on the CPU unpad(mask) finds the kept tokens with nonzero: no device to wait for
            forbidden = FORBIDDEN_OPS - ({"nonzero"} if device == "cpu" and name == "unpad_mask" else set())
            assert not forbidden & set(rec.ops), f"{phase} uses {forbidden & set(rec.ops)}: {rec.ops}"
        counts.append(len(forward.ops))
    # 12x more steps and rows: a per-length or per-step loop would add ops, a fixed plan does not
    assert counts[1] <= counts[0] + 2, counts


# ---------------------------------------------------------------------------------------
# torch.ops.batchops.gather_rows: opcheck and errors


def gather_rows_samples(device):
    R = 7
    samples = []
    # fill rows (-1), no inverse: backward is a scatter-add (repeats allowed)
    x = make_data((R, 3), f32, device).requires_grad_(True)
    idx = torch.tensor([3, -1, 0, 3, 6, -1], device=device)
    samples.append(("fill_repeats", (x, idx, None, 0)))
    # injective index with its inverse: backward is one more gather
    x = make_data((R, 2, 3), f64, device).requires_grad_(True)
    idx = torch.tensor([5, -1, 2, 0, -1, 6], device=device)
    inv = torch.full((R,), -1, dtype=torch.int64, device=device)
    inv[idx[idx >= 0]] = torch.nonzero(idx >= 0).flatten()
    samples.append(("inverse", (x, idx, inv, 2.5)))
    samples.append(("inverse_none", (x, idx, None, -1.0)))
    # integer and boolean data, any trailing shape
    samples.append(("int64", (make_data((R,), torch.int64, device), idx, inv, -1)))
    samples.append(("int32_2d", (make_data((R, 4), torch.int32, device), idx, None, 7)))
    samples.append(("bool", (make_data((R, 2, 5), torch.bool, device), idx, inv, True)))
    samples.append(("half", (make_data((R, 3), f16, device).requires_grad_(True), idx, inv, 0)))
    # empty index, and an empty input with only fill rows
    empty = torch.empty(0, dtype=torch.int64, device=device)
    samples.append(("empty_index", (make_data((R, 3), f32, device).requires_grad_(True), empty, None, 0)))
    samples.append(
        (
            "empty_input",
            (
                make_data((0, 3), f32, device).requires_grad_(True),
                torch.full((4,), -1, dtype=torch.int64, device=device),
                torch.empty(0, dtype=torch.int64, device=device),
                1.5,
            ),
        )
    )
    # non-contiguous input
    x = make_data((3, R), f32, device).t().requires_grad_(True)
    samples.append(("noncontiguous", (x, idx, None, 0)))
    return samples


SAMPLE_NAMES = [
    "fill_repeats",
    "inverse",
    "inverse_none",
    "int64",
    "int32_2d",
    "bool",
    "half",
    "empty_index",
    "empty_input",
    "noncontiguous",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_inverse", [False, True], ids=["scatter_add", "inverse"])
def test_gather_rows_gradcheck(device, with_inverse):
    """Both backward paths, and their own gradients: repeats and fill rows (scatter-add), or an
    injective index with its inverse (one more gather)."""
    R = 7
    x = make_data((R, 2, 3), f64, device).requires_grad_(True)
    if with_inverse:
        idx = torch.tensor([5, -1, 2, 0, -1, 6], device=device)
        inv = torch.full((R,), -1, dtype=torch.int64, device=device)
        inv[idx[idx >= 0]] = torch.nonzero(idx >= 0).flatten()
    else:
        idx, inv = torch.tensor([3, -1, 0, 3, 6, -1, 3], device=device), None

    def fn(t):
        return torch.ops.batchops.gather_rows(t, idx, inv, 1.5)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_gather_rows_backward_leaves_fill_rows_out(device, bad):
    """The scatter-add backward drops the fill rows' gradient: a NaN or inf there (a padding
    slot's gradient) must not reach input row 0, which index -1 is clamped to."""
    x = make_data((4, 3), f32, device).requires_grad_(True)
    idx = torch.tensor([2, -1, 0, 2, -1], device=device)
    out = torch.ops.batchops.gather_rows(x, idx, None, 0.0)
    grad = torch.ones_like(out)
    grad[idx < 0] = bad
    out.backward(grad)
    expected = torch.zeros_like(x)
    expected[0] = 1
    expected[2] = 2
    assert_bitwise_equal(x.grad, expected, "gather_rows grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_gather_rows_opcheck(device, name):
    args = dict(gather_rows_samples(device))[name]
    torch.library.opcheck(torch.ops.batchops.gather_rows, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_gather_rows_values(device, name):
    x, idx, inv, fill = dict(gather_rows_samples(device))[name]
    out = torch.ops.batchops.gather_rows(x, idx, inv, fill)
    expected = torch.empty((idx.numel(), *x.shape[1:]), dtype=x.dtype, device=device)
    expected[:] = torch.full((), fill, dtype=x.dtype)
    valid = idx >= 0
    expected[valid] = x.detach()[idx[valid]]
    assert_bitwise_equal(out, expected, "gather_rows")


@pytest.mark.parametrize("device", CPU_ONLY)  # on CUDA this is a device-side assert that kills the context
@pytest.mark.parametrize("bad", [7, 100, -2])
def test_gather_rows_out_of_range_raises(device, bad):
    x = make_data((7, 3), f32, device)
    with pytest.raises(IndexError):
        torch.ops.batchops.gather_rows(x, torch.tensor([0, bad, 1], device=device), None, 0)


# ---------------------------------------------------------------------------------------
# torch.compile


def _unpad_mlp(x, mask, weight, max_seqlen: int, total: int):
    tokens, indices, cu_seqlens, ms = batchops.unpad(x, mask=mask, max_seqlen=max_seqlen, total=total)
    h = torch.tanh(tokens @ weight)
    return batchops.pad(h, indices, x.shape[0], x.shape[1]), cu_seqlens, ms


@pytest.mark.parametrize("device", DEVICES)
def test_compile_unpad_pad(device):
    # fullgraph=True works: with `max_seqlen` and `total` given, every output size is known
    # without reading device data, and gather_rows' fake kernel sizes its output from the index.
    torch._dynamo.reset()
    B, T, H = 3, 8, 4
    mask = mask_patterns(B, T, device)["left_padding"]
    total = int(mask.sum())
    weight = make_data((H, H), f32, device)
    x = make_data((B, T, H), f32, device)
    compiled = torch.compile(_unpad_mlp, fullgraph=True, backend="aot_eager")

    results = []
    for fn in (_unpad_mlp, compiled):
        xi = x.clone().requires_grad_(True)
        out, cu_seqlens, ms = fn(xi, mask, weight, T, total)
        out.sum().backward()
        results.append((out, cu_seqlens, ms, xi.grad))
    (e_out, e_cu, e_ms, e_grad), (c_out, c_cu, c_ms, c_grad) = results
    torch.testing.assert_close(c_out, e_out)
    torch.testing.assert_close(c_grad, e_grad)
    assert_bitwise_equal(c_cu, e_cu, "cu_seqlens")
    assert c_ms == e_ms == T and type(c_ms) is int
    # the padded positions are exactly zero, and so are their gradients
    assert torch.all(c_out[~mask] == 0) and torch.all(c_grad[~mask] == 0)


def _pad_only(tokens, indices, batch: int, seqlen: int):
    return batchops.pad(tokens, indices, batch, seqlen) * 2


@pytest.mark.parametrize("device", DEVICES)
def test_compile_pad_dynamic_sizes(device):
    torch._dynamo.reset()
    compiled = torch.compile(_pad_only, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, T, pattern in [(3, 8, "random"), (5, 6, "left_padding"), (4, 9, "all_false_rows")]:
        mask = mask_patterns(B, T, device)[pattern]
        x = make_data((B, T, 3), f32, device)
        tokens, indices, _, _ = batchops.unpad(x, mask=mask)
        t_e = tokens.clone().requires_grad_(True)
        t_c = tokens.clone().requires_grad_(True)
        eager, comp = _pad_only(t_e, indices, B, T), compiled(t_c, indices, B, T)
        assert_bitwise_equal(comp, eager, f"compiled pad {B}x{T}")
        comp.sum().backward()
        eager.sum().backward()
        assert_bitwise_equal(t_c.grad, t_e.grad, "compiled pad grad")


# ---------------------------------------------------------------------------------------
# CUDA: no device-to-host synchronisation with host lengths, or with mask + bounds


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_no_sync_with_host_lengths_cuda(device):
    B, T, H = 6, 10, 8
    lengths = [10, 3, 7, 1, 7, 5]
    x = make_data((B, T, H), f32, device)
    mask = mask_patterns(B, T, device)["left_padding"]
    total = int(mask.sum())
    # warm-up outside the checked region (allocator, pinned-memory pool)
    batchops.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    batchops.unpad(x, lengths)
    batchops.pad(*batchops.unpad(x, mask=mask, max_seqlen=T, total=total)[:2], B, T)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        p_list = batchops.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        p_cpu = batchops.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        p_sorted = batchops.pack_padded_sequence(x, sorted(lengths, reverse=True), batch_first=True)
        u_lengths = batchops.unpad(x, lengths)
        u_mask = batchops.unpad(x, mask=mask, max_seqlen=T, total=total)
        padded = batchops.pad(u_mask[0], u_mask[1], B, T)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    ref = rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    assert_packed_equal(p_list, ref)
    assert_packed_equal(p_cpu, ref)
    assert_packed_equal(p_sorted, rnn.pack_padded_sequence(x, sorted(lengths, reverse=True), batch_first=True))
    check_unpad(u_lengths, x, length_mask(lengths, T, device))
    check_unpad(u_mask, x, mask, max_seqlen=T)
    assert_bitwise_equal(padded, masked(x, mask, True), "pad")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_device_lengths_sync_exactly_once_cuda(device):
    B, T, H = 6, 10, 8
    lengths = [10, 3, 7, 1, 7, 5]
    x = make_data((B, T, H), f32, device)
    lengths_dev = torch.tensor(lengths, device=device)
    batchops.pack_padded_sequence(x, lengths_dev, batch_first=True, enforce_sorted=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            packed = batchops.pack_padded_sequence(x, lengths_dev, batch_first=True, enforce_sorted=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert_packed_equal(packed, rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))


@pytest.mark.cuda
def test_cuda_graph_capture_unpad_mask_and_pad():
    """unpad(mask=..., max_seqlen=..., total=...) and pad need no host synchronisation, so they
    capture into a CUDA graph; replays on a new batch (same token count) match eager calls."""
    B, T, H = 6, 11, 5
    gen = torch.Generator().manual_seed(3)

    def random_mask(total):
        flat = torch.zeros(B * T, dtype=torch.bool)
        flat[torch.randperm(B * T, generator=gen)[:total]] = True
        return flat.view(B, T).cuda()

    total = 29
    x = torch.randn(B, T, H, device="cuda")
    mask = random_mask(total)

    def step():
        tokens, indices, cu_seqlens, _ = batchops.packing.unpad(x, mask=mask, max_seqlen=T, total=total)
        return tokens, indices, cu_seqlens, batchops.packing.pad(tokens * 2, indices, B, T)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for _ in range(3):
        x.copy_(torch.randn(B, T, H, device="cuda"))
        mask.copy_(random_mask(total))
        graph.replay()
        eager = step()
        for name, a, e in zip(("tokens", "indices", "cu_seqlens", "padded"), static, eager):
            assert torch.equal(a, e), f"{name}: graph replay differs from the eager call"
        assert torch.equal(static[3], torch.where(mask[..., None], x * 2, torch.zeros_like(x)))
