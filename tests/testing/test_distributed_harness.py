"""batchops.testing.run_ranks: N gloo ranks as independent processes, per-rank outcomes.

Each run starts real processes (about 1-3 s of torch import per rank on a busy machine), so the
tests keep to two ranks and short timeouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from batchops.testing import RankFailure, RankResult, run_ranks
from batchops.testing.isolation import run_isolated


# ----------------------------------------------------------------------------- rank functions
# Module level, so the rank processes can import them by name.
def _all_reduce(rank, world_size, scale, *, big):
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    env = {
        k: os.environ.get(k)
        for k in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "OMP_NUM_THREADS",
            "BATCHOPS_TEST_VAR",
            "BATCHOPS_REMOVED",
        )
    }
    return {
        "sum": t.item(),
        "dist": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "env": env,
        "threads": torch.get_num_threads(),
        "big": torch.full((big,), float(rank)),  # a large value must come back without blocking
    }


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError(f"boom on rank {rank}")
    return "fine"


def _raise_or_sleep(rank, world_size):
    if rank == 1:
        raise KeyError("rank 1 gave up")
    time.sleep(60)  # would keep the run going until `timeout` without failure_grace


def _exit_3(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _killed_mid_run(rank, world_size):
    for step in range(10_000):
        if rank == 0 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(torch.ones(4))
    return "unreachable"


def _hang_after_peer_died(rank, world_size, pid_file):
    if rank == 0:
        os._exit(1)  # dies before the rendezvous
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    # env:// rendezvous with the MASTER_ADDR/MASTER_PORT the harness set: waits for rank 0 forever
    dist.init_process_group("gloo")


# ----------------------------------------------------------------------------- helpers
def assert_reaped(results):
    """Every rank process is gone: not running and not left as our zombie child."""
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    for r in results:
        assert r.pid is not None and r.pid not in children


def assert_dead(pid, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # orphan awaiting init's reap
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")


# ----------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_all_reduce_values_env_and_large_result(monkeypatch):
    big = 4_000_000  # 16 MB per rank
    monkeypatch.setenv("BATCHOPS_REMOVED", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the ranks get 1 unless env says otherwise
    results = run_ranks(
        _all_reduce,
        2,
        args=(10.0,),
        kwargs={"big": big},
        timeout=60,
        env={"BATCHOPS_TEST_VAR": "x", "BATCHOPS_REMOVED": None},  # None removes a variable
    )
    assert [type(r) for r in results] == [RankResult, RankResult]
    for rank, r in enumerate(results):
        assert r.ok and r.error is None and r.exitcode == 0 and not r.timed_out and r.rank == rank
        v = r.value
        assert v["sum"] == 30.0
        assert v["dist"] == (rank, 2, "gloo")
        assert v["env"]["RANK"] == str(rank) and v["env"]["LOCAL_RANK"] == str(rank)
        assert v["env"]["WORLD_SIZE"] == "2" and v["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert v["env"]["BATCHOPS_TEST_VAR"] == "x" and v["env"]["BATCHOPS_REMOVED"] is None
        assert v["env"]["OMP_NUM_THREADS"] == "1" and v["threads"] == 1
        assert v["big"].shape == (big,) and bool((v["big"] == rank).all())
    assert results[0].value["env"]["MASTER_PORT"] == results[1].value["env"]["MASTER_PORT"]
    assert_reaped(results)


@pytest.mark.slow
def test_exception_is_reported_with_traceback():
    results = run_ranks(_raise_on_rank_1, 2, timeout=60, check=False)
    ok, bad = results
    assert ok.ok and ok.value == "fine" and ok.exitcode == 0
    assert not bad.ok and bad.value is None and not bad.timed_out and bad.exitcode == 1
    assert "Traceback (most recent call last)" in bad.error
    assert "_raise_on_rank_1" in bad.error and "ValueError: boom on rank 1" in bad.error
    assert_reaped(results)


@pytest.mark.slow
def test_check_raises_rank_failure_and_failure_grace():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_or_sleep, 2, timeout=60, failure_grace=0.5)
    assert time.monotonic() - start < 30  # not the 60 s timeout: stopped 0.5 s after rank 1 failed
    exc = info.value
    assert isinstance(exc, RuntimeError)
    message = str(exc)
    assert "2 of 2 ranks failed" in message
    assert "rank 1 (exit code 1)" in message and "KeyError: 'rank 1 gave up'" in message
    assert "rank 0 (timed out)" in message
    sleeper_part = message.split("--- rank 0 (timed out) ---")[1].split("--- rank 1")[0]
    assert "in _raise_or_sleep" in sleeper_part  # faulthandler's stack dump of the stopped rank
    sleeper, raiser = exc.results
    assert sleeper.timed_out and not sleeper.ok and sleeper.exitcode is not None and sleeper.exitcode < 0
    assert not raiser.timed_out and raiser.exitcode == 1
    assert exc.failed == [sleeper, raiser]
    assert_reaped(exc.results)


@pytest.mark.slow
def test_os_exit_code_is_reported():
    results = run_ranks(_exit_3, 2, timeout=60, check=False)
    assert results[0].ok and results[0].value == 0
    r = results[1]
    assert not r.ok and r.exitcode == 3 and not r.timed_out and r.value is None
    assert "exited with code 3 without returning a result" in r.error


@pytest.mark.slow
def test_killed_rank_makes_peers_fail_fast():
    """The pattern for fault-tolerance tests: kill one rank mid-run, the others must raise
    (not hang) within a bounded time."""
    results = run_ranks(_killed_mid_run, 2, timeout=60, check=False)
    killed, survivor = results
    assert killed.exitcode == -signal.SIGKILL and not killed.timed_out
    assert "killed by signal SIGKILL" in killed.error
    assert not survivor.ok and not survivor.timed_out and survivor.exitcode == 1
    assert "RuntimeError" in survivor.error
    assert survivor.duration - killed.duration < 10
    assert_reaped(results)


@pytest.mark.slow
def test_hang_is_stopped_by_timeout(tmp_path):
    """Rank 0 dies abnormally; rank 1 hangs in the rendezvous and is stopped at the timeout,
    together with the process it started."""
    pid_file = tmp_path / "grandchild.pid"
    timeout = 8.0
    start = time.monotonic()
    results = run_ranks(_hang_after_peer_died, 2, args=(str(pid_file),), init=False, timeout=timeout, check=False)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 30  # a hang guard: stack dump + SIGTERM grace, generously
    dead, hung = results
    assert dead.exitcode == 1 and not dead.timed_out and not dead.ok
    assert hung.timed_out and not hung.ok and hung.exitcode is not None and hung.exitcode < 0
    assert "timed out" in hung.error
    assert "init_process_group" in hung.error  # faulthandler's stack dump of the hung rank
    assert_reaped(results)
    assert_dead(int(pid_file.read_text()))  # the rank's own child went with it


def test_string_target_and_argument_errors():
    # "module:qualname": operator.add(rank, world_size); init=False needs no torch in the ranks
    results = run_ranks("operator:add", 2, init=False, timeout=30)
    assert [r.value for r in results] == [2, 3]
    with pytest.raises(TypeError, match="picklable"):
        run_ranks(lambda rank, world_size: rank, 2)
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        run_ranks(_exit_3, 0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        run_ranks(_exit_3, 2.0)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        run_ranks(_exit_3, 2, timeout=0)
    with pytest.raises(ValueError, match="module:qualname"):
        run_ranks("operator.add", 2)


def test_main_script_without_torch_or_extension(tmp_path):
    """A function defined in a __main__ script works (as with multiprocessing's spawn), and the
    harness needs neither torch nor batchops' compiled module."""
    out = run_isolated(
        """
        from batchops.testing import run_ranks

        def where(rank, world_size):
            import os
            return (rank, world_size, os.environ["RANK"], __name__)

        if __name__ == "__main__":
            print(run_ranks(where, 3, init=False, timeout=30)[2].value)
        """,
        blocked=("torch", "batchops._C", "batchops.ops"),
        blocked_prefixes=("torch.",),
        script=tmp_path / "script.py",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 3, '2', '__mp_main__')"
