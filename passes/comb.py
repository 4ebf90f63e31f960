"""Dependency combing: which channels of which layers must go together.

`comb(gm)` gives every dim of every tensor in the graph a space, runs each
node's comb rule from the op table (passes/ops), and reads off the *groups*: the atomic spaces
that some parameter or buffer dim is made of. A group is prunable when it is
larger than one and nothing froze it (graph inputs and outputs, dynamic dims,
spatial and reduced dims, ops without a rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .ops import OPS, SPATIAL
from .spaces import Spaces, same_size


@dataclass
class Group:
    """One atomic channel space and every parameter dim that carries it."""
    id: int
    size: int
    prunable: bool
    frozen_reason: str | None
    params: list = field(default_factory=list)  # [(name, dim)], with repeats removed

    @property
    def layers(self) -> list[str]:
        return sorted({name.rpartition(".")[0] or name for name, _ in self.params})


@dataclass
class Comb:
    """What `comb` found: the spaces, the dims of each node and parameter, the groups."""
    spaces: Spaces
    node_dims: dict  # node name -> [space ids] or a list of those for tuple results
    param_dims: dict  # parameter/buffer name -> [space ids]
    groups: list
    memo: dict  # per-node facts that rewrite rules need

    def group(self, gid: int) -> Group:
        return self._by_id[gid]

    def __post_init__(self):
        self._by_id = {g.id: g for g in self.groups}

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def table(self) -> str:
        """The groups as a readable table."""
        rows = [("group", "size", "prunable", "layers (param:dim)")]
        for g in self.groups:
            where = ", ".join(f"{n}:{d}" for n, d in g.params[:4])
            if len(g.params) > 4:
                where += f", ... (+{len(g.params) - 4})"
            rows.append((str(g.id), str(g.size), "yes" if g.prunable else f"no: {g.frozen_reason}", where))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def _size(s):
    return int(s) if is_concrete_int(s) else s.node.expr


class CombContext:
    """What a rule sees: dims of nodes, and the operations on spaces."""

    def __init__(self, gm: fx.GraphModule):
        self.spaces = Spaces()
        self.node_dims: dict = {}
        self.param_dims: dict = {}
        self.memo: dict = {}
        self.hints = {}
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if node.op == "get_attr":
                if node.target not in self.param_dims:
                    self.param_dims[node.target] = self._new_dims(val)
                self.node_dims[node.name] = self.param_dims[node.target]
            elif val is not None:
                self.node_dims[node.name] = self._new_dims(val)
        shape_env = _shape_env(gm)
        if shape_env is not None:
            self.hints = hints(shape_env)

    def _new_dims(self, val):
        if isinstance(val, torch.Tensor):
            return [self.spaces.new(_size(s)) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [self._new_dims(v) for v in val]
        return None

    # -- what rules call --
    def dims(self, arg):
        return self.node_dims.get(arg.name) if isinstance(arg, fx.Node) else None

    def tensor_args(self, node):
        for a in (*node.args, *node.kwargs.values()):
            d = self.dims(a)
            if d is not None and (not d or not isinstance(d[0], list)):
                yield d

    def size(self, space):
        return self.spaces.size[self.spaces.find(space)]

    def same(self, a, b) -> bool:
        return same_size(a, b)

    def hint(self, size) -> int:
        return int(size) if isinstance(size, int) else int(sympy.sympify(size).subs(self.hints))

    def new(self, size) -> int:
        return self.spaces.new(size)

    def unify(self, a, b):
        self.spaces.unify(a, b)

    def unify_all(self, xs, ys):
        if len(xs) != len(ys):
            self.freeze(list(xs) + list(ys), "dims that could not be paired")
            return
        for x, y in zip(xs, ys):
            self.spaces.unify(x, y)

    def define(self, space, kind, parts):
        self.spaces.define(space, kind, parts)

    def freeze(self, spaces, reason):
        for s in spaces:
            if isinstance(s, list):
                self.freeze(s, reason)
            else:
                self.spaces.freeze(s, reason)

    def freeze_node(self, node, reason):
        for a in (*node.args, *node.kwargs.values(), node):
            for item in (a if isinstance(a, (list, tuple)) else [a]):
                d = self.dims(item)
                if d is not None:
                    self.freeze(d, reason)

    def broadcast(self, out, operand):
        """Unify operand dims with the result dims they are not broadcast along."""
        for o, d in zip(reversed(out), reversed(operand)):
            so, sd = self.size(o), self.size(d)
            if sd != 1 and self.same(so, sd):
                self.unify(o, d)
            elif sd != 1:
                self.freeze([o, d], "broadcast between different sizes")


def hints(shape_env) -> dict:
    """The example value of each symbolic size."""
    return dict(getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val)


def _shape_env(gm):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode.shape_env
    return None


def _op_name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def comb(gm: fx.GraphModule) -> Comb:
    """Find the channel groups of a captured graph (see module docstring)."""
    if not any("val" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        raise ValueError("comb needs a graph with shapes on its nodes (node.meta['val']): "
                         "capture the model with cpdfx.capture first")
    cx = CombContext(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            cx.freeze(cx.dims(node) or [], f"model input '{node.name}'")
        elif node.op == "output":
            cx.freeze_node(node, "model output")
        elif node.op == "call_function" and node.target in OPS:
            OPS[node.target].comb(node, cx)
        elif node.op in ("call_function", "call_module", "call_method"):
            cx.freeze_node(node, f"no rule for {_op_name(node.target)}")
    spaces = cx.spaces
    spaces.finish()
    return Comb(spaces, cx.node_dims, cx.param_dims, _groups(spaces, cx.param_dims), cx.memo)


def _groups(spaces: Spaces, param_dims: dict) -> list[Group]:
    touching: dict = {}
    for name, dims in param_dims.items():
        for d, space in enumerate(dims):
            for atom in spaces.atoms(space):
                entry = (name, d)
                lst = touching.setdefault(atom, [])
                if entry not in lst:
                    lst.append(entry)
    groups = []
    for atom, params in touching.items():
        size = spaces.size[atom]
        if not isinstance(size, int) or size <= 1 or spaces.reason(atom) == SPATIAL:
            continue  # not a channel space, or nothing to prune
        reason = spaces.reason(atom)
        groups.append(Group(atom, size, reason is None, reason, params))
    groups.sort(key=lambda g: (not g.prunable, g.id))
    return groups


def kept_indices(comb: Comb, keep: dict) -> dict:
    """For each parameter dim that loses positions: {name: {dim: kept positions}}."""
    out = {}
    for name, dims in comb.param_dims.items():
        for d, space in enumerate(dims):
            if not isinstance(comb.spaces.size[comb.spaces.find(space)], int):
                continue
            mask = comb.spaces.kept_positions(space, keep)
            if not mask.all():
                out.setdefault(name, {})[d] = np.flatnonzero(mask)
    return out
