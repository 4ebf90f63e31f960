"""The `cpdfx` command: compress, prune, distill, export, quantize, bench, inspect, demo.

Every subcommand reads models and data the same way (see `load_model` and
`cpdfx.data.resolve_data`), shows progress bars on long work, and turns the
errors a user can fix into one paragraph on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from . import zoo
from .bench import bench
from .budget import BudgetError, Target
from .capture import CaptureError, capture, first_line
from .compress import REPORT_FILE, compress
from .data import VAL_SHARE, DataError, Part, batches, resolve_data
from .distill import distill, evaluate
from .export import ExportError, LoadError, export_onnx, load, save
from .files import atomic_path, write_json
from .importance import resolve as criterion
from .models import MODELS
from .passes import comb
from .pipeline import INT8_FILE, QAT_TRIGGER, Int8, int8_ready, quantize_plan, run_demo, ship
from .prune import prune
from .quantize import METHODS, QuantizeError, check_int8_runtime, read_model
from .ranks import is_main
from .report import REPORT, format_report
from .runtime import PROVIDERS
from .teacher import METRIC_NAMES, check_teacher, train_teacher
from .weights import from_pretrained, load_weights, save_weights

TASKS = ("classification", "segmentation")
FILE, FOLDER = False, True  # what a subcommand's output arguments name (its `outputs` default)


class UsageError(Exception):
    """Bad input from the command line."""


# -- models, shapes, data ------------------------------------------------------------------

def load_model(spec: str, task: str = "classification", x: torch.Tensor | None = None,
               data=None, weights=None) -> torch.nn.Module:
    """A model from a spec:
    - a built-in name (cpdfx.models: resnet, vgg, unet, ...);
    - a file saved by `cpdfx prune`/`cpdfx.save` (*.pt2);
    - `hf:FAMILY` (a small transformers config: resnet, vit, ...) or
      `hf:ConfigClass(key=value, ...)` (any transformers vision config, random
      weights, built for the task), or `hf:PATH`, a local `save_pretrained`
      folder (its config and trained weights);
    - `package.module:factory` or `package.module:factory(key=value, ...)`.
    A built-in model or a factory that takes `in_channels`, `image_size` or
    `num_classes` gets them from the example input x and the data's classes,
    unless the spec sets them. weights: a state dict file (.pt, .pth,
    .safetensors; see cpdfx.weights) loaded strictly into the model built."""
    if weights is not None and spec.endswith(".pt2"):
        raise UsageError(f"--weights {weights}: {spec} is a saved .pt2 model, which carries its own weights")
    model = _model_from_spec(spec, task, x, data)
    return model if weights is None else load_weights(model, weights)


def _model_from_spec(spec: str, task: str, x, data) -> torch.nn.Module:
    name, kwargs = _call(spec)
    if name in MODELS:
        return _build(spec, MODELS[name], _fit(MODELS[name], kwargs, x, data))
    if spec.endswith(".pt2"):
        return load(spec)
    if name.startswith("hf:"):
        return _transformers_model(name[3:], kwargs, task)
    module_name, _, attr = name.partition(":")
    if not attr:
        raise UsageError(f"unknown model {spec!r}: give a built-in name ({', '.join(MODELS)}), a saved "
                         f"*.pt2 file, hf:FAMILY or hf:ConfigClass(...), or package.module:factory")
    _working_folder_on_path()
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot load model {spec!r}: {err}") from None
    model = _build(spec, factory, _fit(factory, kwargs, x, data))
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _working_folder_on_path() -> None:
    """The working folder first on sys.path, where `python -m cpdfx` has it (the
    console script has its own folder there), so a factory module in it imports."""
    here = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path):
        sys.path.insert(0, here)


def _fit(factory, kwargs: dict, x, data) -> dict:
    """kwargs, with the input channels, image size and class count the factory
    takes filled in from the example input and the data where the spec is silent."""
    known = {}
    if x is not None and x.dim() == 4:
        known.update(in_channels=x.shape[1], image_size=x.shape[2])
    if getattr(data, "classes", None):
        known["num_classes"] = len(data.classes)
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature takes nothing from here
        return kwargs
    return {**{k: v for k, v in known.items() if k in names}, **kwargs}


def _build(spec: str, factory, kwargs: dict):
    """factory(**kwargs) from seed 0: a spec names the same weights in every run,
    so a teacher built from one is the same teacher when a run resumes."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return factory(**kwargs)
    except TypeError as err:  # arguments the factory does not take
        raise UsageError(f"cannot build {spec!r}: {err}") from None


def _call(spec: str) -> tuple[str, dict]:
    """'name(a=1, b="x")' -> ('name', {'a': 1, 'b': 'x'}); 'name' -> ('name', {})."""
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    name, _, args = spec[:-1].partition("(")
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise UsageError(f"cannot read the arguments of {spec!r}: write them as key=value with Python "
                         f"literals, e.g. hf:ViTConfig(image_size=64, num_labels=10)") from None
    if call.args:
        raise UsageError(f"{spec!r}: give the arguments by name (key=value)")
    return name, kwargs


def _transformers_model(name: str, kwargs: dict, task: str) -> torch.nn.Module:
    if name in zoo.FAMILIES:
        return _build(f"hf:{name}", functools.partial(zoo.build, name), kwargs)
    if Path(name).is_dir() or "/" in name or name.startswith((".", "~")):
        return _pretrained_model(name, kwargs, task)
    transformers = zoo._hf()
    config_cls = getattr(transformers, name, None)
    if config_cls is None or not name.endswith("Config"):
        raise UsageError(f"hf:{name}: give a transformers config class (e.g. hf:ViTConfig(...)) or one of "
                         f"the small families {', '.join(zoo.FAMILIES)}")
    auto = (transformers.AutoModelForImageClassification if task == "classification"
            else transformers.AutoModelForSemanticSegmentation)
    try:
        return _build(f"hf:{name}", lambda **kw: auto.from_config(config_cls(**kw)), kwargs)
    except ValueError as err:
        raise UsageError(f"cannot build a {task} model from {name}({kwargs}): {err}") from None


def _pretrained_model(path: str, kwargs: dict, task: str) -> torch.nn.Module:
    """hf:PATH: the model in a local save_pretrained folder, as it was saved."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"hf:{path}: there is no folder {folder}. hf:PATH loads a transformers model saved "
                         f"with save_pretrained into a local folder; cpdfx never downloads (for a model on "
                         f"the Hugging Face Hub, save it to a folder first)")
    if kwargs:
        raise UsageError(f"hf:{path}: a save_pretrained folder takes no arguments; its config.json sets them")
    return from_pretrained(folder, task)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: write the sizes separated by commas, e.g. 2,3,32,32") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: give a batch and the sizes of one input, all positive")
    return shape


def example_input(args, data=None) -> torch.Tensor:
    """The example batch: --input-shape, else two items of the data."""
    if getattr(args, "input_shape", None):
        return torch.randn(parse_shape(args.input_shape))
    if data is not None:
        return torch.stack([data[0][0], data[1][0]])
    raise UsageError("give --input-shape (e.g. 2,3,224,224) or --data to take the shape from")


def model_and_input(args, data=None, weights=None, default: str | None = None):
    """The model and the example batch: --input-shape or the data as in
    example_input, else the shape the model knows (see known_shape), else
    `default` for a built-in model."""
    if getattr(args, "input_shape", None) or data is not None:
        x = example_input(args, data)
        return load_model(args.model, args.task, x, data, weights), x
    if default is not None and _call(args.model)[0] in MODELS:
        x = torch.randn(parse_shape(default))
        return load_model(args.model, args.task, x, weights=weights), x
    model = load_model(args.model, args.task, weights=weights)
    shape = known_shape(args.model, model)
    if shape is None:
        raise UsageError(f"give --input-shape (e.g. 2,3,224,224){' or --data' if hasattr(args, 'data') else ''}: "
                         f"{args.model} does not say what input it takes (a saved .pt2 and an hf: model do)")
    return model, torch.randn(shape)


def known_shape(spec: str, model) -> tuple | None:
    """The input shape, at batch 2, a model knows: a saved .pt2's from the sizes
    its input was captured with; a transformers model's channels from its
    config, its image size from the spec for the hf: families (64, as zoo
    builds them, unless given) and from the config for the others."""
    if isinstance(model, torch.fx.GraphModule):
        inputs = [node.meta.get("val") for node in model.graph.nodes if node.op == "placeholder"]
        if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            return tuple(s if isinstance(s, int) else 2 for s in inputs[0].shape)  # the batch is symbolic
        return None
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, "num_channels", None), int):
        return None
    name, kwargs = _call(spec)
    size = kwargs.get("image_size", 64) if name[3:] in zoo.FAMILIES else getattr(config, "image_size", 64)
    return (2, config.num_channels, *((size, size) if isinstance(size, int) else size))


def load_data(args, split: str, augment=None):
    """One split of --data. A command without --val-share (prune) reads the whole training split."""
    return resolve_data(args.data, args.task, split, augment=augment, image_size=args.image_size,
                        normalize=args.normalize, val_share=getattr(args, "val_share", 0))


def split_note(args, val, test, final: str) -> str:
    """Which images the numbers of a training run are on, for its report;
    `final` names where its test scores are."""
    held_out = ("the data's val/ folder" if not isinstance(val, Part) else
                f"held out of the training data by --val-share {args.val_share:g}")
    return (f"Val: {len(val):,} images ({held_out}), for each epoch's validation and the teacher check. "
            f"Test: {len(test):,} images, read once, after training, for {final}.")


def describe_scores(scores: dict) -> str:
    """{'top1': 0.93} -> 'top-1 93.0%'."""
    return ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.1%}" for k, v in scores.items())


def budget(args) -> dict:
    """macs=, params=, latency= from the flags; --speedup S is latency=1/S."""
    out = {k: getattr(args, k) for k in ("macs", "params") if getattr(args, k, None) is not None}
    if args.speedup is not None:
        if args.speedup <= 1:
            raise UsageError(f"--speedup {args.speedup:g}: give how many times faster the slim model should run, "
                             f"a number above 1, e.g. 2")
        out["latency"] = 1.0 / args.speedup
    if not out:
        raise UsageError("give a budget: --macs or --params (the share of the original to keep, e.g. 0.5), "
                         "--speedup (how many times faster, e.g. 2), or more than one")
    return out


def latency_options(args) -> dict:
    """--speedup's options; with --int8 the speed-up is the slim int8 model's over the fp32 original."""
    return {"batch": args.latency_batch, "tolerance": args.speedup_tolerance,
            **({"int8": True} if args.int8 and args.speedup is not None else {})}


def count_or_share(value: float):
    """--min-keep: a channel count from 1 up, or a share below 1."""
    return int(value) if value >= 1 else value


def check_writable(path, folder: bool, flag: str = "--out") -> None:
    """Refuse, before any work, an output that cannot be written. A file's folder
    must exist; a folder is made with any folders above it, so the nearest one
    that exists is probed, with a real temporary file, since a read-only file
    system or a missing permission shows only then."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: it is a file, and this command writes a folder there")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path}: it is a folder; give the file to write, e.g. {path / 'model'}")
    parent = path if folder else path.parent
    if not folder and not parent.exists():
        raise UsageError(f"cannot write {path}: the folder {parent} does not exist; make it first, or give "
                         f"{flag} a file in a folder that exists")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err} in {parent}") from None


CALIBRATION_BATCH = 32  # images per int8 calibration batch
VAL_IMAGES = 2000  # at most this many validation images compare the int8 calibration methods


def int8_data(args, train=None) -> Int8:
    """What --int8 (and `cpdfx quantize`) calibrate on: --calibration-batches
    batches of the training split, not augmented; and, unless --method names
    one, up to VAL_IMAGES images of the val split to choose the method on."""
    train = load_data(args, "train", augment=False) if train is None else train
    calibration = batches(train, args.calibration_batches, CALIBRATION_BATCH)
    if args.method:
        return Int8(calibration, method=args.method)
    val = load_data(args, "val", augment=False)
    return Int8(calibration, batches(val, -(-VAL_IMAGES // CALIBRATION_BATCH), CALIBRATION_BATCH, shuffle=False))


def int8_path(onnx_path) -> Path:
    """X.int8.onnx beside X.onnx."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".int8.onnx")


def write_report(report: dict, path: Path) -> None:
    print(format_report(report))
    write_json(path, report)
    print(f"\nreport written to {path}")


TEACHER_FILE = "teacher.pt"  # what --train-teacher leaves in --out, for --weights


def ready_teacher(args, teacher, spec: str, weights, weights_flag: str, train, val, out: Path):
    """The teacher to distil from, and a line for the report saying where its
    weights came from. With --train-teacher it is trained first on the training
    split (saved as out/teacher.pt, which --resume reads back). Then it is
    scored on the validation data (the val split: held out of the training
    data by --val-share, or the data's val/ folder; never the test split)
    against chance (cpdfx.teacher), and refused at chance level unless
    --allow-untrained-teacher: distilling from an untrained model teaches
    nothing, and the slim model's score would read as a gain."""
    saved = out / TEACHER_FILE
    origin = f"weights from {weights}" if weights else "as built (no --weights)"
    if args.train_teacher and args.resume and saved.is_file():
        teacher = load_weights(teacher, saved)
        origin = f"trained by the run resumed here, read back from {saved}"
    elif args.train_teacher:
        print(f"training the teacher {spec} on the labels: {args.train_teacher} epoch(s) on "
              f"{len(train):,} training images")
        teacher, _ = train_teacher(teacher, train, val, task=args.task, epochs=args.train_teacher,
                                   batch_size=args.batch_size, lr=args.lr)
        if is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_weights(teacher, saved)
        origin = (f"{origin}, then trained here on the labels for {args.train_teacher} epoch(s) on "
                  f"{len(train):,} training images (weights saved as {saved})")
    check = check_teacher(teacher, val, task=args.task, batch_size=args.batch_size)
    if not check.trained and not args.allow_untrained_teacher:
        if args.train_teacher:
            raise UsageError(
                f"the teacher {spec}, trained for {args.train_teacher} epoch(s) (saved as {saved}), still scores "
                f"{check.describe()}: at chance level it would teach the slim model nothing. Train it longer "
                f"(a larger --train-teacher; {weights_flag} {saved} --train-teacher N continues from it), or "
                f"pass --allow-untrained-teacher to go on anyway")
        raise UsageError(
            f"the teacher {spec}{f' with {weights_flag} {weights}' if weights else ''} scores {check.describe()}: "
            f"at chance level, as an untrained model is (a model built by name starts from random weights). "
            f"Distilling from it would teach the slim model nothing, and the slim model's score would read as "
            f"a gain. Give its trained weights with {weights_flag} PATH (a .pt/.pth state dict or .safetensors), "
            f"train it here first with --train-teacher EPOCHS, or pass --allow-untrained-teacher to go on anyway")
    print(f"teacher {spec}: {check.describe()}{'' if check.trained else '; distilling from it anyway'}")
    return teacher.eval(), [f"original (the teacher): {spec}, {origin}; {check.describe()}."]


# -- subcommands -----------------------------------------------------------------------------

def cmd_inspect(args) -> None:
    model, x = model_and_input(args, weights=args.weights, default="2,3,32,32")
    gm = capture(model.eval(), x)
    groups = comb(gm)
    print(groups.table())
    prunable = sum(g.size for g in groups.prunable)
    print(f"\n{len(groups.prunable)} prunable groups ({prunable} channels) of {len(groups.groups)}")


def cmd_prune(args) -> None:
    shares = budget(args)  # a missing or bad budget is refused before the data and model are read
    if args.int8 and args.speedup is None:
        raise UsageError("--int8 times --speedup as the model will ship, quantized to int8: give --speedup (to "
                         "write the int8 file itself, run cpdfx export --int8 on the slim model)")
    if args.int8:
        check_int8_runtime(args.runtime)
    data = load_data(args, "train", augment=False) if args.data else None
    model, x = model_and_input(args, data, args.weights)
    model = model.eval()
    if data is None and criterion(args.importance).needs_gradients:
        print(f"cpdfx prune: warning: --importance {args.importance} scores the channels on the gradients of "
              f"one random example input of {tuple(x.shape)}, not on images; give --data to score on batches "
              f"of your data (the batch norms are re-estimated on them too)", file=sys.stderr)
    calibration = batches(data, args.calibration_batches, args.batch_size, args.labels) if data is not None else None
    slim = prune(model, x, **shares, importance=args.importance, calibration=calibration,
                 steps=args.steps, reestimate_bn=args.reestimate_bn, round_to=args.round_to, runtime=args.runtime,
                 min_keep=count_or_share(args.min_keep), ignore=tuple(args.ignore or ()),
                 latency_options=latency_options(args))
    out = Path(args.out)
    save(slim, out)
    print(f"\nslim model saved to {out}")
    write_report(slim.meta[REPORT], out.with_name(out.stem + ".report.json"))


def cmd_distill(args) -> None:
    train, val, test = load_data(args, "train"), load_data(args, "val"), load_data(args, "test")
    x = example_input(args, train)
    student = load_model(args.student, args.task, x, train, args.weights)
    teacher = load_model(args.teacher, args.task, x, train, args.teacher_weights)
    for role, spec, model in (("student", args.student, student), ("teacher", args.teacher, teacher)):
        check_runs(model, x, f"the {role} {spec}")
    out = Path(args.out)
    teacher, _ = ready_teacher(args, teacher, args.teacher, args.teacher_weights, "--teacher-weights", train, val,
                               out)
    result = distill(student, teacher, train, val, task=args.task,
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, labels=args.labels,
                     out_dir=out, resume=args.resume)
    save(capture(result.student.eval(), x), out / "student.pt2")  # a plain module is captured to be saved
    report = distill_report(args, teacher, result, val, test)
    print(f"the last epoch (its val_ scores on {len(val):,} val images):")
    print(json.dumps(result.history[-1], indent=1))
    print(f"\ntest, {len(test):,} images: teacher {describe_scores(report['test']['teacher'])}; student "
          f"{describe_scores(report['test']['student'])}\n{report['note']}")
    if is_main():
        write_json(out / REPORT_FILE, report)
    print(f"\ndistilled student saved to {out / 'student.pt2'}, the report to {out / REPORT_FILE}")


def distill_report(args, teacher, result, val, test) -> dict:
    """What `cpdfx distill` writes as report.json: the student's val scores at
    the last epoch, and the teacher's and the student's on the test split,
    scored here once, after training."""
    score = functools.partial(evaluate, data=test, task=args.task, batch_size=args.batch_size)
    last = result.history[-1] if result.history else {}
    return {"val": {"images": len(val), "student": {k[4:]: v for k, v in last.items() if k.startswith("val_")}},
            "test": {"images": len(test), "teacher": score(teacher), "student": score(result.student)},
            "note": split_note(args, val, test, "the test scores (report.json's \"test\")")}


def check_runs(model, x, what: str) -> None:
    """Refuse, before any work, a model that cannot run the example batch (a
    .pt2 captured for other channels or sizes, a model built for other data);
    its mode is left as it was."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as err:  # a forward raises any kind on an input it cannot take
        raise UsageError(f"{what} cannot run on the data's input of {tuple(x.shape)}: {type(err).__name__}: "
                         f"{first_line(err)}") from None
    finally:
        model.train(training)


def cmd_export(args) -> None:
    if args.int8 and not args.data:
        raise UsageError("--int8 calibrates the int8 model on images: give --data (the training split's images "
                         "calibrate it, the val split's choose the calibration method)")
    data = load_data(args, "train", augment=False) if args.data else None
    model, x = model_and_input(args, data, weights=args.weights)
    if not args.int8:
        path = export_onnx(model, x, args.out, opset=args.opset)
        print(f"exported to {path} (checked against onnxruntime)")
        return
    out, plan = Path(args.out), int8_data(args, data)
    check_writable(int8_path(out), FILE)
    with atomic_path(out) as fp32:  # the fp32 file lands only when its int8 model has been written
        export_onnx(model, x, fp32, opset=args.opset)
        try:
            quantize_plan(fp32, int8_path(out), plan, args.task)
        except QuantizeError as err:  # named as the file asked for, not the temporary one
            raise QuantizeError(str(err).replace(str(fp32), str(out))) from None
    print(f"exported to {out} (checked against onnxruntime)")


def cmd_quantize(args) -> None:
    out = Path(args.out) if args.out else int8_path(args.onnx)
    check_writable(out, FILE)
    check_int8_runtime(args.runtime)
    read_model(args.onnx)  # a missing or foreign file is refused before the data is read
    quantize_plan(args.onnx, out, int8_data(args), args.task, args.runtime)


def cmd_bench(args) -> None:
    models, protos = {}, []
    for path in args.onnx:
        name, _, file = path.rpartition("=") if "=" in path else (Path(path).stem, "", path)
        models[name] = file
        protos.append(_read_onnx(file))
    first = next(iter(models.values()))
    shape = parse_shape(args.input_shape)[1:] if args.input_shape else _onnx_shape(protos[0], first)
    result = bench(models, shape, batch_sizes=_ints(args.batch_sizes), threads=args.threads, repeats=args.repeats,
                   min_seconds=args.min_seconds, samples=args.samples)
    print(result.markdown())
    for line in int8_verdicts(models, result.rows):
        print(line)
    if args.out:
        result.to_json(args.out)
    if args.plot:
        result.plot(args.plot)


def int8_verdicts(models: dict, rows: list) -> list[str]:
    """For each int8 file timed beside its fp32 file (X.int8.onnx beside
    X.onnx), one line: its speed-up over the fp32 file at each batch on the
    CPU, and whether int8 pays on this machine (faster at every batch)."""
    names = {Path(file).resolve(): name for name, file in models.items()}
    at = {(r["model"], r["batch"]): r["speedup"] for r in rows if r["device"] == "cpu"}
    lines = []
    for name, file in models.items():
        fp32 = Path(file).resolve().with_name(Path(file).name.replace(".int8.onnx", ".onnx"))
        if not Path(file).name.endswith(".int8.onnx") or fp32 not in names:
            continue
        ratios = {b: at[name, b] / at[names[fp32], b] for m, b in at if m == name}
        times = ", ".join(f"x{v:.2f} at batch {b}" for b, v in ratios.items())
        pays = all(v > 1 for v in ratios.values())
        lines.append(f"{name} against {names[fp32]}: {times}: int8 "
                     + ("pays on this machine" if pays else "does not pay on this machine (ship the fp32 file)"))
    return lines


def _read_onnx(path):
    """The model at path, refused here when onnxruntime could not run it: before
    any timing starts, and naming the file."""
    if not Path(path).is_file():
        raise UsageError(f"no ONNX file at {path!r}")
    try:
        proto = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(proto)
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnx and onnxruntime raise their own kinds for a damaged file
        raise UsageError(f"cannot read {path} as an ONNX model: {type(err).__name__}: "
                         f"{first_line(err)}") from None
    if len(proto.graph.input) != 1:
        raise UsageError(f"bench times models with one input; {path} has {len(proto.graph.input)}")
    return proto


def _onnx_shape(proto, path) -> tuple:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"{path} has no fixed input shape: give --input-shape")
    return shape


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"{text!r}: give integers separated by commas, e.g. 1,8") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"{text!r}: every value must be positive")
    return values


def cmd_compress(args) -> None:
    Target(**budget(args))  # a missing or bad budget is refused before a teacher is checked or trained
    if args.int8:
        check_int8_runtime(args.runtime)
    if args.qat_epochs < 0:
        raise UsageError(f"--qat-epochs {args.qat_epochs}: give a number of epochs, 0 or more")
    train, val, test = load_data(args, "train"), load_data(args, "val"), load_data(args, "test")
    x = example_input(args, train)
    model = load_model(args.model, args.task, x, train, args.weights).eval()
    out = Path(args.out)
    model, training = ready_teacher(args, model, args.model, args.weights, "--weights", train, val, out)
    result = compress(model, x, train, val, task=args.task, **budget(args), importance=args.importance,
                      prune_steps=args.prune_steps, prune_share=args.prune_share, epochs=args.epochs,
                      round_to=args.round_to, runtime=args.runtime, min_keep=count_or_share(args.min_keep),
                      ignore=tuple(args.ignore or ()),
                      latency_options=latency_options(args), labels=args.labels, out_dir=out / "train",
                      resume=args.resume, batch_size=args.batch_size, lr=args.lr, test_data=test)
    slim, plan = result.model, int8_data(args) if args.int8 else None
    if plan is not None:  # on every rank: its scores are summed over them, its fine-tune trains under DDP
        slim, plan = int8_ready(model, slim, x, train, val, plan, args.task, epochs=args.qat_epochs,
                                batch_size=args.batch_size)
    if is_main():  # under torchrun every rank holds the same slim model; one exports, times and reports it
        metric, tested = "top1" if args.task == "classification" else "miou", result.report["test"]
        final = ("the scores in the table (all three scored in onnxruntime: report.json's \"int8\")" if args.int8
                 else "the scores in the table (report.json's \"test\")")
        ship(model, slim, x, test, args.task, out, title=f"cpdfx compress {args.model}",
             training=[*training, split_note(args, val, test, final)],
             scores={"original": tested["teacher"][metric], "slim": tested["student"][metric]}, int8=plan)


def cmd_demo(args) -> None:
    run_demo(args)


# -- the parser ------------------------------------------------------------------------------

def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a budget is the share of the original to keep, in (0, 1]")
    return value


def _val_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: the share of the training data to hold out, in [0, 1)")
    return value


WEIGHTS_HELP = ("trained weights for {}: a state dict in a .pt/.pth file (torch.save(model.state_dict()); "
                "a checkpoint dict holding it under 'state_dict', 'model_state_dict' or 'model' works too) or a "
                ".safetensors file; loaded strictly (every key and shape must fit). Not for a .pt2, which "
                "carries its weights")


def _model_args(p, name="model"):
    p.add_argument(name, help="built-in name (resnet, vgg, unet, ...), a saved *.pt2, hf:FAMILY, "
                              "hf:ConfigClass(key=value, ...), hf:PATH (a local save_pretrained folder), "
                              "or package.module:factory")
    p.add_argument("--weights", help=WEIGHTS_HELP.format(f"the {name}"))
    p.add_argument("--task", choices=TASKS, default="classification", help="default classification")


def _data_args(p, required=False):
    p.add_argument("--data", required=required,
                   help="fashion-mnist, digits, fashion-seg, or a folder (one sub-folder per class; "
                        "images/ and masks/ for segmentation; train/, val/ and test/ splits when present)")
    p.add_argument("--image-size", type=int, default=224, help="image size for folder data (default 224)")
    p.add_argument("--normalize", action="store_true", help="normalise images with the dataset's statistics")


def _budget_args(p):
    p.add_argument("--macs", type=_share, help="share of the MACs to keep, e.g. 0.5")
    p.add_argument("--params", type=_share, help="share of the parameters to keep")
    p.add_argument("--speedup", type=float, help="how many times faster in onnxruntime, e.g. 2 (the latency "
                                                  "budget 1/speedup, timed on this machine)")
    p.add_argument("--latency-batch", type=int, default=8, help="the batch --speedup is timed at (default 8)")
    p.add_argument("--speedup-tolerance", type=float, default=0.0,
                   help="keep a model up to this share slower than --speedup asks when none lands within 7%% "
                        "(e.g. 0.2; default 0: refuse, naming the speed-ups measured); never one more than 7%% faster")
    p.add_argument("--importance", default="fisher",
                   help="fisher (default: per-sample Group Fisher), fisher_batch, taylor, l1, l2, bn_scale, random "
                        "(compress also: learned)")
    p.add_argument("--round-to", type=int, default=None,
                   help="pruned widths a multiple of this (default: the runtime's channel block, finer only "
                        "where the budget needs it; 1 for free channel counts)")
    p.add_argument("--runtime", choices=tuple(PROVIDERS), default="cpu",
                   help="where the slim model will run (onnxruntime provider): sets the default --round-to")
    p.add_argument("--min-keep", type=float, default=1,
                   help="channels every group keeps: a count, or a share below 1 (default 1)")
    p.add_argument("--ignore", nargs="*", help="layer names whose channels are all kept")


def _int8_args(p, flag: bool = True) -> None:
    """The int8 options: --int8 where it is a choice, the calibration method, the calibration batches."""
    if flag:
        p.add_argument("--int8", action="store_true",
                       help=f"also write the model quantized to int8 for onnxruntime on the CPU ({INT8_FILE} beside "
                            f"slim.onnx; X.int8.onnx beside X.onnx), calibrated on --data's training images; with "
                            f"--speedup, the speed-up is the slim int8 model's over the fp32 original")
    p.add_argument("--method", choices=tuple(METHODS),
                   help="the int8 calibration method (default: each tried, and the one with the best top-1, or "
                        "agreement with the fp32 model, on the val split kept)")
    p.add_argument("--calibration-batches", type=int, default=8,
                   help=f"int8 calibration batches of {CALIBRATION_BATCH} training images (default 8)")


def _training_args(p, out: str) -> None:
    """What every command that distils takes: the schedule, labels, the output folder, resuming."""
    p.add_argument("--epochs", type=int, default=5, help="distillation epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (AdamW)")
    p.add_argument("--no-labels", dest="labels", action="store_false", help="distil without labels")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--train-teacher", type=int, metavar="EPOCHS", default=0,
                   help="train the teacher on the labels for EPOCHS first; its weights are saved as "
                        f"{TEACHER_FILE} in --out")
    p.add_argument("--val-share", type=_val_share, default=VAL_SHARE,
                   help=f"the share of the training data held out as the val split, which each epoch's validation "
                        f"and the teacher check read (default {VAL_SHARE:g}; the same images in every run). A folder "
                        f"with a val/ sub-folder uses it instead. The test split is read once, after training")
    p.add_argument("--allow-untrained-teacher", action="store_true",
                   help="distil even from a teacher at chance level on the validation data (refused by "
                        "default: it would teach nothing)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpdfx", description="Make vision models smaller and faster: capture a model as a torch.fx "
        "graph, prune whole channel groups to a MACs, parameter or latency budget, distil the slim model "
        "from the original, export it to ONNX and measure it in onnxruntime.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="the whole job: prune while distilling, export, bench, report",
                       description="Prune a model step by step while distilling it from the original "
                                   "(the CPD schedule), then export both to ONNX, time them in "
                                   "onnxruntime and write report.md, report.json, the models and "
                                   "plots into --out.")
    _model_args(p)
    _data_args(p, required=True)
    _budget_args(p)
    p.add_argument("--input-shape", help="example input shape (default: from the data)")
    _training_args(p, out="cpdfx-out")
    p.add_argument("--prune-steps", type=int, default=5, help="pruning steps in the first half (default 5)")
    p.add_argument("--prune-share", type=float, default=0.5,
                   help="the share of the training steps the pruning steps are spread over (default 0.5)")
    _int8_args(p)
    p.add_argument("--qat-epochs", type=int, default=1,
                   help=f"with --int8: where post-training int8 loses more than {QAT_TRIGGER:g} point on the val "
                        f"split, distil the slim model this many epochs more with int8 rounding in the loop (default "
                        f"1; 0: never)")
    p.set_defaults(run=cmd_compress, outputs={"out": FOLDER})

    p = sub.add_parser("prune", help="one-shot prune to a budget and save the slim model",
                       description="Prune a model once to a MACs, parameter or latency budget and save the "
                                   "slim graph (.pt2) with its report. No weight is trained. Gradient criteria "
                                   "(fisher, taylor) score on batches of --data, or on the example input "
                                   "without it; the batch-norm statistics are re-estimated on those batches.")
    _model_args(p)
    _data_args(p)
    _budget_args(p)
    p.add_argument("--input-shape", help="example input shape, e.g. 2,3,224,224 (default: from --data, or the "
                                         "one a saved .pt2 or an hf: model knows)")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--int8", action="store_true",
                   help="time --speedup as the slim model will ship, quantized to int8 (then export it with "
                        "cpdfx export --int8)")
    p.add_argument("--steps", type=int, default=5,
                   help="prune in this many rounds, scoring the smaller graph again in each (default 5)")
    p.add_argument("--no-bn-reestimate", dest="reestimate_bn", action="store_false",
                   help="keep the batch-norm running statistics of the unpruned model")
    p.add_argument("--no-labels", dest="labels", action="store_false",
                   help="score against the model's own predictions, not the data's labels")
    p.add_argument("--out", default="slim.pt2",
                   help="where to save the slim model (default slim.pt2); its report goes beside it, as "
                        "slim.report.json for slim.pt2")
    p.set_defaults(run=cmd_prune, outputs={"out": FILE})

    p = sub.add_parser("distill", help="train a (slim) student from a teacher",
                       description="Distil a student (usually a slim *.pt2 from `cpdfx prune`) from a "
                                   "teacher on --data; checkpoints every epoch into --out.")
    _model_args(p, "student")
    p.add_argument("teacher", help="the teacher model, in the same forms as the student")
    p.add_argument("--teacher-weights", help=WEIGHTS_HELP.format("the teacher"))
    _data_args(p, required=True)
    _training_args(p, out="cpdfx-distill")
    p.set_defaults(run=cmd_distill, outputs={"out": FOLDER})

    p = sub.add_parser("export", help="export a model to ONNX, checked against onnxruntime",
                       description="Export a model's eval behaviour to ONNX with a dynamic batch; the "
                                   "file is checked with onnx.checker and against onnxruntime.")
    _model_args(p)
    p.add_argument("--input-shape", help="example input shape, e.g. 2,3,224,224 (default: the one a saved .pt2 "
                                         "or an hf: model knows)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the lowest torch's exporter writes)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    _data_args(p)
    p.add_argument("--val-share", type=_val_share, default=VAL_SHARE,
                   help=f"the share of --data's training split held out as the val split --int8 chooses its "
                        f"method on (default {VAL_SHARE:g})")
    _int8_args(p)
    p.set_defaults(run=cmd_export, outputs={"out": FILE})

    p = sub.add_parser("quantize", help="quantize an ONNX model to int8 for the CPU, checked",
                       description="Quantize an ONNX model to int8 (onnxruntime static quantization, QDQ, int8 "
                                   "weights per channel, uint8 activations), calibrated on batches of --data's "
                                   "training split, the calibration method chosen on its val split; the int8 file is "
                                   "checked in onnxruntime and its agreement with the fp32 model printed.")
    p.add_argument("onnx", help="the fp32 ONNX model (from cpdfx export or compress)")
    p.add_argument("--task", choices=TASKS, default="classification", help="default classification")
    _data_args(p, required=True)
    p.add_argument("--val-share", type=_val_share, default=VAL_SHARE,
                   help=f"the share of the training split held out as the val split (default {VAL_SHARE:g})")
    _int8_args(p, flag=False)
    p.add_argument("--runtime", choices=tuple(PROVIDERS), default="cpu",
                   help="where the int8 model will run; only cpu has int8 kernels in onnxruntime")
    p.add_argument("--out", help="the int8 .onnx file to write (default X.int8.onnx beside X.onnx)")
    p.set_defaults(run=cmd_quantize, outputs={"out": FILE})

    p = sub.add_parser("bench", help="time ONNX models side by side in onnxruntime",
                       description="Time ONNX models in onnxruntime (CPU, and CUDA when present) in "
                                   "interleaved runs; the first model is the reference for speed-ups.")
    p.add_argument("onnx", nargs="+", help="ONNX files, optionally named: name=path.onnx")
    p.add_argument("--input-shape", help="input shape with batch, e.g. 1,3,224,224 (default: from the file)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds at least (default 30)")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="and more rounds where those take less, per batch size (default 1.0)")
    p.add_argument("--samples", type=int, default=1,
                   help="time everything this many times in fresh sessions and keep each median (default 1)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.set_defaults(run=cmd_bench, outputs={"out": FILE, "plot": FILE})

    p = sub.add_parser("inspect", help="print the channel groups of a model",
                       description="Capture a model and print its channel groups: size, whether "
                                   "prunable (or why not), and the parameter dims each one touches.")
    _model_args(p)
    p.add_argument("--input-shape", help="example input shape (default: the one a saved .pt2 or an hf: model "
                                         "knows; 2,3,32,32 for a built-in model)")
    p.set_defaults(run=cmd_inspect, outputs={})

    p = sub.add_parser("demo", help="the main job on built-in defaults (Fashion-MNIST)",
                       description="Train a small ResNet on Fashion-MNIST (digits when it is absent), "
                                   "compress it to --macs with distillation, export both to ONNX, time "
                                   "them and write report.md and plots into --out.")
    p.add_argument("--macs", type=_share, default=0.5, help="share of MACs to keep (default 0.5)")
    p.add_argument("--importance", default="fisher")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run, a sixth of the training (the demo says how long it takes before it starts)")
    p.add_argument("--out", default="cpdfx-demo", help="output folder (default cpdfx-demo)")
    p.set_defaults(run=cmd_demo, outputs={"out": FOLDER})
    return parser


USER_ERRORS = (UsageError, CaptureError, BudgetError, DataError, ExportError, LoadError, QuantizeError,
               ValueError, OSError)  # OSError: a file that cannot be read or written (missing, read-only, disk full)

# The Python API's argument names as the library's errors write them, and the flags that
# set them: the CLI tells those errors in its own terms (see in_flags).
FLAGS = {"macs": "--macs", "params": "--params", "latency": "--speedup", "steps": "--steps",
         "prune_steps": "--prune-steps", "prune_share": "--prune-share", "epochs": "--epochs",
         "batch_size": "--batch-size", "lr": "--lr", "out_dir": "--out", "resume": "--resume",
         "labels=False": "--no-labels", "task": "--task", "importance": "--importance", "round_to": "--round-to",
         "min_keep": "--min-keep", "ignore": "--ignore", "runtime": "--runtime",
         "latency_options tolerance": "--speedup-tolerance", "latency_options batch": "--latency-batch",
         "inputs_or_shape": "--input-shape", "val_share": "--val-share",
         "repeats": "--repeats", "min_seconds": "--min-seconds", "samples": "--samples", "threads": "--threads"}
_NAMES = re.compile(r"(?<![\w./-])(%s)(?![\w/])(?:=('[^']*'|[^\s,;:)]*))?"
                    % "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True)))


def in_flags(message: str) -> str:
    """A library error's message in the CLI's terms: each name of FLAGS written
    name=value or name= becomes its flag and value (latency= becomes --speedup,
    its inverse), and so does a bare name that is no plain word (out_dir)."""
    def flag(match):
        name, value = match.groups()
        if value is None and not re.search(r"[_ =]", name):
            return match.group(0)  # steps, epochs, samples: words of the sentence
        value = (value or "").strip("'\"")
        if name == "latency" and re.fullmatch(r"\d*\.?\d+(e-?\d+)?", value) and float(value) > 0:
            value = f"{1 / float(value):g}"
        return FLAGS[name] + (f" {value}" if value not in ("", "True") else "")
    return _NAMES.sub(flag, message)


def main(argv=None) -> int:
    command = "cpdfx"
    try:
        args = build_parser().parse_args(argv)
        command = f"cpdfx {args.command}"
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's pytree deprecations, per copy
        torch._logging.set_logs(all=logging.CRITICAL)  # torch.export's own notes; failures get ours
        for dest, folder in args.outputs.items():
            if getattr(args, dest, None) is not None:
                check_writable(getattr(args, dest), folder, "--" + dest)
        args.run(args)
    except USER_ERRORS as err:  # the CLI's own errors are in its terms already
        message = str(err) if isinstance(err, UsageError) else in_flags(str(err))
        print(f"{command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
