"""Do pruning and int8 stack on a CPU? Original fp32, original int8, slim fp32
and slim int8 of two models, timed side by side in one interleaved run per
model at batch 1 and 8, and scored in onnxruntime where the model is trained.

    python benchmarks/int8.py                              # all three models' rows in benchmarks/results/int8.json
    python benchmarks/int8.py --models fashion --fashion-size 56 --train-images 20000   # a larger Fashion model
    python benchmarks/int8.py --quick                      # tiny inputs, to try the script (to a temporary file)
    python benchmarks/int8.py --table --write              # README's and RESULTS' int8 tables from the rows

Models:
- resnet50: transformers ResNet-50 at 224x224 with random weights (speed only;
  the int8 models are calibrated on random normal images). slim: cpdfx.prune
  macs=0.5, l2.
- resnet50-x4: the same, slim: cpdfx.prune(latency=1/4, l2) with
  latency_options int8, the speed-up of the slim int8 model over the fp32
  original asked (`--speedup 4 --int8`); the bench below measures it again.
- fashion: cpdfx.models.ResNetTiny, widths 32/64/128, trained on the labels
  of Fashion-MNIST's training split (--teacher-epochs, cached; the first
  --train-images of it where given), at 28x28 or --fashion-size. slim:
  cpdfx.compress macs=0.5 with KD from it (--slim-epochs), then as `compress
  --int8` does: post-training int8 scored on val, and quantization-aware
  distillation (pipeline.int8_ready, 1 epoch) where it loses more than 0.5
  point there. Every model is scored in onnxruntime on the 10k test images,
  once, at the end.
The int8 models: cpdfx.choose_method (MinMax, Entropy, Percentile; the best
on validation kept), calibrated on 8 batches of 32 training images. int8
speed depends on the CPU's vector instructions (VNNI above all), so its flags
are in the output. The rows of each model replace that model's rows in --out
and keep the others; every row carries its command, commit and machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import cpdfx
from cpdfx import zoo
from cpdfx.data import batches, resolve_data
from cpdfx.distill import distill, evaluate
from cpdfx.files import cache_dir, write_json
from cpdfx.models import ResNetTiny
from cpdfx.onnxmodel import OnnxModel
from cpdfx.pipeline import Int8, int8_ready
from cpdfx.runtime import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
from proof_table import replace_section  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "int8.json"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
VARIANTS = ("original fp32", "original int8", "slim fp32", "slim int8")
CALIBRATION = (8, 32)  # batches, images per batch


class Resized(Dataset):
    """Images bilinearly resized to size x size."""

    def __init__(self, data, size: int):
        self.data, self.size = data, size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0], y


def int8_pair(fp32: dict, folder: Path, calibration, validation) -> dict:
    """The two int8 files of the original and the slim fp32 files; their QuantizeResults."""
    out = {}
    for name in ("original", "slim"):
        result = cpdfx.choose_method(fp32[f"{name} fp32"], folder / f"{name}.int8.onnx", calibration, validation)
        print("\n".join(result.lines()), flush=True)
        out[f"{name} int8"] = result
    return out


def resnet50(args, folder: Path, speedup: float | None = None) -> dict:
    torch.manual_seed(0)
    size = 32 if args.quick else 224
    model = zoo.build("resnet", num_labels=1000, image_size=size, small=args.quick).eval()
    x = torch.randn(2, 3, size, size)
    if speedup:
        slim = cpdfx.prune(model, x, latency=1 / speedup, importance="l2",
                           latency_options={"int8": True, "batch": 8, "progress": not args.quick})
    else:
        slim = cpdfx.prune(model, x, macs=0.5, importance="l2")
    paths = {"original fp32": cpdfx.export_onnx(model, x, folder / "original.onnx"),
             "slim fp32": cpdfx.export_onnx(slim, x, folder / "slim.onnx")}
    images = [(torch.randn(CALIBRATION[1], 3, size, size),) for _ in range(2 if args.quick else CALIBRATION[0])]
    quantized = int8_pair(paths, folder, images, [(torch.randn(CALIBRATION[1], 3, size, size),)])
    name = "a small transformers ResNet (--quick)" if args.quick else "transformers ResNet-50"
    report = slim.meta["cpdfx_report"]
    return {"model": f"{name}, {size}x{size}, random weights", "paths": paths, "quantized": quantized,
            "shape": (3, size, size), "macs": {"original": cpdfx.cost(model, x).macs, "slim": cpdfx.cost(slim, x).macs},
            "scores": None, "slim": f"cpdfx.prune(latency=1/{speedup:g}, latency_options int8), l2" if speedup
            else "cpdfx.prune(macs=0.5), l2",
            "asked": {"speedup": speedup, "measured_while_pruning": 1 / report["achieved"]["latency"],
                      "landed": report["latency_landed"]} if speedup else None}


def fashion(args, folder: Path) -> dict:
    size = args.fashion_size
    data = {split: resolve_data("fashion-mnist", split=split, normalize=True, augment=False)
            for split in ("train", "val", "test")}
    if size != 28:
        data = {k: Resized(v, size) for k, v in data.items()}
    if args.quick:
        data = {k: Subset(v, range(n)) for (k, v), n in zip(data.items(), (1000, 200, 300))}
    elif args.train_images:
        data["train"] = Subset(data["train"], range(args.train_images))
    widths = (8, 16, 32) if args.quick else (32, 64, 128)
    teacher_epochs, slim_epochs = (1, 1) if args.quick else (args.teacher_epochs, args.slim_epochs)
    torch.manual_seed(0)
    teacher = ResNetTiny(num_classes=10, in_channels=1, widths=widths)
    cached = cache_dir() / "int8" / (f"fashion-w{'-'.join(map(str, widths))}-s{size}-e{args.teacher_epochs}"
                                     f"{f'-n{args.train_images}' if args.train_images else ''}.pt")
    if cached.is_file() and not args.quick:
        teacher.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    else:
        distill(teacher, None, data["train"], data["val"], epochs=teacher_epochs,
                batch_size=64, lr=3e-3, seed=0, progress=not args.quick)
        if not args.quick:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(teacher.state_dict(), cached)
    teacher.eval()
    x = torch.stack([data["train"][0][0], data["train"][1][0]])
    result = cpdfx.compress(teacher, x, data["train"], data["val"], macs=0.5, epochs=slim_epochs,
                            batch_size=64, lr=3e-3, progress=not args.quick)
    validation = batches(data["val"], 2 if args.quick else 32, CALIBRATION[1], shuffle=False)
    plan = Int8(batches(data["train"], CALIBRATION[0], CALIBRATION[1]), validation)
    slim, plan = int8_ready(teacher, result.model, x, data["train"], data["val"], plan, "classification",
                            batch_size=64, progress=not args.quick)
    paths = {"original fp32": cpdfx.export_onnx(teacher, x, folder / "original.onnx"),
             "slim fp32": cpdfx.export_onnx(slim, x, folder / "slim.onnx")}
    quantized = int8_pair(paths, folder, plan.calibration, validation)
    paths.update({name: q.path for name, q in quantized.items()})
    scores = {name: evaluate(OnnxModel(path), data["test"], batch_size=256)["top1"] for name, path in paths.items()}
    return {"model": f"ResNetTiny {'-'.join(map(str, widths))}, Fashion-MNIST {size}x{size}, trained "
                     f"{teacher_epochs} epoch(s) on {len(data['train']):,} images", "paths": paths,
            "quantized": quantized, "shape": (1, size, size),
            "macs": {"original": cpdfx.cost(teacher, x).macs, "slim": cpdfx.cost(slim, x).macs},
            "scores": scores, "test_images": len(data["test"]), "qat": plan.qat,
            "slim": f"cpdfx.compress(macs=0.5) with KD, {slim_epochs} epoch(s); then int8_ready (quantization-aware "
                    f"distillation where post-training int8 loses more than 0.5 point on val)"}


def int8_facts(q) -> dict:
    """How an int8 file was made, and each calibration method's validation scores."""
    return {"method": q.method, "reduce_range": q.reduce_range, "int8_ops": q.int8_ops, "float_ops": q.float_ops,
            "agreement": q.calibration.argmax,
            "methods": {m: {"top1": a.top1 and a.top1["int8"], "agreement": a.argmax} for m, a in q.methods.items()}}


def rows_of(name: str, run: dict, timing) -> list:
    """One row per variant and batch, from one interleaved timing of the four files."""
    out = []
    for r in timing.rows:
        q = run["quantized"].get(r["model"])
        out.append({"model": name, "description": run["model"], "variant": r["model"], "batch": r["batch"],
                    "median_ms": r["median_ms"], "p90_ms": r["p90_ms"], "speedup": r["speedup"],
                    "repeats": r["repeats"], "macs": run["macs"][r["model"].split()[0]],
                    "top1": run["scores"][r["model"]] if run["scores"] else None,
                    "test_images": run.get("test_images"), "slim": run["slim"],
                    "int8": None if q is None else int8_facts(q), "qat": run.get("qat"), "asked": run.get("asked")})
    return out


def verdict(rows: list) -> str:
    """Whether slim int8 beats slim fp32 at batch 8, in one line."""
    at = {r["variant"]: r for r in rows if r["batch"] == max(x["batch"] for x in rows)}
    ratio = at["slim int8"]["speedup"] / at["slim fp32"]["speedup"]
    return (f"{rows[0]['model']}: slim int8 x{at['slim int8']['speedup']:.2f} of the fp32 original at batch "
            f"{at['slim int8']['batch']}, x{ratio:.2f} of the slim fp32 model: int8 "
            + ("pays here" if ratio > 1 else "does not pay here"))


def results_table(rows: list) -> str:
    """RESULTS' section: per model, the four variants at each batch, with the
    machine and command of its rows."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        first, m = mine[0], mine[0]["machine"]
        out += [f"**{model}**: {first['description']}; slim: {first['slim']}.", "",
                "| variant | batch | median ms | speed-up over original fp32 | test top-1 |",
                "|---|---:|---:|---:|---:|"]
        for r in sorted(mine, key=lambda r: (r["batch"], VARIANTS.index(r["variant"]))):
            top1 = f"{r['top1']:.2%}" if r["top1"] is not None else "-"
            out.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | x{r['speedup']:.2f} | {top1} |")
        out += ["", verdict(mine) + "."]
        if first.get("asked"):
            a = first["asked"]
            out.append(f"Asked x{a['speedup']:g} (int8); the pruner measured x{a['measured_while_pruning']:.2f} "
                       f"({'landed' if a['landed'] else 'not landed'}); the table above measures it again.")
        if first.get("qat"):
            q = first["qat"]
            out.append(f"Post-training int8 of the slim model on {q['val_images']:,} val images: "
                       f"{q['post_training']['int8']:.2%} against {q['post_training']['fp32']:.2%} fp32 "
                       f"({-q['points_lost']:+.2f} points; quantization-aware distillation runs past "
                       f"{q['trigger_points']:g}): " + (
                           f"{q['epochs']} epoch(s) of it took int8 to {q['quantization_aware']['int8']:.2%} "
                           f"({'kept' if q['kept'] else 'not kept'})." if q["epochs"] else "not run."))
        out += ["", f"`{first['command']}` at {first['commit']}; onnxruntime {m['onnxruntime']} on {m['cpu']} "
                    f"({m['cores']} cores, flags {', '.join(m['cpu_flags'])}), batch 1 and 8, interleaved, median "
                    f"of {min(r['repeats'] for r in mine)} or more rounds.", ""]
    return "\n".join(out).rstrip()


def readme_table(rows: list) -> str:
    """README's rows: each model's slim int8 speed-up at batch 8 and, where
    trained, the top-1 of the fp32 original, the slim fp32 and the slim int8 model."""
    lines = ["| model; budget | slim int8 over fp32 original, batch 8 | slim fp32, batch 8 | "
             "top-1: original / slim / slim int8 |",
             "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        at = {r["variant"]: r for r in rows if r["model"] == model and r["batch"] == 8}
        top1 = (" / ".join(f"{at[v]['top1']:.2%}" for v in ("original fp32", "slim fp32", "slim int8"))
                if at["slim int8"]["top1"] is not None else "- (random weights)")
        r = at["slim int8"]
        budget = f"asked x{r['asked']['speedup']:g} as int8" if r.get("asked") else "macs=0.5"
        lines.append(f"| {r['description']}; {budget} | x{r['speedup']:.2f} | "
                     f"x{at['slim fp32']['speedup']:.2f} | {top1} |")
    return "\n".join(lines)


def tables(write: bool) -> None:
    rows = json.loads(RESULTS.read_text())["rows"]
    body = results_table(rows)
    print(body + "\n\n" + readme_table(rows))
    if write:
        replace_section(Path(__file__).parent / "RESULTS.md", body, "int8")
        replace_section(Path(__file__).parent.parent / "README.md", readme_table(rows), "int8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs and models, to try the script")
    parser.add_argument("--models", default=None,
                        help="which models (default all three; with --quick resnet50,fashion: int8 does not speed up "
                             "the tiny --quick ResNet, so x4 is out of its reach)")
    parser.add_argument("--fashion-size", type=int, default=28, help="Fashion-MNIST image size (default 28)")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=None,
                        help="train the Fashion models on the first N training images (default all)")
    parser.add_argument("--slim-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default its own)")
    parser.add_argument("--out", default=None, help=f"the JSON to write (default {RESULTS}; with --quick a "
                                                    f"temporary file)")
    parser.add_argument("--table", action="store_true", help=f"print the tables of {RESULTS.name}, run nothing")
    parser.add_argument("--write", action="store_true", help="with --table: replace README's and RESULTS' int8 sections")
    args = parser.parse_args()
    if args.table:
        return tables(args.write)
    warnings.filterwarnings("ignore")
    if args.quick:
        torch.set_num_threads(1)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="cpdfx-int8-")) / "int8.json" if args.quick
                                           else RESULTS)
    flags = sorted(f for f in FLAGS if f in cpu_flags())
    print(f"CPU flags: {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    command = " ".join(["python", *sys.argv])
    rows = []
    models = args.models or ("resnet50,fashion" if args.quick else "resnet50,resnet50-x4,fashion")
    for name in models.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"cpdfx-int8-{name}-"))
        start = time.perf_counter()
        run = {"resnet50": resnet50, "resnet50-x4": lambda a, f: resnet50(a, f, speedup=4.0),
               "fashion": fashion}[name](args, folder)
        paths = {v: run["paths"].get(v) or run["quantized"][v].path for v in VARIANTS}
        timing = cpdfx.bench(paths, run["shape"], batch_sizes=(1, 8), threads=args.threads,
                             repeats=3 if args.quick else args.repeats, min_seconds=0 if args.quick else 1.0,
                             progress=False)
        key = f"fashion{args.fashion_size}" if name == "fashion" else name
        model_rows = [{**r, "command": command, "commit": commit, "machine": {**timing.machine, "cpu_flags": flags}}
                      for r in rows_of(key, run, timing)]
        rows += model_rows
        print(f"\n{run['model']} ({time.perf_counter() - start:.0f} s; files in {folder})")
        print("| variant | batch | median ms | speed-up | top-1 |\n|---|---:|---:|---:|---:|")
        for r in model_rows:
            top1 = f"{r['top1']:.2%}" if r["top1"] is not None else "-"
            print(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.3f} | {r['speedup']:.2f}x | {top1} |")
        print(verdict(model_rows), flush=True)
    new = {r["model"] for r in rows}
    kept = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in new] if out.is_file() else []
    rows = kept + rows
    write_json(out, {"quick": args.quick, "verdicts": [verdict([r for r in rows if r["model"] == m])
                                                       for m in dict.fromkeys(r["model"] for r in rows)],
                     "rows": rows})
    print(f"\nrows written to {out} (the rows of {', '.join(sorted(new))}; the others kept)")


if __name__ == "__main__":
    main()
