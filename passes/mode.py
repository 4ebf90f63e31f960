"""Switch a captured graph between train and eval behaviour.

torch.export bakes the mode into the graph: `batch_norm(..., training, ...)`,
`dropout(x, p, train)`, attention dropout, and the `num_batches_tracked += 1`
of every batch norm. This pass flips those arguments in place, also inside
the sub-graphs a wrapper runs (comb.Inline: a `with torch.no_grad()` block);
the train-time values are remembered on the nodes so that the switch can be
undone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .comb import Inline
from .ops import OPS, arg, set_arg

aten = torch.ops.aten

TRAIN_VALUE = "cpdfx_train_value"


def _is_batch_counter(node: fx.Node, inline: Inline) -> bool:
    """`num_batches_tracked.add_(1)`: counted in train mode only (in a
    sub-graph, on the buffer its call passes in)."""
    if node.target is not aten.add_.Tensor:
        return False
    counter = inline.origin(node.args[0])
    return (isinstance(counter, fx.Node) and counter.op == "get_attr"
            and str(counter.target).endswith("num_batches_tracked"))


CAPTURED_TRAINING = "cpdfx_captured_training"


def _train_value(node, name, eval_value, captured_training):
    """The argument's train-mode value: as captured, or for a graph captured in
    eval mode, True for the on/off flags (dropout rates stay as they were)."""
    value = arg(node, name, eval_value)
    return True if (not captured_training and isinstance(eval_value, bool)) else value


def set_mode(gm: fx.GraphModule, training: bool) -> fx.GraphModule:
    """Make gm behave as in train (True) or eval (False) mode; returns gm."""
    captured_training = gm.meta.setdefault(CAPTURED_TRAINING, gm.training)
    inline = Inline(gm)
    for node in inline.nodes:
        if node.op != "call_function":
            continue
        entry = OPS.get(node.target)
        if entry is not None and entry.running_stats and arg(node, entry.running_stats[0]) is None:
            continue  # no running statistics: batch statistics in both modes
        if entry is not None and entry.mode is not None:
            name, eval_value = entry.mode  # the op table says which argument, and its eval value
            if TRAIN_VALUE not in node.meta:
                node.meta[TRAIN_VALUE] = _train_value(node, name, eval_value, captured_training)
            set_arg(node, name, node.meta[TRAIN_VALUE] if training else eval_value)
        elif _is_batch_counter(node, inline):
            node.meta.setdefault(TRAIN_VALUE, node.args[1])
            node.args = (node.args[0], node.meta[TRAIN_VALUE] if training else 0)
    for module in inline.modules:
        module.recompile()
    torch.nn.Module.train(gm, training)
    return gm
