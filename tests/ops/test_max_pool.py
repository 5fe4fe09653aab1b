"""torch.ops.batchops.max_pool2d / max_pool2d_backward (every layout, both devices) against
torch's max_pool2d: the same values and indices bit for bit (a max is exact, so every dtype
compares exactly), the same gradients, gradcheck, opcheck, errors; and where
batchops.functional.max_pool2d / batchops.MaxPool2d run it (the CPU, contiguous inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchops

from tests.helpers import DEVICES, ISA_LEVELS, RecordOps, cap_cpu_isa, dtype_id

pytestmark = pytest.mark.usefixtures("kernels")

f64 = torch.float64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (input shape, kernel_size, stride, padding, dilation, ceil_mode): resnet's stem pool, the
# defaults, odd sizes with ceil_mode (a last window that hangs over the edge), dilation,
# rectangular windows, stride 1 (overlapping by two), a window as large as the input, an
# unbatched (C, H, W) input and an empty batch.
CONFIGS = [
    ((2, 3, 12, 12), 3, 2, 1, 1, False),
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((2, 3, 11, 9), 3, 2, 1, 1, True),
    ((1, 2, 13, 10), (3, 2), (2, 1), (1, 0), (2, 3), False),
    ((1, 2, 13, 10), (3, 2), (2, 1), (1, 1), (2, 3), True),
    ((3, 4, 7, 9), 3, 1, 1, 1, False),
    ((2, 5, 6, 5), (6, 5), 1, 0, 1, False),
    ((3, 10, 7), 2, 3, 1, 1, True),
    ((0, 3, 8, 8), 3, 2, 1, 1, False),
    ((1, 1, 1, 1), 1, 1, 0, 1, False),
]
CONFIG_IDS = [f"{'x'.join(map(str, c[0]))}-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}{'-ceil' if c[5] else ''}" for c in CONFIGS]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same values in another layout (channels-last only for 4-D inputs)."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.repeat_interleave(x, 2, dim=-1)
        return wide[..., ::2]
    return x


def tied_data(shape, dtype, device, *, nan=False, inf=False) -> torch.Tensor:
    """Values from a small set, so windows hold ties; optionally NaNs and -inf (runs of them too)."""
    x = torch.randint(-3, 4, shape, device=device).to(dtype)
    if x.numel() == 0:
        return x
    flat = x.view(-1)
    if nan:
        flat[torch.randperm(flat.numel(), device=device)[: max(1, flat.numel() // 10)]] = float("nan")
    if inf:
        flat[torch.randperm(flat.numel(), device=device)[: max(1, flat.numel() // 3)]] = float("-inf")
    return x


def as_list(v) -> list[int]:
    return [v] if isinstance(v, int) else list(v)


def ours(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(output, indices) of batchops' kernel, called with F.max_pool2d's argument forms (the
    functional runs it only for contiguous CPU inputs; these tests cover every layout)."""
    stride = [] if stride is None else as_list(stride)
    return torch.ops.batchops.max_pool2d(
        x, as_list(kernel_size), stride, as_list(padding), as_list(dilation), ceil_mode
    )


def run_both(x, kernel_size, stride, padding, dilation, ceil_mode):
    window = (kernel_size, stride, padding, dilation, ceil_mode)
    return ours(x, *window), F.max_pool2d(x, *window, return_indices=True)


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape, ours.dtype, ref.dtype)
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaNs differ"
    assert torch.equal(ours.nan_to_num(0), ref.nan_to_num(0)), f"{what}: values differ\n{ours}\n{ref}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_float64(device, layout, config):
    shape, *window = config
    x = laid_out(torch.randn(shape, dtype=f64, device=device), layout).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (out, idx), _ = run_both(x, *window)
    out_ref, idx_ref = F.max_pool2d(x_ref, *window, return_indices=True)
    assert_same(out, out_ref, "output")
    assert torch.equal(idx, idx_ref), "indices"
    assert out.stride() == out_ref.stride() and idx.stride() == idx_ref.stride(), "layout differs from torch's"
    grad = torch.randn_like(out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert_same(x.grad, x_ref.grad, "grad_input")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("special", ["ties", "nan", "neg_inf", "nan_and_neg_inf"])
def test_ties_nan_inf_like_torch(device, dtype, layout, special):
    """Among equal values the first in window order, a NaN always (the last one), an all -inf
    window the first position inside the input: exactly torch's choices, in every dtype."""
    check_special_values(device, dtype, layout, special)


def check_special_values(device, dtype, layout, special):
    torch.manual_seed(0)
    # Rows of 70: 34 interior outputs at stride 2 (two runs of 16 and an overlapping third in
    # the CPU's float32 fast path), 68 at stride 1; and short rows of 14. Channels-last float32
    # compares a vector of channels at a time (4, 8 or 16 by instruction set), the last vector
    # overlapping the one before: 21 channels take that path on every level, 3 and 5 the loop.
    for shape in [(2, 3, 11, 70), (2, 5, 15, 14), (2, 21, 9, 12)]:
        x = laid_out(tied_data(shape, dtype, device, nan="nan" in special, inf="inf" in special), layout)
        for window in [
            (3, 2, 1, 1, False),
            (3, 1, 1, 1, True),
            (2, 2, 0, 1, True),
            ((2, 3), (1, 2), (1, 1), (2, 1), True),
        ]:
            (out, idx), (out_ref, idx_ref) = run_both(x, *window)
            assert_same(out, out_ref, f"output {shape} {window}")
            assert torch.equal(idx, idx_ref), f"indices {shape} {window}"


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("special", ["ties", "nan_and_neg_inf"])
def test_every_cpu_isa_like_torch(monkeypatch, isa, special):
    """float32 runs the kernel compiled for the processor's instruction set: each level alike."""
    cap_cpu_isa(monkeypatch, isa)
    check_special_values("cpu", torch.float32, "contiguous", special)
    check_special_values("cpu", torch.float32, "channels_last", special)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_like_torch(device, dtype, layout):
    """Overlapping windows add several gradients into one input value: the same sums as torch's
    (on the CPU the same order too, so reduced dtypes round alike)."""
    torch.manual_seed(1)
    x = laid_out(tied_data((3, 4, 16, 13), dtype, device), layout).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = ours(x, 3, 1, 1)[0]
    out_ref = F.max_pool2d(x_ref, 3, 1, 1)
    grad = torch.randn(out_ref.shape, device=device).to(dtype)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(out_ref, x_ref, grad)
    if device == "cpu" or dtype in (torch.float32, torch.float64):
        assert_same(g, g_ref, "grad_input")
    else:  # CUDA sums reduced dtypes in float, in its own order
        torch.testing.assert_close(g, g_ref)
    assert g.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("isa", ISA_LEVELS)
@pytest.mark.parametrize("channels", [16, 21, 40])
@pytest.mark.parametrize(
    "window",
    [(3, 2, 1, 1, False), (3, 1, 1, 1, True), ((2, 3), (1, 2), (1, 1), (2, 1), True), ((11, 9), 1, 0, 1, False)],
    ids=["k3s2p1", "k3s1p1-ceil", "k2x3-dilated-ceil", "global"],
)
def test_channels_last_backward_at_every_cpu_isa_is_torchs(monkeypatch, isa, channels, window):
    """Channels-last float32 with 16 channels or more gathers on AVX-512 (16 at a time, the last
    16 overlapping) and scatters elsewhere: the gradient has torch's bits on every level, sums of
    up to nine overlapping windows included, and a window as large as the input."""
    cap_cpu_isa(monkeypatch, isa)
    torch.manual_seed(2)
    x = laid_out(tied_data((2, channels, 11, 9), torch.float32, "cpu"), "channels_last").requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = ours(x, *window)[0]
    out_ref = F.max_pool2d(x_ref, *window)
    grad = torch.randn(out_ref.shape).contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(out_ref, x_ref, grad)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_with_indices_outside_their_windows_is_torchs(layout):
    """Indices not from the forward, in range but outside their output's window: each gradient
    lands where its index points, as torch's CPU backward puts it (the channels-last gather
    finds them unmatched and scatters instead)."""
    torch.manual_seed(3)
    x = laid_out(torch.randn(2, 32, 8, 8), layout)
    out, idx = torch.ops.batchops.max_pool2d(x, [2], [2], [0], [1], False)
    idx = torch.where(torch.rand(idx.shape) < 0.1, torch.randint_like(idx, 0, 64), idx)
    grad = torch.randn_like(out)
    ours_grad = torch.ops.batchops.max_pool2d_backward(grad, idx, list(x.shape), [2], [2], [0], [1])
    torch_grad = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    assert torch.equal(ours_grad, torch_grad)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.batchops.max_pool2d_backward(grad, idx + 64, list(x.shape), [2], [2], [0], [1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 1, 1), (1, 3, 4, 4)], ids=["2x3x4x4", "2x3x1x1", "1x3x4x4"])
def test_backward_layout_with_one_by_one_output(device, layout, shape):
    """A window as large as the input leaves a 1x1 output, whose indices are contiguous in both
    layouts: the gradient must still come back in the input's layout, as torch's does (its
    backward is handed the input; ours reads the layout from the indices' strides)."""
    x = laid_out(torch.randn(shape, device=device), layout).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    kernel = list(shape[2:])
    (g,) = torch.autograd.grad(ours(x, kernel)[0].sum(), x)
    (g_ref,) = torch.autograd.grad(F.max_pool2d(x_ref, kernel).sum(), x_ref)
    assert_same(g, g_ref, "grad_input")
    assert g.stride() == g_ref.stride()


def test_large_plane_matches_torch():
    """resnet's stem at a training size, whose planes span many tasks of the parallel loop."""
    x = torch.randn(4, 64, 56, 56)
    (out, idx), (out_ref, idx_ref) = run_both(x, 3, 2, 1, 1, False)
    assert torch.equal(out, out_ref) and torch.equal(idx, idx_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[:8], ids=CONFIG_IDS[:8])
def test_gradcheck(device, config):
    shape, *window = config
    x = torch.randn(shape, dtype=f64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ours(t, *window)[0], (x,))


def opcheck_samples(device):
    samples = {}
    for name, (shape, k, s, p, d, ceil) in zip(CONFIG_IDS, CONFIGS):
        x = torch.randn(shape, device=device, requires_grad=True)
        samples[name] = (
            x,
            as_list(k),
            [] if s is None else as_list(s),
            as_list(p),
            as_list(d),
            ceil,
        )
    x = torch.randn(2, 3, 10, 10, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    samples["channels_last"] = (x, [3], [2], [1], [1], False)
    return samples


SAMPLE_NAMES = list(opcheck_samples("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_opcheck(device, name):
    torch.library.opcheck(torch.ops.batchops.max_pool2d, opcheck_samples(device)[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_opcheck(device, layout):
    x = laid_out(torch.randn(2, 3, 9, 8, device=device), layout)
    out, idx = torch.ops.batchops.max_pool2d(x, [3], [2], [1], [1], False)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.batchops.max_pool2d_backward, (grad, idx, list(x.shape), [3], [2], [1], [1]))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: batchops.functional.max_pool2d(x[0, 0], 2), RuntimeError, "input must be"),
        (lambda x: batchops.functional.max_pool2d(x[:, :0], 2), RuntimeError, "input must be"),
        (lambda x: batchops.functional.max_pool2d(x, (2, 2, 2)), RuntimeError, "kernel_size must be"),
        (lambda x: batchops.functional.max_pool2d(x, 2, (1, 1, 1)), RuntimeError, "stride must be"),
        (lambda x: batchops.functional.max_pool2d(x, 0), RuntimeError, "kernel_size must be greater than zero"),
        (lambda x: batchops.functional.max_pool2d(x, 2, 0), RuntimeError, "stride must be greater than zero"),
        (lambda x: batchops.functional.max_pool2d(x, 2, 1, 0, 0), RuntimeError, "dilation must be greater than zero"),
        (
            lambda x: batchops.functional.max_pool2d(x, 3, 1, 2),
            RuntimeError,
            "padding must be non-negative and at most",
        ),
        (lambda x: batchops.functional.max_pool2d(x, 3, 1, -1), RuntimeError, "padding must be non-negative"),
        (lambda x: batchops.functional.max_pool2d(x, 9), RuntimeError, "output size is too small"),
    ],
)
def test_errors(call, error, match):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(error, match=match):
        call(x)


def test_errors_torch_agrees():
    """Each argument test_errors refuses, torch refuses too (RuntimeError)."""
    x = torch.randn(2, 3, 8, 8)
    for args in [((2, 2, 2),), (2, (1, 1, 1)), (0,), (2, 0), (2, 1, 0, 0), (3, 1, 2), (9,)]:
        with pytest.raises(RuntimeError):
            F.max_pool2d(x, *args)
        with pytest.raises(RuntimeError):
            batchops.functional.max_pool2d(x, *args)


def test_op_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(NotImplementedError, match="input must be float32"):
        torch.ops.batchops.max_pool2d(x.to(torch.int32), [2], [], [0], [1], False)
    out, idx = torch.ops.batchops.max_pool2d(x, [2], [], [0], [1], False)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        torch.ops.batchops.max_pool2d_backward(out, idx.int(), list(x.shape), [2], [2], [0], [1])
    with pytest.raises(RuntimeError, match="grad_output's shape"):
        torch.ops.batchops.max_pool2d_backward(out[:1], idx, list(x.shape), [2], [2], [0], [1])
    with pytest.raises(RuntimeError, match="input_size"):
        torch.ops.batchops.max_pool2d_backward(out, idx, [2, 4, 8, 8], [2], [2], [0], [1])
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.batchops.max_pool2d_backward(out, idx + 64, list(x.shape), [2], [2], [0], [1])
    # window arguments other than the forward's (4x4 indices from an 8x8 input need kernel 2, stride 2)
    with pytest.raises(RuntimeError, match="are not max_pool2d's output"):
        torch.ops.batchops.max_pool2d_backward(out, idx, list(x.shape), [3], [1], [0], [1])
    # ceil_mode's output size is accepted too (the backward has no ceil_mode argument)
    out, idx = torch.ops.batchops.max_pool2d(torch.randn(1, 2, 7, 7), [2], [2], [0], [1], True)
    grad = torch.ops.batchops.max_pool2d_backward(torch.ones_like(out), idx, [1, 2, 7, 7], [2], [2], [0], [1])
    assert grad.sum() == out.numel()


def test_no_double_backward():
    x = torch.randn(1, 2, 6, 6, dtype=f64, requires_grad=True)
    out = ours(x, 2)[0]
    grad_output = torch.randn_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, x, grad_output, create_graph=True)
    with pytest.raises(RuntimeError, match="gradient of max_pool2d's gradient"):
        g.sum().backward()


def test_backward_keeps_no_input():
    """The backward keeps the indices and the input's size: freeing the input is possible."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = x * 2
    out = ours(y, 2)[0]
    saved = [t for t in (getattr(out.grad_fn, "saved_tensors", None) or [])]
    assert all(t.dtype == torch.int64 for t in saved)


@pytest.mark.parametrize(
    "device,layout,isa,runs_ours",
    [
        ("cpu", "contiguous", None, True),
        ("cpu", "unbatched", None, True),
        ("cpu", "channels_last", "avx512", True),
        ("cpu", "channels_last", "avx2", False),
        ("cpu", "channels_last", "default", False),
    ]
    + [pytest.param("cuda", "contiguous", None, False, marks=pytest.mark.cuda)],
)
def test_module_runs_batchops_kernel_where_faster(monkeypatch, device, layout, isa, runs_ours):
    """batchops.MaxPool2d / functional.max_pool2d run batchops' kernel on the CPU for contiguous
    inputs and for channels-last float32 where the AVX-512 kernels run, torch's elsewhere (its
    channels-last kernel as fast as our AVX2 one; CUDA not yet measured)."""
    if isa is not None:
        cap_cpu_isa(monkeypatch, isa)
    x = torch.randn(2, 3, 8, 8, device=device)
    x = x[0] if layout == "unbatched" else laid_out(x, layout)
    x.requires_grad_(True)
    with RecordOps() as rec:
        out = batchops.MaxPool2d(3, 2, 1)(x)
        out.sum().backward()
    ran_ours = "max_pool2d" in rec.ops and "max_pool2d_backward" in rec.ops
    assert ran_ours == runs_ours and ("max_pool2d_with_indices" in rec.ops) != runs_ours
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1))


def test_falls_back_to_torch_where_no_kernel():
    x = torch.randint(0, 9, (1, 2, 6, 6), dtype=torch.int64)
    assert torch.equal(batchops.functional.max_pool2d(x, 2), F.max_pool2d(x, 2))


@pytest.mark.parametrize("return_indices", [False, True])
def test_module_is_torchs(return_indices):
    ours = batchops.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=return_indices)
    ref = nn.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=return_indices)
    assert repr(ours) == repr(ref) and isinstance(ours, nn.MaxPool2d)
    assert ours.state_dict() == {} and ours.stride == ref.stride
    x = torch.randn(2, 3, 9, 9)
    a, b = ours(x), ref(x)
    if return_indices:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "layout,isa,runs_ours",
    [("contiguous", None, True), ("channels_last", "avx512", True), ("channels_last", "avx2", False)],
)
def test_compiled_module_runs_batchops_kernel(monkeypatch, layout, isa, runs_ours):
    """Under torch.compile the pool stays batchops' op where eager runs it (inductor's own code
    for an NCHW pool is about as slow as torch's eager kernel; in channels-last resnet18's
    compiled step ran at 0.94-0.96x torch's with ours, 0.96-0.97x with inductor's), with the same
    values and gradients as eager, and with one graph: the instruction-set check is taken while
    tracing."""
    if isa is not None:
        cap_cpu_isa(monkeypatch, isa)
    torch._dynamo.reset()  # the check's answer is kept in a graph: none from another test
    model = nn.Sequential(nn.Conv2d(3, 16, 3), batchops.MaxPool2d(3, 2, 1))
    x = laid_out(torch.randn(2, 3, 12, 12), layout).requires_grad_(True)
    model = model.to(memory_format=torch.channels_last) if layout == "channels_last" else model
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert any("batchops.max_pool2d" in t for t in targets) == runs_ours, targets
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    (g,) = torch.autograd.grad(compiled(x).sum(), x)
    (g_ref,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g, g_ref)
    torch._dynamo.reset()
