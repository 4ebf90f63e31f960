"""Global pruning to a MACs, parameter or latency budget.

capture -> comb -> score (a criterion, see importance.py) -> solve (the budget)
-> eliminate. `prune` does it in one shot; `Pruner` (pruner.py) in steps while
a model trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from .passes import comb as comb_pass
from .passes import eliminate

from .batchnorm import reestimate_batch_norm
from .capture import as_tuple, capture
from .cost import Cost, CostModel
from .importance import Criterion, calibrate, calibration_item, normalise, resolve
from .report import build_report

REPORT = "cpdfx_report"


class BudgetError(ValueError):
    """The budget asked for cannot be met."""


def check_budget(macs=None, params=None, latency=None) -> None:
    """A budget is one to three shares of the original, each in (0, 1]."""
    if macs is None and params is None and latency is None:
        raise BudgetError("give a budget: macs=, params= or latency= (shares of the original, in (0, 1])")
    for name, value in (("macs", macs), ("params", params), ("latency", latency)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= 1):
            raise BudgetError(f"{name}={value!r}: a budget is the share of the original to keep, "
                              f"a number in (0, 1], e.g. {name}=0.5 for half")


@dataclass
class Constraints:
    """What the solver may do to each group, beyond the budget.

    ignore: module or parameter names whose channels are all kept;
    overrides: {module or parameter name: share of channels to keep} for the
        groups those layers touch, taken out of the global ranking;
    min_keep: channels every group keeps at least: an int, or a share in (0, 1);
    round_to: every pruned channel count a multiple of this (or the full size);
    original_sizes: {group id: the group's size in the unpruned model}, for a
        graph pruned before (the step-wise pruner sets it): the shares of
        min_keep and overrides are of those sizes, so they do not compound
        over steps. Groups not in it count from their current size."""
    ignore: tuple = ()
    overrides: dict = field(default_factory=dict)
    min_keep: int | float = 1
    round_to: int = 1
    original_sizes: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise BudgetError(f"round_to={self.round_to!r}: give a positive int, e.g. 8")
        if not (isinstance(self.min_keep, int) and self.min_keep >= 1 or
                isinstance(self.min_keep, float) and 0 < self.min_keep < 1):
            raise BudgetError(f"min_keep={self.min_keep!r}: give a channel count >= 1 or a share in (0, 1)")
        for name, share in self.overrides.items():
            if not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise BudgetError(f"overrides[{name!r}]={share!r}: give the share of channels to keep, in (0, 1]")

    def floor(self, size: int, gid=None) -> int:
        """The fewest channels group `gid`, now of `size`, may keep."""
        n = self.min_keep if isinstance(self.min_keep, int) else math.ceil(self.min_keep * self._base(gid, size))
        return min(size, n)

    def _base(self, gid, size: int) -> int:
        """What shares are of: the group's original size."""
        return self.original_sizes.get(gid, size)

    def rounded(self, n: int, size: int) -> int:
        r = self.round_to
        return min(size, math.ceil(n / r) * r) if r > 1 else n

    def shrunk(self, n: int, size: int, gid=None) -> int | None:
        """The next allowed count below n, or None when n is the minimum."""
        m = n - 1 if self.round_to == 1 else (n - 1) // self.round_to * self.round_to
        return m if m >= self.rounded(self.floor(size, gid), size) else None

    def split(self, groups) -> tuple[list, dict]:
        """The groups the global ranking decides, and the fixed counts of overridden ones."""
        free, fixed = [], {}
        for g in groups:
            if _touches(g, self.ignore):
                continue
            shares = [s for name, s in self.overrides.items() if _touches(g, (name,))]
            if shares:
                share = math.ceil(max(shares) * self._base(g.id, g.size))
                fixed[g.id] = self.rounded(min(g.size, max(self.floor(g.size, g.id), share)), g.size)
            else:
                free.append(g)
        return free, fixed


def _touches(group, names) -> bool:
    return any(p == n or p.startswith(n + ".") for p, _ in group.params for n in names)


def keep_counts(scores: dict, sizes: dict, threshold: float, rules: Constraints) -> dict:
    """Per group, how many channels score above threshold (within the constraints)."""
    return {g: rules.rounded(max(int((s > threshold).sum()), rules.floor(sizes[g], g)), sizes[g])
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
        raise BudgetError(f"cannot reach {budget}: pruning every prunable group to its minimum "
                          f"(min_keep={rules.min_keep}, round_to={rules.round_to}) leaves "
                          f"{budget.shares(smallest)}; ask for a larger share, or lower min_keep / round_to")
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
        grown = {**counts, g: rules.rounded(counts[g] + 1, sizes[g])}
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
class Target:
    """A budget as absolute limits on a cost model's metrics."""
    macs: float | None = None
    params: float | None = None
    latency: float | None = None

    def limits(self, base: Cost, base_latency: float | None = None) -> dict:
        out = {}
        if self.macs is not None:
            out["macs"] = self.macs * base.macs
        if self.params is not None:
            out["params"] = self.params * base.params
        if self.latency is not None:
            out["latency"] = self.latency * base_latency
        return out

    def as_dict(self) -> dict:
        return {k: v for k, v in (("macs", self.macs), ("params", self.params), ("latency", self.latency))
                if v is not None}


@dataclass
class Plan:
    """What to keep: indices per group, the scores behind it, the cost before and after."""
    keep: dict
    counts: dict
    scores: dict
    before: Cost
    after: Cost
    groups_prunable: int


def unit_costs(cost_model: CostModel, groups, target: Target) -> dict:
    """Per group, the share of the budgeted metrics one channel carries (at full size)."""
    base = cost_model()
    metrics = [m for m in ("macs", "params") if getattr(target, m) is not None] or ["macs"]
    out = {}
    for g in groups:
        smaller = cost_model({g.id: g.size - 1})
        out[g.id] = sum((getattr(base, m) - getattr(smaller, m)) / max(getattr(base, m), 1) for m in metrics)
    return out


def score(criterion: Criterion, gm, groups, example_inputs, calibration=None, loss_fn=None) -> dict:
    """Raw scores of the prunable groups; gradient criteria first run the
    calibration batches (or the example inputs) through forward and backward."""
    if criterion.needs_gradients and calibration is not False:
        n_inputs = len(as_tuple(example_inputs))
        calibrate(criterion, gm, groups, calibration if calibration is not None else [as_tuple(example_inputs)],
                  n_inputs, loss_fn)
    return criterion.scores(gm, groups)


def plan(gm: fx.GraphModule, groups, example_inputs=None, *, macs=None, params=None, latency=None,
         importance="l2", calibration=None, loss_fn=None, rules: Constraints | None = None,
         latency_model=None, scores: dict | None = None) -> Plan:
    """Score the prunable groups of a captured graph and pick the channels to
    keep so that the budget holds (see `prune` for the arguments). `scores`,
    when given, are raw scores already computed (the step-wise pruner's)."""
    check_budget(macs, params, latency)
    rules = rules or Constraints()
    criterion = resolve(importance)
    target = Target(macs, params, latency)
    free, fixed = rules.split(groups.prunable)
    raw = scores if scores is not None else score(criterion, gm, groups, example_inputs, calibration, loss_fn)
    cost_model = CostModel(gm, groups, example_inputs)
    normalised = normalise({g.id: raw[g.id] for g in free}, criterion.normalisation,
                           unit_costs(cost_model, free, target) if criterion.normalisation == "cost" else None)
    budget = Budget(cost_model, target, latency_model)
    counts = solve(budget, normalised, {g.id: g.size for g in free}, rules, fixed)
    sizes = {g.id: g.size for g in groups.prunable}
    keep = strongest({**normalised, **{g: _fixed_scores(raw, g, sizes) for g in fixed}}, counts, sizes)
    return Plan(keep, counts, normalised, cost_model(), cost_model(counts), len(free) + len(fixed))


def _fixed_scores(raw, gid, sizes):
    return np.asarray(raw.get(gid, np.zeros(sizes[gid])), dtype=np.float64)


class Budget:
    """Whether a size assignment fits the target: MACs and params from the
    cost model, latency from a latency model (see latency.py)."""

    def __init__(self, cost_model: CostModel, target: Target, latency_model=None):
        if target.latency is not None and latency_model is None:
            raise BudgetError("a latency budget needs a latency model (cpdfx.prune builds one)")
        self.cost_model, self.latency_model, self.target = cost_model, latency_model, target
        base = cost_model()
        self.base = {"macs": base.macs, "params": base.params,
                     "latency": latency_model() if target.latency is not None else None}
        self.limits = target.limits(base, self.base["latency"])

    def values(self, counts: dict) -> dict:
        cost = self.cost_model(counts)
        return {m: self.latency_model(counts) if m == "latency" else getattr(cost, m) for m in self.limits}

    def __call__(self, counts: dict) -> bool:
        return all(v <= self.limits[m] for m, v in self.values(counts).items())

    def used(self, counts: dict) -> float:
        """How much of the budget counts use: value / limit of the tightest metric."""
        return max(v / self.limits[m] for m, v in self.values(counts).items())

    def shares(self, counts: dict) -> str:
        """The cost of counts as shares of the original, e.g. '12.0% of the macs'."""
        return " and ".join(f"{v / self.base[m]:.1%} of the {m}" for m, v in self.values(counts).items())

    def __str__(self):
        return ", ".join(f"{m}={share:g}" for m, share in self.target.as_dict().items())


def prune(model, example_inputs, *, macs=None, params=None, latency=None, importance="l2",
          calibration=None, loss_fn=None, steps: int = 1, reestimate_bn: bool = True, ignore=(),
          overrides=None, min_keep=1, round_to: int = 1, latency_options: dict | None = None) -> fx.GraphModule:
    """Prune model globally until it has at most `macs`, `params` and
    `latency` (shares of the original) and return the slim GraphModule.
    No weight is trained.

    importance: "l1", "l2", "fisher", "taylor", "bn_scale", "random", a
        Criterion, or a callable (gm, comb) -> {group id: scores};
    calibration: an iterable of input tuples, each optionally followed by a
        target; gradient criteria score on it (default: the example inputs,
        once), and the batch norms are re-estimated on its inputs. It is read
        once per step, so it is held in memory (a few batches are enough);
    loss_fn: (output, target or None) -> loss; default cross-entropy against the
        target, or the model's own predictions when there is none;
    steps: prune in this many rounds along a geometric schedule to the budget,
        scoring each round on the graph the last one left (what a channel is
        worth changes as its neighbours go; one round cannot see that).
        macs= and params= budgets only;
    reestimate_bn: after each round, re-estimate the batch-norm running
        statistics on the calibration inputs (see batchnorm.py); only when
        calibration is given. The slim model then differs from the masked
        original in those statistics;
    ignore, overrides, min_keep, round_to: see `Constraints`;
    latency: onnxruntime CPU time on this machine, at latency_options
        "batch" (default 8) and "threads"; solved on per-layer tables
        (latency.LatencyModel, which takes the other latency_options) and
        checked by timing the result (report "achieved" "latency").
    slim.meta["cpdfx_kept"] maps parameter names to {dim: kept indices};
    slim.meta["cpdfx_report"] is the pruning report (see report.py)."""
    check_budget(macs, params, latency)  # before the slow capture
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BudgetError(f"steps={steps!r}: give a positive number of pruning rounds")
    if latency is not None and steps > 1:
        raise BudgetError(f"steps={steps} with latency={latency:g}: a latency budget is solved in one round "
                          f"(steps=1); prune in steps to a macs= or params= budget instead")
    rules = Constraints(tuple(ignore), dict(overrides or {}), min_keep, round_to)
    criterion = resolve(importance)
    calibration = list(calibration) if calibration is not None else None
    n_inputs = len(as_tuple(example_inputs))
    bn_batches = ([calibration_item(b, n_inputs)[0] for b in calibration]
                  if reestimate_bn and calibration is not None else [])
    if latency is None:
        slim = _prune_in_steps(model, example_inputs, criterion, macs, params, steps, calibration, loss_fn, rules,
                               bn_batches)
    else:
        slim = _prune_to_latency(model, example_inputs, criterion, macs, params, latency, calibration, loss_fn,
                                 rules, latency_options or {})
        reestimate_batch_norm(slim, bn_batches)
    if bn_batches:
        slim.meta[REPORT]["batch_norm_reestimated_on"] = sum(b[0].shape[0] for b in bn_batches)
    return slim


def _prune_in_steps(model, example_inputs, criterion, macs, params, steps, calibration, loss_fn, rules, bn_batches):
    from .pruner import Pruner  # it builds on this module

    pruner = Pruner(model, example_inputs, criterion, macs=macs, params=params, steps=steps,
                    calibration=calibration, loss_fn=loss_fn, rules=rules)
    while not pruner.done:
        slim = pruner.step()
        reestimate_batch_norm(slim, bn_batches)
    return slim


def _prune_to_latency(model, example_inputs, criterion, macs, params, latency, calibration, loss_fn, rules,
                      latency_options, rounds=3, slack=0.02):
    """Solve on the latency tables, measure the result in onnxruntime, and
    solve again with the target corrected by what was measured (the tables
    miss what layers share: caches, fused ops, the non-conv rest), keeping the
    closest result that is not over target + slack."""
    from .latency import LatencyModel, Measured

    gm = capture(model, example_inputs)
    groups = comb_pass(gm)
    batch, threads = latency_options.get("batch", 8), latency_options.get("threads")
    measured = Measured(gm, example_inputs, batch=batch, threads=threads)
    latency_model = LatencyModel(gm, groups, example_inputs, full_ms=measured.full_ms, **latency_options)
    options = dict(macs=macs, params=params, importance=criterion, rules=rules, latency_model=latency_model,
                   scores=score(criterion, gm, groups, example_inputs, calibration, loss_fn))
    asked, best = latency, None
    for round_ in range(rounds):
        try:
            chosen = plan(gm, groups, example_inputs, latency=asked, **options)
        except BudgetError:
            if round_ == 0:
                raise
            break  # the correction asked for more than the tables allow
        slim = eliminate(gm, groups, chosen.keep)
        share = measured.share(slim)
        if share <= latency + slack and (best is None or share > best[2]):
            best = (slim, chosen, share)
        if abs(share - latency) <= slack:
            break
        asked = min(1.0, asked * latency / share)
    if best is None:
        raise BudgetError(f"latency={latency:g} was not reached: after {rounds} rounds the pruned model "
                          f"still runs at {share:.0%} of the original's time in onnxruntime; ask for a "
                          f"larger share, or add a macs= target")
    slim, chosen, share = best
    slim.meta[REPORT] = build_report(gm, slim, groups, chosen, criterion, Target(macs, params, latency),
                                     example_inputs, latency_model)
    slim.meta[REPORT]["achieved"]["latency"] = share
    return slim
