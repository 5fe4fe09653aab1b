"""Build batchops' compiled module (batchops._C) with torch.utils.cpp_extension.

Environment switches (setup.py prints what it decided):
  BATCHOPS_CUDA=auto|on|off   auto (default): build the CUDA sources when nvcc and a CUDA
                              build of torch are present, GPU or not; on: fail loudly if they
                              cannot be built; off: CPU only.
  TORCH_CUDA_ARCH_LIST        e.g. "9.0" or "8.0;9.0+PTX". With no GPU visible and no list
                              given we build 8.0 and 9.0 plus 9.0 PTX (DEFAULT_ARCHS).
  MAX_JOBS                    parallel compile jobs (ninja).
  BATCHOPS_DEBUG=1            -O0 -g instead of -O3.
  BATCHOPS_EXTRA_CXX          extra flags for the C++ compiler (e.g. for experiments).

CPU kernels are compiled for the baseline, AVX2 and AVX-512 (csrc/batch_norm/cpu_*.cpp) and the
best the processor supports is picked at run time.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Without a visible GPU: A100 (8.0; also runs on 8.6 / 8.9 parts such as A10, L4, L40) and
# H100/H200 (9.0), plus 9.0 PTX for newer GPUs to JIT-compile. Older GPUs (T4 = 7.5): set
# TORCH_CUDA_ARCH_LIST yourself.
DEFAULT_ARCHS = "8.0;9.0+PTX"


def log(msg):
    print(f"[batchops setup] {msg}", flush=True)


def find_cuda_home():
    """CUDA_HOME, or the toolkit behind the nvcc on PATH.

    torch guesses dirname(dirname(which nvcc)); on these machines nvcc on PATH is a link or
    a one-line wrapper script in /usr/local/bin, so that guess is /usr/local and -lcudart
    fails. Resolve the link, then look inside a wrapper for the real nvcc it execs.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(m.group(1).decode()))))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def pip_cuda_include_dirs():
    """torch's CUDA headers include cusparse.h / cublas_v2.h; a bare toolkit may lack them,
    but the nvidia-* wheels that came with torch ship them under nvidia/cu13/include."""
    import site

    dirs = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    for sp in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(sp, pattern))):
                if os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(os.path.join(d, "cublas_v2.h")):
                    dirs.append(d)
    return list(dict.fromkeys(dirs))


mode = os.environ.get("BATCHOPS_CUDA", "auto").strip().lower()
if mode not in ("auto", "on", "off"):
    sys.exit(f"BATCHOPS_CUDA must be auto, on or off, got {mode!r}")

cuda_home = find_cuda_home() if mode != "off" else None
if cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import, which reads it once

MIN_TORCH = (2, 11)
NO_ISOLATION_HINT = (
    "batchops compiles its kernels against the torch you run, so it builds with that torch, not "
    "in pip's isolated build environment. Install torch (2.11 or newer) first, then run:\n"
    "    pip install setuptools wheel ninja\n"
    "    pip install --no-build-isolation .        (or -e . for a development install)"
)
try:
    import torch  # noqa: E402
except ImportError:
    # What a plain `pip install .` reaches: the isolated build environment has no torch (on
    # purpose: pyproject.toml does not list it, so no second torch is downloaded to build with).
    sys.exit(f"[batchops setup] torch cannot be imported here ({sys.executable}).\n{NO_ISOLATION_HINT}")
if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH:
    sys.exit(
        f"[batchops setup] torch {torch.__version__} is older than batchops supports "
        f"({'.'.join(map(str, MIN_TORCH))} or newer)"
    )
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = False
why = ""
if mode == "off":
    why = "BATCHOPS_CUDA=off"
elif torch.version.cuda is None:
    why = f"torch {torch.__version__} is a CPU-only build"
elif cuda_home is None:
    why = "no nvcc / CUDA toolkit found (set CUDA_HOME)"
else:
    with_cuda = True
if mode == "on" and not with_cuda:
    sys.exit(f"[batchops setup] BATCHOPS_CUDA=on but the CUDA sources cannot be built: {why}")

arch_list = ""
if with_cuda:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not arch_list and not torch.cuda.is_available():
        arch_list = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if not arch_list:
        # A GPU is visible: torch's default builds for it; name it so build_info can report it.
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = ";".join(f"{a}.{b}" for a, b in caps)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

debug = os.environ.get("BATCHOPS_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in ATen's headers, so without it
# every CPU kernel runs on one thread. The link flag resolves to the libgomp.so.1 torch loads.
# -fno-trapping-math: lets GCC turn the activation selects into vector blends.
cxx_flags = (
    opt + ["-fopenmp", "-fno-trapping-math", "-Wno-unused-parameter"] + os.environ.get("BATCHOPS_EXTRA_CXX", "").split()
)
# No --use_fast_math: it turns std::tanh(float) into tanh.approx.f32 (relative error ~2^-11;
# gelu_tanh's 0.5 x (1 + t) then cancels for x < 0), flushes denormals and approximates
# division and sqrt. tests/test_build.py checks the PTX of the activations.
nvcc_flags = opt + ["-lineinfo"]
# The version string lands in the binary so import can tell a stale build from a torch upgrade.
macros = [
    ("BATCHOPS_TORCH_VERSION", f'"{torch.__version__}"'),
    ("BATCHOPS_CUDA_ARCHS", f'"{arch_list}"'),
    ("BATCHOPS_WITH_CUDA", "1" if with_cuda else "0"),
]

sources = ["csrc/batchops.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*/*.cu"))
include_dirs = [os.path.join(ROOT, "csrc")]

if with_cuda:
    include_dirs += pip_cuda_include_dirs()
    ext = CUDAExtension(
        "batchops._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
else:
    ext = CppExtension(
        "batchops._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), BATCHOPS_CUDA={mode}")
if with_cuda:
    log(f"CUDA sources: ON  ({len(cuda_sources)} files), CUDA_HOME={os.environ['CUDA_HOME']}, archs={arch_list}")
    log(f"extra include dirs: {include_dirs[1:]}")
else:
    log(f"CUDA sources: OFF ({why})")
log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}, flags={' '.join(cxx_flags)}")


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, compiling in build/temp-torch<version>/ instead of pip's temporary
    folder, so a rebuild recompiles only what changed (ninja) and builds for two torch
    versions in one checkout do not mix objects."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-torch{torch.__version__}")


setup(
    packages=find_packages(include=["batchops", "batchops.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
