"""batchops.train: DDP parity, exact resume, atomic weights_only checkpoints, Join / SyncBatchNorm,
and bounded failure when a rank dies.

Multi-rank checks run on two gloo ranks through batchops.testing.run_ranks (a few seconds of
process start-up each), so several checks share one run.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

import batchops.train as bt
from batchops.data import DistributedSamplerWrapper, ShuffledBatchSampler
from batchops.testing import run_ranks
from batchops.testing.isolation import run_isolated

N, D, C = 48, 6, 3


# ----------------------------------------------------------------------------- helpers
class Indexed(Dataset):
    """(x, y, index); with noise=True, x gets noise from torch's, NumPy's and Python's global
    RNGs, so a resume is exact only if all three streams are restored."""

    def __init__(self, n: int = N, noise: bool = False, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, D, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.noise:
            x = x + 0.01 * torch.rand(D) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return x, self.y[i], i


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, C))


class Recorder:
    """Callback: the sample indices of every consumed batch."""

    def __init__(self) -> None:
        self.indices: list = []

    def on_batch_start(self, trainer, batch):
        self.indices.extend(batch[2].tolist())


class GrowingAccumulation:
    """A batch-size controller like batchops.tuning.AdaptiveBatchSize: accumulation 1, then 2 from
    the third optimizer step on; its state is checkpointed and restored."""

    def __init__(self) -> None:
        self.accumulation_steps = 1
        self.steps = 0
        self.micro = 0

    def update(self, optimizer=None, micro_steps=None):
        self.steps += 1
        self.micro += micro_steps
        if self.steps >= 3:
            self.accumulation_steps = 2
        return self.accumulation_steps

    def state_dict(self):
        return {"accumulation_steps": self.accumulation_steps, "steps": self.steps, "micro": self.micro}

    def load_state_dict(self, state):
        self.accumulation_steps, self.steps, self.micro = state["accumulation_steps"], state["steps"], state["micro"]


def trainer_kwargs(**kw):
    return dict(device="cpu", progress=False, verbose=False, **kw)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def scramble_rng(seed: int = 12345) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def make_loader(kind: str, ds: Dataset, *, num_replicas=None, rank=None):
    if kind == "batch":
        return DataLoader(
            ds, batch_sampler=ShuffledBatchSampler(len(ds), 4, seed=1, num_replicas=num_replicas, rank=rank)
        )
    # an index sampler on the contract, with prefetching workers: the sampler runs ahead
    sampler = DistributedSamplerWrapper(RandomSampler(range(len(ds))), num_replicas=num_replicas, rank=rank, seed=3)
    return DataLoader(ds, sampler=sampler, batch_size=4, num_workers=2, prefetch_factor=2)


def run_resumable(
    kind: str,
    ckpt: str,
    *,
    max_steps=None,
    resume=None,
    accumulation=1,
    epochs=2,
    noise=False,
    num_replicas=None,
    rank=None,
):
    """One training run of the resume tests; returns (result, recorder, model)."""
    model = mlp(dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    ds = Indexed(noise=noise)
    loader = make_loader(kind, ds, num_replicas=num_replicas, rank=rank)
    rec = Recorder()
    if accumulation == "controller":
        accumulation = GrowingAccumulation()
    trainer = bt.Trainer(
        model,
        opt,
        scheduler=sched,
        accumulation_steps=accumulation,
        checkpoint_path=ckpt,
        callbacks=[rec],
        batch_fn=lambda b: (b[0], b[1]),
        **trainer_kwargs(),
    )
    result = trainer.fit(loader, epochs=epochs, max_steps=max_steps, resume=resume)
    return result, rec, model


# ----------------------------------------------------------------------------- rank functions
def _rank_parity_resume_gather(rank, world_size, tmpdir):
    out = {}
    # (1) DDP parity: local batch 4 on 2 ranks, and local batch 2 x 2 accumulation steps.
    for name, bs, accum in (("ddp", 4, 1), ("ddp_accum", 2, 2)):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        ds = Indexed()
        loader = DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), bs, seed=7))
        # accumulation: consecutive local batches of 2 form a step; ShuffledBatchSampler deals
        # batches round-robin, so the step's global batch is 4 consecutive batches of 2 = the
        # global batch of 8 of the single-process run.
        res = bt.fit(model, opt, loader, epochs=2, accumulation_steps=accum, **trainer_kwargs())
        assert res.world_size == 2 and res.rank == rank
        out[name] = flat_params(model)
    # (2) resume over two ranks, with dropout and scheduler: A uninterrupted, B stops at step 7,
    # C resumes (after the RNGs were scrambled).
    ckpt = os.path.join(tmpdir, "ranks.pt")
    a, rec_a, _ = run_resumable("batch", os.path.join(tmpdir, "a.pt"), num_replicas=None)
    b, rec_b, _ = run_resumable("batch", ckpt, max_steps=4)
    scramble_rng(rank + 99)
    c, rec_c, model_c = run_resumable("batch", ckpt, resume=ckpt)
    out["resume"] = {
        "a": a.step_losses,
        "b": b.step_losses,
        "c": c.step_losses,
        "idx_a": rec_a.indices,
        "idx_bc": rec_b.indices + rec_c.indices,
        "b_stopped": b.stopped_early,
        "c_from": c.resumed_from,
    }
    ck = torch.load(ckpt, weights_only=True)
    out["ckpt_rng_ranks"] = len(ck["rng"])
    # (3) evaluation across ranks with unequal shards: rank 0 has 5 samples, rank 1 has 3.
    model = mlp()
    trainer = bt.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **trainer_kwargs())
    ds = Indexed(n=8)
    mine = list(range(0, 5)) if rank == 0 else list(range(5, 8))
    loader = DataLoader(torch.utils.data.Subset(ds, mine), batch_size=2)
    ev = trainer.evaluate(loader, gather=True)
    out["eval"] = {k: ev[k] for k in ("loss", "accuracy", "count", "outputs", "targets")}
    return out


class _Killer:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_start(self, trainer, batch):
        if trainer.rank == 1 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # dies inside a training step


def _rank_killed(rank, world_size):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = Indexed(n=4000)
    loader = DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), 4, seed=0))
    bt.fit(model, opt, loader, epochs=50, callbacks=[_Killer(3)], **trainer_kwargs())
    return "unreachable"


class _Staller:
    def on_batch_start(self, trainer, batch):
        if trainer.rank == 1 and trainer.global_step == 2:
            time.sleep(60)  # alive but stuck: the peer must give up at the collective timeout


def _rank_stalled(rank, world_size):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = Indexed()
    loader = DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), 4, seed=0))
    bt.fit(model, opt, loader, epochs=5, callbacks=[_Staller()], **trainer_kwargs())
    return "unreachable"


class SyncBatchNorm(nn.BatchNorm1d):
    """Stands in for batchops.SyncBatchNorm / torch.nn.SyncBatchNorm: only the class name counts."""


def _rank_join(rank, world_size):
    out = {}
    ds = Indexed()
    # rank 0: 5 batches, rank 1: 3 batches (a user's own uneven loader)
    mine = list(range(0, 20)) if rank == 0 else list(range(20, 32))
    loader = DataLoader(torch.utils.data.Subset(ds, mine), batch_size=4)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = bt.fit(model, opt, loader, epochs=2, **trainer_kwargs())
    out["steps"] = res.global_step
    out["params"] = flat_params(model)
    # the same with a SyncBatchNorm (a class of that name, and torch's): a clear error, no hang
    for label, norm in (("dummy", SyncBatchNorm(16)), ("torch", nn.SyncBatchNorm(16))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, 16), norm, nn.Linear(16, C))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            bt.fit(model, opt, loader, epochs=1, **trainer_kwargs())
            out[label] = "no error"
        except bt.UnevenInputsError as exc:  # a RuntimeError
            out[label] = f"{type(exc).__name__}: {exc}"
    # join=False with uneven loaders: refused up front
    model = mlp()
    try:
        bt.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, join=False, **trainer_kwargs())
        out["join_false"] = "no error"
    except ValueError as exc:
        out["join_false"] = str(exc)
    return out


# ----------------------------------------------------------------------------- tests: one process
@pytest.mark.parametrize(
    "kind,stop,accumulation,noise",
    [
        ("batch", 7, 1, True),  # mid-epoch, batch sampler, RNG noise from torch/NumPy/Python in the data
        ("batch", 12, 1, True),  # exactly at the end of epoch 0
        ("index", 4, 2, False),  # mid-epoch, index sampler + 2 prefetching workers, accumulation 2
        ("batch", 5, "controller", True),  # a batch-size controller whose accumulation grows (state resumed)
    ],
)
def test_resume_reproduces_uninterrupted_run(tmp_path, kind, stop, accumulation, noise):
    scramble_rng(1)
    a, rec_a, model_a = run_resumable(kind, str(tmp_path / "a.pt"), accumulation=accumulation, noise=noise)
    ckpt = str(tmp_path / "b.pt")
    scramble_rng(1)
    b, rec_b, _ = run_resumable(kind, ckpt, max_steps=stop, accumulation=accumulation, noise=noise)
    assert b.global_step == stop and len(b.step_losses) == stop
    assert b.stopped_early and b.checkpoint_path == ckpt
    scramble_rng(777)  # the resumed run must restore every RNG itself
    c, rec_c, model_c = run_resumable(kind, ckpt, resume=ckpt, accumulation=accumulation, noise=noise)
    assert c.resumed_from == ckpt and not c.stopped_early
    # bitwise on the CPU: the same losses, the same samples in the same order, the same weights
    assert b.step_losses + c.step_losses == a.step_losses
    assert rec_b.indices + rec_c.indices == rec_a.indices
    assert sorted(rec_a.indices) == sorted(list(range(N)) * 2)  # two epochs, nothing skipped or repeated
    assert torch.equal(flat_params(model_c), flat_params(model_a))
    assert c.global_step == a.global_step and c.epoch == a.epoch == 2
    # the history of the resumed run continues the interrupted epoch (same epoch-mean loss)
    assert c.history[-1]["train_loss"] == a.history[-1]["train_loss"]


def test_checkpoint_contents_weights_only(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    for kind, stop, unit in (("batch", 5, 1), ("index", 3, 4)):
        run_resumable(kind, ckpt, max_steps=stop)
        state = torch.load(ckpt, weights_only=True)  # no pickled objects: tensors and plain values only
        assert state["format"] == bt.CHECKPOINT_FORMAT
        assert set(state) >= {
            "model",
            "optimizer",
            "scheduler",
            "scaler",
            "sampler",
            "batch_size",
            "rng",
            "progress",
            "world_size",
        }
        assert state["progress"] == {**state["progress"], "epoch": 0, "batch_in_epoch": stop, "global_step": stop}
        # the position counts consumed batches (x batch size for an index sampler), not what the
        # DataLoader's workers prefetched
        assert state["sampler"]["position"] == stop * unit and state["sampler"]["unit"] == unit
        assert state["scheduler"]["last_epoch"] == stop
        assert list(state["model"]) == ["0.weight", "0.bias", "3.weight", "3.bias"]  # unwrapped names
        (rng,) = state["rng"]
        assert len(rng["python"]["state"]) == 625 and isinstance(rng["python"]["state"], list)
        assert rng["numpy"]["keys"].shape == (624,) and rng["numpy"]["bit_generator"] == "MT19937"
        assert rng["torch"].dtype == torch.uint8
    # get/set_rng_state round trip
    state = bt.get_rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    bt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the disk, then the write fails
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        bt.atomic_save({"a": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file
    monkeypatch.setattr(torch, "save", real_save)
    bt.atomic_save({"a": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", failing_save)
    model = mlp()
    trainer = bt.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_path=str(path), **trainer_kwargs()
    )
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))  # the old file, intact


def test_amp_bf16_cpu_accumulation_and_evaluate():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ds = Indexed(n=256)
    loader = DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), 16, seed=0))
    trainer = bt.Trainer(model, opt, amp=True, accumulation_steps=3, **trainer_kwargs())
    assert trainer.autocast_dtype == torch.bfloat16 and trainer.scaler is None
    res = trainer.fit(loader, epochs=4, eval_loader=DataLoader(ds, batch_size=100))
    assert res.global_step == 4 * 6  # 16 batches per epoch: cycles of 3, 3, 3, 3, 3, 1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    ev = trainer.evaluate(DataLoader(ds, batch_size=100), gather=True)
    assert ev["count"] == 256 and ev["outputs"].shape == (256, C) and torch.equal(ev["targets"], ds.y)
    assert ev["accuracy"] == pytest.approx(float((ev["outputs"].argmax(1) == ds.y).float().mean()))
    with pytest.raises(ValueError, match="amp"):
        bt.Trainer(model, opt, amp="int8")


def test_find_sync_batchnorm():
    assert bt.find_sync_batchnorm(mlp()) is None
    assert bt.find_sync_batchnorm(nn.Sequential(nn.Linear(2, 2), SyncBatchNorm(2))) == ("1", "SyncBatchNorm")
    assert bt.find_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)))[1] == "SyncBatchNorm"


# ----------------------------------------------------------------------------- tests: two ranks
@pytest.mark.slow
def test_two_ranks_parity_resume_and_gather(tmp_path):
    results = run_ranks(_rank_parity_resume_gather, 2, args=(str(tmp_path),), timeout=150, collective_timeout=60)
    r0, r1 = (r.value for r in results)
    # single process, global batch 8 = the union of the two ranks' batches of 4 at each step
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ds = Indexed()
    bt.fit(
        model, opt, DataLoader(ds, batch_sampler=ShuffledBatchSampler(len(ds), 8, seed=7)), epochs=2, **trainer_kwargs()
    )
    single = flat_params(model)
    assert not torch.equal(single, flat_params(mlp()))  # it trained
    for r in (r0, r1):
        torch.testing.assert_close(r["ddp"], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["ddp_accum"], single, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["ddp"], r1["ddp"])  # DDP keeps the replicas identical
    # resume on two ranks: bitwise, per rank; the ranks saw disjoint samples
    for r in (r0, r1):
        res = r["resume"]
        assert res["b_stopped"] and res["c_from"]
        assert res["b"] + res["c"] == res["a"] and len(res["a"]) == 12
        assert res["idx_bc"] == res["idx_a"]
    assert sorted(r0["resume"]["idx_a"] + r1["resume"]["idx_a"]) == sorted(list(range(N)) * 2)
    assert r0["ckpt_rng_ranks"] == 2  # every rank's RNG states are in the checkpoint
    # evaluation gathered across ranks with unequal shards (5 and 3 samples)
    ds8 = Indexed(n=8)
    model = mlp()
    with torch.no_grad():
        outputs = model(ds8.x)
    for r in (r0, r1):
        ev = r["eval"]
        assert ev["count"] == 8 and torch.equal(ev["targets"], ds8.y)
        torch.testing.assert_close(ev["outputs"], outputs)
        assert ev["accuracy"] == pytest.approx(float((outputs.argmax(1) == ds8.y).float().mean()))
        assert ev["loss"] == pytest.approx(float(nn.functional.cross_entropy(outputs, ds8.y)), rel=1e-5)


@pytest.mark.slow
def test_killed_rank_makes_the_other_fail_fast():
    start = time.monotonic()
    results = run_ranks(_rank_killed, 2, timeout=90, collective_timeout=30, check=False)
    survivor, killed = results
    assert killed.exitcode == -signal.SIGKILL and not killed.timed_out
    assert not survivor.ok and not survivor.timed_out and survivor.exitcode == 1
    assert "DistributedTrainingError" in survivor.error and "rank 0 of 2" in survivor.error
    assert "another rank probably died" in survivor.error
    assert survivor.duration - killed.duration < 20  # the backend's error, at worst the collective timeout
    assert time.monotonic() - start < 80


@pytest.mark.slow
def test_stalled_rank_makes_the_other_fail_at_the_collective_timeout():
    results = run_ranks(_rank_stalled, 2, timeout=60, collective_timeout=3, check=False, failure_grace=1)
    survivor, stalled = results
    assert not survivor.ok and not survivor.timed_out and survivor.exitcode == 1
    assert "DistributedTrainingError" in survivor.error and "rank 0 of 2" in survivor.error
    assert "optimizer step 2" in survivor.error
    assert survivor.duration < 30  # ~3 s of collective timeout after start-up, not the 60 s sleep
    assert stalled.timed_out  # stopped by the harness one second after the survivor failed


@pytest.mark.slow
def test_join_uneven_loaders_and_sync_batchnorm_error():
    r0, r1 = (r.value for r in run_ranks(_rank_join, 2, timeout=120, collective_timeout=30))
    assert (r0["steps"], r1["steps"]) == (10, 6)  # 5 and 3 batches per epoch, two epochs
    assert torch.equal(r0["params"], r1["params"])  # Join's final sync: the replicas agree
    for r in (r0, r1):
        for label in ("dummy", "torch"):
            msg = r[label]
            assert msg.startswith("UnevenInputsError") and "SyncBatchNorm" in msg and "Join" in msg, msg
            assert "[5, 3]" in msg
        assert "join=False" in r["join_false"] and "[5, 3]" in r["join_false"]


def test_imports_without_compiled_extension(tmp_path):
    """batchops.train is pure Python: it imports (and trains) with batchops._C blocked."""
    out = run_isolated(
        """
        import sys
        import torch
        import batchops.train as bt
        model = torch.nn.Linear(3, 2)
        data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
        res = bt.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), data, epochs=2, device="cpu",
                     progress=False, verbose=False)
        print(res.global_step, "batchops._C" in sys.modules)
        """,
        blocked=("batchops._C", "batchops.ops", "batchops.nn"),
        script=tmp_path / "script.py",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6 False"
