"""What every run of the sweep is given: the default data set (scikit-learn's digits) and model,
the learning rate per batch size, the train/test split of a custom data set, and the sample order
and batching that all batch sizes share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from batchops.data.prefetch import apply_to_tensors

__all__ = [
    "LR_RULES",
    "SPLIT_SEED",
    "load_digits_dataset",
    "default_model",
    "lr_for",
    "sample_stream",
    "split_dataset",
    "Batcher",
]

LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
# The split of the default data set is fixed (not tied to `seed`): every sweep scores on the same
# test images.
SPLIT_SEED = 0


def load_digits_dataset(
    test_fraction: float = 0.2, split_seed: int = SPLIT_SEED
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (1797 8x8 grey images of the digits 0-9, shipped with scikit-learn:
    no download) as (train, test) TensorDatasets of float32 images (N, 1, 8, 8) and int64 labels.

    The split is stratified with a fixed seed; pixels are standardised with the training set's
    mean and standard deviation (one scalar each, so images keep their structure)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # an optional dependency: pip install "batchops[sweep]"
        raise ImportError(
            "batchops' default sweep data needs scikit-learn: pip install scikit-learn "
            "(or batchops[sweep]), or pass dataset="
        ) from exc

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    mean, std = float(x_train.mean()), float(x_train.std())

    def to_tensors(x, y):
        images = torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(y, dtype=torch.int64))

    return to_tensors(x_train, y_train), to_tensors(x_test, y_test)


def default_model(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 8) -> nn.Module:
    """A small CNN on batchops' fused batch norm + ReLU: conv(in->w) + BN-ReLU, conv(w->2w) +
    BN-ReLU, 2x2 max-pool, linear. About 30k parameters for the 8x8 digits."""
    from batchops.nn import BatchNorm2d

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        BatchNorm2d(width, activation="relu"),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        BatchNorm2d(2 * width, activation="relu"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (image_size // 2) ** 2, num_classes),
    )


def lr_for(batch_size: int, *, base_lr: float, base_batch_size: int, lr_rule: str) -> float:
    """base_lr * (batch_size / base_batch_size) ** p with p = 0 ("none"), 0.5 ("sqrt") or 1 ("linear")."""
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {sorted(LR_RULES)}, got {lr_rule!r}")
    return base_lr * (batch_size / base_batch_size) ** LR_RULES[lr_rule]


def sample_stream(n: int, seed: int) -> Iterator[int]:
    """An endless stream of dataset indices: epoch after epoch, each a fresh permutation of
    range(n) drawn from a generator seeded with `seed`. Every batch size reads the same stream
    (batches may straddle epochs), so the first k samples seen are the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


class Batcher:
    """Turns index lists into (x, y) batches on the device; TensorDatasets (and Subsets of one)
    are indexed directly, any other map-style dataset goes through default_collate."""

    def __init__(self, dataset: Dataset, device: torch.device) -> None:
        self.dataset = dataset
        self.device = device
        self.tensors: list[Tensor] | None = None
        base, indices = dataset, None
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
            base, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.int64)
        if isinstance(base, TensorDataset):
            tensors = base.tensors if indices is None else [t[indices] for t in base.tensors]
            self.tensors = [t.to(device) for t in tensors]

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int]) -> tuple[Any, Any]:
        if self.tensors is not None:
            idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
            x, y = (t.index_select(0, idx) for t in self.tensors[:2])
            return x, y
        from torch.utils.data import default_collate

        x, y = default_collate([self.dataset[i] for i in indices])[:2]
        return apply_to_tensors(lambda t: t.to(self.device, non_blocking=True), (x, y))


def split_dataset(
    dataset: Dataset | tuple[Dataset, Dataset] | list[Dataset], seed: int, test_fraction: float
) -> tuple[Dataset, Dataset]:
    """A (train, test) pair as given, or a seeded random split of one Dataset (test_fraction of it
    to test, at least one item)."""
    if isinstance(dataset, (tuple, list)):
        if len(dataset) != 2:
            raise ValueError("dataset must be a Dataset or a (train, test) pair of Datasets")
        return dataset[0], dataset[1]
    n = len(dataset)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise ValueError(f"dataset has {n} items: too few to split into train and test")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[n_test:]), Subset(dataset, perm[:n_test])
