"""The ops' short way in from Python (csrc/common/python_entry.h, batchops.ops.common.op_caller).

batchops._C.<op> must be the same call as torch.ops.batchops.<op> for plain tensors (same
results bit for bit, same autograd, dispatch modes and profiler events, same errors), and must
decline (NotImplemented) whatever it does not convert exactly, so that op_caller hands it to
torch.ops: tensor subclasses, torch-function modes, fake tensors, arguments of other types.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import batchops
from batchops._extension import compiled_module

from tests.helpers import DEVICES, RecordOps

pytestmark = pytest.mark.usefixtures("kernels")


def _batch_norm_state():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    w = torch.nn.Parameter(torch.rand(3, generator=g) + 0.5)
    b = torch.nn.Parameter(torch.rand(3, generator=g))
    _, save_mean, save_invstd, _, _ = torch.ops.batchops.batch_norm_forward.default(
        x, w, b, None, None, None, True, 0.1, None, 1e-5, "relu"
    )
    return g, x, w, b, save_mean, save_invstd


def _linear_state(grouped: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g)
    if grouped:
        w, b, sizes = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g), torch.tensor([2, 4])
        out, saved, offsets = torch.ops.batchops.grouped_linear_forward.default(x, w, b, sizes, "gelu", True)
        return g, x, w, b, sizes, out, saved, offsets
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    out, saved = torch.ops.batchops.linear_forward.default(x, w, b, "gelu", True)
    return g, x, w, b, out, saved


def _args(name: str) -> tuple:
    """Plain arguments of a valid call of every batchops op."""
    if name.startswith("batch_norm"):
        g, x, w, b, save_mean, save_invstd = _batch_norm_state()
        dy = torch.randn(x.shape, generator=g)
        mean_g, mean_gxhat = torch.randn(3, generator=g), torch.randn(3, generator=g)
        return {
            "batch_norm_forward": (x, w, b, None, torch.zeros(3), torch.ones(3), True, 0.1, None, 1e-5, "relu"),
            "batch_norm_backward": (dy, x, w, b, None, save_mean, save_invstd, True, "relu", [True, True, True, False]),
            "batch_norm_stats": (x,),
            "batch_norm_backward_elemt": (
                dy,
                x,
                w,
                b,
                None,
                save_mean,
                save_invstd,
                mean_g,
                mean_gxhat,
                "relu",
                (True, False),
            ),
        }[name]
    if name == "linear_forward":
        _, x, w, b, _, _ = _linear_state(False)
        return (x, w, b, "gelu", True)
    if name == "linear_backward":
        g, x, w, b, out, saved = _linear_state(False)
        return (torch.randn(out.shape, generator=g), x, w, b, out, saved, "gelu", [True, True, True])
    if name == "grouped_linear_forward":
        _, x, w, b, sizes, _, _, _ = _linear_state(True)
        return (x, w, b, sizes, "gelu", True)
    if name == "grouped_linear_backward":
        g, x, w, b, sizes, out, saved, offsets = _linear_state(True)
        return (torch.randn(out.shape, generator=g), x, w, b, sizes, out, saved, "gelu", [True] * 3, offsets)
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(2))
    if name == "max_pool2d":
        return (x, [3, 2], (2, 2), [1, 0], [1, 1], True)
    if name == "max_pool2d_backward":
        out, indices = torch.ops.batchops.max_pool2d.default(x, [3, 2], [2, 2], [1, 0], [1, 1], True)
        return (torch.randn(out.shape), indices, list(x.shape), [3, 2], [2, 2], [1, 0], [1, 1])
    if name == "max_pool2d_batch_norm_backward":
        out, indices = torch.ops.batchops.max_pool2d.default(x, [3, 2], [2, 2], [1, 0], [1, 1], True)
        return (torch.randn(out.shape), indices, x, torch.randn(4, 3), [3, 2], [2, 2], [1, 0], [1, 1])
    if name == "max_pool2d_by_weight_sign":
        return (x, torch.tensor([0.5, -1.0, 2.0]), [3, 2], (2, 2), [1, 0], [1, 1], True)
    assert name == "gather_rows", name
    return (x.view(6, 56), torch.tensor([5, -1, 0, 2]), None, 0.5)


def _registered_ops() -> list[str]:
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("batchops::"))


OPS = [
    "batch_norm_forward", "batch_norm_backward", "batch_norm_stats", "batch_norm_backward_elemt",
    "linear_forward", "linear_backward", "grouped_linear_forward", "grouped_linear_backward",
    "max_pool2d", "max_pool2d_backward", "max_pool2d_batch_norm_backward", "max_pool2d_by_weight_sign",
    "gather_rows",
]  # fmt: skip


def _outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def test_every_op_has_an_entry():
    assert _registered_ops() == sorted(OPS)
    for name in OPS:
        assert callable(getattr(compiled_module(), name)), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_entry_matches_torch_ops(name, device):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _args(name))
    ours = getattr(compiled_module(), name)(*args)
    assert ours is not NotImplemented
    theirs = getattr(torch.ops.batchops, name).default(*args)
    assert type(ours) is type(theirs)
    for a, b in zip(_outputs(ours), _outputs(theirs), strict=True):
        assert type(a) is torch.Tensor
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_entry_takes_ints_for_floats_and_scalars():
    x = torch.randn(4, 3)
    index = torch.tensor([1, -1, 3])
    for fill in (2, 2.0, True):
        ours = compiled_module().gather_rows(x, index, None, fill)
        assert torch.equal(ours, torch.ops.batchops.gather_rows.default(x, index, None, fill))
    args = list(_args("batch_norm_forward"))
    args[7], args[9] = 0, 1  # momentum and eps as Python ints
    ours = compiled_module().batch_norm_forward(*args)
    theirs = torch.ops.batchops.batch_norm_forward.default(*args)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


class _Subclass(torch.Tensor):
    pass


class _RecordFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def _declined_calls():
    """(description, args) of batch_norm_forward calls the entry must hand back to torch.ops."""
    args = _args("batch_norm_forward")
    with_arg = lambda i, v: (*args[:i], v, *args[i + 1 :])  # noqa: E731
    return [
        ("a tensor subclass input", with_arg(0, args[0].as_subclass(_Subclass))),
        ("a tensor subclass weight", with_arg(1, args[1].detach().as_subclass(_Subclass))),
        ("a NumPy float", with_arg(9, np.float64(1e-5))),
        ("a list for a tensor", with_arg(0, args[0].tolist())),
        ("an int for a bool", with_arg(6, 1)),
        ("a tensor for a float", with_arg(7, torch.tensor(0.1))),
        ("a missing argument", args[:-1]),
        ("one argument too many", (*args, None)),
    ]


@pytest.mark.parametrize("case", _declined_calls(), ids=lambda c: c[0])
def test_entry_declines_what_it_does_not_convert_exactly(case):
    _, args = case
    assert compiled_module().batch_norm_forward(*args) is NotImplemented


def test_entry_declines_lists_of_other_things():
    x, kernel, stride, padding, dilation, ceil = _args("max_pool2d")
    entry = compiled_module().max_pool2d
    assert entry(x, 3, stride, padding, dilation, ceil) is NotImplemented  # one int for int[2]
    assert entry(x, [3.0, 2.0], stride, padding, dilation, ceil) is NotImplemented
    assert entry(x, [True, 2], stride, padding, dilation, ceil) is NotImplemented
    assert entry(x, [2**70, 2], stride, padding, dilation, ceil) is NotImplemented
    dy, *rest = _args("batch_norm_backward")
    assert compiled_module().batch_norm_backward(dy, *rest[:-1], [True, True]) is NotImplemented
    assert compiled_module().batch_norm_backward(dy, *rest[:-1], [1, 1, 1, 0]) is NotImplemented


def test_entry_declines_under_a_torch_function_mode_and_op_caller_goes_through_torch_ops():
    args = _args("batch_norm_forward")
    with _RecordFunctions() as mode:
        assert compiled_module().batch_norm_forward(*args) is NotImplemented
        out = batchops.ops.batch_norm_forward(*args)
    assert mode.funcs == [torch.ops.batchops.batch_norm_forward.default]
    assert torch.equal(out[0], torch.ops.batchops.batch_norm_forward.default(*args)[0])


def test_op_caller_takes_subclasses_and_other_types_through_torch_ops():
    args = _args("batch_norm_forward")
    expected = torch.ops.batchops.batch_norm_forward.default(*args)[0]
    sub = batchops.ops.batch_norm_forward(args[0].as_subclass(_Subclass), *args[1:])[0]
    assert type(sub) is _Subclass and torch.equal(sub.as_subclass(torch.Tensor), expected)
    eps = batchops.ops.batch_norm_forward(*args[:9], np.float64(1e-5), args[10])[0]
    assert torch.equal(eps, expected)
    x, *rest = _args("max_pool2d")
    assert torch.equal(batchops.ops.max_pool2d(x, 3, 2)[0], torch.nn.functional.max_pool2d(x, 3, 2))


def test_op_caller_raises_torch_ops_errors():
    args = list(_args("batch_norm_forward"))
    args[10] = "swish"
    with pytest.raises(ValueError, match="activation must be one of") as ours:
        batchops.ops.batch_norm_forward(*args)
    with pytest.raises(ValueError) as theirs:
        torch.ops.batchops.batch_norm_forward.default(*args)
    assert str(ours.value) == str(theirs.value)
    args[10] = 3  # not a string: torch.ops' schema check
    with pytest.raises(RuntimeError) as ours:
        batchops.ops.batch_norm_forward(*args)
    with pytest.raises(RuntimeError) as theirs:
        torch.ops.batchops.batch_norm_forward.default(*args)
    assert str(ours.value) == str(theirs.value)


def test_entry_calls_reach_dispatch_modes_and_the_profiler():
    args = _args("batch_norm_forward")
    with RecordOps() as rec:
        compiled_module().batch_norm_forward(*args)
    assert rec.ops == ["batch_norm_forward"]
    with torch.profiler.profile() as prof:
        compiled_module().batch_norm_forward(*args)
    assert "batchops::batch_norm_forward" in {e.name for e in prof.events()}


def test_entry_keeps_autograd():
    x, w, b, residual, rm, rv, *rest = _args("batch_norm_forward")
    grads = []
    for call in (compiled_module().batch_norm_forward, torch.ops.batchops.batch_norm_forward.default):
        xg = x.clone().requires_grad_()
        out = call(xg, w, b, residual, rm, rv, *rest)[0]
        assert out.grad_fn is not None
        grads.append(torch.autograd.grad(out.square().sum(), (xg, w, b)))
    for ours, theirs in zip(*grads, strict=True):
        assert torch.equal(ours, theirs)


def test_op_caller_under_fake_tensors():
    args = _args("batch_norm_forward")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = batchops.ops.batch_norm_forward(*fake)
    assert out[0].shape == args[0].shape


def test_entry_with_meta_tensors():
    # Plain tensors on the meta device: the entry dispatches to the fake kernels registered from Python.
    args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _args("batch_norm_forward"))
    ours = compiled_module().batch_norm_forward(*args)
    theirs = torch.ops.batchops.batch_norm_forward.default(*args)
    for a, b in zip(ours, theirs, strict=True):
        assert a.device.type == "meta" and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
