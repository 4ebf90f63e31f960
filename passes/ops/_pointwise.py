"""Elementwise ops, dropout, metadata ops and tuple indexing."""
from __future__ import annotations

import operator

from ._table import op

ELEMENTWISE = """
relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish hardswish_
hardsigmoid hardsigmoid_ leaky_relu leaky_relu_ elu elu_ mish mish_ softplus prelu
bernoulli bernoulli_ bernoulli.p
neg exp log sqrt rsqrt abs floor ceil round sign reciprocal erf sin cos square
clamp clamp_ clamp_min clamp_max
add.Tensor add_.Tensor add.Scalar sub.Tensor sub_.Tensor sub.Scalar rsub.Scalar rsub.Tensor
mul.Tensor mul_.Tensor mul.Scalar div.Tensor div_.Tensor div.Scalar div.Tensor_mode
pow.Tensor_Scalar pow.Tensor_Tensor maximum minimum where.self masked_fill.Scalar masked_fill.Tensor
masked_fill_.Scalar eq.Tensor eq.Scalar ne.Tensor ne.Scalar gt.Tensor gt.Scalar lt.Tensor lt.Scalar
ge.Tensor ge.Scalar le.Tensor le.Scalar logical_and logical_or logical_not bitwise_and bitwise_or
lerp.Scalar addcmul addcdiv
""".split()
# the same broadcast, but no work of their own in an exported model (copies, casts and fills onnxruntime folds
# or elides), so not priced by the latency model
COPIES = """
clone contiguous detach alias lift_fresh_copy _to_copy to.dtype to.dtype_layout to.device type_as copy_
fill_.Scalar zeros_like ones_like empty_like full_like rand_like randn_like
""".split()


@op(*ELEMENTWISE, latency="elements")
def comb_broadcast(node, cx):
    """Operands broadcast against the result, aligned from the right."""
    out = cx.dims(node)
    for operand in cx.tensor_args(node):
        cx.broadcast(out, operand)


op(*COPIES)(comb_broadcast)
# dropout(input, p, train): export bakes the mode in; set_mode flips `train`
op("dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", mode=("train", False))(comb_broadcast)


@op("_assert_tensor_metadata", "sym_size.int", "sym_numel", "sym_stride.int", "_assert_scalar",
    "sym_constrain_range_for_size", "_assert_async.msg", "scalar_tensor")
def comb_nothing(node, cx):
    """Reads metadata or makes a tensor with no channel dims."""


@op(operator.getitem)
def comb_getitem(node, cx):
    """One result of an op with several (a Python subscript, not an ATen op)."""
    source, index = node.args
    dims = cx.dims(source)
    if isinstance(index, int) and dims is not None and isinstance(dims[index], list):
        cx.unify_all(cx.dims(node), dims[index])
    else:
        cx.freeze_node(node, "indexing a tensor with a Python subscript")
