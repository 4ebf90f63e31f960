"""MACs and parameters, counted from the graph.

MACs count the ops that torch.utils.flop_counter counts (convolutions, linear
layers, matrix products, attention): FLOPs = 2 x MACs. Each such op (its entry
in the op table, passes/ops, says how) is a sum of *terms*, each a product of
tensor dims; the same terms, read through the spaces of a comb,
give the cost of any pruned size assignment without building the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .passes.comb import Inline, hints
from .passes.ops import OPS

from .capture import as_tuple, capture, is_captured


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    def __str__(self):
        return f"{self.macs / 1e6:.2f} MMACs, {self.params / 1e6:.3f} M params"


def _macs(node):
    entry = OPS.get(node.target) if node.op == "call_function" else None
    return entry.macs if entry is not None else None


def mac_terms_by_node(gm: fx.GraphModule) -> list:
    """(node, its terms) for each MAC-counted op (its op-table entry has
    `macs`), in the graph and in the sub-graphs its wrappers run (a `with
    torch.no_grad()` block; passes.comb.Inline): a term is a list of (node,
    dim) whose sizes multiply."""
    return [(node, _macs(node)(node)) for node in Inline(gm).nodes if _macs(node) is not None]


def mac_terms(gm: fx.GraphModule) -> list:
    """Every MAC term of the graph (see mac_terms_by_node)."""
    return [term for _, terms in mac_terms_by_node(gm) for term in terms]


def _size(node, d):
    s = node.meta["val"].shape[d]
    return int(s) if is_concrete_int(s) else s.node.expr


def batch_values(gm: fx.GraphModule, example_inputs=None) -> dict:
    """Values for the graph's symbolic sizes: from example_inputs when given,
    else the sizes seen at capture."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {}
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape_env = getattr(val, "fake_mode", None) and val.fake_mode.shape_env
            if shape_env is not None:
                values.update(hints(shape_env))
    if example_inputs is not None:
        flat = pytree.tree_leaves(as_tuple(example_inputs))
        tensors = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
        for node, x in zip(tensors, [x for x in flat if isinstance(x, torch.Tensor)]):
            for s, actual in zip(node.meta["val"].shape, x.shape):
                if not is_concrete_int(s) and isinstance(s.node.expr, sympy.Symbol):
                    values[s.node.expr] = actual
    return values


def concrete(size, values: dict) -> int:
    return int(size) if isinstance(size, int) else int(sympy.sympify(size).subs(values))


def count_params(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def cost(model, example_inputs=None) -> Cost:
    """MACs and parameters of a model (or captured graph) for example_inputs."""
    if not is_captured(model):
        if example_inputs is None:
            raise ValueError("cost of an uncaptured model needs example_inputs")
        model = capture(model, example_inputs)
    values = batch_values(model, example_inputs)
    macs = 0
    for term in mac_terms(model):
        m = 1
        for node, d in term:
            m *= concrete(_size(node, d), values)
        macs += m
    return Cost(int(macs), count_params(model))


class CostModel:
    """The cost of a graph as a function of its groups' sizes (via a comb).

    Each MAC term and parameter is a product of spaces; the factors no
    prunable group reaches (spatial, batch, frozen dims) are multiplied out
    once here, so a call only walks the spaces a pruner can change."""

    def __init__(self, gm: fx.GraphModule, comb, example_inputs=None):
        self.spaces = comb.spaces
        self.values = batch_values(gm, example_inputs)
        prunable = {g.id for g in comb.prunable}
        dims = comb.node_dims

        def split(spaces):
            fixed, free = 1, []
            for s in spaces:
                if prunable.isdisjoint(self.spaces.atoms(s)):
                    fixed *= concrete(self.spaces.new_size(s, {}), self.values)
                else:
                    free.append(s)
            return fixed, free

        self.terms = [split([dims[n.name][d] for n, d in term]) for term in mac_terms(gm)]
        names = dict(gm.named_parameters())
        self.params = [split(comb.param_dims[name]) for name in names if name in comb.param_dims]
        self.fixed_params = sum(p.numel() for name, p in names.items() if name not in comb.param_dims)

    def __call__(self, sizes: dict | None = None) -> Cost:
        sizes = sizes or {}
        cache = {}

        def product(fixed, free):
            for s in free:
                if s not in cache:
                    cache[s] = concrete(self.spaces.new_size(s, sizes), self.values)
                fixed *= cache[s]
            return fixed

        return Cost(sum(product(*t) for t in self.terms),
                    self.fixed_params + sum(product(*p) for p in self.params))
