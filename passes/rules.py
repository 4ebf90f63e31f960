"""One rule per ATen op: how it ties channel spaces together (`comb`) and how
its int arguments change when channels go (`rewrite`).

A comb rule reads the node's operand and result dims (space ids, see
passes/spaces.py) and unifies, defines or freezes them. A rewrite rule runs
during elimination and rewrites the sizes the node encodes as ints. An op with
no rule freezes every dim it touches: less compression, never a wrong graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from .spaces import CAT, PROD

aten = torch.ops.aten


@dataclass(frozen=True)
class Rule:
    comb: Callable
    rewrite: Callable | None = None


RULES: dict = {}
SPATIAL = "spatial dim"  # the reason that marks a frozen dim as not a channel dim


def rule(*names, rewrite=None):
    """Register a comb function (and optional rewrite) for ops named like
    'conv2d.default'; names torch does not have are skipped."""
    def register(fn):
        for name in names:
            target = resolve_op(name)
            if target is not None:
                RULES[target] = Rule(fn, rewrite)
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


def arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node, index, name, value):
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _dim(d, ndim):
    return d + ndim if d < 0 else d


# -- shape-preserving and elementwise ops -----------------------------------------------

ELEMENTWISE = """
relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish hardswish_
hardsigmoid hardsigmoid_ leaky_relu leaky_relu_ elu elu_ mish mish_ softplus prelu
dropout dropout_ alpha_dropout feature_dropout feature_dropout_ bernoulli bernoulli_ bernoulli.p
clone contiguous detach alias lift_fresh_copy _to_copy to.dtype to.dtype_layout to.device type_as
neg exp log sqrt rsqrt abs floor ceil round sign reciprocal erf sin cos square
clamp clamp_ clamp_min clamp_max fill_.Scalar
zeros_like ones_like empty_like full_like rand_like randn_like
add.Tensor add_.Tensor add.Scalar sub.Tensor sub_.Tensor sub.Scalar rsub.Scalar rsub.Tensor
mul.Tensor mul_.Tensor mul.Scalar div.Tensor div_.Tensor div.Scalar div.Tensor_mode
pow.Tensor_Scalar pow.Tensor_Tensor maximum minimum where.self masked_fill.Scalar masked_fill.Tensor
masked_fill_.Scalar eq.Tensor eq.Scalar ne.Tensor ne.Scalar gt.Tensor gt.Scalar lt.Tensor lt.Scalar
ge.Tensor ge.Scalar le.Tensor le.Scalar logical_and logical_or logical_not bitwise_and bitwise_or
copy_ lerp.Scalar addcmul addcdiv
""".split()


@rule(*ELEMENTWISE)
def comb_broadcast(node, cx):
    """Operands broadcast against the result, aligned from the right."""
    out = cx.dims(node)
    for operand in cx.tensor_args(node):
        cx.broadcast(out, operand)


@rule("_assert_tensor_metadata", "sym_size.int", "sym_numel", "sym_stride.int", "_assert_scalar",
      "sym_constrain_range_for_size", "_assert_async.msg", "scalar_tensor")
def comb_nothing(node, cx):
    """Reads metadata or makes a tensor with no channel dims."""


@rule(operator.getitem)
def comb_getitem(node, cx):
    source, index = node.args
    dims = cx.dims(source)
    if isinstance(index, int) and dims is not None and isinstance(dims[index], list):
        cx.unify_all(cx.dims(node), dims[index])
    else:
        cx.freeze_node(node, "indexing a tensor with a Python subscript")


# -- weights: conv, linear, norms --------------------------------------------------------

GROUPS_ARG = {"convolution.default": 8}


def _conv_parts(node):
    name = f"{node.target._opname}.{node.target._overloadname}"
    transposed = "transpose" in name or (name == "convolution.default" and arg(node, 6, "transposed"))
    index = GROUPS_ARG.get(name, 6)
    return transposed, index, arg(node, index, "groups", 1)


@rule("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
      "convolution", "conv_transpose1d", "conv_transpose1d.input", "conv_transpose2d.input", "conv_transpose3d.input",
      rewrite=lambda node, rx: rewrite_conv_groups(node, rx))
def comb_conv(node, cx):
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    xd, wd, od = cx.dims(x), cx.dims(w), cx.dims(node)
    transposed, _, groups = _conv_parts(node)
    cx.unify(od[0], xd[0])
    cx.freeze(xd[2:] + wd[2:] + od[2:], SPATIAL)
    in_w, out_w = (wd[0], wd[1]) if transposed else (wd[1], wd[0])
    if groups == 1:
        cx.unify(xd[1], in_w)
        cx.unify(od[1], out_w)
    else:  # channels = groups x per-group channels, on both sides, sharing the groups space
        group_space = cx.new(groups)
        per_in = in_w if not transposed else cx.new(cx.size(xd[1]) // groups)
        per_out = out_w if transposed else cx.new(cx.size(od[1]) // groups)
        cx.define(xd[1], PROD, [group_space, per_in])
        cx.define(od[1], PROD, [group_space, per_out])
        cx.unify(wd[0], xd[1] if transposed else od[1])
    if b is not None:
        cx.unify(cx.dims(b)[0], od[1])


def rewrite_conv_groups(node, rx):
    transposed, index, groups = _conv_parts(node)
    if groups == 1:
        return
    xd, wd, od = rx.dims(node.args[0]), rx.dims(node.args[1]), rx.dims(node)
    channels = od[1] if transposed else xd[1]
    set_arg(node, index, "groups", rx.new_size(channels) // rx.new_size(wd[1]))


@rule("linear")
def comb_linear(node, cx):
    xd, wd, od = cx.dims(node.args[0]), cx.dims(node.args[1]), cx.dims(node)
    cx.unify(xd[-1], wd[1])
    cx.unify(od[-1], wd[0])
    cx.unify_all(od[:-1], xd[:-1])
    b = arg(node, 2, "bias")
    if b is not None:
        cx.unify(cx.dims(b)[0], od[-1])


@rule("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training")
def comb_channel_norm(node, cx):
    """Per-channel statistics and affine parameters on dim 1."""
    xd = cx.dims(node.args[0])
    for param in node.args[1:5]:
        if param is not None:
            cx.unify(cx.dims(param)[0], xd[1])
    out = cx.dims(node)
    cx.unify_all(out[0] if isinstance(out[0], list) else out, xd)


def rewrite_layer_norm(node, rx):
    xd = rx.dims(node.args[0])
    k = len(node.args[1])
    set_arg(node, 1, "normalized_shape", [rx.new_size(d) for d in xd[-k:]])


@rule("layer_norm", rewrite=rewrite_layer_norm)
def comb_layer_norm(node, cx):
    """Statistics over the last k dims. As in every structured pruner, removing
    channels there changes the statistics the kept channels see."""
    xd = cx.dims(node.args[0])
    k = len(node.args[1])
    for param in (arg(node, 2, "weight"), arg(node, 3, "bias")):
        if param is not None:
            cx.unify_all(cx.dims(param), xd[-k:])
    cx.unify_all(cx.dims(node), xd)


def rewrite_group_norm(node, rx):
    per_group = rx.memo.get(node.name)
    if per_group is not None:
        set_arg(node, 1, "num_groups", rx.new_size(rx.dims(node.args[0])[1]) // rx.new_size(per_group))


@rule("group_norm", rewrite=rewrite_group_norm)
def comb_group_norm(node, cx):
    """Channels = groups x channels per group; whole groups, or the same
    channels of every group, can go."""
    xd = cx.dims(node.args[0])
    groups = node.args[1]
    if groups > 1:
        per_group = cx.new(cx.size(xd[1]) // groups)
        cx.define(xd[1], PROD, [cx.new(groups), per_group])
        cx.memo[node.name] = per_group
    for param in (arg(node, 2, "weight"), arg(node, 3, "bias")):
        if param is not None:
            cx.unify(cx.dims(param)[0], xd[1])
    cx.unify_all(cx.dims(node), xd)


@rule("embedding")
def comb_embedding(node, cx):
    wd, idx, out = cx.dims(node.args[0]), cx.dims(node.args[1]), cx.dims(node)
    cx.freeze([wd[0]], "embedding rows are looked up by index")
    cx.unify_all(out[:-1], idx)
    cx.unify(out[-1], wd[1])


# -- products of activations ---------------------------------------------------------------

@rule("matmul", "bmm", "mm")
def comb_matmul(node, cx):
    a, b, out = cx.dims(node.args[0]), cx.dims(node.args[1]), cx.dims(node)
    if len(a) < 2 or len(b) < 2:
        cx.freeze_node(node, "matmul with a 1-D operand")
        return
    cx.unify(a[-1], b[-2])
    cx.unify(out[-2], a[-2])
    cx.unify(out[-1], b[-1])
    cx.broadcast(out[:-2], a[:-2])
    cx.broadcast(out[:-2], b[:-2])


def rewrite_sdpa(node, rx):
    """The default scale is 1/sqrt(head_dim): keep the original one."""
    q = node.args[0]
    if arg(node, 6, "scale") is None:
        old = rx.old_size(rx.dims(q)[-1])
        if rx.new_size(rx.dims(q)[-1]) != old:
            set_arg(node, 6, "scale", 1.0 / math.sqrt(old))


@rule("scaled_dot_product_attention", rewrite=rewrite_sdpa)
def comb_sdpa(node, cx):
    q, k, v, out = (cx.dims(a) for a in (*node.args[:3], node))
    cx.unify(q[-1], k[-1])  # query/key head dim
    cx.unify(k[-2], v[-2])  # source tokens
    cx.unify(out[-2], q[-2])
    cx.unify(out[-1], v[-1])
    for operand in (q, k, v):
        cx.broadcast(out[:-2], operand[:-2])
    mask = arg(node, 3, "attn_mask")
    if mask is not None:  # broadcasts against (..., L, S)
        cx.broadcast(out[:-1] + [k[-2]], cx.dims(mask))


# -- concatenation and splitting -------------------------------------------------------------

@rule("cat")
def comb_cat(node, cx):
    out = cx.dims(node)
    dim = _dim(arg(node, 1, "dim", 0), len(out))
    parts = [cx.dims(t) for t in node.args[0]]
    parts = [p for p in parts if len(p) == len(out)]  # legacy empty 1-D tensors
    cx.define(out[dim], CAT, [p[dim] for p in parts])
    for p in parts:
        cx.unify_all(out[:dim] + out[dim + 1:], p[:dim] + p[dim + 1:])


@rule("stack")
def comb_stack(node, cx):
    out = cx.dims(node)
    dim = _dim(arg(node, 1, "dim", 0), len(out))
    cx.freeze([out[dim]], "stacked dim")
    for t in node.args[0]:
        cx.unify_all(out[:dim] + out[dim + 1:], cx.dims(t))


def _split_dim(node, ndim):
    name = node.target._opname
    index = 1 if name == "unbind" else 2
    return _dim(arg(node, index, "dim", 0), ndim)


def rewrite_split(node, rx):
    """Pieces may shrink unequally: every split becomes split_with_sizes."""
    if node.target is aten.unbind.int:
        return
    x = node.args[0]
    xd = rx.dims(x)
    dim = _split_dim(node, len(xd))
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


@rule("split.Tensor", "split_with_sizes", "chunk", "unbind.int", "unsafe_split.Tensor",
      "tensor_split.sections", rewrite=rewrite_split)
def comb_split(node, cx):
    xd = cx.dims(node.args[0])
    dim = _split_dim(node, len(xd))
    pieces = cx.dims(node)
    if node.target is aten.unbind.int:
        cx.freeze([xd[dim]], "unbound dim")
        for piece in pieces:
            cx.unify_all(piece, xd[:dim] + xd[dim + 1:])
        return
    cx.define(xd[dim], CAT, [p[dim] for p in pieces])
    for p in pieces:
        cx.unify_all(p[:dim] + p[dim + 1:], xd[:dim] + xd[dim + 1:])


def _slice_bounds(node, size):
    start = arg(node, 2, "start", None)
    end = arg(node, 3, "end", None)
    start = 0 if start is None else start + size if start < 0 else min(start, size)
    end = size if end is None else end + size if end < 0 else min(end, size)
    return start, max(start, end)


def rewrite_slice(node, rx):
    xd = rx.dims(node.args[0])
    dim = _dim(arg(node, 1, "dim", 0), len(xd))
    mask = rx.kept_mask(xd[dim])
    if mask is None or mask.all():
        return
    start, end = _slice_bounds(node, len(mask))
    new_start = int(mask[:start].sum())
    set_arg(node, 1, "dim", dim)
    set_arg(node, 2, "start", new_start)
    set_arg(node, 3, "end", new_start + int(mask[start:end].sum()))


@rule("slice.Tensor", rewrite=rewrite_slice)
def comb_slice(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    dim = _dim(arg(node, 1, "dim", 0), len(xd))
    cx.unify_all(out[:dim] + out[dim + 1:], xd[:dim] + xd[dim + 1:])
    size = cx.size(xd[dim])
    if not isinstance(size, int) or arg(node, 4, "step", 1) != 1:
        cx.freeze([xd[dim], out[dim]], "strided or dynamic slice")
        return
    start, end = _slice_bounds(node, size)
    cx.define(xd[dim], CAT, [cx.new(start), out[dim], cx.new(size - end)])


@rule("select.int", "index_select")
def comb_select(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    dim = _dim(node.args[1], len(xd))
    cx.freeze([xd[dim]], "indexed dim")
    if node.target is aten.select.int:
        cx.unify_all(out, xd[:dim] + xd[dim + 1:])
    else:
        cx.freeze([out[dim]], "indexed dim")
        cx.unify_all(out[:dim] + out[dim + 1:], xd[:dim] + xd[dim + 1:])


@rule("index.Tensor")
def comb_index(node, cx):
    """x[..., idx, ...] with one index tensor: the indexed dim is frozen and the
    index's dims take its place (relative position bias tables)."""
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    indices = node.args[1]
    used = [i for i, t in enumerate(indices) if t is not None]
    if len(used) != 1:
        cx.freeze_node(node, "advanced indexing with several index tensors")
        return
    p = used[0]
    idx = cx.dims(indices[p])
    cx.freeze([xd[p]], "indexed dim")
    cx.unify_all(out, xd[:p] + idx + xd[p + 1:])


# -- layout: permutes and reshapes ---------------------------------------------------------

@rule("permute")
def comb_permute(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    cx.unify_all(out, [xd[_dim(p, len(xd))] for p in node.args[1]])


@rule("transpose.int", "t", "swapaxes", "numpy_T")
def comb_transpose(node, cx):
    xd = cx.dims(node.args[0])
    a, b = (node.args[1:3] if len(node.args) >= 3 else (0, 1)) if len(xd) > 1 else (0, 0)
    order = list(range(len(xd)))
    order[_dim(a, len(xd))], order[_dim(b, len(xd))] = order[_dim(b, len(xd))], order[_dim(a, len(xd))]
    cx.unify_all(cx.dims(node), [xd[i] for i in order])


def rewrite_shape_arg(index, name):
    """Rewrite an int-list size argument from the result's new dims."""
    def rewrite(node, rx):
        out = rx.dims(node)
        shape = list(arg(node, index, name))
        offset = len(out) - len(shape)  # expand may add leading dims
        for i, s in enumerate(shape):
            if isinstance(s, int) and s != -1:
                shape[i] = rx.new_size(out[i + offset])
        set_arg(node, index, name, shape)
    return rewrite


def rewrite_unflatten(node, rx):
    out = rx.dims(node)
    dim = _dim(node.args[1], len(out) - len(node.args[2]) + 1)
    sizes = list(node.args[2])
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            sizes[i] = rx.new_size(out[dim + i])
    set_arg(node, 2, "sizes", sizes)


def comb_reshape(node, cx):
    """Match input and result dims into minimal groups of equal product; a
    group of one input and several results (or the reverse) is a product."""
    x = node.args[0]
    xd, out = cx.dims(x), cx.dims(node)
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


rule("view", "reshape", "_unsafe_view", rewrite=rewrite_shape_arg(1, "shape"))(comb_reshape)
rule("unflatten.int", rewrite=rewrite_unflatten)(comb_reshape)
rule("flatten.using_ints", "squeeze", "squeeze.dim", "squeeze.dims", "unsqueeze", "reshape_as",
     "view_as", "_reshape_alias")(comb_reshape)


@rule("expand", rewrite=rewrite_shape_arg(1, "size"))
def comb_expand(node, cx):
    cx.broadcast(cx.dims(node), cx.dims(node.args[0]))


@rule("expand_as")
def comb_expand_as(node, cx):
    out = cx.dims(node)
    cx.broadcast(out, cx.dims(node.args[0]))
    cx.unify_all(out, cx.dims(node.args[1]))


@rule("repeat")
def comb_repeat(node, cx):
    xd, out = cx.dims(node.args[0]), cx.dims(node)
    repeats = node.args[1]
    offset = len(out) - len(xd)
    cx.freeze(out[:offset], "repeated dim")
    for i, (d, r) in enumerate(zip(xd, repeats[offset:])):
        if r == 1:
            cx.unify(out[i + offset], d)
        else:
            cx.freeze([d, out[i + offset]], "repeated dim")


# -- spatial ops: pooling, resizing, padding ------------------------------------------------

def spatial(k):
    """An op over the last k dims: those are frozen, the leading ones pass through."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        n = len(node.args[1]) // 2 if k is None else k
        outs = cx.dims(node)
        for out in (outs if isinstance(outs[0], list) else [outs]):
            cx.freeze(xd[len(xd) - n:] + out[len(out) - n:], SPATIAL)
            cx.unify_all(out[:len(out) - n], xd[:len(xd) - n])
    return comb


for _k in (1, 2, 3):
    rule(f"max_pool{_k}d", f"avg_pool{_k}d", f"adaptive_avg_pool{_k}d", f"adaptive_max_pool{_k}d",
         f"max_pool{_k}d_with_indices", f"upsample_nearest{_k}d", f"upsample_nearest{_k}d.vec",
         f"reflection_pad{_k}d", f"replication_pad{_k}d")(spatial(_k))
rule("upsample_bilinear2d", "upsample_bilinear2d.vec", "upsample_bicubic2d", "upsample_bicubic2d.vec",
     "_upsample_bilinear2d_aa", "_upsample_bilinear2d_aa.vec", "upsample_linear1d",
     "upsample_linear1d.vec", "upsample_trilinear3d", "upsample_trilinear3d.vec")(
    lambda node, cx: spatial(len(node.meta["val"].shape) - 2)(node, cx))
rule("pad", "constant_pad_nd")(spatial(None))


# -- reductions and ops along named dims ----------------------------------------------------

REDUCE_DIMS_ARG = {"linalg_vector_norm": 2, "norm": 2}


def _reduced_dims(node, ndim):
    index = REDUCE_DIMS_ARG.get(node.target._opname, 1)
    dims = arg(node, index, "dim", None)
    if dims is None or dims == []:
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(_dim(d, ndim) for d in dims)


@rule("mean.dim", "sum.dim_IntList", "amax", "amin", "max.dim", "min.dim", "var.correction",
      "var.dim", "std.correction", "std.dim", "linalg_vector_norm", "norm.ScalarOpt_dim",
      "logsumexp", "prod.dim_int", "argmax", "argmin", "mean.default", "sum.default", "any.dim",
      "all.dim")
def comb_reduce(node, cx):
    """Reduced dims are frozen: a mean or sum over fewer channels is another function."""
    xd = cx.dims(node.args[0])
    full = node.target in (aten.mean.default, aten.sum.default)
    reduced = set(range(len(xd)) if full else _reduced_dims(node, len(xd)))
    cx.freeze([xd[d] for d in reduced], f"reduced by {node.target._opname}")
    kept = [d for i, d in enumerate(xd) if i not in reduced]
    outs = cx.dims(node)
    for out in (outs if outs and isinstance(outs[0], list) else [outs]):
        if len(out) == len(xd):  # keepdim
            out = [d for i, d in enumerate(out) if i not in reduced]
        cx.unify_all(out, kept)


def along(index, name):
    """An op that works along its named dim(s): those are frozen."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        dims = arg(node, index, name, None)
        dims = list(range(len(xd))) if dims in (None, []) else [dims] if isinstance(dims, int) else dims
        cx.freeze([xd[_dim(d, len(xd))] for d in dims], f"dim used by {node.target._opname}")
        outs = cx.dims(node)
        for out in (outs if outs and isinstance(outs[0], list) else [outs]):
            cx.unify_all(out, xd)
    return comb


rule("softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "cumsum", "cumprod", "sort",
     "topk", "flip")(along(1, "dim"))
rule("roll")(along(2, "dims"))


# -- factories: tensors whose sizes are written as ints --------------------------------------

FACTORY_SIZE_ARG = {"new_zeros": 1, "new_ones": 1, "new_empty": 1, "new_full": 1}


def rewrite_factory(node, rx):
    rewrite_shape_arg(FACTORY_SIZE_ARG.get(node.target._opname, 0), "size")(node, rx)


@rule("zeros", "ones", "full", "rand", "randn", "empty.memory_format", "new_zeros", "new_ones",
      "new_empty", "new_full", rewrite=rewrite_factory)
def comb_factory(node, cx):
    """Fresh dims: consumers tie them to the rest; the ints follow on rewrite."""
