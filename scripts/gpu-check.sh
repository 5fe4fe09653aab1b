#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (`make gpu-check`): build in place for
# the visible GPU with the CUDA sources forced on, check every op has a CUDA kernel, run the
# whole test suite (the cuda cases run when a GPU is visible), then the CUDA benchmarks.
# Results land in benchmarks/results/ and, when $OUT is set (the device tool), in $OUT too.
# Uses the python that already has a CUDA torch (GPU machines here cannot reach PyPI).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} BATCHOPS_CUDA=on PYTHONUNBUFFERED=1
unset TORCH_CUDA_ARCH_LIST  # build for the GPU that is present
results=benchmarks/results
mkdir -p "$results"
log=${OUT:-$results}/gpu-check-$(date -u +%Y-%m-%d).log
{
  nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1
  $PY setup.py build_ext --inplace 2>&1 | grep -E "batchops setup|error" ; [ "${PIPESTATUS[0]}" = 0 ] || exit 1
  $PY .ci/check_cuda_kernels.py || exit 1
  # --continue-on-collection-errors: a GPU machine may lack a test-only package (hypothesis,
  # scikit-learn); the other modules must still run.
  $PY -m pytest tests -q --timeout 600 --durations 20 -rs --maxfail 20 --continue-on-collection-errors; echo "pytest exit: $?"
  $PY -m batchops bench --device cuda --out "$results"; echo "bench exit: $?"
  [ -n "${OUT:-}" ] && cp "$results"/*.md "$OUT"/ 2>/dev/null
} 2>&1 | tee "$log"
