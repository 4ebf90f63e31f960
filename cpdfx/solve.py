"""The solver: scores on one scale, then the channels to keep so that a budget
holds. capture -> comb -> score (importance.py) -> solve (here) -> eliminate.

`plan` scores a combed graph and returns a `Plan` (kept indices per group);
`solve` is the global ranking under a `Budget` (budget.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from .budget import Budget, BudgetError, Constraints, Target
from .capture import as_tuple
from .cost import Cost, CostModel
from .importance import Criterion, calibrate, normalise, resolve


CLOSE = 0.02  # the coarsest alignment whose result is this close under the target (in shares) is the one kept


def keep_counts(scores: dict, sizes: dict, threshold: float, rules: Constraints) -> dict:
    """Per group, how many channels score above threshold (within the constraints)."""
    return {g: rules.rounded(max(int((s > threshold).sum()), rules.floor(sizes[g], g)), sizes[g], g)
            for g, s in scores.items()}


def strongest(scores: dict, counts: dict, sizes: dict) -> dict:
    """The kept indices: the `counts[g]` highest-scoring channels of each group."""
    return {g: np.sort(np.argsort(-scores[g], kind="stable")[:n]) for g, n in counts.items() if n < sizes[g]}


def solve(budget, scores: dict, sizes: dict, rules: Constraints, fixed: dict | None = None) -> dict:
    """Kept channel counts per group: the lowest global threshold on the
    normalised scores whose counts fit the budget; then the strongest pruned
    channels put back one (or one round_to step) at a time while it still
    fits, so the result lands just under the budget, not a whole step below;
    then, where groups are coarse, trades of one step for others (`_trade`).

    budget(counts) -> bool says whether a size assignment fits (see Budget)."""
    fixed = fixed or {}

    def fits(counts):
        return budget({**counts, **fixed})

    thresholds = np.unique(np.concatenate([s for s in scores.values()] + [np.array([-np.inf])]))
    if not fits(keep_counts(scores, sizes, thresholds[-1], rules)):
        smallest = {**keep_counts(scores, sizes, thresholds[-1], rules), **fixed}
        reachable = budget.shares(smallest)
        raise BudgetError(f"cannot reach {budget}: pruning every prunable group to its minimum "
                          f"(min_keep={rules.min_keep}, widths in multiples of {rules.round_to}) leaves "
                          f"{' and '.join(f'{v:.1%} of the {m}' for m, v in reachable.items())}; ask for a larger "
                          f"share, or lower min_keep / round_to", reachable)
    lo, hi = 0, len(thresholds) - 1  # the highest threshold fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(keep_counts(scores, sizes, thresholds[mid], rules)):
            hi = mid
        else:
            lo = mid + 1
    ranked = {g: np.sort(s)[::-1] for g, s in scores.items()}
    counts = _fill(keep_counts(scores, sizes, thresholds[hi], rules), ranked, sizes, rules, fits)
    counts = _trade(counts, ranked, sizes, rules, fits, lambda c: budget.used({**c, **fixed}))
    return {**counts, **fixed}


def _fill(counts, ranked, sizes, rules, fits, hold=()) -> dict:
    """Grow, a step at a time, the group whose next channel scores highest
    among those whose growth still fits (costs only rise, so a group that does
    not fit once never will)."""
    counts, blocked = dict(counts), set(hold)
    while True:
        open_ = [(ranked[g][n], g) for g, n in counts.items() if n < sizes[g] and g not in blocked]
        if not open_:
            return counts
        g = max(open_)[1]
        grown = {**counts, g: rules.rounded(counts[g] + 1, sizes[g], g)}
        if fits(grown):
            counts = grown
        else:
            blocked.add(g)


def _trade(counts, ranked, sizes, rules, fits, used, rounds=3, depth=4, close=0.99) -> dict:
    """Coarse groups (grouped convs, attention heads, round_to) can leave the
    result well under the budget: give up a few steps of a group, fill the room
    with the others, and keep the trade that uses the budget best; until the
    result is `close` to the budget."""
    for _ in range(rounds):
        best, best_used = counts, used(counts)
        if best_used >= close:
            return counts
        for g, n in counts.items():
            for _ in range(depth):  # one to `depth` steps of g
                n = rules.shrunk(n, sizes[g], g)
                if n is None:
                    break
                trial = _fill({**counts, g: n}, ranked, sizes, rules, fits, hold=(g,))
                if used(trial) > best_used + 1e-12:
                    best, best_used = trial, used(trial)
        if best is counts:
            return counts
        counts = best
    return counts


@dataclass
class Plan:
    """What to keep: indices per group, the scores behind it, the cost before and after."""
    keep: dict
    counts: dict
    scores: dict
    before: Cost
    after: Cost
    groups_prunable: int
    round_to: int  # the channel multiple the widths were solved in (see Constraints.alignments)


def unit_costs(cost_model: CostModel, groups, target: Target, latency_model=None) -> dict:
    """Per group, the share of the budgeted metrics one channel carries (at
    full size). Latency is read off the tables a block at a time (a channel
    less inside a block saves no time), and a group whose block saves none
    costs as little as the cheapest that does."""
    base = cost_model()
    metrics = [m for m in ("macs", "params") if getattr(target, m) is not None]
    if not metrics and target.latency is None:
        metrics = ["macs"]
    out = {}
    for g in groups:
        smaller = cost_model({g.id: g.size - 1})
        out[g.id] = sum((getattr(base, m) - getattr(smaller, m)) / max(getattr(base, m), 1) for m in metrics)
    if target.latency is not None:
        full = latency_model()
        step = {g.id: min(latency_model.block, g.size - 1) for g in groups}  # a block, or all but one channel
        saved = {g.id: max(0.0, full - latency_model({g.id: g.size - step[g.id]})) / step[g.id] / full
                 for g in groups}
        least = min((v for v in saved.values() if v > 0), default=1.0)
        out = {g: out[g] + max(saved[g], least) for g in out}
    return out


def score(criterion: Criterion, gm, groups, example_inputs, calibration=None, loss_fn=None) -> dict:
    """Raw scores of the prunable groups; gradient criteria first run the
    calibration batches (or the example inputs) through forward and backward."""
    if criterion.needs_gradients and calibration is not False:
        n_inputs = len(as_tuple(example_inputs))
        calibrate(criterion, gm, groups, calibration if calibration is not None else [as_tuple(example_inputs)],
                  n_inputs, loss_fn)
    return criterion.scores(gm, groups)


def plan(gm: fx.GraphModule, groups, example_inputs, target: Target, *, importance="l2", calibration=None,
         loss_fn=None, rules: Constraints | None = None, latency_model=None, scores: dict | None = None) -> Plan:
    """Score the prunable groups of a captured graph and pick the channels to
    keep so that `target` holds (see `prune` for the arguments). `scores`,
    when given, are raw scores already computed (the step-wise pruner's)."""
    rules = rules or Constraints()
    criterion = resolve(importance)
    free, _ = rules.split(groups.prunable)  # the fixed counts depend on the alignment: _plan splits again
    raw = scores if scores is not None else score(criterion, gm, groups, example_inputs, calibration, loss_fn)
    cost_model = CostModel(gm, groups, example_inputs)
    per_cost = criterion.normalisation == "cost" or target.latency is not None
    costs = unit_costs(cost_model, free, target, latency_model) if per_cost else None
    normalised = normalise({g.id: raw[g.id] for g in free}, criterion.normalisation, costs)
    if target.latency is not None and criterion.normalisation != "cost":
        normalised = normalise(normalised, "cost", costs)  # importance per unit of time: a knapsack (HALP)
    budget = Budget(cost_model, target, latency_model)
    best, error = None, None
    for aligned in rules.alignments(groups):
        try:
            chosen = _plan(aligned, budget, raw, normalised, free, groups)
        except BudgetError as err:  # no room for widths this coarse
            error = err  # the finest's, said last
            continue
        if max(share - getattr(target, m) for m, share in budget.shares(chosen.counts).items()) >= -CLOSE:
            return chosen  # the tightest metric lands within CLOSE under its target
        if best is None or budget.used(chosen.counts) > budget.used(best.counts):
            best = chosen  # too far under the budget: finer widths may land closer
    if best is None:
        raise error
    return best


def _plan(rules, budget, raw, normalised, free, groups) -> Plan:
    _, fixed = rules.split(groups.prunable)
    counts = solve(budget, normalised, {g.id: g.size for g in free}, rules, fixed)
    sizes = {g.id: g.size for g in groups.prunable}
    keep = strongest({**normalised, **{g: _fixed_scores(raw, g, sizes) for g in fixed}}, counts, sizes)
    cost_model = budget.cost_model
    return Plan(keep, counts, normalised, cost_model(), cost_model(counts), len(free) + len(fixed), rules.round_to)


def _fixed_scores(raw, gid, sizes):
    return np.asarray(raw.get(gid, np.zeros(sizes[gid])), dtype=np.float64)
