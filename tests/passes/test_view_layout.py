"""A view whose input changes memory layout once channels go: attention whose
q/k head dim is pruned to another size than v's leaves the kernel's layout, and
the model's `.contiguous()`, a no-op at capture, is not in the graph."""
import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpdfx
from cpdfx import passes
from opcheck import aten, check_op, producer_masked


class ContiguousView(nn.Module):
    def __init__(self, dim=28, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).contiguous().view(b, t, c))


def different_head_dims(comb, rng):
    """q/k head dim 14 -> 6, v head dim 14 -> 10 (random channels of each)."""
    qk, v = (next(g for g in comb.prunable if (p, 0) in g.params and g.size == 14) for p in ("q.weight", "v.weight"))
    assert qk.id != v.id
    return {qk.id: np.sort(rng.choice(14, 6, replace=False)), v.id: np.sort(rng.choice(14, 10, replace=False))}


def test_view_after_attention_with_unequal_head_dims_is_exact():
    gm, _ = check_op(ContiguousView(), torch.randn(2, 17, 28), [aten.scaled_dot_product_attention.default,
                     aten.view.default], masked=producer_masked, keep=different_head_dims)
    assert aten.view.default in {n.target for n in gm.graph.nodes}  # what capture made of .contiguous().view


def test_pruned_views_are_reshapes_and_the_slim_graph_prunes_and_exports_again(tmp_path):
    x = torch.randn(2, 17, 28)
    gm = cpdfx.capture(ContiguousView().eval(), x)
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, different_head_dims(comb, np.random.default_rng(0)))
    assert aten.view.default not in {n.target for n in slim.graph.nodes}
    again = cpdfx.prune(slim, x, macs=0.5, importance="l2")
    y = torch.randn(3, 17, 28)
    path = cpdfx.export_onnx(again, x, tmp_path / "attention.onnx")
    with torch.no_grad():
        want = again(y)
    got = ort.InferenceSession(str(path)).run(None, {"x": y.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)
