"""Check that the AVX2 / AVX-512 CPU kernels leak no wide instructions into shared code.

cpu_avx2.cpp / cpu_avx512.cpp compile the kernels under `#pragma GCC target`. Any function with
vague linkage (inline functions, template instantiations: weak symbols the linker merges across
files) that got compiled with VEX/EVEX instructions there could replace the baseline copy and
crash a processor without them.

Usage: python scripts/check_isa_leaks.py PATH   (PATH: the built batchops/_C*.so, or a build
folder holding cpu_avx*.o). In the .so every function with wide instructions must belong to
the cpu_avx2 / cpu_avx512 kernels; in an object file, every weak or global one.
"""

import re
import subprocess
import sys
from pathlib import Path

WIDE = re.compile(r"\b(v[a-z0-9]+)\b|%[yz]mm\d+|%k[0-7]\b")


def leaks(obj: Path, kinds: str) -> list[str]:
    # Functions defined in obj whose nm type is in `kinds`.
    syms = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
    shared = {line.split()[-1] for line in syms.splitlines() if line.split()[1:2] and line.split()[1] in kinds}
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    bad, current, wide = [], None, False
    for line in dis.splitlines() + [""]:
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m or not line.strip():
            if current and wide and current in shared and "cpu_avx" not in current:
                bad.append(current)
            current, wide = (m.group(1), False) if m else (None, False)
            continue
        if current and "\t" in line and WIDE.search(line.split("\t", 1)[1]):
            wide = True
    return bad


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "build")
    if root.is_file():
        objs, kinds = [root], "WVTt"
    else:
        objs, kinds = sorted(root.rglob("cpu_avx*.o")), "WVT"
    if not objs:
        print(f"no cpu_avx*.o under {root}")
        return 1
    status = 0
    for obj in objs:
        bad = leaks(obj, kinds)
        demangled = subprocess.run(["c++filt"], input="\n".join(bad), capture_output=True, text=True).stdout.split("\n")
        print(f"{obj}: {len(bad)} shared functions with wide instructions")
        for name in demangled[:20]:
            if name:
                print("   ", name[:200])
        status |= bool(bad)
    return status


if __name__ == "__main__":
    sys.exit(main())
