"""The hand-written backward nodes of every differentiable op (csrc/*/autograd.cpp, built as
torch's generated nodes are: csrc/common/autograd.h): the autograd mechanics a torch op has must
hold for ours. Values against torch are each op's own test module's job; here each op's gradient
is compared with itself through the mechanism under test."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from batchops import functional as BF
from batchops.ops.packing import gather_rows

from tests.helpers import DEVICES

pytestmark = pytest.mark.usefixtures("kernels")

f64 = torch.float64


@dataclass
class Case:
    node: str  # grad_fn.name()
    edges: int  # next edges: one per differentiable argument, present or not
    saved: int  # tensors the node saves (what saved-tensor hooks see)
    leaves: Callable[[], dict[str, torch.Tensor]]  # the float64 inputs (on the CPU; _setup moves them)
    run: Callable[..., torch.Tensor]


def _bn_leaves():
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 5)
    return {
        "x": torch.randn(shape, generator=g, dtype=f64) * 1.7 + 0.4,
        "w": torch.rand(3, generator=g, dtype=f64) + 0.5,
        "b": torch.randn(3, generator=g, dtype=f64),
        "z": torch.randn(shape, generator=g, dtype=f64),
    }


def _linear_leaves(grouped=False):
    g = torch.Generator().manual_seed(0)
    G = (2,) if grouped else ()
    return {
        "x": torch.randn(*G, 5, 7, generator=g, dtype=f64),
        "w": torch.randn(*G, 4, 7, generator=g, dtype=f64) * 0.3,
        "b": torch.randn(*G, 4, generator=g, dtype=f64),
    }


def _pool_leaves():
    return {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=f64)}


def _rows_leaves():
    return {"x": torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=f64)}


_ROW_INDEX = torch.tensor([4, -1, 0, 2, 2])

CASES = {
    # input, weight, bias, residual, save_mean, save_invstd
    "batch_norm": Case(
        "batchops::BatchNormBackward",
        4,
        6,
        _bn_leaves,
        lambda p: BF.batch_norm(p["x"], None, None, p["w"], p["b"], True, activation="relu", residual=p["z"]),
    ),
    # input, weight, bias, output (read for relu), saved (empty for relu)
    "linear_relu": Case(
        "batchops::LinearBackward", 3, 5, _linear_leaves, lambda p: BF.linear(p["x"], p["w"], p["b"], activation="relu")
    ),
    # input, weight, bias, saved (the derivative)
    "linear_gelu": Case(
        "batchops::LinearBackward", 3, 4, _linear_leaves, lambda p: BF.linear(p["x"], p["w"], p["b"], activation="gelu")
    ),
    # input, weight, bias, saved, group offsets
    "grouped_linear_silu": Case(
        "batchops::GroupedLinearBackward",
        3,
        5,
        lambda: _linear_leaves(grouped=True),
        lambda p: BF.grouped_linear(p["x"], p["w"], p["b"], activation="silu"),
    ),
    # indices only
    "max_pool2d": Case("batchops::MaxPool2dBackward", 1, 1, _pool_leaves, lambda p: BF.max_pool2d(p["x"], 3, 2, 1)),
    # index (no inverse index given)
    "gather_rows": Case(
        "batchops::GatherRowsBackward",
        1,
        1,
        _rows_leaves,
        lambda p: gather_rows(p["x"], _ROW_INDEX.to(p["x"].device)),
    ),
}


def _setup(name, device):
    case = CASES[name]
    leaves = {k: v.to(device).requires_grad_() for k, v in case.leaves().items()}
    y = case.run(leaves)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=f64).to(device)
    return case, leaves, gy


def _grads(y, leaves, gy, **kwargs):
    return torch.autograd.grad(y, list(leaves.values()), gy, **kwargs)


def _assert_equal(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_node_and_edges(device, name):
    """One node per call, an edge per differentiable argument; no node when nothing can flow."""
    case, leaves, _ = _setup(name, device)
    y = case.run(leaves)
    assert y.grad_fn.name() == case.node
    assert len(y.grad_fn.next_functions) == case.edges
    assert all(fn is not None for fn, _ in y.grad_fn.next_functions[: len(leaves)])
    for t in leaves.values():
        t.requires_grad_(False)
    assert case.run(leaves).grad_fn is None
    for t in leaves.values():
        t.requires_grad_()
    with torch.no_grad():
        assert case.run(leaves).grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_gradient_for_one_input_only(device, name):
    """Only the first input requires grad: its gradient is the one from the full graph."""
    case, leaves, gy = _setup(name, device)
    expected = _grads(case.run(leaves), leaves, gy)
    first, *rest = leaves
    for k in rest:
        leaves[k].requires_grad_(False)
    y = case.run(leaves)
    (got,) = torch.autograd.grad(y, [leaves[first]], gy)
    torch.testing.assert_close(got, expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_saved_tensors_are_freed(device, name):
    """A second backward without retain_graph raises as torch's does; with it, it repeats."""
    case, leaves, gy = _setup(name, device)
    y = case.run(leaves)
    first = _grads(y, leaves, gy, retain_graph=True)
    _assert_equal(_grads(y, leaves, gy), first)
    if case.saved:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            _grads(y, leaves, gy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in CASES if n not in ("max_pool2d", "gather_rows")])
def test_inplace_change_of_a_saved_input_is_detected(device, name):
    """An input changed in place after the forward call makes backward raise (version counter).
    (max_pool2d and gather_rows keep no input.)"""
    case, leaves, gy = _setup(name, device)
    y = case.run(leaves)
    with torch.no_grad():
        leaves["x"].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(y, leaves, gy)


def test_inplace_change_of_a_saved_output_is_detected():
    """linear + relu saves its own output (backward reads y > 0): changing it in place is caught."""
    case, leaves, gy = _setup("linear_relu", "cpu")
    y = case.run(leaves)
    y.add_(1)  # autograd records the add; the saved output's version no longer matches
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(y, leaves, gy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_saved_tensor_hooks_see_every_saved_tensor(device, name):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading, checkpointing tools) see
    each tensor a node saves, and the gradients through them are the same."""
    case, leaves, gy = _setup(name, device)
    expected = _grads(case.run(leaves), leaves, gy)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.clone()

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = case.run(leaves)
    assert len(packed) == case.saved
    got = _grads(y, leaves, gy)
    assert len(unpacked) == case.saved
    _assert_equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_mode(device, name):
    case, leaves, gy = _setup(name, device)
    expected = _grads(case.run(leaves), leaves, gy)
    with torch.autograd.detect_anomaly(check_nan=True):
        _assert_equal(_grads(case.run(leaves), leaves, gy), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_forward_ad_is_refused(device, name):
    """No forward-mode derivatives: a dual input raises NotImplementedError, as torch's ops without
    one do, instead of silently dropping the tangent."""
    import torch.autograd.forward_ad as fwAD

    case, leaves, _ = _setup(name, device)
    plain = {k: v.detach() for k, v in leaves.items()}
    with fwAD.dual_level():
        dual = dict(plain, x=fwAD.make_dual(plain["x"], torch.ones_like(plain["x"])))
        with pytest.raises(NotImplementedError, match="forward AD with batchops"):
            case.run(dual)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_double_backward(device):
    """gather_rows' backward is differentiable (one more gather, or index_add): its node's apply
    builds a graph under create_graph=True."""
    x = torch.randn(5, 3, dtype=f64, device=device, requires_grad=True)
    index = _ROW_INDEX.to(device)
    torch.autograd.gradgradcheck(lambda t: gather_rows(t, index), (x,))


def _capturing_aot_eager(captured):
    """torch.compile's aot_eager backend (fake-tensor tracing, no code generation), keeping each
    graph it is given in `captured`."""

    def compiler(gm, example_inputs):
        captured.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return torch.compile(backend=compiler, fullgraph=True)


def _compiled_backward(run, leaves, gy, compiled):
    """Backward of (run(leaves) * gy).sum() under compiled autograd (the backward pass traced and
    run through `compiled`, a torch.compile); the leaves' gradients."""
    from torch._dynamo import compiled_autograd

    for t in leaves.values():
        t.grad = None
    loss = (run(leaves) * gy).sum()
    with compiled_autograd._enable(compiled):
        loss.backward()
    return [t.grad for t in leaves.values()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_compiled_autograd(device, name):
    """Compiled autograd (torch._dynamo.compiled_autograd, torch.compile of the backward pass)
    puts each node into its graph (compiled_args / apply_with_saved) and traces its backward with
    fake tensors (aot_eager): the gradients are eager autograd's, and a second backward of the same
    graph reuses the captured one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    case, leaves, gy = _setup(name, device)
    expected = _grads(case.run(leaves), leaves, gy)
    captured = []
    compiled = _capturing_aot_eager(captured)
    for _ in range(2):
        got = _compiled_backward(case.run, leaves, gy, compiled)
        torch.testing.assert_close(got, list(expected))
    assert counters["compiled_autograd"]["captures"] == 1
    assert re.sub(r"\W", "_", case.node) in captured[0].code  # the node's backward, in the graph


def test_compiled_autograd_keys_on_the_nodes_fields():
    """A node's plain fields (here the activation) are part of compiled autograd's cache key: the
    same graph with SiLU after ReLU is captured again, not run with ReLU's backward."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, leaves, gy = _setup("batch_norm", "cpu")
    compiled = _capturing_aot_eager([])
    for activation in ("relu", "silu"):

        def run(p, activation=activation):
            return BF.batch_norm(p["x"], None, None, p["w"], p["b"], True, activation=activation, residual=p["z"])

        expected = _grads(run(leaves), leaves, gy)
        torch.testing.assert_close(_compiled_backward(run, leaves, gy, compiled), list(expected))
    assert counters["compiled_autograd"]["captures"] == 2


def _sized_case(name, size):
    """An input of `size` (rows, or height and width) for the nodes with sizes among their fields
    (max_pool2d keeps the input's size, gather_rows its row count) and for batch norm."""
    g = torch.Generator().manual_seed(size)
    if name == "max_pool2d":
        leaves = {"x": torch.randn(2, 3, size, size, generator=g, dtype=f64)}
        run = CASES[name].run
    elif name == "gather_rows":
        leaves = {"x": torch.randn(size, 3, generator=g, dtype=f64)}
        run = CASES[name].run
    else:
        leaves = {"x": torch.randn(size, 3, 5, generator=g, dtype=f64), "w": torch.rand(3, generator=g, dtype=f64)}

        def run(p):
            return BF.batch_norm(p["x"], None, None, p["w"], None, True, activation="silu")

    return {k: v.requires_grad_() for k, v in leaves.items()}, run


@pytest.mark.parametrize("name", ["max_pool2d", "gather_rows", "batch_norm"])
def test_compiled_autograd_dynamic_sizes(name):
    """Compiled autograd (dynamic by default) captures the backward once with symbolic sizes (the
    nodes' SymInt fields go in as symbols, not constants) and runs it for three input sizes: each
    one's gradients are eager autograd's. (batch_norm: an absent bias, whose gradient is not wanted.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = _capturing_aot_eager([])
    for size in (6, 8, 10):
        leaves, run = _sized_case(name, size)
        gy = torch.randn(run(leaves).shape, generator=torch.Generator().manual_seed(1), dtype=f64)
        expected = _grads(run(leaves), leaves, gy)
        torch.testing.assert_close(_compiled_backward(run, leaves, gy, compiled), list(expected))
    assert counters["compiled_autograd"]["captures"] == 1


@pytest.mark.parametrize("name", ["batch_norm", "linear_relu"])
def test_compiled_autograd_with_saved_tensor_hooks(name):
    """Saved tensors packed by saved_tensors_hooks are unpacked inside the compiled backward (the
    hook runs in its graph): the gradients are eager autograd's. linear_relu saves its own output."""
    torch._dynamo.reset()
    case, leaves, gy = _setup(name, "cpu")
    expected = _grads(case.run(leaves), leaves, gy)
    unpacked = []

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), unpack):
        got = _compiled_backward(case.run, leaves, gy, _capturing_aot_eager([]))
    torch.testing.assert_close(got, list(expected))
    assert len(unpacked) == case.saved + 1  # and the loss's multiply by gy, which saves gy
