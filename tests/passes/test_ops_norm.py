"""Norms: batch and instance norm are exact; group norm is exact for whole
groups; layer norm over pruned channels normalises over the kept ones (a
different function, as in every structured pruner: checked against it)."""
import numpy as np
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
