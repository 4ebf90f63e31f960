"""Convolutions: every overload torch.export leaves in a graph."""
from __future__ import annotations

from ..spaces import PROD
from ._table import SPATIAL, arg, has_arg, op, set_arg

CONV = ("input", "weight", "bias", "groups")


def transposed(node) -> bool:
    """aten.convolution says so in an argument; the conv_transpose ops by name."""
    if has_arg(node, "transposed"):
        return bool(arg(node, "transposed"))
    return "transpose" in node.target._opname


def comb_conv(node, cx):
    x, w, b = arg(node, "input"), arg(node, "weight"), arg(node, "bias")
    xd, wd, od = cx.dims(x), cx.dims(w), cx.dims(node)
    is_transposed, groups = transposed(node), arg(node, "groups")
    cx.unify(od[0], xd[0])
    cx.freeze(xd[2:] + wd[2:] + od[2:], SPATIAL)
    in_w, out_w = (wd[0], wd[1]) if is_transposed else (wd[1], wd[0])
    if groups == 1:
        cx.unify(xd[1], in_w)
        cx.unify(od[1], out_w)
    else:  # channels = groups x per-group channels, on both sides, sharing the groups space
        group_space = cx.new(groups)
        per_in = in_w if not is_transposed else cx.new(cx.size(xd[1]) // groups)
        per_out = out_w if is_transposed else cx.new(cx.size(od[1]) // groups)
        cx.define(xd[1], PROD, [group_space, per_in])
        cx.define(od[1], PROD, [group_space, per_out])
        cx.unify(wd[0], xd[1] if is_transposed else od[1])
    if b is not None:
        cx.unify(cx.dims(b)[0], od[1])


def rewrite_conv_groups(node, rx):
    """groups = channels / per-group channels of the weight, both after pruning."""
    if arg(node, "groups") == 1:
        return
    xd, wd, od = rx.dims(arg(node, "input")), rx.dims(arg(node, "weight")), rx.dims(node)
    channels = od[1] if transposed(node) else xd[1]
    set_arg(node, "groups", rx.new_size(channels) // rx.new_size(wd[1]))


def conv_macs(node):
    """Each output position (each input position, transposed) times one weight slice."""
    w = arg(node, "weight")
    side = arg(node, "input") if transposed(node) else node
    return [[(side, d) for d in range(side.meta["val"].dim())] + [(w, d) for d in range(1, w.meta["val"].dim())]]


# The latency model tables the 2-D convs with int paddings (it builds them as ONNX Conv).
LAYER = dict(rewrite=rewrite_conv_groups, macs=conv_macs, reads=(*CONV, "stride", "padding", "dilation"))
op("conv1d", "conv2d", "conv3d", latency="conv", **LAYER)(comb_conv)
op("convolution", latency="conv", **{**LAYER, "reads": (*LAYER["reads"], "transposed")})(comb_conv)
# padding="same"/"valid" is a string: not tabled
op("conv1d.padding", "conv2d.padding", "conv3d.padding", **LAYER)(comb_conv)
op("conv_transpose1d", "conv_transpose1d.input", "conv_transpose2d.input", "conv_transpose3d.input", **LAYER)(comb_conv)
