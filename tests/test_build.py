"""How the CUDA sources are compiled: checks that need nvcc, not a GPU.

The activations (csrc/common/activation.h) are compiled to PTX with the flags of this
checkout's last CUDA build (read from its build.ninja), and the PTX is searched for the
approximations --use_fast_math brings: tanh.approx.f32 (relative error about 2^-11, which
gelu_tanh's 0.5 x (1 + tanh) turns into large errors for x < 0) and flushed denormals (.ftz
on ordinary arithmetic).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
import torch

from tests.helpers import ROOT

BUILD_NINJA = ROOT / "build" / f"temp-torch{torch.__version__}" / "build.ninja"

PROBE = r"""
#include "common/activation.h"
using batchops::Activation;
template <Activation A>
__global__ void probe(const float* x, float* y, float* d) {
  const int i = threadIdx.x;
  float derivative;
  y[i] = batchops::activation_forward_with_derivative<A>(x[i], derivative);
  d[i] = derivative + batchops::activation_backward<A>(x[i]);
}
template __global__ void probe<Activation::kSiLU>(const float*, float*, float*);
template __global__ void probe<Activation::kGELU>(const float*, float*, float*);
template __global__ void probe<Activation::kGELUTanh>(const float*, float*, float*);
"""
FAST_MATH_MARKS = ("tanh.approx", "mul.ftz.f32", "add.ftz.f32")


def _ninja_flags(name: str) -> list[str]:
    for line in BUILD_NINJA.read_text().splitlines():
        if line.startswith(f"{name} = "):
            return shlex.split(line.split(" = ", 1)[1])
    return []


def _build_nvcc_flags() -> list[str]:
    """Include paths, macros, language and math flags of the last build (no -gencode: the
    probe picks its own arch; no host-compiler options: --ptx compiles no host code)."""
    pre = [f for f in _ninja_flags("cuda_cflags") if f.startswith(("-I", "-D"))]
    post, skip = [], False
    for flag in _ninja_flags("cuda_post_cflags"):
        if skip:
            skip = False
        elif flag == "--compiler-options":
            skip = True
        elif not flag.startswith(("-gencode", "--compiler-options")):
            post.append(flag)
    return pre + post


def _ptx(tmp_path, flags: list[str]) -> str:
    source = tmp_path / "probe.cu"
    source.write_text(PROBE)
    out = tmp_path / "probe.ptx"
    cmd = ["nvcc", "--ptx", "-arch=sm_90", *flags, "-o", str(out), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"nvcc failed: {' '.join(cmd)}\n{done.stderr[-3000:]}"
    return out.read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_build_keeps_accurate_float_math(tmp_path):
    if not BUILD_NINJA.exists() or not _ninja_flags("cuda_post_cflags"):
        pytest.skip(f"no CUDA build of this checkout for torch {torch.__version__} ({BUILD_NINJA})")
    flags = _build_nvcc_flags()
    ptx = _ptx(tmp_path, flags)
    found = [mark for mark in FAST_MATH_MARKS if mark in ptx]
    assert not found, f"the CUDA build's flags {flags} compile the activations with {found} (fast math)"
    # The probe sees fast math when it is there: with --use_fast_math the same marks appear.
    fast = _ptx(tmp_path, flags + ["--use_fast_math"])
    assert all(mark in fast for mark in FAST_MATH_MARKS)
