"""The whole job, as `cpdfx compress` and `cpdfx demo` run it: compress (prune
while distilling), export the original and the slim model to ONNX, time both
in onnxruntime, and write the report, the models and a plot into one folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from .compress import compress
from .cost import cost
from .data import DataError, resolve_data
from .distill import distill, evaluate
from .export import export_onnx, save
from .report import format_report


def ship(teacher, slim, x, val, task: str, out: Path, *, title: str, repeats: int = 30,
         batch_sizes=(1, 8)) -> dict:
    """Save, export, time and report the original and the slim model in out/."""
    from .bench import bench
    out.mkdir(parents=True, exist_ok=True)
    save(slim, out / "slim.pt2")
    paths = {"original": export_onnx(teacher, x, out / "original.onnx"),
             "slim": export_onnx(slim, x, out / "slim.onnx")}
    timing = bench(paths, tuple(x.shape[1:]), batch_sizes=batch_sizes, repeats=repeats)
    timing.to_json(out / "bench.json")
    metric = "top1" if task == "classification" else "miou"
    scores = {"original": evaluate(teacher, val, task=task)[metric], "slim": evaluate(slim, val, task=task)[metric]}
    costs = {"original": cost(teacher, x[:1]), "slim": cost(slim, x[:1])}
    timing.plot(out / "latency.png", accuracy=scores)
    summary = {"metric": metric, "scores": scores, "macs": {k: c.macs for k, c in costs.items()},
               "params": {k: c.params for k, c in costs.items()}, "bench": timing.rows,
               "machine": timing.machine}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = slim.meta.get("cpdfx_report", {})
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = _markdown(title, summary, timing, report)
    (out / "report.md").write_text(text)
    print("\n" + text)
    return summary


def _markdown(title, summary, timing, report) -> str:
    metric, scores = summary["metric"], summary["scores"]
    batches = sorted({r["batch"] for r in timing.rows})
    lines = [f"# {title}", "",
             f"| model | {metric} | MACs / image | params | " +
             " | ".join(f"batch {b} ms (CPU) | speed-up" for b in batches) + " |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(batches)]
    for name in ("original", "slim"):
        cells = []
        for b in batches:
            r = next(r for r in timing.rows if r["model"] == name and r["batch"] == b and r["device"] == "cpu")
            cells.append(f"{r['median_ms']:.2f} | {r['speedup']:.2f}x")
        lines.append(f"| {name} | {scores[name]:.2%} | {summary['macs'][name] / 1e6:.2f} M | "
                     f"{summary['params'][name] / 1e6:.3f} M | " + " | ".join(cells) + " |")
    m = timing.machine
    lines += ["", f"onnxruntime {m['onnxruntime']} on {m['cpu']} ({m['cores']} cores), "
              f"median of {timing.rows[0]['repeats']} interleaved runs; the plot is latency.png.", ""]
    if report.get("layers"):
        lines += ["## Pruning report", "", "```", format_report(report), "```", ""]
    return "\n".join(lines)


# -- the demo ------------------------------------------------------------------------------

def demo_data(quick: bool):
    """Fashion-MNIST (digits when it is not installed): 20k training images, or
    3k with --quick, so that the demo fits in minutes on two cores."""
    try:
        train = resolve_data("fashion-mnist", split="train", normalize=True)
        val = resolve_data("fashion-mnist", split="test", augment=False, normalize=True)
        name = "Fashion-MNIST"
    except DataError as err:
        print(f"{err} Using scikit-learn's digits instead.")
        train, val = resolve_data("digits", split="train"), resolve_data("digits", split="test", augment=False)
        name = "digits"
    g = torch.Generator().manual_seed(0)
    train = Subset(train, torch.randperm(len(train), generator=g)[:3000 if quick else 20000].tolist())
    if quick:
        val = Subset(val, torch.randperm(len(val), generator=g)[:1000].tolist())
    return name, train, val


def run_demo(args) -> dict:
    """`cpdfx demo`: train a small ResNet, compress it with distillation, ship it.
    Pruned channel counts are multiples of onnxruntime's channel block on this
    CPU, so that the saved MACs show as latency."""
    from .latency import channel_block
    from .models import ResNetTiny
    torch.manual_seed(0)
    name, train, val = demo_data(args.quick)
    out = Path(args.out)
    widths, epochs = ((8, 16, 32), 1) if args.quick else ((16, 32, 64), 2)
    teacher = ResNetTiny(num_classes=10, in_channels=1, widths=widths)
    started = time.perf_counter()
    print(f"1/3 training the teacher on {name} ({len(train)} images, {epochs + 1} epoch(s))")
    teacher = distill(teacher, None, train, val, epochs=epochs + 1, batch_size=128, lr=3e-3).student
    block = 1 if args.quick else channel_block()
    print(f"2/3 compressing to {args.macs:.0%} MACs while distilling ({args.importance}, {epochs} epoch(s), "
          f"channel counts in multiples of {block})")
    x = torch.stack([train[0][0], train[1][0]])
    result = compress(teacher, x, train, val, macs=args.macs, importance=args.importance, prune_steps=3,
                      epochs=epochs, batch_size=128, lr=3e-3, round_to=block, out_dir=out / "train")
    print("3/3 exporting to ONNX and timing in onnxruntime")
    summary = ship(teacher, result.model, x, val, "classification", out, repeats=10 if args.quick else 30,
                   title=f"cpdfx demo: ResNetTiny on {name}, {args.macs:.0%} MACs, {args.importance}")
    print(f"done in {time.perf_counter() - started:.0f} s; report, models and plot in {out}/")
    return summary
