"""Capture a model as a torch.fx graph through torch.export."""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import types

import torch
import torch.fx as fx
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils import _pytree as pytree

from .passes.mode import CAPTURED_TRAINING, set_mode

CAPTURED = "cpdfx_captured"


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def is_captured(model) -> bool:
    return isinstance(model, fx.GraphModule) and model.meta.get(CAPTURED, False)


def capture(model: torch.nn.Module, example_inputs, dynamic_batch: bool = True) -> fx.GraphModule:
    """The model as a flat graph of ATen ops (the torch.export training IR).

    The first dim of every tensor input is the batch and is left dynamic (unless
    dynamic_batch=False); the outputs keep the model's own structure (tensor,
    tuple, dict, transformers ModelOutput); the graph behaves in the mode the
    model was in, and `.train()` / `.eval()` on the result switch it
    (passes.set_mode). The graph owns a copy of the parameters: training it
    leaves the model as it was. Raises CaptureError when torch.export cannot
    trace it."""
    if is_captured(model):
        return model
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"cpdfx captures torch.nn.Module instances; got {type(model).__name__}.")
    args = as_tuple(example_inputs)
    args = pytree.tree_map(_at_least_two, args) if dynamic_batch else args
    dynamic_shapes = _batch_dynamic(args) if dynamic_batch else None
    printed = io.StringIO()  # on failure torch.export prints the partial graph to stderr
    try:
        with contextlib.redirect_stderr(printed):
            program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as err:  # torch.export raises many kinds; all mean "not capturable"
        raise CaptureError(_explain(model, err, dynamic_batch)) from err
    sys.stderr.write(printed.getvalue())
    # ep.module() shares the model's tensors: training the graph would train the
    # model too (and a teacher distilling it); the graph gets its own copy.
    gm = copy.deepcopy(program.module())
    _install_mode_switch(gm, model.training)
    gm.meta[CAPTURED] = True
    return gm


def _at_least_two(x):
    """torch.export specialises a dim seen as 1; show it a batch of two."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(2, *x.shape[1:]).clone()
    return x


def _batch_dynamic(args):
    batch = torch.export.Dim("batch", min=1)
    return pytree.tree_map(
        lambda x: {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None, args)


def _install_mode_switch(gm: fx.GraphModule, training: bool) -> None:
    """ep.module() refuses train()/eval(); make both switch the graph instead.
    Kept as a user-preserved attribute, so every deepcopy (eliminate makes one)
    gets a switch bound to itself."""
    gm.meta[CAPTURED_TRAINING] = training
    gm.__dict__.pop("eval", None)  # nn.Module.eval calls self.train(False)
    gm.train = types.MethodType(_train, gm)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["train"] = gm.train
    torch.nn.Module.train(gm, training)


def _train(gm: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    return set_mode(gm, mode)


def first_line(err) -> str:
    """An exception's first non-empty line, at most 300 characters: what a one-paragraph error quotes."""
    line = next((s.strip() for s in str(err).splitlines() if s.strip()), type(err).__name__).rstrip(".")
    return line if len(line) <= 300 else line[:297] + "..."


def _explain(model, err, dynamic_batch) -> str:
    first = first_line(err)
    hint = (" If the message is about the batch dimension, capture it in Python with "
            "cpdfx.capture(model, x, dynamic_batch=False) and pass that graph on (the slim model will then "
            "take only the example's batch size; the cpdfx command always keeps the batch dynamic)."
            if dynamic_batch else "")
    return (f"cpdfx could not capture {type(model).__name__} as a graph: torch.export failed with "
            f"{type(err).__name__}: {first}. cpdfx needs a model whose forward torch.export can "
            f"trace with the example inputs given: Python control flow that depends on tensor "
            f"values, unsupported Python constructs or inputs of the wrong shape stop it.{hint}")
