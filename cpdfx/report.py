"""The pruning report: what went, per layer and per group, and what it cost.

A plain, JSON-serialisable dict (it travels in `slim.meta["cpdfx_report"]`,
into ONNX metadata and saved models); `format_report` prints it as tables.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .capture import as_tuple
from .cost import Cost, cost

REPORT = "cpdfx_report"  # the key of a slim graph's meta that holds its report


def build_report(gm, slim, groups, chosen, criterion, target, example_inputs, latency_model=None,
                 original_sizes=None) -> dict:
    """The report of pruning `gm` into `slim`; `chosen` is the plan (prune.Plan)
    that was made on `groups` (the comb of the graph it was applied to), and
    original_sizes gives those groups' sizes in gm when that graph was already
    smaller (the step-wise pruner's later steps). MACs are per image: the
    example batch's size is the caller's choice, not the model's cost."""
    before, after = per_image(gm, example_inputs), per_image(slim, example_inputs)
    groups_report = _groups(groups, chosen, original_sizes or {})
    report = {
        "criterion": str(criterion),
        "target": target.as_dict(),
        "achieved": {"macs": after.macs / before.macs, "params": after.params / before.params},
        "macs": [before.macs, after.macs],
        "params": [before.params, after.params],
        "groups_pruned": sum(g["size"][1] < g["size"][0] for g in groups_report),
        "groups_prunable": chosen.groups_prunable,
        "round_to": chosen.round_to,
        "layers": _layers(gm, slim),
        "groups": groups_report,
    }
    if latency_model is not None:
        report["achieved"]["latency_estimate"] = latency_model(chosen.counts) / latency_model()
    return report


def per_image(model, example_inputs) -> Cost:
    """The cost of one image: counted at the example's batch and divided by it
    (every MAC term holds the batch once). Not counted at a batch of one: a
    graph whose shapes were propagated again may hold the example's batch as
    a constant in places (hf MobileNetV2's tf-style pads do after pruning),
    and counting it at another batch would mix the two."""
    total = cost(model, example_inputs)
    first = next((x for x in pytree.tree_leaves(as_tuple(example_inputs))
                  if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    batch = first.shape[0] if first is not None else 1
    return Cost(total.macs // batch, total.params)


def _layers(gm, slim) -> list:
    """Every parameter (but biases) whose shape changed: name, shape before and after."""
    new = dict(slim.named_parameters())
    rows = []
    for name, p in gm.named_parameters():
        if name.endswith("bias") or name not in new or tuple(new[name].shape) == tuple(p.shape):
            continue
        rows.append({"name": name, "before": list(p.shape), "after": list(new[name].shape)})
    return rows


def _groups(groups, chosen, original_sizes) -> list:
    rows = []
    for g in groups.prunable:
        kept = chosen.counts.get(g.id, g.size)
        s = chosen.scores.get(g.id)
        row = {"id": g.id, "size": [original_sizes.get(g.id, g.size), kept],
               "layers": g.layers[:3] + (["..."] if len(g.layers) > 3 else [])}
        if s is not None and kept < g.size:
            order = np.argsort(-s, kind="stable")
            row["score_kept"] = float(np.mean(s[order[:kept]]))
            row["score_pruned"] = float(np.mean(s[order[kept:]]))
        rows.append(row)
    return rows


def _table(header, rows) -> str:
    rows = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _speedup_lines(report: dict) -> list[str]:
    """A latency budget's outcome in speed-ups: asked, measured, and whether
    it landed within 7% or was kept under a tolerance; and a note where the
    speed-up took far more MACs than its own share, as on a model whose time
    is mostly fixed per-op overhead."""
    asked, share = report["target"].get("latency"), report["achieved"].get("latency")
    if asked is None or share is None:
        return []
    macs = report["achieved"]["macs"]
    verdict = ("within 7%" if report.get("latency_landed", True) else
               f"{1 - asked / share:.0%} slower than asked, kept under the tolerance")
    lines = [f"speed-up asked x{1 / asked:.2f}, measured x{1 / share:.2f} in onnxruntime ({verdict}), "
             f"at {macs:.1%} of the MACs"]
    if macs < share / 2:
        lines.append(f"note: x{1 / share:.2f} took cutting to {macs:.1%} of the MACs: most of this model's time at "
                     f"this input is fixed per-op overhead that no channel count removes; a macs= budget, a larger "
                     f"batch or input may suit it better")
    return lines


def format_report(report: dict) -> str:
    """The report as readable tables: totals, layers, groups."""
    (m0, m1), (p0, p1) = report["macs"], report["params"]
    target = ", ".join(f"{k} {v:.0%}" for k, v in report["target"].items())
    achieved = ", ".join(f"{k} {v:.1%}" for k, v in report["achieved"].items())
    lines = [f"criterion {report['criterion']}; target {target}; achieved {achieved}",
             f"MACs   {m0 / 1e6:,.2f} M -> {m1 / 1e6:,.2f} M per image",
             f"params {p0 / 1e6:,.3f} M -> {p1 / 1e6:,.3f} M",
             f"groups pruned {report['groups_pruned']} of {report['groups_prunable']} (smaller than at the start)"]
    lines += _speedup_lines(report)
    if len(report.get("steps", ())) > 1:
        lines.append(f"pruned in {len(report['steps'])} steps; the groups' scores are the last step's")
    if report.get("batch_norm_reestimated_on"):
        lines.append(f"batch-norm statistics re-estimated on {report['batch_norm_reestimated_on']} calibration samples")
    lines.append("")
    lines.append(_table(["layer", "before", "after"],
                        [[r["name"], "x".join(map(str, r["before"])), "x".join(map(str, r["after"]))]
                         for r in report["layers"]]))
    lines.append("")
    lines.append(_table(["group", "channels", "mean score kept / pruned", "layers"],
                        [[g["id"], f"{g['size'][0]} -> {g['size'][1]}",
                          f"{g['score_kept']:.3g} / {g['score_pruned']:.3g}" if "score_kept" in g else "-",
                          ", ".join(g["layers"])] for g in report["groups"]]))
    return "\n".join(lines)
