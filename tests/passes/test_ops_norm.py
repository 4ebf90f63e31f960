"""Norms: batch and instance norm are exact; group norm is exact for whole
groups; layer norm over pruned channels normalises over the kept ones (a
different function, as in every structured pruner: checked against it), and so
does a norm written out in primitives."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cpdfx import passes
from opcheck import aten, check_op, group_of


class Normed(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def randomised(norm):
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(norm, name, None)
            if t is not None:
                t.uniform_(-1, 1)
        if getattr(norm, "running_var", None) is not None:
            norm.running_var.uniform_(0.5, 2)
    return norm


def test_batch_norm_prunes_exactly():
    check_op(Normed(randomised(nn.BatchNorm2d(8))), torch.randn(2, 3, 8, 8), [aten.batch_norm.default])


def test_instance_norm_prunes_exactly():
    check_op(Normed(randomised(nn.InstanceNorm2d(8, affine=True))), torch.randn(2, 3, 8, 8),
             [aten.instance_norm.default])


def test_group_norm_whole_groups_prune_exactly():
    def whole_groups(comb, rng):  # the groups space (size 4), not the channels within a group
        g = next(g for g in comb.prunable if g.size == 4 and ("norm.weight", 0) in g.params)
        return {g.id: rng.choice(4, 2, replace=False)}

    gm, comb = check_op(Normed(randomised(nn.GroupNorm(4, 8))), torch.randn(2, 3, 8, 8), [aten.group_norm.default],
                        keep=whole_groups)
    slim = passes.eliminate(gm, comb, whole_groups(comb, np.random.default_rng(0)))
    norm = next(n for n in slim.graph.nodes if n.target is aten.group_norm.default)
    assert norm.args[1] == 2  # num_groups follows


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 8), randomised(nn.LayerNorm(8)), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_layer_norm_normalises_over_the_kept_channels():
    model = LayerNormed().eval()
    x = torch.randn(2, 5, 6)
    gm, comb = check_op(model, x, [aten.layer_norm.default], prunable=False)
    group = group_of(comb, "norm.weight", 0)
    keep = np.array([0, 3, 4, 7])
    slim = passes.eliminate(gm, comb, {group.id: keep})
    k = torch.as_tensor(keep)
    with torch.no_grad():
        h = model.a(x)[..., k]
        want = F.linear(F.layer_norm(h, (4,), model.norm.weight[k], model.norm.bias[k]), model.b.weight[:, k],
                        model.b.bias)
        torch.testing.assert_close(slim(x), want, atol=1e-5, rtol=1e-4)


class RMSNorm2d(nn.Module):
    """A channels-first RMS norm written out in primitives."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return self.weight[:, None, None] * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm, written out in primitives (its
    `x - u` twice, as there); or with the variance from torch.var."""

    def __init__(self, channels, eps=1e-6, var=False):
        super().__init__()
        self.eps, self.var = eps, var
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = x.var(1, keepdim=True, unbiased=False) if self.var else (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Centred(nn.Module):
    def forward(self, x):
        return x - x.mean(1, keepdim=True)


def sliced(model, keep):
    """Normed with only channels `keep` of a, the norm and b, cut by hand: the
    norm then normalises over the kept channels."""
    model, k = copy.deepcopy(model), torch.as_tensor(keep)
    with torch.no_grad():
        for owner, name, dim in [(model.a, "weight", 0), (model.a, "bias", 0), (model.norm, "weight", 0),
                                 (model.norm, "bias", 0), (model.b, "weight", 1)]:
            if getattr(owner, name, None) is not None:
                setattr(owner, name, nn.Parameter(getattr(owner, name).index_select(dim, k)))
    return model


@pytest.mark.parametrize("norm, ops", [(RMSNorm2d(8), [aten.mean.dim, aten.rsqrt.default]),
                                       (LayerNorm2d(8), [aten.mean.dim, aten.sqrt.default]),
                                       (LayerNorm2d(8, var=True), [aten.mean.dim, aten.var.dim]),
                                       (Centred(), [aten.mean.dim])],
                         ids=["rms", "convnext layer norm", "layer norm with var", "centring"])
def test_norm_written_in_primitives_normalises_over_the_kept_channels(norm, ops):
    """The channel statistics only return into the tensor they were taken of:
    the channels prune, as aten.layer_norm's do, and the slim model is the
    model cut by hand (the norm over the kept channels)."""
    model = Normed(norm).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, comb = check_op(model, x, ops, prunable=False)
    group = group_of(comb, "a.weight", 0)
    assert group.prunable and ("b.weight", 1) in group.params, comb.table()
    x2 = torch.randn(3, 3, 8, 8)
    for seed in range(3):
        keep = np.sort(np.random.default_rng(seed).choice(8, 4, replace=False))
        slim = passes.eliminate(gm, comb, {group.id: keep})
        with torch.no_grad():
            torch.testing.assert_close(slim(x2), sliced(model, keep)(x2), atol=1e-5, rtol=1e-4)
