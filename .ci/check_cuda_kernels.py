"""CI gate: the CUDA sources were compiled, and every batchops op has a CPU and a CUDA kernel."""

import sys

import torch

import batchops

info = batchops.build_info()
print("build_info:", info)
if not info["extension_loaded"]:
    sys.exit(f"batchops._C did not load: {info['error']}")
if not info["cuda_kernels"]:
    sys.exit("batchops was built without its CUDA sources (BATCHOPS_CUDA=on should have failed the build)")

ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("batchops::"))
if not ops:
    sys.exit("no batchops ops are registered")
missing = [
    (op, key) for op in ops for key in ("CPU", "CUDA") if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
]
for op in ops:
    print(f"  {op}: CPU and CUDA kernels" if not any(m[0] == op for m in missing) else f"  {op}: MISSING")
if missing:
    sys.exit(f"ops without a kernel: {missing}")
print(f"all {len(ops)} batchops ops have CPU and CUDA kernels")
