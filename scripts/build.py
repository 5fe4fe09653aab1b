"""Run a build command (the Makefile's pip install) and show its progress in a few lines.

pip's verbose output is thousands of lines of compiler command lines. This keeps all of it in
build/build.log and prints only setup.py's decisions, one line per finished compile step with
the time since the start, and on failure the end of the log. Exits with the command's status.

usage: python scripts/build.py COMMAND [ARG ...]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

LOG = os.path.join("build", "build.log")
# ninja's status line: "[3/18] c++ -MMD ... -c /path/csrc/batch_norm/cpu.cpp -o ..." (or nvcc ...).
NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")  # pip -v indents the backend's output
SOURCE = re.compile(r"(csrc/\S+?\.(?:cpp|cu))\b")


def describe(command: str) -> str:
    match = SOURCE.search(command)
    if match:
        return ("nvcc " if "nvcc" in command.split()[0] else "c++  ") + match.group(1)
    return "link" if " -shared " in f" {command} " else command.split()[0]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    os.makedirs("build", exist_ok=True)
    start = time.monotonic()
    print(f"[build] {' '.join(argv)}  (full log: {LOG})", flush=True)
    with open(LOG, "w") as log:
        proc = subprocess.Popen(
            argv + ["-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            step = NINJA_STEP.match(line)
            if step:
                done, total, command = step.groups()
                print(f"[build] {time.monotonic() - start:6.0f} s  [{done}/{total}] {describe(command)}", flush=True)
            elif line.lstrip().startswith("[batchops setup]"):
                print(line.strip(), flush=True)
        status = proc.wait()
    elapsed = time.monotonic() - start
    if status != 0:
        with open(LOG) as log:
            lines = log.readlines()
        # The compiler's errors (with a line of context each), then how pip ended.
        shown = [i for i, text in enumerate(lines) if re.search(r"\berror\b", text, re.IGNORECASE)][:40]
        for i in shown:
            print("".join(lines[max(0, i - 1) : i + 2]), end="")
        print("...\n" + "".join(lines[-10:]), end="")
        print(f"[build] FAILED after {elapsed:.0f} s (exit {status}); the whole output is in {LOG}", flush=True)
        return status
    print(f"[build] done in {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
