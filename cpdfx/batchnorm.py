"""Batch-norm statistics re-estimated after pruning.

Removing channels changes what every later layer sees, but the running means
and variances of the batch norms were measured on the unpruned model: in eval
mode the slim model normalises with stale statistics, and a model pruned hard
can fall to chance for that reason alone. Re-estimating them on a few hundred
unlabelled images (train-mode forwards without gradients; no weight changes)
is adaptive batch norm as in EagleEye (Li et al., 2020).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from .passes.comb import Inline
from .passes.ops import OPS, arg, set_arg


def _is_batch_norm(node) -> bool:
    """Its op-table entry has running statistics and a train/eval argument."""
    entry = OPS.get(node.target) if node.op == "call_function" else None
    return entry is not None and entry.running_stats is not None and entry.mode is not None


def _stat(node, i):
    """The node's running mean (0) or variance (1) argument."""
    return arg(node, OPS[node.target].running_stats[i])


def batch_norms(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's batch-norm nodes that keep running statistics, those in
    wrapped sub-graphs too (passes.comb.Inline)."""
    return [n for n in Inline(gm).nodes if _is_batch_norm(n) and _stat(n, 0) is not None]


def _buffer(gm: fx.GraphModule, inline: Inline, node: fx.Node) -> torch.Tensor:
    """The buffer a statistic argument reads, followed out of sub-graphs."""
    return gm.get_buffer(inline.target(inline.origin(node)))


@torch.no_grad()
def reestimate_batch_norm(gm: fx.GraphModule, batches: Iterable[tuple]) -> int:
    """Replace the running statistics of gm's batch norms by their average
    over `batches` (tuples of inputs), each batch weighted by its size (for
    batches of one size, what torch's momentum=None computes). Only the batch
    norms switch to batch statistics while the batches run: dropout and the
    rest of the graph keep their mode. Returns the number of samples seen
    (0, and nothing changed, when there were none or no batch norm). An
    error or interrupt midway, or statistics that come out non-finite
    (ValueError), leave them as they were."""
    norms, inline = batch_norms(gm), Inline(gm)
    if not norms:
        return 0
    buffers = {n: (_buffer(gm, inline, _stat(n, 0)), _buffer(gm, inline, _stat(n, 1))) for n in norms}
    sums = {n: [torch.zeros_like(mean, dtype=torch.float64), torch.zeros_like(var, dtype=torch.float64)]
            for n, (mean, var) in buffers.items()}
    originals = {n: (mean.clone(), var.clone()) for n, (mean, var) in buffers.items()}
    saved = {n: (n.args, dict(n.kwargs)) for n in norms}
    for n in norms:
        entry = OPS[n.target]
        set_arg(n, entry.mode[0], True)  # training: batch statistics
        set_arg(n, entry.running_stats[2], 1.0)  # momentum 1: the running buffers then hold each batch's own
    _recompile(inline)
    seen = 0
    try:
        for inputs in batches:
            gm(*inputs)
            size = inputs[0].shape[0]
            for n, (mean, var) in buffers.items():
                sums[n][0] += size * mean.double()
                sums[n][1] += size * var.double()
            seen += size
        for n in norms:
            if seen and not all(torch.isfinite(t).all() for t in sums[n]):
                raise ValueError(f"re-estimating batch-norm statistics gave non-finite values for "
                                 f"{inline.target(inline.origin(_stat(n, 0)))}: a batch of one sample has no variance "
                                 f"where a batch norm sees one value per channel (after pooling); use "
                                 f"calibration batches of two or more samples, or reestimate_bn=False")
    except BaseException:
        seen = 0  # a failed or interrupted pass leaves the statistics as they were
        raise
    finally:
        for n, (args, kwargs) in saved.items():
            n.args, n.kwargs = args, kwargs
        _recompile(inline)
        for n, (mean, var) in buffers.items():  # the average, or as before when nothing ran through
            mean.copy_(sums[n][0] / seen if seen else originals[n][0])
            var.copy_(sums[n][1] / seen if seen else originals[n][1])
    return seen


def _recompile(inline: Inline) -> None:
    for module in inline.modules:
        module.recompile()
