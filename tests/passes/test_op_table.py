"""The op table itself: one entry per op, every argument it reads is in the
schema of every overload it covers, and reads go through declared names."""
import operator

import pytest
import torch

from cpdfx.passes import ops

aten = torch.ops.aten
OVERLOADS = sorted(((t, e) for t, e in ops.OPS.items() if isinstance(t, torch._ops.OpOverload)), key=lambda p: str(p[0]))


@pytest.mark.parametrize("target, entry", OVERLOADS, ids=[str(t) for t, _ in OVERLOADS])
def test_every_name_an_entry_reads_is_in_the_schema(target, entry):
    names = {a.name for a in target._schema.arguments}
    missing = [n for n in entry.names if n not in names]
    assert not missing, f"{target} has no argument {missing}; its schema is {target._schema}"
    if entry.mode is not None:
        assert isinstance(entry.mode[1], (bool, float))
    assert entry.latency in (None, "conv", "linear", "elements")


def test_each_op_has_one_entry():
    with pytest.raises(ValueError, match="two entries"):
        ops.op("relu")(lambda node, cx: None)
    assert operator.getitem in ops.OPS


def test_the_table_answers_what_other_code_asked_its_own_lists():
    assert {t for t, e in ops.OPS.items() if e.macs} >= {aten.conv2d.default, aten.linear.default, aten.matmul.default,
                                                         aten.scaled_dot_product_attention.default}
    assert ops.OPS[aten.batch_norm.default].mode == ("training", False)
    assert ops.OPS[aten.dropout.default].mode == ("train", False)
    assert ops.OPS[aten.layer_norm.default].scale == "weight"
    assert ops.OPS[aten.conv2d.default].latency == "conv" and ops.OPS[aten.conv2d.padding].latency is None
    assert ops.OPS[aten.topk.default].reads == ("dim",)
    priced = {t for t, e in ops.OPS.items() if e.latency == "elements"}  # work of their own in an exported model
    assert {aten.gelu.default, aten.add.Tensor, aten.layer_norm.default, aten.batch_norm.default,
            aten._softmax.default, aten.permute.default, aten.cat.default, aten.max_pool2d.default,
            aten.upsample_bilinear2d.vec} <= priced
    assert priced.isdisjoint({aten.view.default, aten.reshape.default, aten.expand.default, aten.slice.Tensor,
                              aten.dropout.default, aten.clone.default, aten.t.default})


class FakeNode:
    def __init__(self, target, args, kwargs=None):
        self.target, self.args, self.kwargs = target, args, kwargs or {}


def test_arguments_are_read_and_set_by_name():
    node = FakeNode(aten.topk.default, ("x", 5))
    assert ops.arg(node, "dim") == -1  # the schema's default, not k
    ops.set_arg(node, "dim", 1)
    assert node.args == ("x", 5) and node.kwargs == {"dim": 1} and ops.arg(node, "dim") == 1
    conv = FakeNode(aten.conv2d.default, ("x", "w", None, [1, 1], [0, 0], [1, 1], 8))
    assert ops.arg(conv, "groups") == 8 and not ops.transposed(conv)
    with pytest.raises(KeyError, match="no argument 'transposed'"):
        ops.arg(conv, "transposed")
    with pytest.raises(KeyError, match="without declaring it"):
        ops.arg(node, "largest")  # in topk's schema, but its entry does not read it
