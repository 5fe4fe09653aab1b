#!/usr/bin/env bash
# A plain `pip install .` (pip's isolated build, which has no torch) must stop at once with the
# instruction to build with --no-build-isolation, not download a torch to compile against.
# Run in a fresh venv without torch; takes about half a minute (pip fetches setuptools, wheel
# and ninja for the isolated build environment).
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
out=$("$venv/bin/pip" install --no-cache-dir . 2>&1)
status=$?
rm -rf "$(dirname "$venv")"
if [ $status -eq 0 ]; then
  echo "$out" | tail -20
  echo "check_pip_install: FAILED: a plain 'pip install .' succeeded in a venv without torch"
  exit 1
fi
if ! grep -q -- "pip install --no-build-isolation" <<<"$out"; then
  echo "$out" | tail -40
  echo "check_pip_install: FAILED: 'pip install .' failed without the --no-build-isolation instruction"
  exit 1
fi
if grep -qi "Downloading torch\|Collecting torch" <<<"$out"; then
  echo "check_pip_install: FAILED: the isolated build fetched a torch"
  exit 1
fi
echo "check_pip_install: a plain 'pip install .' stops with the --no-build-isolation instruction (as intended)"
