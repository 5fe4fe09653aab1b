"""batchops.bench.models (`batchops bench --op models`, issue 16) and the parts of the harness it
added: skipped cases, first-call times, the profiler breakdown by op family, fixed repeats. Tiny
sizes; no timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

import batchops
from batchops import cli
from batchops.bench import DEFAULT_OPS, OPS, models, settings_for
from batchops.bench.case import PROVIDERS, Case, Skip
from batchops.bench.checks import compare_outputs
from batchops.bench.measure import run_case
from batchops.bench.profiling import FAMILIES, family_of, profile_families
from batchops.bench.report import format_breakdown

from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("kernels")

CPU = torch.device("cpu")


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


needs_torchvision = pytest.mark.skipif(not _has_torchvision(), reason="torchvision is not installed")


def _smoke_cases() -> list:
    params = []
    for case in models.cases(CPU, smoke=True):
        marks = [needs_torchvision] if case.op in models.CONVNETS else []
        if case.op == "resnet50":
            marks.append(pytest.mark.slow)  # seconds per step on a busy 2-core machine
        params.append(pytest.param(case, id=f"{case.op}-{case.layout}", marks=marks))
    return params


def test_the_models_op_is_available_but_not_in_the_default_run():
    assert OPS["models"] == "batchops.bench.models"
    assert "models" not in DEFAULT_OPS and set(DEFAULT_OPS) < set(OPS)  # asked for by name only
    names = [(c.op, c.layout, c.mode) for c in models.cases(CPU, smoke=True)]
    assert {op for op, _, _ in names} == set(models.MODELS)
    assert ("resnet18", "channels_last", "step") in names  # the convnets in both layouts
    assert all(mode == "step" for _, _, mode in names)  # no compiled rows in smoke and quick runs
    default = [(c.op, c.layout, c.mode) for c in models.cases(CPU)]
    assert ("resnet18", "NCHW", "compiled step") in default and len(default) == len(names) + len(models.COMPILED)
    assert all(c.profile_calls > 0 for c in models.cases(CPU))
    help_text = cli._parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "--op models" in help_text and "--reps" in help_text


@pytest.mark.parametrize("case", _smoke_cases())
def test_both_providers_take_a_step_with_the_same_loss(case: Case):
    fns = case.build(CPU)
    assert set(fns) == set(PROVIDERS)
    first = {name: fn() for name, fn in fns.items()}
    for out in first.values():  # the first step: (loss, gradient norm), finite and positive
        assert len(out) == 2 and all(torch.isfinite(t) and t > 0 for t in out)
    assert compare_outputs(first["batchops"], first["torch"], case.dtype) == ""
    # Later steps return the loss only. (Not compared: after a step on 4 images the models can
    # drift apart, resnet50's gradient norm being in the thousands at this size.)
    second = {name: fn() for name, fn in fns.items()}
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 and torch.isfinite(t) for t in second.values())


@needs_torchvision
def test_prepare_batchops_converts_every_batch_norm_and_fuses():
    import torchvision

    model, report = models.prepare_batchops(torchvision.models.resnet18(weights=None, num_classes=10))
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, batchops.BatchNorm2d) for m in norms)
    assert report.counts == {"bn_act": 9, "bn_add_act": 8, "max_pool": 1}
    assert models.describe_fusion(report).startswith("fused 9 bn_act, 8 bn_add_act, 1 max_pool; 4 left unfused")
    _, report = models.prepare_batchops(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10))
    assert models.describe_fusion(report) == "fused 23 bn_act, 6 bn_add, 1 linear_act; 6 left unfused"


@needs_torchvision
def test_any_torchvision_classifier_runs_as_the_convnets_do():
    """scripts/model_step.py and model_op_times.py take torchvision classifiers beyond the
    benchmark's (shufflenet's 24-channel branches, efficientnet's SiLU): the same workload."""
    assert "shufflenet_v2_x0_5" not in models.MODELS
    case = models.model_case("shufflenet_v2_x0_5", CPU, "channels_last", size="smoke")
    assert case.layout == "channels_last" and case.shape == models.workload("resnet18", CPU, "smoke").shape
    test_both_providers_take_a_step_with_the_same_loss(case)
    assert case.note.startswith("fused ")
    with pytest.raises(ValueError, match="unknown model 'resnet_nonexistent'.*torchvision image classifier"):
        models.workload("resnet_nonexistent", CPU)


@needs_torchvision
@pytest.mark.slow
def test_model_step_script_prints_one_checked_line():
    script = ROOT / "scripts" / "model_step.py"
    args = [
        sys.executable,
        str(script),
        *"resnet18 channels_last --size smoke --reps 3 --budget 0.5 --default-malloc".split(),
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert re.match(rf"torch {re.escape(torch.__version__)} resnet18 channels_last step: torch [0-9.]+ \[", line), line
    assert re.search(r"ratio [0-9.]+ \(fused 9 bn_act, 8 bn_add_act, 1 max_pool", line), line
    bad = subprocess.run([*args[:2], "resnet_nonexistent"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode != 0 and "unknown model 'resnet_nonexistent'" in bad.stderr


def test_model_op_times_counts_every_fused_family_on_both_sides():
    """scripts/model_op_times.py's totals: batch norm, every activation batchops fuses and the
    residual adds (its SiLU total once missed torch's SiLUs) and max pool, not the convolutions or
    hardsigmoid."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_op_times", ROOT / "scripts" / "model_op_times.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counted = [
        "aten.native_batch_norm_backward.default 16x96x56x56",
        "aten.silu_backward.default 16x96x56x56",
        "aten.hardtanh_.default 16x96x56x56",
        "aten.hardswish_backward.default 16x16x28x28",
        "aten.gelu.default 32x128x1024",
        "aten.threshold_backward.default 16x64x56x56",
        "aten.max_pool2d_with_indices_backward.default 16x64x28x28",
        "aten.add_.Tensor 16x64x56x56" + script.RESIDUAL_ADD,
    ]
    assert all(script.replaced_by_batchops(key) for key in counted)
    others = [
        "aten.convolution_backward.default 16x96x56x56",
        "aten.hardsigmoid.default 16x96x1x1",
        "aten.add_.Tensor 64",
    ]
    assert not any(script.replaced_by_batchops(key) for key in others)


def test_the_lstm_classifier_packs_with_each_providers_functions():
    work = models.workload("lstm_classifier", CPU, "smoke")
    torch.manual_seed(0)
    model = work.make_model()
    assert model.pack is torch.nn.utils.rnn.pack_padded_sequence
    ours = work.adapt_batchops(models.prepare_batchops(model)[0])
    assert ours.pack is batchops.pack_padded_sequence and ours.pad is batchops.pad_packed_sequence
    (ids, lengths), labels = work.make_batch(CPU)
    assert ids.shape == work.shape and lengths.device.type == "cpu" and labels.shape == lengths.shape
    # a bucketed batch: similar lengths, right-padded with 0
    assert int(lengths.max()) == ids.shape[1] and bool((ids[:, -1] == 0).sum() == (lengths < ids.shape[1]).sum())


def test_family_of_names():
    assert family_of("aten::mkldnn_convolution") == "conv/matmul"
    assert family_of("aten::convolution_backward") == "conv/matmul"
    assert family_of("aten::addmm") == "conv/matmul"
    assert family_of("aten::native_batch_norm_backward") == "batch/layer norm"
    assert family_of("aten::native_layer_norm") == "batch/layer norm"
    assert family_of("aten::threshold_backward") == "activations"
    assert family_of("aten::hardswish_") == "activations"
    assert family_of("aten::add_") == "adds" and family_of("aten::addcmul_") is None
    assert family_of("aten::copy_") == "copies" and family_of("aten::to") == "copies"
    assert family_of("batchops::batch_norm_forward") == "ours"
    assert family_of("Optimizer.step#SGD.step") == "optimizer"
    assert family_of("## Call CompiledFxGraph abc ##") == "compiled"
    assert family_of("aten::max_pool2d_with_indices") is None  # -> "other"


def test_profile_families_sum_to_the_profiled_time():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    bn = batchops.BatchNorm2d(8)
    opt = torch.optim.SGD([*conv.parameters(), *bn.parameters()], lr=0.1, momentum=0.9)
    x = torch.randn(4, 8, 16, 16)

    def step():
        y = torch.relu(bn(conv(x)) + x)
        opt.zero_grad()
        y.sum().backward()
        opt.step()

    step()
    start = time.perf_counter()
    fam = profile_families(step, CPU, calls=2)
    wall_ms = (time.perf_counter() - start) * 1e3 / 2
    assert list(fam) == list(FAMILIES) and all(v >= 0 for v in fam.values())
    for family in ("conv/matmul", "activations", "adds", "ours", "optimizer"):
        assert fam[family] > 0, (family, fam)
    assert fam["batch/layer norm"] == 0  # batchops' batch norm is "ours"
    # Self times of nested ops add up to at most the time the calls took.
    assert 0 < sum(fam.values()) <= wall_ms * 1.05 + 1.0, (fam, wall_ms)


def test_run_case_profiles_and_times_the_first_call():
    case = models.model_case("transformer_encoder", CPU, size="smoke")
    row = run_case(case, CPU, settings_for(smoke=True))
    assert row.note.startswith("fused 1 linear_act") and set(row.times) == set(PROVIDERS), row.note
    assert "DIFFER" not in row.note and "error" not in row.note
    assert set(row.first_ms) == set(PROVIDERS) and all(v > 0 for v in row.first_ms.values())
    assert set(row.families) == set(PROVIDERS)
    for fam in row.families.values():
        assert fam["conv/matmul"] > 0 and fam["batch/layer norm"] > 0 and sum(fam.values()) > 0
    assert row.families["batchops"]["ours"] > 0 and row.families["torch"]["ours"] == 0  # the fused Linear+GELU
    table = format_breakdown([row]).splitlines()
    header = table[0]
    assert header.startswith("| case | provider | first call ms | profiled ms per call | conv/matmul |")
    assert "compiled" not in header  # zero throughout: left out
    assert len(table) == 2 + len(PROVIDERS) and all(line.count("|") == header.count("|") for line in table)
    assert table[2].startswith("| transformer_encoder batch_first float32 step | torch |")
    assert format_breakdown([run_case(_skipped_case(), CPU, settings_for(smoke=True))]) == ""


def _skipped_case() -> Case:
    def build(device):
        raise Skip("needs something")

    return Case("Skipped", (1,), "-", torch.float32, "step", build, profile_calls=1)


def test_a_skip_is_reported_as_skipped_not_as_an_error():
    row = run_case(_skipped_case(), CPU, settings_for(smoke=True))
    assert row.note == "skipped: needs something" and row.times == {} and row.families == {}


def test_without_torchvision_the_convnet_rows_say_so_and_skip(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setattr(models, "MODELS", ("resnet18", "lstm_classifier"))
    with pytest.raises(Skip, match="torchvision is needed"):
        models.torchvision_or_skip()
    args = ["bench", "--op", "models", "--device", "cpu", "--smoke", "--default-malloc", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"resnet18", "lstm_classifier"}
    skipped = [line for name, line in rows.items() if name == "resnet18"]
    assert "skipped: torchvision is needed" in skipped[0] and "skipped: torchvision" in err
    version = torch.__version__.split("+")[0]
    if version in models.TORCHVISION_FOR_TORCH:
        assert f"torchvision=={models.TORCHVISION_FOR_TORCH[version]}" in skipped[0]
    assert all(word not in rows["lstm_classifier"] for word in ("error", "skipped", "DIFFER"))
    (written,) = tmp_path.iterdir()
    assert written.name.endswith("-models.md") and "where the time goes" in written.read_text()


def test_the_torchvision_pins_match_the_makefile():
    pins = dict(re.findall(r"^TORCHVISION_FOR_(\S+)\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M))
    assert pins == models.TORCHVISION_FOR_TORCH


def test_reps_fixes_the_samples_per_provider():
    settings = settings_for(reps=4)
    assert settings.min_reps == settings.max_reps == 4
    with pytest.raises(ValueError, match="reps"):
        settings_for(reps=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer_encoder", pytest.param("resnet18", marks=needs_torchvision)])
def test_compiled_steps_agree_and_report_the_compilation(name):
    case = models.model_case(name, CPU, compiled=True, size="smoke")
    assert case.mode == "compiled step"
    row = run_case(case, CPU, settings_for(smoke=True))
    assert row.note.startswith("fused") and set(row.times) == set(PROVIDERS), row.note
    assert "DIFFER" not in row.note and "error" not in row.note
    assert set(row.first_ms) == set(PROVIDERS)
    for fam in row.families.values():
        assert fam["compiled"] > 0  # inductor's generated code ran
