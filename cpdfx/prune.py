"""Global pruning to a MACs, parameter or latency budget, in one call.

capture -> comb -> score (importance.py) -> solve (solve.py, to a budget.py
Target) -> eliminate. `prune` does it in one shot or in rounds (through
`Pruner`, pruner.py); a latency budget is solved on per-layer onnxruntime
tables and corrected by timing the result (latency.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from .passes import comb as comb_pass
from .passes import eliminate

from .batchnorm import reestimate_batch_norm
from .budget import BudgetError, Constraints, Target
from .capture import as_tuple, capture
from .importance import calibration_item, resolve
from .latency import LatencyModel, Measured
from .pruner import Pruner
from .report import REPORT, build_report
from .solve import plan, score


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
    target = Target(macs, params, latency)  # checked before the slow capture
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
        slim = _prune_in_steps(model, example_inputs, criterion, target, steps, calibration, loss_fn, rules,
                               bn_batches)
    else:
        slim = _prune_to_latency(model, example_inputs, criterion, target, calibration, loss_fn, rules,
                                 latency_options or {})
        reestimate_batch_norm(slim, bn_batches)
    if bn_batches:
        slim.meta[REPORT]["batch_norm_reestimated_on"] = sum(b[0].shape[0] for b in bn_batches)
    return slim


def _prune_in_steps(model, example_inputs, criterion, target, steps, calibration, loss_fn, rules, bn_batches):
    pruner = Pruner(model, example_inputs, criterion, macs=target.macs, params=target.params, steps=steps,
                    calibration=calibration, loss_fn=loss_fn, rules=rules)
    while not pruner.done:
        slim = pruner.step()
        reestimate_batch_norm(slim, bn_batches)
    return slim


def _prune_to_latency(model, example_inputs, criterion, target, calibration, loss_fn, rules, latency_options,
                      rounds=3, slack=0.02):
    """Solve on the latency tables, measure the result in onnxruntime, and
    solve again with the target corrected by what was measured (the tables
    miss what layers share: caches, fused ops, the non-conv rest), keeping the
    closest result that is not over target + slack."""
    gm = capture(model, example_inputs)
    groups = comb_pass(gm)
    batch, threads = latency_options.get("batch", 8), latency_options.get("threads")
    measured = Measured(gm, example_inputs, batch=batch, threads=threads)
    latency_model = LatencyModel(gm, groups, example_inputs, full_ms=measured.full_ms, **latency_options)
    options = dict(importance=criterion, rules=rules, latency_model=latency_model,
                   scores=score(criterion, gm, groups, example_inputs, calibration, loss_fn))
    latency, asked, best = target.latency, target.latency, None
    for round_ in range(rounds):
        try:
            chosen = plan(gm, groups, example_inputs, replace(target, latency=asked), **options)
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
    slim.meta[REPORT] = build_report(gm, slim, groups, chosen, criterion, target, example_inputs, latency_model)
    slim.meta[REPORT]["achieved"]["latency"] = share
    return slim
