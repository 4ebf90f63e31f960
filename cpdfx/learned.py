"""The learned structure, compress(importance="learned"), after Ahmed et al.
2021, "Compact CNN Structure Learning by Knowledge Distillation": a gate per
channel of every prunable group, trained with the distillation loss and a
resource-weighted sparsity penalty (each channel's weight is what one channel
of its group costs in the budgeted metric, `LearnedCallback.sparsity`), whose
strength a controller adapts over the pruning phase so that the penalty drives
the open gates' cost down a path to the budget. When the open gates fit the
budget, they are folded into the weights and the model is cut to the budget
once by the solver, ranking the channels by `rank`: "gates" (the gate
magnitudes relative to their group) or "fisher" (the Fisher criterion of the
gated network, in its batch form). Only when the penalty has not brought the
open gates to the budget by the end of the pruning phase are the weakest open
gates closed to it (the fallback, reported in report["learned"]["fallback"]). See `GatedStudent`
for why the gates scale every parameter slice of a channel.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .cost import CostModel
from .cpd import PruneCallback
from .importance import Criterion, gate_slices, gated as scale_slices
from .budget import Budget, Target
from .solve import plan
from .pruner import Pruner

LEARNED = "learned"
LEARNED_DEFAULTS = {"penalty": 2.0, "growth": 1.3, "threshold": 0.1, "every": 5, "cost_power": 1.0,
                    "rank": "gates"}
RANKS = ("gates", "fisher")
PATH_SLACK = 0.02  # in budgets: how far under the path the open gates may run before the penalty eases
FISHER_DECAY = 0.98  # per step: the gates' Fisher is a mean over the last ~50 batches, as the gates move


class GatedStudent(nn.Module):
    """A captured graph whose channels are scaled by learnable gates, one per
    channel of each gated group, all starting at 1.

    A gate multiplies every parameter slice its channel lives in: the producing
    conv or linear rows and biases, the norm's scale and shift, the consumers'
    input columns (the slices the pruner would cut, found through the comb, so
    concatenations, residual streams, grouped convs and attention heads are
    covered without a rule per layer). Norm scales alone would not do: many
    groups have no norm (a transposed conv's output, attention heads), and a
    zero gamma leaves beta's constant in place. With every slice gated, a
    closed gate removes the channel exactly, and the gradient of a gate at 1 is
    the Taylor mask gradient the fisher criterion squares. The graph runs
    unchanged, its parameters swapped for the gated ones (torch.func), so
    folding the gates into the weights afterwards (`fold`) gives the same
    function on the plain graph, which the normal solver then prunes."""

    def __init__(self, gm: fx.GraphModule, comb, groups):
        super().__init__()
        self.gm = gm
        self.ids = [g.id for g in groups]
        self.gates = nn.ParameterDict({f"g{g.id}": nn.Parameter(torch.ones(g.size)) for g in groups})
        self.slices: dict[str, list[tuple[int, str]]] = {}  # the gate index of each slice, as a buffer
        for name, pairs in gate_slices(gm, comb, groups)[0].items():
            for d, index in pairs:
                key = f"index{sum(len(v) for v in self.slices.values())}"
                self.register_buffer(key, torch.as_tensor(index, dtype=torch.long), persistent=False)
                self.slices.setdefault(name, []).append((d, key))

    def train(self, mode: bool = True):
        self.training = mode
        self.gm.train(mode)  # a captured graph switches its batch norm and dropout itself
        return self

    def values(self) -> dict:
        """The gates by group id, as numpy arrays."""
        return {gid: self.gates[f"g{gid}"].detach().cpu().numpy().astype(np.float64) for gid in self.ids}

    def _flat(self) -> torch.Tensor:
        one = torch.ones(1, device=self.gates[f"g{self.ids[0]}"].device)
        return torch.cat([one] + [self.gates[f"g{gid}"] for gid in self.ids])

    def gated(self, name: str, p: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return scale_slices(p, [(d, getattr(self, key)) for d, key in self.slices.get(name, ())], flat)

    def forward(self, *args, **kwargs):
        flat = self._flat()
        params = {n: self.gated(n, p, flat) for n, p in self.gm.named_parameters() if n in self.slices}
        return torch.func.functional_call(self.gm, params, args, kwargs)

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the gates into the graph's weights: the plain graph then
        computes what the gated one did."""
        flat = self._flat()
        for n, p in self.gm.named_parameters():
            if n in self.slices:
                p.copy_(self.gated(n, p, flat))


class GateScores(Criterion):
    """What the final cut (and the fallback) ranks the channels by, handed
    over with `set` (`LearnedCallback.scores`), by `rank`:
    "gates" (the default): |gate|, over the group's mean |gate| (the
        solver's "mean" normalisation): the structure the resource-weighted
        penalty drove the gates to; the closed channels rank last, the open
        ones by how far training and the penalty left them open. Chosen on
        validation (benchmarks/results/learned_selection.md): with the
        defaults, 68.7% against 68.2% for "fisher"; where the penalty met
        the budget by itself (growth 1.1), 67.6% against 65.2%, "fisher"
        there keeping a structure other than the open gates'.
    "fisher": the batch Fisher (importance.Fisher(per_sample=False),
        "fisher_batch") of the network the gates make: the squared gradient
        of the batch's loss on a mask on each folded channel,
        (g x dL/dg) ** 2 averaged over recent batches (a gate scales every
        slice of its channel, so this is the mask gradient of the channel
        whose weights are the gated ones); per channel like fisher's, and the
        solver divides it by each channel's cost. A closed gate scores 0."""
    name = "learned"

    def __init__(self, rank: str = "gates"):
        self.rank = rank
        self.normalisation = "mean" if rank == "gates" else "cost"
        self.values: dict = {}

    def set(self, scores: dict) -> None:
        self.values = dict(scores)

    def scores(self, gm, comb):
        return {g.id: self.values.get(g.id, np.ones(g.size)) for g in comb.prunable}


class LearnedCallback(PruneCallback):
    """distill's callback for the learned structure (importance="learned").

    The gates are trained outside the optimizer (`_gate_step`), after each
    optimizer step: on the student's loss (the distillation loss), and on the
    resource-weighted sparsity penalty (`sparsity`: per group, what one of its
    channels costs x the soft count of its open gates, L1 / L2), `penalty`
    setting its strength. Every `every` steps the open gates
    (|gate| > threshold x the group's root mean square) are costed and
    compared with a geometric path from the original's cost to the budget
    over the pruning phase: the penalty grows x `growth` while they cost more
    than the path says, and shrinks / `growth` when they run more than
    PATH_SLACK under it, never below the strength it started at (the
    controller: eased further, a penalty that ran ahead early on fell so far
    that it could not close the last gates before the phase ended). The penalty closes the gates;
    nothing else does while the phase lasts. As soon as the open gates fit
    the budget (`met_at`), the gates are folded into the weights and the model
    is cut to the budget once, by the solver, ranking by `GateScores` (rank):
    the cut removes closed channels and refills the room the penalty left with
    the best of them. If the phase ends with the open gates over the budget,
    the fallback (`_close_to`) closes the weakest open ones to it first
    (`fallback_at`, and the open gates' cost then in `end_share`)."""

    def __init__(self, pruner: Pruner, student: GatedStudent, end: int, config: dict, *, penalty: float,
                 growth: float, threshold: float, every: int, cost_power: float, rank: str, target: Target,
                 example_inputs):
        super().__init__(pruner, [end], config)
        self.student, self.end = student, end
        self.penalty, self.growth, self.threshold, self.every = penalty, growth, threshold, every
        self.least = penalty  # the controller never eases the penalty below the strength it starts at
        self.cost_power = cost_power
        self.example_inputs = example_inputs
        self.rules = pruner.rules.alignments(pruner.comb)[-1]  # the finest widths the final cut may use
        self.free, self.fixed = self.rules.split(pruner.comb.prunable)
        self.free_ids = [g.id for g in self.free]
        self.cost_model = CostModel(pruner.gm, pruner.comb, example_inputs)
        self.budget = Budget(self.cost_model, target)
        self.weights = self._cost_weights(self._full())
        self.start = self.budget.used({**self._full(), **self.fixed})
        self.trace: list[dict] = []
        self.met_at = None  # the step at which the penalty brought the open gates to the budget
        self.fallback_at = None  # the step at which the fallback closed gates to the budget (the phase's end)
        self.end_share = None  # the open gates' cost, as shares of the original, when the gates were cut
        self.loss_grads: dict = {}
        self.scale, self.seen = 0.0, 0  # running mean square of the gates' loss gradients
        self.fisher: dict = {}  # per gated group, a running mean of (gate x its loss gradient) ** 2

    def _full(self) -> dict:
        return {g.id: g.size for g in self.free}

    def open_counts(self) -> dict:
        """Per free group, the channels whose gate is open, within the constraints."""
        rules, gates = self.rules, self.student.values()
        return {g.id: rules.rounded(max(int(_open(gates[g.id], self.threshold).sum()), rules.floor(g.size, g.id)),
                                    g.size, g.id) for g in self.free}

    def _cost_weights(self, counts: dict) -> dict:
        """Per free group, what one more channel costs at these sizes (the
        budgeted metrics' shares of the original) to the power cost_power,
        over the mean per channel: cost depends on the neighbours' widths, so
        it is re-read as gates close. cost_power 1, the default, weighs the
        penalty by cost (Ahmed et al.'s resource weighting); 0 penalises every
        channel alike."""
        metrics = [m for m in ("macs", "params") if getattr(self.budget.target, m) is not None]
        base, now = self.cost_model(), self.cost_model({**counts, **self.fixed})
        unit = {}
        for g in self.free:
            smaller = self.cost_model({**counts, **self.fixed, g.id: max(counts[g.id] - 1, 0)})
            unit[g.id] = sum((getattr(now, m) - getattr(smaller, m)) / max(getattr(base, m), 1) for m in metrics)
        unit = {gid: max(u, 0.0) ** self.cost_power for gid, u in unit.items()}
        mean = sum(unit[g.id] * g.size for g in self.free) / max(sum(g.size for g in self.free), 1)
        return {gid: u / mean if mean > 0 else 1.0 for gid, u in unit.items()}

    def on_backward(self, student: nn.Module) -> None:
        """Take the gates' loss gradients away from the optimizer (a None grad
        is skipped by AdamW, SGD and gradient clipping): Adam would scale each
        gate's gradient to about one, erasing how much its channel matters,
        which is exactly what the penalty must be weighed against."""
        for gid in self.student.ids:
            gate = self.student.gates[f"g{gid}"]
            self.loss_grads[gid] = torch.zeros_like(gate) if gate.grad is None else gate.grad.detach().clone()
            gate.grad = None
            mask = (gate.detach() * self.loss_grads[gid]).double() ** 2  # on the gate's device: no sync per step
            before = self.fisher.get(gid, torch.zeros_like(mask)).to(mask.device)
            self.fisher[gid] = FISHER_DECAY * before + (1 - FISHER_DECAY) * mask

    def scores(self) -> dict:
        """What the cut ranks by (see GateScores): |gate|, or the gated
        channels' Fisher, bias-corrected like Adam's moments, so the first
        batches count in full."""
        if self.pruner.criterion.rank == "gates":
            return {gid: np.abs(v) for gid, v in self.student.values().items()}
        steps = max(self.seen, 1)
        return {gid: f.cpu().numpy() / (1 - FISHER_DECAY ** steps) for gid, f in self.fisher.items()}

    def sparsity(self) -> torch.Tensor:
        """The penalty: per group, its cost weight (what one of its channels
        costs, `_cost_weights`) x the sum of |gate| / the gates' root mean
        square (L1 over L2: a Hoyer measure, the group's soft count of open
        channels), so the penalty is a soft cost of the open structure and a
        channel's share of its gradient is its group's cost. Batch norm makes
        a network blind to the scale of a whole group, so plain L1 would
        shrink every gate of a group alike, at no cost to the loss, and select
        nothing; this measure does not change with the scale, only with how
        the gates differ, and it falls as the weaker ones close."""
        total = 0.0
        for gid in self.free_ids:
            g = self.student.gates[f"g{gid}"]
            total = total + self.weights[gid] * g.abs().sum() / (g.pow(2).mean().sqrt() + 1e-12)
        return total

    def _gate_step(self, lr: float, base_lr: float) -> None:
        """One step on the gates, outside the optimizer: the loss gradient over
        its running root mean square across all gates (one scale for all, so a
        channel that matters twice as much pushes twice as hard), plus penalty
        x the sparsity gradient, of size lr / (base lr x the steps of the
        pruning phase): a push of one moves a gate about its own size over the
        phase, whatever the lr and the length of the run. A gate that would
        cross zero stops at zero."""
        if not self.loss_grads:
            return
        squares = torch.cat([v.reshape(-1) for v in self.loss_grads.values()]).double().pow(2).mean()
        self.seen += 1
        self.scale = 0.99 * self.scale + 0.01 * squares  # a tensor on the gates' device, read back only when saved
        unit = (self.scale / (1 - 0.99 ** self.seen)).sqrt() + 1e-30
        free = [self.student.gates[f"g{gid}"] for gid in self.free_ids]
        with torch.enable_grad():
            sparse = dict(zip(self.free_ids, torch.autograd.grad(self.sparsity(), free))) if free else {}
        size = lr / (base_lr * self.end)
        with torch.no_grad():
            for gid in self.student.ids:
                g = self.student.gates[f"g{gid}"]
                push = self.loss_grads[gid] / unit
                if gid in sparse:
                    push = push + self.penalty * sparse[gid]
                new = g - size * push
                g.copy_(torch.where(new.sign() == g.sign(), new, torch.zeros_like(new)))
        self.loss_grads = {}

    def on_step_end(self, step: int, student: nn.Module, optimizer) -> nn.Module | None:
        if self.pruner.done:
            return None
        self._gate_step(*_lr_of(optimizer, self.student.gates[f"g{self.student.ids[0]}"]))
        if step % self.every and step < self.end:
            return None
        counts = self.open_counts()
        used = self.budget.used({**counts, **self.fixed})
        goal = self.start ** (1 - min(step, self.end) / self.end)  # a geometric path from the original to the budget
        self.trace.append({"step": step, "penalty": self.penalty, "used": used, "goal": goal,
                           "open": self.budget.shares({**counts, **self.fixed})})
        if used <= 1 or step >= self.end:
            self.end_share = self.budget.shares({**counts, **self.fixed})
            if used <= 1:
                self.met_at = step  # the penalty brought the open gates to the budget
            else:
                self.fallback_at = step  # it did not: close the weakest open gates to the budget
                self._close_to(1.0)
            return self._cut(step, optimizer)
        if used > goal:
            self.penalty *= self.growth  # the gates lag the path: push harder
        elif used < goal - PATH_SLACK:  # they run ahead of it: ease off, down to the strength it started at
            self.penalty = max(self.penalty / self.growth, self.least)
        self.weights = self._cost_weights(counts)
        return None

    def summary(self) -> dict:
        """report["learned"]: whether the penalty met the budget (met_by_gates_at)
        or the fallback closed gates to it at the end of the phase (fallback,
        fallback_at), the open gates' cost then (end_share, shares of the
        original), the penalty's last strength and the trace of the checks."""
        return {"met_by_gates_at": self.met_at, "fallback": self.fallback_at is not None,
                "fallback_at": self.fallback_at, "end_share": self.end_share, "final_penalty": self.penalty,
                "trace": self.trace}

    def _close_to(self, goal: float) -> dict:
        """The fallback: close the weakest open gates (ranked as the final cut
        ranks them) so that the open structure costs at most `goal` budgets,
        and return the open counts."""
        target = self.budget.target
        scaled = Target(*(None if v is None else min(1.0, v * goal) for v in (target.macs, target.params)))
        self.pruner.criterion.set(self.scores())
        chosen = plan(self.pruner.gm, self.pruner.comb, self.example_inputs, scaled,
                      importance=self.pruner.criterion, rules=self.rules)
        with torch.no_grad():
            for gid, kept in chosen.keep.items():
                if gid in self.free_ids:
                    gate = self.student.gates[f"g{gid}"]
                    closed = torch.ones_like(gate, dtype=torch.bool)
                    closed[torch.as_tensor(kept, dtype=torch.long)] = False
                    gate.masked_fill_(closed, 0.0)
        return self.open_counts()

    def _cut(self, step: int, optimizer) -> fx.GraphModule:
        """Fold the gates in, prune to the budget on the scores, and leave the
        optimizer holding the slim graph's parameters under their own names."""
        self.student.fold()
        self.pruner.criterion.set(self.scores())
        gates = {id(p) for p in self.student.gates.parameters()}
        slim = self._prune(step, optimizer)
        for group in optimizer.param_groups:
            names = group.get("param_names", [None] * len(group["params"]))
            kept = [(p, n) for p, n in zip(group["params"], names) if id(p) not in gates]
            for p in group["params"]:
                if id(p) in gates:
                    optimizer.state.pop(p, None)
            group["params"] = [p for p, _ in kept]
            if "param_names" in group:
                group["param_names"] = [n.removeprefix("gm.") for _, n in kept]
        return slim

    def state_dict(self) -> dict:
        return {**super().state_dict(), "penalty": self.penalty, "weights": dict(self.weights),
                "trace": list(self.trace), "met_at": self.met_at, "fallback_at": self.fallback_at,
                "end_share": self.end_share, "scale": float(self.scale), "seen": self.seen,
                "fisher": {gid: f.tolist() for gid, f in self.fisher.items()}}

    def load_state_dict(self, state: dict, student: nn.Module) -> nn.Module:
        self.penalty, self.weights = state["penalty"], {int(k): v for k, v in state["weights"].items()}
        self.trace, self.met_at = list(state["trace"]), state["met_at"]
        self.fallback_at, self.end_share = state["fallback_at"], state["end_share"]
        self.scale, self.seen = state["scale"], state["seen"]
        self.fisher = {int(gid): torch.tensor(f, dtype=torch.float64) for gid, f in state["fisher"].items()}
        return super().load_state_dict(state, student)  # the slim graph once cut, else the gated student


def _open(gates: np.ndarray, threshold: float) -> np.ndarray:
    """Which gates are open: |gate| above threshold x the group's root mean square."""
    return np.abs(gates) > threshold * np.sqrt(np.mean(gates ** 2))


def _lr_of(optimizer, param) -> tuple[float, float]:
    """The lr of the group that holds param: now, and at the start (before the schedule)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group["lr"], group.get("initial_lr", group["lr"])
    raise RuntimeError("the optimizer does not hold the gates: compress builds the optimizer through distill, "
                       "which trains every parameter of the gated student")


def resolve_options(options) -> dict:
    """The learned options: the defaults, overridden by those given, checked."""
    options = {**LEARNED_DEFAULTS, **(options or {})}
    unknown = set(options) - set(LEARNED_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown learned_options {sorted(unknown)}; the options are "
                         f"{', '.join(f'{k} (default {v})' for k, v in LEARNED_DEFAULTS.items())}")
    if (options["penalty"] <= 0 or options["growth"] < 1 or options["threshold"] <= 0 or options["every"] < 1
            or options["cost_power"] < 0 or options["rank"] not in RANKS):
        raise ValueError(f"learned_options {options}: penalty and threshold must be positive, growth at least 1, "
                         f"every a positive number of steps, cost_power at least 0 and rank one of {RANKS}")
    return options


def gated_student(gm, example_inputs, target, end, config, rules, options):
    """The gated student and its callback (importance='learned'): every
    prunable group that is not ignored gets gates; only the groups the global
    ranking decides (not the overridden ones) are penalised."""
    pruner = Pruner(gm, example_inputs, GateScores(options["rank"]), macs=target.macs, params=target.params, steps=1, **rules)
    free, fixed = pruner.rules.split(pruner.comb.prunable)
    if not free:
        raise ValueError("importance='learned' found no channel group to learn: every prunable group is ignored "
                         "or overridden (or the model has none); loosen ignore= / overrides=, or use a pruning "
                         "criterion such as 'fisher'")
    gated = {g.id for g in free} | set(fixed)
    student = GatedStudent(pruner.gm, pruner.comb, [g for g in pruner.comb.prunable if g.id in gated])
    callback = LearnedCallback(pruner, student, end, config, target=target, example_inputs=example_inputs,
                               **options)
    return student, callback
