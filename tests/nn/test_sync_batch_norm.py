"""batchops SyncBatchNorm: two gloo CPU ranks (batchops.testing.run_ranks) against torch's batch
norm on the concatenated batch in float64, plus single-process behaviour and the two ops it adds
(batch_norm_stats, batch_norm_backward_elemt).

Each run_ranks call starts two processes (a few seconds), so the ranked checks are packed into
one function that runs several cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchops
from batchops.nn.sync_batch_norm import SyncBatchNorm, _SyncBatchNormFunction
from batchops.testing import run_ranks

from tests.helpers import DEVICES, TORCH_ACT

pytestmark = pytest.mark.usefixtures("kernels")

f64 = torch.float64

# Ranked cases: per-rank batch sizes, the rest of the shape, and the module's options.
CASES = [
    dict(
        name="4d_uneven_relu_residual",
        sizes=(3, 5),
        tail=(4, 3, 3),
        activation="relu",
        residual=True,
        momentum=0.1,
        affine=True,
        x_grad=True,
        steps=1,
    ),
    dict(
        name="2d_empty_rank0",
        sizes=(0, 6),
        tail=(5,),
        activation=None,
        residual=False,
        momentum=0.1,
        affine=True,
        x_grad=True,
        steps=1,
    ),
    dict(
        name="3d_empty_rank1_cumulative_silu_no_affine",
        sizes=(4, 0),
        tail=(3, 5),
        activation="silu",
        residual=True,
        momentum=None,
        affine=False,
        x_grad=True,
        steps=2,
    ),
    dict(
        name="4d_channels_last_params_only",
        sizes=(2, 3),
        tail=(6, 2, 4),
        activation="gelu",
        residual=False,
        momentum=0.3,
        affine=True,
        x_grad=False,
        steps=1,
        channels_last=True,
    ),
]


def _data(case, step):
    """The whole batch of a step (every rank builds the same one and takes its slice)."""
    g = torch.Generator().manual_seed(1000 * step + len(case["name"]))
    N = sum(case["sizes"])
    x = torch.randn((N, *case["tail"]), generator=g, dtype=f64) * 2 + 3
    z = torch.randn((N, *case["tail"]), generator=g, dtype=f64)
    dy = torch.randn((N, *case["tail"]), generator=g, dtype=f64)
    return x, z, dy


def _params(case):
    g = torch.Generator().manual_seed(7)
    C = case["tail"][0]
    return torch.rand(C, generator=g, dtype=f64) + 0.5, torch.rand(C, generator=g, dtype=f64) - 0.5


def _run_steps(case, bn, lo, hi):
    """Train steps on rows lo:hi of each step's batch; the last step's results, then eval."""
    out = {}
    for step in range(case["steps"]):
        x, z, dy = (t[lo:hi].clone() for t in _data(case, step))
        if case.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(case["x_grad"])
        z.requires_grad_(case["residual"])
        bn.zero_grad()
        y = bn(x, z if case["residual"] else None)
        y.backward(dy)
        out.update(y=y.detach(), gx=x.grad, gz=z.grad if case["residual"] else None)
        if case["affine"]:
            out.update(gw=bn.weight.grad.clone(), gb=bn.bias.grad.clone())
    out.update(rm=bn.running_mean.clone(), rv=bn.running_var.clone(), nbt=bn.num_batches_tracked.clone())
    bn.eval()
    x, z, _ = _data(case, 99)
    out["eval"] = bn(x[lo:hi], z[lo:hi] if case["residual"] else None).detach()
    return out


def _count_collectives(counts):
    """Wrap torch.distributed's collectives (as SyncBatchNorm looks them up) with counters."""
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier"):
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _ranked(rank, world_size):
    results = {}
    counts = {}
    _count_collectives(counts)
    for case in CASES:
        counts.clear()
        C = case["tail"][0]
        bn = SyncBatchNorm(
            C, momentum=case["momentum"], affine=case["affine"], activation=case["activation"], dtype=f64
        )
        if case["affine"]:
            w, b = _params(case)
            with torch.no_grad():
                bn.weight.copy_(w)
                bn.bias.copy_(b)
        lo = sum(case["sizes"][:rank])
        out = _run_steps(case, bn, lo, lo + case["sizes"][rank])
        out["collectives"] = dict(counts)
        if case["affine"]:  # what DDP does with parameter gradients
            for key in ("gw", "gb"):
                dist.all_reduce(out[key])
        results[case["name"]] = out
    return results


def _reference(case):
    """torch.nn.BatchNorm on the concatenated batch, + residual, + activation, float64."""
    C = case["tail"][0]
    cls = nn.BatchNorm2d if len(case["tail"]) == 3 else nn.BatchNorm1d
    bn = cls(C, momentum=case["momentum"], affine=case["affine"], dtype=f64)
    if case["affine"]:
        w, b = _params(case)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    act = TORCH_ACT[case["activation"]]

    def run(x, z):
        y = bn(x)
        return act(y + z if case["residual"] else y)

    out = {}
    for step in range(case["steps"]):
        x, z, dy = _data(case, step)
        x.requires_grad_(case["x_grad"])
        z.requires_grad_(case["residual"])
        bn.zero_grad()
        y = run(x, z)
        y.backward(dy)
        out.update(y=y.detach(), gx=x.grad, gz=z.grad if case["residual"] else None)
        if case["affine"]:
            out.update(gw=bn.weight.grad.clone(), gb=bn.bias.grad.clone())
    out.update(rm=bn.running_mean.clone(), rv=bn.running_var.clone(), nbt=bn.num_batches_tracked.clone())
    bn.eval()
    x, z, _ = _data(case, 99)
    out["eval"] = run(x, z).detach()
    return out


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process_batch_norm():
    results = run_ranks(_ranked, 2, timeout=120, failure_grace=10)
    tol = dict(rtol=1e-10, atol=1e-10)
    for case in CASES:
        ref = _reference(case)
        ranks = [r.value[case["name"]] for r in results]
        for key in ("y", "gx", "gz", "eval"):
            if ref[key] is None:
                assert all(r[key] is None for r in ranks), key
                continue
            torch.testing.assert_close(
                torch.cat([r[key] for r in ranks]), ref[key], **tol, msg=lambda m: f"{case['name']} {key}: {m}"
            )
        for key in ("rm", "rv", "nbt") + (("gw", "gb") if case["affine"] else ()):
            for r in ranks:
                torch.testing.assert_close(r[key], ref[key], **tol, msg=lambda m: f"{case['name']} {key}: {m}")
        # one all_gather per training forward, one all_reduce per backward that needs grad_input
        steps = case["steps"]
        expected = {"all_gather": steps, **({"all_reduce": steps} if case["x_grad"] else {})}
        assert [r["collectives"] for r in ranks] == [expected, expected], case["name"]
        if case.get("channels_last"):
            assert ranks[0]["y"].is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- single process
def test_not_distributed_equals_batchops_batch_norm():
    assert not dist.is_initialized()
    sync = SyncBatchNorm(4, activation="relu", momentum=None)
    plain = batchops.BatchNorm2d(4, activation="relu", momentum=None)
    with torch.no_grad():
        for m in (sync, plain):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-0.2, 0.3, 4))
    for _iteration in range(2):
        x = torch.randn(3, 4, 5, 5)
        z = torch.randn(3, 4, 5, 5)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = sync(xs, z), plain(xp, z)
        torch.testing.assert_close(ys, yp, rtol=0, atol=0)
        ys.sum().backward()
        yp.sum().backward()
        torch.testing.assert_close(xs.grad, xp.grad, rtol=0, atol=0)
    torch.testing.assert_close(sync.running_mean, plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    assert int(sync.num_batches_tracked) == 2
    # torch's checks
    with pytest.raises(ValueError, match="at least 2D"):
        sync(torch.randn(4))
    with pytest.raises(ValueError, match="non-zero"):
        SyncBatchNorm(0)(torch.randn(2, 0))
    with pytest.raises(ValueError, match="activation"):
        SyncBatchNorm(4, activation="tanh")


def test_state_dict_matches_torch_sync_batch_norm():
    ours, theirs = SyncBatchNorm(6), nn.SyncBatchNorm(6)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.running_mean.fill_(0.25)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert SyncBatchNorm(3, 1e-3, 0.2, False, False, "pg").process_group == "pg"
    assert "activation='silu'" in repr(SyncBatchNorm(3, activation="silu"))


def test_convert_sync_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.2),
        nn.Sequential(batchops.BatchNorm2d(4, activation="relu", eps=1e-3, affine=False)),
        nn.BatchNorm1d(4, track_running_stats=False),
    )
    torch_bn, ours_bn = model[1], model[2][0]
    model[1].running_mean.fill_(0.5)
    model.eval()
    model[1].qconfig = "q"
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    a, b, c = out[1], out[2][0], out[3]
    assert all(type(m) is SyncBatchNorm for m in (a, b, c)) and type(out[0]) is nn.Conv2d
    assert a.weight is torch_bn.weight and a.bias is torch_bn.bias and a.running_mean is torch_bn.running_mean
    assert a.running_var is torch_bn.running_var and a.num_batches_tracked is torch_bn.num_batches_tracked
    assert a.momentum == 0.2 and a.activation is None and a.process_group == "pg" and a.qconfig == "q"
    assert not a.training
    assert b.activation == "relu" and b.eps == 1e-3 and not b.affine and b.weight is None
    assert b.running_mean is ours_bn.running_mean
    assert not c.track_running_stats and c.running_mean is None
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm
    # torch's own SyncBatchNorm converts too
    assert type(SyncBatchNorm.convert_sync_batchnorm(nn.SyncBatchNorm(2))) is SyncBatchNorm


def test_world_size_one_group_and_momentum_none(tmp_path):
    """The autograd function itself with a real (one-rank) group equals plain batch norm; the
    module with a one-rank group takes the plain path."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for shape, act, res in [((6, 3, 4, 5), "relu", True), ((7, 4), None, False), ((0, 3, 2, 2), None, False)]:
            x = torch.randn(shape, dtype=f64, requires_grad=True)
            z = torch.randn(shape, dtype=f64, requires_grad=True) if res else None
            w = (torch.rand(shape[1], dtype=f64) + 0.5).requires_grad_()
            b = torch.randn(shape[1], dtype=f64).requires_grad_()
            rm, rv = torch.zeros(shape[1], dtype=f64), torch.ones(shape[1], dtype=f64)
            rm2, rv2 = rm.clone(), rv.clone()
            mom = torch.tensor(0.5, dtype=f64)
            y = _SyncBatchNormFunction.apply(x, w, b, z, rm, rv, mom, 1e-5, act, dist.group.WORLD, 1)
            y2 = batchops.functional.batch_norm(x, rm2, rv2, w, b, True, mom, 1e-5, activation=act, residual=z)
            inputs = [x, w, b] + ([z] if res else [])
            dy = torch.randn_like(y)
            for g, g2 in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y2, inputs, dy)):
                torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rm, rm2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rv, rv2, rtol=1e-12, atol=1e-12)
        m = SyncBatchNorm(3, momentum=None)
        assert m._sync_group() is None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the new ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 3, 7, 4), (9, 6), (0, 3, 2), (4, 2, 3, 3, 2), (3, 40, 9, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_stats_matches_var_mean(device, shape, channels_last):
    x = (torch.randn(shape, dtype=f64) * 3 + 1e4).to(device)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    mean, m2 = torch.ops.batchops.batch_norm_stats(x)
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.size(1)
    if n == 0:
        expected_mean = expected_m2 = torch.zeros(x.size(1), dtype=f64, device=device)
    else:
        var, expected_mean = torch.var_mean(x, dim=dims, correction=0)
        expected_m2 = var * n
    assert mean.dtype == m2.dtype == f64
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, expected_m2, rtol=1e-9, atol=1e-9)
    # float32 input: float32 statistics
    mean32, m232 = torch.ops.batchops.batch_norm_stats(x.float())
    assert mean32.dtype == m232.dtype == torch.float32
    torch.testing.assert_close(mean32.double(), expected_mean, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (16, 40, 2, 3), (3, 40, 9, 10), (2, 3, 70, 70), (1, 32, 70, 70)])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_batch_norm_stats_is_the_training_forwards(device, shape, dtype):
    """SyncBatchNorm normalises with batch_norm_stats' statistics where BatchNorm2d uses the
    training forward's own: on one process both are the same bits (parts, channels copied in
    blocks, channel walks on runs of 90 values and of 4900, in pieces)."""
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 5
    C = shape[1]
    _, save_mean, save_invstd, _, _ = torch.ops.batchops.batch_norm_forward(
        x, None, None, None, None, None, True, 0.1, None, 1e-5, None
    )
    mean, m2 = torch.ops.batchops.batch_norm_stats(x)
    assert torch.equal(save_mean, mean)
    count = x.numel() // C
    torch.testing.assert_close(save_invstd, torch.rsqrt(m2 / count + 1e-5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_norm_backward_elemt_matches_formula(device, activation):
    x = torch.randn(4, 3, 5, dtype=f64, device=device)
    z = torch.randn_like(x)
    dy = torch.randn_like(x)
    w = torch.rand(3, dtype=f64, device=device) + 0.5
    b = torch.randn(3, dtype=f64, device=device)
    mean = torch.randn(3, dtype=f64, device=device)
    invstd = torch.rand(3, dtype=f64, device=device) + 0.5
    mean_g = torch.randn(3, dtype=f64, device=device)
    mean_gxhat = torch.randn(3, dtype=f64, device=device)
    gi, gz = torch.ops.batchops.batch_norm_backward_elemt(
        dy, x, w, b, z, mean, invstd, mean_g, mean_gxhat, activation, [True, True]
    )
    c = (slice(None), None)  # per channel, broadcast over (N, C, L)
    xhat = (x - mean[c]) * invstd[c]
    pre = xhat * w[c] + b[c] + z
    g = dy * (pre > 0) if activation == "relu" else dy
    torch.testing.assert_close(gz, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gi, w[c] * invstd[c] * (g - mean_g[c] - xhat * mean_gxhat[c]), rtol=1e-12, atol=1e-12)
    gi, gz = torch.ops.batchops.batch_norm_backward_elemt(
        dy, x, None, None, None, mean, invstd, mean_g, mean_gxhat, None, [True, False]
    )
    assert gz.numel() == 0
    torch.testing.assert_close(
        gi, invstd[c] * (dy - mean_g[c] - (x - mean[c]) * invstd[c] * mean_gxhat[c]), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_new_ops(device):
    x = torch.randn(4, 3, 5, 2, device=device)
    torch.library.opcheck(torch.ops.batchops.batch_norm_stats.default, (x,))
    torch.library.opcheck(torch.ops.batchops.batch_norm_stats.default, (x[:0],))
    C = 3
    v = [torch.rand(C, device=device) + 0.5 for _ in range(6)]
    args = (torch.randn_like(x), x, v[0], v[1], torch.randn_like(x), v[2], v[3], v[4], v[5], "relu", [True, True])
    torch.library.opcheck(torch.ops.batchops.batch_norm_backward_elemt.default, args)
    args = (torch.randn_like(x), x, None, None, None, v[2], v[3], v[4], v[5], None, [True, False])
    torch.library.opcheck(torch.ops.batchops.batch_norm_backward_elemt.default, args)
