"""Budgets: what a pruned model must fit (`Target`), what the solver may do to
each channel group besides (`Constraints`), and whether a size assignment fits
(`Budget`). A budget is checked once, when its Target is made, and flows down
as that value through prune, Pruner, plan and the solver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .cost import Cost, CostModel
from .runtime import channel_block, check_runtime


class BudgetError(ValueError):
    """The budget asked for cannot be met. `reachable`, when known: the
    smallest share of each budgeted metric the constraints allow."""

    def __init__(self, message: str, reachable: dict | None = None):
        super().__init__(message)
        self.reachable = reachable or {}


@dataclass(frozen=True)
class Target:
    """A budget: shares of the original's MACs, parameters and latency to keep,
    one to three of them, each in (0, 1]. Checked once, here, and passed down
    as this value."""
    macs: float | None = None
    params: float | None = None
    latency: float | None = None

    def __post_init__(self):
        if self.macs is None and self.params is None and self.latency is None:
            raise BudgetError("give a budget: macs=, params= or latency= (shares of the original, in (0, 1])")
        for name, value in self.as_dict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise BudgetError(f"{name}={value!r}: a budget is the share of the original to keep, "
                                  f"a number in (0, 1], e.g. {name}=0.5 for half")

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
class Constraints:
    """What the solver may do to each group, beyond the budget.

    ignore: module or parameter names whose channels are all kept;
    overrides: {module or parameter name: share of channels to keep} for the
        groups those layers touch, taken out of the global ranking;
    min_keep: channels every group keeps at least: an int, or a share in (0, 1);
    round_to: every pruned width a multiple of this many channels (or the full
        size), in the layers' channel dims: a group whose element stands for
        several channels (a head of 64) steps by fewer elements. None (the
        default) aligns to the channel block of `runtime` (runtime.py), and
        where the budget cannot be met within 2 points so, to half of it, and
        so on down to single channels (`alignments`, solve.plan);
    runtime: "cpu" or "cuda", the onnxruntime provider the model ships to;
    steps: {group id: count step}, set by `alignments` (round_to when absent);
    original_sizes: {group id: the group's size in the unpruned model}, for a
        graph pruned before (the step-wise pruner sets it): the shares of
        min_keep and overrides are of those sizes, so they do not compound
        over steps. Groups not in it count from their current size."""
    ignore: tuple = ()
    overrides: dict = field(default_factory=dict)
    min_keep: int | float = 1
    round_to: int | None = None
    runtime: str = "cpu"
    steps: dict = field(default_factory=dict)
    original_sizes: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)
        check_runtime(self.runtime)
        if self.round_to is not None and (not isinstance(self.round_to, int) or isinstance(self.round_to, bool)
                                          or self.round_to < 1):
            raise BudgetError(f"round_to={self.round_to!r}: give a positive int, e.g. 8 (1 for free channel "
                              f"counts), or None for the runtime's channel block")
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

    def alignments(self, comb) -> list[Constraints]:
        """The constraints to solve with, in order, each with its per-group
        steps: round_to's alone; or, when it is None, the runtime's channel
        block, then half of it, down to 1. solve.plan keeps the first whose
        result lands close under the budget: a small model may have no room
        for whole blocks."""
        if self.round_to is not None:
            widths = [self.round_to]
        else:
            widths = [channel_block(self.runtime)]
            while widths[-1] > 1:
                widths.append(widths[-1] // 2)
        return [replace(self, round_to=w, steps=_steps(comb, w)) for w in widths]

    def step(self, gid) -> int:
        return self.steps.get(gid, self.round_to or 1)

    def rounded(self, n: int, size: int, gid=None) -> int:
        r = self.step(gid)
        return min(size, math.ceil(n / r) * r) if r > 1 else n

    def shrunk(self, n: int, size: int, gid=None) -> int | None:
        """The next allowed count below n, or None when n is the minimum."""
        r = self.step(gid)
        m = n - 1 if r == 1 else (n - 1) // r * r
        return m if m >= self.rounded(self.floor(size, gid), size, gid) else None

    def split(self, groups) -> tuple[list, dict]:
        """The groups the global ranking decides, and the fixed counts of overridden ones."""
        free, fixed = [], {}
        for g in groups:
            if _touches(g, self.ignore):
                continue
            shares = [s for name, s in self.overrides.items() if _touches(g, (name,))]
            if shares:
                share = math.ceil(max(shares) * self._base(g.id, g.size))
                fixed[g.id] = self.rounded(min(g.size, max(self.floor(g.size, g.id), share)), g.size, g.id)
            else:
                free.append(g)
        return free, fixed


def _steps(comb, width: int) -> dict:
    """Per prunable group, the count step that keeps the channel dims it spans
    multiples of `width`: width / gcd(width, m), where m is how many channels
    one element stands for, in the dim where it stands for most, counting only
    factors that cannot shrink (a head of a fixed head_dim of 64 steps by one;
    a plain channel, or a head whose head_dim is pruned too, by `width`)."""
    free = frozenset(g.id for g in comb.prunable)
    steps = {}
    for g in comb.prunable:
        most = max(comb.spaces.multiplicity(comb.param_dims[name][d], g.id, free - {g.id}) for name, d in g.params)
        steps[g.id] = width // math.gcd(width, max(most, 1))
    return steps


def _touches(group, names) -> bool:
    return any(p == n or p.startswith(n + ".") for p, _ in group.params for n in names)


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

    def shares(self, counts: dict) -> dict:
        """The cost of counts as shares of the original, per budgeted metric."""
        return {m: v / self.base[m] for m, v in self.values(counts).items()}

    def __str__(self):
        return ", ".join(f"{m}={share:g}" for m, share in self.target.as_dict().items())
