"""Reference models: the ones the examples train and `batchops bench --op models` times.

One definition serves both, so the benchmark measures the model the example runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["LSTMClassifier"]


class LSTMClassifier(nn.Module):
    """Embedding(padding_idx=0) -> LSTM -> [last hidden state, mean of the outputs over the real
    tokens] -> Linear: the classifier of examples/nlp_sequence_classification.py.

    ``forward_packed`` (also ``forward``) packs the padded ids so the LSTM never sees a padding
    token; ``forward_padded`` runs the LSTM over every position and reads the output at each
    sentence's last real token. ``pack`` and ``pad`` have the signatures of
    torch.nn.utils.rnn.pack_padded_sequence / pad_packed_sequence; batchops' drop-ins by
    default (the model benchmark gives torch's side torch's).
    """

    def __init__(
        self,
        vocab: int,
        embed: int = 32,
        hidden: int = 64,
        classes: int = 2,
        *,
        pack: Callable | None = None,
        pad: Callable | None = None,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)
        if pack is None or pad is None:
            from batchops.packing import pack_padded_sequence, pad_packed_sequence

            pack, pad = pack or pack_padded_sequence, pad or pad_packed_sequence
        self.pack, self.pad = pack, pad

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_packed(ids, lengths)

    def forward_packed(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) padded, lengths (B,) on the CPU: the LSTM never sees a padding token."""
        packed_ids = self.pack(ids, lengths, batch_first=True, enforce_sorted=False)
        packed = PackedSequence(
            self.embedding(packed_ids.data),
            packed_ids.batch_sizes,
            packed_ids.sorted_indices,
            packed_ids.unsorted_indices,
        )
        out, (h, _c) = self.lstm(packed)  # h: the state after each sentence's last real token
        padded, out_lengths = self.pad(out, batch_first=True)  # zeros past the end
        mean = padded.sum(1) / out_lengths.to(padded.device, padded.dtype)[:, None]
        return self.head(torch.cat([h[-1], mean], 1))

    def forward_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) padded: the LSTM runs over every position, padding included; the head reads
        the output at the last real token and the mean over the real tokens."""
        out, _ = self.lstm(self.embedding(ids))  # (B, T, hidden)
        lengths = lengths.to(ids.device)
        last = out[torch.arange(out.shape[0], device=ids.device), lengths - 1]
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).to(out.dtype)
        mean = (out * mask[..., None]).sum(1) / lengths.to(out.dtype)[:, None]
        return self.head(torch.cat([last, mean], 1))
