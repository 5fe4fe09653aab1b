"""Variable-length text classification with an LSTM over packed batches.

    python examples/nlp_sequence_classification.py [--quick] [--epochs N] [--max-tokens N]
        [--threads N] [--no-bucketed-padded] [--device auto|cpu|cuda] [--seed N]

Everything is generated here, nothing is downloaded:

* the data: synthetic "reviews", sentences of pseudo-words with a long-tailed (log-normal)
  length distribution. Each holds a few marker words, positive ("good", "great", ...) and
  negative ("bad", "awful", ...); the label says whether positive markers outnumber negative
  ones. The filler words are Zipf-distributed over a large made-up vocabulary, so the
  validation split has words the training split never saw;
* the tokenizer: a word-level vocabulary built from the training split only
  (``<pad>`` = 0, ``<unk>`` = 1, words seen at least twice);
* the model: nn.Embedding -> nn.LSTM -> [last hidden state, mean of the outputs over the real
  tokens] -> nn.Linear.

The same model (same size, same initial weights, same optimizer, same number of epochs and of
steps per epoch) is trained on two loaders:

(a) bucketed + packed: batchops.data.BucketBatchSampler groups sentences of similar length
    under a token budget (``--max-tokens``); each batch's token ids are packed with
    batchops.pack_padded_sequence(enforce_sorted=False), embedded (real tokens only), run
    through the LSTM as a PackedSequence, and unpacked with batchops.pad_packed_sequence for
    the mean;
(b) plain padded: a DataLoader with random batches of a fixed batch size (chosen so both
    loaders take the same number of steps per epoch), padded to the batch's longest
    sentence; the LSTM runs over the whole padded tensor (padding included) and the head reads
    the output at each sentence's last real token and the mean over its real tokens.

A third run, (c) (skip it with --no-bucketed-padded), feeds the batches of (a) to the padded
path of (b). For this unidirectional LSTM it computes the same function as (a) (same accuracy,
up to rounding), so (a) against (c) isolates the cost of nn.LSTM's packed path: cuDNN on a GPU,
but on the CPU one LSTM cell per time step through autograd, several times slower per step than
the fused oneDNN kernel that a padded input gets. Packing is what a bidirectional LSTM, or one
whose final state h_n is used, needs for correct results.

It prints the accuracy per epoch (chance is 0.5: the classes are balanced), the training
throughput in real tokens per second (training steps only, evaluation excluded), and the padding
efficiency of each loader's batches (real tokens / (rows x longest length), summed over the
epochs). --quick uses one torch thread: see the comment in main().
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import batchops
except ImportError:  # run from a checkout without installing: use the package next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import batchops
from batchops.data import BucketBatchSampler
from batchops.models import LSTMClassifier

POSITIVE = ("good", "great", "excellent", "superb", "wonderful")
NEGATIVE = ("bad", "awful", "terrible", "poor", "boring")
PAD, UNK = "<pad>", "<unk>"


# ---------------------------------------------------------------------------------------------
# Data: generated, tokenized locally


def make_corpus(n: int, rng: np.random.Generator, max_len: int, filler_words: list[str]):
    """n (sentence, label) pairs. Lengths are log-normal (median 20 words, long tail up to
    max_len); 1-4 markers of the majority polarity and fewer of the other."""
    zipf = 1.0 / np.arange(1, len(filler_words) + 1) ** 1.1
    zipf /= zipf.sum()
    lengths = np.clip(np.round(rng.lognormal(math.log(20), 0.9, size=n)), 4, max_len).astype(int)
    corpus = []
    for length in lengths:
        label = int(rng.integers(2))
        major = 1 + int(rng.integers(4))
        minor = int(rng.integers(major))  # strictly fewer: no ties
        pos, neg = (major, minor) if label == 1 else (minor, major)
        n_fill = max(int(length) - pos - neg, 0)
        words = list(rng.choice(filler_words, size=n_fill, p=zipf))
        markers = list(rng.choice(POSITIVE, size=pos)) + list(rng.choice(NEGATIVE, size=neg))
        for m in markers:
            words.insert(int(rng.integers(len(words) + 1)), m)
        corpus.append((" ".join(words), label))
    return corpus


def make_filler_words(count: int, rng: np.random.Generator) -> list[str]:
    syllables = [c + v for c in "bdfghjklmnprstvz" for v in "aeiou"]
    words, seen = [], set(POSITIVE + NEGATIVE)
    while len(words) < count:
        w = "".join(rng.choice(syllables, size=int(rng.integers(1, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Tokenizer:
    """Word-level: lowercase, split on whitespace; words seen fewer than min_freq times -> <unk>."""

    def __init__(self, texts, min_freq: int = 2):
        counts = Counter(w for t in texts for w in self.split(t))
        self.itos = [PAD, UNK] + sorted(w for w, c in counts.items() if c >= min_freq)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        return text.lower().split()

    def encode(self, text: str) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi.get(w, unk) for w in self.split(text)]

    def __len__(self) -> int:
        return len(self.itos)


class TextDataset(Dataset):
    def __init__(self, corpus, tokenizer: Tokenizer):
        self.ids = [torch.tensor(tokenizer.encode(text), dtype=torch.int64) for text, _ in corpus]
        self.labels = [label for _, label in corpus]
        self.lengths = [len(t) for t in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]


def collate(batch):
    """-> ids (B, T) right-padded with <pad> = 0, lengths (B,) int64 on the CPU, labels (B,)."""
    seqs, labels = zip(*batch)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
    return ids, lengths, torch.tensor(labels, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Model


# LSTMClassifier (batchops.models): nn.Embedding -> nn.LSTM -> [last hidden state, mean over the
# real tokens] -> nn.Linear, with forward_packed (batchops.pack_padded_sequence /
# pad_packed_sequence around the LSTM) and forward_padded. It lives in the package so that
# `batchops bench --op models` times this same model.


# ---------------------------------------------------------------------------------------------
# Training


def evaluate(model, loader, packed: bool, device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for ids, lengths, labels in loader:
            ids, labels = ids.to(device), labels.to(device)
            logits = model.forward_packed(ids, lengths) if packed else model.forward_padded(ids, lengths)
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    return correct / total


def train(
    name: str, model, train_loader, val_loader, packed: bool, epochs: int, lr: float, device, set_epoch=None
) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    train_time = 0.0
    real_tokens = slots = 0
    val_acc = train_acc = 0.0
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        model.train()
        correct = seen = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for ids, lengths, labels in train_loader:
            ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model.forward_packed(ids, lengths) if packed else model.forward_padded(ids, lengths)
            loss = loss_fn(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += labels.numel()
            real_tokens += int(lengths.sum())
            slots += ids.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        train_acc = correct / seen
        val_acc = evaluate(model, val_loader, packed, device)
        print(
            f"  [{name}] epoch {epoch + 1}/{epochs}: train acc {train_acc:.3f}, val acc {val_acc:.3f}, "
            f"train time {train_time:.2f} s so far",
            flush=True,
        )
    return {
        "train_acc": train_acc,
        "val_acc": val_acc,
        "tokens_per_s": real_tokens / train_time,
        "padding_efficiency": real_tokens / slots,
        "train_s": train_time,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small data set and model (< 30 s on 2 CPU cores)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 2 with --quick, else 3)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="padded-token budget per bucketed batch (default: 2048 with --quick, else 4096)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's default)"
    )
    parser.add_argument(
        "--no-bucketed-padded", action="store_true", help="skip (c), the bucketed batches run through the LSTM padded"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    quick = args.quick
    # A small LSTM on the CPU is thousands of tiny ops (the packed path runs one LSTM cell per time
    # step): one thread avoids OpenMP parallel regions that stall whenever another process holds
    # one of the cores, which on a shared 2-core machine costs more than it gains.
    threads = args.threads or (1 if quick else None)
    if threads:
        torch.set_num_threads(threads)
    n_train, n_val = (3000, 500) if quick else (20000, 2000)
    max_len = 160 if quick else 400
    epochs = args.epochs or (2 if quick else 3)
    max_tokens = args.max_tokens or (2048 if quick else 4096)
    embed, hidden = (32, 64) if quick else (64, 128)
    lr = 5e-3 if quick else 3e-3

    rng = np.random.default_rng(args.seed)
    filler = make_filler_words(3000 if quick else 30000, rng)
    train_corpus = make_corpus(n_train, rng, max_len, filler)
    val_corpus = make_corpus(n_val, rng, max_len, filler)
    tokenizer = Tokenizer([t for t, _ in train_corpus])
    train_set, val_set = TextDataset(train_corpus, tokenizer), TextDataset(val_corpus, tokenizer)
    lengths = np.array(train_set.lengths)
    val_unk = sum(int((ids == 1).sum()) for ids in val_set.ids) / sum(val_set.lengths)
    print(
        f"device {device}, torch {torch.__version__}, batchops {batchops.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"data: {n_train} train / {n_val} val sentences, vocabulary {len(tokenizer)} words "
        f"(<unk> rate on val {val_unk:.1%}), lengths median {int(np.median(lengths))}, "
        f"p90 {int(np.percentile(lengths, 90))}, max {int(lengths.max())}; "
        f"positive share {np.mean(train_set.labels):.2f} (chance = 0.5)"
    )

    # (a) bucketed by length under a token budget; (b) random batches of a fixed size giving the
    # same number of steps per epoch; (c) the batches of (a) (a second sampler, same seed).
    def bucketed():
        sampler = BucketBatchSampler(train_set.lengths, max_tokens=max_tokens, shuffle=True, seed=args.seed)
        return sampler, DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)

    sampler, bucket_loader = bucketed()
    batch_size = max(1, round(len(train_set) / len(sampler)))
    plain_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_sampler = BucketBatchSampler(val_set.lengths, max_tokens=max_tokens, shuffle=False)
    val_bucket = DataLoader(val_set, batch_sampler=val_sampler, collate_fn=collate)
    val_plain = DataLoader(val_set, batch_size=batch_size, shuffle=False, collate_fn=collate)
    print(
        f"(a) bucketed: max_tokens {max_tokens}, {len(sampler)} batches per epoch, sampler padding "
        f"efficiency {sampler.padding_efficiency():.3f}; (b) plain: batch_size {batch_size}, "
        f"{len(plain_loader)} batches per epoch"
    )

    runs = [
        ("bucketed+packed", True, bucket_loader, val_bucket, sampler.set_epoch),
        ("plain padded", False, plain_loader, val_plain, None),
    ]
    if not args.no_bucketed_padded:
        sampler_c, loader_c = bucketed()
        runs.append(("bucketed, padded LSTM", False, loader_c, val_bucket, sampler_c.set_epoch))
    results = {}
    for name, packed, train_loader, val_loader, set_epoch in runs:
        torch.manual_seed(args.seed)  # the same initial weights for all
        model = LSTMClassifier(len(tokenizer), embed, hidden).to(device)
        print(f"training ({name}): {sum(p.numel() for p in model.parameters())} parameters, {epochs} epochs")
        results[name] = train(name, model, train_loader, val_loader, packed, epochs, lr, device, set_epoch)

    print()
    print("| loader | train acc | val acc | tokens/s (real tokens) | padding efficiency | train time s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['train_acc']:.3f} | {r['val_acc']:.3f} | {r['tokens_per_s']:,.0f} "
            f"| {r['padding_efficiency']:.3f} | {r['train_s']:.2f} |"
        )
    a, b = results["bucketed+packed"], results["plain padded"]
    print(
        f"\nbucketed+packed vs plain padded: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x the throughput, "
        f"padding efficiency {a['padding_efficiency']:.3f} vs {b['padding_efficiency']:.3f}"
    )
    if "bucketed, padded LSTM" in results:
        c = results["bucketed, padded LSTM"]
        print(
            f"bucketed, padded LSTM vs plain padded: {c['tokens_per_s'] / b['tokens_per_s']:.2f}x the throughput "
            f"(the same batches as (a) without packing: the difference between (a) and (c) is nn.LSTM's "
            f"packed path, {'cuDNN' if device.type == 'cuda' else 'one LSTM cell per time step on the CPU'}, "
            f"against its padded path{'' if device.type == 'cuda' else ', one fused oneDNN kernel'})"
        )
    # One machine-readable line per loader (tests/examples/test_nlp_sequence_classification.py reads them).
    for key, name in (
        ("bucketed", "bucketed+packed"),
        ("plain", "plain padded"),
        ("bucketed_padded", "bucketed, padded LSTM"),
    ):
        if name in results:
            r = results[name]
            print(
                f"RESULT loader={key} train_acc={r['train_acc']:.4f} val_acc={r['val_acc']:.4f} chance=0.5 "
                f"tokens_per_s={r['tokens_per_s']:.1f} padding_efficiency={r['padding_efficiency']:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
