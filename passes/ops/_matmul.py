"""Products with weights or of activations: linear, matmul, einsum, attention, embedding."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from torch.fx.experimental.symbolic_shapes import is_concrete_int

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


def einsum_labels(node):
    """The equation's label for each dim of every operand and of the result:
    its letter, or ("...", k) for the dim k places left of an ellipsis's end
    (ellipses broadcast from the right). Without "->" the result is the
    ellipsis, then the letters seen once, in order (as torch reads it)."""
    lhs, arrow, rhs = arg(node, "equation").replace(" ", "").partition("->")
    terms = lhs.split(",")
    spans = [t.meta["val"].dim() - len(term.replace("...", "")) for term, t in zip(terms, arg(node, "tensors"))]
    if not arrow:
        counts = Counter("".join(terms).replace(".", ""))
        rhs = "..." + "".join(sorted(c for c, n in counts.items() if n == 1))
    return [_labels(term, span) for term, span in zip(terms, spans)], _labels(rhs, max(spans))


def _labels(term, span):
    head, dots, tail = term.partition("...")
    return [*head, *(("...", k) for k in reversed(range(span)) if dots), *tail]


def einsum_macs(node):
    """torch contracts the operands two at a time (in the order of `path`,
    else left to right), after summing out of each side the letters no other
    operand or the result holds: a pair that then sums a letter both hold is
    one bmm over every letter either holds; one that sums none is an
    elementwise product, no MACs (as torch.utils.flop_counter counts).
    Size-1 dims broadcast: no side holds them."""
    ins, out = einsum_labels(node)
    where, held = {}, []  # label -> an (operand, dim) holding it; the labels each operand holds
    for t, labels in zip(arg(node, "tensors"), ins):
        shape = t.meta["val"].shape
        holds = [(l, d) for d, l in enumerate(labels) if not (is_concrete_int(shape[d]) and int(shape[d]) == 1)]
        for l, d in holds:
            where.setdefault(l, (t, d))
        held.append({l for l, _ in holds})
    holders = Counter(l for h in held for l in h)
    path, terms = arg(node, "path"), []
    for step in range(len(held) - 1):
        i, j = sorted(path[2 * step:2 * step + 2]) if path else (0, 1)
        a, b = held[i], held[j]
        del held[j], held[i]
        summed = set()
        for label in (a | b).difference(out):
            if label in a and label in b:
                holders[label] -= 1
                if holders[label] == 1:
                    summed.add(label)
            elif holders[label] == 1:  # this side alone holds it: summed out first
                a, b = a - {label}, b - {label}
        if summed:
            terms.append([where[l] for l in sorted(a | b, key=str)])
        held.insert(len(held) if path else 0, (a | b) - summed)
    return terms


# no latency table of its own: the latency model prices its MACs at the tabled layers' time per MAC, as matmul's
@op("einsum", macs=einsum_macs, reads=("equation", "tensors", "path"))
def comb_einsum(node, cx):
    """One space per letter: a letter ties every dim it labels, in the
    operands and the result; a letter summed over is contracted between the
    operands that hold it (pruned on both sides, as matmul's contracted dim).
    A letter summed within one operand alone is a reduction, and a letter
    repeated within one operand takes a diagonal: both freeze. Size-1 dims
    broadcast."""
    ins, out = einsum_labels(node)
    spaces, holders, diagonal = defaultdict(list), Counter(), set()  # label -> its dims; operands holding it
    for labels, dims in [*zip(ins, map(cx.dims, arg(node, "tensors"))), (out, cx.dims(node))]:
        diagonal |= {l for l, n in Counter(labels).items() if n > 1}
        held = [(l, d) for l, d in zip(labels, dims) if cx.size(d) != 1]
        for l, d in held:
            spaces[l].append(d)
        if labels is not out:
            holders.update({l for l, _ in held})
    for label, dims in spaces.items():
        if label in diagonal:
            cx.freeze(dims, "diagonal taken by einsum")
        elif label not in out and holders[label] == 1:
            cx.freeze(dims, "reduced by einsum")
        for d in dims[1:]:
            cx.unify(dims[0], d)


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
