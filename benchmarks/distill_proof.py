"""Does distilling from the unpruned model while pruning keep the accuracy? A
setting where pruning costs something, seeds enough for a paired test, and the
peer at its best.

    python benchmarks/distill_proof.py teacher --arch resnet           # train and hash the teacher
    python benchmarks/distill_proof.py select --arch resnet            # choices, on validation only
    python benchmarks/distill_proof.py rows --arch resnet --seeds 0-4  # the rows
    python benchmarks/distill_proof.py collect                         # -> results/distill_proof.json
    python benchmarks/proof_table.py                                   # the tables, with p-values

Data: Fashion-MNIST, split three ways by cpdfx.data.resolve_data: "train"
(the training images less the validation share), "val" (carved from the
training images with cpdfx's fixed seed) and "test" (the 10k t10k images).
The teacher trains on all of "train"; the students train on a fixed
--train-size subset of it (the same images and order for every method at a
seed), validate on a fixed --val-size slice of "val" after every epoch (the
curve), and read "test" once, at the end, for the row.

Architectures, compact for 28x28 inputs (last maps 7x7 and 1x1):
- resnet: cpdfx.models.ResNetTiny, widths 8/16/32, a CIFAR-style 3x3 stem;
- mobilenetv2: transformers MobileNetV2 (depth multiplier 0.5) from its config.

Methods, all with the same teacher, data, epochs, AdamW schedule and pruning
points (5 steps over the first half, geometric, widths to 1 channel):
- plain:  compress(plain=True), Fisher on the label loss, no teacher term;
- kd:     compress(), Fisher on CE + alpha * KD, distilled throughout;
- learned: compress(importance="learned"), gates under a resource-weighted penalty;
- tp:     Torch-Pruning's MetaPruner at the same points and MACs schedule
          (benchmarks/peer.py), labels only: kd vs tp+kd isolates the structure;
- tp+kd:  the same, distilled as kd is.

Every row holds the command, seed, teacher's sha256, widths and machine. The
"select" stage reads validation only (seed 100, not a row seed); its rows say
stage "select" and have no test score.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

import cpdfx
from cpdfx.compress import compress
from cpdfx.cpd import prune_points, total_steps
from cpdfx.data import resolve_data
from cpdfx.distill import distill, evaluate
from cpdfx.models import ResNetTiny

sys.path.insert(0, str(Path(__file__).parent))
from peer import TorchPruningCallback  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distill_proof.json"
METHODS = ("plain", "kd", "learned", "tp", "tp+kd")
SELECT_SEED = 100
PRUNE_STEPS, PRUNE_SHARE = 5, 0.5


class Logits(nn.Module):
    """A transformers classifier as a module that returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def mobilenetv2() -> nn.Module:
    config = MobileNetV2Config(num_channels=1, image_size=28, depth_multiplier=0.5, num_labels=10)
    return Logits(MobileNetV2ForImageClassification(config))


ARCHS = {"resnet": lambda: ResNetTiny(num_classes=10, in_channels=1, widths=(8, 16, 32)),
         "mobilenetv2": mobilenetv2}
EXAMPLE = torch.randn(1, 1, 28, 28)


# -- data ---------------------------------------------------------------------------------


def splits(args) -> dict:
    """train (all), students' train subset, val slice, test."""
    train = resolve_data("fashion-mnist", split="train", normalize=True)
    val = resolve_data("fashion-mnist", split="val", normalize=True)
    test = resolve_data("fashion-mnist", split="test", normalize=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return {"teacher_train": train, "train": Subset(train, order[:args.train_size]),
            "val": Subset(val, range(min(args.val_size, len(val)))), "test": test}


# -- teachers ------------------------------------------------------------------------------


def teacher_file(args) -> Path:
    return Path(args.cache) / f"teacher-{args.arch}-e{args.teacher_epochs}.pt"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_teacher(args) -> tuple[nn.Module, str]:
    path = teacher_file(args)
    if not path.is_file():
        raise SystemExit(f"no teacher at {path}: run `python benchmarks/distill_proof.py teacher --arch {args.arch}` "
                         f"first")
    model = ARCHS[args.arch]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), sha256(path)


def train_teacher(args, data) -> dict:
    torch.manual_seed(0)
    model = ARCHS[args.arch]()
    t0 = time.perf_counter()
    result = distill(model, None, data["teacher_train"], data["val"], epochs=args.teacher_epochs,
                     batch_size=args.batch, seed=0, progress=args.progress)
    path = teacher_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    model.eval()
    cost = cpdfx.cost(model, EXAMPLE)
    return row(args, "teacher", 1.0, 0, model, cost, result.history, data, sha256(path),
               epochs=args.teacher_epochs, wall_s=time.perf_counter() - t0, train_images=len(data["teacher_train"]))


# -- students ------------------------------------------------------------------------------


def student(args, data, teacher, method: str, macs: float, seed: int, **choice):
    """(slim model, history, extra row fields) of one method at one budget and seed."""
    common = dict(epochs=args.epochs, batch_size=args.batch, seed=seed, progress=args.progress)
    if method in ("plain", "kd", "learned"):
        result = compress(teacher, EXAMPLE, data["train"], data["val"], macs=macs,
                          importance="learned" if method == "learned" else choice.get("importance", args.importance),
                          prune_steps=PRUNE_STEPS,
                          prune_share=PRUNE_SHARE, round_to=1, plain=method == "plain",
                          loss=None if method == "plain" else {"alpha": choice.get("alpha", args.alpha)}, **common)
        report = result.report
        extra = {"importance": report["compress"]["importance"], "loss": report["loss"]}
        if method == "learned":
            extra["learned"] = {k: v for k, v in report.get("learned", {}).items() if k != "trace"}
        return result.model, result.history, extra
    kind = choice.get("tp_importance", args.tp_importance)
    model = teacher_copy(args, teacher)
    at = prune_points(total_steps(len(data["train"]), args.batch, args.epochs), PRUNE_SHARE, PRUNE_STEPS)
    callback = TorchPruningCallback(model, EXAMPLE, macs, at, kind)
    distilled = method == "tp+kd"
    result = distill(model, teacher if distilled else None, data["train"], data["val"],
                     loss={"alpha": choice.get("alpha", args.alpha)} if distilled else None, callback=callback,
                     **common)
    return result.student, result.history, {"importance": f"torch-pruning {kind}", "pruning": callback.events,
                                            "loss": f"ce + {choice.get('alpha', args.alpha)} kd" if distilled
                                            else "ce"}


def teacher_copy(args, teacher) -> nn.Module:
    model = ARCHS[args.arch]()
    model.load_state_dict(teacher.state_dict())
    return model


def widths(model: nn.Module) -> dict:
    """Output width of every weight with two or more dims (convs, linears), by name."""
    return {n: int(p.shape[0]) for n, p in model.named_parameters() if p.dim() >= 2}


def row(args, method, macs, seed, model, cost, history, data, teacher_sha, *, test=True, **extra) -> dict:
    base = cpdfx.cost(ARCHS[args.arch](), EXAMPLE)
    val_curve = [h.get("val_top1") for h in history]
    return {
        "task": "classification", "arch": args.arch, "method": method, "macs": macs, "seed": seed,
        "test_top1": evaluate(model, data["test"], batch_size=256)["top1"] if test else None,
        "val_top1": val_curve[-1] if val_curve else None, "val_curve": val_curve,
        "macs_kept": cost.macs / base.macs, "params_kept": cost.params / base.params, "widths": widths(model),
        "teacher_sha256": teacher_sha, "epochs": extra.pop("epochs", args.epochs),
        "train_images": extra.pop("train_images", len(data["train"])), "val_images": len(data["val"]),
        "command": " ".join(["python", *sys.argv]), "machine": machine(), "commit": commit(), **extra,
    }


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip()


def run_student(args, data, teacher, sha, method, macs, seed, *, stage="row", **choice) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, history, extra = student(args, data, teacher, method, macs, seed, **choice)
    model.eval()
    return row(args, method, macs, seed, model, cpdfx.cost(model, EXAMPLE), history, data, sha,
               test=stage == "row", stage=stage, choice=choice or None, wall_s=time.perf_counter() - t0, **extra)


# -- stages ----------------------------------------------------------------------------------


def row_file(args, stage, arch, method, macs, seed, choice=None) -> Path:
    tag = "-".join(f"{k}{v}" for k, v in sorted((choice or {}).items()))
    name = f"{stage}_{arch}_{method}_{macs}_{seed}{'_' + tag if tag else ''}.json"
    return Path(args.cache) / "rows" / name.replace("+", "p")


def save(args, r: dict) -> None:
    path = row_file(args, r.get("stage", "row"), r["arch"], r["method"], r["macs"], r["seed"], r.get("choice"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    shown = {k: r[k] for k in ("arch", "method", "macs", "seed", "val_top1", "test_top1", "macs_kept", "wall_s")}
    print(json.dumps({**shown, "choice": r.get("choice")}), flush=True)


def seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


SELECTIONS = {  # what the select stage compares, each on validation at the last --macs
    "importance": ("kd", [{"importance": "fisher"}, {"importance": "fisher_batch"}]),
    "alpha": ("kd", [{"alpha": 1.0}, {"alpha": 3.0}]),
    "tp_importance": ("tp", [{"tp_importance": k} for k in ("taylor", "hessian", "l2")]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("teacher", "select", "rows", "collect"))
    parser.add_argument("--arch", choices=tuple(ARCHS), default="resnet")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--macs", default="0.25,0.125")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--select", default=",".join(SELECTIONS), help="select stage: which choices to compare")
    parser.add_argument("--alpha", type=float, default=1.0, help="the KD term's weight (chosen by select)")
    parser.add_argument("--importance", default="fisher", help="cpdfx's criterion for plain and kd (chosen by select)")
    parser.add_argument("--tp-importance", default="taylor", choices=("taylor", "hessian", "l2"),
                        help="Torch-Pruning's criterion (chosen by select)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--val-size", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/distill_proof")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--skip-done", action="store_true", help="rows: skip the rows already in --cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "collect":
        rows = [json.loads(p.read_text()) for p in sorted((Path(args.cache) / "rows").glob("*.json"))]
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{len(rows)} rows -> {RESULTS}")
        return
    data = splits(args)
    if args.stage == "teacher":
        r = train_teacher(args, data)
        save(args, r)
        return
    teacher, sha = load_teacher(args)
    budgets = [float(m) for m in args.macs.split(",")]
    if args.stage == "select":
        for name in args.select.split(","):
            method, choices = SELECTIONS[name]
            for choice in choices:
                save(args, run_student(args, data, teacher, sha, method, budgets[-1], SELECT_SEED, stage="select",
                                       **choice))
        return
    for seed in seeds(args.seeds):
        for macs in budgets:
            for method in args.methods.split(","):
                if not (args.skip_done and row_file(args, "row", args.arch, method, macs, seed).is_file()):
                    save(args, run_student(args, data, teacher, sha, method, macs, seed))


if __name__ == "__main__":
    main()
