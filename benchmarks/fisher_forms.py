"""Group Fisher per sample (importance="fisher") against the batch form
(fisher_batch): what the per-sample pass costs, and whether the two rank and
cut channels alike.

    python benchmarks/fisher_forms.py            # writes benchmarks/results/fisher_forms.json

One thread, CPU. The model is cpdfx.models.ResNetTiny(num_classes=10,
in_channels=1, widths=(8, 16, 32)).

Cost: a plain training step (forward, cross-entropy, backward, AdamW step) on
a batch of 64 Fashion-MNIST images against `Fisher.accumulate_samples` on the
same batch with the distillation loss (cross-entropy + KD against stored
teacher logits), scoring the first 16 samples (the default) and all 64;
interleaved for --rounds rounds, medians.

Agreement: the model trained for one epoch on the first --train training
images (cpdfx.distill, no teacher); every form scores --batches batches of
64 other training images with cross-entropy against the labels:
  per_sample_all  every sample of each batch (the reference),
  per_sample_16   the first 16 of each batch (what fisher does),
  batch_train     the squared batch-mean mask gradient, the graph in train
                  mode (what fisher did during compress),
  batch_eval      the same in eval mode (the statistic alone differs).
Scores are divided by each channel's MACs share as the solver does; for
each pair, the Spearman correlation over all channels (also of the raw
scores, and the mean within groups, where cost plays no part), and at 50% and 25%
MACs (round_to=1) the overlap of the channels each would remove (Jaccard,
and the share of the reference's removed channels the other removes too).
Also, per form, the Spearman correlation of the normalised scores with the
measured loss increase of removing each channel alone (eval mode,
--oracle-images held-out images), and top-1 on 2000 test images of the
model pruned to 50% / 25% MACs by each, batch norm re-estimated on 8
batches, no training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Subset

import cpdfx
from cpdfx import data, passes
from cpdfx.budget import Constraints, Target
from cpdfx.cost import CostModel
from cpdfx.distill import distill, evaluate
from cpdfx.importance import Fisher, gate_slices, gated, normalise
from cpdfx.losses import DistillLoss
from cpdfx.models import ResNetTiny
from cpdfx.solve import plan, unit_costs

OUT = Path(__file__).parent / "results" / "fisher_forms.json"


def model():
    return ResNetTiny(num_classes=10, in_channels=1, widths=(8, 16, 32))


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} thread (of {os.cpu_count()} cores), CPU only; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def cost(x, y, rounds):
    """Median seconds of a plain training step and of the per-sample pass."""
    torch.manual_seed(0)
    teacher = model().eval()
    gm = cpdfx.capture(model().train(), x[:2]).train()
    comb = passes.comb(gm)
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
    loss = DistillLoss()
    with torch.no_grad():
        t_out = teacher(x)

    def step():
        out = gm(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, y).backward()
        opt.step()

    forms = {"step": step}
    for samples in (16, 64):
        fisher = Fisher(samples=samples, chunk=16)
        forms[f"per_sample_{samples}"] = lambda f=fisher: f.accumulate_samples(gm, comb, (x,), loss, t_out, y)
    times = {k: [] for k in forms}
    for fn in forms.values():
        fn()  # warm up
    for _ in range(rounds):
        for k, fn in forms.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "ratio_to_step": {k: med[k] / med["step"] for k in med if k != "step"}}


def scores_of(form, trained, x, batches):
    """Raw scores by group id, on the graph of `trained` captured in the mode the form runs in."""
    gm = cpdfx.capture(trained.train() if form == "batch_train" else trained.eval(), x)
    trained.eval()
    comb = passes.comb(gm)
    if form.startswith("per_sample"):
        fisher = Fisher(samples=None if form == "per_sample_all" else 16)
        for xb, yb in batches:
            fisher.accumulate_samples(gm, comb, (xb,), F.cross_entropy, yb)
    else:
        fisher = Fisher(per_sample=False)
        for xb, yb in batches:
            gm.zero_grad(set_to_none=True)
            F.cross_entropy(gm(xb), yb).backward()
            fisher.accumulate(gm, comb)
    return fisher, fisher.scores(gm, comb)


def oracle(trained, x, images, labels):
    """Per group, the loss increase of removing each channel alone (its gate at 0), eval mode."""
    gm = cpdfx.capture(trained.eval(), x)
    comb = passes.comb(gm)
    groups = list(comb.prunable)
    slices, total = gate_slices(gm, comb, groups)
    index = {n: [(d, torch.as_tensor(i)) for d, i in v] for n, v in slices.items()}
    params = dict(gm.named_parameters())

    def loss(flat):
        weights = {n: gated(p, index[n], flat) if n in index else p for n, p in params.items()}
        with torch.no_grad():
            return float(F.cross_entropy(torch.func.functional_call(gm, weights, (images,)), labels))

    flat = torch.ones(1 + total)
    base, out, offset = loss(flat), {}, 0
    for g in groups:
        rises = []
        for c in range(g.size):
            flat[1 + offset + c] = 0
            rises.append(loss(flat) - base)
            flat[1 + offset + c] = 1
        out[g.id] = np.array(rises)
        offset += g.size
    return out


def removed(gm, comb, x, fisher, raw, share):
    chosen = plan(gm, comb, x, Target(macs=share), importance=fisher, scores=raw, rules=Constraints(round_to=1))
    return {(gid, c) for g in comb.prunable for gid in [g.id] for c in range(g.size)
            if c not in set(chosen.keep.get(gid, range(g.size)))}, chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--oracle-images", type=int, default=1000)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    first = next(iter(DataLoader(Subset(train, range(args.train, args.train + 64)), batch_size=64)))
    row = {"command": "python benchmarks/fisher_forms.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
           "machine": machine(), "date": datetime.date.today().isoformat(),
           "model": "ResNetTiny(num_classes=10, in_channels=1, widths=(8, 16, 32)), 28x28, batch 64"}
    row["cost"] = cost(*first, args.rounds)
    print("cost", json.dumps(row["cost"]), flush=True)

    torch.manual_seed(0)
    trained = model()
    distill(trained, None, Subset(train, range(args.train)), epochs=1, batch_size=64, lr=3e-3, progress=False)
    test_part = Subset(test, range(2000))
    row["trained"] = {"images": args.train, "epochs": 1, "top1": evaluate(trained, test_part)["top1"]}
    x = first[0][:2]
    start = args.train + 64
    batches = list(DataLoader(Subset(train, range(start, start + 64 * args.batches)), batch_size=64))
    held = next(iter(DataLoader(Subset(train, range(start + 64 * args.batches,
                                                    start + 64 * args.batches + args.oracle_images)),
                                batch_size=args.oracle_images)))
    gm = cpdfx.capture(trained.eval(), x)
    comb = passes.comb(gm)
    free, _ = Constraints(round_to=1).split(comb.prunable)
    costs = unit_costs(CostModel(gm, comb, x), free, Target(macs=0.5))
    forms = ["per_sample_all", "per_sample_16", "batch_train", "batch_eval"]
    raw, normalised, criteria = {}, {}, {}
    for form in forms:
        criteria[form], raw[form] = scores_of(form, trained, x, batches)
        normalised[form] = np.concatenate([normalise({g.id: raw[form][g.id]}, "cost", costs)[g.id] for g in free])
    truth = oracle(trained, x, *held)
    truth_flat = np.concatenate([truth[g.id] for g in free])
    row["oracle_spearman"] = {f: float(spearmanr(normalised[f], truth_flat / np.array(
        [costs[g.id] for g in free for _ in range(g.size)])).correlation) for f in forms}
    row["channels"] = int(sum(g.size for g in free))
    pairs = [("per_sample_all", f) for f in forms[1:]] + [("per_sample_16", "batch_train"),
                                                          ("batch_eval", "batch_train")]
    row["pairs"] = {}
    cuts = {f: {share: removed(gm, comb, x, criteria[f], raw[f], share) for share in (0.5, 0.25)} for f in forms}
    for a, b in pairs:
        flat_a, flat_b = (np.concatenate([raw[f][g.id] for g in free]) for f in (a, b))
        entry = {"spearman": float(spearmanr(normalised[a], normalised[b]).correlation),
                 "spearman_raw": float(spearmanr(flat_a, flat_b).correlation),
                 "spearman_within_groups_mean": float(np.mean([spearmanr(raw[a][g.id], raw[b][g.id]).correlation
                                                               for g in free]))}
        for share in (0.5, 0.25):
            ra, rb = cuts[a][share][0], cuts[b][share][0]
            entry[f"removed_jaccard_{share:g}"] = len(ra & rb) / max(len(ra | rb), 1)
            entry[f"removed_shared_{share:g}"] = len(ra & rb) / max(len(ra), 1)
            entry[f"removed_{share:g}"] = [len(ra), len(rb)]
        row["pairs"][f"{a} vs {b}"] = entry
    calib = [(xb,) for xb, _ in batches[:8]]
    row["pruned_top1"] = {}
    for f in forms:
        row["pruned_top1"][f] = {}
        for share in (0.5, 0.25):
            chosen = cuts[f][share][1]
            slim = passes.eliminate(gm, comb, chosen.keep)
            cpdfx.reestimate_batch_norm(slim, calib)
            row["pruned_top1"][f][f"{share:g}"] = evaluate(slim.eval(), test_part)["top1"]
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
