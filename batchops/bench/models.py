"""Model benchmarks: whole training steps of real architectures, torch against batchops (issue 16).

    batchops bench --op models [--reps N] [--quick] --out benchmarks/results/models

One step = forward, cross-entropy loss, backward, optimizer step (SGD with momentum 0.9; the
LSTM: Adam, as in the NLP example), timed like every case: both providers in one process,
interleaved, median and 20th/80th percentiles of the per-step wall time.

Both providers start from one model, built once with a fixed seed and deep-copied: torch runs it
as built, batchops runs prepare_batchops(model) of it: batchops.convert_batchnorm (every batch
norm on batchops' kernels), then batchops.fuse (batch norm + ReLU/SiLU/GELU, batch norm + residual
add + activation, Linear + activation); the note column says what was fused and what was left.
Each provider has its own optimizer and the same batch, and each step reseeds torch's generator so
that dropout draws the same masks on both sides. The check compares the first step's loss and
gradient norm (float32 tolerance: 2e-3 relative).

"compiled step": the model and the loss under torch.compile on both sides (default inductor), the
backward through AOTAutograd, the optimizer step eager. batchops' ops stay in the compiled graph
on the CPU (batchops.functional.compiled_batch_norm() == "auto": on CUDA batch norm is written as
torch's there, for inductor to fuse with its neighbours), their inputs in whatever layout
inductor chose (flexible_layout). The first call
(the check's, which compiles) is left out of the timing and reported as "first call ms" in the
breakdown, with inductor's on-disk cache as the machine had it: batchops' side often finds the
graph torch's side just compiled there.

Models (num_classes 10, torchvision's built without weights: no download):
  * resnet18, resnet50 (torchvision): CPU batch 16 at 112x112, the issue's reference set-up;
    NCHW and channels-last (model and input). fuse puts every bn+relu and bn+add+relu of the
    blocks and the stem on batchops' fused kernels; the downsample batch norms (no activation
    after them) and the final fc stay plain.
  * mobilenet_v3_small (torchvision): the same sizes. Its batch norms are converted and those
    followed by ReLU or hardswish fused, and the classifier's Linear + hardswish; the batch
    norms followed by nothing (projections whose output is also the next block's residual) stay plain, and the
    squeeze-excitation's hardsigmoid follows a convolution, not a batch norm: torch's. Since
    bn_add, the inverted residuals' projection + add fuse too.
  * mobilenet_v2 (torchvision): the same sizes; its 35 batch norms before ReLU6 fused, and the
    10 inverted residuals' projection + add (bn_add).
  * transformer_encoder: torch.nn.TransformerEncoderLayer(d_model=256, nhead=8,
    dim_feedforward=1024 (4 x d_model), activation="gelu", batch_first=True, dropout 0.1 as
    torch's default), a mean over the sequence and a Linear head, on 32 sequences of 128 random
    embeddings. fuse makes linear1 a batchops.Linear with GELU fused; attention, linear2, the
    layer norms and the head stay torch's.
  * lstm_classifier: the NLP example's model (examples/nlp_sequence_classification.py,
    LSTMClassifier.forward_packed: Embedding(padding_idx=0) -> LSTM over a PackedSequence ->
    [last hidden state, mean over real tokens] -> Linear; embed 64, hidden 128, vocabulary
    20000; batchops.models.LSTMClassifier, which the example imports): torch's side packs with
    torch.nn.utils.rnn.pack_padded_sequence / pad_packed_sequence, batchops' with
    batchops.pack_padded_sequence / pad_packed_sequence (enforce_sorted=False); nothing to fuse.
    The batch is one batch of batchops.data.BucketBatchSampler(max_tokens=4096) over 20000
    log-normal lengths (median 20, up to 400, as the example's corpus): the one whose longest
    sentence is the median over the epoch's batches. Eager only (a packed, data-dependent step
    is not a compile target).
On CUDA the steps run under AMP (torch.autocast bfloat16, float32 weights; the check's
tolerance is bfloat16's) at larger sizes (convnets: batch 64 at 224x224); not yet run on a GPU.

Compiled rows by default: resnet18 (NCHW and channels-last) and the transformer (a cold compile
takes up to a minute per side on 2 cores); the other models are eager only, to keep the run near
10 minutes.

"Where the time goes": after timing, each provider runs 3 steps under torch.profiler; each op's
self time (CPU; device time on CUDA) goes to a family (batchops.bench.profiling): conv/matmul,
batch/layer norm, activations, adds, copies, ours (batchops::*), optimizer (everything under
Optimizer.step and zero_grad), compiled (inductor's generated code), other (autograd
bookkeeping, pooling, dropout, losses, embedding, the LSTM cell's products of gates, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from batchops.bench.case import Case, Skip
from batchops.models import LSTMClassifier

__all__ = [
    "OP",
    "MODELS",
    "COMPILED",
    "TORCHVISION_FOR_TORCH",
    "prepare_batchops",
    "describe_fusion",
    "torchvision_or_skip",
    "Workload",
    "workload",
    "model_case",
    "cases",
    "NOTES",
]

OP = "models"

MODELS = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v2", "transformer_encoder", "lstm_classifier")
CONVNETS = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v2")
# (model, layout) pairs that also get a compiled row in the default run.
COMPILED = (("resnet18", "NCHW"), ("resnet18", "channels_last"), ("transformer_encoder", "batch_first"))
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}

# The torchvision release built for each supported torch; the Makefile pins the same
# (TORCHVISION_FOR_<torch>), and tests/bench/test_models.py checks that the two agree.
TORCHVISION_FOR_TORCH = {"2.14.1": "0.29.1", "2.11.0": "0.26.0"}

SEED = 0
NUM_CLASSES = 10
PROFILE_STEPS = 3


def prepare_batchops(model: nn.Module):
    """The batchops side of a model: what a user would do to a torch model to run it on
    batchops, in place. Returns (the model to train, batchops.fuse's FusionReport)."""
    import batchops

    return batchops.fuse(batchops.convert_batchnorm(model), inplace=True, return_report=True)


def describe_fusion(report) -> str:
    """A FusionReport in a few words for the table's note: the fused patterns, how many batch
    norms and linear layers were left, and the activations that kept some of them apart."""
    counts = report.counts
    text = "fused " + (", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) if counts else "nothing")
    if report.unfused:
        blockers = Counter(
            m.group(1)
            for u in report.unfused
            if (m := re.search(r"\((\w+)\), not a fusable activation", u.reason)) and m.group(1) in _ACTIVATION_NAMES
        )
        why = ", ".join(f"{n} before {name}" for name, n in blockers.most_common())
        text += f"; {len(report.unfused)} left unfused" + (f" ({why})" if why else "")
    return text


# Activation modules that batchops has no fused kernel for, named in the note when fuse leaves a
# batch norm or linear layer because one follows it.
_ACTIVATION_NAMES = {"Hardsigmoid", "Sigmoid", "Tanh", "ELU", "LeakyReLU", "Mish", "Softplus"}


def torchvision_or_skip():
    """torchvision, or a Skip saying that these rows need it and which release to install."""
    try:
        import torchvision
    except Exception as exc:  # missing, or built for another torch (its operators fail to load)
        torch_version = torch.__version__.split("+")[0]
        pinned = TORCHVISION_FOR_TORCH.get(torch_version)
        how = (
            f"`pip install torchvision=={pinned}` (the release for torch {torch_version}, pinned in the Makefile)"
            if pinned
            else f"the torchvision release built for torch {torch_version}"
        )
        raise Skip(
            f"torchvision is needed for this model and could not be imported ({type(exc).__name__}: {exc}); "
            f"install {how}, or run `make setup`"
        ) from exc
    return torchvision


# ---------------------------------------------------------------------------------------------
# Models


class EncoderClassifier(nn.Module):
    """A TransformerEncoderLayer, the mean over the sequence, a Linear head."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, activation="gelu", batch_first=True
        )
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _torch_packed_lstm_classifier(vocab: int, embed: int, hidden: int) -> LSTMClassifier:
    """The NLP example's model packing with torch's functions (torch's side of the case)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    return LSTMClassifier(vocab, embed, hidden, pack=pack_padded_sequence, pad=pad_packed_sequence)


def _use_batchops_packing(model: LSTMClassifier) -> LSTMClassifier:
    import batchops

    model.pack, model.pad = batchops.pack_padded_sequence, batchops.pad_packed_sequence
    return model


def bucketed_batch(
    n: int, max_len: int, max_tokens: int, vocab: int, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bucketed batch as the NLP example builds them: (ids (B, T) right-padded with 0,
    lengths (B,) int64 on the CPU, labels (B,)). n log-normal lengths (median 20, clipped to
    [4, max_len]) go through BucketBatchSampler(max_tokens=...); the batch returned is the one
    whose longest sentence is the median over the epoch's batches."""
    import numpy as np

    from batchops.data import BucketBatchSampler

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(20), 0.9, size=n)), 4, max_len).astype(int)
    batches = list(BucketBatchSampler(lengths.tolist(), max_tokens=max_tokens, shuffle=True, seed=seed))
    longest = [int(lengths[b].max()) for b in batches]
    median = sorted(longest)[len(longest) // 2]
    batch = batches[longest.index(median)]
    lens = torch.as_tensor(lengths[batch], dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(batch), int(lens.max())), generator=g)
    ids[torch.arange(ids.shape[1])[None, :] >= lens[:, None]] = 0
    labels = torch.randint(0, 2, (len(batch),), generator=g)
    return ids, lens, labels


# ---------------------------------------------------------------------------------------------
# Workloads: a model, its batch and its optimizer


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one model's rows train: `make_model()` (called under torch.manual_seed(SEED)),
    `make_batch(device)` -> (inputs, targets), the optimizer, and how batchops' side differs
    beyond prepare_batchops (`adapt_batchops`)."""

    name: str
    shape: tuple[int, ...]
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.device], tuple[tuple, torch.Tensor]]
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    layouts: tuple[str, ...]
    adapt_batchops: Callable[[nn.Module], nn.Module] = lambda m: m


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _adam(params):
    return torch.optim.Adam(params, lr=3e-3)  # the NLP example's optimizer and learning rate


def _sizes(device: torch.device, size: str) -> dict:
    if size == "smoke":  # tests: seconds
        return dict(image=(4, 64), tokens=(2, 8), d_model=32, nhead=2, ff=64, lstm=(64, 20, 64, 50, 8, 16))
    if size == "quick":
        return dict(image=(8, 64), tokens=(8, 32), d_model=256, nhead=8, ff=1024, lstm=(2000, 100, 1024, 2000, 32, 64))
    # (sentences, max length, max_tokens, vocabulary, embed, hidden)
    lstm = (20000, 400, 4096, 20000, 64, 128)
    if device.type == "cuda":
        return dict(image=(64, 224), tokens=(64, 256), d_model=256, nhead=8, ff=1024, lstm=lstm)
    return dict(image=(16, 112), tokens=(32, 128), d_model=256, nhead=8, ff=1024, lstm=lstm)


def is_torchvision_classifier(name: str) -> bool:
    """Whether `name` is one of torchvision's image classifiers (torchvision.models.list_models),
    which workload() runs as it runs the benchmark's convnets (scripts/model_step.py: any of them)."""
    tv = torchvision_or_skip()
    return name in tv.models.list_models(module=tv.models)


def workload(name: str, device: torch.device, size: str = "default") -> Workload:
    """The workload of model `name` at `size` ("default", "quick", "smoke"): one of MODELS, or any
    other torchvision image classifier (efficientnet_b0, shufflenet_v2_x0_5, ...) set up as the
    benchmark's convnets are."""
    s = _sizes(device, size)
    if name in CONVNETS or (name not in MODELS and is_torchvision_classifier(name)):
        batch, res = s["image"]

        def make_model():
            return getattr(torchvision_or_skip().models, name)(weights=None, num_classes=NUM_CLASSES)

        def make_batch(dev):
            g = torch.Generator().manual_seed(SEED)
            x = torch.randn(batch, 3, res, res, generator=g)
            return (x.to(dev),), torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(dev)

        return Workload(name, (batch, 3, res, res), make_model, make_batch, _sgd, tuple(LAYOUTS))
    if name == "transformer_encoder":
        batch, seq = s["tokens"]
        d_model = s["d_model"]

        def make_model():
            return EncoderClassifier(d_model, s["nhead"], s["ff"])

        def make_batch(dev):
            g = torch.Generator().manual_seed(SEED)
            x = torch.randn(batch, seq, d_model, generator=g)
            return (x.to(dev),), torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(dev)

        return Workload(name, (batch, seq, d_model), make_model, make_batch, _sgd, ("batch_first",))
    if name == "lstm_classifier":
        n, max_len, max_tokens, vocab, embed, hidden = s["lstm"]
        ids, lengths, labels = bucketed_batch(n, max_len, max_tokens, vocab)

        def make_model():
            return _torch_packed_lstm_classifier(vocab, embed, hidden)

        def make_batch(dev):
            return (ids.to(dev), lengths), labels.to(dev)  # lengths stay on the CPU, as the example's

        return Workload(
            name, tuple(ids.shape), make_model, make_batch, _adam, ("packed",), adapt_batchops=_use_batchops_packing
        )
    raise ValueError(f"unknown model {name!r}; available: {MODELS} or any torchvision image classifier")


# ---------------------------------------------------------------------------------------------
# One training step per provider


def _step(
    model: nn.Module,
    inputs: tuple,
    target: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    compiled: bool,
    amp: bool,
) -> Callable[[], object]:
    """One training step of `model` on the batch. Returns the loss (detached); the first call
    also returns the gradient norm over all parameters, for the check."""

    def loss_of(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return F.cross_entropy(model(*args), target)

    forward = torch.compile(loss_of) if compiled else loss_of
    params = [p for p in model.parameters() if p.requires_grad]
    first = [True]

    def step():
        torch.manual_seed(SEED)  # dropout: the same masks on both sides, every step
        loss = forward(*inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        out = loss.detach()
        if first[0]:
            first[0] = False
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            out = (out, torch.stack(grads).norm())
        optimizer.step()
        return out

    return step


def _build(name: str, layout: str, compiled: bool, size: str, case: Case):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        work = workload(name, device, size)
        torch.manual_seed(SEED)
        base = work.make_model().to(device)
        fmt = LAYOUTS.get(layout)
        if fmt is not None:
            base = base.to(memory_format=fmt)
        inputs, target = work.make_batch(device)
        if fmt is not None:
            inputs = tuple(x.contiguous(memory_format=fmt) for x in inputs)
        base.train()
        ours, report = prepare_batchops(copy.deepcopy(base))
        case.note = describe_fusion(report)
        sides = {"torch": copy.deepcopy(base), "batchops": work.adapt_batchops(ours)}
        del base
        if compiled:
            # Every compiled row compiles the same function (loss_of): without a reset the
            # earlier rows' entries count towards dynamo's recompile limit.
            torch._dynamo.reset()
        amp = device.type == "cuda"
        return {
            provider: _step(model, inputs, target, work.optimizer(model.parameters()), device, compiled, amp)
            for provider, model in sides.items()
        }

    return build


def model_case(
    name: str, device: torch.device, layout: str | None = None, compiled: bool = False, size: str = "default"
) -> Case:
    """The case of one model's training step: `layout` one of the workload's (default: its
    first), eager or compiled, at `size` ("default", "quick", "smoke")."""
    work = workload(name, device, size)  # cheap: the models are built when the case runs
    layout = layout or work.layouts[0]
    if layout not in work.layouts:
        raise ValueError(f"{name}: layout must be one of {work.layouts}, got {layout!r}")
    case = Case(
        op=name,
        shape=work.shape,
        layout=layout,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        mode="compiled step" if compiled else "step",
        build=lambda device: {},
        profile_calls=PROFILE_STEPS if size == "default" else 1,
    )
    case.build = _build(name, layout, compiled, size, case)  # the build notes what fuse did
    return case


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    size = "smoke" if smoke else "quick" if quick else "default"
    out = []
    for name in MODELS:
        for layout in workload(name, device, size).layouts:
            out.append(model_case(name, device, layout, size=size))
        if size == "default":
            out += [model_case(n, device, lay, compiled=True) for n, lay in COMPILED if n == name]
    return out


NOTES = __doc__.split("\n\n", 2)[2].strip()
