"""Products of activations and with weights: linear, matmul, bmm, attention, embedding."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opcheck import aten, check_op, producer_masked


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
