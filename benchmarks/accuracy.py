"""Accuracy after compression on a standard architecture, 3 seeds a row.

    python benchmarks/accuracy.py --parts teachers   # train and cache both teachers (~25 min here)
    python benchmarks/accuracy.py                    # every row (~1 h on 2 cores), speed-ups, the table
    python benchmarks/accuracy.py --quick            # a dry run on tiny subsets (~3 min)
    python benchmarks/accuracy.py --methods kd latency --macs 0.5 0.25 --no-seg --speed-threads 1 \
        --teacher-epochs 6 --cache /tmp/acc-speed --out benchmarks/results/accuracy_speed.json
                                                     # latency vs MACs budget (~40 min)

Classification teacher: transformers' ResNet-18 (ResNetConfig, basic blocks,
depths 2-2-2-2, widths 64-128-256-512, 11.2M parameters; one input channel),
trained on the 60k Fashion-MNIST images (flip + crop) with SGD, and tested on
the 10k. Why ResNet-18: it is the architecture pruning papers report first, its
residual adds couple channels across every block of a stage (the combing pass's
hard case), and an epoch of it takes about a minute on two CPU cores at 28x28.
Segmentation teacher: cpdfx's U-Net (UNetTiny) on FashionSegmentation canvases.
Both are trained once (their per-epoch test scores are kept, to show where they
level off) and cached in --cache.

Rows, each for every seed, all on the same data, epochs, optimizer and
schedule (--epochs over --train-size images; pruning in the first half):
  kd        cpdfx.compress: CPD schedule, Fisher, logit KD + labels
  plain     the same with labels only
  tp+plain  Torch-Pruning's group-L2 MetaPruner (global, round_to = this CPU's
            channel block) to the same MACs, then cpdfx.distill on labels only
  learned   cpdfx.compress(importance="learned") with KD
  latency   cpdfx.compress with KD to a speed-up (--speedups) instead of a
            MACs share: the same schedule, each pruning step timed in
            onnxruntime (--speed-threads threads, batch 8), channels ranked by
            importance per millisecond. Its rows against the kd rows are
            the latency budget's ranking against the MACs budget's, compared
            at the speed each measures in the one run of --parts speed.
  seg kd / seg plain   the segmenter at 50% MACs, CWD vs labels only
Rows run --jobs at a time, one thread each, in their own processes. Every
row's slim model is exported to ONNX; once all rows are in, their speed-ups
over the teacher are timed in onnxruntime (batch 8, nothing else running).
Rows already in --out are kept (--redo runs them again), so an interrupted run
resumes. --out holds a list of rows: model, task, method, target_macs (or
target_speedup), seed, teacher, student, macs, params, epochs (fractions), and
more.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

import cpdfx
from cpdfx import zoo
from cpdfx.compress import compress
from cpdfx.data import FashionSegmentation, fashion_mnist
from cpdfx.distill import distill, evaluate
from cpdfx.files import write_json
from cpdfx.models import UNetTiny
from cpdfx.runtime import channel_block

sys.path.insert(0, str(Path(__file__).parent))
from distill_fashion import machine, subset  # noqa: E402
from latency_resnet50 import torch_pruning  # noqa: E402  (the peer, as its users run it)

MODEL, SEG_MODEL = "hf-resnet18", "unet-tiny"


# -- teachers ---------------------------------------------------------------------------


def classifier() -> torch.nn.Module:
    return zoo.build("resnet18", small=False, num_channels=1)


def segmenter() -> torch.nn.Module:
    return UNetTiny(num_classes=len(FashionSegmentation.classes), in_channels=1)


def fashion(args, seed=0, size=None):
    """(train, test): `size` training images drawn by seed (all 60k when None),
    augmented, and the test set whole (or --test-size of it)."""
    train = fashion_mnist("train", augment=True, normalize=True, seed=seed)
    test = fashion_mnist("test", normalize=True)
    return subset(train, size, seed), subset(test, args.test_size, 0)


def canvases(args, seed=0):
    common = dict(canvas=args.canvas, items=2, normalize=True)
    return (FashionSegmentation("train", length=args.seg_train_size, augment=True, seed=seed, **common),
            FashionSegmentation("test", length=args.seg_val_size, **common))


def teacher_path(args, task) -> Path:
    if task == "classification":
        name = f"{MODEL}-e{args.teacher_epochs}-lr{args.teacher_lr:g}{'-quick' if args.quick else ''}.pt"
    else:
        name = f"{SEG_MODEL}-c{args.canvas}-n{args.seg_train_size}-e{args.seg_teacher_epochs}" \
               f"{'-quick' if args.quick else ''}.pt"
    return Path(args.cache) / name


def train_teacher(args, task) -> dict:
    """Train one teacher from seed 0 and cache its weights with how it was trained."""
    path = teacher_path(args, task)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["info"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if task == "classification":
        model = classifier()
        train, test = fashion(args, size=args.train_size if args.quick else None)  # all 60k but in a dry run
        result = distill(model, None, train, test, epochs=args.teacher_epochs, batch_size=128, optimizer="sgd",
                         lr=args.teacher_lr, weight_decay=5e-4, clip_grad=None, warmup=0.02,
                         progress=args.progress)
    else:
        model = segmenter()
        train, test = canvases(args)
        result = distill(model, None, train, test, task=task, epochs=args.seg_teacher_epochs,
                         batch_size=args.seg_batch, lr=2e-3, progress=args.progress)
    metric = "val_top1" if task == "classification" else "val_miou"
    info = {"task": task, "train_s": round(time.perf_counter() - t0, 1), "epochs": len(result.history),
            "per_epoch": [round(h[metric], 4) for h in result.history], "machine": machine(),
            "command": " ".join(["python"] + sys.argv), "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": result.student.state_dict(), "info": info}, path)
    return info


def load_teacher(args, task) -> torch.nn.Module:
    model = classifier() if task == "classification" else segmenter()
    saved = torch.load(teacher_path(args, task), map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


# -- rows -------------------------------------------------------------------------------

METHODS = ("kd", "plain", "tp+plain", "learned", "latency")


def specs(args) -> list[dict]:
    """Every row this invocation asks for, in the order they run."""
    out = []
    for seed in args.seeds:
        for share in args.macs if args.classification else ():
            for method in (m for m in args.methods if m != "latency"):
                if method != "learned" or share in args.learned_macs:
                    out.append({"task": "classification", "method": method, "target_macs": share, "seed": seed})
        if args.classification and "latency" in args.methods:
            out += [{"task": "classification", "method": "latency", "target_speedup": speedup, "seed": seed}
                    for speedup in args.speedups]
        if args.seg:
            for method in (m for m in args.methods if m in ("kd", "plain")):
                out.append({"task": "segmentation", "method": method, "target_macs": 0.5, "seed": seed})
    return out


def target(row) -> float:
    """What the row was pruned to: a share of the MACs, or (latency rows) a speed-up."""
    return row["target_speedup"] if row["method"] == "latency" else row["target_macs"]


def key(row) -> tuple:
    return row["task"], row["method"], target(row), row["seed"]


def training(args, task) -> dict:
    """The optimiser and schedule every row of a task shares (the teachers' own:
    SGD for the ResNet, AdamW for the U-Net)."""
    if task == "classification":
        return dict(epochs=args.epochs, batch_size=args.batch, optimizer="sgd", lr=args.lr, weight_decay=5e-4)
    return dict(epochs=args.seg_epochs, batch_size=args.seg_batch, lr=2e-3, loss={"kind": args.seg_loss})


def run_row(args, spec) -> dict:
    """Train one row in this process (one thread) and export its slim model."""
    torch.set_num_threads(args.threads)
    task, method, seed = spec["task"], spec["method"], spec["seed"]
    teacher = load_teacher(args, task)
    train, test = fashion(args, seed, args.train_size) if task == "classification" else canvases(args, seed)
    example = torch.randn(2, *train[0][0].shape)
    options = {**training(args, task), "task": task, "seed": seed, "progress": args.progress}
    t0 = time.perf_counter()
    if method == "tp+plain":
        pruned = torch_pruning(teacher, example, spec["target_macs"], round_to=channel_block("cpu"))
        if pruned is None:
            raise ValueError(f"Torch-Pruning found no ratio that reaches {spec['target_macs']:.1%} of the MACs")
        result = distill(pruned, None, train, test, **options)
        student = result.student
    else:
        budget = ({"latency": 1 / spec["target_speedup"], "latency_options": {"threads": args.speed_threads}}
                  if method == "latency" else {"macs": spec["target_macs"]})
        result = compress(teacher, example, train, test, **budget, plain=method == "plain",
                          importance="learned" if method == "learned" else "fisher", prune_steps=args.prune_steps,
                          learned_options=args.learned_options if method == "learned" else None, **options)
        student = result.model
    seconds = time.perf_counter() - t0
    metric = "top1" if task == "classification" else "miou"
    slim, full = cpdfx.cost(student, example), cpdfx.cost(teacher, example)
    onnx = Path(args.cache) / "onnx" / ("-".join(str(v) for v in key(spec)) + ".onnx")
    onnx.parent.mkdir(parents=True, exist_ok=True)
    cpdfx.export_onnx(student, example, onnx)
    teacher_info = torch.load(teacher_path(args, task), map_location="cpu", weights_only=True)["info"]
    row = {"model": MODEL if task == "classification" else SEG_MODEL, **spec,
           "teacher": teacher_info["per_epoch"][-1], "student": evaluate(student, test, task=task)[metric],
           "macs": slim.macs / full.macs, "params": slim.params / full.params, "epochs": options["epochs"],
           "seconds": round(seconds, 1),
           "per_epoch": [round(h[f"val_{metric}"], 4) for h in result.history], "onnx": str(onnx),
           "train_size": len(train), "machine": machine(), "command": " ".join(["python"] + sys.argv)}
    if task == "segmentation" and method != "plain":
        row["loss"] = args.seg_loss
    if method == "learned":
        row["learned"] = result.report["learned"]  # the options, and the gates' trace along the path
    return row


def merge_into(path: Path, row: dict) -> list:
    """Add (or replace) one row in the JSON at path, re-read first: two
    invocations (say, one running the learned rows) can share one file."""
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if key(r) != key(row)]
    rows = sorted(rows + [row], key=key)
    write_json(path, rows)
    return rows


def run_rows(args, done: list) -> list:
    """Run the rows not in `done`, --jobs at a time; write --out after each."""
    have = {key(r) for r in done}
    todo = [s for s in specs(args) if args.redo or key(s) not in have]
    rows = list(done)
    print(f"{len(todo)} rows to run, {args.jobs} at a time", file=sys.stderr, flush=True)
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        running = {pool.submit(run_row, args, spec): spec for spec in todo}
        for job in futures.as_completed(running):
            spec = running[job]
            try:
                row = job.result()
            except Exception as err:  # noqa: BLE001  (a failed row is reported, the others go on)
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {key(spec)}: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
                continue
            rows = merge_into(Path(args.out), row)
            print(f"[{time.strftime('%H:%M:%S')}] {key(row)}: {row['student']:.4f} (teacher {row['teacher']:.4f}),"
                  f" MACs {row['macs']:.1%}, params {row['params']:.1%}, {row['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    return rows


# -- speed and the table ----------------------------------------------------------------


def measure_speed(args, rows) -> list:
    """Each row's onnxruntime speed-up over its teacher, batch 8, CPU, timed in
    one interleaved run per task (nothing else should be running)."""
    for task in ("classification", "segmentation"):
        mine = [r for r in rows if r["task"] == task and Path(r["onnx"]).is_file()]
        if not mine:
            continue
        teacher = load_teacher(args, task)
        example = torch.randn(2, *(fashion(args)[1] if task == "classification" else canvases(args)[1])[0][0].shape)
        reference = Path(args.cache) / "onnx" / f"{task}-teacher.onnx"
        cpdfx.export_onnx(teacher, example, reference)
        models = {"teacher": reference, **{"-".join(map(str, key(r))): r["onnx"] for r in mine}}
        result = cpdfx.bench(models, tuple(example.shape[1:]), batch_sizes=(8,), threads=args.speed_threads,
                             repeats=args.repeats, progress=args.progress)
        speedups = {row["model"]: row["speedup"] for row in result.rows}
        for r in mine:
            r["speedup"] = speedups["-".join(map(str, key(r)))]
            r["speed_machine"] = result.machine
    return rows


def _stat(values, scale=100, digits=2) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(rows) -> str:
    """Mean ± std over the seeds of each (task, method, target): the MACs
    budgets first, largest first, then the speed-ups asked, smallest first."""
    lines = ["| task | method | target | seeds | teacher | student | vs teacher | MACs | params | "
             "speed-up (ORT CPU, b8) | time s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        by_speed = r["method"] == "latency"
        order = target(r) if by_speed else -target(r)
        groups.setdefault((r["task"], by_speed, order, METHODS.index(r["method"])), []).append(r)
    for (task, by_speed, order, _), rs in sorted(groups.items()):
        asked = f"x{order:g}" if by_speed else f"{-order:.1%}"
        speedups = [r["speedup"] for r in rs if "speedup" in r]
        lines.append(f"| {task} | {rs[0]['method']} | {asked} | {len(rs)} | {_stat([r['teacher'] for r in rs])} "
                     f"| {_stat([r['student'] for r in rs])} | {_stat([r['student'] - r['teacher'] for r in rs])} "
                     f"| {_stat([r['macs'] for r in rs], digits=1)} | {_stat([r['params'] for r in rs], digits=1)} "
                     f"| {_stat(speedups, 1) if speedups else '-'} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["teachers", "rows", "speed"],
                        choices=["teachers", "rows", "speed"])
    parser.add_argument("--quick", action="store_true", help="tiny subsets and one epoch: checks the script runs")
    parser.add_argument("--cache", default="/tmp/cpdfx-accuracy", help="teachers and slim ONNX models")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--teacher-lr", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=30000, help="training images of each row (by seed)")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--canvas", type=int, default=48)
    parser.add_argument("--seg-train-size", type=int, default=8000)
    parser.add_argument("--seg-val-size", type=int, default=1000)
    parser.add_argument("--seg-teacher-epochs", type=int, default=12)
    parser.add_argument("--seg-batch", type=int, default=64)
    parser.add_argument("--seg-loss", default="cwd", choices=["cwd", "kd"],
                        help="the segmenter's distillation: channel-wise (CWD) or pixel-wise KD")
    parser.add_argument("--teacher-threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/accuracy.json", help="the rows (kept across runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--learned-macs", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0],
                        help="the latency rows' speed-ups (onnxruntime CPU, batch 8)")
    parser.add_argument("--learned-options", type=json.loads, default=None,
                        help='the learned rows\' learned_options, as JSON (e.g. \'{"penalty": 4}\')')
    parser.add_argument("--no-seg", dest="seg", action="store_false", help="no segmentation rows")
    parser.add_argument("--no-classification", dest="classification", action="store_false",
                        help="no classification rows")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--prune-steps", type=int, default=5)
    parser.add_argument("--seg-epochs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="rows trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each row")
    parser.add_argument("--redo", action="store_true", help="run rows again that --out already holds")
    parser.add_argument("--repeats", type=int, default=30, help="onnxruntime runs per model for the speed-ups")
    parser.add_argument("--speed-threads", type=int, default=None, help="onnxruntime threads (default: all)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.test_size, args.teacher_epochs, args.epochs, args.seeds = 1024, 500, 1, 1, [0]
        args.seg_train_size, args.seg_val_size, args.seg_teacher_epochs, args.canvas = 256, 64, 1, 32
        args.seg_epochs, args.seg_batch, args.batch, args.repeats = 1, 16, 32, 5
        args.out = str(Path(args.cache) / "quick.json")
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if "teachers" in args.parts:
        torch.set_num_threads(args.teacher_threads)
        for task in ("classification",) + (("segmentation",) if args.seg else ()):
            print(task, train_teacher(args, task), file=sys.stderr, flush=True)
    if "rows" in args.parts:
        rows = run_rows(args, rows)
    if "speed" in args.parts:
        rows = measure_speed(args, rows)
        write_json(out, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
