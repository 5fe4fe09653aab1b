#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call: build for the visible GPU with the
# CUDA sources forced on, run the whole test suite (cuda cases run when a GPU is visible),
# then the CUDA benchmarks; results land in benchmarks/results/ (and $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16} BATCHOPS_CUDA=on
unset TORCH_CUDA_ARCH_LIST  # build for the GPU that is present
log=${OUT:-benchmarks/results}/gpu-check-$(date -u +%Y-%m-%d).log
mkdir -p "$(dirname "$log")"
{
  nvidia-smi || true
  make setup && .venv/bin/python .ci/check_cuda_kernels.py
  .venv/bin/python -m pytest tests -q --timeout 600 --durations 20 -rs; echo "pytest exit: $?"
  .venv/bin/batchops bench --device cuda --out benchmarks/results; echo "bench exit: $?"
  [ -n "${OUT:-}" ] && cp benchmarks/results/*.md "$OUT"/ 2>/dev/null
} 2>&1 | tee "$log"
