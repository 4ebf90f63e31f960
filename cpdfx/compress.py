"""Compress a model in one call: prune while distilling from the original (CPD).

    result = cpdfx.compress(model, x, train_data, val_data, macs=0.5, epochs=10)
    result.model     # the slim GraphModule, trained, in eval mode
    result.history   # one record per epoch (loss terms, params, val top-1 / mIoU)
    result.report    # cost before/after, the pruning steps, teacher and student scores

The schedule of Comb, Prune, Distill: the original model is the teacher; the
student starts as its captured copy and is trained by `cpdfx.distill`. During
the first `prune_share` of all optimizer steps, a `cpdfx.Pruner` accumulates
its importance from the distillation batches (fisher: each sample's squared
mask gradient on the distillation loss, per CPD) and prunes at
`prune_steps` evenly spaced steps, down the schedule to the budget; the
optimizer's state is sliced with the weights, so training never restarts. The
rest of the run distils the pruned student.

`importance="learned"` learns the structure instead (after Ahmed et al. 2021,
"Compact CNN Structure Learning by Knowledge Distillation"): a gate per channel
of every prunable group is trained with the distillation loss and a sparsity
penalty weighted by what each channel costs in the budgeted metric, its
strength adapted by a controller so that the open gates' cost follows a path
to the budget; when the open gates fit it, they are folded into the weights and
the model is cut to the budget exactly, once, through the same solver, ranking
the channels by learned_options["rank"] (see cpdfx.learned for the default).
Only if the phase ends with the open gates over the budget does a fallback close
the weakest to it; report["learned"] says whether it did ("fallback",
"fallback_at") and what the open gates cost then ("end_share"); the step-wise
schedule is in cpdfx.cpd.

`plain=True` is the baseline: the same schedule, with the labels only (no
teacher runs; the loss is the cross-entropy, DistillLoss with alpha 0), for
comparing distillation against plain fine-tuning at the same budget and epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.fx as fx
import torch.nn as nn

from .capture import capture
from .cpd import PruneCallback, prune_points, total_steps
from .distill import distill, evaluate
from .learned import LEARNED, LearnedCallback, gated_student, resolve_options
from .losses import DistillLoss
from .budget import Target
from .files import write_json
from .pruner import Pruner
from .ranks import is_main
from .report import REPORT, per_image

REPORT_FILE = "report.json"


@dataclass
class CompressResult:
    """The slim model (a GraphModule in eval mode), the per-epoch history of the
    distillation run, and the report (also in model.meta["cpdfx_report"])."""
    model: fx.GraphModule
    history: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


def compress(model: nn.Module, example_inputs, train_data, val_data=None, *, task: str = "classification",
             macs=None, params=None, latency=None, latency_options=None, importance="fisher",
             prune_steps: int = 5, prune_share: float = 0.5, epochs: int = 10, schedule: str = "geometric",
             round_to: int | None = None, runtime: str = "cpu", min_keep=1, ignore=(), overrides=None,
             loss=None, labels: bool = True, plain: bool = False, learned_options=None, out_dir=None,
             resume: bool = False, seed: int = 0, progress: bool = True, test_data=None,
             **distill_options) -> CompressResult:
    """Prune `model` to `macs` / `params` / `latency` (shares of the original)
    while distilling it from itself, and return the trained slim model.
    latency, latency_options: as for cpdfx.prune; each pruning step is timed
    in onnxruntime, and the last one corrected until it lands on the target.

    importance: a pruner criterion ("fisher" by default, "taylor", "l1", "l2",
        "bn_scale", "random", a callable) for the step-wise CPD schedule, or
        "learned" for gates trained under the budget (learned_options:
        penalty, growth, threshold, every, cost_power, rank; see LearnedCallback).
        prune_steps does not apply to "learned", which cuts once.
    prune_steps, prune_share, schedule: how many pruner steps, spread over which
        first share of the optimizer steps, along which schedule (see Pruner).
    round_to, runtime, min_keep, ignore, overrides: the solver's constraints
        (budget.Constraints; by default widths in the runtime's channel block).
    loss: a dict of DistillLoss options (kind, alpha, temperature) or a
        DistillLoss; labels=False distils without labels. plain=True trains on
        the labels alone (alpha=0, and the teacher is not run): the baseline
        without a teacher term.
    out_dir, resume: distill's checkpoints; resuming re-creates the pruned
        structure from the checkpoint before loading its weights. The report
        is also written to out_dir/report.json.
    test_data: read once, after training: the teacher (unless plain) and the
        slim model are scored on it, in report["test"] = {"images": N,
        "teacher": {...} or None, "student": {...}}; report["teacher"] and
        report["student"] are their scores on val_data, which the run validates on.
    distill_options: batch_size, lr, optimizer, weight_decay, warmup,
        clip_grad, device, amp, channels_last, num_workers (see distill).
    The model is the teacher (unless plain): it is put in eval mode and on
    the training device, and never trained; the student is its captured copy."""
    target = Target(macs, params, latency)
    learned = importance == LEARNED
    if learned and latency is not None:
        raise ValueError("importance='learned' learns the structure under a macs= or params= budget; for a "
                         "latency budget use a pruning criterion such as 'fisher'")
    config = dict(macs=macs, params=params, latency=latency, importance=_name(importance),
                  prune_steps=1 if learned else prune_steps, prune_share=prune_share, schedule=schedule,
                  round_to=round_to, runtime=runtime, min_keep=min_keep, plain=plain,
                  learned=resolve_options(learned_options) if learned else None)
    if resume and out_dir is None:
        raise ValueError("resume=True continues from out_dir/last.pt: give the out_dir of the run to resume")
    loss = _plain_loss(loss, labels) if plain else loss
    batch_size = distill_options.get("batch_size", 64)
    total = total_steps(len(train_data), batch_size, epochs)
    at = prune_points(total, prune_share, 1 if learned else prune_steps)
    rules = dict(ignore=ignore, overrides=overrides, min_keep=min_keep, round_to=round_to, runtime=runtime)
    gm = capture(model, example_inputs)
    if learned:
        student, callback = gated_student(gm, example_inputs, target, at[-1], config, rules, config["learned"])
    else:
        pruner = Pruner(gm, example_inputs, importance, macs=macs, params=params, latency=latency,
                        steps=prune_steps, schedule=schedule, **rules,
                        latency_options={"progress": progress, **(latency_options or {})})
        student, callback = pruner.gm, PruneCallback(pruner, at, config)
    before = per_image(gm, example_inputs)  # the report's MACs are per image
    teacher_scores = _teacher_scores(model, val_data, task, batch_size, distill_options, progress)
    teacher = None if plain else model  # no teacher: distill trains on the labels alone, without its forward pass
    result = distill(student, teacher, train_data, val_data, task=task, epochs=epochs, loss=loss, labels=labels,
                     out_dir=out_dir, resume=resume, seed=seed, callback=callback, progress=progress,
                     **distill_options)
    slim = result.student
    if not isinstance(slim, fx.GraphModule):
        raise RuntimeError(f"the pruning phase ended without cutting the model (planned at steps {at}); "
                           f"the run stopped early or was too short")
    report = _report(slim, before, example_inputs, callback, at, result.history, teacher_scores, config,
                     dict(epochs=epochs, seed=seed, total_steps=total, task=task, loss=str(_describe_loss(
                         loss, task, labels))))
    if test_data is not None:
        report["test"] = _test_scores(None if plain else model, slim, test_data, task, batch_size, distill_options,
                                      progress)
    slim.meta[REPORT] = report
    if out_dir is not None and is_main():  # distill has ended torchrun's process group: RANK says
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / REPORT_FILE, report)
    return CompressResult(slim.eval(), result.history, report)


def _name(importance) -> str:
    """The criterion's name, the same in every process (no object address): what resume compares."""
    if isinstance(importance, str):
        return importance
    return getattr(importance, "name", None) or getattr(importance, "__name__", type(importance).__name__)


def _plain_loss(loss, labels: bool):
    if not labels:
        raise ValueError("plain=True fine-tunes on the labels alone, so it needs labels=True and labelled data")
    if isinstance(loss, DistillLoss):
        raise ValueError("plain=True sets the distillation weight to 0 itself: pass loss options as a dict "
                         "(e.g. {'kind': 'kd'}) or leave loss unset")
    return {**(loss or {}), "alpha": 0.0}


def _describe_loss(loss, task, labels):
    return loss if isinstance(loss, DistillLoss) else DistillLoss(task, labels=labels, **(loss or {}))


def _teacher_scores(model, val_data, task, batch_size, options, progress) -> dict | None:
    if val_data is None:
        return None
    return evaluate(model, val_data, task=task, batch_size=batch_size, device=options.get("device"),
                    num_workers=options.get("num_workers", 0), progress=progress)


def _test_scores(teacher, slim, test_data, task, batch_size, options, progress) -> dict:
    """report["test"]: the teacher's scores (None without one) and the slim model's on test_data."""
    teacher_scores, slim_scores = (None if m is None else _teacher_scores(m, test_data, task, batch_size, options,
                                                                          progress) for m in (teacher, slim))
    return {"images": len(test_data), "teacher": teacher_scores, "student": slim_scores}


def _report(slim, before, example_inputs, callback, at, history, teacher_scores, config, run) -> dict:
    """The pruner's report (layers, groups) with the run around it."""
    after = per_image(slim, example_inputs)
    report = dict(slim.meta.get(REPORT) or {})
    achieved = {"macs": after.macs / before.macs, "params": after.params / before.params}
    if "latency" in report.get("achieved", {}):
        achieved["latency"] = report["achieved"]["latency"]  # measured at the last pruning step
    report.update({
        "macs": [before.macs, after.macs], "params": [before.params, after.params],
        "achieved": achieved,
        "target": Target(config["macs"], config["params"], config["latency"]).as_dict(),
        "prune_at": list(at), "pruning": list(callback.events), "compress": config, **run,
        "teacher": teacher_scores,
        "student": {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else None,
    })
    if isinstance(callback, LearnedCallback):
        report["learned"] = {**config["learned"], **callback.summary()}
    return report

