"""Reductions and ops along a dim: the dims they use are frozen, the rest prune."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from cpdfx import passes
from opcheck import Between, aten, check_op, group_of


ALONG = {  # along a spatial dim: the channels stay prunable
    "softmax": (lambda y: y.softmax(-1), aten.softmax.int),
    "log_softmax": (lambda y: y.log_softmax(2), aten.log_softmax.int),
    "cumsum": (lambda y: y.cumsum(2), aten.cumsum.default),
    "sort": (lambda y: y.sort(-1).values, aten.sort.default),
    "topk": (lambda y: y.topk(5, dim=-1).values, aten.topk.default),  # k=5 >= ndim: the old rule raised
    "topk k=2": (lambda y: y.topk(2, dim=2).values, aten.topk.default),  # k=2 is a dim: the old rule froze H
    "flip": (lambda y: y.flip(-1), aten.flip.default),
    "roll": (lambda y: y.roll(1, 3), aten.roll.default),
    "mean keepdim": (lambda y: y - y.mean((2, 3), keepdim=True), aten.mean.dim),
    "amax": (lambda y: y.amax(3, keepdim=True), aten.amax.default),
    "sum": (lambda y: y.sum(2, keepdim=True), aten.sum.dim_IntList),
    "var": (lambda y: y.var(3, keepdim=True), aten.var.dim),
}


@pytest.mark.parametrize("name", sorted(ALONG))
def test_op_along_a_spatial_dim_prunes_exactly(name):
    fn, op = ALONG[name]
    _, comb = check_op(Between(fn), torch.randn(2, 3, 8, 8), [op])
    assert group_of(comb, "a.weight", 0).prunable


def test_topk_reads_its_dim_not_k():
    """topk(x, k, dim) over the tokens with k=2: read by position, k named the
    feature dim, which froze; by name the tokens freeze and the features prune."""
    class TopTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x).topk(2, dim=1).values)

    gm, comb = check_op(TopTokens(), torch.randn(2, 5, 6), [aten.topk.default])
    assert group_of(comb, "a.weight", 0).prunable
    node = next(n for n in gm.graph.nodes if n.target is aten.topk.default)
    x, out = comb.node_dims[node.args[0].name], comb.node_dims[node.name][0]
    assert comb.spaces.is_frozen(x[1]) and comb.spaces.reason(out[1]) == "dim used by topk"  # k of the 5 tokens
    assert comb.spaces.find(x[2]) == comb.spaces.find(out[2])  # the features pass through


def test_topk_along_channels_freezes_them():
    """Which channels topk keeps depends on the data: nothing there can go,
    but the layers after it still prune."""
    class TopChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.a(x).topk(4, dim=1).values)))

    _, comb = check_op(TopChannels(), torch.randn(2, 3, 8, 8), [aten.topk.default])
    assert not group_of(comb, "a.weight", 0).prunable
    assert not group_of(comb, "b.weight", 1).prunable
    assert group_of(comb, "b.weight", 0).prunable


class Pooled(nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.reduce, self.a, self.fc = reduce, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.reduce(torch.relu(self.a(x))))


@pytest.mark.parametrize("reduce, op", [(lambda y: y.mean((2, 3)), aten.mean.dim),
                                        (lambda y: y.amax((-2, -1)), aten.amax.default),
                                        (lambda y: torch.linalg.vector_norm(y, dim=(2, 3)), aten.linalg_vector_norm.default),
                                        (lambda y: y.max(3).values.max(2).values, aten.max.dim)])
def test_spatial_reduction_keeps_channels_prunable(reduce, op):
    check_op(Pooled(reduce), torch.randn(2, 3, 8, 8), [op])


def test_reducing_the_channels_freezes_them():
    """The channel mean as a channel of its own: a feature, which fewer
    channels would change. (A mean that only returns into the tensor it was
    taken of is a norm's statistic: tests/passes/test_ops_norm.py.)"""
    gm, comb = check_op(Between(lambda y: torch.cat([y, y.mean(1, keepdim=True)], 1), cout=9),
                        torch.randn(2, 3, 8, 8), [aten.mean.dim], prunable=False)
    assert group_of(comb, "a.weight", 0).frozen_reason == "reduced by mean"
    with pytest.raises(ValueError, match="cannot be pruned"):
        passes.eliminate(gm, comb, {group_of(comb, "a.weight", 0).id: np.arange(4)})


class MeanElsewhere(nn.Module):
    """a's channel mean as a feature: the head's input, subtracted from another
    tensor (c's), or an output besides a norm's statistic. a's channels stay
    frozen; c's prune."""

    def __init__(self, use):
        super().__init__()
        self.use, self.a, self.c = use, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.head, self.b, self.d = nn.Linear(64, 4), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y, z = torch.relu(self.a(x)), self.c(x)
        if self.use == "head":
            out = self.head(y.mean(1).flatten(1))
        elif self.use == "other tensor":
            out = self.b(z - y.mean(1, keepdim=True))
        else:
            m = y.pow(2).mean(1, keepdim=True)
            out = self.b(y * torch.rsqrt(m + 1e-6)), m
        return out, self.d(torch.relu(z))


@pytest.mark.parametrize("use", ["head", "other tensor", "norm and output"])
def test_a_channel_mean_used_as_a_feature_stays_frozen(use):
    _, comb = check_op(MeanElsewhere(use), torch.randn(2, 3, 8, 8), [aten.mean.dim])
    assert group_of(comb, "a.weight", 0).frozen_reason == "reduced by mean"
    assert group_of(comb, "c.weight", 0).prunable
