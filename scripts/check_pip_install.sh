#!/usr/bin/env bash
# A plain `pip install .` (pip's isolated build, which has no torch) must stop at once with the
# instruction to build with --no-build-isolation, not download a torch to compile against:
#   - in a fresh venv without torch (about 10 s: pip fetches setuptools, wheel and ninja for
#     the isolated build environment);
#   - with VENV given (one that has torch), from that venv too: its torch is not visible to
#     an isolated build either, so nothing could be built against a torch other than its own.
# usage: scripts/check_pip_install.sh [VENV]
set -uo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

expect_refusal() {  # LABEL PIP
  local label=$1 pip=$2 out status
  out=$("$pip" install --no-cache-dir --no-deps --target "$tmp/target" . 2>&1)
  status=$?
  if [ $status -eq 0 ]; then
    echo "$out" | tail -20
    echo "check_pip_install: FAILED ($label): a plain 'pip install .' built batchops in an isolated environment"
    exit 1
  fi
  if ! grep -q -- "pip install --no-build-isolation" <<<"$out"; then
    echo "$out" | tail -40
    echo "check_pip_install: FAILED ($label): 'pip install .' failed without the --no-build-isolation instruction"
    exit 1
  fi
  if grep -qi "Downloading torch\|Collecting torch" <<<"$out"; then
    echo "check_pip_install: FAILED ($label): the isolated build fetched a torch"
    exit 1
  fi
  echo "check_pip_install ($label): a plain 'pip install .' stops with the --no-build-isolation instruction"
}

python3 -m venv "$tmp/venv"
expect_refusal "fresh venv, no torch" "$tmp/venv/bin/pip"
if [ $# -ge 1 ]; then
  expect_refusal "$1, torch $("$1/bin/python" -c 'import torch; print(torch.__version__)')" "$1/bin/pip"
fi
