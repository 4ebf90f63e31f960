"""Losses for distilling a pruned student from its unpruned teacher.

Classification: cross-entropy, logit KD (Hinton et al. 2015) and DIST (Huang et
al. 2022). Segmentation: cross-entropy with an ignore index, pixel-wise KD and
channel-wise distillation CWD (Shu et al. 2021). `DistillLoss` mixes a label
term with a distillation term, or uses distillation alone (labels=False), which
needs no labelled data at all: the teacher is the only supervision.

Models may return a tensor, a dict, a tuple or a transformers ModelOutput;
`logits_of` picks the logits. All losses are computed in float32 (students run
under bf16 autocast on GPUs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

IGNORE_INDEX = 255
KINDS = {"classification": ("kd", "dist"), "segmentation": ("kd", "cwd")}
DEFAULT_KIND = {"classification": "kd", "segmentation": "cwd"}
DEFAULT_TEMPERATURE = {"kd": 4.0, "dist": 1.0, "cwd": 4.0}
# the distillation term's weight, next to the label loss at weight 1; CWD's 3 (with T 4) was the best of
# T in {1, 4, 8} x alpha in {1, 3, 10} on validation (benchmarks/seg_proof.py select; RESULTS.md, issue 26)
DEFAULT_ALPHA = {"kd": 1.0, "dist": 1.0, "cwd": 3.0}
NO_MASS = -1e9  # a logit whose softmax share is exactly 0 (finite, so 0 * log 0 never turns up)


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: the output itself when it is a tensor, its
    `logits` attribute or key, else the first tensor in its pytree."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    tensors = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
    if not tensors:
        raise TypeError(f"the model output ({type(output).__name__}) holds no tensor to use as logits")
    return tensors[0]


def resize_to(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) logits to (H, W); a no-op at that size already."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def same_resolution(student: torch.Tensor, teacher: torch.Tensor):
    """Dense logits at one resolution: the coarser map is upsampled to the finer
    one (a SegFormer gives H/4, a U-Net H), so no prediction is averaged away."""
    if student.dim() < 3 or student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-2:].numel() < teacher.shape[-2:].numel():
        return resize_to(student, teacher.shape[-2:]), teacher
    return student, resize_to(teacher, student.shape[-2:])


def class_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) or (N, C, H, W) logits as rows of class scores: (N, C) or (N*H*W, C)."""
    return logits if logits.dim() == 2 else logits.movedim(1, -1).reshape(-1, logits.shape[1])


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy with labels, or with masks (N, H, W) that dense logits are
    upsampled to first; pixels marked ignore_index do not count."""
    logits = logits.float()
    if target.dim() == 3:
        logits = resize_to(logits, target.shape[-2:])
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened class distributions,
    times T^2 (so its gradients keep their size as T changes), averaged over
    samples, or over pixels for dense logits (pixel-wise KD)."""
    s, t = (class_rows(x.float()) for x in same_resolution(student, teacher))
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature ** 2


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of two (R, K) matrices."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST: match the teacher's relations, not its exact probabilities. Inter-class:
    1 - Pearson correlation of each sample's class probabilities; intra-class: the
    same per class across the batch. Robust when the student is much weaker."""
    s, t = (class_rows(x.float()) for x in same_resolution(student, teacher))
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    inter = 1 - pearson(p_s, p_t).mean()
    intra = 1 - pearson(p_s.T, p_t.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Channel-wise distillation: each channel's map is a distribution over the
    spatial positions (softmax with temperature); KL(teacher || student) per
    channel, times T^2, averaged over channels and samples. It makes the student
    put each class's mass where the teacher does. valid: an (N, H, W) bool
    mask of the positions that count (the labelled ones; the logits are
    resized to it); the others get no mass in either distribution."""
    s, t = same_resolution(student.float(), teacher.float())
    if valid is not None:
        s, t = resize_to(s, valid.shape[-2:]), resize_to(t, valid.shape[-2:])
        void = ~valid.unsqueeze(1)
        s, t = s.masked_fill(void, NO_MASS), t.masked_fill(void, NO_MASS)
    n, c = s.shape[:2]
    log_p_s = F.log_softmax(s.reshape(n * c, -1) / temperature, dim=1)
    log_p_t = F.log_softmax(t.reshape(n * c, -1) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * temperature ** 2 / (n * c)


DISTILL = {"kd": kd_loss, "dist": dist_loss, "cwd": cwd_loss}


class DistillLoss(nn.Module):
    """cross-entropy + alpha * distillation, or distillation alone when
    labels=False.

    The label loss keeps its full weight whatever alpha is, as in CPD and the
    CWD paper: the teacher term is added to supervised training, not traded
    against it, so alpha=0 is exactly plain training (compress's `plain` arm)
    and a comparison of the two changes one thing, the teacher term.

    task: "classification" (kind "kd" or "dist") or "segmentation" (kind "kd",
    pixel-wise, or "cwd"); temperature defaults to 4 for kd/cwd and 1 for dist,
    alpha to 1 for kd/dist and 3 for cwd (DEFAULT_ALPHA). CWD counts only the
    pixels the labels count (not ignore_index) when there are labels.
    `terms` gives the weighted parts by name (for logging); calling the module
    gives their sum."""

    def __init__(self, task: str = "classification", kind: str | None = None, alpha: float | None = None,
                 temperature: float | None = None, labels: bool = True, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if task not in KINDS:
            raise ValueError(f"task must be 'classification' or 'segmentation', not {task!r}")
        kind = kind or DEFAULT_KIND[task]
        if kind not in KINDS[task]:
            raise ValueError(f"distillation kind {kind!r} does not fit {task}: choose one of "
                             f"{', '.join(KINDS[task])}")
        alpha = DEFAULT_ALPHA[kind] if alpha is None else alpha
        if not alpha >= 0:
            raise ValueError(f"alpha={alpha} is the weight of the distillation term added to the cross-entropy "
                             f"and must be >= 0")
        self.task, self.kind, self.alpha, self.labels = task, kind, alpha, labels
        self.temperature = DEFAULT_TEMPERATURE[kind] if temperature is None else temperature
        self.ignore_index = ignore_index

    def terms(self, student_out, teacher_out, target=None) -> dict[str, torch.Tensor]:
        """The weighted loss terms, e.g. {"ce": ..., "kd": ...}; they sum to the loss.
        Without a teacher output (teacher_out None) it is cross-entropy alone."""
        s = logits_of(student_out)
        if self.labels and target is None:
            raise ValueError("DistillLoss(labels=True) needs the targets; for distillation from the "
                             "teacher alone, without labels, use labels=False")
        if teacher_out is None:
            if not self.labels:
                raise ValueError("with neither labels nor a teacher there is nothing to learn from")
            return {"ce": cross_entropy(s, target, self.ignore_index)}
        t = logits_of(teacher_out).detach()
        if self.kind == "cwd" and target is not None and target.dim() == 3:
            distill = cwd_loss(s, t, self.temperature, valid=target != self.ignore_index)
        else:
            distill = DISTILL[self.kind](s, t, self.temperature)
        if not self.labels:
            return {self.kind: distill}
        ce = cross_entropy(s, target, self.ignore_index)
        return {"ce": ce, self.kind: self.alpha * distill}

    def forward(self, student_out, teacher_out, target=None) -> torch.Tensor:
        return sum(self.terms(student_out, teacher_out, target).values())

    def extra_repr(self) -> str:
        return (f"task={self.task}, kind={self.kind}, alpha={self.alpha}, temperature={self.temperature}, "
                f"labels={self.labels}")
