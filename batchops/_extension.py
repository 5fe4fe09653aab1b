"""Loading the compiled module batchops._C, and what it was built with.

The pure-Python parts of batchops (data, tuning, ...) import without it; kernel-backed calls
go through require_extension(), which says how to build it when it is missing or stale.
"""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` (see README.md, 'Build options')"
)

_C = None
_load_error: str | None = None


def _load() -> None:
    global _C, _load_error
    try:
        from batchops import _C as module  # importing runs the TORCH_LIBRARY registrations
    except ImportError as exc:
        _load_error = f"batchops' compiled kernels (batchops._C) could not be imported: {exc}; {BUILD_HINT}"
        return
    built_with = getattr(module, "torch_version", "unknown")
    if built_with != torch.__version__:
        _load_error = (
            f"batchops._C was built against torch {built_with} but torch {torch.__version__} is running; "
            f"C++ extensions must be rebuilt for the torch they run with: {BUILD_HINT}"
        )
        warnings.warn(_load_error, RuntimeWarning, stacklevel=3)
        return
    _C = module


_load()


def extension_available() -> bool:
    """True when the compiled kernels are loaded and match the running torch."""
    return _C is not None


def require_extension() -> None:
    """Raise a RuntimeError that says how to build the kernels when they are unavailable."""
    if _C is None:
        raise RuntimeError(_load_error or f"batchops._C is not available; {BUILD_HINT}")


def compiled_module():
    """batchops._C, or the RuntimeError of require_extension when it is unavailable."""
    require_extension()
    return _C


def cpu_kernel_isa() -> str | None:
    """The instruction set batchops' CPU kernels run with now: "default", "avx2" or "avx512" (the
    processor's best, capped by BATCHOPS_CPU_ISA, read at each call); None without the extension."""
    return _C.cpu_isa() if _C is not None else None


def build_info() -> dict:
    """How the compiled module was built: whether CUDA kernels exist, for which archs, and
    against which torch, next to the torch that is running now."""
    info = {
        "batchops_version": None,
        "extension_loaded": _C is not None,
        "cuda_kernels": False,
        "cuda_archs": [],
        "cpu_kernel_isa": None,
        "built_with_torch": None,
        "running_torch": torch.__version__,
        "error": _load_error,
    }
    from batchops._version import __version__

    info["batchops_version"] = __version__
    if _C is not None:
        info["cuda_kernels"] = bool(_C.with_cuda)
        info["cuda_archs"] = [a for a in _C.cuda_archs.replace(" ", ";").split(";") if a]
        info["built_with_torch"] = _C.torch_version
        info["cpu_kernel_isa"] = cpu_kernel_isa()
    return info
