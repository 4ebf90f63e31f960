"""Reductions, and ops that work along a dim (softmax, sort, topk, ...)."""
from __future__ import annotations

from ._norm import normalises
from ._table import arg, dim_index, op


def _results(cx, node):
    outs = cx.dims(node)
    return outs if outs and isinstance(outs[0], list) else [outs]


def reduce(dim_name=None, statistic=False):
    """Reduced dims are frozen: a mean or sum over fewer channels is another
    function. dim_name is the argument naming them (None: every dim). A
    `statistic` kept as size 1 whose value only returns into the tensor it
    was taken of is a norm's, and does not freeze them (_norm.normalises)."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        dims = arg(node, dim_name) if dim_name else None
        if dims is None or dims == []:
            reduced = set(range(len(xd)))
        else:
            reduced = {dim_index(d, len(xd)) for d in ([dims] if isinstance(dims, int) else dims)}
        if not (statistic and arg(node, "keepdim") and normalises(node, reduced)):
            cx.freeze([xd[d] for d in sorted(reduced)], f"reduced by {node.target._opname}")
        kept = [d for i, d in enumerate(xd) if i not in reduced]
        for out in _results(cx, node):
            if len(out) == len(xd):  # keepdim
                out = [d for i, d in enumerate(out) if i not in reduced]
            cx.unify_all(out, kept)
    comb.__doc__ = reduce.__doc__
    return comb


op("sum.dim_IntList", "amax", "amin", "max.dim", "min.dim", "std.correction", "std.dim", "linalg_vector_norm",
   "norm.ScalarOpt_dim", "logsumexp", "prod.dim_int", "argmax", "argmin", "any.dim", "all.dim", latency="elements",
   reads=("dim",))(reduce("dim"))
op("mean.dim", "var.dim", "var.correction", latency="elements", reads=("dim", "keepdim"))(reduce("dim", statistic=True))
op("mean.default", "sum.default", latency="elements")(reduce())


def along(name):
    """An op that works along the dim(s) named by argument `name`: those are
    frozen; the results keep the input's other dims."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        dims = arg(node, name)
        dims = list(range(len(xd))) if dims in (None, []) else [dims] if isinstance(dims, int) else dims
        used = {dim_index(d, len(xd)) for d in dims}
        cx.freeze([xd[d] for d in sorted(used)], f"dim used by {node.target._opname}")
        for out in _results(cx, node):
            for i, (o, d) in enumerate(zip(out, xd)):
                if i in used and not cx.same(cx.size(o), cx.size(d)):  # topk keeps k of them
                    cx.freeze([o], f"dim used by {node.target._opname}")
                else:
                    cx.unify(o, d)
    return comb


op("softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "cumsum", "cumprod", "sort", "topk",
   latency="elements", reads=("dim",))(along("dim"))
op("flip", "roll", latency="elements", reads=("dims",))(along("dims"))
