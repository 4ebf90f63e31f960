"""The op table's record, its registry, and reading a node's arguments by name.

An entry (`Op`) says everything cpdfx knows about one ATen op, or about a few
overloads that share one schema shape: how it ties channel spaces (`comb`),
which ints it rewrites when channels go (`rewrite`), its MAC terms (`macs`),
its train/eval argument (`mode`), which argument is a norm's per-channel scale
(`scale`) and running statistics (`running_stats`), and how the latency model
prices it (`latency`: timed as a layer of its own, or by its element count).
Every name an entry reads is declared (`reads` and the fields above) and exists
in the schema of each of its overloads; `arg` refuses any other, so a rule
cannot read `k` where it meant `dim` (aten.topk) or a position that means
something else in another overload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class Op:
    comb: Callable  # (node, CombContext): unify, define or freeze the node's spaces
    rewrite: Callable | None = None  # (node, RewriteContext): new int arguments after elimination
    macs: Callable | None = None  # node -> MAC terms, each a list of (node, dim) whose sizes multiply
    mode: tuple | None = None  # (argument name, its value in eval mode); the train value is captured
    scale: str | None = None  # the argument holding a norm's per-channel scale (gamma)
    running_stats: tuple | None = None  # (mean, var, momentum) argument names of a norm's running statistics
    latency: str | None = None  # "conv" or "linear": tabled as a layer of its own by cpdfx.latency; "elements":
    # its time follows the element count of its largest tensor (elementwise, norms, reductions, permutes, joins)
    reads: tuple = ()  # the other argument names comb, rewrite and macs read

    @property
    def names(self) -> tuple:
        """Every argument name the entry reads."""
        return (*self.reads, *(self.mode[:1] if self.mode else ()), *((self.scale,) if self.scale else ()),
                *(self.running_stats or ()))


OPS: dict = {}  # target (an OpOverload, or operator.getitem) -> Op
SPATIAL = "spatial dim"  # the reason that marks a frozen dim as not a channel dim


def op(*names, rewrite=None, macs=None, mode=None, scale=None, running_stats=None, latency=None, reads=()):
    """Register a comb function, with the rest of an entry, for ops named like
    'conv2d.default'; names torch does not have are skipped. An op registered
    twice is an error: each op has exactly one entry."""
    def register(fn):
        entry = Op(fn, rewrite, macs, mode, scale, running_stats, latency, tuple(reads))
        for name in names:
            target = resolve_op(name)
            if target is None:
                continue
            if target in OPS:
                raise ValueError(f"{target} has two entries in the op table")
            OPS[target] = entry
        return fn
    return register


def resolve_op(name):
    """aten op from a name like 'conv2d.default' ('conv2d' alone means .default); None if absent."""
    if not isinstance(name, str):
        return name
    packet, _, overload = name.partition(".")
    try:
        return getattr(getattr(aten, packet), overload or "default")
    except AttributeError:
        return None


_ARGUMENTS: dict = {}


def schema_arguments(target) -> dict:
    """name -> (position, or None for keyword-only; torch Argument) for an op's schema."""
    found = _ARGUMENTS.get(target)
    if found is None:
        found = {}
        for i, a in enumerate(target._schema.arguments):
            found[a.name] = (None if a.kwarg_only else i, a)
        _ARGUMENTS[target] = found
    return found


def has_arg(node, name) -> bool:
    return name in schema_arguments(node.target)


def _spec(node, name):
    spec = schema_arguments(node.target).get(name)
    if spec is None:
        raise KeyError(f"{node.target} has no argument {name!r}; its schema is {node.target._schema}")
    entry = OPS.get(node.target)
    if entry is not None and name not in entry.names:
        raise KeyError(f"the op table's entry for {node.target} reads {name!r} without declaring it "
                       f"(declared: {', '.join(entry.names) or 'none'})")
    return spec


def arg(node, name, default=None):
    """The node's argument `name` (by schema name): as given, positionally or by
    keyword, else the schema's default, else `default`."""
    index, argument = _spec(node, name)
    if index is not None and index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    return argument.default_value if argument.has_default_value() else default


def set_arg(node, name, value) -> None:
    """Set the node's argument `name`: in place when given positionally, else by keyword."""
    index, _ = _spec(node, name)
    if index is not None and index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def dim_index(d, ndim):
    return d + ndim if d < 0 else d
