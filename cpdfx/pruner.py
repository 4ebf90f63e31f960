"""Step-wise pruning inside a training loop (the CPD schedule).

    pruner = cpdfx.Pruner(model, x, "fisher", macs=0.5, steps=5, loss_fn=loss)
    gm = pruner.gm.train()
    opt = torch.optim.AdamW(gm.parameters())
    for i, (x, y) in enumerate(loader):
        loss(gm(x), y).backward()
        pruner.accumulate(gm, (x,), y)  # fisher scores the batch's samples, loss_fn(output, y);
        opt.step(); opt.zero_grad()     # taylor, fisher_batch read the gradients (no batch needed)
        if i % 100 == 99 and not pruner.done:
            gm = pruner.step(opt)     # smaller graph; opt now holds its sliced parameters

Each step prunes to the next point of the schedule (a share of the
original's cost), scored by what the criterion accumulated since the last
step, and slices the optimizer state (Adam moments, momentum) the same way
the parameters were sliced, so training goes on without a restart.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx
from torch.nn.parallel import DistributedDataParallel

from .passes import comb as comb_pass
from .passes import eliminate, kept_indices

from .capture import capture
from .cost import CostModel
from .importance import group_slices, resolve, self_supervised_loss
from .budget import BudgetError, Constraints, Target
from .latency import LatencyModel, Measured
from .ranks import from_main, is_main
from .report import REPORT, build_report
from .solve import plan, score

SCHEDULES = ("geometric", "linear")
ROUNDS = 6  # solve-and-measure rounds of a latency budget's last step (see to_latency)
ACCEPT = 0.07  # a latency result lands when its speed-up is within this share of the one asked (see to_latency)


def schedule(target: float, steps: int, kind: str = "geometric") -> list[float]:
    """The share of the original cost to keep after each step, ending at target.
    geometric removes the same fraction of what is left at every step; linear
    the same fraction of the original."""
    if kind == "geometric":
        return [target ** ((k + 1) / steps) for k in range(steps)]
    if kind == "linear":
        return [1 - (1 - target) * (k + 1) / steps for k in range(steps)]
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


class Pruner:
    """Prunes a model to a budget in `steps` steps (see the module docstring).

    model_or_gm: a module (captured here) or a cpdfx GraphModule;
    importance, calibration, loss_fn, ignore, overrides, min_keep, round_to, runtime: as
        for cpdfx.prune (`rules`, a prune.Constraints, replaces the last five);
        gradient criteria score from the batches seen through
        `accumulate()` since the last step, or from `calibration` when none were;
    latency, latency_options: a latency budget, as for cpdfx.prune: every step
        is solved on the tables of the graph it starts from and measured in
        onnxruntime, the next step's target taken from what was measured, and
        the last step corrected until the measured share lands on the target.
        Under torch.distributed, rank 0 alone times and solves these steps and
        the others apply its plan.
    """

    def __init__(self, model_or_gm, example_inputs, importance="fisher", *, macs=None, params=None, latency=None,
                 steps: int = 5, schedule: str = "geometric", calibration=None, loss_fn=None,
                 ignore=(), overrides=None, min_keep=1, round_to: int | None = None, runtime: str = "cpu",
                 rules: Constraints | None = None, latency_options: dict | None = None):
        self.target = Target(macs, params, latency)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: give a positive number of pruning steps")
        self.targets = list(zip(_shares(macs, steps, schedule), _shares(params, steps, schedule),
                                _shares(latency, steps, schedule)))
        self.rules = rules or Constraints(tuple(ignore), dict(overrides or {}), min_keep, round_to, runtime)
        self.criterion = resolve(importance)
        self.example_inputs, self.loss_fn = example_inputs, loss_fn
        self.calibration = list(calibration) if calibration is not None else None  # read at every step
        self.original = self.gm = capture(model_or_gm, example_inputs)
        self.comb = comb_pass(self.gm)
        self.base = CostModel(self.gm, self.comb, example_inputs)()
        self.steps_done = 0
        self.history: list[dict] = []
        self.keeps: list[dict] = []  # each step's keep set, in the comb it was applied to (see replay)
        self.latency_options = {"runtime": self.rules.runtime, **(latency_options or {})}
        self.tolerance = self.latency_options.pop("tolerance", 0.0)  # the correction's, not the tables' (to_latency)
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not 0 <= self.tolerance < 1:
            raise BudgetError(f"latency_options tolerance={self.tolerance!r}: give how much slower than asked a "
                              f"result may be kept, a share in [0, 1), e.g. 0.2")
        int8 = self.latency_options.get("int8", False)
        if not isinstance(int8, bool):
            raise BudgetError(f"latency_options int8={int8!r}: give True to time the model as it ships in int8, "
                              f"or False")
        self.measured = self.latency_share = None
        self.elementwise = 0.0  # the latency model's elementwise share for the current graph (LatencyModel.calibrate)
        if latency is not None:  # the original, timed in onnxruntime: what every step's latency is a share of
            options = self.latency_options
            if is_main():  # one process times, and tells the others what it chose (see step)
                self.measured = Measured(self.gm, example_inputs, batch=options.get("batch", 8),
                                         threads=options.get("threads"), runtime=options["runtime"], int8=int8)
            # the original's time as it ships (in int8, with int8) as a share of its fp32 time: the steps'
            # latency targets run from there to the one asked
            self.latency_share = from_main(self.measured.shipped if self.measured else None)
            if int8 and latency >= self.latency_share:
                raise BudgetError(
                    f"latency={latency:g} (x{1 / latency:.2f}) with int8: the original quantized to int8 already "
                    f"runs x{1 / self.latency_share:.2f} faster than in fp32 on this machine, so there is nothing "
                    f"to prune for it. Ship the original's int8 model (cpdfx export --int8, cpdfx quantize), or "
                    f"ask for more than x{1 / self.latency_share:.2f}")
            self.targets = [(m, p, s * self.latency_share) for (m, p, s) in
                            zip(_shares(macs, steps, schedule), _shares(params, steps, schedule),
                                _shares(latency / self.latency_share, steps, schedule))]

    @property
    def done(self) -> bool:
        return self.steps_done >= len(self.targets)

    def accumulate(self, gm: fx.GraphModule | None = None, inputs: tuple | None = None, *loss_args,
                   loss_fn=None) -> None:
        """Gather importance from one training batch, on the current graph (or
        its DDP module). A per-sample criterion (fisher) scores the batch's
        samples: inputs, the graph's inputs (a tuple), and loss_fn(output,
        *loss_args) (by default the pruner's loss_fn, else cross-entropy
        against the targets or the model's own predictions), loss_args (the
        targets, a teacher's outputs) split per sample with the inputs. A
        gradient criterion (taylor, fisher_batch) reads the gradients of the
        last backward pass: call after loss.backward()."""
        if isinstance(gm, DistributedDataParallel):
            gm = gm.module  # its parameters' names are the graph's under "module."
        gm = gm if gm is not None else self.gm
        if self.criterion.per_sample and inputs is not None:
            self.criterion.accumulate_samples(gm, self.comb, tuple(inputs),
                                              loss_fn or self.loss_fn or self_supervised_loss, *loss_args)
        elif self.criterion.needs_gradients:
            self.criterion.accumulate(gm, self.comb)  # a per-sample one without inputs says what it needs

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> fx.GraphModule:
        """Prune to the next point of the schedule and return the new graph;
        the optimizer's parameters and state are replaced by sliced ones."""
        if self.done:
            return self.gm
        macs, params, latency = self.targets[self.steps_done]
        current = CostModel(self.gm, self.comb, self.example_inputs)()
        target = Target(_relative(macs, self.base.macs, current.macs),
                        _relative(params, self.base.params, current.params),
                        _relative(latency, 1.0, self.latency_share))
        seen = not self.criterion.needs_gradients or self.criterion.batches > 0
        scores = (self.criterion.scores(self.gm, self.comb) if seen else
                  score(self.criterion, self.gm, self.comb, self.example_inputs, self.calibration, self.loss_fn))
        rules = replace(self.rules, original_sizes=original_sizes(self.original, self.gm, self.comb))
        options = dict(importance=self.criterion, rules=rules, scores=scores)
        latency_model, tried = None, None
        if latency is None:
            chosen = plan(self.gm, self.comb, self.example_inputs, target, **options)
            slim = eliminate(self.gm, self.comb, chosen.keep)
        else:
            slim, chosen, self.latency_share, tried, latency_model = self._to_latency(target, latency, options)
        self.keeps.append(_plain_keep(chosen.keep))
        if optimizer is not None:
            slice_optimizer(optimizer, self.gm, slim, kept_indices(self.comb, chosen.keep))
        self.history.append({"step": self.steps_done + 1, "macs": chosen.after.macs / self.base.macs,
                             "params": chosen.after.params / self.base.params,
                             **({"latency": self.latency_share, "elementwise": self.elementwise}
                                if latency is not None else {}),
                             **({"rounds": [list(pair) for pair in tried]} if tried else {})})
        slim.meta[REPORT] = build_report(self.original, slim, self.comb, chosen, self.criterion,
                                         self.target, self.example_inputs, latency_model,
                                         original_sizes=rules.original_sizes)
        slim.meta[REPORT]["steps"] = list(self.history)
        if latency is not None:
            slim.meta[REPORT]["achieved"]["latency"] = self.latency_share
            slim.meta[REPORT]["latency_landed"] = landed(self.latency_share, self.target.latency)
        self.gm, self.comb = slim, comb_pass(slim)
        self.criterion.reset()
        self.steps_done += 1
        return slim

    def _to_latency(self, target: Target, latency: float, options: dict):
        """One latency step (see to_latency): timed and solved by rank 0 alone
        under torch.distributed, whose plan every rank then applies."""
        result = latency_model = slim = None
        if is_main():
            latency_model = LatencyModel(self.gm, self.comb, self.example_inputs, elementwise=self.elementwise,
                                         full_ms=self.measured.full_ms * self.latency_share, **self.latency_options)
            last = self.steps_done == len(self.targets) - 1
            try:
                slim, chosen, share, tried = to_latency(self.gm, self.comb, self.example_inputs, target, latency,
                                                        self.measured, latency_model, options,
                                                        rounds=ROUNDS if last else 1, tolerance=self.tolerance)
                result = (chosen, share, tried)
                self.elementwise = latency_model.elementwise_at(chosen.counts)  # what the next step starts from
            except BudgetError as err:
                result = err  # raised on every rank, not left waiting for a plan
        result = from_main(result)
        if isinstance(result, BudgetError):
            raise result
        chosen, share, tried = result
        if slim is None:  # rank 0's plan, applied here
            slim = eliminate(self.gm, self.comb, chosen.keep)
        return slim, chosen, share, tried, latency_model

    # -- resuming: a pruned structure re-created from the keep sets of the steps done --

    def state_dict(self) -> dict:
        """What re-creates this pruner's state on a fresh one (see load_state_dict):
        the keep set of every step done, the history and the last report, and what
        a gradient criterion has accumulated since the last step. Plain Python and
        numpy values, so that it can travel in a training checkpoint."""
        return {"steps_done": self.steps_done, "keeps": [dict(k) for k in self.keeps],
                "history": [dict(h) for h in self.history], "report": self.gm.meta.get(REPORT),
                "criterion": _criterion_state(self.criterion)}

    def load_state_dict(self, state: dict) -> fx.GraphModule:
        """Replay the steps recorded in `state` on this pruner, which must be
        freshly built from the same model with the same settings, and return the
        graph in the shape it then had. The weights are the original's: load the
        trained ones afterwards (a checkpoint's state_dict fits the graph returned)."""
        if self.steps_done:
            raise RuntimeError(f"load_state_dict replays the recorded steps on a fresh Pruner, but this one has "
                               f"already done {self.steps_done} step(s); build a new Pruner from the original model")
        if len(state["keeps"]) > len(self.targets):
            raise ValueError(f"the state holds {len(state['keeps'])} pruning steps but this Pruner has only "
                             f"{len(self.targets)}: build it with the steps= of the run that saved the state")
        for keep in state["keeps"]:
            self.replay(keep)
        self.history = [dict(h) for h in state["history"]]
        if self.latency_share is not None and self.history:
            self.latency_share = self.history[-1]["latency"]  # what the next step's latency target is relative to
            self.elementwise = self.history[-1].get("elementwise", 0.0)
        if state.get("report") is not None and self.steps_done:
            self.gm.meta[REPORT] = state["report"]
        _load_criterion_state(self.criterion, state.get("criterion"))
        return self.gm

    def replay(self, keep: dict) -> fx.GraphModule:
        """Apply one recorded step: eliminate `keep` (group id -> kept indices, in
        the comb of the current graph) without scoring; the graph, its comb and the
        step count advance exactly as `step` advanced them."""
        keep = {int(g): idx for g, idx in keep.items()}
        slim = eliminate(self.gm, self.comb, keep)
        self.keeps.append(_plain_keep(keep))
        self.gm, self.comb = slim, comb_pass(slim)
        self.criterion.reset()
        self.steps_done += 1
        return slim


def to_latency(gm, comb, example_inputs, target: Target, goal: float, measured: Measured, latency_model,
               plan_options: dict, rounds: int = ROUNDS, slack: float = 0.03, accept: float = ACCEPT,
               tolerance: float = 0.0):
    """Solve to `target` on the latency tables, time the result in onnxruntime
    (`measured.share`: a share of the original's latency), fit the latency
    model's elementwise share to every result timed so far
    (`LatencyModel.calibrate`), and solve again on the fitted model with the
    target corrected by what was measured (the tables also miss what layers
    share: caches, fused ops; see _next_ask), up to `rounds` times or until a
    share lands within `slack` (a fraction of `goal`) of it. Returns (slim,
    plan, measured share, tried): of the results that `landed`, the one
    closest to the goal as a ratio, and every (asked, measured) pair. With
    rounds=1 (a step on the way to the last), the one result whatever it
    measured.

    A result lands when its speed-up is within `accept` of the one asked,
    either way; `tolerance` (a share, above accept) also lets one up to that
    much slower than asked be kept, never one faster by more than `accept`: a
    speed-up past the one asked is paid for in accuracy, and on a model
    whose time is mostly fixed per-op overhead the plan that overshoots is
    cut to a few percent of its MACs. Where nothing lands, a BudgetError
    names the speed-ups measured (see _missed).
    Where the tables say the target is out of reach, the smallest model they
    allow is measured all the same: they overrate what is fixed in a small
    model (every op alone pays onnxruntime's per-run overhead)."""
    asked, best, share, smallest, tried, macs = target.latency, None, None, False, [], []
    current = goal / target.latency  # the graph's own time as a share of the original's
    timed = []  # (counts, measured share of the graph's own time, asked, the plan's price when asked)
    for round_ in range(rounds):
        try:
            chosen, smallest = _plan_within_tables(gm, comb, example_inputs, replace(target, latency=asked),
                                                   latency_model, plan_options)
        except BudgetError:
            if round_ == 0:
                raise
            break  # the correction asked for more than the constraints allow
        slim = eliminate(gm, comb, chosen.keep)
        share = measured.share(slim)
        tried.append((asked, share))
        macs.append(chosen.after.macs / chosen.before.macs)
        timed.append((chosen.counts, share / current, asked, latency_model(chosen.counts)))
        latency_model.calibrate([(counts, own) for counts, own, _, _ in timed])
        closer = best is None or _miss(share, goal) < _miss(best[2], goal)
        if rounds == 1 or landed(share, goal, accept, tolerance) and closer:
            best = (slim, chosen, share)
        if abs(share - goal) <= slack * goal or smallest and share > goal:
            break
        # each ask re-priced by how much the refit changed the price of its plan, so that the pairs agree with
        # the model the next plan is solved on
        asked = _next_ask([(a * latency_model(counts) / price, own * current) for counts, own, a, price in timed],
                          goal, slack)
    if best is None:
        raise _missed(goal, [share for _, share in tried], macs, smallest, accept,
                      plan_options.get("rules") or Constraints())
    return (*best, tried)


def landed(share: float, goal: float, accept: float = ACCEPT, tolerance: float = 0.0) -> bool:
    """Whether a measured latency share is kept for the goal: its speed-up
    (1 / share) within `accept` of the one asked either way, or up to
    `tolerance` slower than asked (see to_latency)."""
    ratio = goal / share  # measured speed-up over the one asked
    return 1 - max(accept, tolerance) <= ratio <= 1 + accept


def _missed(goal: float, shares: list, macs: list, smallest: bool, accept: float, rules: Constraints) -> BudgetError:
    """The error of a latency budget that did not land: the speed-up asked,
    what each round's model measured and at what share of the MACs (where the
    share is far below the time's, the model is overhead-bound), and what to
    do about it."""
    rounds = sorted(zip((1 / s for s in shares), macs))
    measured = ", ".join(f"x{speedup:.2f} ({share:.1%} of the MACs)" for speedup, share in rounds)
    fastest = rounds[-1][0]
    if smallest and fastest < (1 - accept) / goal:
        reach = (f"the smallest model the constraints allow (min_keep={rules.min_keep}, every group at its "
                 f"minimum width) runs x{fastest:.2f} faster, so x{1 / goal:.2f} cannot be reached")
    else:
        reach = (f"none within {accept:.0%} of x{1 / goal:.2f}: where a model's time is mostly fixed per-op "
                 f"overhead (small inputs, few layers), a few channels more or less jump the speed-up past the "
                 f"one asked")
    closest = min((speedup for speedup, _ in rounds), key=lambda s: abs(math.log(s * goal)))
    short = 1 - closest * goal
    hint = (f"; or latency_options tolerance={math.ceil(short * 100) / 100:g} keeps the x{closest:.2f}"
            if accept < short <= 0.5 else "")  # the ceiling: a tolerance of exactly the miss may round below it
    return BudgetError(f"latency={goal:g} (x{1 / goal:.2f}) was not reached: in {len(rounds)} round(s) the pruned "
                       f"models measured {measured} in onnxruntime, and {reach}. Ask for a speed-up in the range "
                       f"measured, give a macs= budget, or time at a larger latency_options batch={hint}")


def _miss(share: float, goal: float) -> float:
    """How far a share is from the goal, as a ratio either way."""
    return abs(math.log(share / goal))


def _next_ask(tried: list, goal: float, slack: float) -> float:
    """The latency to ask the tables for next, from the (asked, measured) pairs
    so far. Once one ask measured under `goal` and a larger one over it, by
    false position between the closest two, kept off their ends: the plan is
    a step function of the ask (a block more or less of some layer), so a
    line through two pairs on one side can jump past the bracket. Before, on
    the secant through the last two pairs when it rises and they measured
    further apart than `slack` (a fraction of goal: closer is noise), no
    lower than half what scaling alone asks; else asked scaled by goal /
    measured."""
    under = [pair for pair in tried if pair[1] < goal]
    over = [pair for pair in tried if pair[1] > goal]
    if under and over and max(under)[0] < min(over)[0]:
        (a, s), (b, t) = max(under), min(over)
        return a + (b - a) * min(0.8, max(0.2, (goal - s) / (t - s)))
    b, t = tried[-1]
    scaled = b * goal / t
    if len(tried) > 1:
        a, s = tried[-2]
        if b != a and abs(t - s) > slack * goal and (t - s) / (b - a) > 0:
            return min(1.0, max(b + (goal - t) * (b - a) / (t - s), scaled / 2))
    return min(1.0, scaled)


def _plan_within_tables(gm, comb, example_inputs, target: Target, latency_model, plan_options):
    """(plan at target, False); or (plan at the smallest latency the tables
    allow, True) when target is below it; or, when the tables see no time to
    save at all (every layer at or under one channel block), (plan at the same
    share of the MACs, False), for the measurement to judge."""
    try:
        return plan(gm, comb, example_inputs, target, latency_model=latency_model, **plan_options), False
    except BudgetError as err:
        floor = err.reachable.get("latency")
        if floor is None or any(v > getattr(target, m) for m, v in err.reachable.items() if m != "latency"):
            raise
        if floor >= 1:
            macs = min(target.latency, target.macs or 1.0)
            return plan(gm, comb, example_inputs, Target(macs, target.params), **plan_options), False
        return plan(gm, comb, example_inputs, replace(target, latency=min(1.0, floor * (1 + 1e-9))),
                    latency_model=latency_model, **plan_options), True


def original_sizes(original: fx.GraphModule, gm: fx.GraphModule, comb) -> dict:
    """Each prunable group's size in `original`, the graph gm was pruned from,
    read off a parameter dim the group fills alone: elimination removes whole
    channels, so the dim shrank by the same factor as the group."""
    shapes = {name: p.shape for name, p in original.named_parameters()}
    sizes = {}
    for g in comb.prunable:
        for name, d, tensor, coords in group_slices(gm, comb, g):
            if name in shapes and (coords >= 0).all():
                sizes[g.id] = round(g.size * shapes[name][d] / tensor.shape[d])
                break
    return sizes


def _plain_keep(keep: dict) -> dict:
    """A keep set as plain ints (JSON- and checkpoint-friendly)."""
    return {int(g): [int(i) for i in idx] for g, idx in keep.items()}


def _criterion_state(criterion) -> dict | None:
    """What a gradient criterion has accumulated (its running sums and batch
    count); None for criteria that keep nothing between steps."""
    if not getattr(criterion, "needs_gradients", False) or not hasattr(criterion, "total"):
        return None
    return {"total": {int(g): np.array(v, dtype=np.float64, copy=True) for g, v in criterion.total.items()},
            "batches": int(criterion.batches)}


def _load_criterion_state(criterion, state: dict | None) -> None:
    if state is not None and hasattr(criterion, "total"):
        criterion.total = {int(g): np.array(v, dtype=np.float64, copy=True) for g, v in state["total"].items()}
        criterion.batches = int(state["batches"])


def _shares(target, steps, kind):
    return schedule(target, steps, kind) if target is not None else [None] * steps


def _relative(share, base, current):
    """A share of the original as a share of the current graph (at most 1)."""
    return None if share is None else min(1.0, share * base / current)


def slice_optimizer(optimizer: torch.optim.Optimizer, old: torch.nn.Module, new: torch.nn.Module,
                    kept: dict) -> None:
    """Point the optimizer at new's parameters, slicing every per-element state
    tensor (Adam moments, momentum buffers) exactly as the parameter was."""
    old_params = dict(old.named_parameters())
    by_id = {id(p): name for name, p in old_params.items()}
    new_params = dict(new.named_parameters())
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            name = by_id.get(id(p))
            if name is None or name not in new_params:
                continue
            q = new_params[name]
            state = optimizer.state.pop(p, None)
            if state is not None:
                optimizer.state[q] = {k: _slice_like(v, p, kept.get(name, {})) for k, v in state.items()}
            group["params"][i] = q


def _slice_like(value, param, dims):
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value  # step counters and other scalars
    for d, idx in dims.items():
        value = value.index_select(d, torch.as_tensor(idx, device=value.device))
    return value.clone()
