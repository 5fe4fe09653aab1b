"""Handwritten-digit classification with a small CNN, trained by batchops.train.fit.

    python examples/image_classification.py [--epochs N] [--batch-size N] [--amp auto|bf16|fp16|off]
        [--device auto|cpu|cuda] [--seed N] [--threads N] [--checkpoint PATH] [--resume]
    torchrun --nproc_per_node=2 examples/image_classification.py      # DDP, one process per rank

The data is the 8x8 digits set that scikit-learn ships (sklearn.datasets.load_digits: 1797
images, 10 classes; nothing is downloaded), split 80/20 (stratified, fixed seed) and
standardized with the training split's mean and standard deviation.

The model: three 3x3 convolutions, each followed by batchops.BatchNorm2d with the ReLU fused
into the normalization kernel (activation="relu"), a 2x2 max-pool after the second, global
average pooling and a linear head.

Training: batchops.train.fit with AdamW and a one-cycle learning-rate schedule; the batches come
from batchops.data.ShuffledBatchSampler (seeded per epoch, sharded across ranks under
torchrun, exactly resumable), mixed precision is on by default (--amp auto: float16 + GradScaler
on CUDA, bfloat16 autocast on the CPU). It prints the training loss and the test loss and
accuracy after every epoch, then one machine-readable line:

    RESULT test_acc=0.9xxx test_loss=... epochs=N world_size=R seconds=...

Under torchrun every rank trains on its shard of each global batch (--batch-size is per rank)
and the test set is evaluated on its shards, the counts and sums all-reduced.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import batchops
except ImportError:  # run from a checkout without installing: use the package next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import batchops
import batchops.train
from batchops.data import ShuffledBatchSampler


def load_data(seed: int):
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 8, 8) standardized images, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return (torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test), torch.from_numpy(y_test))


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            batchops.BatchNorm2d(width, activation="relu"),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            batchops.BatchNorm2d(2 * width, activation="relu"),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            batchops.BatchNorm2d(2 * width, activation="relu"),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--checkpoint", default=None, help="write a checkpoint here after every epoch")
    parser.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = None if args.device == "auto" else torch.device(args.device)
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    amp = {"auto": True, "bf16": "bf16", "fp16": "fp16", "off": False}[args.amp]

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)

    # The trainer joins the process group first (under torchrun), so build it before the samplers,
    # which read the rank and world size from the group.
    train_set = TensorDataset(x_train, y_train)
    trainer = batchops.train.Trainer(
        model,
        optimizer,
        amp=amp,
        device=device,
        checkpoint_path=args.checkpoint,
        progress=not args.no_progress,
        verbose=True,
    )
    sampler = ShuffledBatchSampler(len(train_set), args.batch_size, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_sampler=sampler)
    # Evaluation: every rank takes every world-th test image. Unlike a padded sampler shard, this
    # counts each image exactly once; the ranks' shards may differ in size by one, which
    # Trainer.evaluate handles (it all-reduces sums and counts).
    rank, world = trainer.rank, trainer.world_size
    test_idx = torch.arange(rank, len(x_test), world)
    test_loader = DataLoader(TensorDataset(x_test[test_idx], y_test[test_idx]), batch_size=256)
    # The schedule needs the steps per epoch, known once the (rank-sharded) sampler exists.
    trainer.scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(train_loader), pct_start=0.25
    )

    if trainer.is_main:
        print(
            f"device {trainer.device}, world size {world}, amp {trainer.autocast_dtype}, torch {torch.__version__}, "
            f"batchops {batchops.__version__}; {len(x_train)} train / {len(x_test)} test images, "
            f"{len(train_loader)} steps per epoch of {args.batch_size} x {world} images, "
            f"{sum(p.numel() for p in model.parameters())} parameters",
            flush=True,
        )
    start = time.perf_counter()
    result = trainer.fit(
        train_loader, epochs=args.epochs, eval_loader=test_loader, resume=True if args.resume else None
    )
    seconds = time.perf_counter() - start
    final = trainer.evaluate(test_loader)
    out = {
        "test_acc": final["accuracy"],
        "test_loss": final["loss"],
        "epochs": args.epochs,
        "world_size": world,
        "seconds": seconds,
        "history": result.history,
    }
    if trainer.is_main:
        print(
            f"RESULT test_acc={out['test_acc']:.4f} test_loss={out['test_loss']:.4f} epochs={args.epochs} "
            f"world_size={world} seconds={seconds:.1f}",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
