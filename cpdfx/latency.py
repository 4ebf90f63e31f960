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
  counts, so a count inside a block costs what the whole block does;
- other MAC-counted ops (grouped convs, attention, matmuls) cost their MACs at
  the time per MAC the tabled layers run at;
- the rest (norms, activations, adds, pooling) is what the measured full model
  takes beyond the layers, kept as a constant: so the estimate of a pruned
  model errs slow, and `prune(latency=)` measures the result to correct it.

Tables are cached per machine (CPU, cores, threads, onnxruntime version) in
$CPDFX_CACHE (default ~/.cache/cpdfx), so each layer shape is measured once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from .passes.ops import OPS, arg, transposed

from .bench import _machine, bench
from .cost import batch_values, concrete, mac_terms_by_node
from .export import export_onnx
from .files import cache_dir

GRID = (0.125, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # shares of a layer's width the tables are timed at


def channel_block() -> int:
    """The channel block of onnxruntime's CPU convolutions (MLAS NCHWc): 16
    with AVX-512, 8 with AVX2/AVX, else 4 (NEON and others)."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    words = set(flags.split())
    return 16 if "avx512f" in words else 8 if words & {"avx2", "avx"} else 4


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
    threads (default its own); block: the channel block (default
    channel_block()); repeats: timed runs per table point (median kept);
    full_ms: the measured latency of the whole graph at this batch, when the
    caller has it (prune measures it); cache: a folder, or False."""

    def __init__(self, gm, comb, example_inputs=None, *, batch: int = 8, threads: int | None = None,
                 block: int | None = None, repeats: int = 7, full_ms: float | None = None, cache=None,
                 progress: bool = True):
        self.spaces, self.batch, self.threads, self.repeats = comb.spaces, batch, threads, repeats
        self.block = block or channel_block()
        self.values = {s: batch for s in batch_values(gm, example_inputs)}  # every symbolic size is the batch
        self.layers, layer_terms, self.other_terms = [], [], []
        for node, terms in mac_terms_by_node(gm):
            layer = self._layer(node, comb)
            spaces = [[comb.node_dims[n.name][d] for n, d in term] for term in terms]
            if layer is not None:
                self.layers.append(layer)
                layer_terms += spaces
            else:
                self.other_terms += spaces
        self.cache = _Cache(cache, self.block, threads)
        self._measure(progress)
        self.cache.save()
        self.tables = {layer.key: self._table(layer) for layer in self.layers}
        layers_ms = sum(self._layer_ms(layer, {}) for layer in self.layers)
        self.ms_per_mac = layers_ms / max(self._macs(layer_terms, {}), 1)
        self.rest_ms = 0.0 if full_ms is None else max(0.0, full_ms - layers_ms - self._other_ms({}))

    # -- the estimate ------------------------------------------------------------------

    def __call__(self, sizes: dict | None = None) -> float:
        sizes = sizes or {}
        return sum(self._layer_ms(layer, sizes) for layer in self.layers) + self._other_ms(sizes) + self.rest_ms

    def _size(self, space, sizes) -> int:
        return concrete(self.spaces.new_size(space, sizes), self.values)

    def _layer_ms(self, layer: Layer, sizes: dict) -> float:
        grid, table = self.tables[layer.key]
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
        if kind == "conv":
            return _conv_layer(node, comb, self.batch)
        if kind == "linear":
            return _linear_layer(node, comb, self.values)
        return None

    def _grid(self, full: int) -> list[int]:
        return sorted({min(full, _round_up(max(1, round(full * f)), self.block)) for f in GRID})

    def _measure(self, progress: bool) -> None:
        """Time every table point that is not in the cache yet."""
        todo = {}
        for layer in self.layers:
            for point in _points([self._grid(n) for n in layer.full]):
                if self.cache.get(layer.key, point) is None:
                    todo[layer.key, point] = layer
        for (key, point), layer in tqdm(todo.items(), desc="latency tables", unit="point",
                                        disable=not progress or not todo):
            model, shape = layer.build(point)
            self.cache.put(key, point, time_onnx(model, shape, self.threads, repeats=self.repeats))

    def _table(self, layer: Layer):
        grid = [np.array(self._grid(n)) for n in layer.full]
        table = np.array([self.cache.get(layer.key, p) for p in _points(grid)]).reshape([len(g) for g in grid])
        return grid, table


def _points(grid):
    return [tuple(int(v) for v in p) for p in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(grid))]


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
    shape = f"k{kh}x{kw}s{stride}p{padding}d{dilation}hw{h}x{wd}b{batch}"
    xd, od = comb.node_dims[x.name], comb.node_dims[out.name]
    if groups == 1:
        return Layer(f"conv/{cin}x{cout}/{shape}", (xd[1], od[1]), (cin, cout),
                     lambda p: _conv_onnx(batch, p[0], p[1], 1, (kh, kw), stride, padding, dilation, (h, wd)))
    if groups == cin == cout:  # depthwise: one table over the channels
        return Layer(f"dw/{cin}/{shape}", (xd[1],), (cin,),
                     lambda p: _conv_onnx(batch, p[0], p[0], p[0], (kh, kw), stride, padding, dilation, (h, wd)))
    return None


def _linear_layer(node, comb, values) -> Layer | None:
    x, w = arg(node, "input"), arg(node, "weight")
    rows = math.prod(concrete(s if isinstance(s, int) else s.node.expr, values) for s in x.meta["val"].shape[:-1])
    fan_in, fan_out = (int(s) for s in reversed(w.meta["val"].shape))
    xd, od = comb.node_dims[x.name], comb.node_dims[node.name]
    return Layer(f"linear/{fan_in}x{fan_out}/m{rows}", (xd[-1], od[-1]), (fan_in, fan_out),
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


def time_onnx(model: bytes, shape, threads=None, warmup: int = 2, repeats: int = 7) -> float:
    """Median milliseconds of one onnxruntime CPU run of model on random input."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


class _Cache:
    """Measured table points, per machine, in a JSON file (or in memory)."""

    def __init__(self, folder, block, threads):
        import onnxruntime as ort
        machine = _machine(["CPUExecutionProvider"], threads)
        ident = json.dumps([machine["cpu"], machine["cores"], threads, block, ort.__version__])
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
        self.dirty = False

    def get(self, key, point):
        return self.points.get(f"{key}@{','.join(map(str, point))}")

    def put(self, key, point, ms):
        self.points[f"{key}@{','.join(map(str, point))}"] = ms
        self.dirty = True

    def save(self):
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.points, f)
        os.replace(tmp, self.path)


class Measured:
    """The whole model in onnxruntime: its latency, and a slim version's as a
    share of it, timed in interleaved runs (see cpdfx.bench)."""

    def __init__(self, gm, example_inputs, *, batch: int = 8, threads: int | None = None, repeats: int = 20):
        self.folder = tempfile.TemporaryDirectory(prefix="cpdfx-latency-")
        self.example_inputs, self.batch, self.threads, self.repeats = example_inputs, batch, threads, repeats
        self.original = export_onnx(gm, example_inputs, Path(self.folder.name) / "original.onnx")
        self.shape = tuple(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None
        if self.shape is None:
            raise ValueError("a latency budget needs a model with one tensor input")
        with open(self.original, "rb") as f:
            self.full_ms = time_onnx(f.read(), (batch, *self.shape), threads, repeats=repeats)

    def share(self, slim) -> float:
        """slim's median latency over the original's, in the same runs."""
        path = export_onnx(slim, self.example_inputs, Path(self.folder.name) / "slim.onnx")
        result = bench({"original": self.original, "slim": path}, self.shape, batch_sizes=(self.batch,),
                       threads=self.threads, warmup=3, repeats=self.repeats, progress=False)
        return 1.0 / result.rows[1]["speedup"]
