"""Channel elimination: rewrite a graph into a physically smaller one.

Given the groups from `comb` and, for some of them, the indices to keep, every
parameter and buffer dim is sliced, every op's size-encoding int arguments are
rewritten by its rule, and shapes are propagated again so that the slim graph
can be combed and pruned once more.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .comb import Comb, Inline, kept_indices
from .ops import OPS

KEPT = "cpdfx_kept"


class RewriteContext:
    """What a rewrite rule sees: old and new sizes of the spaces of a node."""

    def __init__(self, comb: Comb, keep: dict):
        self.comb, self.keep = comb, keep
        self.sizes = {g: len(idx) for g, idx in keep.items()}
        self.memo = comb.memo

    def dims(self, arg):
        return self.comb.node_dims.get(arg.name)

    def old_size(self, space):
        return self.comb.spaces.size[self.comb.spaces.find(space)]

    def new_size(self, space):
        size = self.comb.spaces.new_size(space, self.sizes)
        return int(size) if isinstance(size, int) or getattr(size, "is_Integer", False) else size

    def kept_mask(self, space) -> np.ndarray | None:
        """Which positions of space survive; None for a frozen space (all do)."""
        if self.comb.spaces.is_frozen(space):
            return None
        return self.comb.spaces.kept_positions(space, self.keep)


def check_keep(comb: Comb, keep: dict) -> dict:
    """Validate keep (group id -> indices) and normalise it to sorted int arrays."""
    out = {}
    for gid, idx in keep.items():
        try:
            group = comb.group(gid)
        except KeyError:
            raise ValueError(f"keep names group {gid}, which this comb does not have") from None
        idx = np.unique(np.asarray(idx, dtype=np.int64).reshape(-1))
        if len(idx) == group.size:
            continue
        if not group.prunable:
            raise ValueError(f"group {gid} cannot be pruned ({group.frozen_reason}); "
                             f"keep all of its {group.size} channels or leave it out of keep")
        if len(idx) == 0 or idx[0] < 0 or idx[-1] >= group.size:
            raise ValueError(f"group {gid} has {group.size} channels: keep at least one, "
                             f"with indices in [0, {group.size})")
        out[gid] = idx
    return out


def eliminate(gm: fx.GraphModule, comb: Comb, keep: dict) -> fx.GraphModule:
    """A copy of gm with only the `keep` indices of each group left.

    keep maps group ids (from comb) to the indices to keep; groups left out keep
    everything. The result records in `.meta["cpdfx_kept"]`, for each original
    parameter/buffer name, the original indices that survived per dim."""
    keep = check_keep(comb, keep)
    slim = copy.deepcopy(gm)
    kept = kept_indices(comb, keep)
    for name, dims in kept.items():
        _slice_tensor(slim, name, dims)
    rx = RewriteContext(comb, keep)
    inline = Inline(slim)
    for node in inline.nodes:
        rule = OPS.get(node.target) if node.op == "call_function" else None
        if rule is not None and rule.rewrite is not None and keep:
            rule.rewrite(node, rx)
    for module in inline.modules:
        module.recompile()
    propagate_shapes(slim)
    slim.meta[KEPT] = _compose(gm.meta.get(KEPT, {}), kept)
    return slim


def _slice_tensor(gm, name, dims):
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name)
    tensor = getattr(owner, attr)
    data = tensor.detach()
    for d, idx in dims.items():
        data = data.index_select(d, torch.as_tensor(idx, device=data.device))
    if isinstance(tensor, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(data.clone(), requires_grad=tensor.requires_grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = data.clone()
    else:  # a plain tensor attribute (a lifted constant)
        setattr(owner, attr, data.clone())


def _compose(previous: dict, kept: dict) -> dict:
    """Indices into the original tensors, across successive eliminations."""
    out = {name: dict(dims) for name, dims in previous.items()}
    for name, dims in kept.items():
        for d, idx in dims.items():
            before = out.get(name, {}).get(d)
            out.setdefault(name, {})[d] = [int(i) for i in (np.asarray(before)[idx] if before is not None else idx)]
    return out


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute node.meta['val'] with the graph's own (symbolic) inputs, and
    in each sub-graph a call runs (comb.Call) with the call's operands.

    Guards are suppressed: some meta kernels branch on the batch size to pick
    a memory format (upsample_bilinear2d guards Eq(batch, 2) at an example of
    2), which would specialise the batch of this graph, and, through the shape
    environment it shares, of the graph it was pruned from. No shape here
    depends on such a branch.

    The Python dispatcher is on, as when torch.export traced the graph: the
    composite ops the training IR keeps (aten.pad, aten.lstm.input, ...) then
    run their Python decompositions, which take symbolic sizes, where the C++
    ones ask a fake tensor for a concrete numel() or storage_offset() (a
    negative pad, a crop, is a slice in C++)."""
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs)
    with contextlib.ExitStack() as stack:
        if mode is not None and mode.shape_env is not None:
            stack.enter_context(mode.shape_env.suppress_guards())
        stack.enter_context(enable_python_dispatcher())
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*inputs)
        for call in Inline(gm).calls:  # outer ones first: an inner call's operands are then fresh
            operands = [v.meta["val"] if isinstance(v, fx.Node) else v for v in call.operands]
            FakeTensorProp(call.module, mode=mode).propagate_dont_convert_inputs(*operands)
