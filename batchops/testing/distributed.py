"""Run a function on several ``torch.distributed`` ranks, each an independent process.

:func:`run_ranks` starts ``world_size`` Python processes, joins them in a process group
(``gloo`` by default, rendezvous through a file store in a private temporary folder) and calls
``fn(rank, world_size, *args, **kwargs)`` in each. Unlike ``torch.multiprocessing.spawn``, a rank
that fails does not take the others down: every rank runs until it returns, raises, dies or the
hard ``timeout`` expires, and each outcome comes back as a :class:`RankResult`. That makes the
failure behaviour of distributed code testable (kill one rank, assert the others raise within a
bounded time), not only its results.

Design notes:

* Ranks are started with :mod:`subprocess` (``sys.executable`` running ``_rank_worker.py`` by
  path) in a session of their own, so a timed-out rank is stopped together with any processes it
  started (DataLoader workers). A rank also exits by itself if the harness process dies.
* ``fn`` is sent by pickle (by reference: module and name). A rank gets the parent's
  ``sys.path`` and imports ``fn``'s module by name, or from its file if that name is not
  importable (pytest's ``--import-mode=importlib``); functions of a ``__main__`` script work like
  with multiprocessing's spawn (the script needs an ``if __name__ == "__main__":`` guard).
* Results and tracebacks come back through one file per rank and the ranks' stdout/stderr go to
  log files, never pipes, so a large result or a chatty or crashed rank cannot block the parent.
* A rank that times out is sent ``SIGUSR1`` first (``faulthandler`` prints every thread's Python
  stack into its output, which ends up in :attr:`RankResult.error`), then ``SIGTERM``, then
  ``SIGKILL``; every process is reaped before :func:`run_ranks` returns or raises.

This module imports neither torch nor the compiled extension; a rank imports
``torch.distributed`` only when ``init=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RankFailure", "RankResult", "run_ranks"]

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rank_worker.py")
_OUTPUT_TAIL = 20_000  # characters of each rank's stdout+stderr kept in RankResult.output
_POLL_S = 0.02
_STACK_DUMP_S = 0.3  # time a timed-out rank gets to print its stacks before SIGTERM
_KILL_GRACE_S = 2.0  # time between SIGTERM and SIGKILL


@dataclasses.dataclass
class RankResult:
    """What one rank did.

    Attributes:
        rank: the rank.
        ok: ``fn`` returned, its value came back and the process exited with status 0.
        value: ``fn``'s return value (``None`` unless ``ok``).
        error: why the rank is not ``ok``: the formatted traceback of the exception ``fn`` (or
            the process-group setup) raised, or a sentence saying how the process ended, with
            the tail of its output; ``None`` when ``ok``.
        exitcode: the process's exit status; ``-N`` when it died by signal ``N`` (as
            :attr:`multiprocessing.Process.exitcode`); ``None`` only if it could not be reaped.
        timed_out: the harness stopped the rank because it was still running at the deadline
            (``timeout``, or ``failure_grace`` after another rank failed).
        output: the last characters of the rank's combined stdout and stderr.
        duration: seconds from the start of the run until the process ended (or was stopped).
        pid: the rank's process id (already reaped when :func:`run_ranks` returns).
    """

    rank: int
    ok: bool
    value: Any = None
    error: str | None = None
    exitcode: int | None = None
    timed_out: bool = False
    output: str = ""
    duration: float = 0.0
    pid: int | None = None


class RankFailure(RuntimeError):
    """Raised by ``run_ranks(check=True)`` when a rank fails; ``results`` holds every rank's
    :class:`RankResult`, ``failed`` those that are not ``ok``."""

    def __init__(self, results: Sequence[RankResult]) -> None:
        self.results = list(results)
        self.failed = [r for r in self.results if not r.ok]
        parts = [f"{len(self.failed)} of {len(self.results)} ranks failed"]
        for r in self.failed:
            how = "timed out" if r.timed_out else f"exit code {r.exitcode}"
            parts.append(f"--- rank {r.rank} ({how}) ---\n{(r.error or '').rstrip()}")
        super().__init__("\n".join(parts))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "could not be reaped"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code} (exit code {code})"
    return f"exited with code {code}"


def _free_port() -> int:
    # For MASTER_PORT (code that calls init_process_group itself with env://). The harness's own
    # rendezvous uses a file store, so it does not depend on this port staying free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, limit: int = _OUTPUT_TAIL) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def _last_lines(text: str, n: int = 40) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join(lines[-n:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the rank's whole session (its own children too) while it is unreaped."""
    if proc.poll() is not None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)  # start_new_session: the rank leads its process group
        else:  # pragma: no cover - Windows
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _fn_module(fn: Any) -> tuple:
    """``(module name, module file, main script)`` the ranks must load to unpickle ``fn``."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__module__", None)
    if not isinstance(name, str):
        return None, None, None
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if name == "__main__":
        if not path or not path.endswith(".py"):
            raise TypeError(
                "run_ranks: fn is defined in an interactive __main__ and cannot be imported by the "
                "rank processes; define it in a module (or a script file)"
            )
        return None, None, os.path.abspath(path)
    return name, (os.path.abspath(path) if path else None), None


def run_ranks(
    fn: Callable[..., Any] | str,
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
    backend: str = "gloo",
    init: bool = True,
    env: Mapping[str, str | None] | None = None,
    collective_timeout: float | None = None,
    check: bool = True,
    failure_grace: float | None = None,
) -> list[RankResult]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` independent rank processes.

    Args:
        fn: a module-level function (or other picklable callable), or ``"module:qualname"``.
        world_size: number of ranks (processes).
        args, kwargs: extra arguments; pickled and sent to every rank.
        timeout: hard wall-clock limit in seconds for the whole run, process start-up included
            (a rank takes a second or two to import torch). Ranks still running then are
            stopped and reported with ``timed_out=True``.
        backend: ``torch.distributed`` backend (``"gloo"``; ``"nccl"`` also selects the
            device ``LOCAL_RANK % device_count`` first).
        init: call ``init_process_group(backend, init_method="file://...", rank, world_size)``
            before ``fn`` and ``destroy_process_group`` after it. With ``init=False`` ``fn``
            does it itself, e.g. ``init_process_group("gloo")`` with the ``env://`` variables
            below.
        env: extra environment variables for the ranks (a ``None`` value removes a variable);
            they override the defaults. Every rank gets ``RANK``, ``WORLD_SIZE``,
            ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
            ``MASTER_PORT``, ``OMP_NUM_THREADS=1`` (so ranks do not oversubscribe the cores)
            and ``PYTHONUNBUFFERED=1``.
        collective_timeout: seconds, passed as ``init_process_group(timeout=...)`` (torch's
            default when ``None``); a collective waiting longer raises in its rank.
        check: raise :class:`RankFailure` (listing every failed rank's traceback) when any rank
            is not ``ok``; with ``check=False`` the results are returned either way.
        failure_grace: when set, once a rank has failed the others get this many more seconds
            to finish before they are stopped (``timed_out=True``); ``None`` waits until
            ``timeout``. Useful to fail fast when a failure may leave peers blocked.

    Returns:
        One :class:`RankResult` per rank, in rank order.

    Raises:
        TypeError: ``fn`` or the arguments cannot be pickled (e.g. a lambda or a function
            defined inside another function).
        ValueError: a bad ``world_size``, ``timeout``, ``collective_timeout`` or
            ``failure_grace``.
        RankFailure: with ``check=True``, when some rank failed or timed out.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise TypeError(f"run_ranks: world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"run_ranks: world_size must be at least 1, got {world_size}")
    for name, value, minimum in (
        ("timeout", timeout, "positive"),
        ("collective_timeout", collective_timeout, "positive"),
        ("failure_grace", failure_grace, "non-negative"),
    ):
        if value is None and name != "timeout":
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and minimum == "positive")
        ):
            raise ValueError(f"run_ranks: {name} must be a {minimum} number of seconds, got {value!r}")
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"run_ranks: fn given as a string must be 'module:qualname', got {fn!r}")
        module = module_file = main_path = None
    elif callable(fn):
        module, module_file, main_path = _fn_module(fn)
    else:
        raise TypeError(f"run_ranks: fn must be callable or a 'module:qualname' string, got {type(fn).__name__}")
    try:
        payload = pickle.dumps((fn, tuple(args), dict(kwargs or {})), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            "run_ranks: fn, args and kwargs must be picklable; fn must be a module-level function "
            f"(not a lambda or a nested function) or a 'module:qualname' string: {exc}"
        ) from exc

    run_dir = tempfile.mkdtemp(prefix="batchops-ranks-")
    procs: list[subprocess.Popen | None] = [None] * world_size
    try:
        payload_path = os.path.join(run_dir, "payload.pkl")
        with open(payload_path, "wb") as f:
            f.write(payload)
        spec = {
            "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
            "main_path": main_path,
            "module": module,
            "module_file": module_file,
            "payload": payload_path,
            "run_dir": run_dir,
            "world_size": int(world_size),
            "init": bool(init),
            "backend": str(backend),
            "init_method": "file://" + os.path.join(run_dir, "store"),
            "collective_timeout": None if collective_timeout is None else float(collective_timeout),
        }
        spec_path = os.path.join(run_dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)

        base_env = dict(os.environ)
        base_env.update(
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
        start = time.monotonic()
        ended: list[float | None] = [None] * world_size
        for rank in range(world_size):
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            for key, value in (env or {}).items():
                if value is None:
                    rank_env.pop(key, None)
                else:
                    rank_env[key] = str(value)
            with open(os.path.join(run_dir, f"rank{rank}.log"), "wb") as log:
                procs[rank] = subprocess.Popen(
                    [sys.executable, _WORKER, spec_path, str(rank), str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=rank_env,
                    start_new_session=True,
                )

        # Wait for every rank, the deadline, or (with failure_grace) a failure plus the grace.
        deadline = start + timeout
        while True:
            now = time.monotonic()
            for rank, proc in enumerate(procs):
                if ended[rank] is None and proc.poll() is not None:
                    ended[rank] = now - start
                    if proc.returncode != 0 and failure_grace is not None:
                        deadline = min(deadline, now + failure_grace)
            if all(e is not None for e in ended) or now >= deadline:
                break
            time.sleep(_POLL_S)

        # Stop the stragglers: stack dump, SIGTERM, then SIGKILL; reap all.
        late = [r for r in range(world_size) if ended[r] is None]
        if late and hasattr(signal, "SIGUSR1"):
            for r in late:
                try:
                    procs[r].send_signal(signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            time.sleep(_STACK_DUMP_S)
        for r in late:
            _signal_group(procs[r], signal.SIGTERM)
        kill_at = time.monotonic() + _KILL_GRACE_S
        for r in late:
            try:
                procs[r].wait(timeout=max(0.0, kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(procs[r], getattr(signal, "SIGKILL", signal.SIGTERM))
                procs[r].wait()

        stopped = time.monotonic() - start
        results = []
        for rank in range(world_size):
            done = ended[rank] is not None
            results.append(
                _collect(
                    rank,
                    procs[rank],
                    run_dir,
                    deadline=None if done else deadline - start,
                    duration=ended[rank] if done else stopped,
                )
            )
    finally:
        for proc in procs:  # only on an error or KeyboardInterrupt in the harness itself
            if proc is not None and proc.poll() is None:
                _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    if check and not all(r.ok for r in results):
        raise RankFailure(results)
    return results


def _collect(rank: int, proc: subprocess.Popen, run_dir: str, *, deadline: float | None, duration: float) -> RankResult:
    """The rank's :class:`RankResult`; ``deadline`` (seconds after the start) is ``None``
    unless the harness stopped the rank."""
    output = _tail(os.path.join(run_dir, f"rank{rank}.log"))
    code = proc.returncode
    outcome: dict[str, Any] | None = None
    path = os.path.join(run_dir, f"rank{rank}.result")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                outcome = pickle.load(f)
        except Exception as exc:
            outcome = {"ok": False, "error": f"the rank's result could not be loaded: {exc!r}"}
    common = dict(rank=rank, exitcode=code, output=output, duration=duration, pid=proc.pid)
    tail = _last_lines(output)
    tail_note = f"\n--- output (last lines) ---\n{tail}" if tail else ""
    if deadline is not None:
        error = f"rank {rank} timed out: still running {deadline:.1f} s after the start, so it was stopped{tail_note}"
        if outcome is not None:  # it got as far as reporting, then hung while exiting
            error = (outcome["error"] + "\n" if not outcome["ok"] else "fn returned; ") + error
        return RankResult(ok=False, error=error, timed_out=True, **common)
    if outcome is None:
        error = f"rank {rank} {_describe_exit(code)} without returning a result{tail_note}"
        return RankResult(ok=False, error=error, **common)
    if not outcome["ok"]:
        return RankResult(ok=False, error=outcome["error"], **common)
    if code != 0:
        error = f"rank {rank} returned, then {_describe_exit(code)}{tail_note}"
        return RankResult(ok=False, error=error, **common)
    return RankResult(ok=True, value=outcome["value"], **common)
