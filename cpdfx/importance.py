"""Channel importance: a score per channel of each prunable group.

An importance is a callable `(gm, comb) -> {group id: np.ndarray of scores}`;
larger means more important. Scores aggregate over every parameter slice the
group touches, so a channel's score reflects all the layers it lives in.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def group_slices(gm, comb, group, tensor_of=None):
    """Yield (per-position values along the dim, coords) for each parameter
    dim the group touches: coords map dim positions to the group's indices."""
    tensors = dict(gm.named_parameters())
    for name, d in group.params:
        if name not in tensors:
            continue  # buffers (running statistics) do not vote
        tensor = tensors[name] if tensor_of is None else tensor_of(name, tensors[name])
        if tensor is None:
            continue
        for atom, coords in comb.spaces.coords(comb.param_dims[name][d]):
            if atom == group.id:
                yield name, d, tensor, coords


def _per_position(tensor, d, reduce):
    t = tensor.detach().float().movedim(d, 0).reshape(tensor.shape[d], -1)
    return reduce(t).cpu().numpy().astype(np.float64)


def magnitude(p: int) -> Callable:
    """Group Lp magnitude: (sum over every touched slice of |w|^p)^(1/p)."""
    def score(gm, comb):
        scores = {}
        for group in comb.prunable:
            total = np.zeros(group.size)
            for _, d, tensor, coords in group_slices(gm, comb, group):
                values = _per_position(tensor, d, lambda t: t.abs().pow(p).sum(1))
                hit = coords >= 0
                np.add.at(total, coords[hit], values[hit])
            scores[group.id] = total ** (1.0 / p)
        return scores
    return score


def random_importance(seed: int = 0) -> Callable:
    def score(gm, comb):
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(g.size) for g in comb.prunable}
    return score


IMPORTANCES = {"l1": magnitude(1), "l2": magnitude(2), "random": random_importance()}


def resolve(importance) -> Callable:
    if callable(importance):
        return importance
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of "
                         f"{', '.join(sorted(IMPORTANCES))} or pass a callable (gm, comb) -> scores")
    return IMPORTANCES[importance]


def normalise(scores: dict) -> dict:
    """Divide each group's scores by their mean, so that groups of different
    sizes and depths compare on one global scale ("is this channel weaker than
    its peers?") rather than by raw magnitude, which varies with depth."""
    out = {}
    for gid, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        mean = s.mean()
        out[gid] = s / mean if mean > 0 else np.zeros_like(s)
    return out
