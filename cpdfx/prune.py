"""Global pruning to a MACs, parameter or latency budget, in one call.

capture -> comb -> score (importance.py) -> solve (solve.py, to a budget.py
Target) -> eliminate. `prune` does it in one round or several, through
`Pruner` (pruner.py); a latency budget is solved on per-layer onnxruntime
tables (latency.py) and corrected by timing the result (pruner.to_latency).
"""
from __future__ import annotations

import torch.fx as fx

from .batchnorm import reestimate_batch_norm
from .budget import BudgetError, Constraints, Target
from .capture import as_tuple
from .importance import calibration_item, resolve
from .pruner import Pruner
from .report import REPORT


def prune(model, example_inputs, *, macs=None, params=None, latency=None, importance="l2",
          calibration=None, loss_fn=None, steps: int = 1, reestimate_bn: bool = True, ignore=(),
          overrides=None, min_keep=1, round_to: int | None = None, runtime: str = "cpu",
          latency_options: dict | None = None) -> fx.GraphModule:
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
        worth changes as its neighbours go; one round cannot see that);
    reestimate_bn: after each round, re-estimate the batch-norm running
        statistics on the calibration inputs (see batchnorm.py); only when
        calibration is given. The slim model then differs from the masked
        original in those statistics;
    ignore, overrides, min_keep, round_to, runtime: see `Constraints`; by default
        the pruned widths are multiples of the runtime's channel block (16 or 8
        on onnxruntime's CPU, 8 on CUDA), finer only where the budget needs it;
    latency: onnxruntime time on this machine (on the `runtime`'s provider),
        at latency_options "batch" (default 8) and "threads"; solved as a
        knapsack of importance per unit of time on per-layer tables
        (latency.LatencyModel, which takes the other latency_options), then
        checked by timing the result and solved again with the target
        corrected by what was measured (report "achieved" "latency"). The
        result lands within 7% of the speed-up asked (1 / latency), either
        way, or the call raises a BudgetError naming the speed-ups measured;
        latency_options "tolerance" (a share) also keeps a result up to that
        much slower than asked, never one more than 7% faster. With
        latency_options "int8": True the model is timed as it ships in int8
        (the layer tables quantized, each result quantized and timed against
        the fp32 original): latency is then the slim int8 model's share of the
        fp32 original's time (quantize the result with cpdfx.quantize).
    slim.meta["cpdfx_kept"] maps parameter names to {dim: kept indices};
    slim.meta["cpdfx_report"] is the pruning report (see report.py)."""
    target = Target(macs, params, latency)  # checked before the slow capture
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BudgetError(f"steps={steps!r}: give a positive number of pruning rounds")
    rules = Constraints(tuple(ignore), dict(overrides or {}), min_keep, round_to, runtime)
    calibration = list(calibration) if calibration is not None else None
    n_inputs = len(as_tuple(example_inputs))
    bn_batches = ([calibration_item(b, n_inputs)[0] for b in calibration]
                  if reestimate_bn and calibration is not None else [])
    pruner = Pruner(model, example_inputs, resolve(importance), macs=target.macs, params=target.params,
                    latency=target.latency, steps=steps, calibration=calibration, loss_fn=loss_fn, rules=rules,
                    latency_options=latency_options)
    while not pruner.done:
        slim = pruner.step()
        reestimate_batch_norm(slim, bn_batches)
    if bn_batches:
        slim.meta[REPORT]["batch_norm_reestimated_on"] = sum(b[0].shape[0] for b in bn_batches)
    return slim

