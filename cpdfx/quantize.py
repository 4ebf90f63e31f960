"""INT8 for the CPU: onnxruntime static quantization of an exported model, checked.

    result = cpdfx.quantize("slim.onnx", "slim.int8.onnx", batches)            # MinMax
    result = cpdfx.choose_method("slim.onnx", "slim.int8.onnx", batches, val)  # the best of three on val

The steps, each its own function so that other callers (an int8 latency table,
a quantization-aware export) can reuse them:

1. `prepare`: onnxruntime's `quant_pre_process` without its symbolic shape
   inference: onnxruntime's basic graph optimisation (batch norms folded into
   the convolutions, constants folded), then ONNX shape inference. The
   symbolic step fails on the graphs torch's dynamo exporter writes (its
   Constant handler reads only the `value` attribute, and the exporter writes
   `value_ints`); rewriting those constants lets it pass on ResNet and ViT but
   it still fails ("Incomplete symbolic shape inference") on a U-Net, and where
   it passes the quantized graphs came out the same, node for node, as
   without it: the exporter's shapes are complete, so ONNX shape inference is
   enough. The pre-processed file carries onnxruntime's pre-process mark, so
   `quantize_static` does not warn that it was not pre-processed.
2. `calibrate`: `quantize_static` to QDQ: int8 weights (symmetric, per output
   channel by default), uint8 activations, ranges calibrated on the batches by
   MinMax, Entropy or Percentile. uint8, not int8, activations: on x86,
   onnxruntime fuses QDQ convolutions into its int8 kernels (QLinearConv) only
   for uint8 activations; with int8 activations 9 of the 15 convolutions of a
   small ResNet stayed float between quantize and dequantize nodes, and the
   model ran no faster than fp32 (x1.02 at batch 8, where uint8 ran x2.97, on
   an AVX-512 VNNI EPYC, onnxruntime 1.32, one thread). On an x86 CPU without
   VNNI the weights are quantized to 7 bits (`reduce_range`), as onnxruntime
   advises there: its 8-bit products saturate in 16-bit sums otherwise.
3. `check`: the int8 file loads in onnxruntime, onnxruntime runs its
   convolutions and matrix products in int8 kernels (not float between
   quantize and dequantize nodes), it runs at a batch size other than the
   calibration's, and its outputs are compared with the fp32 model's on the
   calibration inputs: the share of rows (or pixels, for dense outputs) whose
   arg-max over dim 1 agrees, and the max and mean absolute error, reported in
   the result with the tolerance of the task (TOLERANCE), not raised.

A file that is not ONNX, a model onnxruntime cannot run or quantize, batches
that do not fit the model's inputs and a runtime without int8 kernels raise
QuantizeError; `onnx_out` is written only when every check has run.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from .bench import CPU, session_options
from .capture import first_line
from .export import _captured_log
from .files import atomic_path
from .importance import calibration_item
from .runtime import PROVIDERS, check_runtime, cpu_flags

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
# the least share of arg-max agreement with the fp32 model the check calls within tolerance, per task
TOLERANCE = {"classification": 0.98, "segmentation": 0.95}
INT8_RUNTIMES = ("cpu",)  # runtimes whose onnxruntime provider runs a QDQ model's convolutions in int8
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # the ops int8 kernels exist to speed up
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                "QAttention")
VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}
PREPROCESS = ("onnxruntime quant_pre_process without symbolic shape inference: basic graph optimisation, then "
              "ONNX shape inference")


class QuantizeError(RuntimeError):
    """The model could not be quantized, or not as asked; nothing was written."""


@dataclass
class Agreement:
    """The int8 model's outputs against the fp32 model's on the same inputs.
    argmax: the share of rows (2-D outputs: classification logits) or pixels
    (dense outputs) whose arg-max over dim 1 agrees, on the first output;
    max_abs_error, mean_abs_error: over every output element; mean_abs_output:
    the fp32 outputs' mean magnitude, the scale of those errors. top1: the
    share of images each model classifies as labelled ({"fp32": .., "int8": ..}),
    where the batches carry labels and the task is classification; else None."""
    images: int
    argmax: float | None
    max_abs_error: float
    mean_abs_error: float
    mean_abs_output: float
    top1: dict | None = None


@dataclass
class QuantizeResult:
    """What `quantize` wrote and how well it matches the fp32 model.
    calibration: the agreement on the calibration inputs (the check);
    within_tolerance: whether its argmax agreement reaches `tolerance`;
    methods: each calibration method's agreement on the validation batches,
    where choose_method chose (empty otherwise); int8_ops, float_ops: the
    convolutions and matrix products onnxruntime runs in int8 kernels, and
    those it still runs in float; checked_batch: the other batch size the
    int8 file ran at; notes: what onnxruntime's quantizer logged."""
    path: str
    source: str
    method: str
    per_channel: bool
    reduce_range: bool
    activations: str
    weights: str
    preprocess: str
    task: str
    calibration: Agreement
    tolerance: float
    within_tolerance: bool
    int8_ops: int
    float_ops: int
    checked_batch: int
    methods: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """A few lines for a person: the file, how it was made, how close it is."""
        a = self.calibration
        agree = "" if a.argmax is None else f"arg-max agrees on {a.argmax:.2%} "
        lines = [f"int8 model written to {self.path}: {self.method} calibration, {self.weights} weights"
                 f"{' per channel' if self.per_channel else ''}{' (7-bit, reduce_range)' if self.reduce_range else ''}"
                 f", {self.activations} activations; {self.int8_ops} convolutions and matrix products run in int8"
                 + (f", {self.float_ops} in float" if self.float_ops else ""),
                 f"against the fp32 model on the {a.images} calibration images: {agree}(tolerance "
                 f"{self.tolerance:.0%}: {'within' if self.within_tolerance else 'NOT within'}), max abs error "
                 f"{a.max_abs_error:.3g}, mean {a.mean_abs_error:.3g} (outputs' mean magnitude "
                 f"{a.mean_abs_output:.3g})"]
        for name, v in self.methods.items():
            top1 = f"top-1 {v.top1['int8']:.2%} (fp32 {v.top1['fp32']:.2%}), " if v.top1 else ""
            agree = "" if v.argmax is None else f"arg-max agreement {v.argmax:.2%}, "
            lines.append(f"  {name:<10} on {v.images} validation images: {top1}{agree}mean abs error "
                         f"{v.mean_abs_error:.3g}" + ("  <- chosen" if name == self.method else ""))
        return lines


class CalibrationReader(CalibrationDataReader):
    """onnxruntime's calibration reader over feeds ({input name: array}), in
    order; set_range narrows it to feeds[start:end] (see `calibrate`)."""

    def __init__(self, feeds: list):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def get_next(self):
        return next(self._items, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = iter(self.feeds[start_index:end_index])


def quantize(onnx_in, onnx_out, calibration, *, method: str = "minmax", per_channel: bool = True,
             task: str = "classification", reduce_range: bool | None = None, runtime: str = "cpu",
             threads: int | None = None) -> QuantizeResult:
    """Quantize the ONNX model onnx_in to a QDQ int8 model at onnx_out, for
    onnxruntime on the CPU, and check it (see the module's notes).

    calibration: the iterable `prune(calibration=)` takes: items that are a
        tensor (the one input), or a tuple of the inputs, optionally followed
        by a target (ignored here); a few batches of training images (100 to
        500 images) are enough. Each item must fit the model's inputs.
    method: "minmax", "entropy" or "percentile" (see choose_method to pick on
        validation data). per_channel: a scale per output channel of each
        weight. reduce_range: 7-bit weights; by default on an x86 CPU without
        VNNI. runtime: where the int8 model will run; "cpu" only (onnxruntime's
        CUDA provider has no int8 convolution kernels). threads: onnxruntime's
        threads for the checks. Returns a QuantizeResult; raises QuantizeError
        (a ValueError for bad arguments) and writes nothing on failure."""
    return _quantize(onnx_in, onnx_out, calibration, None, (method,), per_channel, task, reduce_range, runtime,
                     threads)


def choose_method(onnx_in, onnx_out, calibration, validation, *, methods=tuple(METHODS), per_channel: bool = True,
                  task: str = "classification", reduce_range: bool | None = None, runtime: str = "cpu",
                  threads: int | None = None) -> QuantizeResult:
    """`quantize` with each calibration method in `methods`, keeping the one
    that does best on the validation batches (items as for calibration; with
    targets, their labels count): the highest top-1 against the labels where
    the task is classification and the batches carry labels, else the highest
    arg-max agreement with the fp32 model; ties go to the higher agreement,
    then the lower mean absolute error, then the earlier method in `methods`.
    result.methods holds every method's agreement on validation."""
    if validation is None:
        raise ValueError("choose_method compares the methods on validation batches: give validation=")
    return _quantize(onnx_in, onnx_out, calibration, validation, tuple(methods), per_channel, task, reduce_range,
                     runtime, threads)


def check_int8_runtime(runtime: str) -> str:
    """Refuse, before any work, an int8 model for a runtime without int8 kernels."""
    if check_runtime(runtime) not in INT8_RUNTIMES:
        raise QuantizeError(
            f"runtime={runtime!r}: onnxruntime's {PROVIDERS[runtime]} has no int8 kernels for a QDQ model's "
            f"convolutions (it runs them in float between quantize and dequantize steps, slower than the fp32 "
            f"model; onnxruntime reaches int8 on a GPU through TensorRT, which cpdfx does not drive). Quantize "
            f"for runtime='cpu', or ship the fp32 model to the GPU")
    return runtime


def default_reduce_range() -> bool:
    """7-bit weights on an x86 CPU without VNNI, as onnxruntime advises."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not (cpu_flags() & VNNI)


def _quantize(onnx_in, onnx_out, calibration, validation, methods, per_channel, task, reduce_range, runtime,
              threads) -> QuantizeResult:
    check_int8_runtime(runtime)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"method={unknown[0] if unknown else None!r}: choose from {', '.join(METHODS)}")
    if task not in TOLERANCE:
        raise ValueError(f"task={task!r}: choose {' or '.join(map(repr, TOLERANCE))}")
    source = read_model(onnx_in)
    fp32 = _session(onnx_in, threads, "the fp32 model")
    calib = _feeds(calibration, source, onnx_in, "calibration")
    val = _feeds(validation, source, onnx_in, "validation") if validation is not None else None
    reduce_range = default_reduce_range() if reduce_range is None else bool(reduce_range)
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="cpdfx-quantize-") as tmp, _quiet(log):
        prepared = prepare(onnx_in, os.path.join(tmp, "prepared.onnx"))
        paths = {m: calibrate(prepared, os.path.join(tmp, f"{m}.onnx"), calib, m, per_channel, reduce_range,
                              onnx_in) for m in methods}
        int8_ops, float_ops = int8_kernels(paths[methods[0]], tmp, onnx_in)
        scores = {m: compare(fp32, _session(p, threads, "the int8 model"), val, task)
                  for m, p in paths.items()} if val is not None else {}
        method = best_method(scores) if scores else methods[0]
        int8 = _session(paths[method], threads, "the int8 model")
        checked = compare(fp32, int8, calib, task)
        checked_batch = _other_batch(int8, calib, onnx_in)
        tolerance = TOLERANCE[task]
        result = QuantizeResult(
            path=str(onnx_out), source=str(onnx_in), method=method, per_channel=per_channel,
            reduce_range=reduce_range, activations="uint8", weights="int8", preprocess=PREPROCESS, task=task,
            calibration=checked, tolerance=tolerance,
            within_tolerance=checked.argmax is not None and checked.argmax >= tolerance,
            int8_ops=int8_ops, float_ops=float_ops, checked_batch=checked_batch, methods=scores)
        proto = onnx.load(paths[method])
        props = {p.key: p.value for p in source.metadata_props}
        props["cpdfx.int8"] = json.dumps({k: v for k, v in result.as_dict().items()
                                          if k not in ("path", "source", "methods", "notes")})
        onnx.helper.set_model_props(proto, props)
        with atomic_path(onnx_out) as out:
            onnx.save(proto, str(out))
    result.notes = sorted({line.strip() for line in log.getvalue().splitlines() if line.strip()})
    return result


def timing_model(onnx_in: str | bytes, shape, reduce_range: bool | None = None) -> bytes:
    """The QDQ model `calibrate` writes for the ONNX model onnx_in (a path or
    its bytes), calibrated on one batch of random normal inputs of `shape`:
    what onnxruntime's int8 kernels run, for timing them (an int8 latency
    table, a latency budget's measurements). Its ranges fit no data, so its
    answers mean nothing; the model shipped is calibrated on images
    (`quantize`, `choose_method`)."""
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    with tempfile.TemporaryDirectory(prefix="cpdfx-quantize-") as tmp, _quiet(io.StringIO()):
        source = onnx_in
        if isinstance(onnx_in, bytes):
            source = os.path.join(tmp, "fp32.onnx")
            Path(source).write_bytes(onnx_in)
        name = model_inputs(onnx.load(source))[0].name
        feed = {name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        path = calibrate(prepare(source, os.path.join(tmp, "prepared.onnx")), os.path.join(tmp, "int8.onnx"),
                         [(feed, None)], "minmax", True, reduce_range, "the model to time")
        return Path(path).read_bytes()


def read_model(path) -> onnx.ModelProto:
    """The ONNX model at path, refused in words when there is none or it is not ONNX."""
    if not Path(path).is_file():
        raise QuantizeError(f"cpdfx could not quantize {os.fspath(path)!r}: there is no such file")
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as err:  # onnx raises its own kinds (DecodeError, ValidationError) for a foreign file
        raise QuantizeError(f"cpdfx could not quantize {os.fspath(path)}: it is not an ONNX model onnx can read "
                            f"({type(err).__name__}: {first_line(err)})") from None
    return proto


def prepare(onnx_in, path) -> str:
    """The model pre-processed for quantization (see the module's notes), at path."""
    quant_pre_process(str(onnx_in), str(path), skip_symbolic_shape=True)
    return str(path)


def calibrate(prepared, path, feeds: list, method: str, per_channel: bool, reduce_range: bool, source) -> str:
    """quantize_static of the prepared model to a QDQ file at path, its ranges
    gathered one batch at a time. onnxruntime's calibrators keep every batch's
    intermediate outputs until they compute the ranges, unless they are handed
    the data in strides (its `CalibStridedMinMax` option, which every method
    honours: MinMax merges each stride's ranges, Entropy and Percentile add each
    stride to their histograms); kept whole, 8 batches of 32 images of
    ResNet-50 at 224x224 outgrew 24 GB. One batch at a time, the calibration
    holds one batch's activations."""
    try:
        quantize_static(prepared, path, CalibrationReader([feed for feed, _ in feeds]), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=METHODS[method],
                        extra_options={"CalibStridedMinMax": 1})
    except Exception as err:  # the quantizer raises many kinds; all mean "no int8 model"
        raise QuantizeError(f"onnxruntime could not quantize {source} ({method} calibration): "
                            f"{type(err).__name__}: {first_line(err)}") from None
    return path


def int8_kernels(int8_path, tmp, source) -> tuple[int, int]:
    """The convolutions and matrix products onnxruntime's CPU provider runs in
    int8 kernels and those it runs in float, read from the graph it optimises
    for the CPU (its QDQ fusions); none in int8 is refused."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = os.path.join(tmp, "fused.onnx")
    ort.InferenceSession(str(int8_path), options, providers=[CPU])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    int8, float_ = sum(op in INT8_KERNELS for op in ops), sum(op in COMPUTE_OPS for op in ops)
    if not int8:
        raise QuantizeError(
            f"cpdfx could not quantize {source}: onnxruntime runs none of its convolutions or matrix products in "
            f"int8" + (f" ({float_} stay float between quantize and dequantize steps)" if float_ else
                       " (it has none: int8 kernels speed up Conv, MatMul and Gemm, and a model of element-wise "
                       "ops gains nothing from them)"))
    return int8, float_


def compare(fp32, int8, feeds, task: str) -> Agreement:
    """The int8 session's outputs against the fp32 session's on feeds (pairs of
    an input dict and a target or None)."""
    images = agree = rows = correct8 = correct32 = labelled = 0
    err_sum = ref_sum = count = 0.0
    err_max = 0.0
    for feed, target in feeds:
        want, have = fp32.run(None, feed), int8.run(None, feed)
        for w, h in zip(want, have):
            diff = np.abs(h.astype(np.float64) - w)
            err_max, err_sum = max(err_max, float(diff.max(initial=0))), err_sum + float(diff.sum())
            ref_sum, count = ref_sum + float(np.abs(w).sum()), count + w.size
        images += want[0].shape[0] if want[0].ndim else 1
        if want[0].ndim >= 2:
            p32, p8 = want[0].argmax(1), have[0].argmax(1)
            agree, rows = agree + int((p32 == p8).sum()), rows + p32.size
            if target is not None and task == "classification" and want[0].ndim == 2:
                y = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).reshape(-1)
                correct32, correct8 = correct32 + int((p32 == y).sum()), correct8 + int((p8 == y).sum())
                labelled += y.size
    return Agreement(images=images, argmax=agree / rows if rows else None, max_abs_error=err_max,
                     mean_abs_error=err_sum / max(count, 1), mean_abs_output=ref_sum / max(count, 1),
                     top1={"fp32": correct32 / labelled, "int8": correct8 / labelled} if labelled else None)


def best_method(scores: dict) -> str:
    """The method choose_method keeps (see there): max over (top-1 or
    agreement, agreement, -mean abs error), the first of a tie."""
    def key(name):
        a = scores[name]
        agree = a.argmax if a.argmax is not None else 0.0
        return (a.top1["int8"] if a.top1 else agree, agree, -a.mean_abs_error)
    return max(scores, key=key)


def _session(path, threads, what: str):
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=[CPU])
    except Exception as err:  # onnxruntime raises its own kinds for a model it cannot run
        raise QuantizeError(f"onnxruntime cannot run {what} ({path}): {type(err).__name__}: "
                            f"{first_line(err)}") from None


def model_inputs(proto: onnx.ModelProto) -> list:
    """The graph's inputs a caller feeds (older exporters also list the weights as inputs)."""
    weights = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]


def _feeds(items, proto: onnx.ModelProto, path, what: str) -> list:
    """(input dict, target) pairs from the items, each input checked against
    the sizes the model declares and cast to its element type."""
    inputs = model_inputs(proto)
    feeds = []
    for i, item in enumerate(items):
        try:
            args, target = calibration_item(item, len(inputs))
        except ValueError as err:
            raise QuantizeError(f"the {what} data does not fit {path}: item {i}: {err}") from None
        feed = {}
        for spec, value in zip(inputs, args):
            array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            declared = [d.dim_value or None for d in spec.type.tensor_type.shape.dim]
            if array.ndim != len(declared) or any(d not in (None, s) for d, s in zip(declared, array.shape)):
                takes = ", ".join("batch" if j == 0 and d is None else str(d or "any") for j, d in enumerate(declared))
                raise QuantizeError(
                    f"the {what} data does not fit {path}: item {i}'s input {spec.name!r} has shape "
                    f"{tuple(array.shape)}, and the model takes ({takes}). Give batches of the images the model "
                    f"was exported for (the same channels and size)")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            feed[spec.name] = array.astype(dtype, copy=False)
        feeds.append((feed, target))
    if not feeds:
        raise QuantizeError(f"the {what} data is empty: give a few batches of images")
    return feeds


def _other_batch(int8, feeds, source) -> int:
    """The int8 model run at a batch size the calibration did not use (the
    first batch and one more row); its size."""
    feed = {k: np.concatenate([v, v[:1]]) for k, v in feeds[0][0].items()}
    batch = next(iter(feed.values())).shape[0]
    try:
        out = int8.run(None, feed)
    except Exception as err:  # onnxruntime's own kinds: a batch size fixed somewhere in the graph
        raise QuantizeError(f"the int8 model of {source} does not run at batch {batch}: {type(err).__name__}: "
                            f"{first_line(err)}") from None
    if out[0].ndim and out[0].shape[0] != batch:
        raise QuantizeError(f"the int8 model of {source} returns {out[0].shape[0]} rows for a batch of {batch}")
    return batch


@contextlib.contextmanager
def _quiet(log: io.StringIO):
    """What onnxruntime's quantizer logs (to the root logger and its own) and
    warns, kept in log, and what its calibrators print (their progress), dropped."""
    with _captured_log("", log), _captured_log("onnxruntime", log), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            log.writelines(f"{w.category.__name__}: {w.message}\n" for w in caught)
