"""Products of activations and with weights: linear, matmul, bmm, einsum, attention, embedding."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cpdfx
from cpdfx.passes import ops
from helpers import masked_original
from opcheck import aten, check_op, group_of, producer_masked


class Products(nn.Module):
    """scores = a @ b^T over the tokens, then scores @ v: a and b share their
    contracted dim, v's features pass through to the output layer."""

    def __init__(self, product):
        super().__init__()
        self.product = product
        self.a, self.b, self.v, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        scores = self.product(self.a(x), self.b(x).transpose(1, 2))
        return self.out(self.product(scores.softmax(-1), self.v(x)))


@pytest.mark.parametrize("product, op", [(torch.matmul, aten.matmul.default), (torch.bmm, aten.bmm.default)])
def test_products_prune_exactly(product, op):
    _, comb = check_op(Products(product), torch.randn(2, 5, 6), [op, aten.linear.default], masked=producer_masked)
    assert sorted(g.size for g in comb.prunable) == [8, 10]


class Attention(nn.Module):
    def __init__(self, heads=2, dim=8):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.out = heads, *(nn.Linear(6, dim) for _ in range(3)), nn.Linear(dim, 4)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # default scale: kept at 1/sqrt(original head dim)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def test_attention_prunes_exactly():
    check_op(Attention(), torch.randn(2, 5, 6), [aten.scaled_dot_product_attention.default], masked=producer_masked)


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(10, 8), nn.Linear(8, 4)

    def forward(self, tokens):
        return self.out(torch.relu(self.embed(tokens)))


def test_embedding_features_prune_exactly():
    _, comb = check_op(Embedded(), torch.randint(0, 10, (2, 5)), [aten.embedding.default])
    assert [g.size for g in comb.prunable] == [8]  # the features; rows are looked up by index


class EinsumLinear(nn.Module):
    """einsum("bnc,dc->bnd") as a linear layer with a weight of its own, and
    "...c,dc->...d" as another: c contracts with the producer's features, d
    feeds the next layer."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 8), nn.Linear(12, 4)
        self.w, self.w2 = nn.Parameter(torch.randn(10, 8)), nn.Parameter(torch.randn(12, 10))

    def forward(self, x):
        h = torch.relu(torch.einsum("bnc,dc->bnd", self.a(x), self.w))
        return self.out(torch.relu(torch.einsum("...c,dc->...d", h, self.w2)))


def weights_masked(*names):
    """masked_original, and the dropped positions of the named weights zeroed
    in every dim (a weight no nn.Linear holds, which only einsum reads)."""
    def masked(model, kept):
        model = masked_original(model, kept)
        with torch.no_grad():
            for name in names:
                w = getattr(model, name)
                for d, idx in kept.get(name, {}).items():
                    drop = torch.as_tensor(np.setdiff1d(np.arange(w.shape[d]), idx), dtype=torch.long)
                    w.index_fill_(d, drop, 0.0)
        return model
    return masked


def test_einsum_as_a_linear_prunes_exactly():
    _, comb = check_op(EinsumLinear(), torch.randn(2, 5, 6), [aten.einsum.default], masked=weights_masked("w", "w2"))
    assert sorted(g.size for g in comb.prunable) == [8, 10, 12]
    assert ("w", 1) in group_of(comb, "a.weight", 0).params and ("w", 0) in group_of(comb, "w2", 1).params


def test_einsum_as_a_batched_matmul_prunes_exactly():
    """Products with einsum: "bnd,bmd->bnm" contracts the features of a and b,
    "bnm,bmd->bnd" passes v's through."""
    product = lambda p, q: torch.einsum("bij,bjk->bik", p, q)  # noqa: E731
    _, comb = check_op(Products(product), torch.randn(2, 5, 6), [aten.einsum.default], masked=producer_masked)
    assert sorted(g.size for g in comb.prunable) == [8, 10]


class RelativePositionAttention(nn.Module):
    """Decomposed relative positions (as SAM's image encoder): per-row and
    per-column position terms from einsum("bhwc,hkc->bhwk", q, rel_h), added
    to the attention logits over an H x W grid of tokens."""

    def __init__(self, size=(3, 4), dim=8):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(6, dim), nn.Linear(6, dim), nn.Linear(6, 10), nn.Linear(10, 4)
        self.rel_h = nn.Parameter(torch.randn(size[0], size[0], dim))
        self.rel_w = nn.Parameter(torch.randn(size[1], size[1], dim))

    def forward(self, x):
        b, h, w, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = torch.einsum("bhwc,bkvc->bhwkv", q, k)
        logits = (logits + torch.einsum("bhwc,hkc->bhwk", q, self.rel_h)[..., None]
                  + torch.einsum("bhwc,wkc->bhwk", q, self.rel_w)[..., None, :])
        attn = logits.reshape(b, h * w, h * w).softmax(-1)
        return self.out(torch.einsum("bnm,bmc->bnc", attn, v.reshape(b, h * w, -1)))


def test_relative_position_attention_prunes_exactly():
    """q's features contract with k's and with both position tables: one group."""
    _, comb = check_op(RelativePositionAttention(), torch.randn(2, 3, 4, 6), [aten.einsum.default],
                       masked=producer_masked)
    qk = group_of(comb, "q.weight", 0)
    assert qk.prunable and {("k.weight", 0), ("rel_h", 2), ("rel_w", 2)} <= set(qk.params)
    assert group_of(comb, "v.weight", 0).prunable
    assert not group_of(comb, "rel_h", 0).prunable  # the grid's rows: from the model input


class TwoFeatures(nn.Module):
    def __init__(self, fn, width=8):
        super().__init__()
        self.fn, self.a, self.b, self.out = fn, nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(width, 4)

    def forward(self, x):
        return self.out(self.fn(self.a(x), self.b(x)))


def test_einsum_diagonal_freezes_its_letter():
    """"bcc->bc" reads the diagonal of a's features against b's: a repeated
    letter in one operand freezes what it touches."""
    gram_diagonal = lambda p, q: torch.einsum("bcc->bc", torch.einsum("bnc,bnd->bcd", p, q))  # noqa: E731
    _, comb = check_op(TwoFeatures(gram_diagonal), torch.randn(2, 5, 6), [aten.einsum.default], prunable=False)
    for name in ("a.weight", "b.weight", "out.weight"):
        assert group_of(comb, name, 0 if name != "out.weight" else 1).frozen_reason == "diagonal taken by einsum"


def test_einsum_summing_one_operand_freezes_the_letter():
    """"bnc->bn" sums a's features alone (a sum over fewer channels is another
    function, as for aten.sum); b's features still prune."""
    lone_sum = lambda p, q: torch.einsum("bnc->bn", p)[..., None] * q  # noqa: E731
    _, comb = check_op(TwoFeatures(lone_sum), torch.randn(2, 5, 6), [aten.einsum.default])
    assert group_of(comb, "a.weight", 0).frozen_reason == "reduced by einsum"
    assert group_of(comb, "b.weight", 0).prunable


def flop_counter_macs(fn, *args):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("model, x", [(EinsumLinear(), torch.randn(3, 5, 6)),
                                      (Products(lambda p, q: torch.einsum("bij,bjk->bik", p, q)), torch.randn(3, 5, 6)),
                                      (RelativePositionAttention(), torch.randn(3, 3, 4, 6))],
                         ids=["linear", "bmm", "relative positions"])
def test_einsum_macs_match_flop_counter(model, x):
    model = model.eval()
    assert cpdfx.cost(model, x).macs == flop_counter_macs(model, x)


EQUATIONS = {  # operand shapes: broadcast size-1 letters, ellipses, sums, three operands, a given path
    "bij,bjk->bik broadcast": ("bij,bjk->bik", [(1, 4, 5), (3, 5, 6)], None),
    "ellipsis": ("...ij,...jk", [(2, 3, 4, 5), (3, 5, 6)], None),
    "summed ellipsis": ("...i,...i->i", [(2, 3, 4), (3, 4)], None),
    "outer": ("i,j->ij", [(4,), (5,)], None),
    "lone sum": ("bij,jk->bk", [(2, 3, 4), (4, 5)], None),
    "three": ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 6)], None),
    "three with path": ("ij,jk,kl->il", [(3, 4), (4, 50), (50, 6)], [1, 2, 0, 1]),
    "path after a product": ("ij,k,jk,lm->ilm", [(3, 4), (5,), (4, 5), (2, 6)], [0, 1, 0, 2, 0, 1]),
}


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_einsum_mac_terms_follow_torchs_contraction(name):
    """Each pairwise contraction that sums a letter is one bmm: the product of
    every letter either side holds; the order is the path, else left to right."""
    equation, shapes, path = EQUATIONS[name]
    operands = [torch.randn(s) for s in shapes]
    graph = torch.fx.Graph()
    nodes = [graph.placeholder(f"t{i}") for i in range(len(operands))]
    for node, t in zip(nodes, operands):
        node.meta["val"] = t
    node = graph.call_function(aten.einsum.default, (equation, nodes), {"path": path} if path else {})
    node.meta["val"] = aten.einsum.default(equation, operands, path=path)
    macs = sum(math.prod(n.meta["val"].shape[d] for n, d in term) for term in ops.OPS[aten.einsum.default].macs(node))
    assert macs == flop_counter_macs(lambda: aten.einsum.default(equation, operands, path=path))
