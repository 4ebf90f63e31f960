"""Normalisation layers: per-channel parameters and statistics; and norms
written out in primitives, whose statistics need not freeze the channels."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..spaces import PROD
from ._table import arg, op, set_arg

aten = torch.ops.aten

CHANNEL_NORM = ("input", "weight", "bias", "running_mean", "running_var")


def comb_channel_norm(node, cx):
    """Per-channel statistics and affine parameters on dim 1."""
    xd = cx.dims(arg(node, "input"))
    for name in CHANNEL_NORM[1:]:
        param = arg(node, name)
        if param is not None:
            cx.unify(cx.dims(param)[0], xd[1])
    out = cx.dims(node)
    cx.unify_all(out[0] if isinstance(out[0], list) else out, xd)


# batch_norm(..., training, momentum, ...): set_mode flips `training`; batch-norm
# re-estimation runs it in training mode with momentum 1 to read each batch's statistics.
op("batch_norm", mode=("training", False), scale="weight", running_stats=("running_mean", "running_var", "momentum"),
   latency="elements", reads=CHANNEL_NORM)(comb_channel_norm)
op("instance_norm", "_native_batch_norm_legit_no_training", scale="weight", latency="elements",
   reads=CHANNEL_NORM)(comb_channel_norm)


def rewrite_layer_norm(node, rx):
    xd = rx.dims(arg(node, "input"))
    k = len(arg(node, "normalized_shape"))
    set_arg(node, "normalized_shape", [rx.new_size(d) for d in xd[-k:]])


@op("layer_norm", rewrite=rewrite_layer_norm, scale="weight", latency="elements",
    reads=("input", "normalized_shape", "weight", "bias"))
def comb_layer_norm(node, cx):
    """Statistics over the last k dims. As in every structured pruner, removing
    channels there changes the statistics the kept channels see."""
    xd = cx.dims(arg(node, "input"))
    k = len(arg(node, "normalized_shape"))
    for param in (arg(node, "weight"), arg(node, "bias")):
        if param is not None:
            cx.unify_all(cx.dims(param), xd[-k:])
    cx.unify_all(cx.dims(node), xd)


def rewrite_group_norm(node, rx):
    per_group = rx.memo.get(node.name)
    if per_group is not None:
        set_arg(node, "num_groups", rx.new_size(rx.dims(arg(node, "input"))[1]) // rx.new_size(per_group))


@op("group_norm", rewrite=rewrite_group_norm, scale="weight", latency="elements",
    reads=("input", "num_groups", "weight", "bias"))
def comb_group_norm(node, cx):
    """Channels = groups x channels per group; whole groups, or the same
    channels of every group, can go."""
    xd = cx.dims(arg(node, "input"))
    groups = arg(node, "num_groups")
    if groups > 1:
        per_group = cx.new(cx.size(xd[1]) // groups)
        cx.define(xd[1], PROD, [cx.new(groups), per_group])
        cx.memo[node.name] = per_group
    for param in (arg(node, "weight"), arg(node, "bias")):
        if param is not None:
            cx.unify(cx.dims(param)[0], xd[1])
    cx.unify_all(cx.dims(node), xd)


# -- norms written out in primitives --------------------------------------------------------------
# x * rsqrt(x.pow(2).mean(1, keepdim=True) + eps), or ConvNeXt's channels-first layer norm: a statistic
# taken over x's channels whose value only comes back into x's own normalisation is a norm's, and pruning
# those channels is the approximation aten.layer_norm's rule makes; a statistic that goes anywhere else is a
# feature, and fewer channels would change it (the reduction's rule freezes them). STEPS: what a statistic
# may pass through (eps, square roots, E[x^2] - u^2); RETURNS: where it meets x again; CARRIERS: what carries
# x's channels on (x - u, x^2).
STEPS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.mul.Tensor,
         aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.sqrt.default,
         aten.rsqrt.default, aten.reciprocal.default}
RETURNS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
CARRIERS = {*RETURNS, aten.pow.Tensor_Scalar}


def _full(t, reduced, ndim) -> bool:
    """Whether t (aligned from the right to a tensor of ndim dims) has more
    than one position along a reduced dim; a statistic has one."""
    shape = t.meta["val"].shape if isinstance(t, fx.Node) and isinstance(t.meta.get("val"), torch.Tensor) else ()
    offset = len(shape) - ndim
    return any(0 <= d + offset < len(shape) and not (is_concrete_int(shape[d + offset]) and shape[d + offset] == 1)
               for d in reduced)


def _source(t, reduced, ndim):
    """The tensor t is made of by steps with statistics (x - u, (x - u) / s)
    or of itself alone (x^2): the x whose channels t carries."""
    while isinstance(t, fx.Node) and t.target in CARRIERS:
        full = {a for a in t.all_input_nodes if _full(a, reduced, ndim)}
        if len(full) != 1:
            break
        t = full.pop()
    return t


def normalises(node, reduced) -> bool:
    """Whether node, a statistic over the dims `reduced` kept as size 1, is a
    norm's: its value goes only through STEPS while it stays a statistic
    (one position along the reduced dims), and from them only into RETURNS
    whose full operands carry the tensor it was taken of."""
    ndim = node.meta["val"].dim()
    source = _source(node.args[0], reduced, ndim)
    todo, seen = [node], set()
    while todo:
        for user in todo.pop().users:
            if user in seen:
                continue
            seen.add(user)
            full = [a for a in user.all_input_nodes if _full(a, reduced, ndim)]
            if not full and user.target in STEPS:
                todo.append(user)
            elif not (full and user.target in RETURNS and all(_source(a, reduced, ndim) is source for a in full)):
                return False
    return bool(seen)
