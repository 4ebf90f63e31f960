"""Shared test helpers: the mask-equivalence oracle, random keep sets, and
onnxruntime's timings replaced for the latency budget's mechanism."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import cpdfx.latency as latency
import cpdfx.pruner as pruner


def input_dim(module: nn.Module) -> int | None:
    """The weight dim that indexes a layer's input channels."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return 0
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return 1
    return None


def masked_original(model: nn.Module, kept: dict) -> nn.Module:
    """A copy of model with the input columns the slim model dropped zeroed in
    every conv and linear layer: it must compute what the slim model computes."""
    masked = copy.deepcopy(model)
    for name, module in masked.named_modules():
        d = input_dim(module)
        dims = kept.get(f"{name}.weight", {})
        if d is None or d not in dims:
            continue
        drop = np.setdiff1d(np.arange(module.weight.shape[d]), dims[d])
        with torch.no_grad():
            module.weight.index_fill_(d, torch.as_tensor(drop, dtype=torch.long), 0.0)
    return masked


def random_keep(comb, rng, share=0.5) -> dict:
    """Random indices for every prunable group, between 1 and all channels."""
    keep = {}
    for g in comb.prunable:
        n = int(rng.integers(1, g.size + 1)) if share is None else max(1, int(g.size * share))
        keep[g.id] = rng.choice(g.size, n, replace=False)
    return keep


def assert_same_outputs(a, b, atol=1e-5):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb, f"output structure differs: {sa} vs {sb}"
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def assert_vgg_trains(gm, x) -> int:
    """Switch VGGTiny's graph to train mode and check it behaves so: a forward
    counts one batch in features.0.1, and dropout makes two forwards differ.
    Returns the batch count from before."""
    gm.train()
    before = int(gm.get_submodule("features.0.1").num_batches_tracked)
    torch.manual_seed(1)
    a = gm(x)
    assert int(gm.get_submodule("features.0.1").num_batches_tracked) == before + 1
    torch.manual_seed(2)
    assert not torch.allclose(a, gm(x))  # dropout is on
    return before


def width_timer(model, shape, *args, spread=False, **kwargs):
    """A stand-in for latency.time_onnx: a layer costs its input width
    (shape[1]) in ms, with no spread between runs."""
    ms = float(shape[1])
    return (ms, 0.0) if spread else ms


def weight_ms(model: bytes) -> float:
    """What in_times_out costs a one-op ONNX model: its weight's first two
    dims multiplied (out x in channels; the reference conv alike)."""
    weight = next(i for i in onnx.load_from_string(model).graph.initializer if len(i.dims) >= 2)
    return float(weight.dims[0] * weight.dims[1])


def in_times_out(model, shape, *args, spread=False, **kwargs):
    """A stand-in for latency.time_onnx: a layer costs in x out channels in
    ms (weight_ms), with no spread between runs."""
    ms = weight_ms(model)
    return (ms, 0.0) if spread else ms


def fake_onnxruntime(monkeypatch, shares, calibrate: bool = False, shipped: float = 1.0) -> list:
    """onnxruntime replaced: the tables cost a layer its input width, and the
    pruned models measure `shares` in turn (the original is unknown: the
    tables alone; its int8 model measures `shipped`). Unless `calibrate`, the
    latency model keeps its elementwise share (no refit), so that the asks
    follow from the shares alone. Returns the latency each plan was asked
    for, filled as pruning runs."""
    shares, asked = iter(shares), []
    monkeypatch.setattr(latency, "time_onnx", width_timer)
    if not calibrate:
        monkeypatch.setattr(latency.LatencyModel, "calibrate", lambda self, measured: self.elementwise)

    class FakeMeasured:
        full_ms = 0.0

        def __init__(self, *args, int8=False, **kwargs):
            self.shipped = shipped if int8 else 1.0

        def share(self, slim):
            return next(shares)

    real_plan = pruner.plan

    def spy_plan(*args, **kwargs):
        asked.append(args[3].latency)  # plan(gm, groups, example_inputs, target, ...)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(pruner, "Measured", FakeMeasured)
    monkeypatch.setattr(pruner, "plan", spy_plan)
    return asked
