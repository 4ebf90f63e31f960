"""Asked for a speed-up, what does one get? Five transformers architectures
(default configs, 224x224, random weights) pruned by cpdfx to x1.5, x2 and x3
in onnxruntime (`latency=1/speedup`, timed at the batch asked), beside cpdfx
`macs=` at the MACs the latency budget reached (default alignment) and
Torch-Pruning (group L2, round_to = the channel block) at the same MACs. Every
model of one architecture and batch is exported and timed side by side,
interleaved, in one run, and the run repeated in fresh sessions (--samples;
the median kept, as the latency budget's own measurement does).

    python benchmarks/speedup.py                                  # all five, batch 8 and 1
    python benchmarks/speedup.py --models resnet --batches 8     # one architecture
    python benchmarks/speedup.py --quick                          # 64x64 inputs, to try the script

Importance is l2 everywhere (random weights: this measures structure and
speed, not accuracy). The table-building time of the first latency prune of
each architecture and batch is reported (the tables are cached after it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import cpdfx
from cpdfx import zoo
from cpdfx.budget import BudgetError
from cpdfx.runtime import channel_block

sys.path.insert(0, str(Path(__file__).parent))
from latency_resnet50 import torch_pruning  # noqa: E402  (the peer, as its users run it)

MODELS = ("resnet", "mobilenet_v2", "convnext", "vit", "segformer")
NAMES = {"resnet": "ResNet-50", "mobilenet_v2": "MobileNetV2 1.0", "convnext": "ConvNeXt-T",
         "vit": "ViT-B/16", "segformer": "SegFormer-B0"}


def prune_variants(model, x, target: float, batch: int, block: int):
    """(name, slim or error, seconds) for the three ways to x`target`."""
    out = []
    start = time.perf_counter()
    try:
        slim = cpdfx.prune(model, x, latency=1 / target, latency_options={"batch": batch})
    except BudgetError as err:
        out.append((f"cpdfx speedup={target:g}", err, time.perf_counter() - start))
        return out
    out.append((f"cpdfx speedup={target:g}", slim, time.perf_counter() - start))
    macs = slim.meta["cpdfx_report"]["achieved"]["macs"]
    start = time.perf_counter()
    out.append((f"cpdfx macs={macs:.3f}", cpdfx.prune(model, x, macs=macs), time.perf_counter() - start))
    start = time.perf_counter()
    try:
        peer = torch_pruning(model, x, macs, block)
        if peer is None:
            raise RuntimeError(f"its ratio search found no pruning ratio that reaches {macs:.1%} of the MACs")
        try:
            with torch.no_grad():
                peer(x)
        except Exception as err:
            raise RuntimeError(f"its pruned model no longer runs in torch: {err}") from err
        out.append((f"Torch-Pruning macs={macs:.3f}, round_to={block}", peer, time.perf_counter() - start))
    except Exception as err:  # the peer fails on some architectures; the row says how
        out.append((f"Torch-Pruning macs={macs:.3f}, round_to={block}", err, time.perf_counter() - start))
    return out


def run(name, args, out: Path, block: int) -> tuple[list, dict]:
    size = 64 if args.quick else 224
    torch.manual_seed(0)
    model = zoo.build(name, num_labels=1000 if name != "segformer" else 19, image_size=size, small=False).eval()
    x = torch.randn(2, 3, size, size)
    base = cpdfx.cost(model, x)
    rows = []
    for batch in args.batches:
        folder = out / f"{name}-b{batch}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"original": cpdfx.export_onnx(model, x, folder / "original.onnx")}
        info = {"original": {"macs": 1.0, "params": 1.0, "seconds": 0.0, "asked": None}}
        for target in args.targets:
            for label, slim, seconds in prune_variants(model, x, target, batch, block):
                if isinstance(slim, Exception):
                    info[label] = {"error": f"{type(slim).__name__}: {' '.join(str(slim).split())[:160]}",
                                   "seconds": seconds, "asked": target}
                    print(f"  {NAMES[name]} batch {batch} {label}: {info[label]['error']}", flush=True)
                    continue
                cost = cpdfx.cost(slim, x)
                report = getattr(slim, "meta", {}).get("cpdfx_report", {})  # none for the peer's module
                info[label] = {"macs": cost.macs / base.macs, "params": cost.params / base.params,
                               "seconds": seconds, "asked": target,
                               "in_prune": report.get("achieved", {}).get("latency"),
                               "rounds": report["steps"][-1].get("rounds", []) if report.get("steps") else []}
                paths[label] = cpdfx.export_onnx(slim, x, folder / f"v{len(paths)}.onnx")
                print(f"  {NAMES[name]} batch {batch} {label}: {info[label]['macs']:.1%} MACs, "
                      f"{info[label]['params']:.1%} params, {seconds:.0f} s", flush=True)
        result = cpdfx.bench(paths, (3, size, size), batch_sizes=(batch,), repeats=args.repeats,
                             max_seconds=args.max_seconds, samples=args.samples,
                             providers=["CPUExecutionProvider"], progress=False)
        for r in result.rows:
            rows.append({"model": NAMES[name], "batch": batch, "variant": r["model"], **info[r["model"]],
                         "median_ms": r["median_ms"], "speedup": r["speedup"], "repeats": r["repeats"]})
        for label, row in info.items():
            if "error" in row:
                rows.append({"model": NAMES[name], "batch": batch, "variant": label, **row})
    return rows, result.machine


def markdown(rows) -> str:
    """The rows as a table; a latency prune's `in prune` column is the speed-up
    it measured of the model it kept, and (in brackets) its rounds."""
    lines = ["| model | batch | variant | asked | measured | in prune | MACs | params | ms | prune s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | x{r['asked']:g} | {r['error']} | | | | | "
                         f"{r['seconds']:.0f} |")
            continue
        asked = f"x{r['asked']:g}" if r["asked"] and r["variant"].startswith("cpdfx speedup") else ""
        own = f"x{1 / r['in_prune']:.2f} ({len(r['rounds'])})" if r.get("in_prune") else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {asked} | x{r['speedup']:.2f} | {own} | "
                     f"{r['macs']:.1%} | {r['params']:.1%} | {r['median_ms']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--targets", default="1.5,2,3", help="speed-ups to ask for (default 1.5,2,3)")
    parser.add_argument("--batches", default="8,1", help="batch sizes (default 8,1)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds per sample (default 20)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="fewer rounds (3 at least) where --repeats would take longer (default 60)")
    parser.add_argument("--samples", type=int, default=3,
                        help="separate interleaved runs per architecture and batch, their median kept (default 3)")
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, to try the script")
    parser.add_argument("--out", default=None, help="folder for the ONNX files and rows.json")
    args = parser.parse_args()
    args.targets = [float(t) for t in args.targets.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    warnings.filterwarnings("ignore")
    out = Path(args.out or tempfile.mkdtemp(prefix="cpdfx-speedup-"))
    block = channel_block()
    rows = []
    for name in args.models.split(","):
        print(f"{NAMES[name]}:", flush=True)
        more, machine = run(name, args, out, block)
        rows += more
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print("\n" + markdown(rows))
    print(f"\n{machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']} (CPU), torch "
          f"{machine['torch']}, channel block {block}; per architecture and batch, the median of {args.samples} "
          f"runs in fresh sessions, each the median of {min(r.get('repeats', 0) for r in rows if 'error' not in r)} or "
          f"more interleaved rounds; "
          f"files in {out}")


if __name__ == "__main__":
    main()
