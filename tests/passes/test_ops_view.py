"""Layout ops: reshapes into heads, permutes, cat, split, slice, select, expand, repeat."""
import pytest
import torch
import torch.nn as nn

from opcheck import Between, aten, check_op


def split_and_join(y):
    p, q = y.split([3, 5], dim=1)
    return torch.cat([torch.relu(q), p], dim=1)


def chunk_and_join(y):
    p, q = y.chunk(2, dim=1)
    return torch.cat([q, p * 2], dim=1)


CASES = {
    "cat+split": (split_and_join, 8, [aten.cat.default, aten.split_with_sizes.default]),
    "chunk": (chunk_and_join, 8, [aten.cat.default]),
    "slice": (lambda y: y[:, 2:6], 4, [aten.slice.Tensor]),
    "permute": (lambda y: y.permute(0, 2, 3, 1).relu().permute(0, 3, 1, 2), 8, [aten.permute.default]),
    "transpose": (lambda y: y.transpose(1, 3).relu().transpose(1, 3), 8, [aten.transpose.int]),
    "unflatten/flatten": (lambda y: y.unflatten(1, (2, 4)).relu().flatten(1, 2), 8, [aten.unflatten.int]),
    "view": (lambda y: y.view(y.shape[0], 2, 4, 8, 8).relu().reshape(y.shape[0], 8, 8, 8), 8, [aten.view.default]),
    "select": (lambda y: y[:, :, 0].unsqueeze(2), 8, [aten.select.int, aten.unsqueeze.default]),
    "expand": (lambda y: y[:, :, :1, :1].expand(-1, -1, 8, 8), 8, [aten.expand.default]),
    "repeat": (lambda y: y.repeat(1, 1, 2, 1)[:, :, ::2], 8, [aten.repeat.default]),
    "index_select": (lambda y: y.index_select(3, torch.arange(0, 8, 3, device=y.device)), 8, [aten.index_select.default]),
    "stack": (lambda y: torch.stack([y, -y], 2).sum(2), 8, [aten.stack.default]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_op_prunes_exactly(name):
    fn, cout, ops = CASES[name]
    check_op(Between(fn, cout=cout), torch.randn(2, 3, 8, 8), ops)


class Heads(nn.Module):
    """Linear features viewed as heads x head dim, permuted, and back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.a(x).view(b, n, 3, 4).permute(0, 2, 1, 3).relu()
        return self.b(h.permute(0, 2, 1, 3).reshape(b, n, 12))


def test_heads_split_into_a_product_of_groups():
    _, comb = check_op(Heads(), torch.randn(2, 5, 6), [aten.view.default, aten.permute.default])
    assert sorted(g.size for g in comb.prunable) == [3, 4]  # heads x head dim
