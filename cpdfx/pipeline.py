"""The whole job, as `cpdfx compress` and `cpdfx demo` run it: compress (prune
while distilling), export the original and the slim model to ONNX (and, asked,
the slim model in int8), time them in onnxruntime, and write the report, the
models and a plot into one folder.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from .bench import bench, torch_threads
from .compress import compress
from .data import FASHION_ENV, DataError, batches, fashion_root, resolve_data
from .distill import distill, evaluate
from .export import export_onnx, save
from .files import atomic_path, cache_dir, write_json, write_text
from .onnxmodel import OnnxModel
from .qat import distill_int8
from .quantize import choose_method, quantize
from .runtime import channel_block
from .teacher import METRIC_NAMES
from .models import ResNetTiny
from .ranks import is_main
from .report import REPORT, format_report, per_image
from .version import __version__


INT8 = "slim int8"  # the int8 model's name in the bench, the scores and the report
INT8_FILE = "slim.int8.onnx"
MAX_INT8_DROP = 1.0  # points of the metric the int8 model may lose against the slim fp32 one and still ship
QAT_TRIGGER = 0.5  # points post-training int8 may lose on val before `int8_ready` trains with int8 rounding
QAT_LR = 1e-4  # AdamW's rate for that fine-tune of a trained model (training from scratch: 1e-3)


@dataclass(frozen=True)
class Int8:
    """What `ship` quantizes the slim model on: calibration batches (of the
    training images), and validation batches to choose the calibration method
    on (see quantize.choose_method), or a method."""
    calibration: list
    validation: list | None = None
    method: str | None = None
    qat: dict | None = None  # what int8_ready measured and did, for the report


def ship(teacher, slim, x, val, task: str, out: Path, *, title: str, repeats: int = 30,
         batch_sizes=(1, 8), threads: int | None = None, training=(), scores=None, int8: Int8 | None = None) -> dict:
    """Save, export, time and report the original and the slim model in out/.
    training: lines that state how each model was trained, for the report.
    scores: {"original": s, "slim": s} in the task's metric where they were
    measured already (cpdfx compress's test scores); else measured on val.
    int8: also quantize the slim model to out/slim.int8.onnx; then the three
    models are timed side by side and all three scored on val in onnxruntime
    (`scores` unused), and report.json's "int8" says whether int8 pays here."""
    out.mkdir(parents=True, exist_ok=True)
    save(slim, out / "slim.pt2")
    paths = {"original": export_onnx(teacher, x, out / "original.onnx"),
             "slim": export_onnx(slim, x, out / "slim.onnx")}
    quantized = None
    if int8 is not None:  # before the timing: a model onnxruntime cannot quantize is said at once
        quantized = quantize_plan(paths["slim"], out / INT8_FILE, int8, task, threads=threads)
        paths[INT8] = quantized.path
    timing = bench(paths, tuple(x.shape[1:]), batch_sizes=batch_sizes, repeats=repeats, threads=threads)
    timing.to_json(out / "bench.json")
    metric = "top1" if task == "classification" else "miou"
    if quantized is not None:
        scores = {name: evaluate(OnnxModel(path, threads), val, task=task)[metric] for name, path in paths.items()}
    scores = scores or {"original": evaluate(teacher, val, task=task)[metric],
                        "slim": evaluate(slim, val, task=task)[metric]}
    costs = {"original": per_image(teacher, x), "slim": per_image(slim, x)}  # as the pruning report counts
    if quantized is not None:
        costs[INT8] = costs["slim"]  # the same graph, in int8
    timing.plot(out / "latency.png", macs={k: c.macs for k, c in costs.items()}, accuracy=scores, metric=metric)
    summary = {"metric": metric, "scores": scores, "macs": {k: c.macs for k, c in costs.items()},
               "params": {k: c.params for k, c in costs.items()}, "bench": timing.rows,
               "machine": timing.machine, "training": list(training)}
    report = dict(slim.meta.get(REPORT, {}))
    if quantized is not None:
        summary["int8"] = report["int8"] = int8_summary(quantized, timing.rows, scores, metric, len(val), int8.qat)
    write_json(out / "summary.json", summary)
    write_json(out / "report.json", report)
    text = _markdown(title, summary, timing, report)
    write_text(out / "report.md", text)
    print("\n" + text)
    return summary


def int8_ready(teacher, slim, x, train, val, plan: Int8, task: str, *, epochs: int = 1, batch_size: int = 64,
               threads: int | None = None, progress: bool = True):
    """The slim model as it best survives int8, and the plan with what was
    measured (plan.qat). Post-training int8 of slim is scored on val against
    slim fp32, both in onnxruntime; where it loses more than QAT_TRIGGER
    points, slim is distilled from the teacher for `epochs` with int8
    rounding in the loop (qat.distill_int8, AdamW at QAT_LR), and that model
    is kept where its int8 scores higher on val. Test is not read. Under
    torchrun every rank calls it (the scores are summed over the ranks, the
    fine-tune trains under DDP) and rank 0 prints."""
    say = print if is_main() else lambda text: None
    metric = "top1" if task == "classification" else "miou"
    with tempfile.TemporaryDirectory(prefix="cpdfx-qat-") as tmp:
        def val_scores(model, name):
            fp32 = export_onnx(model, x, Path(tmp) / f"{name}.onnx")
            int8 = quantize_plan(fp32, Path(tmp) / f"{name}.int8.onnx", plan, task, threads=threads, quiet=True)
            return {kind: evaluate(OnnxModel(path, threads), val, task=task)[metric]
                    for kind, path in (("fp32", fp32), ("int8", int8.path))}

        before = val_scores(slim, "slim")
        lost = (before["fp32"] - before["int8"]) * 100
        facts = {"metric": metric, "trigger_points": QAT_TRIGGER, "val_images": len(val), "post_training": before,
                 "points_lost": lost, "epochs": 0, "kept": False}
        say(f"post-training int8 on val: {METRIC_NAMES.get(metric, metric)} {before['int8']:.2%} against "
              f"{before['fp32']:.2%} in fp32 ({-lost:+.2f} points)")
        if lost <= QAT_TRIGGER or epochs < 1:
            return slim, replace(plan, qat=facts)
        say(f"more than {QAT_TRIGGER:g} point lost: {epochs} epoch(s) of quantization-aware distillation")
        result = distill_int8(slim, teacher, train, val, epochs=epochs, task=task, batch_size=batch_size,
                              lr=QAT_LR, progress=progress)
        after = val_scores(result.student, "qat")
        keep = after["int8"] > before["int8"]
        facts.update(epochs=epochs, lr=QAT_LR, quantization_aware=after, kept=keep)
        say(f"after it, int8 on val: {after['int8']:.2%} (fp32 {after['fp32']:.2%}): "
              + ("kept" if keep else "not better, the model before it kept"))
    return (result.student if keep else slim), replace(plan, qat=facts)


def quantize_plan(onnx_in, onnx_out, plan: Int8, task: str, runtime: str = "cpu", threads: int | None = None,
                  quiet: bool = False):
    """quantize with plan's method, or choose_method on its validation batches;
    prints what it wrote and how close it is (unless quiet). Returns the QuantizeResult."""
    options = dict(task=task, runtime=runtime, threads=threads)
    result = (quantize(onnx_in, onnx_out, plan.calibration, method=plan.method, **options) if plan.method else
              choose_method(onnx_in, onnx_out, plan.calibration, plan.validation, **options))
    if not quiet:
        print("\n".join(result.lines()))
    return result


def int8_summary(quantized, rows, scores: dict, metric: str, images: int, qat: dict | None = None) -> dict:
    """report.json's "int8": the file and how it was made, the three models'
    scores in onnxruntime, the speed-ups of the slim fp32 and int8 models over
    the original and of int8 over slim fp32 at each batch, and the verdict:
    ship the int8 model where it is faster than the slim fp32 model at every
    batch timed and loses at most MAX_INT8_DROP points, else the slim fp32 one.
    qat: what int8_ready measured on val and did, where it ran."""
    speedup = {name: {r["batch"]: r["speedup"] for r in rows if r["model"] == name and r["device"] == "cpu"}
               for name in ("slim", INT8)}
    over_fp32 = {b: speedup[INT8][b] / speedup["slim"][b] for b in speedup[INT8]}
    drop = (scores["slim"] - scores[INT8]) * 100
    faster = all(v > 1 for v in over_fp32.values())
    ship_int8 = faster and drop <= MAX_INT8_DROP
    times = ", ".join(f"x{v:.2f} at batch {b}" for b, v in over_fp32.items())
    change = f"{METRIC_NAMES.get(metric, metric)} {-drop:+.2f} points against the slim fp32 model"
    if ship_int8:
        verdict = f"int8 pays on this machine ({times} against the slim fp32 model; {change}): ship {INT8_FILE}."
    elif faster:
        verdict = (f"int8 is faster on this machine ({times} against the slim fp32 model) but loses more than "
                   f"{MAX_INT8_DROP:g} point ({change}): ship slim.onnx; {INT8_FILE} is written anyway.")
    else:
        verdict = (f"int8 is not faster than the slim fp32 model at every batch on this machine ({times}; "
                   f"{change}): ship slim.onnx; {INT8_FILE} is written anyway.")
    return {"file": INT8_FILE, "method": quantized.method, "quantize": quantized.as_dict(),
            "scores_onnxruntime": {"images": images, **scores},
            "speedup": {name: speedup[name] for name in ("slim", INT8)}, "int8_over_slim": over_fp32,
            "faster_than_slim": faster, "points_lost": drop, "ship": INT8_FILE if ship_int8 else "slim.onnx",
            "verdict": verdict, **({"qat": qat} if qat is not None else {})}


def _markdown(title, summary, timing, report) -> str:
    metric, scores = summary["metric"], summary["scores"]
    batches = sorted({r["batch"] for r in timing.rows})
    lines = [f"# {title}", "",
             f"| model | {metric} | MACs / image | params | " +
             " | ".join(f"batch {b} ms (CPU) | speed-up" for b in batches) + " |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(batches)]
    for name in scores:
        cells = []
        for b in batches:
            r = next(r for r in timing.rows if r["model"] == name and r["batch"] == b and r["device"] == "cpu")
            cells.append(f"{r['median_ms']:.2f} | {r['speedup']:.2f}x")
        lines.append(f"| {name} | {scores[name]:.2%} | {summary['macs'][name] / 1e6:.2f} M | "
                     f"{summary['params'][name] / 1e6:.3f} M | " + " | ".join(cells) + " |")
    m = timing.machine
    change = (scores["slim"] - scores["original"]) * 100
    lines += ["", "The speed-up is the median, over the timed rounds, of the original's time over the slim "
              "model's in the same round: it holds while the machine's speed drifts, and so can differ from the "
              "ratio of the two medians.",
              "", f"{metric}: {change:+.2f} points for the slim model at "
              f"{summary['macs']['slim'] / summary['macs']['original']:.1%} of the MACs per image.", ""]
    if "int8" in summary:
        q = summary["int8"]
        chosen = f"{', '.join(q['quantize']['methods'])} compared on validation" if q["quantize"]["methods"] else \
            "as asked"
        lines += [f"{q['verdict']} All three models are scored in onnxruntime on "
                  f"{q['scores_onnxruntime']['images']:,} images; the int8 model is calibrated by "
                  f"{q['method']} ({chosen}).", ""]
    if summary.get("int8", {}).get("qat", {}).get("epochs"):
        t = summary["int8"]["qat"]
        lines += [f"Post-training int8 lost {t['points_lost']:.2f} points on validation (more than "
                  f"{t['trigger_points']:g}), so the slim model was distilled for {t['epochs']} epoch(s) with int8 "
                  f"rounding in the loop: int8 on validation {t['post_training']['int8']:.2%} before, "
                  f"{t['quantization_aware']['int8']:.2%} after ("
                  + ("kept)." if t["kept"] else "not better: the model before it kept)."), ""]
    if summary["training"]:
        lines += ["## Training budgets", ""] + [f"- {line}" for line in summary["training"]] + [""]
    lines += [f"onnxruntime {m['onnxruntime']} on {m['cpu']} ({m['cores']} cores, "
              f"{m['threads'] or 'default'} threads), median of {min(r['repeats'] for r in timing.rows)} or more "
              f"interleaved runs; the plot is latency.png.", ""]
    if report.get("layers"):
        lines += ["## Pruning report", "", "```", format_report(report), "```", ""]
    return "\n".join(lines)


# -- the demo ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoPlan:
    """What a demo mode trains and times. The teacher trains on the labels
    from scratch; the slim model starts as its copy and is pruned during the
    first half of its epochs while distilled from it. Image counts are caps:
    digits has fewer. How long it takes is `demo_seconds`."""
    teacher_images: int
    teacher_epochs: int
    slim_images: int
    slim_epochs: int
    val_images: int | None
    widths: tuple = (16, 32, 64)
    lr: float = 3e-3
    batch_size: int = 64
    prune_steps: int = 3
    repeats: int = 30


DEMO_CALIBRATION = (8, 32)  # the demo's int8 calibration: batches of training images, images per batch
PLANS = {"full": DemoPlan(60000, 4, 60000, 2, None),
         "quick": DemoPlan(30000, 1, 24000, 1, 2000, repeats=20)}


def demo_data(plan: DemoPlan):
    """Fashion-MNIST (scikit-learn's digits when it is not installed), not
    augmented: the short budgets get further on the plain images. The slim
    model's images are the first of the teacher's, from the whole training
    split (val_share=0: the demo scores on test images, and says so). Says which
    data it is, and how to get Fashion-MNIST where it falls back to digits."""
    try:
        train = resolve_data("fashion-mnist", split="train", augment=False, normalize=True, val_share=0)
        val = resolve_data("fashion-mnist", split="test", augment=False, normalize=True)
        name = "Fashion-MNIST"
        print(f"cpdfx demo: data: Fashion-MNIST from {fashion_root()} (28x28, {len(train):,} training and "
              f"{len(val):,} test images)")
    except DataError as err:
        train = resolve_data("digits", split="train", augment=False, val_share=0)
        val = resolve_data("digits", split="test")
        name = "digits"
        print(f"cpdfx demo: data: scikit-learn's 8x8 digits ({len(train):,} training and {len(val):,} test "
              f"images) instead of Fashion-MNIST ({str(err).split('. ')[0].removeprefix('Fashion-MNIST ')}). "
              f"The demo is meant for "
              f"Fashion-MNIST (28x28, 60,000 training images; 17-28 minutes on 2 cores): install it with "
              f"`apt-get install dataset-fashion-mnist`, or set {FASHION_ENV} to a folder holding its four IDX "
              f"files, and run the demo again.")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    if plan.val_images and plan.val_images < len(val):
        val = Subset(val, torch.randperm(len(val), generator=g)[:plan.val_images].tolist())
    return name, Subset(train, order[:plan.teacher_images]), Subset(train, order[:plan.slim_images]), val


def demo_cache() -> Path:
    """Where demo teachers are kept: $CPDFX_CACHE/demo (default ~/.cache/cpdfx/demo)."""
    return cache_dir() / "demo"


def teacher_path(name: str, n_images: int, plan: DemoPlan, seed: int = 0) -> Path:
    """The cache file of a teacher: everything that decides its weights is in the name."""
    widths = "-".join(map(str, plan.widths))
    return demo_cache() / (f"teacher-{name}-n{n_images}-w{widths}-e{plan.teacher_epochs}-lr{plan.lr:g}"
                           f"-b{plan.batch_size}-s{seed}-cpdfx{__version__}.pt")


def demo_teacher(name: str, train, val, plan: DemoPlan, seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """The demo's teacher and whether it came from the cache; trained (and
    cached) when there is none or the cached file cannot be read."""
    torch.manual_seed(seed)  # the initial weights too: the cache key must decide the weights
    model = _teacher_model(plan, train[0][0].shape[0])
    path = teacher_path(name, len(train), plan, seed)
    if _load_weights(model, path):
        return model.eval(), True
    model = distill(model, None, train, val, epochs=plan.teacher_epochs, batch_size=plan.batch_size,
                    lr=plan.lr, seed=seed).student
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval(), False


def _teacher_model(plan: DemoPlan, in_channels: int) -> torch.nn.Module:
    return ResNetTiny(num_classes=10, in_channels=in_channels, widths=plan.widths)


def _load_weights(model: torch.nn.Module, path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # a truncated or foreign file fails in many ways; each means "train again"
        print(f"the cached teacher {path} cannot be read ({type(err).__name__}); training it again")
        return False
    return True


def training_speed(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """1 or all of torch's threads, whichever trains `model` faster now (on a
    machine whose cores other processes also use, two threads run a small
    model's training step many times slower than one), and the seconds of a
    training step on x with that many."""
    seconds = {threads: _step_seconds(model, x, threads) for threads in sorted({1, torch.get_num_threads()})}
    threads = min(seconds, key=seconds.get)
    return threads, seconds[threads]


FIXED_SECONDS = 30  # start-up, capture, the pruning steps, export and timing: what does not grow with the data
KD_STEP = 1.3  # a distillation step (teacher forward, student step, importance) in plain training steps
EVAL_BATCH = 1 / 3  # a validation batch (forward only) in training steps


def demo_seconds(plan: DemoPlan, teacher_images: int, slim_images: int, val_images: int, cached: bool,
                 step: float) -> float:
    """How long the demo takes on this machine: `step` (the seconds of one
    training step of the teacher, measured now) times the steps it runs, and
    what does not grow with the data. On a 2-core machine shared with other
    work: digits, full plan, 38 s estimated for 50 s taken (teacher cached: 33
    for 29); Fashion-MNIST, quick plan, 200 s for 198 s (cached: 113 for 92);
    Fashion-MNIST, full plan, 17 min taken, where the step the teacher then
    trained at gives 18 min. The step is timed once, at the start: a burst of
    load then (twice the step time) doubles the estimate."""
    batches = lambda n: math.ceil(n / plan.batch_size)  # noqa: E731
    steps, evaluations = KD_STEP * plan.slim_epochs * batches(slim_images), 3 + plan.slim_epochs
    if not cached:
        steps += plan.teacher_epochs * batches(teacher_images)
        evaluations += plan.teacher_epochs
    return FIXED_SECONDS + step * (steps + EVAL_BATCH * evaluations * batches(val_images))


def about(seconds: float) -> str:
    """'about 40 seconds', 'about 3 minutes': as precise as an estimate is."""
    if seconds < 90:
        return f"about {max(10, round(seconds, -1)):.0f} seconds"
    return f"about {round(seconds / 60)} minutes"


def _step_seconds(model, x, threads: int) -> float:
    """Median seconds of a training step (forward and backward) of a copy of model on x."""
    model = copy.deepcopy(model).train()
    with torch_threads(threads):
        times = []
        for _ in range(4):
            start = time.perf_counter()
            model(x).sum().backward()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[1]


def run_demo(args, plan: DemoPlan | None = None) -> dict:
    """`cpdfx demo`: train (or load) a teacher, compress it with distillation,
    ship both. Pruned channel counts are multiples of onnxruntime's channel
    block on this CPU, so that the saved MACs show as latency."""
    plan = plan or PLANS["quick" if args.quick else "full"]
    started = time.perf_counter()
    name, teacher_train, slim_train, val = demo_data(plan)
    cached = teacher_path(name, len(teacher_train), plan).is_file()
    x = torch.stack([teacher_train[0][0], teacher_train[1][0]])
    threads, step = training_speed(_teacher_model(plan, x.shape[1]), x.repeat(plan.batch_size // 2, 1, 1, 1))
    seconds = demo_seconds(plan, len(teacher_train), len(slim_train), len(val), cached, step)
    print(f"cpdfx demo: {about(seconds)} on this machine at its present speed (a training step takes "
          f"{step * 1000:.0f} ms here); " + ("the teacher comes from the cache" if cached else
                                           "the teacher is trained in this run, and cached for the next"))
    with torch_threads(threads):
        print(f"1/3 teacher: ResNetTiny {'-'.join(map(str, plan.widths))}, {plan.teacher_epochs} epoch(s) on "
              f"{len(teacher_train)} {name} images, " + ("from the cache" if cached else
                                                          f"training on {threads} thread(s)"))
        teacher, cached = demo_teacher(name, teacher_train, val, plan)
        print(f"2/3 compressing to {args.macs:.0%} MACs while distilling from the teacher: {plan.slim_epochs} "
              f"epoch(s) on {len(slim_train)} images, {args.importance} in {plan.prune_steps} steps, "
              f"channel counts in multiples of {channel_block()} (this CPU's block) where the budget allows")
        result = compress(teacher, x, slim_train, val, macs=args.macs, importance=args.importance,
                          prune_steps=plan.prune_steps, epochs=plan.slim_epochs, batch_size=plan.batch_size,
                          lr=plan.lr, out_dir=Path(args.out) / "train")
        print(f"    top-1 on {len(val)} test images: teacher {result.report['teacher']['top1']:.2%}, "
              f"slim {result.report['student']['top1']:.2%}; channel counts in multiples of "
              f"{result.report['round_to']}")
        print("3/3 exporting to ONNX (and the slim model in int8), timing in onnxruntime, writing the report")
        int8 = Int8(batches(slim_train, DEMO_CALIBRATION[0], DEMO_CALIBRATION[1], labels=False), method="minmax")
        summary = ship(teacher, result.model, x, val, "classification", Path(args.out), repeats=plan.repeats,
                       threads=threads, training=_budgets(name, plan, args, cached, teacher_train, slim_train, val,
                                                          result.report["loss"]),
                       title=f"cpdfx demo: ResNetTiny on {name}, {args.macs:.0%} MACs, {args.importance}", int8=int8)
    print(f"done in {time.perf_counter() - started:.0f} s; report, models and plot in {args.out}/")
    return summary


def _budgets(name, plan: DemoPlan, args, cached: bool, teacher_train, slim_train, val, loss: str) -> list:
    """What each model was trained on and for how long, for the report: the
    slim model's extra epochs are part of any comparison with the teacher."""
    extra = plan.slim_epochs * len(slim_train)
    return [f"original (the teacher): ResNetTiny {'-'.join(map(str, plan.widths))} trained from scratch on "
            f"the labels, {plan.teacher_epochs} epoch(s) on {len(teacher_train):,} {name} training images "
            f"(batch {plan.batch_size}, AdamW, lr {plan.lr:g}, cosine; "
            f"{'loaded from the cache' if cached else 'trained in this run'}).",
            f"slim: the teacher's copy, pruned to {args.macs:.0%} MACs by {args.importance} in {plan.prune_steps} "
            f"steps during the first half of its training, distilled from the teacher ({loss}) for "
            f"{plan.slim_epochs} epoch(s) on {len(slim_train):,} of the same images: {plan.slim_epochs} epoch(s) "
            f"({extra:,} image passes) longer than the teacher trained.",
            f"Accuracy is measured on {len(val):,} {name} test images that neither model trained on."]
