"""batchops.functional.batch_norm_max_pool2d and BatchNorm2d's ``max_pool`` (resnet's stem,
``maxpool(relu(bn1(x)))`` in one step, batchops/ops/batch_norm_max_pool.py) against torch's
batch norm, ReLU and max pool: values, every gradient and the running statistics in float64,
training and eval, both layouts, negative weights (channels pooled on -x), odd windows;
gradcheck; torch.compile; the fallback where batchops' pool does not
run; errors. And the op its backward uses, torch.ops.batchops.max_pool2d_batch_norm_backward,
against max_pool2d_backward followed by the same arithmetic in ATen (every instruction-set
level, dtype and layout), opcheck, its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchops
from batchops import functional

from tests.helpers import DEVICES, ISA_LEVELS, RecordOps, cap_cpu_isa, dtype_id

pytestmark = pytest.mark.usefixtures("kernels")

f64 = torch.float64

# (input shape, kernel_size, stride, padding, dilation, ceil_mode): resnet's stem pool, 2x2 with
# the default stride, a hanging last window, a dilated rectangular window, one value per plane.
WINDOWS = [
    ((4, 6, 12, 12), 3, 2, 1, 1, False),
    ((3, 5, 8, 8), 2, None, 0, 1, False),
    ((2, 7, 11, 9), 3, 2, 1, 1, True),
    ((2, 4, 13, 10), (3, 2), (2, 1), (1, 0), (2, 3), False),
    ((5, 3, 3, 3), 3, 3, 0, 1, False),
]
WINDOW_IDS = [f"{'x'.join(map(str, w[0]))}-k{w[1]}-s{w[2]}-p{w[3]}-d{w[4]}{'-ceil' if w[5] else ''}" for w in WINDOWS]


def modules(C: int, *, negative: bool, activation: str | None = "relu", momentum=0.1):
    """(torch's BatchNorm2d, batchops' BatchNorm2d with the activation) with the same random
    affine parameters and running statistics, float64; with `negative`, half the weights < 0."""
    ref = nn.BatchNorm2d(C, momentum=momentum).to(f64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        if negative:
            ref.weight[::2].neg_()
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-0.5, 0.5)
        ref.running_var.uniform_(0.5, 2.0)
    ours = batchops.BatchNorm2d(C, momentum=momentum, activation=activation).to(f64)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def reference(ref, x, activation, window):
    y = ref(x)
    if activation == "relu":
        y = F.relu(y)
    return F.max_pool2d(y, *window)


@pytest.mark.parametrize("negative", [False, True], ids=["positive", "negative-weights"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", WINDOWS, ids=WINDOW_IDS)
def test_matches_torch_in_float64(config, training, layout, negative):
    shape, *window = config
    torch.manual_seed(0)
    ref, ours = modules(shape[1], negative=negative)
    ref.train(training), ours.train(training)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=f64).contiguous(memory_format=fmt)
    for ops in steps_match_torch(ref, ours, x, window):
        # The fused path (batchops' pool runs on contiguous float64), else the two calls.
        assert ("batch_norm_stats" in ops) == (training and layout == "contiguous")
        assert ("max_pool2d_by_weight_sign" in ops) == (layout == "contiguous")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_on_device(device, training):
    # On CUDA (not run on a GPU yet) the stem is the two calls: batchops' pool is not routed to there.
    torch.manual_seed(5)
    ref, ours = (m.to(device).train(training) for m in modules(6, negative=True))
    x = torch.randn(4, 6, 12, 12, dtype=f64, device=device)
    for _ in steps_match_torch(ref, ours, x, (3, 2, 1, 1, False)):
        pass


def steps_match_torch(ref, ours, x, window, steps=3):
    """Three steps of ours(x, max_pool=window) against torch's modules, from the same x: output,
    the input's, weight's and bias's gradients, running statistics; yields each step's op names."""
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    for step in range(steps):  # running statistics follow over several steps
        expected = reference(ref, x_ref, "relu", window)
        with RecordOps() as rec:
            out = ours(x_ours, max_pool=tuple(window))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(expected)
        got = torch.autograd.grad(out, (x_ours, ours.weight, ours.bias), grad)
        want = torch.autograd.grad(expected, (x_ref, ref.weight, ref.bias), grad)
        for g, w, name in zip(got, want, ("input", "weight", "bias")):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, n=name, s=step: f"{n} {s}: {m}")
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
        assert ours.num_batches_tracked == ref.num_batches_tracked
        yield rec.ops


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "momentum"])
def test_without_activation_and_cumulative_momentum(momentum):
    torch.manual_seed(1)
    ref, ours = modules(5, negative=True, activation=None, momentum=momentum)
    x = torch.randn(3, 5, 10, 10, dtype=f64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(3):
        expected = reference(ref, x_ref, None, (3, 2, 1))
        out = ours(x_ours, max_pool=(3, 2, 1, 1, False))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(expected)
        got = torch.autograd.grad(out, (x_ours, ours.weight, ours.bias), grad)
        want = torch.autograd.grad(expected, (x_ref, ref.weight, ref.bias), grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 7, 6, dtype=f64, requires_grad=True)
    weight = torch.tensor([1.2, -0.7, 0.9], dtype=f64, requires_grad=True)
    bias = torch.tensor([0.1, 0.3, -0.2], dtype=f64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=f64), torch.ones(3, dtype=f64)

    def fn(x, weight, bias):
        return functional.batch_norm_max_pool2d(
            x, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5, kernel_size=3, stride=2, padding=1
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_affine_false_and_no_running_statistics():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 9, 9, dtype=f64, requires_grad=True)
    out = functional.batch_norm_max_pool2d(x, None, None, None, None, False, kernel_size=2)
    expected = F.max_pool2d(F.relu(F.batch_norm(x, None, None, training=True)), 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], rtol=1e-10, atol=1e-10
    )


def test_fallback_where_batchops_pool_does_not_run():
    # Channels-last float64: batchops' max pool runs only for channels-last float32 (AVX-512), so
    # the two calls run as they are, with the same results.
    torch.manual_seed(4)
    ref, ours = modules(4, negative=False)
    x = torch.randn(2, 4, 8, 8, dtype=f64).contiguous(memory_format=torch.channels_last)
    with RecordOps() as rec:
        out = ours(x, max_pool=(3, 2, 1, 1, False))
    assert "batch_norm_stats" not in rec.ops
    torch.testing.assert_close(out, reference(ref, x, "relu", (3, 2, 1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_resnet_stem_shape_matches_unfused(layout):
    # Float32, resnet's stem at a small batch: the fused module (channels-last: where the
    # AVX-512 pool runs) against batchops' own unfused modules.
    torch.manual_seed(5)
    bn = batchops.BatchNorm2d(8, activation="relu")
    fused = batchops.BatchNorm2d(8, activation="relu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 8, 56, 56).contiguous(memory_format=fmt).requires_grad_()
    y_ref = F.max_pool2d(bn(x), 3, 2, 1)
    y = fused(x, max_pool=(3, 2, 1, 1, False))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_ref, x, grad)[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("negative", [False, True], ids=["positive", "negative-weights"])
def test_compiled_training_step_matches_torch(negative):
    # Compiled in training the fused step runs (one graph: the sign test is inside an op).
    torch.manual_seed(6)
    ref, ours = modules(4, negative=negative)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ours(x, max_pool=(3, 2, 1, 1, False)).square().sum(), fullgraph=True)
    x = torch.randn(2, 4, 10, 10, dtype=f64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    loss = compiled(x)
    loss.backward()
    expected = reference(ref, x_ref, "relu", (3, 2, 1)).square().sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
    with torch.profiler.profile() as prof:  # (a dispatch mode would keep dynamo from compiling)
        compiled(x.detach().clone().requires_grad_()).backward()
    names = {event.name for event in prof.events()}
    assert {"batchops::max_pool2d_by_weight_sign", "batchops::max_pool2d_batch_norm_backward"} <= names


def test_errors():
    bn = batchops.BatchNorm2d(3, activation="silu")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        bn(x, max_pool=(2, 2, 0, 1, False))
    with pytest.raises(ValueError, match="max_pool cannot be combined with a residual"):
        batchops.BatchNorm2d(3)(x, x, max_pool=(2, 2, 0, 1, False))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batchops.BatchNorm2d(3)(torch.randn(1, 3, 1, 1), max_pool=(1, 1, 0, 1, False))


# ---- torch.ops.batchops.max_pool2d_batch_norm_backward


def pool_backward_inputs(shape, layout, dtype, device="cpu", window=(3, 2, 1, 1)):
    """(grad_output, indices, input, coefficients, window) for the op, from a real forward."""
    k, st, pad, dil = window
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=f64).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    _, indices = torch.ops.batchops.max_pool2d(x, [k], [st], [pad], [dil], False)
    grad = torch.randn(indices.shape, generator=g, dtype=f64).to(device=device, dtype=dtype)
    grad = grad.contiguous(memory_format=fmt)
    stat = f64 if dtype == f64 else torch.float32
    coefficients = torch.randn(4, shape[1], generator=g, dtype=f64).to(device=device, dtype=stat)
    return grad, indices, x, coefficients, ([k], [st], [pad], [dil])


def composed(grad, indices, x, coefficients, window):
    g = torch.ops.batchops.max_pool2d_backward(grad, indices, x.shape, *window)
    alpha, beta, center, gamma = (c.view(1, -1, 1, 1) for c in coefficients)
    stat = coefficients.dtype
    return (g.to(stat) * alpha + ((x.to(stat) - center) * beta + gamma)).to(x.dtype)


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 20, 11, 9), (2, 32, 12, 12), (1, 3, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_pool_backward_with_batch_norm_pass(monkeypatch, isa, dtype, layout, shape):
    # C = 20: one whole vector of 16 channels and an overlapping tail (the AVX-512 gather).
    cap_cpu_isa(monkeypatch, isa)
    check_pool_backward_with_batch_norm_pass(pool_backward_inputs(shape, layout, dtype), dtype, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pool_backward_with_batch_norm_pass_on_device(device, dtype, layout):
    args = pool_backward_inputs((2, 20, 11, 9), layout, dtype, device)
    check_pool_backward_with_batch_norm_pass(args, dtype, layout)


def check_pool_backward_with_batch_norm_pass(args, dtype, layout):
    got = torch.ops.batchops.max_pool2d_batch_norm_backward(*args[:4], *args[4])
    want = composed(*args)
    tol = {torch.float32: 1e-5, f64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pool_backward_with_batch_norm_pass_opcheck(device, layout):
    grad, indices, x, coefficients, window = pool_backward_inputs((2, 3, 10, 10), layout, torch.float32, device)
    torch.library.opcheck(torch.ops.batchops.max_pool2d_batch_norm_backward, (grad, indices, x, coefficients, *window))


def test_pool_backward_with_batch_norm_pass_errors():
    grad, indices, x, coefficients, window = pool_backward_inputs((2, 3, 10, 10), "contiguous", torch.float32)
    op = torch.ops.batchops.max_pool2d_batch_norm_backward
    with pytest.raises(RuntimeError, match=r"coefficients must be \(4, C\) = \(4, 3\)"):
        op(grad, indices, x, coefficients[:3], *window)
    with pytest.raises(RuntimeError, match="coefficients must be Float for Float gradients"):
        op(grad, indices, x, coefficients.double(), *window)
    with pytest.raises(RuntimeError, match="input's dtype Double differs from grad_output's Float"):
        op(grad, indices, x.double(), coefficients, *window)
    with pytest.raises(RuntimeError, match="input_size"):
        op(grad, indices, x[:1], coefficients, *window)


# ---- torch.ops.batchops.max_pool2d_by_weight_sign

SIGN_WEIGHTS = {"none": None, "positive": [0.5, 1.0, 2.0, 0.1], "mixed": [1.0, -0.5, 0.0, -2.0]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unbatched"])
@pytest.mark.parametrize("weights", list(SIGN_WEIGHTS))
def test_pool_by_weight_sign(device, layout, weights):
    # Channels with a negative weight take each window's minimum and its index, as torch's pool
    # of -x would (a zero weight counts as positive); values and indices exactly.
    torch.manual_seed(6)
    x = torch.randn(2, 4, 11, 9, dtype=f64, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    x = x[1] if layout == "unbatched" else x
    w = SIGN_WEIGHTS[weights]
    weight = None if w is None else torch.tensor(w, dtype=torch.float32, device=device)
    out, indices = torch.ops.batchops.max_pool2d_by_weight_sign(x, weight, [3], [2], [1], [1], True)
    sign = torch.ones(4, dtype=f64, device=device) if w is None else torch.tensor(w, device=device).lt(0) * -2.0 + 1
    sign = sign.view(-1, 1, 1)
    want, want_indices = F.max_pool2d(x * sign, 3, 2, 1, 1, True, return_indices=True)
    torch.testing.assert_close(out, want * sign, rtol=0, atol=0)
    assert torch.equal(indices, want_indices)
    assert out.stride() == want.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["none", "mixed"])
def test_pool_by_weight_sign_opcheck(device, weights):
    x = torch.randn(2, 4, 10, 10, device=device)
    w = SIGN_WEIGHTS[weights]
    weight = None if w is None else torch.tensor(w, device=device)
    torch.library.opcheck(torch.ops.batchops.max_pool2d_by_weight_sign, (x, weight, [3], [2], [1], [1], False))


def test_pool_by_weight_sign_errors():
    x = torch.randn(2, 4, 10, 10)
    with pytest.raises(RuntimeError, match=r"weight must have one value per channel \(4\), got shape \[3\]"):
        torch.ops.batchops.max_pool2d_by_weight_sign(x, torch.ones(3), [3], [2], [1], [1], False)
