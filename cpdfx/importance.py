"""Channel importance: a score per channel of each prunable group.

A criterion scores every element (channel) of every prunable group, larger
meaning more important, by aggregating over every parameter slice the group
touches: a channel's score reflects all the layers it lives in (the producing
conv, its norm, the consumers' input columns, attention projections...).

Criteria come in two kinds:
- weight criteria (`l1`, `l2`, `bn_scale`, `random`) read the parameters;
- gradient criteria (`fisher`, `taylor`) accumulate weight x gradient over
  calibration or training batches: `accumulate(gm, comb)` after each backward.
  Per channel, the sum over its slices is the gradient of the loss with
  respect to a mask scaling the channel; fisher sums its square per batch,
  taylor its absolute value per batch.

`normalisation` says how scores of different groups are put on one scale
before the global ranking (see `normalise`):
- "mean": divide by the group's mean. Magnitudes grow or shrink with depth and
  fan-in, so only "weaker than its peers" compares across layers.
- "cost": divide by the cost one channel of the group carries (MACs or params,
  whichever the budget counts). Gradient criteria estimate the loss change of
  removing a channel, already one scale for all groups; per unit of cost they
  say which channels buy the most budget for the least loss (Group Fisher).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from .losses import cross_entropy, logits_of
from .ranks import sum_over_ranks

from .passes.comb import Inline
from .passes.ops import OPS, arg


def group_slices(gm, comb, group, tensors=None):
    """Yield (name, dim, tensor, coords) for each parameter dim the group
    touches: coords maps each position along the dim to the group's channel
    index (-1 where the position belongs to other groups)."""
    tensors = dict(gm.named_parameters()) if tensors is None else tensors
    for name, d in group.params:
        if name not in tensors:
            continue  # buffers (running statistics) do not vote
        for atom, coords in comb.spaces.coords(comb.param_dims[name][d]):
            if atom == group.id:
                yield name, d, tensors[name], coords


def per_channel(gm, comb, group, per_position: Callable, tensors=None) -> np.ndarray:
    """Sum per_position(tensor, dim) -> values along dim, over every slice of
    the group, into one value per channel of the group."""
    total = np.zeros(group.size)
    for _, d, tensor, coords in group_slices(gm, comb, group, tensors):
        values = per_position(tensor, d)
        hit = coords >= 0
        np.add.at(total, coords[hit], values[hit])
    return total


def _along(tensor, d, reduce) -> np.ndarray:
    t = tensor.detach().float().movedim(d, 0).reshape(tensor.shape[d], -1)
    return reduce(t).cpu().numpy().astype(np.float64)


class Criterion:
    """Base of the criteria: `scores(gm, comb) -> {group id: np.ndarray}`."""
    name = "criterion"
    needs_gradients = False
    normalisation = "mean"

    def reset(self) -> None:
        """Forget accumulated statistics (the graph changed)."""

    def accumulate(self, gm, comb) -> None:
        """Read the gradients of one backward pass (gradient criteria only)."""

    def scores(self, gm, comb) -> dict:
        raise NotImplementedError

    def __call__(self, gm, comb) -> dict:
        return self.scores(gm, comb)

    def __repr__(self):
        return self.name


class Magnitude(Criterion):
    """Group Lp magnitude: (sum over every touched slice of |w|^p)^(1/p)."""

    def __init__(self, p: int):
        self.p, self.name = p, f"l{p}"

    def scores(self, gm, comb):
        p = self.p
        return {g.id: per_channel(gm, comb, g, lambda t, d: _along(t, d, lambda x: x.abs().pow(p).sum(1))) ** (1 / p)
                for g in comb.prunable}


class NormScale(Criterion):
    """|gamma| of the norm layers in the group (network slimming). A group
    that no norm layer scales falls back to its L2 magnitude; "mean"
    normalisation puts both on one scale."""
    name = "bn_scale"

    def scores(self, gm, comb):
        gammas = _norm_weights(gm)
        l2 = Magnitude(2).scores(gm, comb)
        return {g.id: per_channel(gm, comb, g, _abs_sum, gammas) if any(n in gammas for n, _ in g.params)
                else l2[g.id] for g in comb.prunable}


def _abs_sum(tensor, d):
    return _along(tensor, d, lambda x: x.abs().sum(1))


def _norm_weights(gm) -> dict:
    """The gamma parameters of the graph's norm ops (the argument their op-table
    entry names `scale`), by name; those in wrapped sub-graphs too."""
    params = dict(gm.named_parameters())
    inline, names = Inline(gm), {}
    for node in inline.nodes:
        entry = OPS.get(node.target) if node.op == "call_function" else None
        if entry is not None and entry.scale is not None:
            w = inline.origin(arg(node, entry.scale))
            if getattr(w, "op", None) == "get_attr" and inline.target(w) in params:
                names[inline.target(w)] = params[inline.target(w)]
    return names


class Random(Criterion):
    """The baseline every report compares against."""
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, gm, comb):
        rng = np.random.default_rng(self.seed)
        return {g.id: rng.random(g.size) for g in comb.prunable}


class _GradientCriterion(Criterion):
    """Accumulates, per channel, the sum of weight x gradient over every slice
    of its group, once per backward pass: the gradient of the loss with
    respect to a mask that scales the whole channel."""
    needs_gradients = True
    normalisation = "cost"

    def __init__(self):
        self.reset()

    def reset(self):
        self.total, self.batches = {}, 0

    def accumulate(self, gm, comb):
        grads = {n: p * p.grad for n, p in gm.named_parameters() if p.grad is not None}
        if not grads:
            raise RuntimeError(f"{self.name} importance found no gradients: call accumulate after "
                               f"loss.backward() on the graph being pruned")
        with torch.no_grad():
            for g in comb.prunable:
                mask_grad = per_channel(gm, comb, g, lambda t, d: _along(t, d, lambda x: x.sum(1)), grads)
                self.total[g.id] = self.total.get(g.id, 0.0) + self._per_batch(mask_grad)
        self.batches += 1

    def scores(self, gm, comb):
        """The mean over the batches of every rank (under torch.distributed), so
        that all ranks score alike whatever data each saw: the sums and batch
        counts are added up over the ranks first (a collective: every rank
        scores). Under DDP the gradients read were already averaged over the
        ranks, so each rank's sums are the same and the mean does not change."""
        groups = list(comb.prunable)
        local = [np.asarray(self.total.get(g.id, np.zeros(g.size)), dtype=np.float64) for g in groups]
        summed = sum_over_ranks(np.concatenate(local + [np.array([self.batches], dtype=np.float64)]))
        batches = summed[-1]
        if not batches:
            raise RuntimeError(f"{self.name} importance has seen no batches: pass calibration= "
                               f"data, or accumulate gradients while training")
        totals = np.split(summed[:-1], np.cumsum([g.size for g in groups])[:-1])
        return {g.id: np.abs(t) / batches for g, t in zip(groups, totals)}


class Fisher(_GradientCriterion):
    """Group Fisher (CPD): the squared mask gradient, summed over batches."""
    name = "fisher"

    @staticmethod
    def _per_batch(mask_grad):
        return mask_grad ** 2


class Taylor(_GradientCriterion):
    """First-order Taylor: |mask gradient| of each batch, averaged over batches.
    The absolute value is taken per batch, not of the sum: on a converged model
    the signed gradients of different batches cancel (their mean is about the
    zero gradient of the training loss), leaving noise to rank by."""
    name = "taylor"

    @staticmethod
    def _per_batch(mask_grad):
        return np.abs(mask_grad)


class _Function(Criterion):
    """A user's callable (gm, comb) -> {group id: scores}."""

    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", "custom")

    def scores(self, gm, comb):
        return self.fn(gm, comb)


CRITERIA = {"l1": lambda: Magnitude(1), "l2": lambda: Magnitude(2), "bn_scale": NormScale,
            "fisher": Fisher, "taylor": Taylor, "random": Random}


def resolve(importance) -> Criterion:
    """A fresh criterion from a name, a Criterion, or a callable (gm, comb) -> scores."""
    if isinstance(importance, Criterion):
        return importance
    if callable(importance):
        return _Function(importance)
    if importance not in CRITERIA:
        raise ValueError(f"unknown importance {importance!r}; choose one of "
                         f"{', '.join(CRITERIA)} or pass a callable (gm, comb) -> scores")
    return CRITERIA[importance]()


def normalise(scores: dict, how: str = "mean", unit_cost: dict | None = None) -> dict:
    """Put every group's scores on one scale (see the module docstring)."""
    out = {}
    for gid, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if how == "cost":
            out[gid] = s / max(unit_cost[gid], 1e-12)
        else:
            mean = s.mean()
            out[gid] = s / mean if mean > 0 else np.zeros_like(s)
    return out


# -- gradients from calibration batches ----------------------------------------------------

def self_supervised_loss(output, target=None) -> torch.Tensor:
    """Cross-entropy against the labels when given, else against the model's
    own predictions (argmax over dim 1): no labels needed, and it works for
    classification (N, C) and segmentation (N, C, H, W) alike."""
    logits = logits_of(output).float()
    return cross_entropy(logits, logits.detach().argmax(1) if target is None else target.long())


def calibration_item(batch, n_inputs: int):
    """A calibration item as (inputs tuple, target or None): a tensor is one
    input; a tuple/list holds the inputs, then optionally one target."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, dict):
        return tuple(batch["inputs"]) if isinstance(batch["inputs"], (tuple, list)) else (batch["inputs"],), batch.get("target")
    batch = tuple(batch)
    if len(batch) == n_inputs:
        return batch, None
    if len(batch) == n_inputs + 1:
        return batch[:n_inputs], batch[n_inputs]
    raise ValueError(f"a calibration item holds {len(batch)} values; the model takes {n_inputs} "
                     f"input(s): give the inputs, optionally followed by one target")


def calibrate(criterion: Criterion, gm, comb, calibration: Iterable, n_inputs: int,
              loss_fn: Callable | None = None) -> None:
    """Run forward and backward on each calibration item and accumulate."""
    loss_fn = loss_fn or self_supervised_loss
    saved = {n: p.requires_grad for n, p in gm.named_parameters()}
    for p in gm.parameters():
        p.requires_grad_(True)
    try:
        for batch in calibration:
            inputs, target = calibration_item(batch, n_inputs)
            gm.zero_grad(set_to_none=True)
            loss_fn(gm(*inputs), target).backward()
            criterion.accumulate(gm, comb)
    finally:
        gm.zero_grad(set_to_none=True)
        for n, p in gm.named_parameters():
            p.requires_grad_(saved[n])
