"""Fold attention on tensors of other ranks than four into 4-D attention.

torch's ONNX exporter translates `aten.scaled_dot_product_attention` on 4-D
query, key and value only ("only 4D query, key, and value are supported").
Windowed attention calls it on (B, windows, heads, N, d), locally-grouped and
masked-unit attention on 5-D or 6-D tensors, and a model may call it on 3-D
ones; torch computes all of them over the last three dims (heads, sequence,
features) and broadcasts the dims before them. This pass folds those dims into
one batch dim (or adds leading ones) and unfolds the result, so the exporter
sees 4-D attention that computes the same.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from .ops import arg, set_arg

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default


def fold_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """gm with every scaled_dot_product_attention on query, key and value of
    a rank other than 4 rewritten to compute the same on 4-D ones.

    The dims before the last three are broadcast among query, key, value and
    attn_mask, folded into one and unfolded from the output; fewer than four
    dims gain leading ones. The other arguments (is_causal, scale, enable_gqa,
    dropout_p) are kept, and the folded sizes are read from the tensors, so a
    symbolic batch stays symbolic. Returns gm itself when it has no such node,
    else a new GraphModule sharing gm's parameters; gm is not changed. The new
    nodes carry no shapes ("val"): the graph is for torch.export to trace again.
    A node whose sizes cannot be told apart statically (two different symbolic
    sizes broadcast together) is left as it is."""
    if not any(_foldable(n) for n in gm.graph.nodes):
        return gm
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in list(new.graph.nodes):
        if _foldable(node):
            _fold(new.graph, node)
    new.recompile()
    return new


def _val(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _foldable(node: fx.Node) -> bool:
    """An attention node on query, key and value of one rank other than 4,
    with shapes known and a mask of no higher rank, whose leading dims broadcast."""
    if node.op != "call_function" or node.target is not SDPA:
        return False
    vals = [_val(t) for t in node.args[:3]]
    if any(v is None for v in vals) or len({v.dim() for v in vals}) != 1 or vals[0].dim() == 4:
        return False
    mask = arg(node, "attn_mask")
    if mask is not None and (_val(mask) is None or _val(mask).dim() > vals[0].dim()):
        return False
    return _leading(node) is not None


def _same(a, b) -> bool:
    """Whether two sizes are statically the same (ints, or one symbolic expression)."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.node.expr == b.node.expr


def _leading(node: fx.Node):
    """The broadcast sizes of the dims before the last three, as (size, tensor
    node, dim) with the tensor that has that size (None where it is 1); None
    where two sizes there differ and neither is 1."""
    tensors = [t for t in [*node.args[:3], arg(node, "attn_mask")] if t is not None]
    rank = _val(node.args[0]).dim()
    sizes = []
    for i in range(rank - 3):  # counted from the left of a rank-`rank` tensor
        found = (1, None, None)
        for t in tensors:
            shape = _val(t).shape
            d = i - (rank - len(shape))  # a shorter mask is aligned to the right
            if d < 0 or _same(shape[d], 1):
                continue
            if found[1] is None:
                found = (shape[d], t, d)
            elif not _same(found[0], shape[d]):
                return None
        sizes.append(found)
    return sizes


def _fold(graph: fx.Graph, node: fx.Node) -> None:
    """Rewrite one attention node to 4-D, in place."""
    rank, mask = _val(node.args[0]).dim(), arg(node, "attn_mask")

    def call(target, *args):
        new = graph.call_function(target, args)
        new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        return new

    with graph.inserting_before(node):
        if rank < 4:  # (heads, N, d) -> (1, heads, N, d); a mask of rank <= rank broadcasts as it is
            q, k, v = node.args[:3]
            for _ in range(4 - rank):
                q, k, v = (call(aten.unsqueeze.default, t, 0) for t in (q, k, v))
            folded = [q, k, v, mask]
        else:
            lead = _leading(node)
            sizes = [s if isinstance(s, int) else call(aten.sym_size.int, t, d) for s, t, d in lead]
            folded = [_to_4d(call, t, lead, sizes, mask=False) for t in node.args[:3]]
            folded.append(mask if mask is None else _to_4d(call, mask, lead, sizes, mask=True))
    node.args = (*folded[:3], *node.args[3:])
    if mask is not None:
        set_arg(node, "attn_mask", folded[3])
    node.meta.pop("val", None)  # the node is 4-D now; its shape is not recorded
    with graph.inserting_after(node):
        if rank < 4:
            out = call(aten.flatten.using_ints, node, 0, 4 - rank)
        else:
            out = call(aten.unflatten.int, node, 0, sizes)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _to_4d(call, t: fx.Node, lead, sizes, mask: bool) -> fx.Node:
    """t with its dims before the last three folded into one, expanded first
    to the broadcast sizes where it differs from them. A mask with only ones
    there (or no dims there) is kept at a batch of one, which broadcasts."""
    own = list(_val(t).shape[:-3])
    if mask and all(_same(s, 1) for s in own):
        return t if len(own) <= 1 else call(aten.flatten.using_ints, t, 0, len(own) - 1)
    if len(own) < len(lead) or not all(_same(a, b) for a, (b, _, _) in zip(own, lead)):
        t = call(aten.expand.default, t, [*sizes, -1, -1, -1])
    return call(aten.flatten.using_ints, t, 0, len(lead) - 1)
