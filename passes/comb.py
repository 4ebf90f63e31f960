"""Dependency combing: which channels of which layers must go together.

`comb(gm)` gives every dim of every tensor in the graph a space, runs each
node's comb rule from the op table (passes/ops), and reads off the *groups*: the atomic spaces
that some parameter or buffer dim is made of. A group is prunable when it is
larger than one and nothing froze it (graph inputs and outputs, dynamic dims,
spatial and reduced dims, ops without a rule).

A block of forward under `with torch.autocast(...)` or `torch.no_grad()` is
captured as a higher-order op that runs a sub-graph (a GraphModule attribute)
on its operands. Comb sees through such a `Call`, as if the sub-graph were
inline (`Inline`): its placeholders are its operands, its outputs the call's
results; eliminate, cost and set_mode walk the same nodes. The wrapper itself
stays, and with it what it means in training (no gradient, no autocast).
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

    def __init__(self, gm: fx.GraphModule, inline: Inline):
        self.spaces = Spaces()
        self.node_dims: dict = {}
        self.param_dims: dict = {}
        self.memo: dict = {}
        self.hints = {}
        for node in inline.nodes:
            val = node.meta.get("val")
            if node.op == "get_attr" and isinstance(val, torch.Tensor):
                name = inline.target(node)
                if name not in self.param_dims:
                    self.param_dims[name] = self._new_dims(val)
                self.node_dims[node.name] = self.param_dims[name]
            elif val is not None and node.op != "get_attr":
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
    """Find the channel groups of a captured graph (see module docstring).

    Facts are keyed by node name, so the nodes of sub-graphs that share a
    name with another node of the graph are renamed first (see unique_names)."""
    if not any("val" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        raise ValueError("comb needs a graph with shapes on its nodes (node.meta['val']): "
                         "capture the model with cpdfx.capture first")
    inline = Inline(gm)
    unique_names(inline)
    cx = CombContext(gm, inline)
    calls = {call.node for call in inline.calls}
    for node in inline.nodes:
        inside = node.graph is not gm.graph  # a sub-graph's inputs and outputs are tied to its calls below
        if node.op == "placeholder" and not inside:
            cx.freeze(cx.dims(node) or [], f"model input '{node.name}'")
        elif node.op == "output" and not inside:
            cx.freeze_node(node, "model output")
        elif node.op == "call_function" and node.target in OPS:
            OPS[node.target].comb(node, cx)
        elif node.op in ("call_function", "call_module", "call_method") and node not in calls:
            cx.freeze_node(node, f"no rule for {_op_name(node.target)}")
    for call in inline.calls:
        for value, placeholder in zip(call.operands, call.inputs):
            _tie(cx, cx.dims(value), cx.dims(placeholder))
        for dims, value in zip(cx.dims(call.node), call.outputs):
            _tie(cx, dims, cx.dims(value))
    spaces = cx.spaces
    spaces.finish()
    return Comb(spaces, cx.node_dims, cx.param_dims, _groups(spaces, cx.param_dims), cx.memo)


def _tie(cx, a, b):
    """The same tensor seen from both sides of a call: its dims are one."""
    if a is not None and b is not None:
        cx.unify_all(a, b)


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


# -- sub-graphs a wrapper runs --------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A higher-order op that runs one sub-graph on its operands as they are:
    torch.export's wrap_with_autocast for a `with torch.autocast(...)` block,
    wrap_with_set_grad_enabled for `with torch.no_grad()`. The operands are the
    sub-graph's placeholders, one to one; the call's results its outputs."""
    node: fx.Node
    attr: fx.Node  # the get_attr of the sub-graph
    module: fx.GraphModule
    operands: tuple  # one per placeholder
    inputs: tuple  # the placeholders
    outputs: tuple  # what the sub-graph returns, one per item of the call's result


def as_call(node: fx.Node) -> Call | None:
    """node as a Call: a higher-order op with one GraphModule argument, only
    constants before it, one operand per placeholder after it, and as its
    result one value per output of the sub-graph, each of the rank and dtype
    of its counterpart; else None. Other higher-order ops (cond's two
    branches, map over a list, flex_attention's score_mod) have no rule and
    freeze what they touch."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator) or node.kwargs:
        return None
    found = [i for i, a in enumerate(node.args) if _graph_module(a) is not None]
    if len(found) != 1 or _nodes_in(node.args[:found[0]]):
        return None
    attr = node.args[found[0]]
    module = _graph_module(attr)
    operands = tuple(node.args[found[0] + 1:])
    inputs = tuple(module.graph.find_nodes(op="placeholder"))
    returned = module.graph.output_node().args[0]
    outputs = tuple(returned) if isinstance(returned, (tuple, list)) else None
    results = node.meta.get("val")
    if (outputs is None or not isinstance(results, (tuple, list)) or len(results) != len(outputs)
            or len(operands) != len(inputs)):
        return None
    pairs = [*zip(map(_val, operands), map(_val, inputs)), *zip(results, map(_val, outputs))]
    return Call(node, attr, module, operands, inputs, outputs) if all(_alike(a, b) for a, b in pairs) else None


def _graph_module(value) -> fx.GraphModule | None:
    if not isinstance(value, fx.Node) or value.op != "get_attr" or value.graph.owning_module is None:
        return None
    try:
        found = value.graph.owning_module.get_submodule(value.target)
    except AttributeError:  # a tensor, not a module
        return None
    return found if isinstance(found, fx.GraphModule) else None


def _nodes_in(args) -> list:
    found = []
    fx.node.map_arg(args, found.append)
    return found


def _val(value):
    return value.meta.get("val") if isinstance(value, fx.Node) else value


def _alike(a, b) -> bool:
    """Tensors of one rank and dtype, or two single values that are not tensors."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dim() == b.dim() and a.dtype == b.dtype
    return not isinstance(a, (torch.Tensor, tuple, list)) and not isinstance(b, (torch.Tensor, tuple, list))


class Inline:
    """A graph with the sub-graphs its Calls run seen as if inline.

    nodes: every node of the graph and of each sub-graph (once, however many
    calls run it), a sub-graph's before the first call that runs it; calls:
    every Call, outer ones first; modules: the graph's module and each
    sub-graph's."""

    def __init__(self, gm: fx.GraphModule):
        self.nodes: list[fx.Node] = []
        self.calls: list[Call] = []
        self.modules: list[fx.GraphModule] = [gm]
        self._prefix = {gm.graph: ""}  # graph -> its module's qualified name, with a trailing dot
        self._operand: dict = {}  # placeholder -> the operand a call passes it
        self._visit(gm)

    def _visit(self, gm):
        for node in gm.graph.nodes:
            call = as_call(node)
            if call is not None:
                self.calls.append(call)
                for value, placeholder in zip(call.operands, call.inputs):
                    self._operand.setdefault(placeholder, value)
                if call.module.graph not in self._prefix:
                    self._prefix[call.module.graph] = self.target(call.attr) + "."
                    self.modules.append(call.module)
                    self._visit(call.module)
            self.nodes.append(node)

    def target(self, node: fx.Node) -> str:
        """A get_attr's target, qualified from the graph's module."""
        return self._prefix[node.graph] + node.target

    def origin(self, value):
        """What a sub-graph's placeholder takes, followed out to the graph."""
        while isinstance(value, fx.Node) and value in self._operand:
            value = self._operand[value]
        return value

    def prefix(self, module: fx.GraphModule) -> str:
        return self._prefix[module.graph]


def unique_names(inline: Inline) -> None:
    """Rename the sub-graphs' nodes whose names another node of the graph
    already has (torch.export names a sub-graph's placeholders after the
    operands they take, and a call after the sub-graph's output): comb keys
    its facts by node name, and so does what reads them. The graph's own
    names stay; a renamed node becomes, e.g., submod_1_relu."""
    taken = set()
    for module in inline.modules:
        renamed = False
        for node in module.graph.nodes:
            base, k = inline.prefix(module).replace(".", "_") + node.name, 0
            while node.name in taken:
                node._rename(f"{base}_{k}" if k else base)
                renamed, k = True, k + 1
            taken.add(node.name)
        if renamed:
            module.recompile()
