"""Layout ops: permutes, reshapes, expands, and cutting or joining tensors.

Permutes, repeats and joins copy their data in an exported model, so the
latency model prices them by element count; views and slices do not."""
from __future__ import annotations

import torch

from ..spaces import CAT, PROD
from ._table import arg, dim_index, op, set_arg

aten = torch.ops.aten


# -- permutes -------------------------------------------------------------------------------

@op("permute", latency="elements", reads=("dims",))
def comb_permute(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    cx.unify_all(out, [xd[dim_index(p, len(xd))] for p in arg(node, "dims")])


def swap(first=None, second=None):
    """Result dims = input dims with two swapped: the named ones, or 0 and 1 (t, numpy_T)."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        a, b = (arg(node, first), arg(node, second)) if first else (0, 1)
        a, b = (dim_index(a, len(xd)), dim_index(b, len(xd))) if len(xd) > 1 else (0, 0)
        order = list(range(len(xd)))
        order[a], order[b] = order[b], order[a]
        cx.unify_all(cx.dims(node), [xd[i] for i in order])
    return comb


op("transpose.int", latency="elements", reads=("dim0", "dim1"))(swap("dim0", "dim1"))
op("swapaxes", latency="elements", reads=("axis0", "axis1"))(swap("axis0", "axis1"))
op("t", "numpy_T")(swap())


# -- reshapes ---------------------------------------------------------------------------------

def rewrite_shape_arg(name):
    """Rewrite an int-list size argument from the result's new dims."""
    def rewrite(node, rx):
        out = rx.dims(node)
        shape = list(arg(node, name))
        offset = len(out) - len(shape)  # expand may add leading dims
        for i, s in enumerate(shape):
            if isinstance(s, int) and s != -1:
                shape[i] = rx.new_size(out[i + offset])
        set_arg(node, name, shape)
    return rewrite


def rewrite_unflatten(node, rx):
    out = rx.dims(node)
    sizes = list(arg(node, "sizes"))
    dim = dim_index(arg(node, "dim"), len(out) - len(sizes) + 1)
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            sizes[i] = rx.new_size(out[dim + i])
    set_arg(node, "sizes", sizes)


def comb_reshape(node, cx):
    """Match input and result dims into minimal groups of equal product; a
    group of one input and several results (or the reverse) is a product."""
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    ins = [(d, cx.size(d)) for d in xd if cx.size(d) != 1]
    outs = [(d, cx.size(d)) for d in out if cx.size(d) != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        i, j = i + 1, j + 1
        while not cx.same(_prod(gi), _prod(go)):
            if cx.hint(_prod(gi)) < cx.hint(_prod(go)) and i < len(ins):
                gi.append(ins[i])
                i += 1
            elif j < len(outs):
                go.append(outs[j])
                j += 1
            else:
                break
        if not cx.same(_prod(gi), _prod(go)):
            cx.freeze([d for d, _ in ins + outs], "reshape whose dims could not be matched")
            return
        if len(gi) == 1:
            cx.define(gi[0][0], PROD, [d for d, _ in go])
        elif len(go) == 1:
            cx.define(go[0][0], PROD, [d for d, _ in gi])
        else:
            cx.freeze([d for d, _ in gi + go], "reshape that regroups several dims")


def _prod(group):
    p = 1
    for _, s in group:
        p = p * s
    return p


def rewrite_view(node, rx):
    """A view becomes a reshape with the new sizes. A view needs strides that
    its input may no longer have once channels go: an op whose input sizes
    change may pick another kernel and memory layout (attention whose q/k and
    v head dims now differ leaves the math kernel's layout), so a
    `.contiguous()` that was a no-op at capture, and so is not in the graph,
    would be needed now. reshape is the same view where a view is legal and a
    copy only where it is not: exact, and free where the layout held."""
    rewrite_shape_arg("size")(node, rx)
    node.args, node.kwargs = (node.args[0], arg(node, "size")), {}
    node.target = aten.reshape.default


# view and _unsafe_view name their shape `size`, reshape `shape`
op("view", "_unsafe_view", rewrite=rewrite_view, reads=("size",))(comb_reshape)
op("reshape", rewrite=rewrite_shape_arg("shape"), reads=("shape",))(comb_reshape)
op("unflatten.int", rewrite=rewrite_unflatten, reads=("dim", "sizes"))(comb_reshape)
# the result's shape says it all: nothing to read, nothing to rewrite
op("flatten.using_ints", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze", "reshape_as",
   "view_as", "_reshape_alias")(comb_reshape)


@op("expand", rewrite=rewrite_shape_arg("size"), reads=("size",))
def comb_expand(node, cx):
    cx.broadcast(cx.dims(node), cx.dims(node.args[0]))


@op("expand_as", reads=("other",))
def comb_expand_as(node, cx):
    out = cx.dims(node)
    cx.broadcast(out, cx.dims(node.args[0]))
    cx.unify_all(out, cx.dims(arg(node, "other")))


@op("repeat", latency="elements", reads=("repeats",))
def comb_repeat(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    repeats = arg(node, "repeats")
    offset = len(out) - len(xd)
    cx.freeze(out[:offset], "repeated dim")
    for i, (d, r) in enumerate(zip(xd, repeats[offset:])):
        if r == 1:
            cx.unify(out[i + offset], d)
        else:
            cx.freeze([d, out[i + offset]], "repeated dim")


# -- joining and cutting ----------------------------------------------------------------------

@op("cat", latency="elements", reads=("tensors", "dim"))
def comb_cat(node, cx):
    out = cx.dims(node)
    dim = dim_index(arg(node, "dim"), len(out))
    parts = [cx.dims(t) for t in arg(node, "tensors")]
    parts = [p for p in parts if len(p) == len(out)]  # legacy empty 1-D tensors
    cx.define(out[dim], CAT, [p[dim] for p in parts])
    for p in parts:
        cx.unify_all(out[:dim] + out[dim + 1:], p[:dim] + p[dim + 1:])


@op("stack", latency="elements", reads=("tensors", "dim"))
def comb_stack(node, cx):
    out = cx.dims(node)
    dim = dim_index(arg(node, "dim"), len(out))
    cx.freeze([out[dim]], "stacked dim")
    for t in arg(node, "tensors"):
        cx.unify_all(out[:dim] + out[dim + 1:], cx.dims(t))


def rewrite_split(node, rx):
    """Pieces may shrink unequally: every split becomes split_with_sizes."""
    x = node.args[0]
    xd = rx.dims(x)
    dim = dim_index(arg(node, "dim"), len(xd))
    mask = rx.kept_mask(xd[dim])
    if mask is None or mask.all():
        return
    sizes, start = [], 0
    for piece in rx.dims(node):
        n = rx.old_size(piece[dim])
        sizes.append(int(mask[start:start + n].sum()))
        start += n
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, sizes, dim), {}


@op("split.Tensor", "split_with_sizes", "chunk", "unsafe_split.Tensor", "tensor_split.sections",
    rewrite=rewrite_split, reads=("dim",))
def comb_split(node, cx):
    """The input's dim is the concatenation of the pieces'."""
    xd = cx.dims(node.args[0])
    dim = dim_index(arg(node, "dim"), len(xd))
    pieces = cx.dims(node)
    cx.define(xd[dim], CAT, [p[dim] for p in pieces])
    for p in pieces:
        cx.unify_all(p[:dim] + p[dim + 1:], xd[:dim] + xd[dim + 1:])


@op("unbind.int", reads=("dim",))
def comb_unbind(node, cx):
    """One result per index of dim: the dim is frozen (its size is the number of results)."""
    xd = cx.dims(node.args[0])
    dim = dim_index(arg(node, "dim"), len(xd))
    cx.freeze([xd[dim]], "unbound dim")
    for piece in cx.dims(node):
        cx.unify_all(piece, xd[:dim] + xd[dim + 1:])


def _slice_bounds(node, size):
    start, end = arg(node, "start"), arg(node, "end")
    start = 0 if start is None else start + size if start < 0 else min(start, size)
    end = size if end is None else end + size if end < 0 else min(end, size)
    return start, max(start, end)


def rewrite_slice(node, rx):
    xd = rx.dims(node.args[0])
    dim = dim_index(arg(node, "dim"), len(xd))
    mask = rx.kept_mask(xd[dim])
    if mask is None or mask.all():
        return
    start, end = _slice_bounds(node, len(mask))
    new_start = int(mask[:start].sum())
    set_arg(node, "dim", dim)
    set_arg(node, "start", new_start)
    set_arg(node, "end", new_start + int(mask[start:end].sum()))


@op("slice.Tensor", rewrite=rewrite_slice, reads=("dim", "start", "end", "step"))
def comb_slice(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    dim = dim_index(arg(node, "dim"), len(xd))
    cx.unify_all(out[:dim] + out[dim + 1:], xd[:dim] + xd[dim + 1:])
    size = cx.size(xd[dim])
    if not isinstance(size, int) or arg(node, "step") != 1:
        cx.freeze([xd[dim], out[dim]], "strided or dynamic slice")
        return
    start, end = _slice_bounds(node, size)
    cx.define(xd[dim], CAT, [cx.new(start), out[dim], cx.new(size - end)])


@op("select.int", reads=("dim",))
def comb_select(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    dim = dim_index(arg(node, "dim"), len(xd))
    cx.freeze([xd[dim]], "indexed dim")
    cx.unify_all(out, xd[:dim] + xd[dim + 1:])


@op("index_select", reads=("dim",))
def comb_index_select(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    dim = dim_index(arg(node, "dim"), len(xd))
    cx.freeze([xd[dim], out[dim]], "indexed dim")
    cx.unify_all(out[:dim] + out[dim + 1:], xd[:dim] + xd[dim + 1:])


@op("index.Tensor", reads=("indices",))
def comb_index(node, cx):
    """x[..., idx, ...] with one index tensor: the indexed dim is frozen and the
    index's dims take its place (relative position bias tables)."""
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    indices = arg(node, "indices")
    used = [i for i, t in enumerate(indices) if t is not None]
    if len(used) != 1:
        cx.freeze_node(node, "advanced indexing with several index tensors")
        return
    p = used[0]
    idx = cx.dims(indices[p])
    cx.freeze([xd[p]], "indexed dim")
    cx.unify_all(out, xd[:p] + idx + xd[p + 1:])
