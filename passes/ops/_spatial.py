"""Spatial ops: pooling, resizing, padding."""
from __future__ import annotations

from ._table import SPATIAL, arg, op


def spatial(k=None):
    """An op over the last k dims (k=None: as many as the pad list covers, two
    ints each): those are frozen, the leading ones pass through."""
    def comb(node, cx):
        xd = cx.dims(node.args[0])
        n = len(arg(node, "pad")) // 2 if k is None else k
        outs = cx.dims(node)
        for out in (outs if isinstance(outs[0], list) else [outs]):
            cx.freeze(xd[len(xd) - n:] + out[len(out) - n:], SPATIAL)
            cx.unify_all(out[:len(out) - n], xd[:len(xd) - n])
    return comb


for _k in (1, 2, 3):
    op(f"max_pool{_k}d", f"avg_pool{_k}d", f"adaptive_avg_pool{_k}d", f"adaptive_max_pool{_k}d",
       f"max_pool{_k}d_with_indices", f"upsample_nearest{_k}d", f"upsample_nearest{_k}d.vec",
       f"reflection_pad{_k}d", f"replication_pad{_k}d", latency="elements")(spatial(_k))


@op("upsample_bilinear2d", "upsample_bilinear2d.vec", "upsample_bicubic2d", "upsample_bicubic2d.vec",
    "_upsample_bilinear2d_aa", "_upsample_bilinear2d_aa.vec", "upsample_linear1d", "upsample_linear1d.vec",
    "upsample_trilinear3d", "upsample_trilinear3d.vec", latency="elements")
def comb_interpolate(node, cx):
    """Every dim after batch and channels is resized."""
    spatial(len(node.meta["val"].shape) - 2)(node, cx)


op("pad", "constant_pad_nd", latency="elements", reads=("pad",))(spatial())
