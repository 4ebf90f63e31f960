"""An ONNX file run by onnxruntime, called as a torch module.

`cpdfx.evaluate(OnnxModel("slim.int8.onnx"), test, task=...)` scores the model
as it ships (an int8 model has no torch counterpart), with the same metric,
batching and label handling as a torch model gets.
"""
from __future__ import annotations

import torch

import onnxruntime as ort

from .bench import CPU, session_options


class OnnxModel(torch.nn.Module):
    """The model at path in an onnxruntime session on the CPU (threads:
    onnxruntime's intra-op threads, default its own). forward takes the
    inputs as tensors and returns the output tensor, or a dict of them by the
    ONNX output names ("logits", ...) where there are several. It has no
    parameters and nothing to train; train() and eval() change nothing."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options(threads), providers=[CPU])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *inputs):
        feed = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else dict(zip(self.output_names, outputs))
