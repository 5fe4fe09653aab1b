"""One rank process of :func:`batchops.testing.run_ranks`; run as a script, never imported.

``python _rank_worker.py SPEC_JSON RANK PARENT_PID``. It is started by path rather than with
``-m batchops.testing._rank_worker`` so that a rank does not import ``batchops/__init__`` (and
the compiled kernels) unless the function under test does.

The outcome goes to ``<run dir>/rank<R>.result`` as a pickled ``{"ok": True, "value": ...}`` or
``{"ok": False, "error": <formatted traceback>}``, written to a temporary name and renamed, so
the parent never reads half a file. Exit status: 0 when the function returned, 1 when it raised,
whatever ``sys.exit``/``os._exit``/a signal gives otherwise (then there is no result file). Once
the result is written the rank exits with ``os._exit``: atexit hooks and the interpreter's
teardown do not run (log handlers and stdout/stderr are flushed first).
"""

import faulthandler
import importlib
import importlib.util
import json
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types


def _watch_parent(parent_pid: int) -> None:
    # If the harness process dies (SIGKILL, crash), nothing would ever reap or kill this rank:
    # exit when we are re-parented instead of hanging on forever in a collective.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(70)


def _load_main(path: str) -> None:
    # Like multiprocessing's spawn: run the parent's script as __mp_main__ (its
    # `if __name__ == "__main__":` block does not run) so `__main__.fn` unpickles.
    import runpy

    module = types.ModuleType("__mp_main__")
    module.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _preload(name: str, path: str) -> None:
    """Import the function's module; from its file if its name is not importable here (e.g.
    pytest's ``--import-mode=importlib`` gives test modules names that are not on sys.path)."""
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError as exc:
        if not path or (exc.name != name and not name.startswith(f"{exc.name}.")):
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _write(path: str, outcome: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(outcome, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def main() -> int:
    spec_path, rank, parent_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(spec_path) as f:
        spec = json.load(f)
    sys.path[:] = spec["sys_path"]  # also drops this script's folder from sys.path[0]
    faulthandler.enable()  # a segfault leaves a Python stack in the rank's output
    if hasattr(signal, "SIGUSR1"):
        # The parent sends SIGUSR1 before killing a rank that timed out: its stacks show the hang.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    world_size = spec["world_size"]
    result_path = os.path.join(spec["run_dir"], f"rank{rank}.result")
    dist = None
    try:
        if spec["main_path"]:
            _load_main(spec["main_path"])
        if spec["module"]:
            _preload(spec["module"], spec["module_file"])
        with open(spec["payload"], "rb") as f:
            fn, args, kwargs = pickle.load(f)
        if isinstance(fn, str):
            fn = _resolve(fn)
        if spec["init"]:
            import datetime

            import torch.distributed as dist

            options = {}
            if spec["collective_timeout"] is not None:
                options["timeout"] = datetime.timedelta(seconds=spec["collective_timeout"])
            if "nccl" in spec["backend"]:
                import torch

                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
            dist.init_process_group(
                spec["backend"],
                init_method=spec["init_method"],
                rank=rank,
                world_size=world_size,
                **options,
            )
        outcome = {"ok": True, "value": fn(rank, world_size, *args, **kwargs)}
    except Exception:
        outcome = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist is not None and dist.is_initialized():
            try:
                # Objects still holding the group (a DDP model in fn's garbage) must go first:
                # destroying the group under a live DDP reducer aborted ranks at exit (~1 in 14).
                import gc

                gc.collect()
                dist.destroy_process_group()
            except Exception:
                pass  # after a peer failed this may raise too; the first error is the one to report
    try:
        _write(result_path, outcome)
    except Exception:  # e.g. the returned value cannot be pickled
        outcome = {"ok": False, "error": "the rank's return value could not be sent back:\n" + traceback.format_exc()}
        _write(result_path, outcome)
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()  # what the atexit hook would do: flush the log handlers
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    # The outcome is on disk and the output flushed: leave without the interpreter's teardown.
    # On torch 2.11 a gloo rank that had returned and destroyed its group was now and then
    # killed by SIGABRT during that teardown ("terminate called without an active exception",
    # a C++ thread destroyed while joinable, 1 run in ~16 of test_two_ranks_parity_resume_and_gather),
    # which turned a passed rank into a failed one. What the test measures ended with main().
    os._exit(main())
