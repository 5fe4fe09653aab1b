"""Checkpoint files: atomic writes, ``weights_only`` loading, and every RNG state as tensors.

* :func:`atomic_save` -- ``torch.save`` to a temporary file in the target's folder, flush,
  ``fsync``, ``os.replace`` onto the target, ``fsync`` the folder. A crash or an exception at any
  point leaves either the previous file or the new one, never a partial file, and no
  temporary file behind (except after a hard kill mid-write: a ``.tmp-*`` sibling).
* :func:`load_checkpoint` -- ``torch.load(map_location="cpu", weights_only=True)``.
* :func:`get_rng_state` / :func:`set_rng_state` -- Python ``random``, NumPy's global
  generator, torch's CPU generator and every CUDA device's generator, in a form that
  ``torch.load(weights_only=True)`` accepts (tensors, lists, ints, floats, strings, ``None``).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_save", "get_rng_state", "load_checkpoint", "set_rng_state"]


def atomic_save(obj: Any, path: os.PathLike[str] | str) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the path.

    The data goes to ``<dir>/.<name>.tmp-XXXX`` first (same folder, so the final
    ``os.replace`` is an atomic rename on POSIX and Windows), is flushed and ``fsync``-ed, and
    only then replaces ``path``. If anything raises, the temporary file is removed and ``path``
    is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return path
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: os.PathLike[str] | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True`` onto the CPU."""
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def get_rng_state() -> dict[str, Any]:
    """Every global RNG state of this process, ``weights_only``-loadable.

    ``{"python": {"version", "state": [ints], "gauss_next"}, "numpy": {"bit_generator",
    "keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"}, "torch": uint8 tensor,
    "cuda": [uint8 tensor per device]}`` (``cuda`` is empty when CUDA is unavailable).
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = []
    if torch.cuda.is_available():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any], *, cuda: bool | None = None) -> None:
    """Restore :func:`get_rng_state`'s output. CUDA states are restored when CUDA is available
    (``cuda=None``) for as many devices as both the state and this machine have."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state(
        (
            str(npy["bit_generator"]),
            keys.astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda and state.get("cuda"):
        n = min(len(state["cuda"]), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(state["cuda"][i].to(torch.uint8).cpu(), i)
