"""Channel importance: a score per channel of each prunable group.

A criterion scores every element (channel) of every prunable group, larger
meaning more important, by aggregating over every parameter slice the group
touches: a channel's score reflects all the layers it lives in (the producing
conv, its norm, the consumers' input columns, attention projections...).

Criteria come in two kinds:
- weight criteria (`l1`, `l2`, `bn_scale`, `random`) read the parameters;
- gradient criteria (`fisher`, `taylor`) score by the mask gradient: per
  channel, the gradient of the loss with respect to a mask scaling every
  parameter slice of the channel, which is the sum over its slices of
  weight x gradient.
  - `fisher` is Group Fisher as in CPD (and Liu et al. 2021): the mask
    gradient of each sample's own loss, squared, summed over the samples
    (`Fisher`, `per_sample_mask_gradients`). It reads the batch itself, not
    the gradients of a backward pass: `accumulate_samples(gm, comb, inputs,
    loss_fn, *loss_args)` per batch. It runs the graph in eval mode (batch
    norm on its running statistics), as one sample cannot be normalised by
    batch statistics, and scores the first `samples` (16) of each batch.
  - `Fisher(per_sample=False)` (`fisher_batch` by name) is the older, cheaper
    form: the square of the batch's mean mask gradient, from the gradients
    of the training backward pass (`accumulate(gm, comb)` after it).
  - `taylor`: |mask gradient| of each batch, from the backward pass,
    averaged over the batches.

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

import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils import _pytree as pytree

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


def gate_slices(gm, comb, groups) -> tuple[dict, int]:
    """Where a gate per channel of `groups` multiplies the graph's parameters:
    {parameter name: [(dim, index)]}, index mapping each position along dim
    to 1 + the channel's place among all the groups' channels (the groups in
    order, each group's channels in order), or to 0 where the position
    belongs to no gated channel; and the number of gates. With the gates
    laid out after a constant 1 (`gated`), every parameter slice of a
    channel is scaled by its gate, so the gradient of the loss with respect
    to a gate at 1 is that channel's mask gradient (the sum over its slices
    of weight x gradient). Buffers (running statistics) are not gated."""
    offsets = dict(zip([g.id for g in groups], np.cumsum([0] + [g.size for g in groups])[:-1].tolist()))
    slices: dict[str, list[tuple[int, np.ndarray]]] = {}
    params = dict(gm.named_parameters())
    for name, dims in comb.param_dims.items():
        if name not in params:
            continue
        for d, space in enumerate(dims):
            for atom, coords in comb.spaces.coords(space):
                if atom in offsets:
                    slices.setdefault(name, []).append((d, np.where(coords >= 0, coords + 1 + offsets[atom], 0)))
    return slices, int(sum(g.size for g in groups))


def gated(p: torch.Tensor, slices, flat: torch.Tensor) -> torch.Tensor:
    """p with each of its gated dims scaled: slices, [(dim, index tensor)] as
    gate_slices gives them for p; flat, the constant 1 followed by the gates."""
    for d, index in slices:
        shape = [1] * p.dim()
        shape[d] = -1
        p = p * flat[index].view(shape)
    return p


def per_sample_mask_gradients(gm, comb, groups, inputs: tuple, loss_fn: Callable, loss_args=(),
                              chunk: int = 16, vectorise: bool = True) -> dict:
    """Each sample's own mask gradient of every channel of `groups`:
    {group id: (N, channels) array}, the gradient of loss_fn(gm(one
    sample), *its loss_args) with respect to the channel's gate at 1
    (`gate_slices`). inputs: the graph's inputs, a batch along dim 0; loss_args:
    tensors split along dim 0 with them (targets, a teacher's outputs), or
    None. The graph runs in eval mode (batch norm on its running statistics,
    no dropout: a single sample has no batch statistics) and is left in the
    mode it was in; no parameter's .grad changes. The samples go through
    torch.func.vmap `chunk` at a time (their gated weights' gradients exist
    for the chunk at once); with vectorise=False, or where vmap cannot run
    the graph or the loss (with a warning), one at a time."""
    return _mask_gradients(gm, comb, groups, inputs, loss_fn, loss_args, chunk, vectorise)[0]


def _mask_gradients(gm, comb, groups, inputs, loss_fn, loss_args, chunk, vectorise):
    """per_sample_mask_gradients' work: (the gradients, whether vmap ran)."""
    slices, total = gate_slices(gm, comb, groups)
    params = {n: p.detach() for n, p in gm.named_parameters()}
    buffers = dict(gm.named_buffers())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    index = {n: [(d, torch.as_tensor(i, device=device)) for d, i in v] for n, v in slices.items()}
    flat = torch.ones(1 + total, device=device)
    leaves, spec = pytree.tree_flatten((tuple(inputs), tuple(loss_args)))
    n = next(t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0)
    batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n for t in leaves]

    def loss_of_one(gates, *one):
        one = [t.unsqueeze(0) if b else t for t, b in zip(one, batched)]
        x, args = pytree.tree_unflatten(one, spec)
        weights = {name: gated(p, index[name], gates) if name in index else p for name, p in params.items()}
        # copies of the buffers, made inside the transform: a graph captured in train mode still counts
        # batches in place in eval mode (by 0), which torch.func refuses on a tensor from outside
        weights.update({name: b.clone() for name, b in buffers.items()})
        return loss_fn(torch.func.functional_call(gm, weights, x), *args)

    grad = torch.func.grad(loss_of_one)
    training, rows = gm.training, None
    gm.eval()
    try:
        if vectorise:
            try:
                per_sample = torch.func.vmap(grad, in_dims=(None, *[0 if b else None for b in batched]))
                rows = [per_sample(flat, *[t[i:i + chunk] if b else t for t, b in zip(leaves, batched)])
                        for i in range(0, n, chunk)]
            except Exception as err:  # an op or a loss without a batching rule: one sample at a time
                first = next(iter(str(err).splitlines()), "")
                warnings.warn(f"per-sample mask gradients: torch.func.vmap cannot run this graph or loss "
                              f"({type(err).__name__}: {first}); scoring one sample at a time", stacklevel=3)
                rows = None
        vectorised = rows is not None
        if rows is None:
            rows = [grad(flat, *[t[i] if b else t for t, b in zip(leaves, batched)]).unsqueeze(0)
                    for i in range(n)]
    finally:
        if training:
            gm.train()
    g = torch.cat(rows).detach().double().cpu().numpy()[:, 1:]
    ends = np.cumsum([grp.size for grp in groups])
    return {grp.id: g[:, end - grp.size:end] for grp, end in zip(groups, ends)}, vectorised


class Criterion:
    """Base of the criteria: `scores(gm, comb) -> {group id: np.ndarray}`."""
    name = "criterion"
    needs_gradients = False
    per_sample = False  # scores from the batch itself (accumulate_samples), not from a backward pass's gradients
    normalisation = "mean"

    def reset(self) -> None:
        """Forget accumulated statistics (the graph changed)."""

    def accumulate(self, gm, comb) -> None:
        """Read the gradients of one backward pass (gradient criteria only)."""

    def accumulate_samples(self, gm, comb, inputs: tuple, loss_fn: Callable, *loss_args) -> None:
        """Score one batch from its samples (per-sample criteria only): inputs,
        the graph's inputs; loss_fn(output, *loss_args) the training loss,
        loss_args split along dim 0 with the inputs (or None)."""

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
    """Group Fisher (CPD; Liu et al. 2021, "Group Fisher Pruning"): per
    channel, the squared mask gradient of each sample's own loss, summed over
    the samples of a batch, averaged over the batches.

    per_sample=True (the default, `fisher`): `accumulate_samples` takes the
    batch and the training loss and computes every sample's mask gradients
    at once (`per_sample_mask_gradients`: gates at 1 on every slice of each
    channel, torch.func.vmap of the gates' gradient over the samples). The
    graph runs in eval mode there: batch norm normalises by its running
    statistics, since one sample has no batch statistics to normalise by (in
    train mode the samples of a batch are coupled through them, and no
    per-sample gradient exists; Group Fisher's reference code, reading
    activation x gradient per sample off the batch's backward, ignores that
    coupling likewise; so too a loss term that relates the samples of a
    batch, such as DIST's intra-class term, which is constant on one sample
    and adds nothing). Only the first `samples` of each batch are scored
    (None: all): an unbiased estimate of the sum over the batch up to one
    factor shared by every channel, which leaves the ranking alone, at a
    bounded cost per step (ResNetTiny at batch 64, one CPU thread: 16
    samples cost about 0.6 of a training step, all 64 about 2; ranked by 16 or
    all, Spearman 0.97: benchmarks/results/fisher_forms.json).
    `chunk` samples go through vmap at a time.

    per_sample=False (`fisher_batch`): the square of the batch's mean mask
    gradient, read off the gradients of the training backward pass
    (`accumulate` after loss.backward()): no extra pass, but a different
    statistic: it squares after averaging, so the samples' disagreement
    (which per-sample Fisher counts) cancels. Measured (fisher_forms.json),
    both in eval mode rank alike (Spearman 0.96); in train mode, as compress
    used it, the batch form ranks differently (0.59), batch norm's mode
    mattering more than the statistic."""

    def __init__(self, per_sample: bool = True, samples: int | None = 16, chunk: int = 16):
        if samples is not None and (not isinstance(samples, int) or samples < 1):
            raise ValueError(f"samples={samples!r}: give how many samples of each batch to score, or None for all")
        self.per_sample, self.samples, self.chunk = per_sample, samples, max(1, int(chunk))
        self.name = "fisher" if per_sample else "fisher_batch"
        self.vectorise = True
        super().__init__()

    def accumulate(self, gm, comb):
        if self.per_sample:
            raise RuntimeError("fisher scores each sample's own loss, so it needs the batch, not the gradients of "
                               "a backward pass: call accumulate_samples(gm, comb, inputs, loss_fn, *loss_args) "
                               "(Pruner.accumulate(gm, inputs=..., target=..., loss_fn=...)), or use "
                               "Fisher(per_sample=False) ('fisher_batch') to square the batch's gradient")
        super().accumulate(gm, comb)

    def accumulate_samples(self, gm, comb, inputs, loss_fn, *loss_args):
        if not self.per_sample:
            raise RuntimeError("Fisher(per_sample=False) reads the gradients of a backward pass: call "
                               "accumulate(gm, comb) after loss.backward()")
        inputs = tuple(inputs)
        if self.samples is not None:
            inputs, loss_args = pytree.tree_map(self._first, (inputs, tuple(loss_args)))
        groups = list(comb.prunable)
        grads, self.vectorise = _mask_gradients(gm, comb, groups, inputs, loss_fn, loss_args, self.chunk,
                                                self.vectorise)  # where vmap failed (it warned), loop from now on
        for g in groups:
            self.total[g.id] = self.total.get(g.id, 0.0) + (grads[g.id] ** 2).sum(0)
        self.batches += 1

    def _first(self, t):
        return t[:self.samples] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

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
            "fisher": Fisher, "fisher_batch": lambda: Fisher(per_sample=False), "taylor": Taylor,
            "random": Random}


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
    """Accumulate on each calibration item: a per-sample criterion from the
    batch itself, a gradient criterion after a forward and backward pass."""
    loss_fn = loss_fn or self_supervised_loss
    if criterion.per_sample:
        for batch in calibration:
            inputs, target = calibration_item(batch, n_inputs)
            criterion.accumulate_samples(gm, comb, inputs, loss_fn, target)
        return
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
