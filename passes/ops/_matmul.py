"""Products with weights or of activations: linear, matmul, attention, embedding."""
from __future__ import annotations

import math

from ._table import arg, op, set_arg


def _out(node):
    return [(node, d) for d in range(node.meta["val"].dim())]


def linear_macs(node):
    """Each output element: one row of the weight."""
    return [_out(node) + [(arg(node, "weight"), 1)]]


@op("linear", macs=linear_macs, latency="linear", reads=("input", "weight", "bias"))
def comb_linear(node, cx):
    xd, wd, od = cx.dims(arg(node, "input")), cx.dims(arg(node, "weight")), cx.dims(node)
    cx.unify(xd[-1], wd[1])
    cx.unify(od[-1], wd[0])
    cx.unify_all(od[:-1], xd[:-1])
    b = arg(node, "bias")
    if b is not None:
        cx.unify(cx.dims(b)[0], od[-1])


def matmul(right):
    """a @ b, with b the argument named `right` (matmul says other, bmm and mm mat2)."""
    def comb(node, cx):
        a, b, out = cx.dims(arg(node, "self")), cx.dims(arg(node, right)), cx.dims(node)
        if len(a) < 2 or len(b) < 2:
            cx.freeze_node(node, "matmul with a 1-D operand")
            return
        cx.unify(a[-1], b[-2])
        cx.unify(out[-2], a[-2])
        cx.unify(out[-1], b[-1])
        cx.broadcast(out[:-2], a[:-2])
        cx.broadcast(out[:-2], b[:-2])
    return comb


def matmul_macs(node):
    """Each output element: the contracted dim of the left operand."""
    a = arg(node, "self")
    return [_out(node) + [(a, a.meta["val"].dim() - 1)]]


op("matmul", macs=matmul_macs, reads=("self", "other"))(matmul("other"))
op("bmm", "mm", macs=matmul_macs, reads=("self", "mat2"))(matmul("mat2"))


def rewrite_sdpa(node, rx):
    """The default scale is 1/sqrt(head_dim): keep the original one."""
    q = arg(node, "query")
    if arg(node, "scale") is None:
        old = rx.old_size(rx.dims(q)[-1])
        if rx.new_size(rx.dims(q)[-1]) != old:
            set_arg(node, "scale", 1.0 / math.sqrt(old))


def sdpa_macs(node):
    """q @ k^T and attention @ v: each over the source tokens."""
    q, k = arg(node, "query"), arg(node, "key")
    source = (k, k.meta["val"].dim() - 2)
    return [_out(q) + [source], _out(node) + [source]]


# dropout_p is the attention dropout: set_mode zeroes it in eval
@op("scaled_dot_product_attention", rewrite=rewrite_sdpa, macs=sdpa_macs, mode=("dropout_p", 0.0),
    reads=("query", "key", "value", "attn_mask", "scale"))
def comb_sdpa(node, cx):
    q, k, v, out = (cx.dims(a) for a in (arg(node, "query"), arg(node, "key"), arg(node, "value"), node))
    cx.unify(q[-1], k[-1])  # query/key head dim
    cx.unify(k[-2], v[-2])  # source tokens
    cx.unify(out[-2], q[-2])
    cx.unify(out[-1], v[-1])
    for operand in (q, k, v):
        cx.broadcast(out[:-2], operand[:-2])
    mask = arg(node, "attn_mask")
    if mask is not None:  # broadcasts against (..., L, S)
        cx.broadcast(out[:-1] + [k[-2]], cx.dims(mask))


@op("embedding", reads=("weight", "indices"))
def comb_embedding(node, cx):
    wd, idx, out = cx.dims(arg(node, "weight")), cx.dims(arg(node, "indices")), cx.dims(node)
    cx.freeze([wd[0]], "embedding rows are looked up by index")
    cx.unify_all(out[:-1], idx)
    cx.unify(out[-1], wd[1])
