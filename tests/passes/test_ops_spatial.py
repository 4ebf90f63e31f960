"""Pooling, resizing and padding: spatial dims frozen, channels pass through."""
import pytest
import torch
import torch.nn.functional as F

from opcheck import Between, aten, check_op

CASES = {
    "max_pool2d": (lambda y: F.max_pool2d(y, 2), aten.max_pool2d.default),
    "avg_pool2d": (lambda y: F.avg_pool2d(y, 2), aten.avg_pool2d.default),
    "adaptive_avg_pool2d": (lambda y: F.adaptive_avg_pool2d(y, 3), aten.adaptive_avg_pool2d.default),
    "nearest": (lambda y: F.interpolate(y, scale_factor=2), aten.upsample_nearest2d.vec),
    "bilinear": (lambda y: F.interpolate(y, scale_factor=2, mode="bilinear"), aten.upsample_bilinear2d.vec),
    "pad": (lambda y: F.pad(y, (1, 2, 0, 1)), aten.pad.default),
    "reflect": (lambda y: F.pad(y, (1, 1, 1, 1), mode="reflect"), aten.pad.default),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_spatial_op_prunes_exactly(name):
    fn, op = CASES[name]
    check_op(Between(fn), torch.randn(2, 3, 8, 8), [op])
