"""Shapes propagated again after elimination under the symbolic batch, for ops
whose C++ kernels ask a fake tensor for concrete sizes: a negative pad (the
crop of a NAS-style cell) and an LSTM used as a token mixer."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, masked_original
from torch.fx.experimental.symbolic_shapes import is_concrete_int

import cpdfx

aten = torch.ops.aten


class CropCell(nn.Module):
    """A valid 3x3 conv beside a skip cropped by one pixel to match it, summed."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.valid = nn.Conv2d(width, width, 3)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.head(torch.relu(self.valid(y) + F.pad(y, (-1, -1, -1, -1))))


class LSTMMixer(nn.Module):
    """A conv1d stem, an LSTM mixing the tokens of a (B, L, C) sequence, an MLP head."""

    def __init__(self, width=8, hidden=32):
        super().__init__()
        self.stem = nn.Conv1d(3, width, 1)
        self.mixer = nn.LSTM(width, width, batch_first=True)
        self.fc = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 4)

    def forward(self, x):
        y, _ = self.mixer(self.stem(x).transpose(1, 2))
        return self.out(torch.relu(self.fc(y)))


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def _first(val):
    """A node's tensor, or the first of its tuple (lstm: output, h, c)."""
    return val if isinstance(val, torch.Tensor) else val[0]


def _prunes_at_any_batch(model, x, op):
    model = model.eval()
    slim = cpdfx.prune(model, x, macs=0.5)
    assert cpdfx.cost(slim, x).macs <= 0.5 * cpdfx.cost(model, x).macs
    assert not is_concrete_int(_first(_node(slim, op).meta["val"]).shape[0])  # the batch stayed symbolic
    x3 = torch.cat([x, x[:1]])  # another batch size than at capture
    with torch.no_grad():
        assert_same_outputs(slim(x3), masked_original(model, slim.meta["cpdfx_kept"])(x3))
    return slim


def test_negative_pad_crop_prunes_under_a_symbolic_batch():
    slim = _prunes_at_any_batch(CropCell(), torch.randn(2, 3, 10, 10), aten.pad.default)
    assert slim.get_submodule("valid").weight.shape[0] < 16  # the cropped skip's channels went too
    assert tuple(_node(slim, aten.pad.default).meta["val"].shape[1:]) == (slim.get_submodule("valid").weight.shape[0],
                                                                          8, 8)


def test_lstm_token_mixer_prunes_under_a_symbolic_batch():
    slim = _prunes_at_any_batch(LSTMMixer(), torch.randn(2, 3, 6), aten.lstm.input)
    assert slim.get_submodule("fc").weight.shape[0] < 32
    assert slim.get_submodule("mixer").weight_ih_l0.shape == (32, 8)  # no rule for lstm: its channels stay
