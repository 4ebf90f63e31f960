"""Do saved MACs turn into onnxruntime speed? ResNet-50 (transformers config,
224x224, random weights) pruned to 50% MACs by cpdfx and by Torch-Pruning
(DepGraph), every model exported to ONNX and timed side by side, interleaved,
in one run.

    python benchmarks/latency_resnet50.py                 # batch 8 and 1, CPU (+ CUDA when present)
    python benchmarks/latency_resnet50.py --quick         # at 64x64, to try the script

Importance is l2 for every variant: the weights are random, so this measures
structure and speed, not accuracy (accuracy is benchmarks/criteria_fashion.py
and benchmarks/distill_fashion.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import cpdfx
from cpdfx import zoo
from cpdfx.runtime import channel_block


def torch_pruning(model, x, macs, round_to=None):
    """Torch-Pruning's global group-L2 pruner, its one ratio searched so that
    the result has at most `macs` of the MACs (counted by cpdfx, as for ours)."""
    import torch_pruning as tp

    base = cpdfx.cost(model, x).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(model)
        classifier = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=True, ignored_layers=[classifier],
                                      round_to=round_to, forward_fn=lambda mod, inp: mod(inp).logits)
        pruner.step()
        share = cpdfx.cost(m, x).macs / base
        if share <= macs:
            best, hi = m, ratio
        else:
            lo = ratio
    return best


def variants(model, x, block):
    """name -> function returning the pruned model."""
    return {
        "cpdfx l2, 50% MACs (default: aligned widths)": lambda: cpdfx.prune(model, x, macs=0.5),
        "cpdfx l2, 50% MACs, round_to=1": lambda: cpdfx.prune(model, x, macs=0.5, round_to=1),
        "cpdfx l2, latency=0.5 (x2)": lambda: cpdfx.prune(model, (x,), latency=0.5),
        "Torch-Pruning l2, 50% MACs": lambda: torch_pruning(model, x, 0.5),
        f"Torch-Pruning l2, 50% MACs, round_to={block}": lambda: torch_pruning(model, x, 0.5, block),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="at 64x64, to try the script")
    parser.add_argument("--batches", default="8,1", help="batch sizes (default 8,1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", default=None, help="comma-separated substrings of variant names to run")
    parser.add_argument("--out", default=None, help="folder for the ONNX files and bench.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    size = 64 if args.quick else 224
    model = zoo.build("resnet", num_labels=1000, image_size=size, small=False).eval()
    x = torch.randn(2, 3, size, size)
    out = Path(args.out or tempfile.mkdtemp(prefix="cpdfx-resnet50-"))
    out.mkdir(parents=True, exist_ok=True)
    base = cpdfx.cost(model, x)
    paths, rows = {"original": cpdfx.export_onnx(model, x, out / "original.onnx")}, {}
    rows["original"] = {"macs": 1.0, "params": 1.0, "seconds": 0.0}
    for name, make in variants(model, x, channel_block()).items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        start = time.perf_counter()
        slim = make()
        seconds = time.perf_counter() - start
        c = cpdfx.cost(slim, x)
        rows[name] = {"macs": c.macs / base.macs, "params": c.params / base.params, "seconds": seconds}
        paths[name] = cpdfx.export_onnx(slim, x, out / f"v{len(paths)}.onnx")
        print(f"{name}: {rows[name]['macs']:.1%} MACs, {rows[name]['params']:.1%} params, "
              f"pruned in {seconds:.1f} s", flush=True)
    batches = tuple(int(b) for b in args.batches.split(","))
    result = cpdfx.bench(paths, (3, size, size), batch_sizes=batches, repeats=args.repeats)
    result.to_json(out / "bench.json")
    print("\n| model | MACs | params | " + " | ".join(f"batch {b} ms | speed-up" for b in batches) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(batches))
    for name in paths:
        cells = []
        for b in batches:
            r = next(r for r in result.rows if r["model"] == name and r["batch"] == b and r["device"] == "cpu")
            cells.append(f"{r['median_ms']:.1f} | {r['speedup']:.2f}x")
        print(f"| {name} | {rows[name]['macs']:.1%} | {rows[name]['params']:.1%} | " + " | ".join(cells) + " |")
    m = result.machine
    print(f"\n{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} ({', '.join(m['providers'])}), "
          f"torch {m['torch']}, channel block {channel_block()}; median of {args.repeats} interleaved runs; "
          f"files in {out}")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
