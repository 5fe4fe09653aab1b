"""batchops.bench's shared parts: statistics, output checks, measuring a case, the table and its
file (no timing assertions). The `batchops bench` command itself is tested in tests/cli/test_cli.py."""

from __future__ import annotations

import datetime

import pytest
import torch

from batchops.bench import settings_for
from batchops.bench.case import PROVIDERS, REFERENCE, Case
from batchops.bench.checks import check_providers, compare_outputs
from batchops.bench.formatting import dtype_name, fmt_bytes, fmt_ms
from batchops.bench.measure import run_case
from batchops.bench.report import format_table, results_path, write_results
from batchops.bench.stats import Stats, quantile
from batchops.bench.timing import CopyBandwidth, TimingSettings, time_interleaved


def test_quantile_and_stats_on_a_known_list():
    xs = [7.0, 1.0, 10.0, 4.0, 2.0, 9.0, 3.0, 6.0, 5.0, 8.0]  # 1..10, shuffled
    assert quantile(xs, 0.5) == pytest.approx(5.5)
    assert quantile(xs, 0.2) == pytest.approx(2.8)  # position 0.2 * 9 = 1.8 -> 2 + 0.8
    assert quantile(xs, 0.8) == pytest.approx(8.2)
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 10.0
    s = Stats.of([3.0, 1.0, 2.0])
    assert (s.median, s.n) == (2.0, 3)
    # Same convention as torch.quantile (linear interpolation).
    ref = torch.quantile(torch.tensor(xs, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    assert [quantile(xs, q) for q in (0.2, 0.5, 0.8)] == pytest.approx(ref.tolist())
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_compare_outputs_flags_a_mismatch():
    a = torch.randn(100)
    assert compare_outputs((a, a), (a.clone(), a.clone()), torch.float32) == ""
    assert "DIFFER" in compare_outputs(a, a + 0.5, torch.float32)
    assert "DIFFER" in compare_outputs((a, a), a, torch.float32)  # not the same tensors
    good = lambda: (a.double(), a.sum())  # noqa: E731
    assert check_providers({"torch": good, "batchops": good, REFERENCE: good}, torch.float32) == ""
    note = check_providers(
        {"torch": lambda: (a.double() + 0.5, a.sum()), "batchops": good, REFERENCE: good}, torch.float32
    )
    assert note.startswith("TORCH OFF vs float64"), note


def test_formatting():
    assert fmt_bytes(None) == "n/a" and fmt_bytes(512) == "512 B" and fmt_bytes(3 * 2**20) == "3.0 MiB"
    assert fmt_ms(None) == "-"
    assert fmt_ms(Stats(1.23456, 1.0, 2.0, 3)) == "1.235 [1.000, 2.000]"
    assert fmt_ms(Stats(123.4, 12.34, 1.5, 3)) == "123.4 [12.34, 1.500]"
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.int64) == "int64"


def _scale_case(name: str, off: float = 0.0, fail: bool = False) -> Case:
    """A benchmark case as a benchmark module would build it, on plain torch ops."""

    def build(device):
        if fail:
            raise RuntimeError("no kernel for this shape\nsecond line")
        x = torch.randn(64, 32, device=device)
        return {
            "torch": lambda: x * 2,
            "batchops": lambda: x + x + off,
            REFERENCE: lambda: x.double() * 2,
        }

    return Case(name, (64, 32), "contiguous", torch.float32, "forward", build, bytes_moved=2 * 64 * 32 * 4, flops=64)


def test_a_benchmark_plugs_in_by_building_cases():
    device = torch.device("cpu")
    settings = settings_for(smoke=True)
    good, off, broken = (
        run_case(_scale_case("Scale"), device, settings),
        run_case(_scale_case("ScaleOff", off=0.5), device, settings),
        run_case(_scale_case("ScaleBroken", fail=True), device, settings),
    )
    assert set(good.times) == set(PROVIDERS) and good.note == ""  # the reference is checked, not timed
    assert all(s.n == settings.min_reps for s in good.times.values())
    assert good.ratio is not None and good.ratio > 0 and good.bandwidth() > 0 and good.flop_rate("torch") > 0
    assert good.peak == {"torch": None, "batchops": None}  # n/a on the CPU
    assert off.note.startswith("BATCHOPS OFF vs float64"), off.note
    assert broken.times == {} and broken.note == "error: RuntimeError: no kernel for this shape"

    copy_bw = CopyBandwidth(bytes_per_s=1e10, tensor_bytes=2**20, reps=3, cache_bytes=None)
    table = format_table([good, off, broken], copy_bw).splitlines()
    header, rule, rows = table[0], table[1], table[2:]
    assert header.startswith("| op | shape |") and rule.count("---") == header.count("|") - 1
    assert [r.split(" | ")[0] for r in rows] == ["| Scale", "| ScaleOff", "| ScaleBroken"]
    assert all(r.count("|") == header.count("|") for r in rows)
    assert rows[2].endswith("| - | error: RuntimeError: no kernel for this shape |")


def test_time_interleaved_takes_the_samples_asked_for():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    settings = TimingSettings(warmup_s=0.0, min_warmup=2, budget_s=0.0, min_reps=5, max_reps=5)
    stats = time_interleaved({"a": lambda: count("a"), "b": lambda: count("b")}, torch.device("cpu"), settings)
    assert calls == {"a": 7, "b": 7} and stats["a"].n == stats["b"].n == 5
    assert time_interleaved({}, torch.device("cpu"), settings) == {}


def test_time_interleaved_collects_no_old_generation_among_its_samples(monkeypatch):
    # A full collection walks every Python object and evicts the caches, slowing the next calls:
    # it may run before the first call only; between rounds the young generations are collected,
    # which still frees the providers' cyclic garbage, and the collector is restored.
    import gc
    import weakref

    import batchops.bench.timing as timing

    events, cycles = [], []
    real_collect = gc.collect

    def collect(generation=2):
        events.append(("collect", generation))
        return real_collect(generation)

    class Cycle:
        def __init__(self):
            self.me = self

    def provider():
        events.append(("call", gc.isenabled()))
        cycles.append(weakref.ref(Cycle()))

    monkeypatch.setattr(timing.gc, "collect", collect)
    settings = TimingSettings(warmup_s=0.0, min_warmup=20, budget_s=0.0, min_reps=40, max_reps=40)
    assert gc.isenabled()
    time_interleaved({"a": provider, "b": provider}, torch.device("cpu"), settings)
    first_call = next(i for i, e in enumerate(events) if e[0] == "call")
    assert ("collect", 2) in events[:first_call]
    assert all(e != ("collect", 2) for e in events[first_call:])
    # Every 16 warm-up calls of a provider (20 calls each: one each) and every 16 rounds (40: two).
    assert events.count(("collect", 1)) == 2 * (20 // 16) + 40 // 16
    assert all(enabled is False for kind, enabled in events if kind == "call")
    assert gc.isenabled()
    # Everything made before the last between-rounds collection was freed by it.
    last = max(i for i, e in enumerate(events) if e == ("collect", 1))
    made_before = sum(1 for kind, _ in events[:last] if kind == "call")
    assert all(ref() is None for ref in cycles[:made_before])


def test_copy_bandwidth_keeps_the_best_measurement():
    a = CopyBandwidth(bytes_per_s=2e9, tensor_bytes=2**28, reps=5, cache_bytes=32 * 2**20)
    both = a.combined(CopyBandwidth(bytes_per_s=3e9, tensor_bytes=2**28, reps=5, cache_bytes=32 * 2**20))
    assert both.bytes_per_s == 3e9 and both.measurements == (2e9, 3e9)
    text = both.describe()
    assert text.startswith("3.0 GB/s (best of 2.0 / 3.0 GB/s") and "256.0 MiB" in text and "32.0 MiB" in text


def test_results_file_is_named_after_device_date_and_suffix(tmp_path):
    when = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    cpu = torch.device("cpu")
    expected = tmp_path / "out" / f"cpu-{torch.get_num_threads()}threads-2026-01-02-linear.md"
    assert results_path(tmp_path / "out", cpu, when, "-linear") == str(expected)
    path = write_results("# table", tmp_path / "out", cpu, when, "-linear")  # creates the folder
    assert path == str(expected) and expected.read_text() == "# table\n"


def test_cycled_calls_take_the_next_input_set_and_wrap():
    from batchops.bench.batch_norm import _cycled

    m = torch.nn.Linear(1, 1)  # only its weight and bias are taken, as gradient inputs
    with torch.no_grad():
        m.weight.fill_(1.0)
    sets = [(torch.full((3,), float(k), requires_grad=True), None, torch.ones(3)) for k in range(3)]
    full = _cycled(lambda x, z: (x * x * m.weight + m.bias).squeeze(0), m, sets, "full", training=True)
    assert [full()[0][0].item() for _ in range(4)] == [0.0, 2.0, 4.0, 0.0]  # d(x^2 w)/dx = 2x (w = 1)
    infer = _cycled(lambda x, z: x + 1, m, sets, "forward", training=False)
    outs = [infer() for _ in range(4)]
    assert [o[0].item() for o in outs] == [1.0, 2.0, 3.0, 1.0] and not outs[0].requires_grad


@pytest.mark.skipif(not __import__("batchops").extension_available(), reason="batchops._C is not built")
def test_cold_batch_norm_case_gives_each_provider_its_own_input_sets(monkeypatch):
    """A cold case builds COLD_BYTES of input sets per provider, copies of the same data (so the
    float64 check holds) in separate tensors: neither provider finds the other's in cache."""
    from batchops.bench import batch_norm

    shape = (2, 8, 4, 4)
    monkeypatch.setattr(batch_norm, "COLD_BYTES", 4 * 2 * (2 * 8 * 4 * 4 * 4))  # 4 sets of x and dy
    given = []
    real_cycled = batch_norm._cycled
    monkeypatch.setattr(
        batch_norm,
        "_cycled",
        lambda f, m, sets, mode, training: given.append(sets) or real_cycled(f, m, sets, mode, training),
    )
    case = batch_norm.batch_norm_case(shape, "channels_last", torch.float32, "full", "plain", cold=True)
    assert case.op == "BatchNorm2d (cold)"
    fns = case.build(torch.device("cpu"))
    assert len(given) == 2 and all(len(sets) == 4 for sets in given)
    pointers = [t.data_ptr() for sets in given for x, _, dy in sets for t in (x, dy)]
    assert len(set(pointers)) == len(pointers)  # 16 distinct tensors
    for x, _, dy in given[0] + given[1]:
        assert torch.equal(x, given[0][0][0]) and torch.equal(dy, given[0][0][2])
        assert x.is_contiguous(memory_format=torch.channels_last) and x.requires_grad
    torch.testing.assert_close(fns["torch"]()[0], fns["batchops"]()[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cold inputs"):
        batch_norm.batch_norm_case(shape, "NCHW", torch.float32, "backward", "plain", cold=True)
