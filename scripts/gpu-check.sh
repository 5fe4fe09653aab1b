#!/usr/bin/env bash
# `make gpu-check`: what a lent GPU machine (an H200 with torch 2.11.0+cu130, Python 3.12, no
# package index, 15 minutes of device time a session) should do, in one call of at most 9
# minutes (the device tool stops a command at 10). Stages, each bounded by `timeout`:
#   build      build in place for the visible GPU, MAX_JOBS=16          (180 s; log: gpu-build.log)
#   kernels    every op has a CUDA kernel (.ci/check_cuda_kernels.py)   ( 30 s)
#   tests      the cuda-marked tests, one pytest process per test module with
#              CUDA_LAUNCH_BLOCKING=1, so a fatal CUDA error in one module cannot hide the
#              others' results; no --maxfail                (120 s in all; tests-<folder>-<module>.log)
#   sanitizer  compute-sanitizer memcheck and racecheck over scripts/gpu_smoke.py, which calls
#              every kernel once; "Device not supported" is reported and skipped (2 x 30 s)
#   bench      scripts/gpu_quick_bench.py, the headline shapes; its results file grows row by
#              row, so a time-out keeps what was measured               ( 60 s; quick-bench.md)
#   models     scripts/gpu_model_bench.py: resnet50 (then resnet18) training steps with AMP,
#              channels-last first, batchops.fuse against torch with cuDNN; row by row
#                                                                        ( 90 s; models.md)
# Select stages with GPU_CHECK_STAGES="tests bench" (or as arguments): a second call on the
# still-warm machine skips the build (`ignored build outputs are kept between calls`).
# Everything goes to $OUT (the device tool brings it back) or, without $OUT, to
# benchmarks/results/gpu-check-<date>/; the last lines printed are a summary.
# Without a GPU the GPU stages are skipped (that is how this script is tested on CPU machines).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${*:-${GPU_CHECK_STAGES:-build kernels tests sanitizer bench models}}
OUT=${OUT:-benchmarks/results/gpu-check-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary=()
note() { summary+=("$1"); echo "[gpu-check] $1"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null)  stages: $STAGES"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
note "gpu: ${gpu:-none}; results in $OUT"

if has_stage build; then
  start=$(date +%s)
  # TORCH_CUDA_ARCH_LIST unset: setup.py builds for the GPU that is present (9.0 on an H200).
  if env -u TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} BATCHOPS_CUDA=on \
       timeout 180 $PY setup.py build_ext --inplace > "$OUT/gpu-build.log" 2>&1; then
    note "build: ok in $(( $(date +%s) - start )) s"
  else
    grep -E "error|Error" "$OUT/gpu-build.log" | head -20
    note "build: FAILED after $(( $(date +%s) - start )) s (exit or timeout; see gpu-build.log)"
  fi
fi

if [ -z "$gpu" ]; then
  note "no GPU visible: kernels, tests, sanitizer, bench and models stages skipped"
else
  if has_stage kernels; then
    if timeout 30 $PY .ci/check_cuda_kernels.py > "$OUT/kernels.log" 2>&1; then
      note "kernels: $(tail -1 "$OUT/kernels.log")"
    else
      note "kernels: FAILED: $(tail -1 "$OUT/kernels.log")"
    fi
  fi

  if has_stage tests; then
    deadline=$(( $(date +%s) + 120 ))
    # Every test module under tests/ and its folders that mentions cuda, the ops' (tests/ops/)
    # first, as the 120 s may not reach the last; each log is named after the module's path
    # (tests/ops/test_linear.py: tests-ops-test_linear.log), as basenames may repeat.
    modules=$(
      grep -rl --include="test_*.py" "cuda" tests/ops | sort
      grep -rl --include="test_*.py" "cuda" tests | sort
    )
    for module in $(echo "$modules" | awk '!seen[$0]++'); do
      name=${module#tests/}
      name=${name%.py}
      name=${name//\//-}
      left=$(( deadline - $(date +%s) ))
      if [ $left -le 5 ]; then note "tests $name: not run (the stage's 120 s were spent)"; continue; fi
      CUDA_LAUNCH_BLOCKING=1 timeout $left $PY -m pytest "$module" -m cuda -q -rfE --timeout 120 \
        -p no:cacheprovider > "$OUT/tests-$name.log" 2>&1
      status=$?
      case $status in
        0) ;;
        5) continue ;;  # no cuda-marked test in this module
      esac
      note "tests $name: $(tail -1 "$OUT/tests-$name.log" | tr -s '=' ' ') (exit $status)"
    done
  fi

  if has_stage sanitizer; then
    if command -v compute-sanitizer > /dev/null; then
      for tool in memcheck racecheck; do
        timeout 30 compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/gpu_smoke.py \
          > "$OUT/sanitizer-$tool.log" 2>&1
        status=$?
        if grep -q "Device not supported" "$OUT/sanitizer-$tool.log"; then
          note "sanitizer $tool: this machine's runtime refuses it (Device not supported)"
        elif [ $status -eq 0 ]; then
          note "sanitizer $tool: no errors ($(grep -c . "$OUT/sanitizer-$tool.log") lines of log)"
        else
          note "sanitizer $tool: exit $status: $(grep -m1 -E "ERROR SUMMARY|Error|error" "$OUT/sanitizer-$tool.log")"
        fi
      done
    else
      note "sanitizer: compute-sanitizer is not on PATH"
    fi
  fi

  if has_stage bench; then
    timeout 60 $PY scripts/gpu_quick_bench.py "$OUT/quick-bench.md" > "$OUT/quick-bench.log" 2>&1
    note "bench: exit $? with $(grep -c '^| [A-Za-z]' "$OUT/quick-bench.md" 2>/dev/null || echo 0) rows in quick-bench.md"
  fi

  if has_stage models; then
    timeout 90 $PY scripts/gpu_model_bench.py "$OUT/models.md" > "$OUT/models.log" 2>&1
    note "models: exit $? with $(grep -c '^| resnet' "$OUT/models.md" 2>/dev/null || echo 0) rows in models.md"
  fi
fi

echo
echo "===== gpu-check summary ($(date -u +%H:%M:%SZ)) ====="
printf '%s\n' "${summary[@]}"
[ -f "$OUT/quick-bench.md" ] && tail -n 14 "$OUT/quick-bench.md"
[ -f "$OUT/models.md" ] && grep '^| resnet' "$OUT/models.md"
exit 0
