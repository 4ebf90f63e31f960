"""Attention on other than 4-D query, key and value (windowed, locally-grouped,
masked-unit attention; single-head 3-D attention) exports to ONNX: torch's
exporter takes 4-D only, and passes.fold_attention folds the rest into 4-D."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpdfx
from cpdfx import passes
from cpdfx.capture import capture
from cpdfx.export import export_onnx

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class WindowAttention(nn.Module):
    """A tiny Swin-style block: 4x4 windows, 2 heads, attention per window on
    (B, windows, heads, N, d) (rank 5) or (B, rows, cols, heads, N, d) (rank 6).
    mask: None; "bias", a learned (heads, N, N) position bias; "shift", that
    bias plus a shifted-window mask per window ((windows, heads, N, N), which
    broadcasts over the batch); "bool", a boolean mask per window; "input", a
    mask computed from the input, one per sample and window."""

    def __init__(self, rank=5, mask=None, is_causal=False, scale=None, dim=8, heads=2, window=4):
        super().__init__()
        self.rank, self.mask, self.is_causal, self.scale = rank, mask, is_causal, scale
        self.heads, self.window, n = heads, window, window * window
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        self.bias = nn.Parameter(torch.randn(heads, n, n))
        self.register_buffer("shift", torch.randn(4, 4, 1, n, n))  # per window row and column
        self.register_buffer("allowed", torch.rand(4, 4, 1, n, n) > 0.3)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        s, rows, cols = self.window, h // self.window, w // self.window
        x = x.reshape(b, c, rows, s, cols, s).permute(0, 2, 4, 3, 5, 1).reshape(b, rows, cols, s * s, c)
        qkv = self.qkv(x).reshape(b, rows, cols, s * s, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(4, 0, 1, 2, 5, 3, 6)  # each (b, rows, cols, heads, N, d)
        mask = {None: None, "bias": self.bias, "shift": self.bias + self.shift, "bool": self.allowed,
                "input": q.mean(-1, keepdim=True) * k.mean(-1).unsqueeze(-2)}[self.mask]
        if self.rank == 5:
            q, k, v = q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2)
            mask = mask.flatten(-5, -4) if mask is not None and mask.dim() >= 5 else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal,
                                             scale=self.scale)
        out = self.proj(out.transpose(-3, -2).flatten(-2))
        return self.head(out.flatten(1, -2).mean(1))


class SingleHead(nn.Module):
    """Attention on (B, N, d): no heads dim."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        q, k, v = self.qkv(self.stem(x).flatten(2).transpose(1, 2)).chunk(3, -1)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_exports(model, tmp_path):
    """Exported (export_onnx checks parity at a batch of 3), and it matches at a batch of 5."""
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "model.onnx")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(run_onnx(path, x), expected.numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("rank, mask", [(5, None), (5, "bias"), (5, "shift"), (5, "bool"), (5, "input"),
                                        (6, None), (6, "shift"), (6, "input")])
def test_windowed_attention_exports_with_parity_at_another_batch(tmp_path, rank, mask):
    assert_exports(WindowAttention(rank, mask).eval(), tmp_path)


@pytest.mark.parametrize("rank", [5, 6])
def test_causal_attention_with_a_scale_exports(tmp_path, rank):
    assert_exports(WindowAttention(rank, is_causal=True, scale=0.3).eval(), tmp_path)


def test_attention_on_3d_inputs_exports(tmp_path):
    assert_exports(SingleHead().eval(), tmp_path)


@pytest.mark.parametrize("rank", [5, 6])
def test_pruned_windowed_attention_exports(tmp_path, rank):
    model = WindowAttention(rank, "shift").eval()
    slim = cpdfx.prune(model, torch.randn(2, 3, 16, 16), macs=0.5)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    assert_exports(slim, tmp_path)


def test_fold_leaves_the_graph_it_is_given_as_it_was():
    gm = capture(WindowAttention(6, "shift").eval(), torch.randn(2, 3, 16, 16))
    before = gm.code
    folded = passes.fold_attention(gm)
    assert gm.code == before and folded is not gm
    assert [n.meta["val"].dim() for n in gm.graph.nodes if n.target is SDPA] == [6]
    [node] = [n for n in folded.graph.nodes if n.target is SDPA]
    assert [a.target for a in node.args[:4]] == [torch.ops.aten.flatten.using_ints] * 4  # to (B x 16, ...)
    assert [u.target for u in node.users] == [torch.ops.aten.unflatten.int]
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(folded(x), gm(x))


def test_fold_returns_a_graph_with_only_4d_attention_itself():
    class Plain(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    gm = capture(Plain().eval(), torch.randn(2, 3, 4, 5))
    assert passes.fold_attention(gm) is gm
