"""Does channel-wise distillation (CWD) from the unpruned segmenter, while
pruning, keep its mIoU? The segmentation half of the distillation proof.

    python benchmarks/seg_proof.py teacher                 # train and hash the teacher
    python benchmarks/seg_proof.py select                  # choices, on validation only
    python benchmarks/seg_proof.py rows --seeds 0-4        # the rows
    python benchmarks/seg_proof.py collect                 # -> results/distill_proof.json (task "segmentation")
    python benchmarks/proof_table.py                       # the tables, with p-values
    python benchmarks/seg_proof.py teacher --arch unettiny # the same with the earlier, weaker U-Net

Data: cpdfx.data.FashionSegmentation canvases (48x48, two Fashion-MNIST
items each, the later on top, 11 classes with the background). Validation
canvases are built from 10% of the training *items*, held out with cpdfx's
fixed seed (FashionSegmentation.split_off), so no val canvas shows an item the
training canvases show; test canvases are built from the t10k items and read
once per row, at the end. The teacher trains on all training canvases (flip +
crop); the students on a fixed --train-size subset of them, validated on a
fixed --val-size slice of val after every epoch.

Model: cpdfx.models.UNet, four levels (widths 16/32/64/128 by default), whose
receptive field covers a whole item, so a pixel is classed by the item it lies
on. (At widths 8/16/32/64 it learns the background and little else: 11% val
mIoU after 3 epochs on 6,000 canvases at lr 3e-3 where 16/32/64/128 reaches 47%.)
`--arch unettiny` is cpdfx.models.UNetTiny (two levels, receptive field
smaller than an item), the segmenter of the earlier rows where CWD lost: the
same rows with it show what the teacher's quality does to CWD.
The teacher trains at lr 3e-3 (1e-3 and 5e-3 learned no faster at the narrow widths),
the students at the library default.

Methods, all with the same teacher, data, epochs, AdamW schedule and pruning
points (5 steps over the first half, geometric, widths to 1 channel, Fisher):
- plain: compress(plain=True), labels only;
- kd:    compress() with cross-entropy + alpha * CWD on the logits.
The select stage (seed 100, never a row seed) compares CWD's temperature and
weight, and CWD against pixel-wise KD, on validation only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset

import cpdfx
from cpdfx.compress import compress
from cpdfx.data import FashionSegmentation
from cpdfx.distill import distill, evaluate
from cpdfx.models import UNet, UNetTiny

sys.path.insert(0, str(Path(__file__).parent))
from distill_proof import RESULTS, commit, machine, seeds, sha256, widths  # noqa: E402

TASK = "segmentation"
CANVAS, ITEMS = 48, 2
EXAMPLE = torch.randn(1, 1, CANVAS, CANVAS)
METHODS = ("plain", "kd")
SELECT_SEED = 100
PRUNE_STEPS, PRUNE_SHARE = 5, 0.5
SELECTIONS = {  # what the select stage compares, each on validation at the first --macs
    "plain": ("plain", [{}]),
    "cwd-t1": ("kd", [{"temperature": 1.0, "alpha": a} for a in (1.0, 3.0)]),
    "cwd-t4": ("kd", [{"temperature": 4.0, "alpha": a} for a in (1.0, 3.0)]),
    "pixel": ("kd", [{"kind": "kd", "temperature": 1.0, "alpha": 1.0}]),
    "cwd-more": ("kd", [{"temperature": 4.0, "alpha": 10.0}, {"temperature": 8.0, "alpha": 3.0}]),
}


def architecture(args) -> nn.Module:
    classes = len(FashionSegmentation.classes)
    if args.arch == "unettiny":
        return UNetTiny(num_classes=classes, in_channels=1)
    return UNet(num_classes=classes, in_channels=1, widths=args.widths)


def arch_name(args) -> str:
    return args.arch if args.arch == "unettiny" else f"unet{'-'.join(map(str, args.widths))}"


def splits(args) -> dict:
    """teacher's train (all), students' train subset, val slice, test."""
    common = dict(canvas=CANVAS, items=ITEMS, normalize=True)
    train, _ = FashionSegmentation("train", augment=True, **common).split_off(cpdfx.data.VAL_SHARE)
    _, val = FashionSegmentation("train", **common).split_off(cpdfx.data.VAL_SHARE)
    test = FashionSegmentation("test", **common)
    return {"teacher_train": train, "train": Subset(train, range(min(args.train_size, len(train)))),
            "val": Subset(val, range(min(args.val_size, len(val)))), "test": test}


def teacher_file(args) -> Path:
    return Path(args.cache) / f"teacher-{arch_name(args)}-e{args.teacher_epochs}.pt"


def load_teacher(args) -> tuple[nn.Module, str]:
    path = teacher_file(args)
    if not path.is_file():
        raise SystemExit(f"no teacher at {path}: run `python benchmarks/seg_proof.py teacher` first")
    model = architecture(args)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), sha256(path)


def train_teacher(args, data) -> dict:
    torch.manual_seed(0)
    model = architecture(args)
    t0 = time.perf_counter()
    result = distill(model, None, data["teacher_train"], data["val"], task=TASK, epochs=args.teacher_epochs,
                     batch_size=args.batch, lr=args.teacher_lr, seed=0, progress=args.progress)
    path = teacher_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    model.eval()
    return row(args, "teacher", 1.0, 0, model, result.history, data, sha256(path), epochs=args.teacher_epochs,
               wall_s=time.perf_counter() - t0, train_images=len(data["teacher_train"]))


def student(args, data, teacher, method: str, macs: float, seed: int, **choice):
    """(slim model, history, extra row fields) of one method at one budget and seed."""
    loss = None if method == "plain" else {"kind": choice.get("kind", args.kind), "alpha": choice.get("alpha", args.alpha),
                                           "temperature": choice.get("temperature", args.temperature)}
    result = compress(teacher, EXAMPLE, data["train"], data["val"], task=TASK, macs=macs, importance=args.importance,
                      prune_steps=PRUNE_STEPS, prune_share=PRUNE_SHARE, round_to=1, plain=method == "plain",
                      loss=loss, epochs=args.epochs, batch_size=args.batch, seed=seed, progress=args.progress)
    return result.model, result.history, {"loss": result.report["loss"], "importance": args.importance}


def row(args, method, macs, seed, model, history, data, teacher_sha, *, test=True, **extra) -> dict:
    base, cost = cpdfx.cost(architecture(args), EXAMPLE), cpdfx.cost(model, EXAMPLE)
    val_curve = [h.get("val_miou") for h in history]
    return {
        "task": TASK, "arch": arch_name(args), "method": method, "macs": macs,
        "seed": seed, "test_miou": evaluate(model, data["test"], task=TASK, batch_size=200)["miou"] if test else None,
        "val_miou": val_curve[-1] if val_curve else None, "val_curve": val_curve,
        "macs_kept": cost.macs / base.macs, "params_kept": cost.params / base.params, "widths": widths(model),
        "teacher_sha256": teacher_sha, "epochs": extra.pop("epochs", args.epochs),
        "train_images": extra.pop("train_images", len(data["train"])), "val_images": len(data["val"]),
        "canvas": CANVAS, "items": ITEMS,
        "command": " ".join(["python", *sys.argv]), "machine": machine(), "commit": commit(), **extra,
    }


def run_student(args, data, teacher, sha, method, macs, seed, *, stage="row", **choice) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, history, extra = student(args, data, teacher, method, macs, seed, **choice)
    model.eval()
    return row(args, method, macs, seed, model, history, data, sha, test=stage != "select", stage=stage,
               choice=choice or None, wall_s=time.perf_counter() - t0, **extra)


def row_file(args, stage, method, macs, seed, choice=None) -> Path:
    tag = "-".join(f"{k}{v}" for k, v in sorted((choice or {}).items()))
    return Path(args.cache) / "rows" / f"{stage}_{arch_name(args)}_{method}_{macs}_{seed}{'_' + tag if tag else ''}.json"


def save(args, r: dict) -> None:
    path = row_file(args, r.get("stage", "row"), r["method"], r["macs"], r["seed"], r.get("choice"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    shown = {k: r[k] for k in ("method", "macs", "seed", "val_miou", "test_miou", "macs_kept", "wall_s")}
    print(json.dumps({**shown, "choice": r.get("choice")}), flush=True)


def collect(args) -> None:
    """The segmentation rows in the cache replace those in distill_proof.json;
    the classification rows stay."""
    kept = [r for r in json.loads(RESULTS.read_text()) if r.get("task") != TASK]
    rows = [json.loads(p.read_text()) for p in sorted((Path(args.cache) / "rows").glob("*.json"))]
    RESULTS.write_text(json.dumps(kept + rows, indent=1) + "\n")
    print(f"{len(rows)} segmentation rows, {len(kept)} others -> {RESULTS}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("teacher", "select", "rows", "collect"))
    parser.add_argument("--arch", choices=("unet", "unettiny"), default="unet",
                        help="unet: the four-level UNet (--widths); unettiny: the earlier two-level one, whose "
                             "receptive field is smaller than an item")
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")), default=(16, 32, 64, 128))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--macs", default="0.5,0.25")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--select", default=",".join(SELECTIONS), help="select stage: which choices to compare")
    parser.add_argument("--kind", default="cwd", choices=("cwd", "kd"), help="cwd, or pixel-wise kd (chosen by select)")
    parser.add_argument("--alpha", type=float, default=1.0, help="CWD's weight (chosen by select)")
    parser.add_argument("--temperature", type=float, default=4.0, help="CWD's temperature (chosen by select)")
    parser.add_argument("--importance", default="fisher", help="the pruning criterion of both arms")
    parser.add_argument("--stage-name", default="row",
                        help="rows: what the rows are; any other name than 'row' keeps them out of the tables "
                             "(e.g. 'cause' for the rows that test an explanation)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/seg_proof")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--skip-done", action="store_true", help="rows: skip the rows already in --cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "collect":
        return collect(args)
    data = splits(args)
    if args.stage == "teacher":
        return save(args, train_teacher(args, data))
    teacher, sha = load_teacher(args)
    budgets = [float(m) for m in args.macs.split(",")]
    if args.stage == "select":
        for name in args.select.split(","):
            method, choices = SELECTIONS[name]
            for choice in choices:
                save(args, run_student(args, data, teacher, sha, method, budgets[0], SELECT_SEED, stage="select",
                                       **choice))
        return
    for seed in seeds(args.seeds):
        for macs in budgets:
            for method in args.methods.split(","):
                if not (args.skip_done and row_file(args, args.stage_name, method, macs, seed).is_file()):
                    save(args, run_student(args, data, teacher, sha, method, macs, seed, stage=args.stage_name))


if __name__ == "__main__":
    main()
