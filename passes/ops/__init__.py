"""The op table: one entry per ATen op (or per overloads sharing a schema shape)
saying everything cpdfx knows about it; see _table.py for the record.

Split by op family, as torch's DTensor op registries are:
  _pointwise  elementwise ops, dropout, metadata ops, tuple indexing
  _conv       convolutions
  _norm       batch, instance, layer and group norms
  _matmul     linear, matmul, attention, embedding
  _view       permutes, reshapes, expands, cat/split/slice/select/index
  _reduction  reductions and ops along a dim (softmax, sort, topk, ...)
  _spatial    pooling, resizing, padding
  _factory    zeros, ones, ... with int sizes

An op with no entry freezes every dim it touches: less compression, never a
wrong graph. Adding an op is one entry here plus one test in tests/passes/.
"""
from ._table import OPS, SPATIAL, Op, arg, dim_index, has_arg, op, resolve_op, schema_arguments, set_arg
from ._conv import transposed
from . import _conv, _factory, _matmul, _norm, _pointwise, _reduction, _spatial, _view  # noqa: F401  (they register)

__all__ = ["OPS", "Op", "SPATIAL", "arg", "dim_index", "has_arg", "op", "resolve_op", "schema_arguments", "set_arg",
           "transposed"]
