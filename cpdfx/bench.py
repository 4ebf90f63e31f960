"""Latency of ONNX models (and, for reference, torch models) on this machine.

Runs are interleaved, one model after another round after round, so that
drift (thermal throttling, turbo, other load) hits every model alike; the
speed-up of a model is the median, over the rounds, of the first model's
time in a round over its own in the same round: two runs a few milliseconds
apart see the same machine, so the ratio of a round holds where the times
themselves drift (on a shared 2-core VM, a model's times spread by 20-40%
within one run, and the ratio of the two medians moved by 15% between
three runs, where the median ratio moved by 1%).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from .export import eval_copy
from .files import atomic_path, write_json

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@dataclass
class BenchResult:
    """rows: one dict per model, runtime ("onnxruntime" or "torch"), device
    ("cpu" or "cuda") and batch size, with median_ms, p90_ms, images_per_s,
    speedup (against the first model of the same runtime, device and batch:
    the median over the rounds of its time over this model's), repeats (timed
    rounds) and samples (separate timings, each number their median).
    machine: what it ran on. models: name -> ONNX path."""
    rows: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    def to_json(self, path) -> str:
        write_json(path, asdict(self))
        return str(path)

    @classmethod
    def from_json(cls, path) -> "BenchResult":
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))

    def markdown(self) -> str:
        """The rows as a markdown table, then the machine in one line."""
        lines = ["| model | runtime | device | batch | median ms | p90 ms | images/s | speed-up |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['device']} | {r['batch']} | "
                         f"{r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['images_per_s']:.1f} | "
                         f"{r['speedup']:.2f}x |")
        m = self.machine
        lines.append(f"\n{m['cpu']}, {m['cores']} cores, {m['threads'] or 'default'} threads; "
                     f"onnxruntime {m['onnxruntime']} ({', '.join(m['providers'])}), torch {m['torch']}; "
                     f"{self._counts()}.")
        return "\n".join(lines)

    def _counts(self) -> str:
        repeats = min((r["repeats"] for r in self.rows), default=0)
        samples = max((r.get("samples", 1) for r in self.rows), default=1)  # older files have no samples
        runs = f"median of {repeats} or more interleaved runs"
        return runs if samples == 1 else f"{runs}, then the median of {samples} such timings in fresh sessions"

    def plot(self, path, macs: dict | None = None, accuracy: dict | None = None, metric: str = "top-1") -> str:
        """A PNG of bars: the median latency of each model, one panel per
        runtime, device and batch (ms per run of the batch, as markdown() has
        it), and the metric in percent when accuracy (name -> fraction, as
        evaluate returns it) is given. Every axis starts at 0, so a bar's height
        is its value and a small difference looks small; the values are written
        on the bars. MACs per image (default: the `cpdfx.macs` metadata of each
        ONNX file) label the models."""
        from matplotlib.figure import Figure  # no pyplot: the global backend stays as it was

        macs = {**self._onnx_macs(), **(macs or {})}
        series = {}
        for r in self.rows:
            series.setdefault(f"{r['runtime']} {r['device']}, batch {r['batch']}", []).append(r)
        fig = Figure(figsize=(3.2 * (len(series) + bool(accuracy)) + 1, 4.2))
        axes = fig.subplots(1, len(series) + bool(accuracy), squeeze=False)[0]
        for ax, (label, rows) in zip(axes, series.items()):
            _bars(ax, [_model_label(r["model"], macs) for r in rows], [r["median_ms"] for r in rows],
                  "{:.3f} ms", label, "median latency per run (ms)")
        if accuracy:
            _bars(axes[-1], [_model_label(n, macs) for n in accuracy], [100 * a for a in accuracy.values()],
                  "{:.2f}%", metric, f"{metric} (%)", top=100)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        return str(path)

    def _onnx_macs(self) -> dict:
        out = {}
        for name, path in self.models.items():
            props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
            if "cpdfx.macs" in props:
                out[name] = int(props["cpdfx.macs"])
        return out


def _model_label(name: str, macs: dict) -> str:
    return f"{name}\n{macs[name] / 1e6:.2f} MMACs" if name in macs else name


def _bars(ax, labels, values, fmt: str, title: str, ylabel: str, top=None) -> None:
    """Bars from 0 with their values written on them."""
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
    ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
    ax.set_ylim(0, top or max(values) * 1.15)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", labelsize=8)


def bench(models: dict, inputs_or_shape, *, batch_sizes=(1, 8), threads: int | None = None,
          providers=None, warmup: int = 5, repeats: int = 30, min_seconds: float = 1.0,
          max_seconds: float | None = None, samples: int = 1, torch_models: dict | None = None,
          progress: bool = True) -> BenchResult:
    """Time ONNX models with onnxruntime: models maps names to ONNX paths, the
    first is the reference for the speed-ups.

    inputs_or_shape: the shape of the (single) input, with or without the batch
    dim (random normal float32 data), or an array/tensor whose rows are repeated
    to each batch size. providers: onnxruntime providers to time (default the
    CPU one, and CUDA when onnxruntime has it). threads: intra-op threads of
    onnxruntime and torch (default theirs). torch_models (name -> module or
    cpdfx graph) are timed in eval mode the same way, on CPU and on CUDA when
    torch has it; they are copied, not changed. repeats: timed rounds (one run
    of each model) at least, and more where they would take under
    min_seconds in all (as timeit's autorange): a 3 ms model timed 30 times
    gives a median that moves by 5-10% between two runs. max_seconds: fewer
    rounds (3 at least) where `repeats` would take longer, for models that
    run for seconds. samples: the whole timing done that many times, each in
    fresh sessions, and each row's median over them kept (a session's own
    placement, its memory and its threads' cores, moves its times by a few
    percent, which longer runs of the same session do not average out)."""
    if not models:
        raise ValueError("bench needs at least one ONNX model: models={name: path}")
    if samples < 1:
        raise ValueError(f"samples={samples}: bench times each model in at least one sample")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: bench times at least one round of each model")
    if threads is not None and threads < 0:
        raise ValueError(f"threads={threads}: give a number of threads, or 0 for the runtime's default")
    available = ort.get_available_providers()
    providers = list(providers or [CPU] + ([CUDA] if CUDA in available else []))
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"onnxruntime here has no {', '.join(missing)}; it has {', '.join(available)}")
    torch_models = {name: eval_copy(m) for name, m in (torch_models or {}).items()}
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if torch_models else []
    rank = _check_inputs(models, inputs_or_shape)
    groups = len(batch_sizes) * (len(providers) * len(models) + len(devices) * len(torch_models))
    bar = tqdm(total=samples * groups * (warmup + repeats), desc="bench", unit="run", disable=not progress)
    rounds = dict(warmup=warmup, repeats=repeats, min_seconds=min_seconds, max_seconds=max_seconds, bar=bar)
    rows = []
    with torch_threads(threads):
        for batch in batch_sizes:
            x = _batch(inputs_or_shape, batch, rank)
            for provider in providers:
                sessions = lambda: {name: _ort_run(path, x, provider, threads) for name, path in models.items()}
                rows += _sampled(sessions, samples, rounds, "onnxruntime", "cuda" if provider == CUDA else "cpu", batch)
            for device in devices:
                runs = lambda: {name: _torch_run(m, x, device) for name, m in torch_models.items()}
                rows += _sampled(runs, samples, rounds, "torch", device, batch)
    bar.close()
    return BenchResult(rows, _machine(providers, threads), {k: str(v) for k, v in models.items()})


def _input_sizes(path) -> list:
    """The sizes the model's one input declares: ints, None where free (the batch)."""
    graph = onnx.load(path, load_external_data=False).graph
    if len(graph.input) != 1:
        raise ValueError(f"bench times models with one input; {path} has {len(graph.input)}")
    return [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]


def _check_inputs(models: dict, inputs_or_shape) -> int:
    """The rank of the models' input, each model's declared sizes checked
    against one item of the input given: a shape a model cannot run is refused
    here, before any timing, naming the file."""
    sizes = {path: _input_sizes(path) for path in models.values()}
    rank = len(next(iter(sizes.values())))
    item = _item_shape(inputs_or_shape, rank)
    for path, declared in sizes.items():
        if len(declared) != len(item) + 1 or any(d not in (None, s) for d, s in zip(declared[1:], item)):
            takes = ", ".join(str(d or "any") for d in declared[1:])
            raise ValueError(f"inputs_or_shape: {path} takes an input of (batch, {takes}), not (batch, "
                             f"{', '.join(map(str, item))})")
    return rank


def _item_shape(inputs_or_shape, rank: int) -> tuple:
    """The shape of one item: a shape's last rank - 1 sizes (it may hold the batch), an input's rows."""
    if isinstance(inputs_or_shape, (tuple, list, torch.Size)):
        return tuple(inputs_or_shape)[-(rank - 1):] if rank > 1 else ()
    return tuple(inputs_or_shape.shape[1:])


def _batch(inputs_or_shape, batch: int, rank: int) -> np.ndarray:
    """batch inputs: random for a shape, else the given rows repeated."""
    if isinstance(inputs_or_shape, (tuple, list, torch.Size)):
        shape = _item_shape(inputs_or_shape, rank)
        return np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    x = np.asarray(inputs_or_shape.detach().cpu() if isinstance(inputs_or_shape, torch.Tensor) else inputs_or_shape)
    return np.resize(x, (batch, *x.shape[1:]))


def session_options(threads=None) -> ort.SessionOptions:
    """onnxruntime options for timing several sessions in one process: intra-op
    threads that block when idle instead of spinning, since a session's
    spinning threads would take the cores from the next session timed (10
    interleaved ResNet-50 sessions at batch 1 measured the original 3.5x slow)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def _ort_run(path, x, provider, threads):
    session = ort.InferenceSession(str(path), session_options(threads), providers=[provider])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def _torch_run(model, x, device):
    model = model.to(device)
    x = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            model(x)
        sync()
    return run


def _interleave(runs: dict, warmup: int, repeats: int, min_seconds: float, max_seconds: float | None,
                bar) -> dict:
    """Seconds per run of each model: warm-up runs, then rounds round-robin,
    each starting at the next model so none always follows the same one, as
    many as _round_count says."""
    last = {}
    for name, run in runs.items():
        for _ in range(warmup):
            start = time.perf_counter()
            run()
            last[name] = time.perf_counter() - start
            bar.update()
    rounds = _round_count(sum(last.values()), repeats, min_seconds, max_seconds)
    bar.total += (rounds - repeats) * len(runs)
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            bar.update()
    return times


def _round_count(warm: float, repeats: int, min_seconds: float, max_seconds: float | None) -> int:
    """Rounds for models whose round took `warm` seconds in the warm-up:
    `repeats`, more to fill min_seconds, fewer (3 at least) to stay within
    max_seconds. Without a warm-up to go by, `repeats`."""
    if not warm:
        return repeats
    rounds = max(repeats, math.ceil(min_seconds / warm))
    if max_seconds is not None:
        rounds = min(rounds, max(3, math.floor(max_seconds / warm)))
    return rounds


def _sampled(make_runs, samples: int, rounds: dict, runtime: str, device: str, batch: int) -> list:
    """The rows of `samples` interleaved timings, each of fresh runs from
    make_runs(), as one (see _median_rows)."""
    return _median_rows([_rows(_interleave(make_runs(), **rounds), runtime, device, batch) for _ in range(samples)])


def _median_rows(samples: list) -> list:
    """The rows of several timings of the same models (one list of rows per
    sample) as one: each time and speed-up the median over the samples,
    repeats the fewest rounds a sample had."""
    out = []
    for same in zip(*samples):
        row = {**same[0], **{key: float(np.median([r[key] for r in same]))
                             for key in ("median_ms", "p90_ms", "speedup")}}
        row.update(images_per_s=row["batch"] / row["median_ms"] * 1e3, repeats=min(r["repeats"] for r in same),
                   samples=len(same))
        out.append(row)
    return out


def _rows(times: dict, runtime: str, device: str, batch: int) -> list:
    """A row per model of times (name -> seconds of each round, the first model
    the reference); the speed-up is the median of the per-round ratios."""
    medians = {name: float(np.median(t)) for name, t in times.items()}
    reference = np.asarray(next(iter(times.values())))
    return [{"model": name, "runtime": runtime, "device": device, "batch": batch,
             "median_ms": medians[name] * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3,
             "images_per_s": batch / medians[name], "speedup": float(np.median(reference / np.asarray(t))),
             "repeats": len(t)} for name, t in times.items()]


@contextlib.contextmanager
def torch_threads(threads):
    """torch.set_num_threads for the block, then back to what it was."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _machine(providers, threads) -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "onnxruntime": ort.__version__,
            "providers": providers, "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform()}
