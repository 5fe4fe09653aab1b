"""Memory-mapped dataset cases: one DataLoader pass over .npy files, per-item reads against
batchops.data.MemmapDataset's batched reads.

Setup: N samples of F float32 features (randn) and an int64 label each, written once with
batchops.data.write_memmap_dataset into a temporary directory (removed when the cases are
dropped, or at exit); both providers map the same files. The files were just written, so they
are in the page cache: this measures the loader's CPU cost, not the disk.

  * torch: `DataLoader(ds, batch_size=256)` (num_workers=0, default collate) over the usual
    dataset: np.load(mmap_mode="r") and a `__getitem__` that copies one row of each array to a
    tensor; the DataLoader then calls it 256 times per batch and default_collate stacks the rows.
  * batchops: the same DataLoader over MemmapDataset: its `__getitems__` reads each batch with one
    indexed read per array (in increasing file order, rows put back in the sampler's order) and
    default_collate returns the batch without stacking.
  * Both shuffled (RandomSampler seeded alike, so the same batches) and sequential (each batch a
    contiguous run: batchops reads it as one slice). A timed call is one full pass; it returns
    the first and last batches, which are compared before timing. On CUDA the batches are also
    copied to the device (the loading itself runs on the CPU either way).

Counting rule for "batchops bytes": the feature and label bytes read, N x (4F + 8), written
"N(4F+8)"; the index arrays and the copy that restores the sampler's order are not counted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from batchops.bench.case import Case

__all__ = ["OP", "BATCH_SIZE", "shapes_for", "PerItemDataset", "cases", "NOTES"]

OP = "memmap"
BATCH_SIZE = 256


def shapes_for(device: torch.device, quick: bool = False, smoke: bool = False) -> list[tuple[int, int]]:
    """(N samples, F float32 features) shapes."""
    if smoke:
        return [(1024, 32)]
    if quick:
        return [(16384, 256)]
    return [(65536, 256)]  # 64 MiB of features


class _Files:
    """The dataset directory of one shape, written on first use and removed with this object
    (weakref.finalize also runs at interpreter exit)."""

    def __init__(self, n: int, f: int):
        self.n, self.f = n, f
        self._root: str | None = None
        self._cleanup = None

    @property
    def root(self) -> str:
        if self._root is None:
            from batchops.data.memmap import write_memmap_dataset

            root = tempfile.mkdtemp(prefix=f"batchops-bench-memmap-{self.n}x{self.f}-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, root, ignore_errors=True)
            g = torch.Generator().manual_seed(self.n + self.f)
            features = torch.randn(self.n, self.f, generator=g)
            labels = torch.randint(0, 1000, (self.n,), generator=g)
            write_memmap_dataset(root, features, labels, overwrite=True)
            self._root = root
        return self._root


class PerItemDataset(Dataset):
    """The usual map-style dataset over the same files: per-item __getitem__ only."""

    def __init__(self, root: str):
        self.features = np.load(os.path.join(root, "features.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        # np.array copies the row out of the read-only map (torch.from_numpy warns otherwise).
        return torch.from_numpy(np.array(self.features[i])), torch.from_numpy(np.array(self.labels[i]))


def _one_pass(ds: Dataset, shuffle: bool, device: torch.device) -> Callable[[], object]:
    def run():
        # A fresh seeded generator per pass: both providers see the same batches every call.
        loader = DataLoader(ds, batch_size=BATCH_SIZE, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
        first = last = None
        for batch in loader:
            if device.type == "cuda":
                batch = [t.to(device, non_blocking=True) for t in batch]
            if first is None:
                first = batch
            last = batch
        return first, last

    return run


def _build(files: _Files, shuffle: bool):
    def build(device: torch.device) -> dict[str, Callable[[], object]]:
        from batchops.data.memmap import MemmapDataset

        root = files.root
        return {
            "torch": _one_pass(PerItemDataset(root), shuffle, device),
            "batchops": _one_pass(MemmapDataset(root), shuffle, device),
        }

    return build


def cases(device: torch.device, quick: bool = False, smoke: bool = False) -> list[Case]:
    out = []
    for n, f in shapes_for(device, quick, smoke):
        files = _Files(n, f)  # shared by the shape's cases; removed when they are dropped
        for shuffle in (True, False):
            layout = (
                f"{'shuffled' if shuffle else 'sequential'}, batch_size={BATCH_SIZE}, num_workers=0, default collate"
            )
            out.append(
                Case(
                    op="DataLoader pass over .npy memmaps",
                    shape=(n, f),
                    layout=layout,
                    dtype=torch.float32,
                    mode="forward",
                    build=_build(files, shuffle),
                    bytes_moved=n * (4 * f + 8),
                    bytes_rule="N(4F+8)",
                )
            )
    return out


NOTES = __doc__.split("\n\n", 1)[1].strip()
