"""Prune while distilling (cpdfx.compress) on Fashion-MNIST: distillation against
plain fine-tuning, fisher against the learned structure, and a segmenter.

    python benchmarks/distill_fashion.py --quick     # a dry run: tiny subsets, ~2 min
    python benchmarks/distill_fashion.py             # the numbers in benchmarks/RESULTS.md

Classification: the teacher is `ResNetTiny(in_channels=1)` trained on the 60k
training images (the weights benchmarks/criteria_fashion.py caches are reused
when they are in --cache, else it is trained here with cpdfx.distill, alpha=0,
and cached). For each budget in --macs, two compress runs with the same data,
seed, epochs, schedule (fisher, --prune-steps steps in the first half) and
budget: "kd" distils from the teacher (logit KD + labels, alpha 0.5, T 4);
"plain" uses the labels alone (alpha 0). At the first budget, the learned
structure (importance="learned", KD), its penalty weighted by each channel's
cost and, for comparison, not weighted. Segmentation: UNetTiny trained on
FashionSegmentation canvases (plain, cached), then compressed to 50% MACs with
CWD; mIoU before and after.

One thread by default: on this shared 2-core machine, two threads ran a
training step ~9x slower than one whenever another process held a core.
Everything is written to --cache/distill_fashion.json (--parts re-runs some
rows and keeps the others); the table is printed as markdown.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from cpdfx.compress import compress
from cpdfx.data import FashionSegmentation, fashion_mnist
from cpdfx.distill import distill, evaluate
from cpdfx.models import ResNetTiny, UNetTiny

SHARED_TEACHER = "resnettiny-w16-32-64-e5-lr0.002-s0.pt"  # benchmarks/criteria_fashion.py's cache


# -- teachers ---------------------------------------------------------------------------


def cached_teacher(model, paths, seed, train) -> tuple[torch.nn.Module, dict]:
    """The first of `paths` that holds saved weights, else `train(model)` (plain
    supervised training, from `seed`), saved to the last path."""
    for path in paths:
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), {"path": str(path), "train_s": saved["train_s"], "cached": True}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train(model)
    saved = {"state_dict": model.state_dict(), "train_s": time.perf_counter() - t0}
    paths[-1].parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, paths[-1])
    return model.eval(), {"path": str(paths[-1]), "train_s": saved["train_s"], "cached": False}


def classifier_teacher(args, train, test) -> tuple[torch.nn.Module, dict]:
    """The shared cached teacher when there is one, else one trained here (and cached)."""
    own = Path(args.cache) / f"distill-teacher-resnettiny-e{args.teacher_epochs}-n{len(train)}-s{args.seed}.pt"
    paths = ([] if args.quick else [Path(args.cache) / SHARED_TEACHER]) + [own]
    return cached_teacher(ResNetTiny(num_classes=10, in_channels=1), paths, args.seed, lambda model: distill(
        model, None, train, test, epochs=args.teacher_epochs, batch_size=args.batch, lr=args.lr, seed=args.seed,
        progress=args.progress))


def segmentation_teacher(args, train, val) -> tuple[torch.nn.Module, dict]:
    path = Path(args.cache) / (f"distill-unettiny-c{args.canvas}-n{len(train)}-e{args.seg_teacher_epochs}"
                               f"-s{args.seed}.pt")
    return cached_teacher(UNetTiny(num_classes=11, in_channels=1), [path], args.seed, lambda model: distill(
        model, None, train, val, task="segmentation", epochs=args.seg_teacher_epochs, batch_size=args.seg_batch,
        lr=args.lr, seed=args.seed, progress=args.progress))


# -- runs -------------------------------------------------------------------------------


def run(name, teacher, example, train, val, args, **options) -> dict:
    """One compress run and what the tables need from it."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = compress(teacher, example, train, val, epochs=options.pop("epochs", args.epochs),
                      batch_size=options.pop("batch_size", args.batch), lr=args.lr,
                      prune_steps=args.prune_steps, prune_share=0.5, seed=args.seed, progress=args.progress,
                      **options)
    seconds = time.perf_counter() - t0
    r = result.report
    metric = "top1" if "top1" in r["student"] else "miou"
    row = {"name": name, "command": " ".join(["python"] + sys.argv), "target": r["target"], "achieved": r["achieved"], "teacher": r["teacher"][metric],
           "student": r["student"][metric], "metric": metric, "seconds": round(seconds, 1),
           "pruning": r["pruning"], "epochs": r["epochs"], "seed": r["seed"], "loss": r["loss"],
           "val_per_epoch": [h.get(f"val_{metric}") for h in result.history]}
    if r.get("learned"):
        row["learned"] = {k: v for k, v in r["learned"].items() if k != "trace"}
        row["learned"]["trace_tail"] = r["learned"]["trace"][-3:]
    print(f"  {metric} {row['student']:.4f} (teacher {row['teacher']:.4f}), MACs {r['achieved']['macs']:.1%}, "
          f"params {r['achieved']['params']:.1%}, {seconds:.0f} s; per epoch {row['val_per_epoch']}",
          file=sys.stderr, flush=True)
    return row


def subset(dataset, n, seed):
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist())


def classification(args, results):
    train = fashion_mnist("train", augment=not args.quick, normalize=True)
    test = subset(fashion_mnist("test", normalize=True), args.test_size, args.seed)
    teacher_train = subset(train, 2000, args.seed) if args.quick else fashion_mnist("train", normalize=True)
    teacher, info = classifier_teacher(args, teacher_train, test)
    info["top1"] = evaluate(teacher, test, batch_size=500)["top1"]
    results["teacher"] = info
    print(f"teacher {info}", file=sys.stderr, flush=True)
    student_train = subset(train, args.train_size, args.seed)
    example = torch.randn(2, 1, 28, 28)
    for macs in args.macs if "fisher" in args.parts else ():
        for name, plain in (("kd", False), ("plain", True)):
            results["runs"].append(run(f"{name} fisher {macs:.0%}", teacher, example, student_train, test, args,
                                       macs=macs, plain=plain))
    for power in args.learned_cost_power if "learned" in args.parts else ():
        results["runs"].append(run(f"kd learned (cost^{power:g}) {args.macs[0]:.0%}", teacher, example,
                                   student_train, test, args, macs=args.macs[0], importance="learned",
                                   learned_options={"cost_power": power}))


def segmentation(args, results):
    common = dict(canvas=args.canvas, items=2, normalize=True)
    train = FashionSegmentation("train", length=args.seg_train_size, augment=True, **common)
    val = FashionSegmentation("test", length=args.seg_val_size, **common)
    teacher, info = segmentation_teacher(args, train, val)
    info["miou"] = evaluate(teacher, val, task="segmentation", batch_size=100)["miou"]
    results["seg_teacher"] = info
    print(f"segmentation teacher {info}", file=sys.stderr, flush=True)
    example = torch.randn(2, 1, args.canvas, args.canvas)
    for name, plain in (("cwd", False), ("plain", True))[:2 if args.seg_plain else 1]:
        results["runs"].append(run(f"seg {name} fisher 50%", teacher, example, train, val, args, macs=0.5,
                                   task="segmentation", plain=plain, epochs=args.seg_epochs,
                                   batch_size=args.seg_batch))


# -- output -----------------------------------------------------------------------------


def table(results) -> str:
    lines = ["| run | target MACs | MACs | params | teacher | student | drop | per epoch | time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        per_epoch = ", ".join(f"{v:.3f}" for v in r["val_per_epoch"] if v is not None)
        lines.append(f"| {r['name']} | {r['target']['macs']:.0%} | {r['achieved']['macs']:.1%} | "
                     f"{r['achieved']['params']:.1%} | {r['teacher']:.2%} | {r['student']:.2%} | "
                     f"{(r['student'] - r['teacher']) * 100:+.2f} | {per_epoch} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def merged(path: Path, results: dict) -> dict:
    """This invocation's results over an earlier JSON's: runs of the same name
    are replaced, the others kept (each run records its own command)."""
    if not path.is_file():
        return results
    earlier = json.loads(path.read_text())
    names = {r["name"] for r in results["runs"]}
    runs = [r for r in earlier.get("runs", []) if r["name"] not in names] + results["runs"]
    return {**earlier, **{k: v for k, v in results.items() if k != "runs"}, "runs": runs}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {torch.get_num_threads()} thread(s); torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets and one epoch: checks the script runs")
    parser.add_argument("--cache", default="/tmp/cpdfx-bench", help="where teachers and the JSON go")
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each compress run")
    parser.add_argument("--train-size", type=int, default=20000, help="training images of each compress run")
    parser.add_argument("--test-size", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--teacher-epochs", type=int, default=5, help="when the teacher is trained here")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prune-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=["fisher", "learned", "seg"],
                        help="which runs: fisher (kd and plain at each budget), learned, seg; the JSON keeps "
                             "the other runs of an earlier invocation")
    parser.add_argument("--learned-cost-power", type=float, nargs="+", default=[1.0, 0.0],
                        help="learned runs: the power of the channel cost that weighs the penalty (1: by cost, "
                             "as in Ahmed et al.; 0: every channel alike)")
    parser.add_argument("--seg-plain", action="store_true", help="also plain fine-tuning for the segmenter")
    parser.add_argument("--canvas", type=int, default=48)
    parser.add_argument("--seg-train-size", type=int, default=8000)
    parser.add_argument("--seg-val-size", type=int, default=1000)
    parser.add_argument("--seg-teacher-epochs", type=int, default=4)
    parser.add_argument("--seg-epochs", type=int, default=2)
    parser.add_argument("--seg-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.teacher_epochs = 1024, 500, 1, 1
        args.seg_train_size, args.seg_val_size, args.seg_teacher_epochs, args.seg_epochs = 256, 64, 1, 1
        args.batch, args.seg_batch, args.canvas = 64, 16, 32
    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "command": " ".join(["python"] + sys.argv), "args": vars(args), "runs": [],
               "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    if {"fisher", "learned"} & set(args.parts):
        classification(args, results)
    if "seg" in args.parts:
        segmentation(args, results)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.cache) / ("distill_fashion_quick.json" if args.quick else "distill_fashion.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = merged(out, results)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"machine: {results['machine']}; total {results['total_s'] / 60:.1f} min; JSON: {out}")
    print(f"classification teacher: {results.get('teacher')}")
    if "seg_teacher" in results:
        print(f"segmentation teacher: {results['seg_teacher']}")
    print(table(results))


if __name__ == "__main__":
    main()
