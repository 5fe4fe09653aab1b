"""batchops.models: the reference models the examples train and the model benchmark times."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import batchops
from batchops.models import LSTMClassifier

pytestmark = pytest.mark.usefixtures("kernels")


def _batch():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 1, 7, 3], dtype=torch.int64)  # unsorted, one single-token sentence
    ids = torch.randint(2, 50, (4, 7), generator=g)
    ids[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def test_lstm_classifier_packed_and_padded_paths_compute_the_same_function():
    # A unidirectional LSTM reads a sentence's real tokens the same way packed or padded: the
    # packed path's last hidden state is the padded path's output at the last real token.
    torch.manual_seed(0)
    model = LSTMClassifier(50, embed=6, hidden=5).double()
    ids, lengths = _batch()
    packed = model(ids, lengths)
    torch.testing.assert_close(packed, model.forward_packed(ids, lengths), rtol=0, atol=0)
    torch.testing.assert_close(packed, model.forward_padded(ids, lengths))
    assert packed.shape == (4, 2)


def test_lstm_classifier_packs_with_batchops_by_default_and_with_torchs_when_given():
    torch.manual_seed(0)
    ours = LSTMClassifier(50, embed=6, hidden=5).double()
    assert ours.pack is batchops.pack_padded_sequence and ours.pad is batchops.pad_packed_sequence
    torch.manual_seed(0)
    theirs = LSTMClassifier(50, embed=6, hidden=5, pack=pack_padded_sequence, pad=pad_packed_sequence).double()
    ids, lengths = _batch()
    logits_ours, logits_theirs = ours(ids, lengths), theirs(ids, lengths)
    torch.testing.assert_close(logits_ours, logits_theirs, rtol=0, atol=0)
    logits_ours.sum().backward()
    logits_theirs.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
