"""Ship a slim model: ONNX export checked against onnxruntime, and .pt2 save/load.

torch 2.13 exports to ONNX through onnxscript by default (`dynamo=True`); cpdfx
does not depend on it and uses the TorchScript exporter (`dynamo=False`) on the
captured ATen graph instead. That exporter traces: it records a size as a
value only when the size is read and used through the Python API (`x.size(0)`,
`Tensor.view`, `torch.arange`); through `torch.ops.aten.*` a size is baked in
as a constant, and the batch would be fixed. `_traceable` rewrites the ops
that read the batch size to their Python-API form first.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import os
import warnings
import zipfile

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .passes import set_mode
from .passes.eliminate import KEPT

from .capture import CAPTURED, _install_mode_switch, as_tuple, capture, is_captured
from .cost import batch_values, concrete, cost
from .files import atomic_path
from .report import REPORT
from .version import __version__

META_FILE = "cpdfx.json"


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not compute what the model does."""


class LoadError(ValueError):
    """The file is missing or is not a model saved by cpdfx.save."""


def export_onnx(model, example_inputs, path, *, opset: int = 17, atol: float = 1e-4,
                rtol: float = 1e-3, metadata: dict | None = None) -> str:
    """Write the eval behaviour of a model (or captured graph) to an ONNX file.

    Every input and output has a dynamic batch dim; the outputs are the model's
    output pytree flattened, named by their keys ("logits", "classes") where it
    has keys. The file is checked with onnx.checker and run with onnxruntime at
    a batch size other than the example's: an output further than atol + rtol x
    |expected| from torch raises ExportError. The metadata_props hold the MACs
    per sample and parameters (`cpdfx.macs`, `cpdfx.params`), the pruning
    report (`cpdfx.report`, JSON) when there is one, the cpdfx version and
    `metadata` (values other than strings as JSON). The model is not changed; `path` is written only on success.
    Returns path. A model torch.export cannot trace raises CaptureError."""
    args = as_tuple(example_inputs)
    gm = _eval_graph(model, args)
    bigger = tuple(torch.cat([x, x[:1]]) for x in args)  # a batch size the trace did not see
    with torch.no_grad():
        outputs, expected = gm(*args), gm(*bigger)
    leaves = [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]
    expected = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = _output_names(outputs)
    batch = {name: {0: "batch"} for name in inputs}
    batch.update({name: {0: "batch"} for name, a, b in zip(outputs, leaves, expected) if a.shape != b.shape})
    per_sample = cost(gm, tuple(x[:1] for x in args))
    traceable, buffer = _Leaves(_traceable(gm)), io.BytesIO()
    try:
        with warnings.catch_warnings():  # the exporter warns that it is the legacy one, and per size read
            warnings.simplefilter("ignore")
            torch.onnx.export(traceable, args, buffer, dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=batch)
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(proto)
    except Exception as err:  # the exporter and checker raise many kinds; all mean "no file"
        raise ExportError(f"cpdfx could not export {_describe(model)} to ONNX (opset {opset}): "
                          f"{type(err).__name__}: {first_line(err)}. Ops without an ONNX "
                          f"translation at this opset stop the exporter; a newer opset (up to 20) "
                          f"may have one.") from err
    _check_parity(proto, dict(zip(inputs, bigger)), dict(zip(outputs, expected)), atol, rtol)
    props = {"cpdfx.macs": str(per_sample.macs), "cpdfx.params": str(per_sample.params),
             "cpdfx.version": __version__}
    if REPORT in gm.meta:
        props["cpdfx.report"] = json.dumps(gm.meta[REPORT])
    props.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    onnx.helper.set_model_props(proto, props)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
    return str(path)


def eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a module or cpdfx graph in eval mode; the caller's stays as it was."""
    model = copy.deepcopy(model)
    return set_mode(model, False) if is_captured(model) else model.eval()


def _eval_graph(model, args) -> fx.GraphModule:
    """An eval-mode graph of model that the caller's model does not share."""
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export_onnx takes a torch.nn.Module or a cpdfx graph; got {type(model).__name__}.")
    model = eval_copy(model)
    return model if is_captured(model) else capture(model, args)


class _Leaves(torch.nn.Module):
    """The graph with its outputs flattened: the exporter takes tensors, not ModelOutputs."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return tuple(x for x in pytree.tree_leaves(self.gm(*args)) if isinstance(x, torch.Tensor))


def _output_names(outputs) -> list[str]:
    """Names from the output's keys: "logits", "classes"; "output", "output.0" without."""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            name = ".".join(parts)
            names.append(name if name and not name[0].isdigit() else ".".join(["output"] + parts))
    return names


def _traceable(gm: fx.GraphModule) -> fx.GraphModule:
    """Read sizes through the Python API so that the TorchScript tracer keeps
    them symbolic (see the module docstring); gm is rewritten in place."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is torch.ops.aten.sym_size.int:
            node.op, node.target = "call_method", "size"
        elif any(isinstance(a.meta.get("val"), torch.SymInt) for a in node.all_input_nodes):
            name = node.target._opname
            function = getattr(torch, name, None) or getattr(torch.Tensor, name, None)
            if function is None:
                raise ExportError(f"cpdfx cannot export {node.target} with a dynamic batch: it takes "
                                  f"a size computed from the batch, and has no Python-API form the "
                                  f"ONNX tracer can record.")
            node.target = function
    gm.recompile()
    return gm


def _check_parity(proto, feeds: dict, expected: dict, atol: float, rtol: float) -> None:
    import onnxruntime as ort  # here, not at the top: `import cpdfx` need not load it
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(list(expected), {k: v.numpy() for k, v in feeds.items()})
    for (name, want), have in zip(expected.items(), got):
        want = want.numpy()
        error = np.abs(have.astype(np.float64) - want)
        if have.shape != want.shape or not np.all(error <= atol + rtol * np.abs(want)):
            worst = float(error.max()) if have.shape == want.shape else float("inf")
            raise ExportError(
                f"the ONNX export does not match torch: output {name!r} at batch "
                f"{next(iter(feeds.values())).shape[0]} differs by up to {worst:.3g} (shape "
                f"{have.shape} vs {want.shape}), over the tolerance atol={atol:g} + rtol={rtol:g} "
                f"x |expected|. An op exported with different semantics or a size fixed at "
                f"export time are the usual causes; nothing was written.")


def save(gm: fx.GraphModule, path) -> str:
    """Save a cpdfx graph (from prune or capture) as a torch.export .pt2 file.

    The batch dim stays dynamic; meta["cpdfx_kept"], meta["cpdfx_report"] and
    the mode are kept. The graph is exported in its train-mode form (on a copy)
    so that the loaded graph can be switched both ways: an eval-mode graph has
    lost its dropout rates and batch counters. Returns path; `path` is written
    only on success."""
    if not is_captured(gm):
        raise TypeError(f"cpdfx.save takes a graph from cpdfx.prune or cpdfx.capture; got "
                        f"{type(gm).__name__} (capture it first).")
    train_form = set_mode(copy.deepcopy(gm), True)
    args, dynamic = _example(gm)
    try:
        program = torch.export.export(train_form, args, dynamic_shapes=dynamic)
    except Exception as err:  # torch.export raises many kinds; all mean "cannot save"
        raise ExportError(f"cpdfx could not save the graph: torch.export failed with "
                          f"{type(err).__name__}: {first_line(err)}. cpdfx.save re-exports the "
                          f"graph with a dynamic batch; a graph edited by hand may not allow it.") from err
    meta = {"training": gm.training, "kept": gm.meta.get(KEPT), "report": gm.meta.get(REPORT),
            "pytree_types": _pytree_types(gm)}
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp, extra_files={META_FILE: json.dumps(meta)})
    return str(path)


def load(path) -> fx.GraphModule:
    """A graph saved by `save`, in the mode it was saved in, with its meta."""
    if not os.path.isfile(path):
        raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: there is no such file.")
    if not zipfile.is_zipfile(path):  # checked here: torch.export.load logs a traceback for it
        raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: it is not a .pt2 file (those are "
                        f"zip archives). cpdfx.load reads the .pt2 files cpdfx.save writes.")
    meta = _read_meta(path)
    _import_pytree_types(path, meta.get("pytree_types", ()))
    with _captured_log("torch.export") as logged:  # where torch.export.load puts the real cause
        try:
            program = torch.export.load(path)
        except Exception as err:  # torch.export.load raises many kinds; all mean "cannot load"
            cause = _last_error_line(logged.getvalue()) or f"{type(err).__name__}: {first_line(err)}"
            raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: {cause}. cpdfx.load reads the .pt2 "
                            f"files cpdfx.save writes, with the packages the model came from installed.") from err
    gm = program.module()
    _install_mode_switch(gm, True)  # saved in train form: the train values are the graph's own
    gm.meta[CAPTURED] = True
    if meta["kept"] is not None:  # JSON keys are strings; dims are ints
        gm.meta[KEPT] = {name: {int(d): idx for d, idx in dims.items()} for name, dims in meta["kept"].items()}
    if meta["report"] is not None:
        gm.meta[REPORT] = meta["report"]
    return set_mode(gm, meta["training"])


def _read_meta(path) -> dict:
    """cpdfx's own record in a .pt2 archive, read before torch deserialises the program."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{META_FILE}")]
        if not names:
            raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: it is a zip archive but not one "
                            f"cpdfx.save wrote (it has no {META_FILE}); a plain torch.export file loads with "
                            f"torch.export.load.")
        try:
            return json.loads(archive.read(names[0]))
        except (ValueError, zipfile.BadZipFile) as err:
            raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: its {META_FILE} is damaged "
                            f"({err}).") from None


def _pytree_types(gm: fx.GraphModule) -> list[dict]:
    """The classes in the graph's input and output structure that a package
    registers with torch's pytree (a transformers ModelOutput, a user's own
    output class), by the name torch serialises them under and their module."""
    found, specs = {}, [s for s in (getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None)) if s]
    while specs:
        spec = specs.pop()
        entry = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
        if entry is not None and spec.type.__module__ not in ("builtins", "collections"):
            found[entry.serialized_type_name] = spec.type.__module__
        specs.extend(spec.children())
    return [{"type": name, "module": module} for name, module in sorted(found.items())]


def _import_pytree_types(path, types) -> None:
    """Import the modules that register the saved structure's classes: a fresh
    process has not imported, say, transformers.modeling_outputs yet."""
    for entry in types:
        try:
            importlib.import_module(entry["module"])
        except ImportError as err:
            raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: the model's inputs or outputs are a "
                            f"{entry['type']}, and importing {entry['module']} failed ({err}). Install the "
                            f"package the model came from.") from None
        if not any(t.serialized_type_name == entry["type"] for t in pytree.SUPPORTED_SERIALIZED_TYPES.values()):
            raise LoadError(f"cpdfx could not load {os.fspath(path)!r}: the model's inputs or outputs are a "
                            f"{entry['type']}, which {entry['module']} no longer registers with torch's "
                            f"pytree (another version of its package?).")


@contextlib.contextmanager
def _captured_log(name: str):
    """What logger `name` says at WARNING and above, kept from the console."""
    log, text = logging.getLogger(name), io.StringIO()
    handler, saved = logging.StreamHandler(text), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield text
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = saved


def _last_error_line(log: str) -> str:
    """The exception line at the end of a logged traceback ("NotImplementedError: ...")."""
    lines = [line.split("] ", 1)[-1].strip() for line in log.splitlines()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errors[-1].rstrip(".") if errors else ""


def _example(gm: fx.GraphModule):
    """Inputs of the sizes seen at capture, and their dynamic dims (the batch)."""
    values = batch_values(gm)
    batch = torch.export.Dim("batch", min=1)
    args, dynamic = [], []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shape = [concrete(s if isinstance(s, int) else s.node.expr, values) for s in val.shape]
            args.append(torch.zeros(shape, dtype=val.dtype))
            dynamic.append({d: batch for d, s in enumerate(val.shape) if not isinstance(s, int)} or None)
    return tuple(args), tuple(dynamic)


def _describe(model) -> str:
    return "a cpdfx graph" if is_captured(model) else type(model).__name__


def first_line(err) -> str:
    line = next((s.strip() for s in str(err).splitlines() if s.strip()), type(err).__name__).rstrip(".")
    return line if len(line) <= 300 else line[:297] + "..."
