"""batchops.fuse / unfuse (issue 16): exact fusion counts on torchvision's ResNets and
nn.TransformerEncoderLayer, the batchops ops really dispatched, the same outputs, loss, gradients
and running statistics as the unfused model in float64 (train and eval), state_dicts that load
both ways, a compiled residual net, what is left alone and why, conv-bn folding and the way back.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchops
from batchops.nn.fuse import FusedActivation, FusedTransformerEncoderLayer, Fusion

from tests.helpers import RecordOps

pytestmark = pytest.mark.usefixtures("kernels")

f64 = torch.float64


def resnet(depth: int) -> nn.Module:
    models = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    return randomize_batch_norms({18: models.resnet18, 50: models.resnet50}[depth](num_classes=10))


def mobilenet() -> nn.Module:
    models = pytest.importorskip("torchvision").models
    torch.manual_seed(0)
    return randomize_batch_norms(models.mobilenet_v3_small(num_classes=10))


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    # torchvision zero-fills nothing by default; give the batch norms non-trivial affine
    # parameters and running statistics so that a wrong fusion cannot hide behind ones and zeros.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, activation="gelu", batch_first=True)


class ResidualBlock(nn.Module):
    """A hand-written residual block (not torchvision's): fused through torch.fx."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x
        return torch.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU())
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 8 * 8, 16), nn.GELU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int = 0):
    """Output, loss and gradients by parameter name, after zeroing them (the same RNG state for
    both models: dropout masks match)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    loss = F.mse_loss(out, target) if out.shape == target.shape else F.cross_entropy(out, target)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, loss, grads


def assert_same_step(model: nn.Module, fused: nn.Module, x, target, train: bool) -> None:
    model.train(train)
    fused.train(train)
    out, loss, grads = step(model, x, target)
    fused_out, fused_loss, fused_grads = step(fused, x, target)
    torch.testing.assert_close(fused_out, out)
    torch.testing.assert_close(fused_loss, loss)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(fused_grads[name], grad, msg=lambda m: f"{name}: {m}")


def assert_state_dict_round_trip(model: nn.Module, fused: nn.Module) -> None:
    """Same keys in the same order; each model loads the other's checkpoint (strict)."""
    assert list(fused.state_dict()) == list(model.state_dict())
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            t.copy_(t + 1 if t.is_floating_point() else t + 3)
    fused.load_state_dict(other.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    model.load_state_dict(fused.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


# ---- fusion counts


def test_resnet18_fusion_counts():
    model = resnet(18)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 9, "bn_add_act": 8, "max_pool": 1}
    # The stem, through torch.fx, its max pool too: bn1 pools its own output (BatchNorm2d's max_pool).
    assert Fusion("bn_act", ("bn1", "relu", "maxpool"), "relu", "fx") in report.fused
    (stem,) = [n for n in fused.graph.nodes if n.op == "call_module" and n.target == "bn1"]
    assert stem.kwargs == {"max_pool": (3, 2, 1, 1, False)}
    assert Fusion("bn_add_act", ("layer1.0.bn2", "layer1.0.relu"), "relu", "module") in report.fused
    unfused = {u.module: u.reason for u in report.unfused}
    assert sorted(unfused) == ["fc", "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1"]
    assert "residual" in unfused["layer2.0.downsample.1"]
    assert type(fused.layer1[0]).__name__ == "FusedBasicBlock"  # the blocks' classes and containers stay
    assert Fusion("max_pool", ("maxpool",), None, "module") in report.fused  # then taken into bn1
    assert isinstance(fused.maxpool, FusedActivation) and type(fused.maxpool.original) is batchops.MaxPool2d
    assert isinstance(fused.layer1[0], type(model.layer1[0]))
    assert list(fused.state_dict()) == list(model.state_dict())
    assert type(model.bn1) is nn.BatchNorm2d  # inplace=False: the model itself is untouched


@pytest.mark.slow
def test_resnet50_fusion_counts():
    model = resnet(50)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 33, "bn_add_act": 16, "max_pool": 1}
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_mobilenet_v3_small_fusion_counts():
    """Hardswish fuses like ReLU: 18 batch norms before it, 5 before ReLU, and the classifier's
    Linear + Hardswish; the 6 inverted residuals' projections (``block(x) + x``) fuse their add;
    the other projections (whose output is also the next block's residual) stay."""
    model = mobilenet()
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 23, "bn_add": 6, "linear_act": 1}
    assert Counter(f.activation for f in report.fused) == {"hardswish": 19, "relu": 5, None: 6}
    assert Fusion("bn_add", ("features.3.block.2.1",), None, "fx") in report.fused
    assert len(report.unfused) == 6 and all(
        "not a fusable activation" in u.reason or "2 users" in u.reason for u in report.unfused
    )
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.slow
def test_mobilenet_v2_fusion_counts_and_step():
    """ReLU6 fuses (MobileNetV2's 35 batch norms before it), and the 10 inverted residuals'
    projection + add; the other projections stay (their output is the next block's residual)."""
    models = pytest.importorskip("torchvision").models
    model = randomize_batch_norms(models.mobilenet_v2(num_classes=10))
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 35, "bn_add": 10}
    assert {f.activation for f in report.fused if f.kind == "bn_act"} == {"relu6"}
    assert len(report.unfused) == 8  # 7 projections and the classifier's Linear
    assert_same_step(model.to(f64), fused.to(f64), torch.randn(2, 3, 64, 64, dtype=f64), torch.tensor([1, 7]), True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "googlenet", "convnext_tiny"]
)
def test_other_torchvision_models_same_step(name):
    """fuse on architectures it has no module-level rewrite for (squeeze-excitation, stochastic
    depth, channel shuffle, concatenations, layer norms, permutes): never an error, something
    fused, the same keys, and the same outputs, loss and gradients in float64."""
    models = pytest.importorskip("torchvision").models
    kwargs = dict(aux_logits=False, init_weights=False) if name == "googlenet" else {}
    torch.manual_seed(0)
    model = randomize_batch_norms(models.get_model(name, weights=None, num_classes=10, **kwargs)).to(f64)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.fused
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_step(model, fused, torch.randn(2, 3, 64, 64, dtype=f64), torch.tensor([1, 7]), True)


def test_transformer_encoder_layer_fusion():
    layer = encoder_layer()
    fused, report = batchops.fuse(layer, return_report=True)
    assert report.fused == [Fusion("linear_act", ("linear1", "activation"), "gelu", "module")]
    assert type(fused) is FusedTransformerEncoderLayer
    assert type(fused.linear1) is batchops.Linear and fused.linear1.activation == "gelu"
    assert {u.module for u in report.unfused} == {"linear2", "self_attn.out_proj"}


# ---- the fused kernels really run


def test_batchops_ops_dispatched():
    model = resnet(18)
    fused = batchops.fuse(model)
    x = torch.randn(2, 3, 64, 64)
    with RecordOps() as rec:
        fused(x).sum().backward()
    ops = Counter(rec.ops)
    # 17 fused batch norms (9 + 8); the 3 downsample batch norms stay torch's.
    # The stem's batch norm runs on the pooled quarter (its statistics from batch_norm_stats).
    assert ops["batch_norm_forward"] == ops["batch_norm_backward"] == 17
    assert ops["native_batch_norm"] == 3
    assert ops["relu"] == ops["relu_"] == 0  # every relu went into a batch norm
    # The stem, bn1 + relu + maxpool in one step: the pool of x and batch norm's pass in its backward.
    assert ops["max_pool2d_by_weight_sign"] == ops["max_pool2d_batch_norm_backward"] == ops["batch_norm_stats"] == 1
    assert ops["max_pool2d_backward"] == 0
    assert ops["max_pool2d_with_indices"] == 0
    residuals = [args[3] for op, args in rec.calls if op.overloadpacket.__name__ == "batch_norm_forward"]
    assert sum(r is not None for r in residuals) == 8

    layer = batchops.fuse(encoder_layer())
    with RecordOps() as rec:
        layer(torch.randn(2, 5, 32)).sum().backward()
    ops = Counter(rec.ops)
    assert ops["linear_forward"] == 1 and ops["gelu"] == 0


# ---- the same function, in float64


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet18_same_outputs_loss_grads(train):
    model = resnet(18).to(f64)
    fused = batchops.fuse(model)
    x = torch.randn(2, 3, 64, 64, dtype=f64)
    assert_same_step(model, fused, x, torch.tensor([1, 7]), train)


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_mobilenet_v3_small_same_outputs_loss_grads(train):
    model = mobilenet().to(f64)
    fused = batchops.fuse(model)
    assert_same_step(model, fused, torch.randn(2, 3, 64, 64, dtype=f64), torch.tensor([1, 7]), train)


class HardswishNet(nn.Module):
    """F.hardswish after a batch norm, in place, through torch.fx, and nn.Hardswish after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 12), nn.Hardswish(), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(F.hardswish(self.bn(self.conv(x)), inplace=True))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_fused_hardswish_same_outputs_loss_grads(train):
    torch.manual_seed(0)
    model = randomize_batch_norms(HardswishNet()).to(f64)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 1, "linear_act": 1}
    assert {(f.kind, f.activation, f.via) for f in report.fused} == {
        ("bn_act", "hardswish", "fx"),
        ("linear_act", "hardswish", "module"),
    }
    # Inputs around hardswish's kinks at -3 and 3 come from the batch norm's spread (bias +-0.5).
    x = torch.randn(4, 3, 8, 8, dtype=f64) * 3
    assert_same_step(model, fused, x, torch.tensor([0, 1, 2, 4]), train)
    back = batchops.unfuse(fused)
    assert not any(type(m).__module__.startswith("batchops") for m in back.modules())
    assert_same_step(model, back, x, torch.tensor([0, 1, 2, 4]), train)


class InvertedResidualNet(nn.Module):
    """bn(x) + residual with no activation after it (MobileNet's inverted residuals), in both
    spellings: ``out += x`` (in place, the batch norm's output first) and ``x + bn(...)``; and
    F.relu6 in place after a batch norm."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * channels)
        self.project = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 8 * 8, 5))

    def forward(self, x):
        out = self.bn2(self.project(F.relu6(self.bn1(self.expand(x)), inplace=True)))
        out += x
        out = out + self.bn3(self.conv(out))
        return self.head(out)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_fused_bn_add_same_outputs_loss_grads(train):
    torch.manual_seed(0)
    model = randomize_batch_norms(InvertedResidualNet()).to(f64)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_add": 2, "bn_act": 1}  # bn1 + F.relu6(inplace=True), through fx
    assert {f.modules for f in report.fused} == {("bn1",), ("bn2",), ("bn3",)}
    assert {u.module for u in report.unfused} == {"head.1"}
    x = torch.randn(4, 6, 8, 8, dtype=f64)
    assert_same_step(model, fused, x, torch.tensor([0, 1, 2, 4]), train)
    # The residual's gradient (here the input's, through both adds) as torch's.
    grads = []
    for m in (model, fused):
        xi = x.clone().requires_grad_(True)
        m(xi).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])
    back = batchops.unfuse(fused)
    assert not any(type(m).__module__.startswith("batchops") for m in back.modules())
    assert_same_step(model, back, x, torch.tensor([0, 1, 2, 4]), train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transformer_encoder_layer_same_outputs_loss_grads(train):
    layer = encoder_layer().to(f64)  # dropout 0.1: the same masks, drawn in the same order
    fused = batchops.fuse(layer)
    x = torch.randn(3, 7, 32, dtype=f64)
    assert_same_step(layer, fused, x, torch.randn(3, 7, 32, dtype=f64), train)
    # Eval without autograd takes torch's fast path (torch._transformer_encoder_layer_fwd): it
    # reads the parameters, not the modules, so the fused layer computes what the layer did.
    layer.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), layer(x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_fused_residual_net_same_outputs_loss_grads(train):
    torch.manual_seed(0)
    model = SmallResNet().to(f64)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.counts == {"bn_act": 3, "bn_add_act": 2, "linear_act": 1}
    assert {f.via for f in report.fused if f.kind == "bn_add_act"} == {"fx"}
    assert isinstance(fused.stem[2], FusedActivation)  # Sequential pairs: the activation's slot passes through
    assert_same_step(model, fused, torch.randn(4, 3, 8, 8, dtype=f64), torch.tensor([0, 1, 2, 4]), train)


def test_running_statistics_after_steps():
    model = resnet(18).to(f64)
    fused = batchops.fuse(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, fused)]
    torch.manual_seed(1)
    # 64x64, not smaller: at 32x32 layer4 normalises 2 values per channel (1x1 maps, batch of 2),
    # so ill-conditioned that rounding-level differences grow to 1e-3 within three SGD steps.
    batches = [(torch.randn(2, 3, 64, 64, dtype=f64), torch.randint(0, 10, (2,))) for _ in range(3)]
    for m, opt in zip((model, fused), opts):
        m.train()
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    fused_state = fused.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, msg=lambda m: f"{key}: {m}")
    assert fused_state["layer1.0.bn2.num_batches_tracked"].item() == 3


# ---- checkpoints


def test_state_dict_round_trip():
    model = resnet(18)
    assert_state_dict_round_trip(model, batchops.fuse(model))
    layer = encoder_layer()
    assert_state_dict_round_trip(layer, batchops.fuse(layer))
    small = SmallResNet()
    assert_state_dict_round_trip(small, batchops.fuse(small))


# ---- torch.compile


@pytest.fixture(params=["auto", "torch", "batchops"])
def compiled_batch_norm(request):
    """Each mode of batchops.functional.set_compiled_batch_norm (what batch norm becomes inside torch.compile)."""
    before = batchops.functional.compiled_batch_norm()
    batchops.functional.set_compiled_batch_norm(request.param)
    yield request.param
    batchops.functional.set_compiled_batch_norm(before)


def test_compiled_small_residual_net(compiled_batch_norm):
    torch.manual_seed(0)
    model = SmallResNet().to(f64)
    fused = batchops.fuse(model)
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, keeping dynamo's graph to look at
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, dtype=f64)
    target = torch.tensor([0, 1, 2, 4])
    out, loss, grads = step(model, x, target)
    c_out, c_loss, c_grads = step(compiled, x, target)
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[f"_orig_mod.{name}"], grad)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    batchops_ops = sum("batchops." in t for t in targets)
    # on the CPU "auto" keeps batchops' op, as "batchops" does
    assert batchops_ops == (0 if compiled_batch_norm == "torch" else 5) + 1  # + the fused linear


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_small_residual_net_inductor(layout, dynamic):
    """Inductor's code around batchops' ops (in the graph on the CPU, their inputs in whatever
    layout inductor chose: the ops are tagged flexible_layout) computes the eager step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = SmallResNet().to(memory_format=fmt)
    fused = batchops.fuse(model)
    compiled = torch.compile(fused, dynamic=dynamic or None)
    for n in (4, 6) if dynamic else (4,):
        x = torch.randn(n, 3, 8, 8).contiguous(memory_format=fmt)
        target = torch.arange(n) % 5
        out, loss, grads = step(model, x, target)
        c_out, c_loss, c_grads = step(compiled, x, target)
        torch.testing.assert_close(c_out, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_loss, loss, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[f"_orig_mod.{name}"], grad, rtol=1e-3, atol=1e-5, msg=name)
    for (name, ours), (_, theirs) in zip(fused.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_with_compiled_autograd(tmp_path):
    """A fused model under DistributedDataParallel whose backward compiled autograd captures
    (DDP's python reducer, the way torch.compile runs DDP's gradient hooks in the backward graph):
    the batchops nodes go into that graph and the step is the unfused model's. One gloo rank
    in this process is enough for the mechanics; the multi-rank training paths are in tests/train."""
    import torch.distributed as dist
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = SmallResNet().to(f64)
    fused = batchops.fuse(copy.deepcopy(model))
    x = torch.randn(4, 3, 8, 8, dtype=f64)
    target = torch.tensor([0, 1, 2, 4])
    out, loss, grads = step(model, x, target)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    # config.patch, not monkeypatch: monkeypatch's undo deletes a config option it cannot see in
    # the module's __dict__ (torch's config keeps them elsewhere), and every later torch.compile
    # in the process then fails.
    try:
        with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
            ddp = DistributedDataParallel(fused)
            with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                d_out, d_loss, d_grads = step(ddp, x, target)
    finally:
        dist.destroy_process_group()
    assert counters["compiled_autograd"]["captures"] == 1
    torch.testing.assert_close(d_out, out)
    torch.testing.assert_close(d_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(d_grads[f"module.{name}"], grad, msg=name)


# ---- what fuse leaves alone, and why


class Unmatched(nn.Module):
    """Nothing batchops can fuse, for a different reason each; its forward does not trace."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.BatchNorm1d(4)  # its output has two users
        self.lin = nn.Linear(4, 4)  # followed by tanh
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU())

    def forward(self, x):
        y = self.shared(x)
        z = torch.tanh(self.lin(y)) + y
        return self.inner(z)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Unmatched()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return F.relu(self.bn(self.body(x)))


def test_unmatched_model_is_left_as_it_is():
    torch.manual_seed(0)
    model = Untraceable().to(f64)
    fused, report = batchops.fuse(model, return_report=True)
    assert report.fused == []
    assert type(fused) is Untraceable and type(fused.body) is Unmatched
    reasons = {u.module: u.reason for u in report.unfused}
    assert reasons.keys() == {"body.shared", "body.lin", "body.inner.0", "bn"}
    assert "2 users" in reasons["body.shared"]
    assert "tanh" in reasons["body.lin"]
    assert "LeakyReLU" in reasons["body.inner.0"]
    assert any("not traced with torch.fx" in note for note in report.notes)
    x = torch.randn(5, 4, dtype=f64)
    torch.testing.assert_close(fused(x), model(x))


def test_hooks_and_shared_modules_are_not_fused():
    torch.manual_seed(0)
    seen = []
    bn = nn.BatchNorm2d(3)
    bn.register_forward_hook(lambda m, i, o: seen.append(o))
    relu = nn.ReLU()
    twice = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, relu, twice, nn.ReLU(), twice, nn.ReLU())
    fused, report = batchops.fuse(model, inplace=True, return_report=True)
    assert fused is model and fused[0] is bn  # inplace=True: the same module, rewritten where it could be
    assert "hooks" in {u.module: u.reason for u in report.unfused}["0"]
    # A Sequential calls its children one by one, so the shared batch norm is fused in both slots
    # (one batchops module sharing its parameters and buffers): still the same function.
    assert report.counts == {"bn_act": 2}


# ---- fold_conv_bn


def test_fold_conv_bn_is_for_eval():
    model = resnet(18)
    with pytest.raises(ValueError, match="eval"):
        batchops.fuse(model, fold_conv_bn=True)
    model = model.to(f64).eval()
    folded, report = batchops.fuse(model, fold_conv_bn=True, return_report=True)
    assert report.counts == {"conv_bn": 20, "max_pool": 1}  # every batch norm of resnet18 follows a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64, dtype=f64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


# ---- the way back


def test_unfuse():
    model = resnet(18).to(f64)
    fused = batchops.fuse(model)
    back = batchops.unfuse(fused)
    assert not any(type(m).__module__.startswith("batchops") for m in back.modules())
    assert type(back.layer1[0]) is type(model.layer1[0])
    assert type(back.bn1) is nn.BatchNorm2d
    # The stem's pool, fused into bn1, is a call in the graph again; its slot holds the module.
    assert type(back.maxpool) is nn.MaxPool2d and any(n.target is F.max_pool2d for n in back.graph.nodes)
    assert list(back.state_dict()) == list(model.state_dict())
    assert_same_step(model, back, torch.randn(2, 3, 32, 32, dtype=f64), torch.tensor([3, 4]), train=True)

    small = SmallResNet().to(f64)
    back = batchops.unfuse(batchops.fuse(small))
    assert not any(type(m).__module__.startswith("batchops") for m in back.modules())
    assert type(back.stem[2]) is nn.SiLU
    assert_same_step(small, back, torch.randn(4, 3, 8, 8, dtype=f64), torch.tensor([0, 1, 2, 4]), train=True)

    layer = encoder_layer()
    back = batchops.unfuse(batchops.fuse(layer))
    assert type(back) is nn.TransformerEncoderLayer and type(back.linear1) is nn.Linear


def test_fused_model_pickles():
    model = resnet(18)
    fused = batchops.fuse(model).eval()
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x))
