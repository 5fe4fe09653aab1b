"""Batch norm: batchops.functional.batch_norm, the torch.ops.batchops ops, and the
BatchNorm1d/2d/3d modules, checked against torch on every device in DEVICES.

References: torch.nn.functional.batch_norm (+ torch's activation, residual added before it)
run in float64 on copies of the inputs, and a pure-PyTorch float64 formula (`manual_reference`)
where torch's own float64 result is not accurate enough (x = 1e4 + noise).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchops
from batchops import functional as BF
from batchops.nn._compat import make_norm  # torch 2.11's constructors lack bias=

from tests.helpers import ACTIVATIONS, DEVICES, ISA_LEVELS, TORCH_ACT, cap_cpu_isa
from tests.helpers import dtype_id as _dtype_id

pytestmark = pytest.mark.usefixtures("kernels")

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def tol(dtype: torch.dtype, grad: bool = False) -> dict:
    """assert_close tolerances for a result computed in `dtype` vs a float64 reference."""
    if dtype == f64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype == f32:
        return dict(rtol=1e-4, atol=1e-4 if grad else 1e-5)
    raise AssertionError(dtype)


# ---------------------------------------------------------------------------------------
# References and a harness that runs an implementation on copies of the inputs


def ours_impl(x, rm, rv, w, b, training, momentum, eps, activation=None, residual=None):
    return BF.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation=activation, residual=residual)


def torch_impl(x, rm, rv, w, b, training, momentum, eps, activation=None, residual=None):
    """torch's batch norm, then the residual, then torch's activation (what batchops fuses)."""
    if isinstance(momentum, torch.Tensor):
        momentum = float(momentum)
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return TORCH_ACT[activation](y)


def manual_reference(x, rm, rv, w, b, training, momentum, eps, activation=None, residual=None, shift=0.0):
    """Pure-PyTorch float64 batch norm. Updates rm / rv in place like torch (unbiased
    variance). `shift` is subtracted first (exactly, for x near it) so that the statistics of
    x = 1e4 + noise are computed without cancellation."""
    assert x.dtype == f64
    if isinstance(momentum, torch.Tensor):
        momentum = float(momentum)
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    view = [1, C] + [1] * (x.dim() - 2)
    d = x - shift
    if training:
        mean_d = d.mean(dims)
        var = d.var(dims, unbiased=False)
        n = x.numel() // C
        if rm is not None:
            with torch.no_grad():
                rm.mul_(1 - momentum).add_(momentum * (mean_d.detach() + shift))
                rv.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1))
    else:
        mean_d, var = rm - shift, rv
    y = (d - mean_d.view(view)) / torch.sqrt(var.view(view) + eps)
    if w is not None:
        y = y * w.view(view)
    if b is not None:
        y = y + b.view(view)
    if residual is not None:
        y = y + residual
    return TORCH_ACT[activation](y)


def evaluate(
    impl,
    x,
    rm=None,
    rv=None,
    w=None,
    b=None,
    z=None,
    gy=None,
    *,
    training,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    cast=None,
    **kw,
):
    """Run `impl` on fresh copies (cast to `cast` when given; layouts kept otherwise) and
    return its output, the gradients of x / w / b / z w.r.t. <output, gy>, and the updated
    running statistics."""

    def leaf(t):
        if t is None:
            return None
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        return t.detach().requires_grad_(True)

    def copy_stat(t):
        if t is None:
            return None
        t = t.detach().clone()
        return t.to(cast) if cast is not None else t

    xs, ws, bs, zs = leaf(x), leaf(w), leaf(b), leaf(z)
    rms, rvs = copy_stat(rm), copy_stat(rv)
    y = impl(xs, rms, rvs, ws, bs, training, momentum, eps, activation=activation, residual=zs, **kw)
    names = [n for n, t in zip("xwbz", (xs, ws, bs, zs)) if t is not None]
    leaves = [t for t in (xs, ws, bs, zs) if t is not None]
    if gy is None:
        gy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    gy = gy.to(y.dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    return dict(y=y.detach(), rm=rms, rv=rvs, **{f"g{n}": g for n, g in zip(names, grads)})


def assert_results_close(ours, ref, dtype, keys=None):
    for key in keys or ref:
        o, r = ours[key], ref[key]
        if r is None:
            assert o is None, key
            continue
        assert o.shape == r.shape, key
        assert o.device == r.device, key
        t = tol(dtype, grad=key.startswith("g"))
        torch.testing.assert_close(o.double(), r.double(), **t, msg=lambda m: f"{key}: {m}")


def make_inputs(shape, device, dtype=f64, *, weight=True, bias=True, running=True, residual=False, param_dtype=None):
    """Inputs with a non-trivial mean and scale; per-channel tensors in param_dtype (default dtype)."""
    C = shape[1]
    pd = param_dtype or dtype
    x = (torch.randn(shape, dtype=f64) * 1.7 + 0.4).to(device=device, dtype=dtype)
    return dict(
        x=x,
        w=(torch.rand(C, dtype=f64) + 0.5).to(device=device, dtype=pd) if weight else None,
        b=torch.randn(C, dtype=f64).to(device=device, dtype=pd) if bias else None,
        rm=(torch.randn(C, dtype=f64) * 0.3).to(device=device, dtype=pd) if running else None,
        rv=(torch.rand(C, dtype=f64) + 0.5).to(device=device, dtype=pd) if running else None,
        z=torch.randn(shape, dtype=f64).to(device=device, dtype=dtype) if residual else None,
        gy=torch.randn(shape, dtype=f64).to(device=device, dtype=dtype),
    )


def check_vs_torch(inputs, dtype, **kwargs):
    """Ours (in the inputs' dtype) against torch in float64 on the upcast inputs."""
    ours = evaluate(ours_impl, **inputs, **kwargs)
    ref = evaluate(torch_impl, **inputs, cast=f64, **kwargs)
    assert ours["y"].dtype == inputs["x"].dtype
    assert_results_close(ours, ref, dtype)
    return ours, ref


# ---------------------------------------------------------------------------------------
# Functional API vs torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_functional_matches_torch(device, dtype, training, activation, residual):
    inputs = make_inputs((4, 5, 3, 2), device, dtype, residual=residual)
    ours, _ = check_vs_torch(inputs, dtype, training=training, activation=activation)
    if not training:  # eval never touches the running statistics
        assert torch.equal(ours["rm"], inputs["rm"]) and torch.equal(ours["rv"], inputs["rv"])


def _inputs_with_nan_residual(device, layout: str) -> dict:
    """float32 inputs with a residual holding NaN at every 7th value: NaN pre-activations there,
    finite batch statistics. 80 channels: vector loops and tails."""
    inputs = make_inputs((4, 80, 3, 3), device, f32, residual=True)
    inputs["z"].view(-1)[::7] = float("nan")
    return _inputs_channels_last(inputs) if layout == "channels_last" else inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_relu_gradient_at_nan_is_torchs(device, training, layout):
    """A NaN pre-activation (here from the residual) passes the gradient through ReLU, as
    torch's relu backward does (its mask is `output <= 0`, false at NaN): grad_residual is the
    incoming gradient there and the batch norm's gradients are finite."""
    inputs = _inputs_with_nan_residual(device, layout)
    ours = evaluate(ours_impl, **inputs, training=training, activation="relu")
    ref = evaluate(torch_impl, **inputs, cast=f64, training=training, activation="relu")
    nan = inputs["z"].isnan()
    torch.testing.assert_close(ours["gz"][nan], inputs["gy"][nan])
    assert ours["gx"].isfinite().all() and ours["gw"].isfinite().all()
    for key in ("y", "gx", "gw", "gb", "gz"):
        t = tol(f32, grad=key.startswith("g"))
        torch.testing.assert_close(ours[key].double(), ref[key], equal_nan=True, **t, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_nan_pre_activation_is_nan_through_the_activation(device, training, layout, activation):
    """The CPU's float exp and tanh (common/activation.h) clamp NaN to a bound, so a NaN
    pre-activation must come out NaN through x itself: the output and grad_residual are NaN
    exactly where torch's are (and the channel's grad_input, through the gradient sums)."""
    inputs = _inputs_with_nan_residual(device, layout)
    ours = evaluate(ours_impl, **inputs, training=training, activation=activation)
    ref = evaluate(torch_impl, **inputs, cast=f64, training=training, activation=activation)
    nan = inputs["z"].isnan()
    assert ours["y"][nan].isnan().all() and ours["gz"][nan].isnan().all()
    for key in ("y", "gx", "gw", "gb", "gz"):
        assert torch.equal(ours[key].isnan(), ref[key].isnan()), key
        t = tol(f32, grad=key.startswith("g"))
        torch.testing.assert_close(ours[key].double(), ref[key], equal_nan=True, **t, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("C", [12, 32, 40])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activation_gradient_without_residual_in_every_backward_path(device, dtype, training, layout, C, activation):
    """Without a residual, the CPU backward stores g = dy * act'(pre) in grad_input during the
    sums pass and finishes grad_input in place for silu / gelu / gelu_tanh, where the rows
    passes have no overlapping last vector (C <= 16 or a multiple of 16: 12, 32), and recomputes
    g otherwise (40 channels-last; ReLU everywhere). Every case against torch, with the
    parameters' gradients and without weight and bias (grad_input alone: in training the sums
    pass still runs, in eval it does not)."""
    inputs = make_inputs((3, C, 5, 3), device, dtype)
    if layout == "channels_last":
        inputs = _inputs_channels_last(inputs)
    ref = evaluate(torch_impl, **inputs, cast=f64, training=training, activation=activation)
    ours = evaluate(ours_impl, **inputs, training=training, activation=activation)
    assert_results_close(ours, ref, dtype, keys=("y", "gx", "gw", "gb"))
    no_affine = {**inputs, "w": None, "b": None}
    ref = evaluate(torch_impl, **no_affine, cast=f64, training=training, activation=activation)
    ours = evaluate(ours_impl, **no_affine, training=training, activation=activation)
    assert_results_close(ours, ref, dtype, keys=("y", "gx"))


def test_manual_reference_agrees_with_torch():
    """The pure-PyTorch reference used below is itself checked against torch."""
    inputs = make_inputs((4, 5, 3, 2), "cpu", f64, residual=True)
    for training in (True, False):
        a = evaluate(manual_reference, **inputs, training=training, activation="gelu")
        b = evaluate(torch_impl, **inputs, training=training, activation="gelu")
        assert_results_close(a, b, f64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "weight,bias", [(True, True), (True, False), (False, True), (False, False)], ids=["wb", "w", "b", "none"]
)
@pytest.mark.parametrize(
    "training,running", [(True, True), (True, False), (False, True)], ids=["train", "train_nostats", "eval"]
)
def test_functional_optional_arguments(device, weight, bias, training, running):
    inputs = make_inputs((3, 4, 5), device, f64, weight=weight, bias=bias, running=running)
    ours, _ = check_vs_torch(inputs, f64, training=training)
    assert ("gw" in ours) == weight and ("gb" in ours) == bias


@pytest.mark.parametrize("device", DEVICES)
def test_functional_updates_running_stats_in_place(device):
    inputs = make_inputs((4, 3, 5), device, f32)
    rm, rv = inputs["rm"].clone(), inputs["rv"].clone()
    ptr_m, ptr_v = rm.data_ptr(), rv.data_ptr()
    BF.batch_norm(inputs["x"], rm, rv, training=True, momentum=0.2)
    ref_m, ref_v = inputs["rm"].clone(), inputs["rv"].clone()
    F.batch_norm(inputs["x"], ref_m, ref_v, training=True, momentum=0.2)
    assert rm.data_ptr() == ptr_m and rv.data_ptr() == ptr_v
    assert rm.dtype == f32 and rv.dtype == f32
    torch.testing.assert_close(rm, ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, ref_v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(rm, inputs["rm"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["float", "tensor_f64", "tensor_f32"])
def test_momentum(device, momentum, kind):
    inputs = make_inputs((5, 3, 4), device, f64)
    if kind == "float":
        m = momentum
    else:
        m = torch.tensor(momentum, dtype=f64 if kind == "tensor_f64" else f32, device=device)
        assert m.dim() == 0
    ours = evaluate(ours_impl, **inputs, training=True, momentum=m)
    ref = evaluate(torch_impl, **inputs, training=True, momentum=float(m))
    assert_results_close(ours, ref, f64)
    if momentum == 0.0:
        assert torch.equal(ours["rm"], inputs["rm"]) and torch.equal(ours["rv"], inputs["rv"])


# ---------------------------------------------------------------------------------------
# Shapes and memory formats

# (shape, activation, residual): channels that are not powers of two, few channels with a
# large H*W (more than one 4096-element piece per (n, c) run), batch 2, 2-D to 5-D, size-1
# spatial dims, many rows in the (N, C) view (several row blocks), rows wider than one column
# chunk (2048 channels) with a remainder, more small planar channels than one block holds, rows
# of one tile.
SHAPES = [
    ((2, 3), None, False),
    ((9, 2051), "relu", True),
    ((64, 1), "gelu", False),
    ((5, 7), "relu", True),
    ((2, 37), "gelu", False),
    ((3000, 5), "silu", True),
    ((2, 5, 7), None, True),
    ((3, 37, 11), "gelu_tanh", False),
    ((2, 3, 64, 64), None, False),
    ((2, 3, 65, 67), "silu", True),
    ((2, 7, 3, 5), "relu", False),
    ((4, 3, 1, 1), "gelu", True),
    ((4, 3, 1), None, False),
    ((2, 3, 4, 5, 6), "gelu_tanh", True),
    ((3, 5, 1, 1, 1), None, False),
    ((1, 3, 5), "silu", False),
    ((6, 1, 8), "relu", True),
    ((4, 300, 3, 5), "relu", True),  # small channels: blocks of whole channels, the last one short
    # eval on runs of whole vectors up to 64 values goes run by run (4x4, 4x8, 8x8 maps; several
    # threads' ranges); on other runs of up to 16 values by chunks of channels (256 values):
    # several chunks, the last short
    ((16, 130, 4, 4), "silu", True),
    ((3, 5, 4, 8), "gelu", True),
    ((1, 70, 8, 8), "relu", False),
    ((5, 40, 3, 3), "hardswish", False),
    ((4, 300, 1, 1), "relu6", True),
    # eval on planar runs longer than a vector and not a multiple of it walks the tensor flat:
    # vectors across two channels' runs, threads starting mid-run (over 4096 values), a tail;
    # 14x14 with a residual, the training passes there (run by run)
    ((4, 33, 7, 7), "silu", True),
    ((3, 5, 17), "relu6", False),
    ((4, 21, 14, 14), "relu", True),
    # the backward's sums on short planar runs go channel by channel (no residual gradient):
    # channels in several tasks
    ((16, 300, 4, 4), "relu", False),
    # ... and on longer runs too, from 32 channels on (one channel a task), as the training
    # forward does (its statistics, then the normalisation): runs of several vectors, and runs
    # over 4096 values (taken in pieces); with a residual only the forward walks
    ((2, 40, 50, 50), "relu", False),
    ((1, 32, 70, 70), None, False),
    ((3, 33, 20, 20), "silu", True),
    # rows of one 256- or 512-byte tile (64 or 128 float / 32 or 64 double channels: statistics
    # and gradient sums in registers), in several row blocks, the last one short
    ((600, 64), "relu", True),
    ((1100, 32), "gelu", False),
    ((300, 128), "silu", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32], ids=_dtype_id)
@pytest.mark.parametrize(
    "shape,activation,residual", SHAPES, ids=[f"{'x'.join(map(str, s))}-{a}{'-res' if r else ''}" for s, a, r in SHAPES]
)
def test_shapes(device, dtype, shape, activation, residual):
    inputs = make_inputs(shape, device, dtype, residual=residual)
    ours, _ = check_vs_torch(inputs, dtype, training=True, activation=activation)
    assert ours["y"].is_contiguous()
    check_vs_torch(inputs, dtype, training=False, activation=activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(6, 130, 4, 4), (4, 300, 3, 3), (5, 40, 7, 7), (4, 33, 20, 20)], ids=str)
def test_eval_sample_does_not_depend_on_its_batch(device, dtype, shape):
    """Eval normalises each value with fixed constants: a sample's output is the same bits
    whether it comes alone or in a batch, with a fused residual and activation too (3x3 runs go
    run by run below 4 samples and by chunks of channels from 4 on; 4x4 whole-vector runs, 7x7
    and 20x20 the flat walk with its vectors across runs and its tail)."""
    inputs = make_inputs(shape, device, dtype, residual=True)
    args = (inputs["rm"], inputs["rv"], inputs["w"], inputs["b"], False, 0.1, 1e-5)
    batch = BF.batch_norm(inputs["x"], *args, activation="gelu", residual=inputs["z"])
    for n in range(shape[0]):
        alone = BF.batch_norm(inputs["x"][n : n + 1], *args, activation="gelu", residual=inputs["z"][n : n + 1])
        assert torch.equal(alone, batch[n : n + 1]), f"sample {n}"


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _inputs_channels_last(inputs: dict) -> dict:
    """make_inputs' tensors with the 4-D ones (x, z, gy) channels-last, the rest as they are."""
    return {k: (_channels_last(v) if v is not None and v.dim() == 4 else v) for k, v in inputs.items()}


def _channels_last_3d(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


# name -> (make x from a contiguous float64 tensor, base shape, expected output memory format,
#          make the residual (None = same layout as x))
LAYOUTS = {
    "channels_last": (_channels_last, (2, 5, 4, 3), torch.channels_last, None),
    "channels_last_3d": (_channels_last_3d, (2, 3, 4, 3, 2), torch.channels_last_3d, None),
    "channels_last_1x1": (_channels_last, (4, 3, 1, 1), torch.contiguous_format, None),
    "channels_last_contiguous_residual": (_channels_last, (2, 6, 3, 5), torch.channels_last, lambda t: t.contiguous()),
    "contiguous_channels_last_residual": (lambda t: t, (2, 6, 3, 5), torch.contiguous_format, _channels_last),
    "transposed_3d": (lambda t: t.transpose(1, 2), (2, 7, 5), torch.contiguous_format, None),
    "transposed_2d": (lambda t: t.t(), (6, 9), torch.contiguous_format, None),
    "sliced_4d": (lambda t: t[:, ::2, 1:4, :], (3, 10, 5, 4), torch.contiguous_format, None),
    "permuted_5d": (lambda t: t.permute(0, 1, 4, 2, 3), (2, 3, 4, 5, 2), torch.contiguous_format, None),
    "expanded_4d": (lambda t: t[:, :, :1, :].expand(-1, -1, 3, -1), (3, 4, 1, 5), torch.contiguous_format, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_memory_formats(device, training, layout):
    to_layout, shape, expected_format, residual_layout = LAYOUTS[layout]
    base = make_inputs(shape, device, f64, residual=True)
    x = to_layout(base["x"])
    z = to_layout(base["z"])
    if residual_layout is not None:
        z = residual_layout(z)
    inputs = make_inputs(tuple(x.shape), device, f64)  # per-channel tensors for the view's C
    inputs.update(x=x, z=z)
    assert z.shape == x.shape
    if layout not in ("channels_last_1x1", "contiguous_channels_last_residual"):
        assert not x.is_contiguous()
    ours, _ = check_vs_torch(inputs, f64, training=training, activation="silu")
    # output and input gradient (as autograd.grad returns it) keep the input's memory format
    assert ours["y"].is_contiguous(memory_format=expected_format), ours["y"].stride()
    assert ours["gx"].is_contiguous(memory_format=expected_format), ours["gx"].stride()
    if expected_format != torch.contiguous_format:
        assert not ours["y"].is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("gy_kind", ["expanded", "contiguous", "channels_last", "transposed"])
def test_grad_output_layouts(device, x_format, gy_kind):
    """Whatever layout the incoming gradient has (y.sum() gives an expanded one), the
    gradients match torch's."""
    shape = (3, 4, 5, 2)
    inputs = make_inputs(shape, device, f64, residual=True)
    if x_format == "channels_last":
        inputs["x"] = _channels_last(inputs["x"])
    gy = {
        "expanded": torch.tensor(1.5, dtype=f64, device=device).expand(shape),
        "contiguous": inputs["gy"],
        "channels_last": _channels_last(inputs["gy"]),
        "transposed": inputs["gy"].transpose(2, 3).contiguous().transpose(2, 3),
    }[gy_kind]
    inputs["gy"] = gy
    for training in (True, False):
        check_vs_torch(inputs, f64, training=training, activation="gelu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64], ids=_dtype_id)
def test_contiguous_in_contiguous_out(device, dtype):
    for shape in [(4, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]:
        x = torch.randn(shape, dtype=dtype, device=device)
        y = BF.batch_norm(x, None, None, training=True)
        assert y.is_contiguous() and y.stride() == x.stride()


# ---------------------------------------------------------------------------------------
# Large means: x = 1e4 + noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64], ids=_dtype_id)
@pytest.mark.parametrize("layout", ["planar", "channels_last", "channels_last_tile", "rows"])
def test_mean_offset(device, dtype, layout):
    # channels_last_tile: rows of 256 bytes of the accumulation type (64 float or 32 double
    # channels), whose CPU statistics keep their running values in registers
    tile = 256 // torch.empty((), dtype=dtype).element_size()
    shape = {"planar": (3, 3, 70, 70), "channels_last": (4, 5, 20, 20), "channels_last_tile": (3, tile, 23, 29)}.get(
        layout, (3000, 5)
    )
    offset = 1e4
    x = (offset + torch.randn(shape, dtype=f64)).to(device=device, dtype=dtype)
    if layout.startswith("channels_last"):
        x = _channels_last(x)
    C = shape[1]
    inputs = dict(
        x=x,
        w=(torch.rand(C, dtype=f64) + 0.5).to(device=device, dtype=dtype),
        b=torch.randn(C, dtype=f64).to(device=device, dtype=dtype),
        rm=torch.full((C,), offset - 3.0, dtype=dtype, device=device),
        rv=torch.full((C,), 2.0, dtype=dtype, device=device),
        gy=torch.randn(shape, dtype=f64, device=device),
    )
    ours = evaluate(ours_impl, **inputs, training=True)
    # exact reference: x - 1e4 is exact in float64 for x near 1e4
    ref = evaluate(manual_reference, **inputs, training=True, cast=f64, shift=offset)
    if dtype == f64:
        t_out, t_grad, t_rm, t_rv = 1e-9, 1e-9, 1e-9, 1e-12
    else:
        # the float32 saved mean alone is off by up to half an ulp of 1e4 (4.9e-4)
        # and the running mean (near 1e4) can only be stored to within an ulp (9.8e-4)
        t_out, t_grad, t_rm, t_rv = 1e-3, 2e-3, 1e-3, 1e-5
    torch.testing.assert_close(ours["y"].double(), ref["y"], rtol=0, atol=t_out)
    for g in ("gx", "gw", "gb"):
        scale = max(1.0, ref[g].abs().max().item())
        torch.testing.assert_close(ours[g].double(), ref[g], rtol=0, atol=t_grad * scale, msg=lambda m: f"{g}: {m}")
    torch.testing.assert_close(ours["rm"].double(), ref["rm"], rtol=0, atol=t_rm)
    torch.testing.assert_close(ours["rv"].double(), ref["rv"], rtol=0, atol=t_rv)
    # eval with running statistics near 1e4, computed as torch's eval kernel does: x * alpha + beta
    # (alpha = w * invstd, beta = b - running_mean * alpha), both terms near 1e4 * alpha (up to
    # ~1.1e4), each rounded to half an ulp of that in float32 (4.9e-4): torch's own eval output
    # is off by as much (0.6-1.0e-3 here, the same as ours)
    t_eval = t_out if dtype == f64 else 2e-3
    ours_e = evaluate(ours_impl, **inputs, training=False)
    ref_e = evaluate(manual_reference, **inputs, training=False, cast=f64, shift=offset)
    torch.testing.assert_close(ours_e["y"].double(), ref_e["y"], rtol=0, atol=t_eval)


# ---------------------------------------------------------------------------------------
# float16 / bfloat16

HALF_FLOOR = {f16: 1e-3, bf16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f16, bf16], ids=_dtype_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mixed", [False, True], ids=["half_params", "float32_params"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "silu_residual"])
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_half_precision(device, dtype, training, mixed, fused, layout):
    """Error vs float64 at most twice torch's own error in the same precision (+ a floor), in
    both views of the kernels (planar and rows, the latter channels-last)."""
    shape = (8, 6, 7, 5)
    inputs = make_inputs(shape, device, dtype, residual=fused, param_dtype=f32 if mixed else dtype)
    if layout == "channels_last":
        inputs = _inputs_channels_last(inputs)
    kwargs = dict(training=training, activation="silu" if fused else None)
    ours = evaluate(ours_impl, **inputs, **kwargs)
    theirs = evaluate(torch_impl, **inputs, **kwargs)
    ref = evaluate(torch_impl, **inputs, cast=f64, **kwargs)
    assert ours["y"].dtype == dtype
    for key in ref:
        if ref[key] is None:
            assert ours[key] is None
            continue
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        err_ours = (ours[key].double() - ref[key]).abs().max().item()
        err_torch = (theirs[key].double() - ref[key]).abs().max().item()
        bound = 2 * err_torch + HALF_FLOOR[dtype] * max(1.0, ref[key].abs().max().item())
        assert err_ours <= bound, f"{key}: batchops error {err_ours:.3g} > {bound:.3g} (torch's error {err_torch:.3g})"
    if mixed and training:
        assert ours["rm"].dtype == f32


# ---------------------------------------------------------------------------------------
# gradcheck (float64)

GRADCHECK_CASES = {
    "train": dict(training=True),
    "eval": dict(training=False),
    "relu": dict(training=True, activation="relu"),
    "silu": dict(training=True, activation="silu"),
    "gelu": dict(training=True, activation="gelu"),
    "gelu_tanh": dict(training=True, activation="gelu_tanh"),
    "residual": dict(training=True, residual=True),
    "gelu_residual_eval": dict(training=False, activation="gelu", residual=True),
    "channels_last_silu_residual": dict(training=True, activation="silu", residual=True, channels_last=True),
    "no_affine_2d": dict(training=True, affine=False, shape=(5, 4), activation="gelu_tanh"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(device, case):
    cfg = dict(GRADCHECK_CASES[case])
    shape = cfg.pop("shape", (3, 4, 3, 2))
    training = cfg.pop("training")
    activation = cfg.pop("activation", None)
    inputs = make_inputs(
        shape,
        device,
        f64,
        weight=cfg.get("affine", True),
        bias=cfg.get("affine", True),
        residual=cfg.get("residual", False),
    )
    x = inputs["x"]
    if cfg.get("channels_last"):
        x = _channels_last(x)
        inputs["z"] = _channels_last(inputs["z"])
    rm, rv = (None, None) if training else (inputs["rm"], inputs["rv"])
    tensors = [
        t.detach().clone().requires_grad_() if t is not x else x.detach().requires_grad_()
        for t in (x, inputs["w"], inputs["b"], inputs["z"])
        if t is not None
    ]
    present = [name for name, t in zip("xwbz", (x, inputs["w"], inputs["b"], inputs["z"])) if t is not None]

    def fn(*args):
        named = dict(zip(present, args))
        return BF.batch_norm(
            named["x"],
            rm,
            rv,
            named.get("w"),
            named.get("b"),
            training,
            0.1,
            1e-5,
            activation=activation,
            residual=named.get("z"),
        )

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# torch.library.opcheck on the ops


def _forward_args(
    device,
    *,
    shape=(4, 3, 5),
    dtype=f32,
    param_dtype=None,
    training=True,
    activation=None,
    residual=False,
    running=True,
    affine=True,
    momentum_tensor=False,
    memory_format=None,
    requires_grad=True,
):
    inputs = make_inputs(
        shape, device, dtype, weight=affine, bias=affine, running=running, residual=residual, param_dtype=param_dtype
    )
    x, z = inputs["x"], inputs["z"]
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
        z = z.contiguous(memory_format=memory_format) if z is not None else None
    w, b = inputs["w"], inputs["b"]
    if requires_grad:
        x.requires_grad_()
        for t in (w, b, z):
            if t is not None:
                t.requires_grad_()
    mt = torch.tensor(0.25, dtype=f64, device=device) if momentum_tensor else None
    return (x, w, b, z, inputs["rm"], inputs["rv"], training, 0.1, mt, 1e-5, activation)


FORWARD_OPCHECK = {
    "train": dict(),
    "eval_relu_residual": dict(training=False, activation="relu", residual=True),
    "train_cl_gelu_tanh_residual_momentum_tensor": dict(
        shape=(2, 3, 4, 5),
        memory_format=torch.channels_last,
        activation="gelu_tanh",
        residual=True,
        momentum_tensor=True,
    ),
    "train_f64_2d_no_affine_no_stats": dict(shape=(6, 5), dtype=f64, affine=False, running=False),
    "train_f16_f32_params_silu": dict(dtype=f16, param_dtype=f32, activation="silu"),
    "eval_bf16_cl3d_gelu": dict(
        shape=(2, 3, 2, 3, 2), dtype=bf16, training=False, activation="gelu", memory_format=torch.channels_last_3d
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FORWARD_OPCHECK))
def test_opcheck_forward(device, case):
    args = _forward_args(device, **FORWARD_OPCHECK[case])
    torch.library.opcheck(torch.ops.batchops.batch_norm_forward.default, args)


BACKWARD_OPCHECK = {
    "train_all_but_residual": (dict(), [True, True, True, False]),
    "train_input_only": (dict(), [True, False, False, False]),
    "train_params_and_residual_silu": (dict(activation="silu", residual=True), [False, True, True, True]),
    "eval_all_relu_residual": (dict(training=False, activation="relu", residual=True), [True, True, True, True]),
    "train_cl_gelu": (
        dict(shape=(2, 3, 4, 5), memory_format=torch.channels_last, activation="gelu"),
        [True, True, True, False],
    ),
    "train_f16_f32_params": (dict(dtype=f16, param_dtype=f32), [True, True, True, False]),
    "train_bf16_no_affine": (dict(dtype=bf16, affine=False, activation="gelu_tanh"), [True, False, False, False]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BACKWARD_OPCHECK))
def test_opcheck_backward(device, case):
    cfg, mask = BACKWARD_OPCHECK[case]
    fargs = _forward_args(device, requires_grad=False, **cfg)
    x, w, b, z, _rm, _rv, training, _m, _mt, _eps, activation = fargs
    _, save_mean, save_invstd, _, _ = torch.ops.batchops.batch_norm_forward(*fargs)
    gy = torch.randn_like(x)
    args = (gy, x, w, b, z, save_mean, save_invstd, training, activation, mask)
    torch.library.opcheck(torch.ops.batchops.batch_norm_backward.default, args)
    grads = torch.ops.batchops.batch_norm_backward(*args)
    expected_shapes = [x.shape, (x.shape[1],), (x.shape[1],), x.shape]
    for i, (g, requested) in enumerate(zip(grads, mask)):
        if requested:
            assert g.shape == expected_shapes[i], i
        else:
            assert g.numel() == 0, f"output {i} was not requested but has shape {tuple(g.shape)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f64, f32, bf16])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_outputs_do_not_depend_on_output_mask(device, dtype, memory_format, training):
    """Each requested gradient is the same whichever others are requested. The CPU kernel takes
    different passes by mask (with grad_residual and a sums pass, g is stored there once and
    grad_input is computed from it), so a pass that drifts from the others shows here."""
    fargs = _forward_args(
        device,
        shape=(3, 6, 5, 7),
        dtype=dtype,
        training=training,
        activation="relu",
        residual=True,
        memory_format=memory_format,
        requires_grad=False,
    )
    x, w, b, z, *_ = fargs
    _, save_mean, save_invstd, _, _ = torch.ops.batchops.batch_norm_forward(*fargs)
    gy = torch.randn_like(x)
    args = (gy, x, w, b, z, save_mean, save_invstd, training, "relu")
    full = torch.ops.batchops.batch_norm_backward(*args, [True] * 4)
    for bits in range(1, 15):
        mask = [bool(bits >> i & 1) for i in range(4)]
        grads = torch.ops.batchops.batch_norm_backward(*args, mask)
        for i in range(4):
            if mask[i]:
                torch.testing.assert_close(grads[i], full[i], msg=f"output {i}, mask {mask}")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_op_is_functional(device):
    """The op returns new running statistics and leaves its inputs alone."""
    args = _forward_args(device, requires_grad=False)
    rm, rv = args[4], args[5]
    rm0, rv0 = rm.clone(), rv.clone()
    out, save_mean, save_invstd, new_rm, new_rv = torch.ops.batchops.batch_norm_forward(*args)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    ref_rm, ref_rv = rm0.clone(), rv0.clone()
    F.batch_norm(args[0], ref_rm, ref_rv, args[1], args[2], True, 0.1, 1e-5)
    torch.testing.assert_close(new_rm, ref_rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_rv, ref_rv, rtol=1e-5, atol=1e-6)
    x = args[0]
    torch.testing.assert_close(save_mean, x.mean((0, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(save_invstd, torch.rsqrt(x.var((0, 2), unbiased=False) + 1e-5), rtol=1e-5, atol=1e-5)
    # eval: no new statistics
    eval_args = list(args)
    eval_args[6] = False
    *_, e_rm, e_rv = torch.ops.batchops.batch_norm_forward(*eval_args)
    assert e_rm.numel() == 0 and e_rv.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_forward_op_only_output_is_differentiable(device):
    """Backward takes no gradients of the statistics: they do not require grad, so a loss on them
    raises instead of silently giving the input no gradient."""
    args = _forward_args(device, requires_grad=True)
    out, save_mean, save_invstd, new_rm, new_rv = torch.ops.batchops.batch_norm_forward(*args)
    assert out.requires_grad
    assert not any(t.requires_grad for t in (save_mean, save_invstd, new_rm, new_rv))
    with pytest.raises(RuntimeError, match="does not require grad"):
        save_mean.sum().backward()


# ---------------------------------------------------------------------------------------
# The backward node (csrc/batch_norm/autograd.cpp); the mechanics every op's node shares (freed
# saved tensors, in-place detection, saved-tensor hooks, anomaly mode, forward AD refused) are
# in test_autograd_nodes.py.


@pytest.mark.parametrize("device", DEVICES)
def test_backward_node_edges(device):
    """An edge per differentiable argument (input, weight, bias, residual), an invalid one for an
    absent argument, and a gradient only for what requires one (here the weight alone)."""
    inputs = make_inputs((4, 3, 5), device, f64, bias=False, residual=True)
    w = inputs["w"].requires_grad_()
    y = BF.batch_norm(inputs["x"], None, None, w, None, True, activation="relu", residual=inputs["z"])
    assert [fn is not None for fn, _ in y.grad_fn.next_functions] == [False, True, False, False]
    (gw,) = torch.autograd.grad(y, w, inputs["gy"])
    w_ref = w.detach().clone().requires_grad_()
    y_ref = torch_impl(inputs["x"], None, None, w_ref, None, True, 0.1, 1e-5, "relu", inputs["z"])
    torch.testing.assert_close(gw, torch.autograd.grad(y_ref, w_ref, inputs["gy"])[0], **tol(f64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arg", ["running_mean", "running_var"])
def test_running_stats_that_require_grad_are_refused(device, arg):
    """As torch's F.batch_norm: statistics have no gradient, so ones that require grad raise."""
    inputs = make_inputs((4, 3, 5), device, f64)
    stats = {"running_mean": inputs["rm"], "running_var": inputs["rv"]}
    stats[arg].requires_grad_()
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{arg}'"):
        F.batch_norm(inputs["x"], stats["running_mean"], stats["running_var"], training=False)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{arg}'"):
        BF.batch_norm(inputs["x"], stats["running_mean"], stats["running_var"], training=False)
    with torch.no_grad():
        BF.batch_norm(inputs["x"], stats["running_mean"], stats["running_var"], training=False)


# ---------------------------------------------------------------------------------------
# Double backward must raise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_double_backward_raises(device, training, activation):
    inputs = make_inputs((4, 3, 5), device, f64)
    x = inputs["x"].requires_grad_()
    w = inputs["w"].requires_grad_()
    rm, rv = (None, None) if training else (inputs["rm"], inputs["rv"])
    y = BF.batch_norm(x, rm, rv, w, inputs["b"], training, activation=activation)
    (gx,) = torch.autograd.grad(y, x, inputs["gy"], create_graph=True)
    assert gx.requires_grad, "the first-order gradient was silently detached"
    with pytest.raises(RuntimeError, match="double backward"):
        gx.pow(2).sum().backward()
    y = BF.batch_norm(x, rm, rv, w, inputs["b"], training, activation=activation)
    (gx,) = torch.autograd.grad(y, x, inputs["gy"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.pow(2).sum(), [x, w], allow_unused=True)


# ---------------------------------------------------------------------------------------
# Modules

MODULE_KINDS = {
    "1d_2D": (nn.BatchNorm1d, batchops.BatchNorm1d, (8, 5)),
    "1d_3D": (nn.BatchNorm1d, batchops.BatchNorm1d, (4, 5, 7)),
    "2d": (nn.BatchNorm2d, batchops.BatchNorm2d, (4, 5, 3, 4)),
    "3d": (nn.BatchNorm3d, batchops.BatchNorm3d, (2, 5, 3, 2, 3)),
}
MODULE_CONFIGS = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "no_tracking": dict(track_running_stats=False),
    "no_affine": dict(affine=False),
    "no_bias": dict(bias=False),
    "eps_momentum": dict(eps=1e-3, momentum=0.3),
}


def _randomize(module):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5)
        if module.bias is not None:
            module.bias.normal_()
        if module.running_mean is not None:
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2.0)


def _compare_modules(ours, ref, dtype=f64):
    t = tol(dtype)
    ours_params = dict(ours.named_parameters())
    ref_params = dict(ref.named_parameters())
    assert list(ours_params) == list(ref_params)
    for name, p in ref_params.items():
        torch.testing.assert_close(ours_params[name], p, **t, msg=lambda m: f"{name}: {m}")
        if p.grad is None:
            assert ours_params[name].grad is None, name
        else:
            torch.testing.assert_close(
                ours_params[name].grad, p.grad, **tol(dtype, grad=True), msg=lambda m: f"{name}.grad: {m}"
            )
    ours_bufs = dict(ours.named_buffers())
    ref_bufs = dict(ref.named_buffers())
    assert list(ours_bufs) == list(ref_bufs)
    for name, buf in ref_bufs.items():
        assert ours_bufs[name].dtype == buf.dtype, name
        if name == "num_batches_tracked":
            assert torch.equal(ours_bufs[name], buf), (ours_bufs[name], buf)
        else:
            torch.testing.assert_close(ours_bufs[name], buf, **t, msg=lambda m: f"{name}: {m}")


def _step(module, x, gy):
    """One forward + backward on a fresh leaf copy of x; returns (output, grad of x)."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad


def _sgd(module, lr=0.1):
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _zero_grad(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MODULE_KINDS))
@pytest.mark.parametrize("config", list(MODULE_CONFIGS))
def test_module_matches_torch(device, kind, config):
    tcls, ocls, shape = MODULE_KINDS[kind]
    kw = MODULE_CONFIGS[config]
    ref = make_norm(tcls, 5, device=device, dtype=f64, **kw)
    _randomize(ref)
    ours = ocls(5, device=device, dtype=f64, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    _compare_modules(ours, ref)
    for _iteration in range(3):
        x = torch.randn(shape, dtype=f64, device=device) * 2 + 1
        gy = torch.randn(shape, dtype=f64, device=device)
        y_ref, gx_ref = _step(ref, x, gy)
        y_ours, gx_ours = _step(ours, x, gy)
        torch.testing.assert_close(y_ours, y_ref, **tol(f64))
        torch.testing.assert_close(gx_ours, gx_ref, **tol(f64, grad=True))
        _compare_modules(ours, ref)
        _sgd(ref)
        _sgd(ours)
        _zero_grad(ours, ref)
    ref.eval()
    ours.eval()
    x = torch.randn(shape, dtype=f64, device=device) + 0.5
    gy = torch.randn(shape, dtype=f64, device=device)
    buffers_before = {k: v.clone() for k, v in ours.named_buffers()}
    y_ref, gx_ref = _step(ref, x, gy)
    y_ours, gx_ours = _step(ours, x, gy)
    torch.testing.assert_close(y_ours, y_ref, **tol(f64))
    torch.testing.assert_close(gx_ours, gx_ref, **tol(f64, grad=True))
    _compare_modules(ours, ref)
    for k, v in ours.named_buffers():
        assert torch.equal(v, buffers_before[k]), f"{k} changed in eval mode"
    # and back: torch's module loads ours
    ref2 = make_norm(tcls, 5, device=device, dtype=f64, **kw)
    ref2.load_state_dict(ours.state_dict())
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["1d_2D", "2d", "3d"])
def test_module_state_dict_round_trip(device, kind):
    tcls, ocls, shape = MODULE_KINDS[kind]
    ours = ocls(5, device=device)
    _randomize(ours)
    ours.train()
    ours(torch.randn(shape, device=device))
    ref = tcls(5, device=device)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for k in sd_ours:
        assert torch.equal(sd_ours[k], sd_ref[k]), k
    assert int(sd_ours["num_batches_tracked"]) == 1
    # a state_dict from before num_batches_tracked existed (version 1) still loads, as in torch
    old = copy.deepcopy(sd_ref)
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    fresh = ocls(5, device=device)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0


@pytest.mark.parametrize("kind", ["1d_2D", "2d", "3d"])
@pytest.mark.parametrize("config", list(MODULE_CONFIGS))
def test_module_repr(kind, config):
    tcls, ocls, _ = MODULE_KINDS[kind]
    kw = MODULE_CONFIGS[config]
    ref, ours = make_norm(tcls, 7, **kw), ocls(7, **kw)
    assert repr(ours) == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()
    fused = ocls(7, activation="relu", **kw)
    assert fused.extra_repr() == ref.extra_repr() + ", activation='relu'"
    assert repr(fused) == repr(ref)[:-1] + ", activation='relu')"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64, bf16], ids=_dtype_id)
def test_module_factory_kwargs(device, dtype):
    for tcls, ocls, shape in (MODULE_KINDS["1d_2D"], MODULE_KINDS["2d"], MODULE_KINDS["3d"]):
        ref = tcls(5, device=device, dtype=dtype)
        ours = ocls(5, device=device, dtype=dtype)
        for (n, a), (n2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
            assert n == n2 and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), n
        x = torch.randn(shape, device=device, dtype=dtype)
        y_ours, y_ref = ours(x), ref(x)
        assert y_ours.dtype == y_ref.dtype == dtype and y_ours.device == y_ref.device
        t = dict(rtol=2e-2, atol=2e-2) if dtype == bf16 else tol(dtype)
        torch.testing.assert_close(y_ours, y_ref, **t)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["1d_3D", "2d", "3d"])
@pytest.mark.parametrize("activation", [None, "relu", "gelu_tanh"])
def test_module_residual_activation(device, kind, activation):
    tcls, ocls, shape = MODULE_KINDS[kind]
    ref = tcls(5, device=device, dtype=f64)
    _randomize(ref)
    ours = ocls(5, device=device, dtype=f64, activation=activation)
    ours.load_state_dict(ref.state_dict())
    for training in (True, True, False):
        ref.train(training)
        ours.train(training)
        x = torch.randn(shape, dtype=f64, device=device) + 0.5
        z = torch.randn(shape, dtype=f64, device=device)
        gy = torch.randn(shape, dtype=f64, device=device)
        xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
        yr = TORCH_ACT[activation](ref(xr) + zr)
        yr.backward(gy)
        xo, zo = x.clone().requires_grad_(), z.clone().requires_grad_()
        yo = ours(xo, zo)
        yo.backward(gy)
        torch.testing.assert_close(yo, yr, **tol(f64))
        torch.testing.assert_close(xo.grad, xr.grad, **tol(f64, grad=True))
        torch.testing.assert_close(zo.grad, zr.grad, **tol(f64, grad=True))
        _compare_modules(ours, ref)
        _zero_grad(ours, ref)
    # without a residual, the activation still applies
    ours.train()
    ref.train()
    x = torch.randn(shape, dtype=f64, device=device)
    torch.testing.assert_close(ours(x), TORCH_ACT[activation](ref(x)), **tol(f64))


# ---------------------------------------------------------------------------------------
# convert_batchnorm / revert_batchnorm


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.BatchNorm1d(10, momentum=None), nn.Linear(10, 4)
        )
        self.out_bn = nn.BatchNorm1d(4, affine=False)

    def forward(self, x):
        return self.out_bn(self.head(self.features(x)))


def _run_net(net, x, gy):
    x = x.clone().requires_grad_()
    y = net(x)
    y.backward(gy)
    return y.detach(), x.grad


def _compare_nets(a, b, t):
    for (n, p), (n2, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == n2
        torch.testing.assert_close(p, q, **t)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **t)
    for (n, p), (n2, q) in zip(a.named_buffers(), b.named_buffers()):
        assert n == n2
        torch.testing.assert_close(p, q, **t, msg=lambda m: f"{n}: {m}")


def _randomized_net(device):
    """_Net in float64 with random parameters and running statistics in every batch norm."""
    net = _Net().to(device=device, dtype=f64)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize(m)
    return net


@pytest.mark.parametrize("device", DEVICES)
def test_convert_batchnorm(device):
    net = _randomized_net(device)
    ref = copy.deepcopy(net)
    bn2d = net.features[1]
    shared = (bn2d.weight, bn2d.bias, bn2d.running_mean, bn2d.running_var, bn2d.num_batches_tracked)
    converted = batchops.convert_batchnorm(net)
    assert type(converted.features[1]) is batchops.BatchNorm2d
    assert type(converted.head[2]) is batchops.BatchNorm1d
    assert type(converted.out_bn) is batchops.BatchNorm1d
    assert converted.head[2].momentum is None and converted.out_bn.affine is False
    c = converted.features[1]
    for a, b in zip((c.weight, c.bias, c.running_mean, c.running_var, c.num_batches_tracked), shared):
        assert a is b
    assert list(converted.state_dict()) == list(ref.state_dict())
    t = tol(f64)
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4, dtype=f64, device=device)
        gy = torch.randn(5, 4, dtype=f64, device=device)
        y_ref, gx_ref = _run_net(ref, x, gy)
        y_new, gx_new = _run_net(converted, x, gy)
        torch.testing.assert_close(y_new, y_ref, **t)
        torch.testing.assert_close(gx_new, gx_ref, **tol(f64, grad=True))
        _compare_nets(converted, ref, tol(f64, grad=True))
    ref.eval()
    converted.eval()
    assert all(not m.training for m in converted.modules())
    x = torch.randn(5, 3, 4, 4, dtype=f64, device=device)
    torch.testing.assert_close(converted(x), ref(x), **t)
    # a bare module in eval mode converts to one in eval mode
    bare = nn.BatchNorm3d(4).eval()
    new = batchops.convert_batchnorm(bare)
    assert type(new) is batchops.BatchNorm3d and not new.training and new.weight is bare.weight


def test_convert_and_revert_keep_bias_free_modules():
    """bias=False (weight, no bias) survives both directions, also on torch 2.11 whose
    constructors have no bias argument (batchops emulates it there)."""
    torch_bn = make_norm(nn.BatchNorm2d, 4, bias=False)
    assert torch_bn.bias is None and torch_bn.weight is not None
    ours = batchops.convert_batchnorm(torch_bn)
    assert type(ours) is batchops.BatchNorm2d and ours.bias is None and ours.weight is torch_bn.weight
    assert list(ours.state_dict()) == list(torch_bn.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), torch_bn(x))
    back = batchops.revert_batchnorm(ours)
    assert type(back) is nn.BatchNorm2d and back.bias is None and back.weight is torch_bn.weight
    ours_direct = batchops.BatchNorm1d(3, bias=False)
    assert ours_direct.bias is None and "bias" not in ours_direct.state_dict()
    ours_direct.reset_parameters()  # torch 2.11's reset_parameters would zero-fill a None bias
    assert torch.equal(ours_direct.weight, torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_revert_batchnorm(device):
    net = _randomized_net(device)
    ref = copy.deepcopy(net)
    converted = batchops.convert_batchnorm(net)
    weight = converted.features[1].weight
    reverted = batchops.revert_batchnorm(converted)
    assert type(reverted.features[1]) is nn.BatchNorm2d
    assert type(reverted.head[2]) is nn.BatchNorm1d
    assert type(reverted.out_bn) is nn.BatchNorm1d
    assert reverted.features[1].weight is weight
    x = torch.randn(5, 3, 4, 4, dtype=f64, device=device)
    gy = torch.randn(5, 4, dtype=f64, device=device)
    y_ref, _ = _run_net(ref, x, gy)
    y_rev, _ = _run_net(reverted, x, gy)
    torch.testing.assert_close(y_rev, y_ref, **tol(f64))
    _compare_nets(reverted, ref, tol(f64, grad=True))


def test_revert_with_activation_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchops.BatchNorm2d(4, activation="relu"))
    with pytest.raises(ValueError, match="activation"):
        batchops.revert_batchnorm(model)
    with pytest.raises(ValueError, match="activation"):
        batchops.revert_batchnorm(batchops.BatchNorm1d(4, activation="silu"))


# ---------------------------------------------------------------------------------------
# Errors: same exception type as torch, and our message names the argument


def _e(
    x_shape,
    *,
    rm=3,
    rv=3,
    w=None,
    b=None,
    z=None,
    training=True,
    eps=1e-5,
    activation=None,
    dtype=f32,
    rm_dtype=None,
    w_dtype=None,
):
    """A call description: sizes of the per-channel tensors (None = not given) and dtypes."""
    return dict(
        x_shape=x_shape,
        rm=rm,
        rv=rv,
        w=w,
        b=b,
        z=z,
        training=training,
        eps=eps,
        activation=activation,
        dtype=dtype,
        rm_dtype=rm_dtype,
        w_dtype=w_dtype,
    )


ERROR_CASES = {
    # name: (call, expected type, pattern in our message, compare with torch)
    "one_value_per_channel_2d": (_e((1, 3)), ValueError, "value per channel", True),
    "one_value_per_channel_4d": (_e((1, 3, 1, 1)), ValueError, "value per channel", True),
    "eps_zero": (_e((4, 3, 5), eps=0.0), ValueError, "eps", True),
    "eps_negative": (_e((4, 3, 5), eps=-1e-3), ValueError, "eps", True),
    "running_stats_channel_mismatch": (_e((4, 3, 5), rm=4, rv=4), RuntimeError, "running_mean", True),
    "running_var_size": (_e((4, 3, 5), rv=2), RuntimeError, "running_var", True),
    "running_mean_size_eval": (_e((4, 3, 5), rm=5, training=False), RuntimeError, "running_mean", True),
    "weight_size": (_e((4, 3, 5), w=4), RuntimeError, "weight", True),
    "bias_size": (_e((4, 3, 5), b=2), RuntimeError, "bias", True),
    "eval_without_running_stats": (_e((4, 3, 5), rm=None, rv=None, training=False), RuntimeError, "running_mean", True),
    "integer_input": (_e((4, 3, 5), dtype=torch.int64), NotImplementedError, "input", True),
    "running_mean_dtype": (_e((4, 3, 5), rm_dtype=f64), RuntimeError, "running_mean", True),
    "weight_dtype": (_e((4, 3, 5), w=3, w_dtype=f64), RuntimeError, "weight", True),
    "integer_input_eval": (_e((4, 3, 5), dtype=torch.int32, training=False), NotImplementedError, "input", True),
    "bad_activation": (_e((4, 3, 5), activation="tanh"), ValueError, "activation", False),
    "residual_shape": (_e((4, 3, 5), z=(4, 3, 6)), RuntimeError, "residual", True),
    "running_var_missing": (_e((4, 3, 5), rv=None), ValueError, "running_var", True),
    # torch: ValueError in training, but its eval-mode check ("running_mean must be defined") comes first
    "running_mean_missing_eval": (_e((4, 3, 5), rm=None, training=False), RuntimeError, "running_mean", True),
    "residual_shape_eval": (_e((4, 3, 5), z=(4, 2, 5), training=False), RuntimeError, "residual", True),
}


def _build_error_call(desc, device):
    dtype = desc["dtype"]
    if dtype.is_floating_point:
        x = torch.randn(desc["x_shape"], device=device, dtype=dtype)
    else:
        x = torch.randint(-5, 5, desc["x_shape"], device=device, dtype=dtype)
    fdt = dtype if dtype.is_floating_point else f32

    def per_channel(n, fill, dt=None):
        return None if n is None else torch.full((n,), fill, device=device, dtype=dt or fdt)

    args = (
        x,
        per_channel(desc["rm"], 0.0, desc["rm_dtype"]),
        per_channel(desc["rv"], 1.0),
        per_channel(desc["w"], 1.0, desc["w_dtype"]),
        per_channel(desc["b"], 0.0),
    )
    z = None if desc["z"] is None else torch.randn(desc["z"], device=device, dtype=fdt)
    kwargs = dict(training=desc["training"], momentum=0.1, eps=desc["eps"], activation=desc["activation"], residual=z)
    return args, kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(device, case):
    desc, exc_type, pattern, compare = ERROR_CASES[case]
    args, kwargs = _build_error_call(desc, device)
    with pytest.raises(exc_type) as ours:
        BF.batch_norm(*args, **kwargs)
    assert type(ours.value) is exc_type, f"got {type(ours.value).__name__}: {ours.value}"
    assert pattern in str(ours.value), str(ours.value)
    if compare:
        with pytest.raises(Exception) as theirs:
            torch_impl(*args, **kwargs)
        assert type(ours.value) is type(theirs.value), (
            f"batchops raised {type(ours.value).__name__} ({ours.value}), "
            f"torch raises {type(theirs.value).__name__} ({theirs.value})"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["bad_activation", "residual_shape", "weight_size", "eps_zero", "integer_input"])
def test_op_errors(device, case):
    """The ops themselves check their arguments (the C++ plan, not just the Python layer)."""
    desc, exc_type, pattern, _ = ERROR_CASES[case]
    (x, rm, rv, w, b), kw = _build_error_call(desc, device)
    with pytest.raises(exc_type, match=pattern):
        torch.ops.batchops.batch_norm_forward(
            x, w, b, kw["residual"], rm, rv, kw["training"], 0.1, None, kw["eps"], kw["activation"]
        )


@pytest.mark.parametrize("device", DEVICES)
def test_residual_dtype_mismatch(device):
    x = torch.randn(4, 3, 5, device=device)
    z = torch.randn(4, 3, 5, device=device, dtype=f64)
    with pytest.raises(RuntimeError, match="residual"):
        BF.batch_norm(x, None, None, training=True, residual=z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind,bad_shape", [("1d_2D", (4, 5, 2, 2)), ("1d_2D", (5,)), ("2d", (4, 5, 3)), ("3d", (4, 5, 3, 3))]
)
def test_module_wrong_rank(device, kind, bad_shape):
    tcls, ocls, _ = MODULE_KINDS[kind]
    x = torch.randn(bad_shape, device=device)
    with pytest.raises(ValueError) as theirs:
        tcls(5, device=device)(x)
    with pytest.raises(ValueError, match="input") as ours:
        ocls(5, device=device)(x)
    assert type(ours.value) is type(theirs.value)


def test_module_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        batchops.BatchNorm2d(4, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        batchops.BatchNorm1d(4, activation="ReLU")


@pytest.mark.cuda
def test_mixed_devices():
    x = torch.randn(4, 3, 5, device="cuda")
    cpu = torch.ones(3)
    gpu = torch.ones(3, device="cuda")
    for name, args in {
        "weight": (x, gpu.clone(), gpu.clone(), cpu, None),
        "running_mean": (x, cpu.clone(), cpu.clone(), gpu, None),
    }.items():
        with pytest.raises(RuntimeError) as theirs:
            F.batch_norm(*args, training=True)
        with pytest.raises(RuntimeError, match=name) as ours:
            BF.batch_norm(*args, training=True)
        assert type(ours.value) is type(theirs.value)
    z = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="residual"):
        BF.batch_norm(x, None, None, training=True, residual=z)


# ---------------------------------------------------------------------------------------
# Empty batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_empty_batch(device, training):
    inputs = make_inputs((0, 3, 5), device, f32, residual=True)
    ours = evaluate(ours_impl, **inputs, training=training, activation="relu")
    theirs = evaluate(torch_impl, **inputs, training=training, activation="relu")
    assert ours["y"].shape == (0, 3, 5)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert torch.equal(ours["rm"], inputs["rm"]) and torch.equal(ours["rv"], inputs["rv"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["1d_2D", "2d", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_empty_batch(device, kind, momentum):
    tcls, ocls, shape = MODULE_KINDS[kind]
    ref = tcls(5, device=device, momentum=momentum)
    _randomize(ref)
    ours = ocls(5, device=device, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    empty = (0,) + shape[1:]
    x = torch.randn(empty, device=device)
    gy = torch.randn(empty, device=device)
    rm0 = ours.running_mean.clone()
    y_ref, gx_ref = _step(ref, x, gy)
    y_ours, gx_ours = _step(ours, x, gy)
    assert y_ours.shape == y_ref.shape == empty
    assert gx_ours.shape == gx_ref.shape == empty
    assert torch.equal(ours.running_mean, rm0)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    _compare_modules(ours, ref, f32)
    # and a real batch afterwards still agrees (momentum=None: 1 / num_batches_tracked)
    x = torch.randn(shape, device=device)
    gy = torch.randn(shape, device=device)
    _zero_grad(ours, ref)
    y_ref, _ = _step(ref, x, gy)
    y_ours, _ = _step(ours, x, gy)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-5)
    _compare_modules(ours, ref, f32)


# ---------------------------------------------------------------------------------------
# torch.compile

COMPILE_CONFIGS = {
    # name: (module kwargs, training, residual, dynamic)
    "train": (dict(), True, False, False),
    "train_momentum_none": (dict(momentum=None), True, False, False),
    "eval": (dict(), False, False, False),
    "train_relu_residual": (dict(activation="relu"), True, True, False),
    "train_residual": (dict(), True, True, False),  # the residual's gradient is grad_output itself
    "eval_silu_residual": (dict(activation="silu"), False, True, False),
    "train_dynamic_batch": (dict(momentum=None, activation="gelu"), True, True, True),
}


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["auto", "torch", "batchops"])
def compiled_bn(request):
    """Each mode of BF.set_compiled_batch_norm (what batch norm becomes inside torch.compile)."""
    before = BF.compiled_batch_norm()
    BF.set_compiled_batch_norm(request.param)
    yield request.param
    BF.set_compiled_batch_norm(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(COMPILE_CONFIGS))
def test_torch_compile(device, config, dynamo_reset, compiled_bn):
    from torch._dynamo.testing import CompileCounterWithBackend

    kw, training, residual, dynamic = COMPILE_CONFIGS[config]
    eager = batchops.BatchNorm2d(6, device=device, **kw)
    _randomize(eager)
    eager.train(training)
    compiled_module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, fullgraph=True, backend=counter, dynamic=dynamic or None)
    batches = (4, 6, 3, 5) if dynamic else (4, 4, 4)
    frames_after = []
    for n in batches:
        shape = (n, 6, 5, 3)
        x = torch.randn(shape, device=device)
        z = torch.randn(shape, device=device) if residual else None
        gy = torch.randn(shape, device=device)
        results = []
        for fn in (eager, compiled):
            xi = x.clone().requires_grad_()
            zi = z.clone().requires_grad_() if z is not None else None
            y = fn(xi, zi) if zi is not None else fn(xi)
            y.backward(gy)
            results.append((y.detach(), xi.grad, zi.grad if zi is not None else None))
        (ye, gxe, gze), (yc, gxc, gzc) = results
        # torch's decomposition sums in another order than batchops' kernels
        t = dict(rtol=1e-6, atol=1e-6) if op_in_graph(compiled_bn, device, training) else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yc, ye, **t)
        torch.testing.assert_close(gxc, gxe, **t)
        if residual:
            torch.testing.assert_close(gzc, gze, **t)
        for (n_, p), (_, q) in zip(compiled_module.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **t, msg=lambda m: f"{n_}.grad: {m}")
        for (n_, p), (_, q) in zip(compiled_module.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(p, q, **t, msg=lambda m: f"{n_}: {m}")
        _zero_grad(eager, compiled_module)
        frames_after.append(counter.frame_count)
    assert counter.frame_count >= 1, "torch.compile did not compile the module"
    if dynamic:
        # torch's own BatchNorm2d also compiles twice (the second call's guards change);
        # after that, new batch sizes must not recompile
        assert frames_after[-1] == frames_after[1], f"recompiled for new batch sizes: {frames_after}"
    if training:
        assert int(compiled_module.num_batches_tracked) == len(batches)
        assert not torch.equal(compiled_module.running_mean, torch.zeros_like(compiled_module.running_mean))


def op_in_graph(mode: str, device: str, training: bool) -> bool:
    """Whether batchops' op (not torch's decomposition) is in a graph compiled in `mode`."""
    return mode == "batchops" or (mode == "auto" and device == "cpu" and training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("momentum", ["float", "tensor"])
def test_compiled_graph_holds_what_was_chosen(dynamo_reset, compiled_bn, activation, momentum, training):
    """In "torch" mode the compiled graph has torch's batch norm and no batchops op (inductor can
    fuse it); in "batchops" mode, and in "auto" on the CPU in training, it has batchops' op and
    not torch's ("auto" leaves eval's multiply-add to inductor)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    bn = batchops.BatchNorm2d(3, activation=activation, momentum=0.1 if momentum == "float" else None)
    bn.train(training)
    compiled = torch.compile(bn, fullgraph=True, backend=backend)
    compiled(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    ours = any("batchops" in t for t in targets)
    torchs = any("batch_norm" in t and "batchops" not in t for t in targets)
    assert (ours, torchs) == ((True, False) if op_in_graph(compiled_bn, "cpu", training) else (False, True)), targets


def test_layout_free_ops_are_tagged():
    """Inductor hands ops tagged flexible_layout their inputs in the layout it computed them in
    (its convolutions' channels-last) instead of copying them to eager strides first."""
    for op in (
        torch.ops.batchops.batch_norm_forward,
        torch.ops.batchops.batch_norm_backward,
        torch.ops.batchops.max_pool2d,
        torch.ops.batchops.max_pool2d_backward,
    ):
        assert torch.Tag.flexible_layout in op.default.tags, op


def test_set_compiled_batch_norm_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        BF.set_compiled_batch_norm("inductor")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_functional(device, dynamo_reset, compiled_bn):
    def f(x, rm, rv, w, b, m):
        return BF.batch_norm(x, rm, rv, w, b, True, m, 1e-5, activation="gelu")

    inputs = make_inputs((4, 3, 6), device, f32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    m = torch.tensor(0.25, device=device)
    rm_e, rv_e = inputs["rm"].clone(), inputs["rv"].clone()
    rm_c, rv_c = inputs["rm"].clone(), inputs["rv"].clone()
    ye = f(inputs["x"], rm_e, rv_e, inputs["w"], inputs["b"], m)
    yc = compiled(inputs["x"], rm_c, rv_c, inputs["w"], inputs["b"], m)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm_c, rm_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv_c, rv_e, rtol=1e-6, atol=1e-6)
    assert not torch.equal(rm_c, inputs["rm"])


# ---------------------------------------------------------------------------------------
# Determinism

DETERMINISM_LAYOUTS = {
    "planar": ((4, 8, 70, 70), None),
    "planar_small_channels": ((4, 300, 3, 5), None),  # whole channels in cache, two blocks (cpu_kernels.h)
    "channels_last": ((4, 8, 40, 40), torch.channels_last),
    "rows": ((8192, 16), None),
}


def _forward_backward(x, z, w, b, gy):
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    rm = torch.zeros(x.shape[1], device=x.device)
    rv = torch.ones(x.shape[1], device=x.device)
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation="silu", residual=z)
    grads = torch.autograd.grad(y, [x, z, w, b], gy)
    return [y.detach(), rm, rv, *grads]


def _determinism_inputs(layout, device):
    shape, fmt = DETERMINISM_LAYOUTS[layout]
    x = torch.randn(shape, device=device) * 3 + 1
    z = torch.randn(shape, device=device)
    if fmt is not None:
        x, z = x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt)
    C = shape[1]
    return x, z, torch.rand(C, device=device) + 0.5, torch.randn(C, device=device), torch.randn(shape, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(DETERMINISM_LAYOUTS))
def test_deterministic_repeat(device, layout):
    inputs = _determinism_inputs(layout, device)
    first = _forward_backward(*inputs)
    second = _forward_backward(*inputs)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two identical calls"


@pytest.mark.parametrize("layout", list(DETERMINISM_LAYOUTS))
def test_deterministic_across_thread_counts(layout):
    inputs = _determinism_inputs(layout, "cpu")
    original = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _forward_backward(*inputs)
    finally:
        torch.set_num_threads(original)
    assert torch.get_num_threads() == original
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[threads])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {threads} threads"


# ---------------------------------------------------------------------------------------
# CPU instruction-set levels (tests.helpers.cap_cpu_isa): every compiled level is checked on
# machines that have it.


@pytest.mark.parametrize("value", ["avx", "AVX2", "sse9"])
def test_cpu_isa_rejects_unknown_values(monkeypatch, value):
    """BATCHOPS_CPU_ISA accepts default, avx2 and avx512 only: a typo is an error, not a
    silent run at the processor's best level."""
    monkeypatch.setenv("BATCHOPS_CPU_ISA", value)
    for dtype in (f32, bf16):  # float32 has a kernel per level, bfloat16 only the baseline one
        with pytest.raises(ValueError, match="BATCHOPS_CPU_ISA must be default, avx2 or avx512"):
            BF.batch_norm(torch.randn(4, 3, dtype=dtype), None, None, training=True)
    with pytest.raises(ValueError, match="BATCHOPS_CPU_ISA"):
        batchops.build_info()


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize(
    "shape, fmt",
    [((3, 16, 70, 70), None), ((2, 3, 9, 11), None), ((4, 24, 7, 9), torch.channels_last), ((50, 13), None)],
    ids=["planar_channels", "planar_few", "channels_last", "rows"],
)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=_dtype_id)
def test_cpu_isa_levels(monkeypatch, isa, shape, fmt, dtype):
    cap_cpu_isa(monkeypatch, isa)
    inputs = make_inputs(shape, "cpu", dtype, residual=True, param_dtype=f32)
    if fmt is not None:
        for key in ("x", "z", "gy"):
            inputs[key] = inputs[key].contiguous(memory_format=fmt)
    for activation in (None, "relu", "gelu"):
        ours = evaluate(ours_impl, **inputs, training=True, activation=activation)
        ref = evaluate(torch_impl, **inputs, cast=f64, training=True, activation=activation)
        if dtype == f32:
            assert_results_close(ours, ref, dtype)
        else:  # bf16 output rounding: compare at its resolution
            for key in ref:
                torch.testing.assert_close(ours[key].double(), ref[key], atol=5e-2, rtol=2e-2, msg=key)


# Channels-last rows whose width is not a multiple of the kernels' 16-channel vectors (MobileNet's
# 24, 40, 72, 120): the last vector of a row overlaps the one before it (cpu_kernels.h,
# ChannelVectors), so the statistics and gradient sums must not count the overlapped
# channels twice; 17 is one full vector and one channel. Every activation, both modes, every
# compiled instruction-set level (the vector is one, two or four registers wide).
@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("C", [17, 24, 40, 72, 120])
def test_channels_last_vector_tails(monkeypatch, isa, C):
    cap_cpu_isa(monkeypatch, isa)
    for shape in [(5, C, 6, 7), (211, C)]:  # channels-last 4-D, and the (N, C) rows of a 2-D input
        inputs = make_inputs(shape, "cpu", f32, residual=True)
        if len(shape) == 4:
            inputs = _inputs_channels_last(inputs)
        for activation in (None, *ACTIVATIONS):
            for training in (True, False):
                ours = evaluate(ours_impl, **inputs, training=training, activation=activation)
                ref = evaluate(torch_impl, **inputs, cast=f64, training=training, activation=activation)
                assert_results_close(ours, ref, f32)


# The channels-last eval forward takes rows one at a time below 2**21 values and four at a time
# from there (cpu_kernels.h, kEvalRowPartsFrom); the smaller shapes above cover the first.
@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("C", [40, 64])
def test_channels_last_eval_of_large_inputs(monkeypatch, isa, C):
    cap_cpu_isa(monkeypatch, isa)
    # just above 2**21 values, in an odd number of rows (so that a thread's range ends in rows
    # taken one at a time, after the four-at-a-time ones)
    shape = (3, C, 127, (2**21 // (3 * C * 127) + 1) | 1)
    assert 2**21 <= math.prod(shape) < 2**21 + 10**5 and math.prod(shape[:1] + shape[2:]) % 2 == 1
    inputs = make_inputs(shape, "cpu", f32, residual=True)
    inputs = _inputs_channels_last(inputs)
    for activation, residual in ((None, False), ("relu", True)):
        args = inputs if residual else {**inputs, "z": None}
        ours = evaluate(ours_impl, **args, training=False, activation=activation)
        ref = evaluate(torch_impl, **args, cast=f64, training=False, activation=activation)
        assert ours["y"].is_contiguous(memory_format=torch.channels_last)
        assert_results_close(ours, ref, f32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_functional_empty_1d_input_matches_torch(device, training, affine):
    """torch's OpInfo sample for F.batch_norm: a (0,) input with size-0 running statistics is
    returned as an empty tensor (a copy that keeps the gradient chain), not an error."""
    running = dict(running_mean=torch.zeros(0, device=device), running_var=torch.ones(0, device=device))
    params = (
        dict(
            weight=torch.rand(3, device=device, requires_grad=True),
            bias=torch.rand(3, device=device, requires_grad=True),
        )
        if affine
        else {}
    )
    results = []
    for fn in (BF.batch_norm, F.batch_norm):
        x = torch.empty(0, device=device, requires_grad=True)
        y = fn(x, **running, **params, training=training)
        y.sum().backward()
        results.append((y, x.grad))
    (y_ours, gx_ours), (y_ref, gx_ref) = results
    assert y_ours.shape == y_ref.shape == (0,) and y_ours.dtype == y_ref.dtype
    assert y_ours.grad_fn is not None and gx_ours.shape == gx_ref.shape == (0,)
    assert running["running_mean"].numel() == 0


@pytest.mark.parametrize("shape", [(3,), (1,)])
def test_functional_nonempty_1d_input_still_raises(shape):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        BF.batch_norm(torch.randn(shape), torch.zeros(shape[0]), torch.ones(shape[0]))


# ---------------------------------------------------------------------------------------
# The CUDA statistics schedule, replayed on the CPU (csrc/batch_norm/cuda_replay.cpp)


@pytest.mark.parametrize("sms", [132, 16], ids=["h100_h200_132_sms", "16_sms"])
@pytest.mark.parametrize("layout", ["planar", "channels_last", "rows"])
def test_cuda_statistics_schedule_accuracy(layout, sms):
    """What the CUDA kernels compute for the batch statistics (their chunk schedule for a GPU
    with `sms` SMs, float Welford per thread, the blocks' merge trees and the finalize's merge
    order, through the same header functions) meets test_mean_offset's float32 tolerance at
    x = 1e4 + N(0, 1): the normalised output within 1e-3 of float64."""
    shape = {"planar": (3, 3, 70, 70), "channels_last": (4, 5, 20, 20), "rows": (3000, 5)}[layout]
    x = (1e4 + torch.randn(shape, dtype=f64)).to(f32)
    if layout == "channels_last":
        x = _channels_last(x)
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // shape[1]
    mean, m2 = torch.ops.batchops_testing.batch_norm_stats_cuda_schedule(x, sms)
    assert mean.dtype == m2.dtype == f32 and mean.shape == m2.shape == (shape[1],)
    view = [1, -1] + [1] * (x.dim() - 2)
    x64 = x.double()
    ref_mean = (x64 - 1e4).mean(dims) + 1e4  # float64 from the same float inputs
    ref_var = x64.var(dims, unbiased=False)
    # as the apply kernel uses them (float arithmetic), against float64
    y = (x - mean.view(view)) * torch.rsqrt(m2 / count + 1e-5).view(view)
    y_ref = (x64 - ref_mean.view(view)) * torch.rsqrt(ref_var + 1e-5).view(view)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-3)
    torch.testing.assert_close((m2.double() / count) / ref_var, torch.ones_like(ref_var), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["planar", "rows"])
def test_cuda_statistics_schedule_empty_and_tiny(layout):
    """No values: zeros, as batch_norm_stats; one value per channel: that value, m2 = 0."""
    shape = (0, 3, 4) if layout == "planar" else (0, 3)
    mean, m2 = torch.ops.batchops_testing.batch_norm_stats_cuda_schedule(torch.randn(shape), 132)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(m2, torch.zeros(3))
    x = torch.randn(1, 3, 1) if layout == "planar" else torch.randn(1, 3)
    mean, m2 = torch.ops.batchops_testing.batch_norm_stats_cuda_schedule(x, 132)
    assert torch.equal(mean, x.flatten()) and torch.equal(m2, torch.zeros(3))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_cuda_more_than_65535_channels(layout):
    """Channels do not go on a grid dimension capped at 65535 (the planar partial reduction
    used to refuse C > 65535 on CUDA; the CPU has no limit)."""
    C = 70_000
    x = torch.randn(3, C, 2, 2, device="cuda", dtype=f64) * 2 + 1
    if layout == "channels_last":
        x = _channels_last(x)
    w = torch.rand(C, device="cuda", dtype=f64) + 0.5
    b = torch.randn(C, device="cuda", dtype=f64)
    gy = torch.randn_like(x)
    results = []
    for fn in (BF.batch_norm, F.batch_norm):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xi, None, None, wi, bi, training=True)
        y.backward(gy)
        results.append((y, xi.grad, wi.grad, bi.grad))
    for ours, ref, name in zip(*results, ("y", "grad_input", "grad_weight", "grad_bias")):
        torch.testing.assert_close(ours, ref, **tol(f64, grad=name != "y"), msg=lambda m: f"{name}: {m}")


def _bn_ops_step(x, w, b, rm, rv, gy):
    """Training forward + backward through the ops (relu fused): what a graph captures."""
    ops = torch.ops.batchops
    y, mean, invstd, new_rm, new_rv = ops.batch_norm_forward(x, w, b, None, rm, rv, True, 0.1, None, 1e-5, "relu")
    gx, gw, gb, _ = ops.batch_norm_backward(gy, x, w, b, None, mean, invstd, True, "relu", [True, True, True, False])
    return y, new_rm, new_rv, gx, gw, gb


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_cuda_graph_capture_and_replay(layout):
    """The README says capturable: no host synchronisation and no allocation outside the
    graph's pool. Replays on new inputs give bitwise the eager results, which match torch."""
    shape = (8, 16, 9, 9)
    new_x = lambda: torch.randn(shape, device="cuda") * 2 + 1  # noqa: E731
    x = new_x()
    if layout == "channels_last":
        x = _channels_last(x)
    gy = torch.randn_like(x)
    w, b = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _bn_ops_step(x, w, b, rm, rv, gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _bn_ops_step(x, w, b, rm, rv, gy)
    for _ in range(3):
        x.copy_(new_x())
        gy.copy_(torch.randn_like(gy))
        graph.replay()
        eager = _bn_ops_step(x, w, b, rm, rv, gy)
        for name, a, e in zip(("y", "running_mean", "running_var", "gx", "gw", "gb"), static, eager):
            assert torch.equal(a, e), f"{name}: graph replay differs from the eager call"
        ref = torch.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True))
        torch.testing.assert_close(static[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_kernels_run_on_the_current_stream():
    """Work on a side stream: the input is written there after a long spin, so a kernel that
    ran on another stream would read the old values (and differ from the default-stream run)."""
    shape = (4, 8, 16, 16)
    x_old, x_new = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda") + 3
    expected = BF.batch_norm(x_new, None, None, training=True, activation="silu")
    x = x_old.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # about 25 ms of spinning on this stream
        x.copy_(x_new)
        y = BF.batch_norm(x, None, None, training=True, activation="silu")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [f32, f64], ids=_dtype_id)
@pytest.mark.parametrize("activation", ["relu", "silu", None])
@pytest.mark.parametrize("shape", [(4, 3, 16), (4, 3, 7), (3, 5, 4, 4), (2, 3, 40), (3, 4, 70)], ids=str)
def test_gradients_do_not_depend_on_which_are_asked_for(device, dtype, activation, shape):
    """The backward's passes are chosen by layout, activation and residual, never by which
    gradients are asked for (short planar runs sum channel by channel, or by parts where g is
    stored): each gradient alone has the bits it has beside the others."""
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=f64) * 1.7 + 0.4).to(device, dtype)
    z = torch.randn(shape, generator=g, dtype=f64).to(device, dtype)
    w = (torch.rand(C, generator=g, dtype=f64) + 0.5).to(device, dtype)
    b = torch.randn(C, generator=g, dtype=f64).to(device, dtype)
    gy = torch.randn(shape, generator=g, dtype=f64).to(device, dtype)
    inputs = {"x": x, "w": w, "b": b, "z": z}

    def grads(wanted):
        leaves = {k: v.detach().requires_grad_(k in wanted) for k, v in inputs.items()}
        y = BF.batch_norm(
            leaves["x"], None, None, leaves["w"], leaves["b"], True, activation=activation, residual=leaves["z"]
        )
        return dict(zip(wanted, torch.autograd.grad(y, [leaves[k] for k in wanted], gy)))

    every = grads(list(inputs))
    for name in inputs:
        torch.testing.assert_close(grads([name])[name], every[name], rtol=0, atol=0, msg=name)
