"""Import-time behaviour: the package without its compiled module, a stale build, what
build_info reports, autocast."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import batchops


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_imports_without_compiled_module():
    result = run_python("""
        import sys
        class BlockC:
            def find_spec(self, name, path=None, target=None):
                if name == "batchops._C":
                    raise ImportError("simulated: no compiled module")
        sys.meta_path.insert(0, BlockC())
        import torch
        import batchops, batchops.functional, batchops.nn
        assert not batchops.extension_available()
        info = batchops.build_info()
        assert info["extension_loaded"] is False and "pip install" in info["error"], info
        for call in (lambda: batchops.functional.batch_norm(torch.randn(4, 3), None, None, training=True),
                     lambda: batchops.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)),
                     lambda: batchops.BatchNorm2d(3, activation="relu")):
            try:
                call()
            except RuntimeError as exc:
                assert "pip install" in str(exc), exc
            else:
                raise AssertionError("a kernel-backed call worked without the compiled module")
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.skipif(not batchops.extension_available(), reason="needs the compiled module to be stale")
def test_stale_build_is_reported():
    result = run_python("""
        import warnings, torch
        torch.__version__ = "0.0.1"  # pretend torch was upgraded after the build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import batchops
        assert not batchops.extension_available()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("0.0.1" in m and "rebuilt" in m for m in messages), messages
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.usefixtures("kernels")
def test_build_info():
    info = batchops.build_info()
    for key in ("cuda_kernels", "cuda_archs", "built_with_torch", "running_torch"):
        assert key in info, key
    assert info["built_with_torch"] == torch.__version__
    assert info["running_torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["extension_loaded"] is True and info["error"] is None
    if info["cuda_kernels"]:
        assert info["cuda_archs"], "CUDA kernels built but no arch recorded"


@pytest.mark.skipif(not batchops.extension_available(), reason="needs the compiled module")
def test_activation_lists_come_from_the_kernels():
    """Python's activation names are the C++ table's (csrc/common/activation.h), every one has a
    torch reference in the tests, and the C++ op refuses a name outside it as Python does."""
    from batchops.ops.common import ACTIVATIONS

    from tests.helpers import TORCH_ACT

    assert ACTIVATIONS == (None, *batchops._extension.compiled_module().activations)
    assert set(TORCH_ACT) == set(ACTIVATIONS)
    assert set(batchops._extension.compiled_module().linear_saves_derivative) == set(ACTIVATIONS) - {None, "relu"}
    with pytest.raises(ValueError, match="gelu_tanh"):
        torch.ops.batchops.linear_forward(torch.randn(2, 3), torch.randn(4, 3), None, "tanh")


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_matches_torch(input_dtype):
    x = torch.randn(4, 3, 5, 5, dtype=input_dtype)
    ours, theirs = batchops.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), atol=2e-2, rtol=2e-2)
