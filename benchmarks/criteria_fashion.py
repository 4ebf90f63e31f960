"""Pruning criteria on Fashion-MNIST: test accuracy right after pruning a
trained small CNN to a MACs budget, before any fine-tuning, per criterion.

    python benchmarks/criteria_fashion.py                       # tables on stdout
    python benchmarks/criteria_fashion.py --results benchmarks/RESULTS.md

Trains a teacher (`cpdfx.models.ResNetTiny`, one input channel) on the 60k
Fashion-MNIST training images with a plain supervised loop (AdamW, cosine
schedule, batch 128, fixed seed) and caches its weights under --cache, so a
re-run skips training. Then, for every criterion in `cpdfx.CRITERIA`, every
budget in --macs and every round count in --steps: one call of
`cpdfx.prune(teacher, example, macs=budget, importance=name,
calibration=..., steps=k)` and top-1 on the full 10k test set, eval mode, no
weight trained. Every criterion gets the same calibration batches
(--calib-batches of --calib-size training images): the gradient criteria
(fisher, taylor) score on them, once without labels (the default
self-supervised loss: cross-entropy against the model's own predictions) and
once with them ("+labels" rows), and for every criterion prune re-estimates
the batch-norm statistics on their images after each round. The "stale BN"
column is the one-round model before that re-estimation. random is averaged
over --random-seeds seeds (mean +- std). MACs and params are the achieved
shares of the unpruned teacher.

With --oracle, how well each criterion ranks channels on the teacher: the
Spearman correlation of its scores with the measured loss increase of
removing each channel alone (--oracle-images held-out training images; slow:
one forward per channel).

--results FILE puts the section "## One-shot pruning criteria on Fashion-MNIST
(issue 4)" in FILE: replaces that section when FILE has it (keeping a paragraph
of it that starts with "Reading it:"), else appends it; nothing else in FILE is
touched.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import cpdfx
from cpdfx.batchnorm import reestimate_batch_norm
from cpdfx.data import fashion_mnist, to_float
from cpdfx.importance import Random, calibration_item
from cpdfx.models import ResNetTiny

SECTION = "## One-shot pruning criteria on Fashion-MNIST (issue 4)"
GRADIENT = ("fisher", "taylor")


# -- data -------------------------------------------------------------------------------


def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as normalised (N, 1, 28, 28) floats and (N,) labels: the
    same values `fashion_mnist(split, normalize=True)[i]` gives, in one go."""
    ds = fashion_mnist(split, normalize=True)
    return (to_float(ds.images) - ds.mean) / ds.std, ds.labels


# -- teacher ----------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def build(widths) -> torch.nn.Module:
    return ResNetTiny(num_classes=10, in_channels=1, widths=tuple(widths))


def train_teacher(args, train, test) -> tuple[torch.nn.Module, dict]:
    """Plain supervised training, or the cached weights of the same configuration."""
    tag = f"resnettiny-w{'-'.join(map(str, args.widths))}-e{args.epochs}-lr{args.lr:g}-s{args.seed}.pt"
    path = Path(args.cache) / tag
    torch.manual_seed(args.seed)
    model = build(args.widths)
    if path.is_file() and not args.retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        print(f"teacher: loaded {path} (trained in {saved['train_s']:.0f} s)", file=sys.stderr)
        return model.eval(), {"path": str(path), "train_s": saved["train_s"], "cached": True}

    x, y = train
    steps_per_epoch = math.ceil(len(x) / args.batch)
    total = args.epochs * steps_per_epoch
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"train epoch {epoch + 1}/{args.epochs}", file=sys.stderr,
                   mininterval=5)
        for step in bar:
            idx = order[step * args.batch:(step + 1) * args.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"epoch {epoch + 1}: test top-1 {accuracy(model, *test):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    train_s = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "train_s": train_s}, path)
    return model.eval(), {"path": str(path), "train_s": train_s, "cached": False}


# -- pruning ----------------------------------------------------------------------------


def one_shot(teacher, example, budget: float, importance, calibration, steps: int, test) -> dict:
    """One prune call; with one round, also the model before its batch norms are re-estimated."""
    t0 = time.perf_counter()
    slim = cpdfx.prune(teacher.eval(), example, macs=budget, importance=importance, calibration=calibration,
                       steps=steps, reestimate_bn=steps > 1)
    out = {"prune_s": time.perf_counter() - t0}
    if steps == 1:  # the same selection: re-estimating afterwards is what prune does after its round
        out["top1_stale"] = accuracy(slim, *test)
        reestimate_batch_norm(slim, [calibration_item(b, 1)[0] for b in calibration])
    achieved = slim.meta["cpdfx_report"]["achieved"]
    return {**out, "top1": accuracy(slim, *test), "macs": achieved["macs"], "params": achieved["params"]}


def rows_for(budget, steps, teacher, example, calib, calib_labelled, seeds, test) -> list:
    """One row per criterion (the gradient ones twice: without and with labels)."""
    rows = []
    keys = ("top1", "macs", "params", "prune_s") + (("top1_stale",) if steps == 1 else ())
    for name in cpdfx.CRITERIA:
        variants = ([(name, calib), (f"{name}+labels", calib_labelled)] if name in GRADIENT
                    else [(name, calib)])
        for label, calibration in variants:
            importances = [Random(s) for s in seeds] if name == "random" else [name]
            runs = [one_shot(teacher, example, budget, i, calibration, steps, test) for i in importances]
            row = {"criterion": label, "runs": runs, **{k: float(np.mean([r[k] for r in runs])) for k in keys}}
            for k in ("top1", "top1_stale"):
                row[f"{k}_std"] = float(np.std([r[k] for r in runs])) if len(runs) > 1 and k in keys else None
            rows.append(row)
            spread = f" +- {row['top1_std']:.4f} over {len(runs)} seeds" if len(runs) > 1 else ""
            stale = f"  (stale BN {row['top1_stale']:.4f})" if "top1_stale" in row else ""
            print(f"macs={budget:g} steps={steps} {label:15s} top1 {row['top1']:.4f}{spread}{stale}  "
                  f"macs {row['macs']:.3f} params {row['params']:.3f}  ({row['prune_s']:.1f} s/prune)",
                  file=sys.stderr, flush=True)
    return rows


def _pct(row, key) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:.2%}" + (f" ± {std:.2%}" if std is not None else "")


def table(budget, by_steps: dict, teacher_top1) -> str:
    """One row per criterion; for each round count, top-1 and its lead over random."""
    counts = sorted(by_steps)
    head = ["criterion"]
    for k in counts:
        rounds = "1 step" if k == 1 else f"{k} steps"
        head += ([f"{rounds}, stale BN"] if k == 1 else []) + [rounds, "vs random"]
    head += ["MACs", "params"]
    lines = [f"Target {budget:.0%} MACs (unpruned teacher: {teacher_top1:.2%} top-1):", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    random = {k: next(r for r in by_steps[k] if r["criterion"] == "random") for k in counts}
    for i, first in enumerate(by_steps[counts[0]]):
        is_random = first["criterion"] == "random"
        cells = [first["criterion"] + (f" ({len(first['runs'])} seeds)" if is_random else "")]
        for k in counts:
            r = by_steps[k][i]
            cells += ([_pct(r, "top1_stale")] if k == 1 else []) + [_pct(r, "top1"), "—" if is_random else
                                                                  f"{(r['top1'] - random[k]['top1']) * 100:+.1f} pts"]
        last = by_steps[counts[-1]][i]
        cells += [f"{last['macs']:.1%}", f"{last['params']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the oracle -------------------------------------------------------------------------


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def oracle_table(teacher, example, calib, calib_labelled, images, labels, budget, seeds) -> str:
    """How well each criterion ranks channels: the Spearman correlation of its
    scores with the loss increase (cross-entropy on labelled training images
    the calibration does not use) of removing that one channel, all else kept.
    Within groups (mean over the prunable groups), and globally after the
    criterion's normalisation against the loss increase per unit of cost, which
    is what the global ranking compares."""
    from cpdfx.cost import CostModel
    from cpdfx.importance import group_slices, normalise, resolve
    from cpdfx.budget import Target
    from cpdfx.solve import score, unit_costs
    from cpdfx.passes import comb as comb_pass

    gm = cpdfx.capture(teacher.eval(), example)
    groups = comb_pass(gm)
    with torch.no_grad():
        base = F.cross_entropy(gm(images), labels).item()
    oracle, t0 = {}, time.perf_counter()
    for g in tqdm(groups.prunable, desc="oracle (leave one channel out)", file=sys.stderr):
        # removing a channel = zeroing the input columns of every consumer that reads it
        columns = [(tensor, coords) for _, d, tensor, coords in group_slices(gm, groups, g) if d == 1]
        loss_up = np.zeros(g.size)
        with torch.no_grad():
            for c in range(g.size):
                saved = []
                for tensor, coords in columns:
                    idx = torch.as_tensor(np.nonzero(coords == c)[0])
                    saved.append((tensor, idx, tensor[:, idx].clone()))
                    tensor[:, idx] = 0
                loss_up[c] = F.cross_entropy(gm(images), labels).item() - base
                for tensor, idx, old in saved:
                    tensor[:, idx] = old
        oracle[g.id] = loss_up
    print(f"oracle: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    unit = unit_costs(CostModel(gm, groups, example), groups.prunable, Target(macs=budget))
    variants = [("l1", None), ("l2", None), ("bn_scale", None), ("fisher", calib), ("fisher+labels", calib_labelled),
                ("taylor", calib), ("taylor+labels", calib_labelled)] + [(f"random seed {s}", s) for s in seeds]
    lines = [f"Rank quality on the teacher ({len(images)} held-out training images, base loss {base:.4f}; "
             f"{len(groups.prunable)} prunable groups, {sum(g.size for g in groups.prunable)} channels):", "",
             "| criterion | normalisation | Spearman within groups (mean) | Spearman global (normalised score vs loss increase / unit cost) |",
             "|---|---|---|---|"]
    for label, extra in variants:
        if label.startswith("random"):
            criterion, calibration = Random(extra), None
        else:
            criterion, calibration = resolve(label.split("+")[0]), extra
        raw = score(criterion, gm, groups, example, calibration)
        within = np.nanmean([spearman(raw[g.id], oracle[g.id]) for g in groups.prunable])
        norm = normalise({g.id: raw[g.id] for g in groups.prunable}, criterion.normalisation,
                         unit if criterion.normalisation == "cost" else None)
        globally = spearman(np.concatenate([norm[g.id] for g in groups.prunable]),
                            np.concatenate([oracle[g.id] / unit[g.id] for g in groups.prunable]))
        lines.append(f"| {label} | {criterion.normalisation} | {within:+.2f} | {globally:+.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# -- the report -------------------------------------------------------------------------


def machine() -> str:
    cpu, vm = platform.processor() or "unknown CPU", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or "unknown CPU"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                vm = vm or " hypervisor" in line
    except OSError:
        pass
    return (f"{cpu}{' (virtual machine)' if vm else ''}, {torch.get_num_threads()} threads "
            f"(of {os.cpu_count()} cores), CPU only; torch {torch.__version__}, Python {platform.python_version()}")


def section(args, info, tables, elapsed) -> str:
    command = "python benchmarks/criteria_fashion.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    command = re.sub(r" --results \S+", "", command)
    teacher = (f"`ResNetTiny(num_classes=10, in_channels=1, widths={tuple(args.widths)})` "
               f"({info['params']:,} params, {info['macs'] / 1e6:.1f} M MACs per 28x28 image), trained "
               f"{args.epochs} epochs on the 60k training images (AdamW lr {args.lr:g}, weight decay "
               f"{args.weight_decay:g}, cosine, batch {args.batch}, no augmentation; seed {args.seed}); "
               f"test top-1 {info['top1']:.2%}")
    calib = (f"{args.calib_batches} batches of {args.calib_size} training images drawn with seed "
             f"{args.seed}, the same for every row")
    return "\n".join([
        SECTION, "",
        f"Machine: {info['machine']}.",
        f"Command: `{command}` ({info['date']}; {elapsed / 60:.0f} min, "
        + (f"the teacher loaded from the cache; training it took {info['train_s'] / 60:.1f} min)." if info["cached"]
           else f"of which training the teacher {info['train_s'] / 60:.1f} min)."),
        "",
        f"Teacher: {teacher}. Each cell is one call of `cpdfx.prune(teacher.eval(), x[:{args.calib_size}], "
        f"macs=..., importance=..., calibration=..., steps=k)`, then top-1 on the full 10k test set in eval "
        f"mode; no weight is trained. Calibration: {calib}. fisher and taylor score on it, without labels "
        f"(cross-entropy against the teacher's own predictions) or with them (\"+labels\"); every criterion "
        f"has its batch-norm running statistics re-estimated on its images after each round "
        f"(`reestimate_bn`, the default when calibration is given). \"1 step, stale BN\": the one-round "
        f"model before that re-estimation. With k steps, prune removes channels in k rounds along a geometric "
        f"schedule, scoring the smaller graph again in each. random: `cpdfx.importance.Random(seed)` for seeds "
        f"{', '.join(map(str, args.random_seeds))}; mean ± std (population). MACs and params: achieved shares "
        f"of the teacher's, for the last step count.",
        "",
        *[t + "\n" for t in tables],
    ]).rstrip() + "\n"


def write_results(path: Path, text: str) -> None:
    """Replace this benchmark's section of path (keeping its "Reading it:"
    paragraph), or add it (before the "Correctness checks" section when there
    is one, else at the end); the rest of the file is left as it is."""
    old = path.read_text() if path.is_file() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        checks = re.search(r"^## Correctness checks", old, flags=re.M)
        if checks:
            path.write_text(old[:checks.start()] + text + "\n" + old[checks.start():])
        else:
            path.write_text(old.rstrip("\n") + ("\n\n" if old.strip() else "") + text)
        return
    nxt = re.search(r"^## ", old[start + len(SECTION):], flags=re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(old)
    reading = re.search(r"^Reading it:.*?(?=\n\n|\Z)", old[start:end], flags=re.M | re.S)
    new = text + ("\n" + reading.group(0).rstrip() + "\n" if reading else "")
    path.write_text(old[:start] + new + ("\n" + old[end:] if end < len(old) else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="/tmp/cpdfx-bench", help="where the trained teacher is kept")
    parser.add_argument("--retrain", action="store_true", help="train even when the cache has the teacher")
    parser.add_argument("--widths", type=int, nargs=3, default=(16, 32, 64), help="ResNetTiny stage widths")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="teacher init, data order and calibration draw")
    parser.add_argument("--macs", type=float, nargs="+", default=(0.8, 0.5, 0.3), help="MACs budgets (shares)")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--random-seeds", type=int, nargs="+", default=(0, 1, 2, 3, 4))
    parser.add_argument("--steps", type=int, nargs="+", default=(1, 5), help="prune rounds to compare")
    parser.add_argument("--oracle", action="store_true",
                        help="also rank-correlate each criterion with the loss increase of removing each channel")
    parser.add_argument("--oracle-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="markdown file to put the section in (see the docstring)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch internals
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    train, test = tensors("train"), tensors("test")
    teacher, info = train_teacher(args, train, test)
    info["top1"] = accuracy(teacher, *test)
    print(f"teacher: test top-1 {info['top1']:.4f}", file=sys.stderr)

    gen = torch.Generator().manual_seed(args.seed)
    # calibration and oracle images: disjoint slices of one seeded permutation
    order = torch.randperm(len(train[0]), generator=gen)
    n_calib, n_oracle = args.calib_batches * args.calib_size, args.oracle_images if args.oracle else 0
    pick = order[:n_calib]
    oracle_pick = order[n_calib:n_calib + n_oracle]
    batches = [pick[i:i + args.calib_size] for i in range(0, len(pick), args.calib_size)]
    calib = [train[0][b] for b in batches]                       # inputs only: self-supervised loss
    calib_labelled = [(train[0][b], train[1][b]) for b in batches]  # (inputs, target)
    example = calib[0]
    base = cpdfx.cost(teacher, example)
    info.update(macs=base.macs / len(example), params=base.params, machine=machine(),
                date=datetime.date.today().isoformat())

    tables = []
    for budget in args.macs:
        by_steps = {k: rows_for(budget, k, teacher, example, calib, calib_labelled, args.random_seeds, test)
                    for k in args.steps}
        tables.append(table(budget, by_steps, info["top1"]))
    if args.oracle:
        tables.append(oracle_table(teacher, example, calib, calib_labelled, train[0][oracle_pick],
                                   train[1][oracle_pick], args.macs[0], args.random_seeds))
    elapsed = time.perf_counter() - t0
    text = section(args, info, tables, elapsed)
    print(text)
    print(f"total {elapsed:.0f} s", file=sys.stderr)
    if args.results:
        write_results(args.results, text)
        print(f"wrote the section to {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
