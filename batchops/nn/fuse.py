"""batchops.fuse: put batchops' fused kernels where a model has the patterns they cover.

Patterns (issue 16):

* ``bn_act``: a batch norm (torch's BatchNorm1d/2d/3d or SyncBatchNorm, or batchops' without an
  activation) whose output goes only to a ReLU, SiLU, GELU, Hardswish or ReLU6 (module,
  functional call, tensor method, in-place or not) -> one batchops batch norm with the
  activation fused.
* ``bn_add_act``: the same with an add in between, ``act(bn(x) + residual)`` (torchvision's
  BasicBlock and Bottleneck: ``relu(bn2(conv2(x)) + identity)``) -> ``bn(x, residual=...)``.
* ``bn_add``: a batch norm whose output goes only to an add that no fusable activation follows,
  ``bn(x) + residual`` (MobileNetV2/V3's and EfficientNet's inverted residuals, ``block(x) + x``
  with the block ending in a batch norm) -> ``bn(x, residual=...)``. Found by torch.fx only.
* ``linear_act``: an ``nn.Linear`` whose output goes only to one of those activations ->
  ``batchops.Linear(activation=...)``.
* ``max_pool``: an ``nn.MaxPool2d`` -> ``batchops.MaxPool2d`` (its class swapped; no state), whose
  CPU kernel is ~10x faster than torch's for contiguous (NCHW) inputs (resnet's stem pool). Not a
  fusion, a faster kernel for the same function; ``F.max_pool2d`` calls are left as they are.
  Where such a pool module takes a fused batch norm's ReLU (resnet's stem, ``maxpool(relu(bn1(x)))``,
  found by torch.fx) the batch norm pools its own output, ``bn1(x, max_pool=(...))``
  (batchops/ops/batch_norm_max_pool.py), reported with the ``bn_act`` as its third module.
* ``conv_bn`` (``fold_conv_bn=True``, eval only): a convolution whose output goes only to a batch
  norm -> one convolution with the batch norm folded in (torch.nn.utils.fusion.fuse_conv_bn_eval).

How, and why so:

1. **Module-level rewrites first, over the whole tree**, where a module's forward is known:
   torchvision's BasicBlock / Bottleneck (their batch norms become batchops ones with relu fused,
   the last one taking the residual, and the block's class becomes FusedBasicBlock /
   FusedBottleneck, a subclass whose forward calls ``bn2(out, residual=identity)``);
   ``nn.TransformerEncoderLayer`` (linear1 becomes a batchops.Linear with the layer's activation,
   the class FusedTransformerEncoderLayer, whose ``_ff_block`` skips ``self.activation``); and
   plain ``nn.Sequential`` runs (batch norm or linear, then an activation module: the activation's
   slot holds a FusedActivation, an nn.Identity that remembers it). These keep the model's
   classes, attribute names (so state_dict keys), methods and hooks, need no tracing (the
   transformer layer does not trace with torch.fx's symbolic_trace) and are undone exactly. The
   class swap keeps the module object, so references held elsewhere (an optimizer's parameter
   list, a parent's attribute) stay valid; the fused classes live at module level so pickling
   works.
2. **Then torch.fx**, for whatever the first step does not know (ResNet's stem, hand-written
   residual blocks, functional activations). The model is traced with a tracer for which torch.nn
   modules, batchops modules, the fused classes of step 1 and modules with hooks are leaves; the
   graph is rewritten (a pattern only when each intermediate output has exactly one user and each
   module is called once) and becomes a torch.fx.GraphModule with the same submodule names.
   GraphModule keeps only the submodules the graph calls, and traced-through modules become plain
   nn.Module containers. batchops puts the rest back (unused modules, parameters and buffers, in
   their original order and persistence), so ``state_dict()`` has exactly the original keys, in
   order; and a traced-through module whose own forward still computes what it did is put back
   as itself (ResNet's ``layer1`` stays an nn.Sequential, ``model.layer1[0]`` works). That is why
   an activation module fused by fx is replaced by a FusedActivation (when it is called once):
   its parent's forward stays right. Parents of a fused residual add or functional activation
   stay plain containers, which cannot be called by mistake. The model is traced in train and in
   eval mode: a forward whose graph depends on ``self.training`` (Python control flow fx would
   freeze) is not rewritten by fx. When the model does not trace, its children are tried one by
   one (containers are never traced: nn.Sequential / ModuleList / ModuleDict stay what they are).
   A traced part becomes a GraphModule: its submodules, parameters and buffers are the same, its
   other attributes and methods are not, which is why step 1 handles what it knows without fx.
3. A residual found by fx is passed as ``residual.expand_as(input)``: batchops' kernel wants the
   input's shape, ``bn(x) + r`` broadcasts; for a same-shaped residual it is a free view. The
   fused call takes the activation's place in the graph, so the batch norm reads its input
   later: nothing that may write in place (``add_``, ``inplace=True``, ...) may run in between.

What is never fused (reported, never an error): a module called more than once in a traced
graph, an output with another user, modules with hooks (their hooks would see another output or
not run), subclasses of the module types (their forward may differ), a batch norm or linear
layer that already has a fused activation, an in-place write between a batch norm and its add,
modules on a device or in a dtype batchops has no kernel for, and every pattern when batchops'
compiled extension is unavailable. The report (``return_report=True``) says which and why.

``fuse`` copies the model unless ``inplace=True``; with ``inplace=True`` the returned module
(which may be a new GraphModule) is the one to use: when it is a new GraphModule, the module
passed in shares its rewritten submodules and must not be called any more. Fuse before wrapping
the model in DistributedDataParallel or torch.compile (both see the fused modules as ordinary
modules). The report is returned with ``return_report=True`` rather than stored on the model:
it describes one call, and a model attribute would go stale (unfuse, a second fuse) and be
pickled with it.

``unfuse`` (the way back) turns what fuse put in back into torch's modules: batch norms and nn.Linear plus the activation (the original module
in a FusedActivation's slot or in a fused block; an activation call in a GraphModule), and the
fused classes back to torch's / torchvision's (every batchops.MaxPool2d becomes an nn.MaxPool2d). A GraphModule stays a GraphModule. ``conv_bn``
folds are not undone (they are inference-only and leave no batch norm behind).
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from batchops._extension import extension_available
from batchops.nn.batch_norm import (
    TORCH_FOR_BATCHOPS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    replace_norm,
)
from batchops.nn.linear import Linear
from batchops.nn.pooling import MaxPool2d
from batchops.nn.sync_batch_norm import SyncBatchNorm
from batchops.ops.common import KERNEL_DTYPES, TORCH_ACTIVATION_CALLS

__all__ = [
    "fuse",
    "unfuse",
    "FusionReport",
    "Fusion",
    "Unfused",
    "FusedActivation",
    "FusedTransformerEncoderLayer",
]

# The batch norms fuse takes, and the batchops class each one becomes. Exact types only: a
# subclass may have its own forward.
_BN_TO_TORCH: dict[type, type] = {**TORCH_FOR_BATCHOPS, SyncBatchNorm: nn.SyncBatchNorm}  # unfuse's way back
_BN_TO_BATCHOPS: dict[type, type] = {
    **{torch_cls: ours for ours, torch_cls in _BN_TO_TORCH.items()},
    **{ours: ours for ours in _BN_TO_TORCH},
}
_CONV_BN = {nn.Conv1d: (nn.BatchNorm1d, BatchNorm1d), nn.Conv2d: (nn.BatchNorm2d, BatchNorm2d)}
_CONV_BN[nn.Conv3d] = (nn.BatchNorm3d, BatchNorm3d)

# A model on another device, or in a dtype outside KERNEL_DTYPES, is left unfused, with the
# reason in the report (_why_not).
_KERNEL_DEVICES = ("cpu", "cuda")

# An activation in a graph, by function: the batchops name, given the call's arguments.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)  # F.relu_ is torch.relu_
_INPLACE_FLAG_FUNCTIONS = {F.silu: "silu", F.hardswish: "hardswish", F.relu6: "relu6"}  # f(input, inplace=False)
_INPLACE_OPERATORS = {
    getattr(operator, f"i{op}") for op in "add sub mul truediv floordiv mod pow and or xor lshift rshift matmul".split()
}


# --------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Fusion:
    """One fused pattern: ``kind`` ("bn_act", "bn_add_act", "bn_add", "linear_act", "max_pool" or "conv_bn"), the
    qualified names of the modules involved (the batch norm / linear / conv first; an activation
    or add called as a function has no name), the fused ``activation`` and ``via``: "module" (a
    module-level rewrite) or "fx" (a torch.fx graph rewrite)."""

    kind: str
    modules: tuple[str, ...]
    activation: str | None
    via: str


@dataclass(frozen=True)
class Unfused:
    """A batch norm or linear layer left as it was, and why."""

    module: str
    reason: str


@dataclass
class FusionReport:
    """What ``batchops.fuse`` did: ``fused`` patterns, ``unfused`` batch norms and linear layers
    with the reason, and ``notes`` (parts that did not trace with torch.fx, and why)."""

    fused: list[Fusion] = field(default_factory=list)
    unfused: list[Unfused] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """{kind: number of fused patterns}."""
        return dict(Counter(f.kind for f in self.fused))

    def __str__(self) -> str:
        lines = [f"fused: {self.counts or 'nothing'}"]
        lines += [f"  {f.kind} ({f.activation}, {f.via}): {' + '.join(f.modules)}" for f in self.fused]
        lines += [f"not fused: {len(self.unfused)}"] + [f"  {u.module}: {u.reason}" for u in self.unfused]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Fused module classes


class FusedActivation(nn.Identity):
    """Stands in the slot of an activation module (or the stem's max pool) that was fused into
    the module before it (an nn.Sequential's next entry): it passes its input through and keeps
    the original module (not as a submodule: it has no state) for ``batchops.unfuse``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not registered: named_modules() would list it

    def extra_repr(self) -> str:
        return f"fused={self.original!r}"


class FusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose linear1 is a batchops.Linear with the layer's activation
    fused: the feed-forward block skips ``self.activation``.

    torch's eval fast path (``torch._transformer_encoder_layer_fwd``, taken without autograd)
    reads linear1's weight and bias and ``activation_relu_or_gelu``, not the modules, so it
    computes exactly what it did before fusion; the fused linear runs wherever the Python path
    runs (training, autograd)."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear2(self.dropout(self.linear1(x)))
        return self.dropout2(x)


# torchvision's fused blocks are made on first use (importing torchvision costs ~1 s and it is
# optional); module __getattr__ makes them importable by name, which pickle needs.
_TORCHVISION_FUSED: dict[str, type] = {}
# Fused class -> the class it came from (unfuse).
_UNFUSED_CLASS: dict[type, type] = {FusedTransformerEncoderLayer: nn.TransformerEncoderLayer, MaxPool2d: nn.MaxPool2d}


def _torchvision_blocks() -> dict[str, type]:
    if not _TORCHVISION_FUSED:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        class FusedBasicBlock(BasicBlock):
            """torchvision BasicBlock with relu fused into bn1 and, with the residual add, into
            bn2 (batchops batch norms): ``bn2(conv2(bn1(conv1(x))), residual=identity)``."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                identity = x if self.downsample is None else self.downsample(x)
                out = self.bn1(self.conv1(x))
                return self.bn2(self.conv2(out), residual=identity)

        class FusedBottleneck(Bottleneck):
            """torchvision Bottleneck with relu fused into bn1 and bn2 and, with the residual
            add, into bn3 (batchops batch norms)."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                identity = x if self.downsample is None else self.downsample(x)
                out = self.bn1(self.conv1(x))
                out = self.bn2(self.conv2(out))
                return self.bn3(self.conv3(out), residual=identity)

        for cls, original in ((FusedBasicBlock, BasicBlock), (FusedBottleneck, Bottleneck)):
            cls.__module__ = __name__
            cls.__qualname__ = cls.__name__
            _UNFUSED_CLASS[cls] = original
            _TORCHVISION_FUSED[cls.__name__] = cls
    return _TORCHVISION_FUSED


def __getattr__(name: str) -> type:
    if name in ("FusedBasicBlock", "FusedBottleneck"):
        return _torchvision_blocks()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torchvision_block_kind(module: nn.Module) -> str | None:
    """ "BasicBlock" / "Bottleneck" for torchvision's own classes (exact types), else None;
    torchvision is not imported for models that do not use it."""
    cls = type(module)
    if cls.__module__ == "torchvision.models.resnet" and cls.__name__ in ("BasicBlock", "Bottleneck"):
        return cls.__name__
    return None


# --------------------------------------------------------------------------------------------
# Small checks


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _is_fused_class(module: nn.Module) -> bool:
    return type(module) in _UNFUSED_CLASS


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _runs_sequential_forward(module: nn.Module) -> bool:
    """An nn.Sequential (or subclass, e.g. torchvision's Conv2dNormActivation) whose forward is
    Sequential's: its children run one after the other."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_candidate(module: nn.Module) -> bool:
    """A batch norm or linear layer: what the report accounts for."""
    return isinstance(module, (_BatchNorm, BatchNormBase, nn.Linear))


def _module_activation(module: nn.Module | None) -> str | None:
    """The batchops name of an activation module (exact types, no hooks), else None."""
    if module is None or _has_hooks(module):
        return None
    cls = type(module)
    if cls is nn.ReLU:
        return "relu"
    if cls is nn.SiLU:
        return "silu"
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if cls is nn.Hardswish:
        return "hardswish"
    if cls is nn.ReLU6:
        return "relu6"
    return None


def _callable_activation(fn: Any) -> str | None:
    """The batchops name of a TransformerEncoderLayer's ``activation`` (a function or a module)."""
    if isinstance(fn, nn.Module):
        return _module_activation(fn)
    if fn in _RELU_FUNCTIONS:
        return "relu"
    if fn is F.gelu:
        return "gelu"
    return next((name for f, name in _INPLACE_FLAG_FUNCTIONS.items() if fn is f), None)


class _Fuser:
    """One fuse() call: the passes, and the report they fill."""

    def __init__(self, fold_conv_bn: bool) -> None:
        self.fold = fold_conv_bn
        self.report = FusionReport()
        self.reasons: dict[str, str] = {}  # candidate name -> why it was not fused (last word wins)
        self.fused_names: set[str] = set()
        self.no_kernels = None if extension_available() else "batchops' compiled extension is unavailable"

    # ---- bookkeeping

    def _fused(self, kind: str, modules: tuple[str, ...], activation: str | None, via: str) -> None:
        self.report.fused.append(Fusion(kind, modules, activation, via))
        self.fused_names.add(modules[0])

    def _why_not(self, module: nn.Module) -> str | None:
        """Why this batch norm / linear layer cannot become a fused batchops module, or None."""
        if self.no_kernels:
            return self.no_kernels
        cls = type(module)
        if isinstance(module, (_BatchNorm, BatchNormBase)):
            if cls not in _BN_TO_BATCHOPS:
                return f"{cls.__name__} is not one of the batch norm classes batchops fuses (exact types)"
        elif cls not in (nn.Linear, Linear):
            return f"{cls.__name__} is a subclass of nn.Linear (its forward may differ)"
        if getattr(module, "activation", None) is not None:
            return f"already has a fused activation ({module.activation!r})"
        if _has_hooks(module):
            return "has hooks (they would see the activation's output)"
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.device.type not in _KERNEL_DEVICES:
                return f"on device {t.device.type!r}, which has no batchops kernel"
            if t.is_floating_point() and t.dtype not in KERNEL_DTYPES:
                return f"dtype {t.dtype} has no batchops kernel"
        return None

    @staticmethod
    def _fused_module(module: nn.Module, activation: str | None) -> nn.Module:
        """The batchops module with ``activation`` fused that takes ``module``'s place, sharing
        its parameters and buffers (optimizer state carries over with inplace=True)."""
        if isinstance(module, nn.Linear):
            new = Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                device="meta",
                dtype=module.weight.dtype,
                activation=activation,
            )
            new.weight = module.weight
            new.bias = module.bias
            new.train(module.training)
            return new
        cls = _BN_TO_BATCHOPS[type(module)]
        args = (module.process_group,) if cls is SyncBatchNorm else ()
        return replace_norm(module, cls, *args, activation=activation)

    def _fold(self, conv: nn.Module, bn: nn.Module, names: tuple[str, str], via: str) -> nn.Module | None:
        """The convolution with the batch norm folded in, or None (the reason recorded)."""
        reason = None
        pair = _CONV_BN.get(type(conv))
        if pair is None or type(bn) not in (*pair, nn.SyncBatchNorm, SyncBatchNorm):
            reason = f"{type(conv).__name__} then {type(bn).__name__} is not a pair batchops folds"
        elif getattr(bn, "activation", None) is not None:
            reason = f"already has a fused activation ({bn.activation!r}), not folded"
        elif conv.training or bn.training:
            reason = "in training mode, not folded (fold_conv_bn is for eval)"
        elif bn.running_mean is None or bn.running_var is None:
            reason = "has no running statistics (track_running_stats=False), not folded"
        elif _has_hooks(conv) or _has_hooks(bn):
            reason = "has hooks, not folded"
        if reason is not None:
            self.reasons[names[1]] = reason
            return None
        self._fused("conv_bn", names, None, via)
        return fuse_conv_bn_eval(conv, bn)

    # ---- step 1: module-level rewrites

    def module_pass(self, module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            self.module_pass(child, _join(prefix, name))
        block = _torchvision_block_kind(module)
        if block is not None:
            self._resnet_block(module, prefix, block)
        elif type(module) is nn.TransformerEncoderLayer:
            self._encoder_layer(module, prefix)
        elif type(module) is nn.MaxPool2d:
            self._max_pool(module, prefix)
        elif _runs_sequential_forward(module):
            self._sequential(module, prefix)

    def _resnet_block(self, block: nn.Module, prefix: str, kind: str) -> None:
        bns = ("bn1", "bn2") if kind == "BasicBlock" else ("bn1", "bn2", "bn3")
        names = {bn: _join(prefix, bn) for bn in bns}
        if block.downsample is not None:
            for name, child in block.downsample.named_modules(prefix=_join(prefix, "downsample")):
                if isinstance(child, (_BatchNorm, BatchNormBase)):
                    self.reasons[name] = "its output is the block's residual (identity): no activation follows"
        if self.fold:
            for i, bn in enumerate(bns, 1):
                conv_name = f"conv{i}"
                folded = self._fold(
                    getattr(block, conv_name), getattr(block, bn), (_join(prefix, conv_name), names[bn]), "module"
                )
                if folded is not None:
                    setattr(block, conv_name, folded)
                    setattr(block, bn, nn.Identity())
            if any(type(getattr(block, bn)) is nn.Identity for bn in bns):
                for bn in bns:
                    if type(getattr(block, bn)) is not nn.Identity:
                        self.reasons[names[bn]] = "its block was partly folded (fold_conv_bn): left as it is"
                return
        reason = None
        if _module_activation(block.relu) != "relu":
            reason = f"the block's relu is {block.relu!r} (another class, or hooks)"
        else:
            reason = next((f"{why}" for bn in bns if (why := self._why_not(getattr(block, bn)))), None)
        if reason is not None:
            for bn in bns:
                self.reasons[names[bn]] = f"not fused with its block: {reason}"
            return
        for bn in bns:
            setattr(block, bn, self._fused_module(getattr(block, bn), "relu"))
        block.__class__ = _torchvision_blocks()[f"Fused{kind}"]
        relu = _join(prefix, "relu")
        for bn in bns[:-1]:
            self._fused("bn_act", (names[bn], relu), "relu", "module")
        self._fused("bn_add_act", (names[bns[-1]], relu), "relu", "module")

    def _max_pool(self, pool: nn.MaxPool2d, prefix: str) -> None:
        """The class swap (exact nn.MaxPool2d without hooks): MaxPool2d has no state of its own,
        and inputs its kernel does not take (other devices or dtypes) run torch's."""
        if self.no_kernels:
            self.report.notes.append(f"{prefix or 'the model'} (MaxPool2d) left as it is: {self.no_kernels}")
        elif _has_hooks(pool):
            self.report.notes.append(f"{prefix or 'the model'} (MaxPool2d) left as it is: it has hooks")
        else:
            pool.__class__ = MaxPool2d
            self._fused("max_pool", (prefix,), None, "module")

    def _encoder_layer(self, layer: nn.TransformerEncoderLayer, prefix: str) -> None:
        name = _join(prefix, "linear1")
        self.reasons[_join(prefix, "linear2")] = "followed by dropout and the residual add, no activation"
        activation = _callable_activation(layer.activation)
        reason = self._why_not(layer.linear1)
        if activation is None:
            reason = f"the layer's activation {layer.activation!r} has no batchops equivalent"
        if reason is not None:
            self.reasons[name] = reason
            return
        layer.linear1 = self._fused_module(layer.linear1, activation)
        layer.__class__ = FusedTransformerEncoderLayer
        self._fused("linear_act", (name, _join(prefix, "activation")), activation, "module")

    def _sequential(self, seq: nn.Sequential, prefix: str) -> None:
        keys = list(seq._modules)
        i = 0
        while i < len(keys) - 1:
            first, second = seq._modules[keys[i]], seq._modules[keys[i + 1]]
            names = (_join(prefix, keys[i]), _join(prefix, keys[i + 1]))
            if self.fold and type(first) in _CONV_BN and isinstance(second, (_BatchNorm, BatchNormBase)):
                folded = self._fold(first, second, names, "module")
                if folded is not None:
                    seq._modules[keys[i]] = folded
                    seq._modules[keys[i + 1]] = nn.Identity()
                    i += 2
                    continue
            if first is not None and _is_candidate(first) and first.__dict__.get("activation") is None:
                activation = _module_activation(second)
                reason = self._why_not(first)
                if reason is None and activation is None:
                    reason = f"followed by {type(second).__name__}, not relu/silu/gelu"
                if reason is None:
                    kind = "linear_act" if isinstance(first, nn.Linear) else "bn_act"
                    seq._modules[keys[i]] = self._fused_module(first, activation)
                    seq._modules[keys[i + 1]] = FusedActivation(second)
                    self._fused(kind, names, activation, "module")
                    i += 2
                    continue
                self.reasons[names[0]] = reason
            i += 1
        if keys and _is_candidate(seq._modules[keys[-1]]):
            self.reasons.setdefault(_join(prefix, keys[-1]), "last in its Sequential, nothing follows it there")

    # ---- step 2: torch.fx

    def fx_pass(self, module: nn.Module, prefix: str) -> nn.Module:
        """``module``, or a GraphModule that replaces it with patterns fused."""
        if _Tracer.leaf(module):
            return module
        graph, why = (None, "a container, never traced") if _is_container(module) else _trace(module)
        if graph is None:
            if not _is_container(module):
                where = f"{prefix} ({type(module).__name__})" if prefix else f"the model ({type(module).__name__})"
                self.report.notes.append(f"{where} was not traced with torch.fx: {why}")
            for name, child in list(module.named_children()):
                new = self.fx_pass(child, _join(prefix, name))
                if new is not child:
                    module._modules[name] = new
            return module
        dirty = self._rewrite(module, graph, prefix)
        if dirty is None:
            return module
        graph.lint()
        gm = fx.GraphModule(module, graph)
        _mirror(gm, module, dirty, "")
        return gm

    def _rewrite(self, root: nn.Module, graph: fx.Graph, prefix: str) -> set[str] | None:
        """Fuse the patterns in ``graph`` (traced from ``root``); None when nothing changed, else
        the paths of the traced-through modules whose own forward no longer matches (see
        _mirror)."""
        modules = dict(root.named_modules())
        aliases = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        erased: set[fx.Node] = set()
        dirty: set[str] = set()
        changed = False

        def erase(*nodes: fx.Node) -> None:
            for node in nodes:
                graph.erase_node(node)
                erased.add(node)

        def set_module(target: str, new: nn.Module) -> None:
            root.set_submodule(target, new)
            modules[target] = new

        if self.fold:
            for node in list(graph.nodes):
                bn = modules.get(node.target) if node.op == "call_module" else None
                if not isinstance(bn, (_BatchNorm, BatchNormBase)) or len(node.args) != 1 or node.kwargs:
                    continue
                conv_node = node.args[0]
                if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"):
                    continue
                conv = modules[conv_node.target]
                if type(conv) not in _CONV_BN or len(conv_node.users) != 1:
                    continue
                if calls[node.target] != 1 or calls[conv_node.target] != 1:
                    self.reasons[_join(prefix, node.target)] = "a module called more than once, not folded"
                    continue
                folded = self._fold(conv, bn, (_join(prefix, conv_node.target), _join(prefix, node.target)), "fx")
                if folded is None:
                    continue
                set_module(conv_node.target, folded)
                set_module(node.target, nn.Identity())
                node.replace_all_uses_with(conv_node)
                erase(node)
                changed = True

        for node in list(graph.nodes):
            if node in erased or node.op != "call_module":
                continue
            module = modules[node.target]
            if not _is_candidate(module) or module.__dict__.get("activation") is not None:
                continue
            name = _join(prefix, node.target)
            reason = self._why_not(module)
            users = list(node.users)
            if reason is None and calls[node.target] != 1:
                reason = f"called {calls[node.target]} times in forward (a shared module)"
            if reason is None and (len(node.args) != 1 or node.kwargs):
                reason = "called with more than one argument"
            if reason is None and len(users) != 1:
                reason = f"its output has {len(users)} users" + (
                    f" ({', '.join(_describe(u, modules) for u in users)})" if users else ""
                )
            if reason is not None:
                self.reasons[name] = reason
                continue
            user = users[0]
            activation = _node_activation(user, node, modules)
            if activation is not None:
                fused_module = self._fused_module(module, activation)
                set_module(node.target, fused_module)
                pool = _stem_pool(user, fused_module, modules, calls, aliases)
                for passed in (user, pool):
                    if passed is None:
                        continue
                    if (
                        passed.op == "call_module"
                        and calls[passed.target] == 1
                        and aliases[id(modules[passed.target])] == 1
                    ):
                        # The module's slot passes through from now on, so a traced-through
                        # parent's own forward (callable on its own) still computes what it did.
                        set_module(passed.target, FusedActivation(modules[passed.target]))
                    else:
                        dirty.update(_enclosing_modules(node, passed))
                pooled = ()
                if pool is not None:
                    pooled = _node_module_name(pool, prefix)
                    node.kwargs = {"max_pool": _max_pool_arguments(modules[pool.target].original)}
                    pool.replace_all_uses_with(node)
                    erase(pool)
                user.replace_all_uses_with(node)
                erase(user)
                kind = "linear_act" if isinstance(module, nn.Linear) else "bn_act"
                self._fused(kind, (name, *_node_module_name(user, prefix), *pooled), activation, "fx")
                changed = True
                continue
            residual = _add_operand(user, node) if not isinstance(module, nn.Linear) else None
            if residual is None:
                self.reasons[name] = f"followed by {_describe(user, modules)}, not a fusable activation or add"
                continue
            act_node = next(iter(user.users)) if len(user.users) == 1 else None
            activation = _node_activation(act_node, user, modules) if act_node is not None else None
            # bn_add_act, or bn_add when no fusable activation follows the add (MobileNet's
            # inverted residuals: ``block(x) + x`` ending in a batch norm).
            last = act_node if activation is not None else user
            # The fused call takes the last node's place, so the batch norm reads its input
            # later than it did: nothing in between may write in place.
            between = _nodes_between(node, last)
            writer = next((n for n in between if n is not user and _may_write_in_place(n, modules)), None)
            if writer is not None:
                self.reasons[name] = f"{_describe(writer, modules)} may write in place between it and its add"
                continue
            set_module(node.target, self._fused_module(module, activation))
            x = node.args[0]
            with graph.inserting_before(last):
                guarded = graph.call_method("expand_as", (residual, x))
                fused = graph.call_module(node.target, (x,), {"residual": guarded})
            last.replace_all_uses_with(fused)
            dirty.update(_enclosing_modules(node, user, last))
            erase(*([act_node] if last is act_node else []), user, node)
            if activation is None:
                self._fused("bn_add", (name,), None, "fx")
            else:
                self._fused("bn_add_act", (name, *_node_module_name(act_node, prefix)), activation, "fx")
            changed = True
        return dirty if changed else None

    # ---- the report's unfused list

    def finish(self, model: nn.Module) -> FusionReport:
        for name, module in model.named_modules():
            if not _is_candidate(module) or name in self.fused_names:
                continue
            if module.__dict__.get("activation") is not None:
                continue  # fused before fuse() saw it
            reason = self.reasons.get(name)
            if reason is None:
                reason = self.no_kernels or _opaque_parent(model, name)
            self.report.unfused.append(Unfused(name, reason))
        return self.report


def _opaque_parent(model: nn.Module, name: str) -> str:
    parent = name.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    where = f"{parent} ({type(owner).__name__})" if parent else f"the model ({type(owner).__name__})"
    return f"in {where}, whose forward batchops neither rewrites nor traces"


def _describe(node: fx.Node | None, modules: dict[str, nn.Module]) -> str:
    if node is None:
        return "nothing"
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the output"
    return f"{node.op} {node.target}"


def _node_module_name(node: fx.Node, prefix: str) -> tuple[str, ...]:
    return (_join(prefix, node.target),) if node.op == "call_module" else ()


def _node_activation(node: fx.Node, input: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The batchops activation ``node`` applies to ``input`` (and nothing else), or None."""
    if not node.args or node.args[0] is not input:
        return None
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_module":
        return _module_activation(modules[node.target]) if not rest and not kwargs else None
    if node.op == "call_method":
        return "relu" if node.target in ("relu", "relu_") and not rest and not kwargs else None
    if node.op != "call_function":
        return None
    if node.target in _RELU_FUNCTIONS or node.target in _INPLACE_FLAG_FUNCTIONS:
        # (input, inplace=False): in place or not, the only user sees the same values.
        if len(rest) > 1 or set(kwargs) - {"inplace"}:
            return None
        return "relu" if node.target in _RELU_FUNCTIONS else _INPLACE_FLAG_FUNCTIONS[node.target]
    if node.target is F.gelu:
        approximate = rest[0] if rest else kwargs.pop("approximate", "none")
        if len(rest) > 1 or kwargs:
            return None
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _stem_pool(
    act_node: fx.Node,
    fused_module: nn.Module,
    modules: dict[str, nn.Module],
    calls: Counter,
    aliases: Counter,
) -> fx.Node | None:
    """The max pool node that takes the batch norm's ReLU (resnet's stem, ``maxpool(relu(bn1(x)))``),
    when batchops' batch norm can pool its output itself (BatchNorm2d.forward's ``max_pool``): a
    batchops BatchNorm2d with ReLU whose activation's only user is an exact nn.MaxPool2d /
    batchops.MaxPool2d module without hooks or indices, called once with the activation alone."""
    if type(fused_module) is not BatchNorm2d or fused_module.activation != "relu" or len(act_node.users) != 1:
        return None
    pool = next(iter(act_node.users))
    if pool.op != "call_module" or pool.args != (act_node,) or pool.kwargs:
        return None
    module = modules[pool.target]
    if type(module) not in (nn.MaxPool2d, MaxPool2d) or module.return_indices or _has_hooks(module):
        return None
    if calls[pool.target] != 1 or aliases[id(module)] != 1:
        return None
    return pool


def _max_pool_arguments(pool: nn.MaxPool2d) -> tuple[Any, ...]:
    """BatchNorm2d.forward's ``max_pool``: (kernel_size, stride, padding, dilation, ceil_mode)."""
    return (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


def _nodes_between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    nodes, node = [], first.next
    while node is not last:
        nodes.append(node)
        node = node.next
    return nodes


def _may_write_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may modify a tensor in place (by torch's naming: add_, relu_, iadd,
    inplace=True; a module with ``inplace=True``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") or node.target in _INPLACE_OPERATORS
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    return False


def _add_operand(node: fx.Node, input: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``input + other`` (a tensor, no alpha), else None. An
    in-place add counts only when it writes into ``input`` (whose one user it is)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        other = b if a is input else a if b is input else None
    elif (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    ):
        other = b if a is input else None
    elif node.op == "call_method" and node.target == "add":
        other = b if a is input else a if b is input else None
    else:
        return None
    return other if isinstance(other, fx.Node) and other is not input else None


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, plus leaves: batchops' modules, the fused classes and modules
    with hooks (tracing through one would drop its hooks)."""

    @staticmethod
    def leaf(module: nn.Module) -> bool:
        return (
            _is_fused_class(module)
            or type(module).__module__.startswith("batchops.")
            or (
                type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
                and not isinstance(module, nn.Sequential)
                and not _is_container(module)
            )
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.leaf(m) or _has_hooks(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> tuple[fx.Graph | None, str | None]:
    """(graph, None), or (None, why not). Traced in both modes, the module's own last; a graph
    that differs between them means control flow on self.training, which fx would freeze."""
    if _has_hooks(module):
        return None, "it has hooks (a GraphModule would not run them)"
    flags = [(m, m.training) for m in module.modules()]
    codes, graph = [], None
    try:
        for mode in (not module.training, module.training):
            for m, _ in flags:
                m.training = mode
            graph = _Tracer().trace(module)
            codes.append(graph.python_code("self").src)
    except Exception as error:  # any failure to trace just means: not this way
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first_line[:200]}"
    finally:
        for m, flag in flags:
            m.training = flag
    if codes[0] != codes[1]:
        return None, "its traced graph differs between train and eval mode (control flow on self.training)"
    return graph, None


def _enclosing_modules(*nodes: fx.Node) -> set[str]:
    """The traced-through modules whose forward made ``nodes`` (from fx's nn_module_stack; "*",
    meaning all of them, where the tracer did not record it)."""
    paths: set[str] = set()
    for node in nodes:
        stack = node.meta.get("nn_module_stack")
        if stack is None:
            return {"*"}
        paths.update(qualname for qualname, _ in stack.values())
    return paths - {node.target for node in nodes if node.op == "call_module"}


def _mirror(new: nn.Module, old: nn.Module, dirty: set[str], prefix: str) -> None:
    """Give the GraphModule ``new`` the submodules, parameters and buffers of ``old``, by name and
    in order. fx keeps only what the graph uses, and traced-through modules become plain
    nn.Module containers; those whose forward still computes what it did (none of the fused
    patterns was in it: not in ``dirty``) are put back as themselves, so ``model.layer1[0]``
    and methods keep working; the others stay plain containers, which cannot be called by
    mistake."""
    if new is old:
        return
    new.training = old.training
    for attr in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(new, attr), getattr(old, attr)
        merged = {k: mine.get(k, v) for k, v in theirs.items()}
        merged.update((k, v) for k, v in mine.items() if k not in merged)
        mine.clear()
        mine.update(merged)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        if child is None or new._modules[name] is child:
            continue
        path = _join(prefix, name)
        if path in dirty or "*" in dirty:
            _mirror(new._modules[name], child, dirty, path)
        else:
            new._modules[name] = child


# --------------------------------------------------------------------------------------------
# Public API


def fuse(
    model: nn.Module, *, inplace: bool = False, fold_conv_bn: bool = False, return_report: bool = False
) -> nn.Module | tuple[nn.Module, FusionReport]:
    """Put batchops' fused kernels where ``model`` has batch norm -> activation, batch norm ->
    residual add -> activation and linear -> activation (activations: ReLU, SiLU, GELU).

    Returns the fused model (a copy unless ``inplace=True``; it may be a torch.fx.GraphModule),
    or ``(model, report)`` with ``return_report=True``: a :class:`FusionReport` of what was fused,
    what was not and why. It computes the same function, keeps the state_dict keys (checkpoints
    load both ways) and leaves what it cannot match as it is; an unmatched model is never an
    error. ``fold_conv_bn=True`` (eval models only: a ValueError otherwise) also folds each
    convolution's following batch norm into it, for inference (the batch norms' state_dict
    entries go). ``batchops.unfuse`` is the way back. See the module docstring for how.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"batchops.fuse: expected an nn.Module, got {type(model).__name__}")
    if fold_conv_bn and model.training:
        raise ValueError("batchops.fuse: fold_conv_bn=True is for inference: call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    fuser = _Fuser(fold_conv_bn)
    fuser.module_pass(model, "")
    model = fuser.fx_pass(model, "")
    report = fuser.finish(model)
    return (model, report) if return_report else model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The way back from :func:`fuse`: batchops modules with a fused activation that fuse put in
    become torch's (BatchNorm1d/2d/3d, SyncBatchNorm, Linear) followed by the activation again
    (the original activation module, or an activation call in a GraphModule's graph), and the
    fused block / layer classes become torchvision's / torch's. Parameters and buffers are
    shared, so state_dicts load both ways. A GraphModule stays one; conv-bn folds stay folded.
    Returns the model (a copy unless ``inplace=True``)."""
    if not inplace:
        model = copy.deepcopy(model)
    _unfuse(model)
    return model


def _torch_module(module: nn.Module) -> nn.Module:
    """torch's module for a fused batchops batch norm or linear layer, sharing its state."""
    if isinstance(module, Linear):
        new = nn.Linear(
            module.in_features, module.out_features, module.bias is not None, device="meta", dtype=module.weight.dtype
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new
    cls = _BN_TO_TORCH[type(module)]
    args = (module.process_group,) if cls is nn.SyncBatchNorm else ()
    return replace_norm(module, cls, *args)


def _is_fused_module(module: nn.Module | None) -> bool:
    return type(module) in (*_BN_TO_TORCH, Linear) and module.activation is not None


def _unfuse(module: nn.Module) -> None:
    if isinstance(module, fx.GraphModule):
        _unfuse_graph(module)
    original = _UNFUSED_CLASS.get(type(module))
    if original is not None:
        for name in ("bn1", "bn2", "bn3", "linear1"):
            child = module._modules.get(name)
            if _is_fused_module(child):
                module._modules[name] = _torch_module(child)
        module.__class__ = original
    items = list(module._modules.items())
    for (name, child), (_, after) in zip(items, items[1:]):
        if isinstance(after, FusedActivation) and _is_fused_module(child):  # a Sequential's pair
            module._modules[name] = _torch_module(child)
    for name, child in items:
        if isinstance(child, FusedActivation):
            module._modules[name] = child.original
    for child in module.children():
        _unfuse(child)


def _unfuse_graph(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        bn_add = type(module) in _BN_TO_TORCH and "residual" in node.kwargs  # fuse's bn_add
        if not (_is_fused_module(module) or bn_add):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            after = gm.get_submodule(users[0].target)
            if isinstance(after, FusedActivation):  # a Sequential's pair, traced: the graph calls both
                gm.set_submodule(node.target, _torch_module(module))
                gm.set_submodule(users[0].target, after.original)
                continue
        activation = module.activation
        gm.set_submodule(node.target, _torch_module(module))
        residual = node.kwargs.get("residual")
        max_pool = node.kwargs.get("max_pool")
        node.kwargs = {}
        if residual is not None and residual.op == "call_method" and residual.target == "expand_as":
            guard, residual = residual, residual.args[0]  # fuse's guard: the plain add broadcasts
        else:
            guard = None
        inserted = [node]  # bn, then the add and the activation as they were before fuse
        if residual is not None:
            with graph.inserting_after(inserted[-1]):
                inserted.append(graph.call_function(operator.add, (node, residual)))
        if activation is not None:
            fn, kwargs = TORCH_ACTIVATION_CALLS[activation]
            with graph.inserting_after(inserted[-1]):
                inserted.append(graph.call_function(fn, (inserted[-1],), dict(kwargs)))
        if max_pool is not None:  # fuse's stem pool (_stem_pool)
            with graph.inserting_after(inserted[-1]):
                inserted.append(graph.call_function(F.max_pool2d, (inserted[-1], *max_pool)))
        node.replace_all_uses_with(inserted[-1], delete_user_cb=lambda user: user not in inserted)
        if guard is not None and not guard.users:
            graph.erase_node(guard)
    graph.lint()
    gm.recompile()
