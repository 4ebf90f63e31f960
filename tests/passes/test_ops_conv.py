"""Convolutions: plain, grouped, depthwise, transposed, 1-D, 3-D, padding='same'."""
import pytest
import torch
import torch.nn as nn

from opcheck import aten, check_op


class Convs(nn.Module):
    def __init__(self, make, channels=(3, 8, 8, 4)):
        super().__init__()
        a, b, c, d = channels
        self.first, self.middle, self.last = make(a, b, 1), make(b, c, 2), make(c, d, 1)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def conv2d(cin, cout, groups):
    return nn.Conv2d(cin, cout, 3, padding=1, groups=groups if cin % groups == 0 else 1)


CASES = {
    "conv2d": (conv2d, (2, 3, 8, 8), aten.conv2d.default),
    "grouped": (conv2d, (2, 3, 8, 8), aten.conv2d.default),
    "depthwise": (lambda i, o, g: nn.Conv2d(i, o, 3, padding=1, groups=i if g > 1 else 1), (2, 3, 8, 8),
                  aten.conv2d.default),
    "same padding": (lambda i, o, g: nn.Conv2d(i, o, 3, padding="same"), (2, 3, 8, 8), aten.conv2d.padding),
    "conv1d": (lambda i, o, g: nn.Conv1d(i, o, 3, padding=1, groups=g if i % g == 0 else 1), (2, 3, 10),
               aten.conv1d.default),
    "conv3d": (lambda i, o, g: nn.Conv3d(i, o, 3, padding=1), (2, 3, 4, 4, 4), aten.conv3d.default),
    "transposed": (lambda i, o, g: nn.ConvTranspose2d(i, o, 2, stride=2, groups=g if i % g == 0 else 1), (2, 3, 4, 4),
                   aten.conv_transpose2d.input),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_prunes_exactly(name):
    make, shape, op = CASES[name]
    check_op(Convs(make), torch.randn(shape), [op])


def test_grouped_conv_rewrites_groups():
    gm, comb = check_op(Convs(lambda i, o, g: nn.Conv2d(i, o, 1, groups=4 if g > 1 else 1), (3, 8, 8, 4)),
                        torch.randn(2, 3, 8, 8), [aten.conv2d.default])
    # the grouped conv's channels are groups x per-group channels: two groups of its own
    sizes = sorted(g.size for g in comb.prunable if ("middle.weight", 0) in g.params)
    assert sizes == [2, 4]
