"""Attention written by hand: fused qkv (timm style) with the default SDPA scale."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpdfx
from cpdfx import passes
from helpers import assert_same_outputs


class FusedAttentionBlock(nn.Module):
    def __init__(self, dim=32, heads=4, hidden=64):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # B, N, C
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # default scale: 1/sqrt(head_dim)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def _groups(comb, param, dim):
    return sorted((g for g in comb.prunable if (param, dim) in g.params), key=lambda g: g.size)


def test_fused_qkv_heads_removed_whole_are_exact():
    model = FusedAttentionBlock().eval()
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    heads, head_dim = _groups(comb, "qkv.weight", 0)
    assert (heads.size, head_dim.size) == (4, 8)
    slim = passes.eliminate(gm, comb, {heads.id: [0, 2]})
    # dropping heads 1 and 3 = zeroing their columns of the output projection
    masked = FusedAttentionBlock().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for h in (1, 3):
            masked.proj.weight[:, h * 8:(h + 1) * 8] = 0
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(slim(x), masked(x))
    assert slim.get_submodule("qkv").weight.shape == (3 * 16, 32)


def test_pruned_head_dim_keeps_the_original_attention_scale():
    model = FusedAttentionBlock().eval()
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    _, head_dim = _groups(comb, "qkv.weight", 0)
    slim = passes.eliminate(gm, comb, {head_dim.id: np.arange(4)})
    sdpa = next(n for n in slim.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert sdpa.kwargs["scale"] == pytest.approx(8 ** -0.5)
    # = the original with the dropped dims of q, k and v zeroed at their source
    masked = FusedAttentionBlock().eval()
    masked.load_state_dict(model.state_dict())
    rows = [s * 32 + h * 8 + d for s in range(3) for h in range(4) for d in range(4, 8)]
    with torch.no_grad():
        masked.qkv.weight[rows] = 0
        masked.qkv.bias[rows] = 0
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(slim(x), masked(x))
