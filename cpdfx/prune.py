"""One-shot global pruning to a MACs or parameter budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from passes import comb as comb_pass
from passes import eliminate

from .capture import capture
from .cost import Cost, CostModel
from .importance import normalise, resolve

REPORT = "cpdfx_report"


class BudgetError(ValueError):
    """The budget asked for cannot be met."""


def check_budget(macs, params) -> None:
    """A budget is one or two shares of the original, each in (0, 1]."""
    if macs is None and params is None:
        raise BudgetError("give a budget: macs=, params= or both (shares of the original, in (0, 1])")
    for name, value in (("macs", macs), ("params", params)):
        if value is not None and (not isinstance(value, (int, float)) or not 0 < value <= 1):
            raise BudgetError(f"{name}={value!r}: a budget is the share of the original to keep, "
                              f"a number in (0, 1], e.g. {name}=0.5 for half")


def _ignored(group, ignore) -> bool:
    return any(name == i or name.startswith(i + ".") for name, _ in group.params for i in ignore)


def keep_counts(scores: dict, sizes: dict, threshold: float, round_to: int, min_keep: int) -> dict:
    """Per group, how many channels have a normalised score above threshold (at
    least min_keep, and a multiple of round_to unless that is the whole group)."""
    counts = {}
    for gid, s in scores.items():
        n = max(int((s > threshold).sum()), min(min_keep, sizes[gid]))
        counts[gid] = _round_up(n, round_to, sizes[gid])
    return counts


def _round_up(n, round_to, size):
    return min(size, math.ceil(n / round_to) * round_to) if round_to > 1 else n


def strongest(scores: dict, counts: dict, sizes: dict) -> dict:
    """The kept indices: the `counts[g]` highest-scoring channels of each group."""
    return {g: np.sort(np.argsort(-scores[g], kind="stable")[:n]) for g, n in counts.items() if n < sizes[g]}


def solve(cost_model: CostModel, scores: dict, sizes: dict, *, macs=None, params=None,
          round_to: int = 1, min_keep: int = 1, refill: int = 512) -> dict:
    """Kept channel counts per group: the lowest global threshold on normalised
    scores that meets every target, then the strongest pruned channels put back
    one at a time while the targets still hold (up to `refill` tries), so the
    result lands close under the budget, not a whole channel step below it."""
    base = cost_model()
    limits = {"macs": None if macs is None else macs * base.macs,
              "params": None if params is None else params * base.params}

    def fits(counts):
        c = cost_model(counts)
        return all(limit is None or getattr(c, k) <= limit for k, limit in limits.items())

    thresholds = np.unique(np.concatenate([s for s in scores.values()] + [np.array([-np.inf])]))
    if not fits(keep_counts(scores, sizes, thresholds[-1], round_to, min_keep)):
        smallest = cost_model({g: min(min_keep, n) for g, n in sizes.items()})
        raise BudgetError(
            f"cannot reach macs={macs}, params={params}: pruning every prunable group to "
            f"{min_keep} channel(s) leaves {smallest.macs / base.macs:.1%} of the MACs and "
            f"{smallest.params / base.params:.1%} of the parameters")
    lo, hi = 0, len(thresholds) - 1  # the highest threshold fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(keep_counts(scores, sizes, thresholds[mid], round_to, min_keep)):
            hi = mid
        else:
            lo = mid + 1
    counts = keep_counts(scores, sizes, thresholds[hi], round_to, min_keep)
    pruned = sorted(((s[i], g) for g, s in scores.items()
                     for i in np.argsort(-s, kind="stable")[counts[g]:]), reverse=True)
    for _, g in pruned[:refill]:
        grown = {**counts, g: _round_up(counts[g] + 1, round_to, sizes[g])}
        if grown[g] > counts[g] and fits(grown):
            counts = grown
    return counts


@dataclass
class Plan:
    """What to keep: indices per group, and the cost before and after."""
    keep: dict
    before: Cost
    after: Cost
    groups_prunable: int


def plan(gm: fx.GraphModule, groups, example_inputs=None, *, macs=None, params=None,
         importance="l2", ignore=(), round_to: int = 1, min_keep: int = 1) -> Plan:
    """Score the prunable groups of a captured graph and pick the channels to
    keep so that the budget holds (see `prune` for the arguments)."""
    check_budget(macs, params)
    score_fn = resolve(importance)
    candidates = [g for g in groups.prunable if not _ignored(g, ignore)]
    raw = score_fn(gm, groups)
    scores = normalise({g.id: raw[g.id] for g in candidates})
    cost_model = CostModel(gm, groups, example_inputs)
    sizes = {g.id: g.size for g in candidates}
    counts = solve(cost_model, scores, sizes, macs=macs, params=params, round_to=round_to,
                   min_keep=min_keep)
    return Plan(strongest(scores, counts, sizes), cost_model(), cost_model(counts), len(candidates))


def prune(model, example_inputs, *, macs=None, params=None, importance="l2", ignore=(),
          round_to: int = 1, min_keep: int = 1) -> fx.GraphModule:
    """Prune model globally until it has at most `macs` and `params` (shares of
    the original) and return the slim GraphModule.

    importance: "l1", "l2", "random" or a callable (gm, comb) -> {group: scores};
    ignore: module or parameter names whose channels are all kept;
    round_to: every pruned channel count a multiple of this (or the full size).
    slim.meta["cpdfx_kept"] maps parameter names to {dim: kept indices};
    slim.meta["cpdfx_report"] holds the cost before and after."""
    check_budget(macs, params)  # before the slow capture
    resolve(importance)
    gm = capture(model, example_inputs)
    groups = comb_pass(gm)
    chosen = plan(gm, groups, example_inputs, macs=macs, params=params, importance=importance,
                  ignore=ignore, round_to=round_to, min_keep=min_keep)
    slim = eliminate(gm, groups, chosen.keep)
    slim.meta[REPORT] = {
        "target": {"macs": macs, "params": params},
        "macs": [chosen.before.macs, chosen.after.macs],
        "params": [chosen.before.params, chosen.after.params],
        "groups_pruned": len(chosen.keep), "groups_prunable": chosen.groups_prunable,
    }
    return slim
