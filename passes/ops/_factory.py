"""Factories: tensors whose sizes are written as ints."""
from __future__ import annotations

from ._table import op
from ._view import rewrite_shape_arg


def comb_factory(node, cx):
    """Fresh dims: consumers tie them to the rest; the ints follow on rewrite."""


op("zeros", "ones", "full", "rand", "randn", "empty.memory_format", "new_zeros", "new_ones", "new_empty",
   "new_full", rewrite=rewrite_shape_arg("size"), reads=("size",))(comb_factory)
