"""Normalisation layers: per-channel parameters and statistics."""
from __future__ import annotations

from ..spaces import PROD
from ._table import arg, op, set_arg

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
