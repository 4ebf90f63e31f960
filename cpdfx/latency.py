"""Latency as a function of channel counts, measured with onnxruntime here.

MACs do not turn into time one for one. onnxruntime's CPU convolutions work on
channel blocks (8 or 16 wide, by the CPU's vector width), so a layer with 100
output channels costs what one with 112 does; and a layer's speed per MAC
depends on its shape. So the latency budget reads time from tables measured on
this machine rather than from MACs:

- every conv (not grouped), depthwise conv and linear layer of the graph gets a
  table of its own: the layer alone, as a one-op ONNX model at the benchmark
  batch, timed on a grid of (input, output) channel counts on multiples of the
  channel block; between grid points the time is interpolated on block-rounded
  counts, so a count inside a block costs what the whole block does. A point
  is a layer configuration at given channel counts, whichever layer asks:
  layers that repeat (a ResNet's blocks), and the same layer pruned later,
  share their points;
- other MAC-counted ops (grouped convs, attention, matmuls) cost their MACs at
  the time per MAC the tabled layers run at;
- the sum is scaled to the measured full model: a layer in the model runs
  slower than alone (its weights are not in cache: ResNet-50 at 64x64 runs at
  a third of its tables' speed), which no constant would say;
- what is not tabled (norms, activations, adds, softmax, permutes, pooling:
  the entries of the op table with `latency="elements"`) either fuses into
  the layers, and so follows their time, or runs on its own, in time that
  follows its element count: linear in the channels where the layers' MACs
  are quadratic, so a model cut deep keeps more of it than the tables say
  (ConvNeXt-T with every width halved: 26% of the MACs, 33-35% of the time).
  Which of the two it does depends on onnxruntime's fusions, so the share of
  the time that follows element counts (`elementwise`) is not guessed but
  fitted to measured pruned models (`calibrate`): `prune(latency=)` solves
  its first plan on the tables alone, fits the share to each result it
  measures, and solves again on the fitted model (ConvNeXt-T at batch 1,
  x3: the first plan measured 0.45 of the time for 0.33 asked, the next,
  on the fitted model, 0.345).

With int8=True the tables time each layer as onnxruntime's quantizer writes
it (`quantize.timing_model`: QDQ, int8 weights per channel, uint8
activations), which the CPU provider runs in its int8 kernels: their channel
blocks and speed per MAC are not the float kernels', so a budget for a model
that ships as int8 is solved on int8 time. Such points are cached under keys
of their own ("int8/conv/...").

Tables are cached per machine (CPU or GPU, cores, threads, provider,
onnxruntime version) in $CPDFX_CACHE (default ~/.cache/cpdfx), so each point
is measured once; but only points timed on a quiet machine:
- one onnxruntime session of a one-op model can run it at half its speed
  throughout (on a 2-core VM, ViT-B/16's 768x768 linear ran at 10 or 19 ps
  per MAC, session by session; the same layers in the whole model show no
  such cliff), so each point is timed in `SESSIONS` fresh sessions and the
  fastest kept;
- a point whose runs spread more than `NOISY` is timed again, and so is one
  out of line with its grid neighbours (`OUT_OF_LINE`: a burst of load can
  slow all of a point's runs alike, which their spread does not show), the
  faster timing kept;
- a reference layer is timed before and after the tables: if it ran more
  than `DRIFT` slower or faster at the end, something else used the machine
  meanwhile, and the new points serve this run only (a warning says so)
  instead of becoming the machine's truth.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from .passes.comb import Inline
from .passes.ops import OPS, arg, transposed

from .bench import _machine, bench, session_options
from .capture import as_tuple
from .cost import batch_values, concrete, mac_terms_by_node
from .export import export_onnx
from .files import cache_dir, write_json
from .quantize import check_int8_runtime, timing_model
from .runtime import channel_block, provider

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)  # shares of a layer's width the tables are timed at
NOISY = 0.15  # a point whose runs spread more than this (interquartile range / median) is timed again
DRIFT = 0.15  # the reference layer this much slower or faster after the tables: the machine was busy
SESSIONS = 2  # fresh onnxruntime sessions per table point, the fastest kept (see the module docstring)
OUT_OF_LINE = 1.3  # a new point this many times what its grid neighbours bound it by is timed again
SESSION_SECONDS = 0.5  # the shortest session `Measured` times a fast model's pair in
MAX_ELEMENTWISE = 0.8  # the most of a model's time `LatencyModel.calibrate` puts on element counts


@dataclass
class Layer:
    """One tabled layer: what it is (the cache key stem) and the spaces its table is indexed by."""
    key: str
    spaces: tuple  # (input channels, output channels) or (channels,) for depthwise
    full: tuple  # their sizes in the graph
    build: callable  # sizes -> (ONNX model bytes, input shape)


class LatencyModel:
    """Estimated latency (ms) of a graph for any size assignment of its groups.

    batch: the batch the latency is for; threads: onnxruntime intra-op
    threads (default its own); runtime: "cpu" or "cuda", the onnxruntime
    provider timed; block: the channel block (default the runtime's);
    repeats: timed runs per session of a table point (median kept);
    full_ms: the measured latency of the whole graph at this batch, when the
    caller has it (prune measures it); elementwise: the share of it that
    follows element counts, when known (see `calibrate`); int8: the layers
    timed quantized (see the module's notes), for a model that ships as int8
    (full_ms is then the int8 model's); cache: a folder, or False."""

    def __init__(self, gm, comb, example_inputs=None, *, batch: int = 8, threads: int | None = None,
                 runtime: str = "cpu", block: int | None = None, repeats: int = 7, full_ms: float | None = None,
                 elementwise: float = 0.0, int8: bool = False, cache=None, progress: bool = True):
        self.spaces, self.batch, self.threads, self.repeats = comb.spaces, batch, threads, repeats
        self.int8 = bool(int8 and check_int8_runtime(runtime))
        self.provider = provider(runtime)
        self.block = block or channel_block(runtime)
        self.values = {s: batch for s in batch_values(gm, example_inputs)}  # every symbolic size is the batch
        self.layers, layer_terms, self.other_terms = [], [], []
        self.element_terms = [term for node in Inline(gm).nodes
                              if (term := _element_term(node, comb, self.values))]
        for node, terms in mac_terms_by_node(gm):
            layer = self._layer(node, comb)
            spaces = [[comb.node_dims[n.name][d] for n, d in term] for term in terms]
            if layer is not None:
                self.layers.append(layer)
                layer_terms += spaces
            else:
                self.other_terms += spaces
        self.cache = _Cache(cache, self.block, threads, self.provider)
        self._measure(progress)
        self.cache.save()
        # a table per configuration and widths: layers of one configuration (a ViT's qkv, fc1 and fc2 are
        # all "linear/m197") share the timed points, but each reads them on its own grid
        self.tables = {(layer.key, layer.full): self._table(layer) for layer in self.layers}
        layers_ms = sum(self._layer_ms(layer, {}) for layer in self.layers)
        self.ms_per_mac = layers_ms / max(self._macs(layer_terms, {}), 1)
        self.tabled = layers_ms + self._other_ms({})
        self.elements = self._macs(self.element_terms, {})
        self.scale = full_ms / self.tabled if full_ms and self.tabled > 0 else 1.0
        self.elementwise = elementwise  # the share of the full model's time that follows element counts

    # -- the estimate ------------------------------------------------------------------

    def __call__(self, sizes: dict | None = None) -> float:
        tabled, elements = self._laws(sizes or {})
        return self.scale * self.tabled * ((1 - self.elementwise) * tabled + self.elementwise * elements)

    def _laws(self, sizes: dict) -> tuple[float, float]:
        """What the tables say and what the element counts say, each as a
        share of its value for the full model."""
        tabled = sum(self._layer_ms(layer, sizes) for layer in self.layers) + self._other_ms(sizes)
        return tabled / max(self.tabled, 1e-12), self._macs(self.element_terms, sizes) / max(self.elements, 1)

    def calibrate(self, measured: list) -> float:
        """Fit `elementwise` to measured (sizes, share of the full model's
        time) pairs by least squares, within [0, MAX_ELEMENTWISE]; pairs at
        which the two laws agree say nothing and are skipped. Returns it."""
        laws = [(*self._laws(sizes), share) for sizes, share in measured]
        apart = [(t, e, share) for t, e, share in laws if e - t > 0.02]
        if apart:
            fit = sum((share - t) * (e - t) for t, e, share in apart) / sum((e - t) ** 2 for t, e, _ in apart)
            self.elementwise = float(np.clip(fit, 0.0, MAX_ELEMENTWISE))
        return self.elementwise

    def elementwise_at(self, sizes: dict) -> float:
        """The share of the model at `sizes`' time that follows element
        counts: the `elementwise` of a latency model of the pruned graph."""
        tabled, elements = self._laws(sizes)
        part = self.elementwise * elements
        return part / max((1 - self.elementwise) * tabled + part, 1e-12)

    def _size(self, space, sizes) -> int:
        return concrete(self.spaces.new_size(space, sizes), self.values)

    def _layer_ms(self, layer: Layer, sizes: dict) -> float:
        grid, table = self.tables[layer.key, layer.full]
        point = [_round_up(self._size(s, sizes), self.block) for s in layer.spaces]
        return float(_interpolate(grid, table, point))

    def _macs(self, terms, sizes) -> int:
        return sum(math.prod(self._size(s, sizes) for s in term) for term in terms)

    def _other_ms(self, sizes: dict) -> float:
        return self.ms_per_mac * self._macs(self.other_terms, sizes)

    # -- the tables --------------------------------------------------------------------

    def _layer(self, node, comb) -> Layer | None:
        """The tabled layer of a conv or linear node (its op-table entry says
        `latency`), or None (costed by MACs)."""
        kind = OPS[node.target].latency if node.op == "call_function" and node.target in OPS else None
        layer = (_conv_layer(node, comb, self.batch) if kind == "conv" else
                 _linear_layer(node, comb, self.values) if kind == "linear" else None)
        return replace(layer, key=f"int8/{layer.key}") if layer is not None and self.int8 else layer

    def _build(self, layer: Layer, point):
        """The one-layer ONNX model of a table point and its input shape, quantized where the tables are int8."""
        model, shape = layer.build(point)
        return (timing_model(model, shape), shape) if self.int8 else (model, shape)

    def _grid(self, full: int) -> list[int]:
        return sorted({min(full, _round_up(max(1, round(full * f)), self.block)) for f in GRID})

    def _measure(self, progress: bool) -> None:
        """Time every table point that is not in the cache yet, each point
        once however many layers share it, in SESSIONS sessions; noisy points
        and points out of line again (see SESSIONS, NOISY, OUT_OF_LINE and
        DRIFT in the module docstring)."""
        todo = {}
        for layer in self.layers:
            for point in _points([self._grid(n) for n in layer.full]):
                if self.cache.get(layer.key, point) is None:
                    todo[layer.key, point] = layer
        if not todo:
            return
        def time_point(model, shape):  # (median ms, spread) of the fastest of SESSIONS fresh sessions
            return min((time_onnx(model, shape, self.threads, repeats=self.repeats, provider=self.provider,
                                  spread=True) for _ in range(SESSIONS)), key=lambda t: t[0])

        _reference_ms(time_point)  # onnxruntime's first sessions in a process run slow: warm it up
        before = _reference_ms(time_point)
        bar = tqdm(todo.items(), desc="latency tables", unit="point", disable=not progress)
        for (key, point), layer in bar:
            bar.set_postfix_str(f"{key.replace('/', ' ')} at {'x'.join(map(str, point))}", refresh=False)
            model, shape = self._build(layer, point)
            ms, spread = time_point(model, shape)
            if spread > NOISY:
                ms, spread = min((ms, spread), time_point(model, shape), key=lambda t: t[1])
            self.cache.put(key, point, ms, trusted=spread <= NOISY)
        for (key, point), layer in self._out_of_line(todo).items():
            ms, spread = time_point(*self._build(layer, point))
            if ms < self.cache.get(key, point):
                self.cache.put(key, point, ms, trusted=spread <= NOISY)
        after = _reference_ms(time_point)
        if abs(after / before - 1) > DRIFT:
            self.cache.distrust()
            warnings.warn(f"the machine was busy while the latency tables were timed (a reference layer took "
                          f"{before:.2f} ms before and {after:.2f} ms after): their {len(todo)} new points "
                          f"serve this run and are not cached; time them on a quiet machine", stacklevel=3)

    def _out_of_line(self, new: dict) -> dict:
        """The new points that took more than OUT_OF_LINE times the median of
        the bounds their grid neighbours set: a neighbour with more channels
        bounds a point by its own time (fewer channels are no slower), one
        with fewer by its time per channel product (more channels are no
        slower per MAC). A real cliff (a width the kernels handle badly) is
        timed again, found slow again and kept; a point slowed by a burst of
        load is not."""
        out = {}
        for layer in self.layers:
            grid = [self._grid(n) for n in layer.full]
            for point in _points(grid):
                if (layer.key, point) not in new or (layer.key, point) in out:
                    continue
                ms = self.cache.get(layer.key, point)
                bounds = [self.cache.get(layer.key, q) * max(1.0, math.prod(point) / math.prod(q))
                          for q in _neighbours(grid, point)]
                if bounds and ms > OUT_OF_LINE * float(np.median(bounds)):
                    out[layer.key, point] = layer
        return out

    def _table(self, layer: Layer):
        grid = [np.array(self._grid(n)) for n in layer.full]
        table = np.array([self.cache.get(layer.key, p) for p in _points(grid)]).reshape([len(g) for g in grid])
        return grid, table


def _points(grid):
    return [tuple(int(v) for v in p) for p in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(grid))]


def _neighbours(grid, point):
    """The grid points one step from point along one axis."""
    for axis, values in enumerate(grid):
        i = values.index(point[axis])
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                yield point[:axis] + (values[j],) + point[axis + 1:]


def _round_up(n: int, block: int) -> int:
    return math.ceil(n / block) * block


def _interpolate(grid, table, point) -> float:
    """Multilinear interpolation of table on grid at point (clamped to the grid)."""
    value = table
    for axis_grid, x in zip(grid, point):
        x = min(max(x, axis_grid[0]), axis_grid[-1])
        i = int(np.clip(np.searchsorted(axis_grid, x) - 1, 0, len(axis_grid) - 2)) if len(axis_grid) > 1 else 0
        if len(axis_grid) == 1:
            value = value[0]
            continue
        lo, hi = axis_grid[i], axis_grid[i + 1]
        w = (x - lo) / (hi - lo)
        value = value[i] * (1 - w) + value[i + 1] * w
    return value


def _reference_ms(time_point) -> float:
    """The time of a fixed mid-sized conv (about a millisecond; the median of
    five timings after one thrown away, since the first run of a process finds
    the caches and the thread pool cold), the yardstick of the machine's speed
    before and after the tables."""
    model, shape = _conv_onnx(1, 64, 64, 1, (3, 3), [1, 1], [1, 1], [1, 1], (56, 56))
    return float(np.median([time_point(model, shape)[0] for _ in range(6)][1:]))


def _element_term(node, comb, values) -> list | None:
    """The spaces of the largest tensor an op priced by element count reads
    or writes (its op-table entry says `latency="elements"`), or None."""
    entry = OPS.get(node.target) if node.op == "call_function" else None
    if entry is None or entry.latency != "elements":
        return None
    tensors = [t for t in (node, *node.all_input_nodes)
               if isinstance(t.meta.get("val"), torch.Tensor) and _flat(comb.node_dims.get(t.name))]
    if not tensors:
        return None
    largest = max(tensors, key=lambda t: _numel(t.meta["val"].shape, values))
    return list(comb.node_dims[largest.name])


def _flat(dims) -> bool:
    return dims is not None and not any(isinstance(d, list) for d in dims)


def _numel(shape, values) -> int:
    """The number of elements of a shape whose symbolic sizes take `values`."""
    return math.prod(concrete(s if isinstance(s, int) else s.node.expr, values) for s in shape)


def _conv_layer(node, comb, batch) -> Layer | None:
    """A 2-D conv, not transposed: one table over (in, out) channels, or over
    the channels of a depthwise conv; other grouped convs are costed by MACs."""
    x, w, out = arg(node, "input"), arg(node, "weight"), node
    xs, ws, os_ = (t.meta["val"].shape for t in (x, w, out))
    if len(ws) != 4 or transposed(node):
        return None
    groups = arg(node, "groups")
    stride, padding, dilation = (list(arg(node, name)) for name in ("stride", "padding", "dilation"))
    cin, cout, h, wd = int(xs[1]), int(ws[0]), int(xs[2]), int(xs[3])
    kh, kw = int(ws[2]), int(ws[3])
    shape = (f"k{kh}x{kw} s{'x'.join(map(str, stride))} p{'x'.join(map(str, padding))} "
             f"d{'x'.join(map(str, dilation))} {h}x{wd} b{batch}")
    xd, od = comb.node_dims[x.name], comb.node_dims[out.name]
    if groups == 1:
        return Layer(f"conv/{shape}", (xd[1], od[1]), (cin, cout),
                     lambda p: _conv_onnx(batch, p[0], p[1], 1, (kh, kw), stride, padding, dilation, (h, wd)))
    if groups == cin == cout:  # depthwise: one table over the channels
        return Layer(f"dw/{shape}", (xd[1],), (cin,),
                     lambda p: _conv_onnx(batch, p[0], p[0], p[0], (kh, kw), stride, padding, dilation, (h, wd)))
    return None


def _linear_layer(node, comb, values) -> Layer | None:
    x, w = arg(node, "input"), arg(node, "weight")
    rows = _numel(x.meta["val"].shape[:-1], values)
    fan_in, fan_out = (int(s) for s in reversed(w.meta["val"].shape))
    xd, od = comb.node_dims[x.name], comb.node_dims[node.name]
    return Layer(f"linear/m{rows}", (xd[-1], od[-1]), (fan_in, fan_out),
                 lambda p: _linear_onnx(rows, p[0], p[1]))


def _model(nodes, inputs, initializers) -> bytes:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", inputs, [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _conv_onnx(batch, cin, cout, groups, kernel, stride, padding, dilation, hw):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, *hw])
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // groups, *kernel), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=stride, pads=padding + padding,
                            dilations=dilation, group=groups)
    return _model([conv], [x], [w, b]), (batch, cin, *hw)


def _linear_onnx(rows, fan_in, fan_out):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, fan_in])
    w = numpy_helper.from_array(rng.standard_normal((fan_in, fan_out), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(fan_out, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    return _model(nodes, [x], [w, b]), (rows, fan_in)


def time_onnx(model: bytes, shape, threads=None, warmup: int = 2, repeats: int = 7,
              provider: str = "CPUExecutionProvider", spread: bool = False):
    """Median milliseconds of one onnxruntime run of model on random input;
    with spread=True, (median, interquartile range / median) of the runs."""
    session = ort.InferenceSession(model, session_options(threads), providers=[provider])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    if not spread:
        return median * 1e3
    q25, q75 = np.percentile(times, [25, 75])
    return median * 1e3, float((q75 - q25) / median)


class _Cache:
    """Measured table points, per machine, in a JSON file (or in memory)."""

    def __init__(self, folder, block, threads, provider_name):
        machine = _machine([provider_name], threads)
        device = machine["cuda"] if provider_name == "CUDAExecutionProvider" else machine["cpu"]
        # the last item is the format: 5 since points are timed in SESSIONS sessions and checked against their
        # neighbours, so points cached before are timed again
        ident = json.dumps([device, machine["cores"], threads, block, provider_name, ort.__version__, 5])
        self.path = None
        if folder is not False:
            folder = Path(folder or cache_dir())
            self.path = folder / f"latency-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.json"
        self.points = {}
        if self.path is not None and self.path.exists():
            try:
                self.points = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.points = {}  # a damaged cache is measured again
        self.new: set = set()  # timed in this run
        self.untrusted: set = set()  # timed noisily in this run: used, never saved

    def get(self, key, point):
        return self.points.get(_point_key(key, point))

    def put(self, key, point, ms, trusted: bool = True):
        k = _point_key(key, point)
        self.points[k] = ms
        self.new.add(k)
        if trusted:
            self.untrusted.discard(k)
        else:
            self.untrusted.add(k)

    def distrust(self):
        """None of this run's new points is to be cached."""
        self.untrusted |= self.new

    def save(self):
        if self.path is not None and self.new - self.untrusted:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {k: v for k, v in self.points.items() if k not in self.untrusted})


def _point_key(key, point) -> str:
    return f"{key}@{','.join(map(str, point))}"


class Measured:
    """The whole model in onnxruntime: its latency, and a slim version's as a
    share of it, timed against it in interleaved runs (see cpdfx.bench), in
    `samples` pairs of fresh sessions of at least `repeats` rounds and
    `min_seconds` each, and fewer rounds (3 at least) where those would pass
    `max_seconds`, for models that run for seconds. The correction loop of a
    latency budget steers by this share and stops where it lands near the
    target, so one stray measurement stops it short; a session's own
    placement (its memory, its threads' cores) moves its times by a few
    percent, which longer runs of the same session do not average out, so
    the share is the median of separate sessions. For a fast model that
    spread is most of the error (5-12% for a 6 ms MobileNetV2 on a 2-core
    VM), so the time `samples` sessions of `min_seconds` would take is spent
    on up to three times as many shorter ones, of `SESSION_SECONDS` at least.
    The example input is one tensor, alone or as a 1-tuple.

    With int8=True the slim models are timed as they ship, quantized
    (`quantize.timing_model`), against the fp32 original: a share is then
    what the slim int8 model takes of the fp32 original's time, and
    `shipped`, the original's own int8 model's share, measured once (1.0
    without int8)."""

    def __init__(self, gm, example_inputs, *, batch: int = 8, threads: int | None = None, runtime: str = "cpu",
                 repeats: int = 10, min_seconds: float = 1.5, max_seconds: float = 10.0, samples: int = 3,
                 int8: bool = False):
        inputs = as_tuple(example_inputs)
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise ValueError(f"a latency budget times the model in onnxruntime on one input tensor; this model "
                             f"takes {len(inputs)} input(s): give a macs= or params= budget instead")
        self.int8 = bool(int8 and check_int8_runtime(runtime))
        self.folder = tempfile.TemporaryDirectory(prefix="cpdfx-latency-")
        self.example_inputs, self.batch, self.threads, self.repeats = example_inputs, batch, threads, repeats
        self.seconds, self.samples = {"min_seconds": min_seconds, "max_seconds": max_seconds}, samples
        self.provider = provider(runtime)
        self.original = export_onnx(gm, example_inputs, Path(self.folder.name) / "original.onnx")
        self.shape = tuple(inputs[0].shape[1:])
        with open(self.original, "rb") as f:
            self.full_ms = time_onnx(f.read(), (batch, *self.shape), threads, repeats=repeats, provider=self.provider)
        session = max(SESSION_SECONDS, 2 * repeats * self.full_ms / 1e3)  # the shortest session of the pair
        more = min(3 * samples, int(samples * min_seconds / session))
        if more > samples:  # a fast model: more, shorter sessions in the same time
            self.samples, self.seconds["min_seconds"] = more, samples * min_seconds / more
        self.shipped = self._share(self._as_shipped(self.original)) if self.int8 else 1.0

    def share(self, slim) -> float:
        """slim's latency (its int8 model's, with int8) over the original's:
        the median, over the samples, of the per-round ratio in interleaved runs."""
        return self._share(self._as_shipped(export_onnx(slim, self.example_inputs,
                                                        Path(self.folder.name) / "slim.onnx")))

    def _as_shipped(self, path) -> str:
        """The ONNX file as it ships: itself, or with int8 its timing model beside it."""
        if not self.int8:
            return path
        int8 = Path(path).with_suffix(".int8.onnx")
        int8.write_bytes(timing_model(path, (self.batch, *self.shape)))
        return str(int8)

    def _share(self, path) -> float:
        timing = bench({"original": self.original, "slim": path}, self.shape, batch_sizes=(self.batch,),
                       threads=self.threads, providers=[self.provider], warmup=3, repeats=self.repeats,
                       samples=self.samples, progress=False, **self.seconds)
        return 1.0 / timing.rows[1]["speedup"]
