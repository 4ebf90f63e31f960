"""Property: random DAG CNNs, random keep sets, always mask-equivalent."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpdfx
from cpdfx import passes
from helpers import assert_same_outputs, masked_original, random_keep

OPS = ["conv", "grouped", "depthwise", "add", "cat", "split", "gate", "pool", "bn_relu"]


class RandomDAG(nn.Module):
    """Nodes built from a plan; each op reads earlier nodes (all at one spatial size)."""

    def __init__(self, plan, in_channels=3, num_classes=5):
        super().__init__()
        self.plan, self.layers = plan, nn.ModuleDict()
        channels = [in_channels]
        for i, (op, a, b, width) in enumerate(plan):
            ca, cb = channels[a], channels[b]
            key = str(i)
            if op == "conv":
                self.layers[key] = nn.Conv2d(ca, width, 3, padding=1)
                channels.append(width)
            elif op == "grouped":
                g = 2 if ca % 2 == 0 else 1
                self.layers[key] = nn.Conv2d(ca, 2 * g * max(1, width // (2 * g)), 3, padding=1, groups=g)
                channels.append(self.layers[key].out_channels)
            elif op == "depthwise":
                self.layers[key] = nn.Conv2d(ca, ca, 3, padding=1, groups=ca)
                channels.append(ca)
            elif op == "add":  # project b onto a's channels, then add
                self.layers[key] = nn.Conv2d(cb, ca, 1)
                channels.append(ca)
            elif op == "cat":
                channels.append(ca + cb)
            elif op == "split":  # keep the first part of a split
                channels.append(max(1, ca // 2))
            elif op == "gate":  # squeeze-excite on a
                self.layers[key] = nn.Linear(ca, ca)
                channels.append(ca)
            elif op == "pool":
                channels.append(ca)
            elif op == "bn_relu":
                self.layers[key] = nn.BatchNorm2d(ca)
                channels.append(ca)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        nodes = [x]
        for i, (op, a, b, _) in enumerate(self.plan):
            xa, xb = nodes[a], nodes[b]
            layer = self.layers[str(i)] if str(i) in self.layers else None
            if op in ("conv", "grouped", "depthwise"):
                y = F.relu(layer(xa))
            elif op == "add":
                y = xa + layer(xb)
            elif op == "cat":
                y = torch.cat([xa, xb], 1)
            elif op == "split":
                half = max(1, xa.shape[1] // 2)
                y = torch.split(xa, [half, xa.shape[1] - half], 1)[0] if xa.shape[1] > 1 else xa
            elif op == "gate":
                y = xa * torch.sigmoid(layer(xa.mean((2, 3))))[:, :, None, None]
            elif op == "pool":
                y = F.max_pool2d(xa, 3, 1, 1)
            else:
                y = F.relu(layer(xa))
            nodes.append(y)
        return self.head(nodes[-1].mean((2, 3)))


@st.composite
def plans(draw):
    n = draw(st.integers(2, 8))
    plan = []
    for i in range(n):
        op = draw(st.sampled_from(OPS if i else ["conv"]))
        a = draw(st.integers(max(1, i - 2), i)) if i else 0  # nodes[0] is the image
        b = draw(st.integers(1, i)) if i else 0
        plan.append((op, a, b, draw(st.sampled_from([4, 6, 8]))))
    return plan


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), seed=st.integers(0, 2**16))
def test_random_dags_are_mask_equivalent(plan, seed):
    model = RandomDAG(plan).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    gm = cpdfx.capture(model, torch.randn(2, 3, 8, 8))
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, random_keep(comb, np.random.default_rng(seed), None))
    masked = masked_original(model, slim.meta["cpdfx_kept"])
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_same_outputs(slim(x), masked(x))
