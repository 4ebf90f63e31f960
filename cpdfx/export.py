"""Ship a slim model: ONNX export checked against onnxruntime, and .pt2 save/load.

The ONNX file comes from torch's dynamo exporter (onnxscript): cpdfx re-exports
its eval-mode graph with torch.export, keeping the batch symbolic as capture
did, and hands that ExportedProgram to `torch.onnx.export`. The ATen graph is
translated op by op, so sizes computed from the batch stay symbolic in ONNX.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import os
import re
import tempfile
import traceback
import warnings
import zipfile

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .passes import fold_attention, set_mode
from .passes.eliminate import KEPT

from .capture import CAPTURED, _install_mode_switch, as_tuple, capture, first_line, is_captured
from .cost import batch_values, concrete
from .files import atomic_path
from .report import REPORT, per_image
from .version import __version__

META_FILE = "cpdfx.json"
BATCH = "batch"  # the ONNX name of the dynamic batch dim


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not compute what the model does."""


class LoadError(ValueError):
    """The file is missing or is not a model saved by cpdfx.save."""


def export_onnx(model, example_inputs, path, *, opset: int = 18, atol: float = 1e-4,
                rtol: float = 1e-3, metadata: dict | None = None) -> str:
    """Write the eval behaviour of a model (or captured graph) to an ONNX file.

    Inputs and outputs have a dynamic batch dim named "batch" (a graph captured
    with dynamic_batch=False keeps its one batch size); the outputs are the
    model's output pytree flattened, named by their keys ("logits", "classes")
    where it has keys. The file is checked with onnx.checker and run with
    onnxruntime at a batch size other than the example's (at the example's for
    a static batch): an output further than atol + rtol x |expected| from torch
    raises ExportError. A failure to export raises ExportError naming the op,
    the node and the model part, with the exporter's full log in a file the
    message names. The metadata_props hold the MACs per sample and parameters
    (`cpdfx.macs`, `cpdfx.params`), the pruning report (`cpdfx.report`, JSON)
    when there is one, the cpdfx version and `metadata` (values other than
    strings as JSON). The model is not changed; `path` is written only on
    success. Returns path. A model torch.export cannot trace raises CaptureError.
    torch's exporter translates at opset 18 and up; it converts to a lower
    `opset` where it can and otherwise writes 18 (it does for 17)."""
    args = as_tuple(example_inputs)
    gm = _eval_graph(model, args)
    dynamic = _has_dynamic_batch(gm)
    check = tuple(torch.cat([x, x[:1]]) for x in args) if dynamic else args  # a batch the trace did not see
    outputs, expected = _run(gm, args, check, model)
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    names = _output_names(outputs)
    if not names:  # the exporter writes a graph with no outputs, which onnxruntime refuses cryptically
        raise ExportError(f"cpdfx could not export {_describe(model)} to ONNX: its output "
                          f"({type(outputs).__name__}) holds no tensors, and an ONNX model needs one. "
                          f"A backbone asked for outputs at stages it does not have returns none.")
    proto = _to_onnx(gm, model, inputs, names, opset, path)
    expected = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    _check_parity(proto, dict(zip(inputs, check)), dict(zip(names, expected)), atol, rtol)
    per_sample = per_image(gm, args)
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
    """An eval-mode graph of model that the caller's model does not share, with
    parameters that do not require grad, as at inference. torch's exporter
    traces the graph several times, and scaled_dot_product_attention's output
    layout follows the kernel it would pick, which refuses an attention mask
    that requires grad (a learned position bias): with grad, the traces that see
    parameters as such and the ones that do not disagree on the layout, and a
    `.contiguous()` dropped as a no-op in one leaves an illegal view in the next."""
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export_onnx takes a torch.nn.Module or a cpdfx graph; got {type(model).__name__}.")
    model = eval_copy(model)
    gm = model if is_captured(model) else capture(model, args)
    for param in gm.parameters():
        param.requires_grad_(False)
    return gm


def _has_dynamic_batch(gm: fx.GraphModule) -> bool:
    """Whether any input has a symbolic size (capture's dynamic_batch)."""
    return any(isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape)
               for v in (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"))


def _run(gm, args, check, model):
    """The graph's outputs at the example and at the batch parity is checked at.
    A graph with a static batch refuses other sizes with a guard's bare
    AssertionError; it is said in words here."""
    try:
        with torch.no_grad():
            return gm(*args), gm(*check)
    except Exception as err:  # a guard, a shape error: the inputs do not fit the graph
        sizes = ", ".join(str(tuple(x.shape)) for x, _ in zip(*_example(gm)))
        raise ExportError(f"cpdfx could not export {_describe(model)} to ONNX: the graph does not run on "
                          f"the example inputs ({type(err).__name__}: {first_line(err)}). It takes inputs "
                          f"of sizes {sizes}" + ("" if _has_dynamic_batch(gm) else
                          " only: it was captured with dynamic_batch=False, so it exports at that batch "
                          "size") + ".") from None


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


def _to_onnx(gm, model, inputs, outputs, opset, path) -> onnx.ModelProto:
    """The graph as a checked ONNX model, through torch.export and the dynamo
    exporter. What the exporters print and log goes to a file; a failure
    raises a short ExportError that names the file."""
    log = io.StringIO()
    try:
        with _quiet(log):
            args, dynamic = _example(gm)
            program = torch.export.export(_Leaves(fold_attention(gm)), args, dynamic_shapes=(dynamic,))
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=inputs,
                                             output_names=outputs, verbose=False, report=False, optimize=False)
            _optimize(onnx_program.model)
            _name_batch(onnx_program)
            proto = onnx_program.model_proto
            onnx.checker.check_model(proto)
        return proto
    except Exception as err:  # the exporters and checker raise many kinds; all mean "no file"
        log.write("".join(traceback.format_exception(err)))
        raise ExportError(_explain(err, gm, model, opset, _write_log(log.getvalue(), path))) from None


def _optimize(model) -> None:
    """Fold constants and drop what nothing reads: the exact part of the
    optimizer torch's exporter runs. Its pattern rules take `x + c` and `x - c`
    for no-ops where c is within 1e-8 of 0 (and `x * c`, `x / c` near 1), so
    they drop a model's `+ 1e-8` epsilon; onnxruntime does the fusions itself."""
    import onnxscript.optimizer  # here, not at the top: `import cpdfx` need not load it
    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)


@contextlib.contextmanager
def _quiet(log: io.StringIO):
    """Route the exporters' prints, warnings and log records into log."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            warnings.catch_warnings(record=True) as caught, _captured_log("torch.onnx", log, logging.INFO):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            log.writelines(f"warning: {w.category.__name__}: {w.message}\n" for w in caught)


def _name_batch(onnx_program) -> None:
    """Call the inputs' batch dim "batch" (the exporter says "s0" or so), in
    every shape that mentions it."""
    symbols = {dim.value for value in onnx_program.model.graph.inputs if value.shape is not None
               for dim in value.shape[:1] if isinstance(getattr(dim, "value", None), str)}
    if symbols:
        onnx_program.rename_axes({s: BATCH for s in symbols})


def _write_log(text: str, path) -> str:
    """The exporter's full log in a temporary file (not beside `path`: a failed
    export writes nothing there); its path."""
    stem = re.sub(r"[^\w.-]", "_", os.path.basename(os.fspath(path))) or "model"
    fd, log_path = tempfile.mkstemp(prefix=f"cpdfx-export-{stem}-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return log_path


_NODE = re.compile(r"node %(\w+) : .*?target=([\w.:]+)")


def _explain(err, gm, model, opset, log_path) -> str:
    """A few lines: the op, the node and the model part that failed, the cause."""
    chain, cause = [], err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = next((m for c in chain for m in [_NODE.search(str(c))] if m), None)
    root = chain[-1]
    lines = [f"cpdfx could not export {_describe(model)} to ONNX (opset {opset})."]
    if found is not None:
        name, target = found.groups()
        node = _find_node(gm, name, target)
        lines.append(f"  op:    {target.removeprefix('torch.ops.')}")
        lines.append(f"  node:  {_node_text(node) if node is not None else name}")
        lines.append(f"  part:  {_model_part(node)}")
    lines.append(f"  cause: {type(root).__name__}: {_plain(first_line(root))}")
    lines.append(f"The exporter's full log is in {log_path}.")
    if found is not None and type(root).__name__ == "DispatchError":
        lines.append("The op has no ONNX translation in torch's exporter at this opset; a newer opset may "
                     "have one, or the model part can be changed to use ops that do.")
    return "\n".join(lines)


def _find_node(gm, name, target):
    """The graph's node by the exporter's name, else the first with its op."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return (next((n for n in nodes if n.name == name), None)
            or next((n for n in nodes if str(n.target) == target.removeprefix("torch.ops.")), None))


def _node_text(node) -> str:
    args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in node.args)
    text = f"{node.name} = {node.target}({args})"
    return text if len(text) <= 200 else text[:197] + "..."


def _model_part(node) -> str:
    """The innermost module the node came from, as a path and class ("head.0 (Inner)")."""
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    if not stack:
        return "unknown (the node carries no module path)"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"{path or '(the model itself)'} ({kind.rsplit('.', 1)[-1]})"


def _plain(text: str) -> str:
    """Without terminal colour codes (the exporter colours its messages)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _check_parity(proto, feeds: dict, expected: dict, atol: float, rtol: float) -> None:
    import onnxruntime as ort  # here, not at the top: `import cpdfx` need not load it
    try:  # onnxruntime refuses some files onnx.checker passes (it raises its own kinds)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(list(expected), {k: v.numpy() for k, v in feeds.items()})
    except Exception as err:
        raise ExportError(f"onnxruntime cannot run the ONNX export: {type(err).__name__}: "
                          f"{_plain(first_line(err))}; nothing was written.") from None
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
def _captured_log(name: str, text: io.StringIO | None = None, level: int = logging.WARNING):
    """What logger `name` says at `level` and above, kept from the console (in text)."""
    log, text = logging.getLogger(name), io.StringIO() if text is None else text
    saved = (log.level, log.propagate, log.handlers)
    log.handlers = [logging.StreamHandler(text)]  # torch gives some loggers a console handler of their own
    log.setLevel(level)
    log.propagate = False
    try:
        yield text
    finally:
        log.level, log.propagate, log.handlers = saved


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
