"""Quantization-aware distillation: the slim graph trained with int8 rounding in the loop.

    qat = cpdfx.qat.distill_int8(slim, teacher, train, val, epochs=1)   # fp32 weights that round well

Post-training int8 rounds weights and activations the model never saw
rounded; a pruned model has less slack for that (the issue's Fashion-MNIST
ResNet lost 0.7 points to int8 unpruned, 2.1 pruned). Here every conv and
linear layer of the captured graph gets fake quantization on its way in, as
onnxruntime's QDQ model will round it (`quantize.calibrate`):

- its weight: int8, symmetric, one scale per output channel (7-bit where
  onnxruntime quantizes so, `quantize.default_reduce_range`);
- its input: uint8, one scale and zero point per tensor, over the range the
  training batches showed (their min and max, averaged over the batches as
  onnxruntime's MinMax calibration takes the extremes; 0 always inside).

Rounding passes gradients straight through (torch's fake_quantize ops), and
the student is distilled from the fp32 teacher meanwhile, so the weights move
to where int8 loses least. `strip` then removes the fake quantization: what
is left is the same graph with the new weights, which `quantize` calibrates
and writes as QDQ as it does any model. The fake-quant nodes are call_module
nodes (FakeQuantize), inserted by `fake_quantize` in front of each layer's
input and weight arguments, read by schema from the op table.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from .passes.ops import OPS, arg, set_arg

from .distill import DistillResult, distill
from .quantize import default_reduce_range

AVERAGING = 0.01  # the weight of each training batch in an input's range (a moving average)
PREFIX = "cpdfx_fake_quant_"


class FakeQuantize(nn.Module):
    """int8 rounding of a weight (symmetric, per output channel) or uint8
    rounding of an activation (per tensor, over its running range), with
    straight-through gradients."""

    def __init__(self, kind: str, reduce_range: bool = False):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind={kind!r}: weight or activation")
        self.kind = kind
        self.qmax = (64 if reduce_range else 127) if kind == "weight" else 255
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            scale = x.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / self.qmax
            zero = torch.zeros_like(scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -self.qmax, self.qmax)
        if self.training:
            self._observe(x.detach())
        low, high = self.low.clamp(max=0.0), self.high.clamp(min=0.0)
        scale = ((high - low) / self.qmax).clamp_min(1e-8).float().reshape(1)
        zero = torch.round(-low / scale).clamp(0, self.qmax).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, self.qmax)

    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.min(), x.max()
        if self.seen == 0:
            self.low.copy_(low)
            self.high.copy_(high)
        else:
            self.low.lerp_(low, AVERAGING)
            self.high.lerp_(high, AVERAGING)
        self.seen += 1


def fake_quantize(gm: fx.GraphModule, reduce_range: bool | None = None) -> fx.GraphModule:
    """A copy of the captured graph gm with fake quantization in front of each
    conv's and linear layer's input and weight (see the module's notes)."""
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    gm = copy.deepcopy(gm)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or OPS.get(node.target) is None or \
                OPS[node.target].latency not in ("conv", "linear"):
            continue
        for name, kind in (("input", "activation"), ("weight", "weight")):
            source = arg(node, name)
            if not isinstance(source, fx.Node):
                continue
            target = f"{PREFIX}{count}"
            count += 1
            gm.add_submodule(target, FakeQuantize(kind, reduce_range))
            with gm.graph.inserting_before(node):
                rounded = gm.graph.call_module(target, (source,))
            rounded.meta = dict(source.meta)
            set_arg(node, name, rounded)
    if not count:
        raise ValueError("the graph has no conv or linear layer: int8 has nothing to round")
    gm.recompile()
    gm.train(gm.training)  # the mode switch covers the new modules too
    return gm


def strip(gm: fx.GraphModule) -> fx.GraphModule:
    """gm without its fake quantization (in place): the plain graph, the weights as trained."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(PREFIX):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()
    return gm


def distill_int8(student: fx.GraphModule, teacher: nn.Module, train_data, val_data=None, *, epochs: int = 1,
                 reduce_range: bool | None = None, **options) -> DistillResult:
    """Distil a copy of the captured student from the fp32 teacher with int8
    rounding in the loop (`fake_quantize`), for `epochs`; options as for
    cpdfx.distill (a lower lr than training from scratch suits a fine-tune).
    Returns the result with the rounding stripped: a plain graph of the
    student's shape whose weights int8 rounds with less loss."""
    rounded = fake_quantize(student, reduce_range)
    result = distill(rounded, teacher, train_data, val_data, epochs=epochs, **options)
    return DistillResult(strip(result.student).eval(), result.history)
