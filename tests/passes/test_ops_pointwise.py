"""Elementwise ops broadcast their operands against the result."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opcheck import Between, aten, check_op

ACTIVATIONS = {
    "relu": (torch.relu, aten.relu.default),
    "gelu": (F.gelu, aten.gelu.default),
    "silu": (F.silu, aten.silu.default),
    "sigmoid": (torch.sigmoid, aten.sigmoid.default),
    "hardswish": (F.hardswish, aten.hardswish.default),
    "clamp": (lambda x: x.clamp(-1, 1), aten.clamp.default),
    "scalar mul": (lambda x: x * 2.0 - 1.0, aten.mul.Tensor),
    "dropout": (lambda x: F.dropout(x, 0.5, training=False), None),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_prunes_exactly(name):
    fn, op = ACTIVATIONS[name]
    check_op(Between(fn), torch.randn(2, 3, 8, 8), [op] if op else [])


class Broadcasts(nn.Module):
    """Two branches added, gated per channel by a parameter and by a sigmoid (SE style)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(8))
        self.gate, self.out = nn.Linear(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        y = y * self.scale[None, :, None, None]
        g = torch.sigmoid(self.gate(y.mean((2, 3))))
        return self.out(torch.where(y > 0, y, 0.1 * y) * g[:, :, None, None])


def test_broadcast_ties_parameters_and_branches():
    _, comb = check_op(Broadcasts(), torch.randn(2, 3, 8, 8), [aten.add.Tensor, aten.mul.Tensor, aten.where.self])
    group = next(g for g in comb.prunable if ("a.weight", 0) in g.params)
    assert {("b.weight", 0), ("scale", 0), ("gate.weight", 1), ("out.weight", 1)} <= set(group.params)


class TupleResult(nn.Module):
    """max_pool with indices: the values come out through getitem."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        values, _ = F.max_pool2d(self.a(x), 2, return_indices=True)
        return self.b(values)


def test_getitem_of_a_tuple_result():
    import operator
    check_op(TupleResult(), torch.randn(2, 3, 8, 8), [operator.getitem])
