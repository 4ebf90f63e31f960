"""Factories: the sizes they are given as ints follow the channels they meet."""
import torch
import torch.nn as nn

from opcheck import aten, check_op


class Padded(nn.Module):
    """Zero channels appended to a conv's output, as channel padding in some
    shortcut layers: the zeros' own channels are a group of their own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x)
        pad = y.new_zeros(y.shape[0], 4, y.shape[2], y.shape[3])
        return self.b(torch.cat([y, pad + 1.0], 1))


def test_factory_sizes_are_rewritten():
    _, comb = check_op(Padded(), torch.randn(2, 3, 8, 8), [aten.new_zeros.default, aten.cat.default])
    assert sorted(g.size for g in comb.prunable) == [4, 8]
