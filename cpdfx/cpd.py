"""CPD's step-wise schedule inside distill: the optimizer steps after which
the pruner steps (`prune_points`, among the steps `total_steps` counts) and
distill's callback that steps it (`PruneCallback`). compress runs it; the
learned structure (cpdfx.learned) cuts through the same callback.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .distill import Batch, Callback, check_same_run
from .losses import logits_of
from .pruner import Pruner
from .ranks import world

# what a resumed run must share with the one that saved the checkpoint, beyond distill's own settings
RESUME_KEYS = ("macs", "params", "latency", "importance", "prune_steps", "prune_share", "schedule", "round_to",
               "runtime", "min_keep", "plain", "learned")


def prune_points(total_steps: int, prune_share: float, prune_steps: int) -> list[int]:
    """The optimizer steps (counted from 1) after which the pruner steps:
    `prune_steps` points evenly spaced over the first `prune_share` of training,
    the last at its end, so importance is gathered before the first cut."""
    if not 0 < prune_share <= 1:
        raise ValueError(f"prune_share={prune_share!r}: give the share of the training steps during which "
                         f"pruning happens, in (0, 1], e.g. 0.5 for the first half")
    if not isinstance(prune_steps, int) or prune_steps < 1:
        raise ValueError(f"prune_steps={prune_steps!r}: give a positive number of pruning steps")
    phase = int(round(prune_share * total_steps))
    if phase < prune_steps:
        raise ValueError(f"{prune_steps} pruning steps do not fit in the {phase} optimizer steps of the pruning "
                         f"phase ({prune_share:g} of {total_steps}): train longer (epochs), use a smaller "
                         f"batch_size, fewer prune_steps or a larger prune_share")
    return [int(round(phase * k / prune_steps)) for k in range(1, prune_steps + 1)]


def total_steps(n_samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a distill run: as distill counts them (drop_last, per rank)."""
    n = world()
    return (n_samples // n) // (batch_size // n) * epochs


class PruneCallback(Callback):
    """distill's callback for the CPD schedule: importance from every training
    batch (fisher: its samples, on the distillation loss; gradient criteria:
    its backward pass), a pruner step after each step in `at`. Its state is the pruner's (the keep sets of the steps
    done and the importance gathered since the last), so a resumed run
    rebuilds the pruned structure before the checkpoint's weights are loaded."""

    def __init__(self, pruner: Pruner, at: list[int], config: dict):
        self.pruner, self.at, self.config = pruner, list(at), dict(config)
        self.events: list[dict] = []

    def on_batch(self, student: nn.Module, batch: Batch) -> None:
        """A per-sample criterion (fisher) scores the batch's samples on the
        training loss, each against its own teacher output and target; others
        read the gradients (on_backward)."""
        if not self.pruner.criterion.per_sample:
            self.on_backward(student)
        elif not self.pruner.done:
            teacher = None if batch.teacher is None else logits_of(batch.teacher)
            self.pruner.accumulate(student, batch.inputs, teacher, batch.target, loss_fn=batch.loss)

    def on_backward(self, student: nn.Module) -> None:
        if not self.pruner.done:
            self.pruner.accumulate(student)

    def on_step_end(self, step: int, student: nn.Module, optimizer) -> nn.Module | None:
        if step not in self.at or self.pruner.done:
            return None
        return self._prune(step, optimizer)

    def _prune(self, step: int, optimizer) -> fx.GraphModule:
        """One pruner step; the optimizer's params and state are sliced in place,
        its param_names stay right (elimination keeps every parameter's name)."""
        slim = self.pruner.step(optimizer)
        record = self.pruner.history[-1]
        self.events.append({"step": step, **{k: v for k, v in record.items() if k != "step"}})
        return slim

    def state_dict(self) -> dict:
        return {"config": self.config, "pruner": self.pruner.state_dict(), "events": list(self.events)}

    def load_state_dict(self, state: dict, student: nn.Module) -> nn.Module:
        check_same_run(state["config"], self.config, RESUME_KEYS)
        self.events = list(state["events"])
        slim = self.pruner.load_state_dict(state["pruner"])  # also the importance gathered since the last step
        return slim if state["pruner"]["keeps"] else student
