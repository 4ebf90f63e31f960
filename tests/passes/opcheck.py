"""What every per-op test does: capture a tiny model, comb it, prune random
keep sets, and compare the slim graph with the original whose removed
channels are masked (see tests/helpers.py for the consumer-side mask)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

import cpdfx
from cpdfx import passes
from helpers import assert_same_outputs, masked_original, random_keep

aten = torch.ops.aten
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def producer_masked(model: nn.Module, kept: dict) -> nn.Module:
    """A copy of model with the output rows (and biases) the slim model dropped
    zeroed in every conv and linear layer: the removed channels are zero where
    they are made. Exact where what follows maps zero channels to zero
    (products of activations: matmul, attention)."""
    masked = copy.deepcopy(model)
    for name, module in masked.named_modules():
        dims = kept.get(f"{name}.weight", {})
        if not isinstance(module, WEIGHTED) or 0 not in dims:
            continue
        drop = torch.as_tensor(np.setdiff1d(np.arange(module.weight.shape[0]), dims[0]), dtype=torch.long)
        with torch.no_grad():
            module.weight.index_fill_(0, drop, 0.0)
            if module.bias is not None:
                module.bias.index_fill_(0, drop, 0.0)
    return masked


class Between(nn.Module):
    """conv(3 -> cin) -> fn -> conv(cout -> 4): the op under test sits between
    two weighted layers, so its channels are produced and consumed by pruned ones."""

    def __init__(self, fn, cin=8, cout=8):
        super().__init__()
        self.fn, self.a, self.b = fn, nn.Conv2d(3, cin, 3, padding=1), nn.Conv2d(cout, 4, 1)

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def check_op(model: nn.Module, x, ops, *, masked=masked_original, seeds=(0, 1, 2), share=0.5, prunable=True,
             keep=None, atol=1e-5):
    """Capture model on x; assert the graph holds every op in `ops` and that
    each has an entry in the op table; then for random keep sets (or
    keep(comb, rng)) the slim graph equals masked(model, kept) on another
    batch size. Returns (gm, comb)."""
    model = model.eval()
    gm = cpdfx.capture(model, x)
    found = targets(gm)
    for op in ops:
        assert op in found, f"{op} is not in the captured graph: {sorted(map(str, found))}"
        assert op in passes.OPS, f"{op} has no entry in the op table"
    comb = passes.comb(gm)
    unruled = [g.frozen_reason for g in comb.groups if (g.frozen_reason or "").startswith("no rule")]
    assert not unruled, unruled
    if not prunable:
        return gm, comb
    assert comb.prunable, comb.table()
    x2 = torch.cat([x, x[:1]])  # another batch size than at capture
    for seed in seeds:
        rng = np.random.default_rng(seed)
        chosen = keep(comb, rng) if keep is not None else random_keep(comb, rng, share)
        slim = passes.eliminate(gm, comb, chosen)
        with torch.no_grad():
            assert_same_outputs(slim(x2), masked(model, slim.meta["cpdfx_kept"])(x2), atol=atol)
        assert cpdfx.cost(slim, x2).params < cpdfx.cost(gm, x2).params
    return gm, comb


def group_of(comb, param, dim):
    return next(g for g in comb.groups if (param, dim) in g.params)
