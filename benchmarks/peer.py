"""Torch-Pruning (the peer) at its best, pruning inside the same distill run as cpdfx.

`TorchPruningCallback` is a cpdfx.distill callback: at the same optimizer
steps where compress's pruner steps, Torch-Pruning's MetaPruner (global
ranking, the classifier kept) prunes the student in place to the same
geometric schedule of MACs, its importance read from the training batches
since its last step:

- "taylor": GroupTaylorImportance on the mean gradient of those batches;
- "hessian": GroupHessianImportance (group OBD) on the mean squared gradient
  of those batches (accumulated here: the library's `accumulate_grad` keys
  its sums by name on write and by parameter on read, so it keeps only the
  last batch);
- "l2": GroupMagnitudeImportance, its data-free default.

MetaPruner takes a channel ratio, not a cost, so each step searches the ratio
(bisection on copies; the importance is deterministic given the gradients)
whose result lands closest to the step's target (counted by Torch-Pruning),
so that the result lands within about a point of cpdfx's MACs. The optimizer's state is sliced with the
weights, as compress does, so neither arm restarts its moments.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch_pruning as tp

from cpdfx.distill import Callback

IMPORTANCE = {
    "taylor": tp.importance.GroupTaylorImportance,
    "hessian": tp.importance.GroupHessianImportance,
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
}
SEARCH = 10  # bisection rounds per step: the ratio to ~1e-3


def macs_of(model: nn.Module, example: torch.Tensor) -> float:
    """Torch-Pruning's own MAC count (forward hooks; a capture per trial would
    cost seconds). The rows report cpdfx.cost's count of the result."""
    return float(tp.utils.count_ops_and_params(model, example)[0])


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear: the output layer, which no pruner may narrow."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


class TorchPruningCallback(Callback):
    """distill's callback pruning the student with Torch-Pruning after the
    optimizer steps `at`, to `macs` (a share of the original's MACs) along
    cpdfx's geometric schedule; `importance` names the criterion (IMPORTANCE);
    `events` records each step's ratio, target and the MACs it landed on."""

    def __init__(self, model: nn.Module, example: torch.Tensor, macs: float, at: list[int], importance: str,
                 round_to: int = 1):
        self.example, self.at, self.kind, self.round_to = example, list(at), importance, round_to
        self.base = macs_of(model, example)
        self.targets = [macs ** ((k + 1) / len(at)) for k in range(len(at))]  # cpdfx's geometric schedule
        self.sums, self.batches = {}, 0
        self.events: list[dict] = []

    # -- importance from the training batches -------------------------------------------

    def on_backward(self, student: nn.Module) -> None:
        if self.kind == "l2" or len(self.events) == len(self.at):
            return
        with torch.no_grad():
            for p in student.parameters():
                if p.grad is not None:
                    g = p.grad if self.kind == "taylor" else p.grad ** 2
                    self.sums[p] = self.sums[p] + g if p in self.sums else g.clone()
        self.batches += 1

    def _load_gradients(self, model: nn.Module) -> None:
        """p.grad := the statistic the importance reads (mean gradient, or mean squared gradient)."""
        for p in model.parameters():
            p.grad = self.sums[p] / self.batches if p in self.sums else None
        self.sums, self.batches = {}, 0

    # -- a step ---------------------------------------------------------------------------

    def _pruner(self, model: nn.Module, ratio: float) -> tp.pruner.MetaPruner:
        return tp.pruner.MetaPruner(model, self.example, importance=IMPORTANCE[self.kind](), pruning_ratio=ratio,
                                    global_pruning=True, ignored_layers=[classifier(model)],
                                    round_to=self.round_to if self.round_to > 1 else None)

    def _macs_at(self, model: nn.Module, ratio: float) -> float:
        trial = copy.deepcopy(model)
        for copied, p in zip(trial.parameters(), model.parameters()):  # deepcopy leaves .grad behind
            copied.grad = None if p.grad is None else p.grad.clone()
        self._pruner(trial, ratio).step()
        return macs_of(trial, self.example) / self.base

    def _ratio(self, model: nn.Module, target: float) -> float:
        """The ratio whose result lands closest to `target` (a share of the
        original MACs), either side: the two ends of a bisection for the
        smallest ratio at or under it. On a small model one step of the ratio
        moves several channels at once, and "at or under" alone landed up to
        2 points under cpdfx's MACs."""
        lo, hi = 0.0, 0.95
        share = {lo: macs_of(model, self.example) / self.base, hi: self._macs_at(model, hi)}
        if share[hi] > target:
            return hi
        for _ in range(SEARCH):
            mid = (lo + hi) / 2
            share[mid] = self._macs_at(model, mid)
            lo, hi = (lo, mid) if share[mid] <= target else (mid, hi)
        return min((hi, lo), key=lambda r: abs(share[r] - target))

    def on_step_end(self, step: int, student: nn.Module, optimizer) -> nn.Module | None:
        if step not in self.at:
            return None
        k = self.at.index(step)
        was_training = student.training
        student.eval()  # MetaPruner traces the model; its batch norm must not update
        if self.kind != "l2":
            self._load_gradients(student)
        ratio = self._ratio(student, self.targets[k])
        prune_with_state(self._pruner(student, ratio), student, optimizer)
        student.zero_grad(set_to_none=True)
        student.train(was_training)
        share = macs_of(student, self.example) / self.base
        self.events.append({"step": step, "ratio": ratio, "target": self.targets[k], "macs": share})
        return student


def prune_with_state(pruner, model: nn.Module, optimizer) -> None:
    """Prune group by group, replacing each changed parameter in the optimizer
    by the new one with its state (Adam's moments) sliced the same way."""
    for group in pruner.step(interactive=True):
        before = {}
        for dep, idxs in group:
            for name, p in dep.target.module.named_parameters(recurse=False):
                before.setdefault((dep.target.module, name), (p, sorted(set(idxs))))
        group.prune()
        for (module, name), (old, idxs) in before.items():
            new = getattr(module, name)
            if new is old and new.shape == old.shape:
                continue
            _replace(optimizer, old, new, idxs)


def _replace(optimizer, old: torch.Tensor, new: torch.Tensor, removed: list[int]) -> None:
    state = optimizer.state.pop(old, {})
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    shrunk = [d for d, (a, b) in enumerate(zip(old.shape, new.shape)) if a != b]
    sliced, removed = {}, set(removed)
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            for d in shrunk:
                keep = [i for i in range(value.shape[d]) if i not in removed] \
                    if value.shape[d] - len(removed) == new.shape[d] else None
                if keep is None:
                    raise RuntimeError(f"cannot tell which entries of a {tuple(old.shape)} -> {tuple(new.shape)} "
                                       f"parameter were removed")
                value = value.index_select(d, torch.tensor(keep, dtype=torch.long))
            assert value.shape == new.shape
        sliced[key] = value
    optimizer.state[new] = sliced
