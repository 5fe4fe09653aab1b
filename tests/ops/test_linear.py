"""Linear layers: batchops.functional.linear / grouped_linear, the torch.ops.batchops linear ops,
and the Linear / GroupedLinear modules, checked against torch on every device in DEVICES.

References: torch.nn.functional.linear followed by torch's activation (dense), and a Python
loop of F.linear over the groups, concatenated, followed by the activation (grouped), run in
float64 on copies of the inputs. Half precision: the error against that float64 reference may
be at most twice torch's own error in the same precision, plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchops
from batchops import functional as BF

from tests.helpers import ACTIVATIONS, DEVICES, ISA_LEVELS, TORCH_ACT, RecordOps, cap_cpu_isa
from tests.helpers import dtype_id as _dtype_id

pytestmark = pytest.mark.usefixtures("kernels")

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

HALF_FLOOR = {f16: 1e-3, bf16: 1e-2}


def _act_id(activation) -> str:
    return str(activation)


# ---------------------------------------------------------------------------------------
# References, inputs and a harness that runs an implementation on copies of the inputs


def torch_linear(x, w, b, activation=None):
    return TORCH_ACT[activation](F.linear(x, w, b))


def torch_grouped(x, w, b, group_sizes=None, activation=None):
    """The grouped op written with torch: F.linear per group, concatenated, then the activation."""
    G, N = w.shape[0], w.shape[1]
    bias = [None] * G if b is None else list(b)
    if G == 0:  # no groups, no rows: empty, but connected to the inputs for autograd
        connect = x.sum() + w.sum() + (b.sum() if b is not None else 0)
        return connect * 0 + x.new_zeros((*x.shape[:-1], N))
    if group_sizes is None:  # uniform: (G, ..., in)
        y = torch.stack([F.linear(x[g], w[g], bias[g]) for g in range(G)])
    else:
        sizes = group_sizes.tolist() if isinstance(group_sizes, torch.Tensor) else list(group_sizes)
        chunks = torch.split(x, sizes)
        y = torch.cat([F.linear(c, w[g], bias[g]) for g, c in enumerate(chunks)])
    return TORCH_ACT[activation](y)


def ours_linear(x, w, b, activation=None):
    return BF.linear(x, w, b, activation=activation)


def ours_grouped(x, w, b, group_sizes=None, activation=None):
    return BF.grouped_linear(x, w, b, group_sizes, activation=activation)


def _randn(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, dtype=f64) * scale).to(device=device, dtype=dtype)


def dense_inputs(in_shape, N, device, dtype, *, bias=True):
    K = in_shape[-1]
    scale = 1.0 / math.sqrt(max(K, 1))  # nn.Linear-sized weights: pre-activations of order 1
    return dict(
        x=_randn(in_shape, device, dtype),
        w=_randn((N, K), device, dtype, 2 * scale),
        b=_randn((N,), device, dtype, 0.5) if bias else None,
        gy=_randn((*in_shape[:-1], N), device, dtype),
    )


def grouped_inputs(in_shape, G, N, device, dtype, *, bias=True):
    K = in_shape[-1]
    scale = 1.0 / math.sqrt(max(K, 1))
    return dict(
        x=_randn(in_shape, device, dtype),
        w=_randn((G, N, K), device, dtype, 2 * scale),
        b=_randn((G, N), device, dtype, 0.5) if bias else None,
        gy=_randn((*in_shape[:-1], N), device, dtype),
    )


def evaluate(impl, x, w, b=None, gy=None, *, cast=None, grad="xwb", **kw):
    """Run impl(x, w, b, **kw) on fresh leaves (cast to `cast` when given; strides kept) and return
    the output and the gradients w.r.t. <output, gy> of the leaves named in `grad`."""
    leaves = {}
    for name, t in (("x", x), ("w", w), ("b", b)):
        if t is None:
            leaves[name] = None
            continue
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        leaves[name] = t.detach().requires_grad_(name in grad)
    y = impl(leaves["x"], leaves["w"], leaves["b"], **kw)
    out = dict(y=y.detach())
    wanted = [n for n in "xwb" if leaves[n] is not None and n in grad]
    if wanted:
        if gy is None:
            gy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
        grads = torch.autograd.grad(y, [leaves[n] for n in wanted], gy.to(y.dtype))
        out.update({f"g{n}": g for n, g in zip(wanted, grads)})
    return out


def tol(dtype: torch.dtype, scale: float) -> dict:
    """assert_close tolerances for a result in `dtype` vs a float64 reference whose largest
    magnitude is `scale` (a product's rounding error grows with its terms, not with its value)."""
    s = max(1.0, scale)
    if dtype == f64:
        return dict(rtol=1e-9, atol=1e-11 * s)
    if dtype == f32:
        return dict(rtol=1e-4, atol=2e-5 * s)
    raise AssertionError(dtype)


def assert_results_close(ours, ref, dtype):
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for key in ref:
        o, r = ours[key], ref[key]
        assert o.shape == r.shape, (key, o.shape, r.shape)
        assert o.device == r.device, key
        assert o.dtype == dtype, (key, o.dtype)
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(o.double(), r.double(), **tol(dtype, scale), msg=lambda m: f"{key}: {m}")


def check_vs_float64(ours_impl, ref_impl, inputs, dtype, **kw):
    ours = evaluate(ours_impl, **inputs, **kw)
    ref = evaluate(ref_impl, **inputs, cast=f64, **kw)
    assert ours["y"].dtype == dtype
    assert_results_close(ours, ref, dtype)
    return ours, ref


def check_half(ours_impl, ref_impl, inputs, dtype, **kw):
    """Error vs float64 at most twice torch's own error in the same precision (+ a floor)."""
    ours = evaluate(ours_impl, **inputs, **kw)
    theirs = evaluate(ref_impl, **inputs, **kw)
    ref = evaluate(ref_impl, **inputs, cast=f64, **kw)
    assert ours["y"].dtype == dtype
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].dtype == theirs[key].dtype == dtype, key
        assert ours[key].shape == ref[key].shape, key
        if ref[key].numel() == 0:
            continue
        err_ours = (ours[key].double() - ref[key]).abs().max().item()
        err_torch = (theirs[key].double() - ref[key]).abs().max().item()
        bound = 2 * err_torch + HALF_FLOOR[dtype] * max(1.0, ref[key].abs().max().item())
        assert err_ours <= bound, f"{key}: batchops error {err_ours:.3g} > {bound:.3g} (torch's error {err_torch:.3g})"


# ---------------------------------------------------------------------------------------
# Dense linear vs torch

# name: (input shape, out_features). Odd sizes (1, 7, 13, 1000) for rows, in and out; any
# leading shape (1-D to 4-D); empty input.
DENSE_CASES = {
    "2d": ((7, 13), 7),
    "1d": ((13,), 7),
    "3d": ((2, 3, 13), 7),
    "4d": ((2, 1, 3, 7), 13),
    "ones": ((1, 1), 1),
    "rows_1000": ((1000, 7), 13),
    "in_1000": ((13, 1000), 7),
    "out_1000": ((7, 13), 1000),
    "empty": ((0, 13), 7),
    "empty_3d": ((2, 0, 7), 13),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_torch(device, dtype, activation, case, bias):
    in_shape, N = DENSE_CASES[case]
    inputs = dense_inputs(in_shape, N, device, dtype, bias=bias)
    ours, _ = check_vs_float64(ours_linear, torch_linear, inputs, dtype, activation=activation)
    assert ours["y"].shape == (*in_shape[:-1], N)
    if ours["y"].numel() == 0:  # no rows: zero parameter gradients
        assert torch.equal(ours["gw"], torch.zeros_like(ours["gw"]))
        if bias:
            assert torch.equal(ours["gb"], torch.zeros_like(ours["gb"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32, f16, bf16], ids=_dtype_id)
def test_linear_without_activation_is_f_linear(device, dtype):
    """activation=None is exactly torch.nn.functional.linear: bitwise, gradients included."""
    inputs = dense_inputs((2, 5, 13), 7, device, dtype)
    ours = evaluate(ours_linear, **inputs)
    theirs = evaluate(torch_linear, **inputs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize(
    "in_shape, N",
    [((5, 0), 3), ((2, 3, 0), 4), ((5, 4), 0), ((0, 4), 0), ((0,), 3)],
    ids=["in_features_0", "in_features_0_3d", "out_features_0", "rows_0_out_features_0", "1d_in_features_0"],
)
def test_linear_degenerate_sizes(device, activation, in_shape, N):
    """in_features 0 (output = act(bias)), out_features 0: as torch (nn.Linear(0, n) is legal)."""
    inputs = dense_inputs(in_shape, N, device, f64)
    check_vs_float64(ours_linear, torch_linear, inputs, f64, activation=activation)


# ---------------------------------------------------------------------------------------
# Grouped linear vs torch

# name: (input shape (G, ..., in), out_features). G is the input's first dimension.
UNIFORM_CASES = {
    "g3_b5": ((3, 5, 13), 7),
    "g1": ((1, 7, 7), 13),
    "middle_dims": ((3, 2, 3, 7), 13),
    "no_middle_dims": ((2, 13), 7),  # one row per group
    "empty_groups": ((4, 0, 13), 7),
    "rows_1000": ((2, 1000, 7), 13),
    "in_1000": ((2, 3, 1000), 7),
    "out_1000": ((2, 7, 13), 1000),
}

# name: (group sizes, in_features, out_features). Empty groups anywhere, all rows in one
# group, several row blocks (128 rows) in one group, odd sizes.
RAGGED_CASES = {
    "mixed": ([3, 0, 5, 1], 13, 7),
    "first_last_empty": ([0, 4, 7, 0], 7, 13),
    "all_in_one": ([0, 0, 13, 0], 13, 7),
    "single_group": ([7], 13, 1),
    "all_empty": ([0, 0, 0], 7, 13),
    "one_row_groups": ([1] * 13, 7, 13),
    "rows_1000": ([1000, 1, 0, 130], 13, 7),
    "in_1000": ([3, 0, 4], 1000, 7),
    "out_1000": ([2, 5], 7, 1000),
    # several M, N and K tiles of the CUDA grouped GEMM at once (64 x 64 x 32 tiles), remainders in each
    "tiles_m_n_k": ([70, 0, 130], 100, 150),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("case", list(UNIFORM_CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grouped_uniform_matches_torch(device, dtype, activation, case, bias):
    in_shape, N = UNIFORM_CASES[case]
    inputs = grouped_inputs(in_shape, in_shape[0], N, device, dtype, bias=bias)
    ours, _ = check_vs_float64(ours_grouped, torch_grouped, inputs, dtype, activation=activation)
    assert ours["y"].shape == (*in_shape[:-1], N)
    if ours["y"].numel() == 0:
        assert torch.equal(ours["gw"], torch.zeros_like(ours["gw"]))
        if bias:
            assert torch.equal(ours["gb"], torch.zeros_like(ours["gb"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("case", list(RAGGED_CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grouped_ragged_matches_torch(device, dtype, activation, case, bias):
    sizes, K, N = RAGGED_CASES[case]
    G, rows = len(sizes), sum(sizes)
    inputs = grouped_inputs((rows, K), G, N, device, dtype, bias=bias)
    ours, _ = check_vs_float64(ours_grouped, torch_grouped, inputs, dtype, activation=activation, group_sizes=sizes)
    assert ours["y"].shape == (rows, N)
    # groups without rows get zero weight and bias gradients
    for g, s in enumerate(sizes):
        if s == 0:
            assert torch.equal(ours["gw"][g], torch.zeros_like(ours["gw"][g])), g
            if bias:
                assert torch.equal(ours["gb"][g], torch.zeros_like(ours["gb"][g])), g


GROUP_SIZE_FORMS = ["list", "tuple", "cpu_int64", "cpu_int32", "device_int64", "device_int32"]


def _group_sizes_as(sizes, form, device):
    if form == "list":
        return list(sizes)
    if form == "tuple":
        return tuple(sizes)
    dtype = torch.int64 if form.endswith("int64") else torch.int32
    return torch.tensor(sizes, dtype=dtype, device="cpu" if form.startswith("cpu") else device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", GROUP_SIZE_FORMS)
@pytest.mark.parametrize("case", ["mixed", "first_last_empty", "rows_1000"])
def test_grouped_ragged_group_sizes_forms(device, form, case):
    """A list, a tuple, and int64 / int32 tensors (on the CPU or the input's device) give the same
    results, bitwise, and leave the sizes tensor untouched."""
    if form.startswith("device") and device == "cpu":
        pytest.skip("same as the cpu_* forms on the CPU")
    sizes, K, N = RAGGED_CASES[case]
    inputs = grouped_inputs((sum(sizes), K), len(sizes), N, device, f32)
    gs = _group_sizes_as(sizes, form, device)
    before = gs.clone() if isinstance(gs, torch.Tensor) else None
    for activation in ("gelu", "relu", None):
        base = evaluate(ours_grouped, **inputs, activation=activation, group_sizes=sizes)
        other = evaluate(ours_grouped, **inputs, activation=activation, group_sizes=gs)
        for key in base:
            assert torch.equal(base[key], other[key]), (activation, key)
    if before is not None:
        assert torch.equal(gs, before) and gs.dtype == before.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("case", ["in_features_0", "out_features_0", "no_groups"])
@pytest.mark.parametrize("mode", ["uniform", "ragged"])
def test_grouped_degenerate_sizes(device, activation, case, mode):
    G, B, K, N = {"in_features_0": (2, 3, 0, 5), "out_features_0": (2, 3, 4, 0), "no_groups": (0, 3, 4, 5)}[case]
    if mode == "uniform":
        inputs = grouped_inputs((G, B, K), G, N, device, f64)
        kw = {}
    else:
        sizes = [B + g for g in range(G)]
        inputs = grouped_inputs((sum(sizes), K), G, N, device, f64)
        kw = dict(group_sizes=sizes)
    check_vs_float64(ours_grouped, torch_grouped, inputs, f64, activation=activation, **kw)


# ---------------------------------------------------------------------------------------
# float16 / bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f16, bf16], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("case", ["3d", "rows_1000", "in_1000", "empty"])
def test_linear_half_precision(device, dtype, activation, case):
    in_shape, N = DENSE_CASES[case]
    inputs = dense_inputs(in_shape, N, device, dtype)
    check_half(ours_linear, torch_linear, inputs, dtype, activation=activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f16, bf16], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize(
    "case", ["uniform_middle_dims", "uniform_rows_1000", "ragged_mixed", "ragged_rows_1000", "ragged_in_1000"]
)
def test_grouped_half_precision(device, dtype, activation, case):
    mode, name = case.split("_", 1)
    if mode == "uniform":
        in_shape, N = UNIFORM_CASES[name]
        inputs = grouped_inputs(in_shape, in_shape[0], N, device, dtype)
        kw = {}
    else:
        sizes, K, N = RAGGED_CASES[name]
        inputs = grouped_inputs((sum(sizes), K), len(sizes), N, device, dtype)
        kw = dict(group_sizes=sizes)
    check_half(ours_grouped, torch_grouped, inputs, dtype, activation=activation, **kw)


# ---------------------------------------------------------------------------------------
# Layouts and which inputs require grad


def _noncontiguous_dense(device, dtype):
    K, N, rows = 13, 7, 9
    x = _randn((K, rows), device, dtype).t()  # (rows, K), transposed
    w = _randn((K, N), device, dtype, 0.5).t()  # (N, K), transposed
    b = _randn((2 * N,), device, dtype)[::2]  # strided
    x3 = _randn((K, 2, rows), device, dtype).permute(1, 2, 0)  # (2, rows, K)
    return [
        dict(x=x, w=w, b=b, gy=_randn((N, rows), device, dtype).t()),
        dict(x=x3, w=w, b=b, gy=_randn((2, rows, N), device, dtype)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
def test_noncontiguous_inputs(device, dtype, activation):
    cases = []
    for inputs in _noncontiguous_dense(device, dtype):
        assert not inputs["x"].is_contiguous() and not inputs["w"].is_contiguous()
        cases.append((ours_linear, torch_linear, inputs, {}))
    G, K, N, B = 3, 13, 7, 5
    x = _randn((G, K, B), device, dtype).transpose(1, 2)  # (G, B, K)
    w = _randn((G, K, N), device, dtype, 0.5).transpose(1, 2)  # (G, N, K)
    b = _randn((N, G), device, dtype).t()  # (G, N)
    gy = _randn((G, N, B), device, dtype).transpose(1, 2)
    cases.append((ours_grouped, torch_grouped, dict(x=x, w=w, b=b, gy=gy), {}))
    sizes = [4, 0, 6]
    xr = _randn((K, sum(sizes)), device, dtype).t()
    gyr = _randn((N, sum(sizes)), device, dtype).t()
    cases.append((ours_grouped, torch_grouped, dict(x=xr, w=w, b=b, gy=gyr), dict(group_sizes=sizes)))
    for ours_impl, ref_impl, inputs, kw in cases:
        ours, _ = check_vs_float64(ours_impl, ref_impl, inputs, dtype, activation=activation, **kw)
        for name in "xwb":
            assert ours[f"g{name}"].shape == inputs[name].shape


REQUIRES_GRAD = ["x", "w", "b", "xw", "xb", "wb", "xwb"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"], ids=_act_id)
@pytest.mark.parametrize("mode", ["dense", "uniform", "ragged"])
@pytest.mark.parametrize("grad", REQUIRES_GRAD)
def test_requires_grad_subsets(device, activation, mode, grad):
    """Only the inputs that require grad get gradients, those are right, and the backward op is
    asked for exactly those (its output mask)."""
    if mode == "dense":
        inputs, impls, kw = dense_inputs((2, 5, 13), 7, device, f64), (ours_linear, torch_linear), {}
    elif mode == "uniform":
        inputs, impls, kw = grouped_inputs((3, 5, 13), 3, 7, device, f64), (ours_grouped, torch_grouped), {}
    else:
        sizes = [3, 0, 5]
        inputs = grouped_inputs((8, 13), 3, 7, device, f64)
        impls, kw = (ours_grouped, torch_grouped), dict(group_sizes=sizes)
    op_name = "linear_backward" if mode == "dense" else "grouped_linear_backward"
    with RecordOps() as rec:  # the C++ autograd calls the op below Python's reach
        ours = evaluate(impls[0], **inputs, grad=grad, activation=activation, **kw)
    mask_at = 7 if mode == "dense" else 8  # output_mask's place in the backward op's schema
    masks = [list(args[mask_at]) for func, args in rec.calls if func.overloadpacket.__name__ == op_name]
    if mode == "dense" and activation is None:
        assert masks == []  # F.linear itself
    else:
        assert masks == [[n in grad for n in "xwb"]]
    ref = evaluate(impls[1], **inputs, grad=grad, activation=activation, **kw)
    assert set(ours) == {"y"} | {f"g{n}" for n in grad}
    assert_results_close(ours, ref, f64)
    # .backward(): the others' .grad stays None
    leaves = {n: inputs[n].detach().clone().requires_grad_(n in grad) for n in "xwb"}
    y = impls[0](leaves["x"], leaves["w"], leaves["b"], activation=activation, **kw)
    y.backward(inputs["gy"])
    for n in "xwb":
        assert (leaves[n].grad is not None) == (n in grad), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_no_input_requires_grad(device, activation):
    inputs = dense_inputs((5, 13), 7, device, f32)
    y = BF.linear(inputs["x"], inputs["w"], inputs["b"], activation=activation)
    assert not y.requires_grad
    gi = grouped_inputs((8, 13), 3, 7, device, f32)
    y = BF.grouped_linear(gi["x"], gi["w"], gi["b"], [3, 0, 5], activation=activation)
    assert not y.requires_grad
    with torch.no_grad():
        x = inputs["x"].clone().requires_grad_()
        assert not BF.linear(x, inputs["w"], inputs["b"], activation=activation).requires_grad


# ---------------------------------------------------------------------------------------
# What forward saves; values at the edges


# The activations whose derivative the linear forward saves (csrc/linear/linear.h): all but relu.
SAVES_DERIVATIVE = tuple(a for a in ACTIVATIONS if a not in (None, "relu"))


def _torch_derivative(pre, activation):
    """act'(pre) by torch's autograd."""
    pre = pre.detach().requires_grad_()
    return torch.autograd.grad(TORCH_ACT[activation](pre).sum(), pre)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64, torch.bfloat16], ids=_dtype_id)
def test_hardswish_at_its_kinks(device, dtype):
    """hardswish's derivative jumps at -3 and 3, which half precision hits exactly: ours takes
    torch's side there (0 at -3, 1 at 3), and a NaN output stays NaN. Through the identity weight, the
    pre-activation is x itself (the activation code is shared with batch norm's)."""
    values = [-3.5, -3.0, -2.5, -1e-3, 0.0, 2.5, 3.0, 3.5]
    x = torch.tensor([values, [float("nan")] + values[1:]], device=device, dtype=dtype)  # NaN: a whole row
    eye = torch.eye(x.shape[1], device=device, dtype=dtype)
    out, saved = torch.ops.batchops.linear_forward(x, eye, None, "hardswish")
    pre = F.linear(x, eye).requires_grad_()
    torch.testing.assert_close(out, F.hardswish(pre).detach(), equal_nan=True)
    # The NaN row's derivative is left out: torch's own is 1 in its scalar loop, NaN in its vector one.
    torch.testing.assert_close(saved[0], torch.autograd.grad(F.hardswish(pre).sum(), pre)[0][0])
    assert saved[0, 1].item() == 0.0 and saved[0, 6].item() == 1.0  # at -3 and at 3: torch's sides


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64, torch.bfloat16], ids=_dtype_id)
def test_relu6_at_its_kinks(device, dtype):
    """relu6's derivative jumps at 0 and 6: ours is torch's there (0 at both, as hardtanh's), and
    NaN stays NaN. The pre-activation is x itself (identity weight; the NaN row's product is NaN
    throughout)."""
    values = [-1.0, 0.0, 1e-3, 3.0, 6.0 - 2**-4, 6.0, 7.5]
    x = torch.tensor([values, [float("nan")] + values[1:]], device=device, dtype=dtype)
    eye = torch.eye(x.shape[1], device=device, dtype=dtype)
    out, saved = torch.ops.batchops.linear_forward(x, eye, None, "relu6")
    pre = F.linear(x, eye).requires_grad_()
    torch.testing.assert_close(out, F.relu6(pre).detach(), equal_nan=True)
    # The NaN row's derivative is left out: torch's own is 1 in its scalar loop, 0 in its vector one.
    torch.testing.assert_close(saved[0], torch.autograd.grad(F.relu6(pre).sum(), pre)[0][0])
    assert saved[0, 1].item() == 0.0 and saved[0, 5].item() == 0.0 and saved[0, 4].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
def test_forward_op_saved(device, activation):
    """`saved` is act'(x @ W^T + b) for silu / gelu / gelu_tanh / hardswish, empty otherwise."""
    inputs = dense_inputs((2, 3, 13), 7, device, f64)
    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    out, saved = torch.ops.batchops.linear_forward(x, w, b, activation)
    torch.testing.assert_close(out, torch_linear(x, w, b, activation))
    if activation in SAVES_DERIVATIVE:
        torch.testing.assert_close(saved, _torch_derivative(F.linear(x, w, b), activation))
    else:
        assert saved.numel() == 0
    gi = grouped_inputs((8, 13), 3, 7, device, f64)
    out, saved, offsets = torch.ops.batchops.grouped_linear_forward(
        gi["x"], gi["w"], gi["b"], torch.tensor([3, 0, 5]), activation
    )
    assert offsets.dtype == torch.long and offsets.device == gi["x"].device
    assert offsets.tolist() == [0, 3, 3, 8]
    torch.testing.assert_close(out, torch_grouped(gi["x"], gi["w"], gi["b"], [3, 0, 5], activation))
    if activation in SAVES_DERIVATIVE:
        pre = torch_grouped(gi["x"], gi["w"], gi["b"], [3, 0, 5])
        torch.testing.assert_close(saved, _torch_derivative(pre, activation))
    else:
        assert saved.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("dtype", [f32, f64, torch.bfloat16], ids=_dtype_id)
def test_forward_without_saving(device, activation, dtype):
    """save_for_backward=False: the same output (bitwise), nothing saved; backward then refuses
    clearly for the activations that needed the derivative."""
    inputs = dense_inputs((2, 3, 13), 7, device, dtype)
    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    out, saved = torch.ops.batchops.linear_forward(x, w, b, activation, True)
    out_ns, saved_ns = torch.ops.batchops.linear_forward(x, w, b, activation, False)
    torch.testing.assert_close(out_ns, out, rtol=0, atol=0)
    assert saved_ns.numel() == 0
    gi = grouped_inputs((8, 13), 3, 7, device, dtype)
    sizes = torch.tensor([3, 0, 5])
    out, _, _ = torch.ops.batchops.grouped_linear_forward(gi["x"], gi["w"], gi["b"], sizes, activation, True)
    out_ns, saved_ns, _ = torch.ops.batchops.grouped_linear_forward(gi["x"], gi["w"], gi["b"], sizes, activation, False)
    torch.testing.assert_close(out_ns, out, rtol=0, atol=0)
    assert saved_ns.numel() == 0
    torch.library.opcheck(torch.ops.batchops.linear_forward.default, (x, w, b, activation, False))
    xg = x.detach().requires_grad_()
    y, _ = torch.ops.batchops.linear_forward(xg, w, b, activation, False)
    if activation in SAVES_DERIVATIVE:
        with pytest.raises(RuntimeError, match="save_for_backward=False"):
            y.sum().backward()
    elif activation is not None:
        y.sum().backward()  # relu reads the output: nothing was needed
        torch.testing.assert_close(xg.grad, torch.autograd.grad(torch_linear(xg, w, b, activation).sum(), xg)[0])


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_functional_saves_only_for_autograd(monkeypatch, activation):
    """batchops.functional asks the op to save the derivative only when a gradient will be taken."""
    import batchops.functional as functional_module

    calls = []
    real = functional_module.linear_forward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(functional_module, "linear_forward", spy)
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    BF.linear(x, w, b, activation=activation)
    BF.linear(x, w.requires_grad_(), b, activation=activation)
    with torch.no_grad():
        BF.linear(x, w, b, activation=activation)
    assert calls == [False, True, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("mode", ["dense", "uniform", "ragged"])
def test_output_can_be_modified_in_place(device, activation, mode):
    """The output is a tensor of its own (not a view): `y += residual` works as after F.linear, and
    gradients are right; relu's backward reads the output, so there autograd must refuse."""
    if mode == "dense":
        inputs, impls, kw = dense_inputs((2, 3, 13), 7, device, f64), (ours_linear, torch_linear), {}
    elif mode == "uniform":
        inputs, impls, kw = grouped_inputs((3, 2, 13), 3, 7, device, f64), (ours_grouped, torch_grouped), {}
    else:
        inputs = grouped_inputs((6, 13), 3, 7, device, f64)
        impls, kw = (ours_grouped, torch_grouped), dict(group_sizes=[2, 0, 4])
    residual = torch.randn_like(inputs["gy"])
    results = []
    for impl in impls:
        x, w, b = (inputs[n].detach().clone().requires_grad_() for n in "xwb")
        y = impl(x, w, b, activation=activation, **kw)
        if impl is ours_grouped or activation is not None:  # (activation None: F.linear's own output)
            assert not y._is_view()
        y += residual
        if activation == "relu":  # the saved output was modified: autograd refuses, as for torch.relu
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward(inputs["gy"])
            return
        y.backward(inputs["gy"])
        results.append([y.detach(), x.grad, w.grad, b.grad])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)
    # the gradients are plain tensors too
    assert not any(g._is_view() for g in results[0][1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
def test_large_preactivations(device, dtype, activation):
    """Pre-activations up to +-120 (exp / erf / tanh saturate): as torch, gradients included."""
    K, N = 13, 37
    x = _randn((9, K), device, dtype)
    w = _randn((N, K), device, dtype, 12.0)
    b = torch.linspace(-100, 100, N, dtype=f64).to(device=device, dtype=dtype)
    inputs = dict(x=x, w=w, b=b, gy=_randn((9, N), device, dtype))
    check_vs_float64(ours_linear, torch_linear, inputs, dtype, activation=activation)
    check_vs_float64(
        ours_grouped,
        torch_grouped,
        dict(x=x, w=w.unsqueeze(0).expand(2, N, K), b=b.expand(2, N), gy=inputs["gy"]),
        dtype,
        activation=activation,
        group_sizes=[4, 5],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
def test_nan_propagates(device, activation):
    x = _randn((4, 6), device, f32)
    x[1, 2] = float("nan")
    w = _randn((5, 6), device, f32)
    ours = BF.linear(x, w, None, activation=activation)
    ref = torch_linear(x, w, None, activation)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert ours[1].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_relu_gradient_at_nan_is_torchs(device):
    """torch's relu backward masks where the output is <= 0, so a NaN pre-activation passes its
    gradient; ours (the derivative saved by the forward) does the same."""
    x = _randn((4, 6), device, f64).requires_grad_()
    w = _randn((37, 6), device, f64)  # 37 outputs: vector loops and a tail
    bias = _randn((37,), device, f64)
    bias[::5] = float("nan")  # NaN pre-activations in some columns, finite elsewhere
    gy = _randn((4, 37), device, f64)
    ours = torch.autograd.grad(BF.linear(x, w, bias, activation="relu"), x, gy)[0]
    ref = torch.autograd.grad(torch_linear(x, w, bias, "relu"), x, gy)[0]
    assert ref.isfinite().all()  # the NaN columns' gradient went through relu, times finite weights
    torch.testing.assert_close(ours, ref)


# ---------------------------------------------------------------------------------------
# gradcheck (float64); double backward


def _gradcheck_case(mode, device, bias=True):
    if mode == "dense":
        inputs = dense_inputs((3, 4), 5, device, f64, bias=bias)
        return inputs, ours_linear, {}
    if mode == "dense_3d":
        inputs = dense_inputs((2, 3, 4), 5, device, f64, bias=bias)
        return inputs, ours_linear, {}
    if mode == "uniform":
        inputs = grouped_inputs((2, 3, 4), 2, 3, device, f64, bias=bias)
        return inputs, ours_grouped, {}
    sizes = [2, 0, 3]
    inputs = grouped_inputs((5, 4), 3, 3, device, f64, bias=bias)
    return inputs, ours_grouped, dict(group_sizes=sizes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("mode", ["dense", "dense_3d", "uniform", "ragged"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gradcheck(device, activation, mode, bias):
    # relu: the random pre-activations are nowhere within eps of the kink at 0
    inputs, impl, kw = _gradcheck_case(mode, device, bias)
    tensors = [inputs[n].detach().clone().requires_grad_() for n in "xwb" if inputs[n] is not None]

    def fn(*args):
        x, w, *rest = args
        return impl(x, w, rest[0] if rest else None, activation=activation, **kw)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_without_activation(device):
    """activation=None is F.linear, which supports double backward."""
    inputs = dense_inputs((3, 4), 5, device, f64)
    tensors = [inputs[n].detach().clone().requires_grad_() for n in "xwb"]
    assert torch.autograd.gradgradcheck(lambda x, w, b: BF.linear(x, w, b), tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=_act_id)
@pytest.mark.parametrize("mode", ["dense", "uniform", "ragged"])
def test_double_backward_raises(device, activation, mode):
    if mode == "dense" and activation is None:
        pytest.skip("F.linear: double backward works (test_gradgradcheck_without_activation)")
    inputs, impl, kw = _gradcheck_case(mode, device)
    x, w, b = (inputs[n].detach().clone().requires_grad_() for n in "xwb")
    y = impl(x, w, b, activation=activation, **kw)
    gx, gw = torch.autograd.grad(y, (x, w), inputs["gy"], create_graph=True)  # first order works
    ref = evaluate(
        torch_grouped if impl is ours_grouped else torch_linear, x, w, b, inputs["gy"], activation=activation, **kw
    )
    torch.testing.assert_close(gx.detach(), ref["gx"])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((gx.sum() + gw.sum()), (x, w, b))


# ---------------------------------------------------------------------------------------
# torch.library.opcheck on the ops


def _dense_op_args(
    device, *, shape=(4, 5), N=3, dtype=f32, bias=True, activation="gelu", transposed_weight=False, requires_grad=True
):
    x = _randn(shape, device, dtype)
    K = shape[-1]
    w = _randn((K, N), device, dtype).t() if transposed_weight else _randn((N, K), device, dtype)
    b = _randn((N,), device, dtype) if bias else None
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_()
    return (x, w, b, activation)


def _grouped_op_args(
    device,
    *,
    sizes=None,
    G=3,
    B=4,
    K=5,
    N=3,
    middle=(),
    dtype=f32,
    bias=True,
    activation="gelu",
    sizes_dtype=torch.int64,
    sizes_on_device=False,
    requires_grad=True,
):
    if sizes is None:
        x = _randn((G, *middle, B, K), device, dtype)
        gs = None
    else:
        G = len(sizes)
        x = _randn((sum(sizes), K), device, dtype)
        gs = torch.tensor(sizes, dtype=sizes_dtype, device=device if sizes_on_device else "cpu")
    w = _randn((G, N, K), device, dtype)
    b = _randn((G, N), device, dtype) if bias else None
    if requires_grad:
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_()
    return (x, w, b, gs, activation)


DENSE_OPCHECK = {
    "f32_gelu": dict(),
    "f64_relu_no_bias_3d": dict(shape=(2, 3, 5), dtype=f64, bias=False, activation="relu"),
    "f32_none_1d": dict(shape=(5,), activation=None),
    "bf16_silu_transposed_weight": dict(dtype=bf16, activation="silu", transposed_weight=True),
    "f16_gelu_tanh_4d": dict(shape=(2, 1, 3, 5), dtype=f16, activation="gelu_tanh"),
    "f32_silu_empty": dict(shape=(0, 5), activation="silu"),
}

GROUPED_OPCHECK = {
    "uniform_f32_gelu_tanh": dict(activation="gelu_tanh"),
    "uniform_f64_silu_middle_no_bias": dict(middle=(2,), dtype=f64, bias=False, activation="silu"),
    "uniform_f32_none": dict(activation=None),
    "ragged_f32_gelu_empty_groups": dict(sizes=[0, 3, 0, 4, 0]),
    "ragged_f64_relu_int32": dict(sizes=[2, 1, 3], dtype=f64, activation="relu", sizes_dtype=torch.int32),
    "ragged_bf16_silu": dict(sizes=[3, 2], dtype=bf16, activation="silu"),
    "ragged_f32_none_no_bias": dict(sizes=[1, 0, 4], bias=False, activation=None),
    "ragged_f32_gelu_device_sizes": dict(sizes=[2, 0, 3], sizes_on_device=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(DENSE_OPCHECK))
def test_opcheck_linear_forward(device, case):
    args = _dense_op_args(device, **DENSE_OPCHECK[case])
    torch.library.opcheck(torch.ops.batchops.linear_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GROUPED_OPCHECK))
def test_opcheck_grouped_linear_forward(device, case):
    args = _grouped_op_args(device, **GROUPED_OPCHECK[case])
    torch.library.opcheck(torch.ops.batchops.grouped_linear_forward.default, args)


MASKS = {
    "all": [True, True, True],
    "input": [True, False, False],
    "params": [False, True, True],
    "bias": [False, False, True],
    "weight": [False, True, False],
}


def _check_backward_outputs(grads, mask, x, w, b):
    for g, requested, like in zip(grads, mask, (x, w, b)):
        if requested and like is not None:
            assert g.shape == like.shape
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", ["f32_gelu", "f64_relu_no_bias_3d", "f32_none_1d", "bf16_silu_transposed_weight", "f32_silu_empty"]
)
@pytest.mark.parametrize("mask", list(MASKS))
def test_opcheck_linear_backward(device, case, mask):
    x, w, b, activation = _dense_op_args(device, requires_grad=False, **DENSE_OPCHECK[case])
    out, saved = torch.ops.batchops.linear_forward(x, w, b, activation)
    gy = torch.randn_like(out)
    args = (gy, x, w, b, out, saved, activation, MASKS[mask])
    torch.library.opcheck(torch.ops.batchops.linear_backward.default, args)
    _check_backward_outputs(torch.ops.batchops.linear_backward(*args), MASKS[mask], x, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [
        "uniform_f32_gelu_tanh",
        "uniform_f64_silu_middle_no_bias",
        "ragged_f32_gelu_empty_groups",
        "ragged_f64_relu_int32",
        "ragged_bf16_silu",
        "ragged_f32_none_no_bias",
        "ragged_f32_gelu_device_sizes",
    ],
)
@pytest.mark.parametrize("mask", ["all", "input", "params"])
def test_opcheck_grouped_linear_backward(device, case, mask):
    x, w, b, gs, activation = _grouped_op_args(device, requires_grad=False, **GROUPED_OPCHECK[case])
    out, saved, offsets = torch.ops.batchops.grouped_linear_forward(x, w, b, gs, activation)
    gy = torch.randn_like(out)
    args = (gy, x, w, b, gs, out, saved, activation, MASKS[mask])
    torch.library.opcheck(torch.ops.batchops.grouped_linear_backward.default, args)
    grads = torch.ops.batchops.grouped_linear_backward(*args)
    _check_backward_outputs(grads, MASKS[mask], x, w, b)
    # With forward's offsets (what autograd passes): the same gradients, bitwise.
    torch.library.opcheck(torch.ops.batchops.grouped_linear_backward.default, (*args, offsets))
    for ours, reference in zip(torch.ops.batchops.grouped_linear_backward(*args, offsets), grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Errors (torch's exception types for the same mistakes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "gelu"], ids=_act_id)
def test_linear_errors(device, activation):
    x = _randn((4, 5), device, f32)
    w = _randn((3, 5), device, f32)
    b = _randn((3,), device, f32)
    with pytest.raises(RuntimeError):  # in_features mismatch
        BF.linear(x, _randn((3, 6), device, f32), b, activation=activation)
    with pytest.raises(RuntimeError):  # dtype mismatch weight vs input
        BF.linear(x, w.double(), b.double(), activation=activation)
    with pytest.raises(RuntimeError):  # bias of the wrong length
        BF.linear(x, w, _randn((4,), device, f32), activation=activation)
    with pytest.raises(RuntimeError):  # weight not 2-D (F.linear: RuntimeError too)
        BF.linear(x, w.unsqueeze(0), b, activation=activation)
    with pytest.raises(RuntimeError):  # 0-D input
        BF.linear(x[0, 0], w, b, activation=activation)
    if activation is not None:
        with pytest.raises(RuntimeError, match="bias must have shape"):
            BF.linear(x, w, b.view(3, 1), activation=activation)
        with pytest.raises(RuntimeError, match="dtype"):
            BF.linear(x, w, b.double(), activation=activation)
        with pytest.raises(NotImplementedError):  # integer input
            BF.linear(x.long(), w.long(), b.long(), activation=activation)
        with pytest.raises(NotImplementedError):
            BF.linear(x.int(), w.int(), None, activation=activation)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_activation_name(device):
    x = _randn((4, 5), device, f32)
    w, b = _randn((3, 5), device, f32), _randn((3,), device, f32)
    for bad in ("tanh", "GELU", "", 1):
        with pytest.raises(ValueError, match="activation"):
            BF.linear(x, w, b, activation=bad)
        with pytest.raises(ValueError, match="activation"):
            BF.grouped_linear(x, w.unsqueeze(0), b.unsqueeze(0), [4], activation=bad)
    with pytest.raises(ValueError, match="activation"):
        batchops.Linear(5, 3, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        batchops.GroupedLinear(2, 5, 3, activation="gelu_erf")
    # the ops check the name too
    with pytest.raises(ValueError, match="activation"):
        torch.ops.batchops.linear_forward(x, w, b, "tanh")
    with pytest.raises(ValueError, match="activation"):
        torch.ops.batchops.grouped_linear_forward(x, w.unsqueeze(0), b.unsqueeze(0), None, "tanh")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "silu"], ids=_act_id)
def test_grouped_linear_errors(device, activation):
    G, K, N = 3, 5, 4
    w = _randn((G, N, K), device, f32)
    b = _randn((G, N), device, f32)
    x = _randn((8, K), device, f32)
    sizes = [3, 0, 5]

    def call(x_=x, w_=w, b_=b, gs=sizes):
        return BF.grouped_linear(x_, w_, b_, gs, activation=activation)

    call()  # the valid call
    # group_sizes: negative, not summing to the rows, wrong length (split_with_sizes: RuntimeError)
    for bad in ([4, -1, 5], [3, 0, 4], [3, 0, 6], [3, 5], [3, 0, 5, 0], torch.tensor([[3, 0, 5]])):
        with pytest.raises(RuntimeError, match="group_sizes"):
            call(gs=bad)
    with pytest.raises(RuntimeError, match="group_sizes"):
        call(gs=torch.tensor([4, -1, 5], dtype=torch.int32))
    # group_sizes of the wrong type
    for bad in (
        torch.tensor([3.0, 0.0, 5.0]),
        torch.tensor([True, False, True]),
        [3.0, 0, 5],
        [3, None, 5],
        8,
        "3,0,5",
    ):
        with pytest.raises(TypeError, match="group_sizes"):
            call(gs=bad)
    # 2-D input without group_sizes whose rows are not the groups
    with pytest.raises(RuntimeError, match="group_sizes"):
        call(gs=None)
    # uniform input whose first dimension is not G
    with pytest.raises(RuntimeError, match="num_groups"):
        call(x_=_randn((2, 4, K), device, f32), gs=None)
    with pytest.raises(RuntimeError):  # 1-D input
        call(x_=_randn((K,), device, f32), gs=None)
    with pytest.raises(RuntimeError, match="2-D"):  # group_sizes with a 3-D input
        call(x_=_randn((2, 4, K), device, f32))
    with pytest.raises(RuntimeError):  # in_features mismatch
        call(x_=_randn((8, K + 1), device, f32))
    with pytest.raises(RuntimeError, match="3-D"):  # dense weight
        call(w_=w[0], b_=b[0])
    with pytest.raises(RuntimeError, match="bias"):  # bias of the wrong shape
        call(b_=b[0])
    with pytest.raises(RuntimeError, match="bias"):
        call(b_=_randn((G, N + 1), device, f32))
    with pytest.raises(RuntimeError, match="dtype"):  # dtype mismatch weight vs input
        call(w_=w.double())
    with pytest.raises(RuntimeError, match="dtype"):
        call(b_=b.double())
    with pytest.raises(NotImplementedError):  # integer input
        call(x_=x.long(), w_=w.long(), b_=b.long())


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_linear_backward_group_offsets_errors(device):
    """The backward op's group_offsets must be what forward returned: int64, (G + 1,), on the
    input's device; anything else is refused by name."""
    x, w, b, gs, activation = _grouped_op_args(device, requires_grad=False, **GROUPED_OPCHECK["ragged_bf16_silu"])
    out, saved, offsets = torch.ops.batchops.grouped_linear_forward(x, w, b, gs, activation)
    args = (torch.randn_like(out), x, w, b, gs, out, saved, activation, [True, True, True])
    for bad in (offsets.int(), offsets[:-1], offsets.view(1, -1), offsets.double()):
        with pytest.raises(RuntimeError, match="group_offsets"):
            torch.ops.batchops.grouped_linear_backward(*args, bad)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="group_offsets"):
            torch.ops.batchops.grouped_linear_backward(*args, offsets.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["list", "cpu_tensor", "cuda_tensor"])
def test_cuda_backward_reuses_forward_group_offsets(form):
    """Backward takes the device offsets forward made: no host-to-device copy and no device-side
    checks of the sizes in backward (forward did both once)."""
    sizes = [5, 0, 7, 3]
    inputs = grouped_inputs((sum(sizes), 8), len(sizes), 6, "cuda", f32)
    gs = {"list": sizes, "cpu_tensor": torch.tensor(sizes), "cuda_tensor": torch.tensor(sizes, device="cuda")}[form]
    x, w, b = (inputs[k].detach().requires_grad_() for k in ("x", "w", "b"))
    y = BF.grouped_linear(x, w, b, gs, activation="gelu")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.backward(inputs["gy"])
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert "aten::_to_copy" not in names and "aten::_assert_async" not in names, names
    expected = evaluate(ours_grouped, **inputs, group_sizes=torch.tensor(sizes).cuda(), activation="gelu")
    torch.testing.assert_close(w.grad, expected["gw"])


@pytest.mark.cuda
@pytest.mark.parametrize("activation", [None, "gelu"], ids=_act_id)
def test_device_mismatch(activation):
    x = torch.randn(4, 5, device="cuda")
    w, b = torch.randn(3, 5), torch.randn(3)
    with pytest.raises(RuntimeError):
        BF.linear(x, w, b, activation=activation)
    with pytest.raises(RuntimeError):
        BF.linear(x, w.cuda(), b, activation=activation)
    with pytest.raises(RuntimeError):
        BF.grouped_linear(x, w.unsqueeze(0), b.unsqueeze(0), [4], activation=activation)
    with pytest.raises(RuntimeError):
        BF.grouped_linear(x.cpu(), w.unsqueeze(0).cuda(), b.unsqueeze(0).cuda(), [4], activation=activation)


@pytest.mark.cuda
def test_cuda_group_sizes_on_device_match_cpu():
    sizes = [3, 0, 200, 1]
    inputs = grouped_inputs((sum(sizes), 13), 4, 7, "cuda", f32)
    a = evaluate(ours_grouped, **inputs, group_sizes=torch.tensor(sizes), activation="gelu")
    c = evaluate(ours_grouped, **inputs, group_sizes=torch.tensor(sizes, device="cuda"), activation="gelu")
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Modules


def _state_dict_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_module_like_nn_linear(device, bias):
    torch.manual_seed(123)
    ref = nn.Linear(13, 7, bias=bias, device=device)
    torch.manual_seed(123)
    ours = batchops.Linear(13, 7, bias=bias, device=device)
    assert isinstance(ours, nn.Linear)
    _state_dict_equal(ours.state_dict(), ref.state_dict())  # same init, same keys
    # state_dicts load both ways
    other = nn.Linear(13, 7, bias=bias, device=device)
    other.load_state_dict(ours.state_dict())
    _state_dict_equal(other.state_dict(), ours.state_dict())
    ours2 = batchops.Linear(13, 7, bias=bias, device=device, activation="gelu")
    ours2.load_state_dict(ref.state_dict())
    _state_dict_equal(ours2.state_dict(), ref.state_dict())
    # activation=None: exactly nn.Linear, gradients included
    x = _randn((2, 3, 13), device, f32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    # with an activation: the functional op on the same parameters
    torch.testing.assert_close(ours2(x), F.gelu(ref(x)), rtol=1e-5, atol=1e-6)


def test_linear_module_repr_and_factory_kwargs():
    assert repr(batchops.Linear(3, 4)) == repr(nn.Linear(3, 4)) == "Linear(in_features=3, out_features=4, bias=True)"
    assert (
        repr(batchops.Linear(3, 4, bias=False, activation="silu"))
        == "Linear(in_features=3, out_features=4, bias=False, activation='silu')"
    )
    m = batchops.Linear(3, 4, dtype=f64, activation="relu")
    assert m.weight.dtype == f64 and m.bias.dtype == f64 and m.activation == "relu"
    assert m(torch.randn(2, 3, dtype=f64)).dtype == f64
    m = batchops.Linear(3, 4, False, None, f16)  # positional like nn.Linear
    assert m.bias is None and m.weight.dtype == f16


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_grouped_linear_module_init(bias):
    # one group: bitwise nn.Linear's initialisation for the same seed
    torch.manual_seed(7)
    ref = nn.Linear(13, 7, bias=bias)
    torch.manual_seed(7)
    one = batchops.GroupedLinear(1, 13, 7, bias=bias)
    assert torch.equal(one.weight[0], ref.weight)
    if bias:
        assert torch.equal(one.bias[0], ref.bias)
    # several groups: each group drawn as nn.Linear draws its own, uniform in +-1/sqrt(in)
    G, K, N = 3, 300, 40
    torch.manual_seed(7)
    m = batchops.GroupedLinear(G, K, N, bias=bias)
    torch.manual_seed(7)
    expected = torch.stack([nn.init.kaiming_uniform_(torch.empty(N, K), a=math.sqrt(5)) for _ in range(G)])
    assert torch.equal(m.weight, expected)
    bound = 1 / math.sqrt(K)
    for g in range(G):
        wg = m.weight[g]
        assert wg.abs().max() <= bound and wg.abs().max() > 0.99 * bound
        assert abs(wg.std().item() - bound / math.sqrt(3)) < 0.03 * bound
        if g:
            assert not torch.equal(wg, m.weight[0])
    if bias:
        assert m.bias.shape == (G, N)
        assert m.bias.abs().max() <= bound and m.bias.abs().max() > 0.9 * bound
        assert not torch.equal(m.bias[0], m.bias[1])
    else:
        assert m.bias is None


def test_grouped_linear_module_state_dict_repr_and_arguments():
    m = batchops.GroupedLinear(3, 4, 5)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (3, 5, 4) and m.bias.shape == (3, 5)
    assert list(batchops.GroupedLinear(3, 4, 5, bias=False).state_dict()) == ["weight"]
    assert m.extra_repr() == "num_groups=3, in_features=4, out_features=5, bias=True"
    assert (
        repr(batchops.GroupedLinear(2, 4, 5, bias=False, activation="gelu_tanh"))
        == "GroupedLinear(num_groups=2, in_features=4, out_features=5, bias=False, activation='gelu_tanh')"
    )
    other = batchops.GroupedLinear(3, 4, 5, activation="relu")
    other.load_state_dict(m.state_dict())
    _state_dict_equal(other.state_dict(), m.state_dict())
    d = batchops.GroupedLinear(2, 3, 4, dtype=f64)
    assert d.weight.dtype == f64 and d.bias.dtype == f64
    for bad in (2.0, True, None):
        with pytest.raises(TypeError):
            batchops.GroupedLinear(bad, 3, 4)
    with pytest.raises(ValueError):
        batchops.GroupedLinear(2, -1, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "silu"], ids=_act_id)
def test_grouped_linear_module_forward(device, activation):
    m = batchops.GroupedLinear(3, 13, 7, device=device, dtype=f64, activation=activation)
    sizes = [4, 0, 6]
    x = _randn((10, 13), device, f64)
    ref = torch_grouped(x, m.weight.detach(), m.bias.detach(), sizes, activation)
    for gs in (sizes, torch.tensor(sizes), torch.tensor(sizes, dtype=torch.int32)):
        torch.testing.assert_close(m(x, gs), ref)
        torch.testing.assert_close(m(x, group_sizes=gs), ref)
    xu = _randn((3, 2, 5, 13), device, f64)
    torch.testing.assert_close(m(xu), torch_grouped(xu, m.weight.detach(), m.bias.detach(), None, activation))
    # parameters get gradients
    m(x, sizes).sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    assert torch.equal(m.weight.grad[1], torch.zeros_like(m.weight.grad[1]))


# ---------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device, dynamo_reset):
    """fullgraph: dense gelu and ragged grouped silu with a tensor group_sizes, forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(x, w, b, xg, wg, bg, gs):
        y = BF.linear(x, w, b, activation="gelu")
        z = BF.grouped_linear(xg, wg, bg, gs, activation="silu")
        return y, z

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    d = dense_inputs((2, 5, 13), 7, device, f32)
    sizes = [3, 0, 6, 1]
    g = grouped_inputs((sum(sizes), 13), 4, 7, device, f32)
    gs = torch.tensor(sizes, device=device)
    results = []
    for fn in (f, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (d["x"], d["w"], d["b"], g["x"], g["w"], g["b"])]
        y, z = fn(*leaves[:3], *leaves[3:], gs)
        ((y * d["gy"]).sum() + (z * g["gy"]).sum()).backward()
        results.append([y.detach(), z.detach(), *(t.grad for t in leaves)])
    for i, (e, c) in enumerate(zip(*results)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"result {i}: {m}")
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------
# Autocast


def _autocast_run(fn, module_params, x, gy, device, autocast_dtype):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in module_params]
    with torch.autocast(device, dtype=autocast_dtype):
        y = fn(x, *params)
    y.backward(gy.to(y.dtype))
    return dict(y=y.detach(), gx=x.grad, **{f"g{i}": p.grad for i, p in enumerate(params)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", [bf16, f16], ids=_dtype_id)
@pytest.mark.parametrize("param_dtype", [f32, f16], ids=lambda d: f"{_dtype_id(d)}_params")
@pytest.mark.parametrize("mode", ["dense", "ragged"])
def test_autocast(device, autocast_dtype, param_dtype, mode):
    """Under autocast the output has the autocast dtype (as F.linear's), gradients the parameters'
    dtype, and the error is at most twice torch's own under the same autocast (+ a floor)."""
    if mode == "dense":
        m = batchops.Linear(13, 7, device=device, dtype=param_dtype, activation="gelu")
        x = _randn((2, 5, 13), device, f32)

        def ours(x, w, b):
            return BF.linear(x, w, b, activation="gelu")

        def theirs(x, w, b):
            return F.gelu(F.linear(x, w, b))

        def module(x):
            return m(x)
    else:
        sizes = [4, 0, 6]
        m = batchops.GroupedLinear(3, 13, 7, device=device, dtype=param_dtype, activation="gelu")
        x = _randn((10, 13), device, f32)

        def ours(x, w, b):
            return BF.grouped_linear(x, w, b, sizes, activation="gelu")

        def theirs(x, w, b):
            return torch_grouped(x, w, b, sizes, "gelu")

        def module(x):
            return m(x, sizes)

    params = [m.weight, m.bias]
    gy = _randn((*x.shape[:-1], 7), device, f32)
    with torch.autocast(device, dtype=autocast_dtype):
        y_module = module(x)
    assert y_module.dtype == autocast_dtype
    a = _autocast_run(ours, params, x, gy, device, autocast_dtype)
    t = _autocast_run(theirs, params, x, gy, device, autocast_dtype)
    torch.testing.assert_close(y_module, a["y"], rtol=0, atol=0)
    # float64 reference without autocast
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = theirs(x64, *p64)
    y64.backward(gy.double())
    ref = dict(y=y64.detach(), gx=x64.grad, g0=p64[0].grad, g1=p64[1].grad)
    assert a["y"].dtype == t["y"].dtype == autocast_dtype
    floor = HALF_FLOOR[bf16 if bf16 in (autocast_dtype, param_dtype) else f16]
    for key in ref:
        assert a[key].dtype == t[key].dtype, key
        err_ours = (a[key].double() - ref[key]).abs().max().item()
        err_torch = (t[key].double() - ref[key]).abs().max().item()
        bound = 2 * err_torch + floor * max(1.0, ref[key].abs().max().item())
        assert err_ours <= bound, f"{key}: batchops error {err_ours:.3g} > {bound:.3g} (torch's error {err_torch:.3g})"


# ---------------------------------------------------------------------------------------
# Determinism


def _fwd_bwd(fn, inputs, **kw):
    out = evaluate(fn, **inputs, **kw)
    return [out[k] for k in ("y", "gx", "gw", "gb")]


THREAD_CASES = {
    # ragged: fixed row blocks, block-ordered bias sums; grad_weight is split along out_features
    # when there are fewer groups than 2 x threads (few_groups: 1, 2, 3 column chunks)
    "ragged_many_groups": ("ragged", [300, 0, 257, 5, 130, 1]),
    "ragged_few_groups": ("ragged", [600, 301]),
    "dense": ("dense", None),
    "uniform": ("uniform", None),
}


def _at_thread_counts(fn, counts=(1, 2, 3)):
    """{threads: fn()} for each thread count, restoring torch's setting afterwards."""
    original = torch.get_num_threads()
    try:
        results = {}
        for threads in counts:
            torch.set_num_threads(threads)
            results[threads] = fn()
    finally:
        torch.set_num_threads(original)
    assert torch.get_num_threads() == original
    return results


@pytest.mark.parametrize("activation", ["gelu", "relu", None], ids=_act_id)
@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_deterministic_across_thread_counts(activation, case):
    """What batchops computes does not depend on the thread count. Ragged groups: every result
    bitwise (fixed row blocks, each multiplied by single-threaded BLAS, bias gradient summed
    block by block in order). Dense and uniform layers are one multi-threaded BLAS product
    (torch's mm / bmm), whose bits can depend on the thread count on some processors (MKL on
    an AMD EPYC does), and the activation's derivative saved from it carries that into the
    bias gradient; so there the whole result is compared with a tolerance, and our part, the
    backward epilogue and its bias-gradient sum, bitwise on the same saved inputs."""
    mode, sizes = THREAD_CASES[case]
    if mode == "ragged":
        inputs, fn, kw = (
            grouped_inputs((sum(sizes), 16), len(sizes), 24, "cpu", f32),
            ours_grouped,
            dict(group_sizes=sizes),
        )
    elif mode == "dense":
        inputs, fn, kw = dense_inputs((700, 16), 24, "cpu", f32), ours_linear, {}
    else:
        inputs, fn, kw = grouped_inputs((3, 300, 16), 3, 24, "cpu", f32), ours_grouped, {}
    inputs["x"] = inputs["x"] * 3 + 1  # a non-zero mean: a different summation order would show
    results = _at_thread_counts(lambda: _fwd_bwd(fn, inputs, activation=activation, **kw))
    for threads in (2, 3):
        one, other = results[1], results[threads]
        for i, name in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
            if mode == "ragged":
                assert torch.equal(one[i], other[i]), f"{name} differs between 1 and {threads} threads"
            else:
                torch.testing.assert_close(one[i], other[i], rtol=1e-5, atol=1e-5)
    if mode == "ragged":
        return
    # Our epilogue alone: the same forward outputs (computed once) into the backward op.
    x, w, b, gy = inputs["x"], inputs["w"], inputs["b"], inputs["gy"]
    if mode == "dense":
        output, saved = torch.ops.batchops.linear_forward(x, w, b, activation, True)
        backward = lambda: torch.ops.batchops.linear_backward(  # noqa: E731
            gy, x, w, b, output, saved, activation, [False, False, True]
        )[2]
    else:
        output, saved, _ = torch.ops.batchops.grouped_linear_forward(x, w, b, None, activation, True)
        backward = lambda: torch.ops.batchops.grouped_linear_backward(  # noqa: E731
            gy, x, w, b, None, output, saved, activation, [False, False, True]
        )[2]
    bias_grads = _at_thread_counts(backward)
    for threads in (2, 3):
        assert torch.equal(bias_grads[1], bias_grads[threads]), (
            f"bias gradient from the same saved inputs differs between 1 and {threads} threads"
        )


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat(device):
    sizes = [300, 0, 257, 5]
    inputs = grouped_inputs((sum(sizes), 16), len(sizes), 24, device, f32)
    first = _fwd_bwd(ours_grouped, inputs, group_sizes=sizes, activation="silu")
    second = _fwd_bwd(ours_grouped, inputs, group_sizes=sizes, activation="silu")
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two identical calls"


# ---------------------------------------------------------------------------------------
# CPU instruction-set levels (tests.helpers.cap_cpu_isa, which caps the level the epilogues
# use): every level the processor has is checked.


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=_dtype_id)
@pytest.mark.parametrize("mode", ["dense", "uniform", "ragged"])
def test_cpu_isa_levels(monkeypatch, isa, dtype, mode):
    cap_cpu_isa(monkeypatch, isa)
    N = 37  # vector body plus a remainder at every width
    if mode == "dense":
        inputs, impls, kw = dense_inputs((50, 13), N, "cpu", dtype), (ours_linear, torch_linear), {}
    elif mode == "uniform":
        inputs, impls, kw = grouped_inputs((2, 25, 13), 2, N, "cpu", dtype), (ours_grouped, torch_grouped), {}
    else:
        sizes = [20, 0, 30]
        inputs = grouped_inputs((50, 13), 3, N, "cpu", dtype)
        impls, kw = (ours_grouped, torch_grouped), dict(group_sizes=sizes)
    for activation in ACTIVATIONS:
        if dtype == f32:
            check_vs_float64(*impls, inputs, dtype, activation=activation, **kw)
        else:
            check_half(*impls, inputs, dtype, activation=activation, **kw)


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_cpu_gelu_epilogue_over_a_wide_range(monkeypatch, isa):
    """The float GELU epilogue (intrinsics on AVX2 and AVX-512: exp as 2^t clamped far out, a
    reciprocal estimate plus a Newton step) against float64 torch over pre-activations from -40 to
    40, value and saved derivative (through backward), in every lane position (N = 37); and at
    +-1e30 and +-inf: values as torch's (gelu(inf) = inf, gelu(-inf) = NaN; the intrinsics once
    gave NaN at +inf, rcp(inf) in their Newton step), derivatives at +-1e30 as torch's and at
    +-inf not finite (torch's NaN; the generic path's exp clamps, giving +-inf)."""
    cap_cpu_isa(monkeypatch, isa)
    N = 37
    far = torch.tensor([1e30, -1e30, float("inf"), -float("inf")])
    x = torch.cat([torch.linspace(-40.0, 40.0, 4001), far]).to(f32).unsqueeze(1)  # K = 1: pre = x * w + b
    w = torch.ones(N, 1, dtype=f32)
    b = torch.linspace(-0.5, 0.5, N, dtype=f32)
    x.requires_grad_()
    y = BF.linear(x, w, b, activation="gelu")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) / N)
    pre = (x.detach() * w.T + b).double().requires_grad_()  # the float32 pre-activations, exactly
    ref = F.gelu(pre)
    (ref_gx,) = torch.autograd.grad(ref, pre, torch.ones_like(ref) / N)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-6, atol=1e-6, equal_nan=True)
    finite = x.detach().isfinite().squeeze(1)
    torch.testing.assert_close(gx[finite].double(), ref_gx.sum(1, keepdim=True)[finite], rtol=2e-6, atol=1e-6)
    assert not gx[~finite].isfinite().any()


@pytest.mark.cuda
def test_cuda_more_than_65535_groups():
    """reduce_bias_kernel strides groups over gridDim.y (capped at 65535) instead of one block
    row per group."""
    G, K, N = 70_000, 4, 3
    sizes = torch.zeros(G, dtype=torch.int64)
    sizes[::7] = 1
    sizes[-1] = 2  # the last group, past 65535, has rows
    inputs = grouped_inputs((int(sizes.sum()), K), G, N, "cuda", f64)
    ours = evaluate(ours_grouped, **inputs, group_sizes=sizes, activation="gelu")
    group_of_row = torch.repeat_interleave(torch.arange(G), sizes).cuda()
    x, w, b = inputs["x"], inputs["w"], inputs["b"]
    pre = torch.einsum("rk,rnk->rn", x, w[group_of_row]) + b[group_of_row]
    torch.testing.assert_close(ours["y"], F.gelu(pre))
    pre_leaf = pre.detach().requires_grad_()
    F.gelu(pre_leaf).backward(inputs["gy"])
    expected_gb = torch.zeros(G, N, dtype=f64, device="cuda").index_add(0, group_of_row, pre_leaf.grad)
    torch.testing.assert_close(ours["gb"], expected_gb)


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["list", "cpu_tensor"])
def test_cuda_host_group_sizes_do_not_synchronise(form):
    """Group sizes given on the host reach the GPU through pinned memory without blocking: no
    host synchronisation in forward or backward (torch's sync debug mode raises on one)."""
    sizes = [5, 0, 7, 3]
    inputs = grouped_inputs((sum(sizes), 8), len(sizes), 6, "cuda", f32)
    gs = sizes if form == "list" else torch.tensor(sizes)
    x, w, b = (inputs[k].detach().requires_grad_() for k in ("x", "w", "b"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = BF.grouped_linear(x, w, b, gs, activation="silu")
        y.backward(inputs["gy"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = evaluate(ours_grouped, **inputs, group_sizes=torch.tensor(sizes).cuda(), activation="silu")
    torch.testing.assert_close(y, expected["y"])
    torch.testing.assert_close(b.grad, expected["gb"])
