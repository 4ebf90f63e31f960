"""Is the teacher trained? Distillation passes on what the teacher knows: a
teacher at chance level (random weights: a model built by name, or trained
weights that never reached it) teaches nothing, and a slim model that then
scores above it reads as a gain.

`check_teacher` scores the teacher on at most CHECK_IMAGES validation images
(a fixed random sample; `cpdfx compress` and `cpdfx distill` give it the val
split, held out of the training data, so the test split stays unread until
the final scores) and compares it with chance: the score of always
predicting the most frequent class of those images (top-1: that class's share
of the images, 1/classes on balanced data; mIoU: its share of the labelled
pixels, divided by the number of classes the masks hold). A teacher counts as
trained from

    bar = chance + max(min(chance / 2, 0.10), 3 standard errors of a chance-level top-1),
          but never more than halfway from chance to 100%

up: 1.5x chance where chance is small (15% top-1 for ten balanced classes),
no more than 10 points above it where chance is large (60% for two), and, for
many classes, above what a model at chance scores by luck on that many images
(0.4% for 1000 classes on 1000 images, where 1.5x chance is 0.15%).
`train_teacher` trains one on the labels, as the demo trains its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import Subset

from .distill import distill, evaluate, split_batch
from .losses import IGNORE_INDEX

CHECK_IMAGES = 1000
MARGIN, MAX_MARGIN, STANDARD_ERRORS = 0.5, 0.10, 3
METRIC_NAMES = {"top1": "top-1", "miou": "mIoU"}


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher's score on `images` validation images, chance on them, and
    the bar a trained teacher clears (see the module docstring)."""
    metric: str
    score: float
    chance: float
    bar: float
    images: int

    @property
    def trained(self) -> bool:
        return self.score >= self.bar

    def describe(self) -> str:
        return (f"{METRIC_NAMES[self.metric]} {self.score:.1%} on {self.images:,} validation images (chance "
                f"{self.chance:.1%}; a trained teacher scores {self.bar:.1%} or more)")


def check_teacher(model: nn.Module, val_data, *, task: str = "classification", images: int = CHECK_IMAGES,
                  batch_size: int = 64, device=None, seed: int = 0) -> TeacherCheck:
    """The teacher's score against chance on at most `images` of val_data (a
    validation split, not the test split the final scores are read on)."""
    sample = sample_of(val_data, images, seed)
    metric = "top1" if task == "classification" else "miou"
    score = evaluate(model, sample, task=task, batch_size=batch_size, device=device)[metric]
    chance = chance_score(sample, task)
    noise = (STANDARD_ERRORS * math.sqrt(chance * (1 - chance) / len(sample))
             if task == "classification" else 0.0)
    margin = min(max(min(MARGIN * chance, MAX_MARGIN), noise), (1 - chance) / 2)
    return TeacherCheck(metric, score, chance, chance + margin, len(sample))


def sample_of(data, images: int, seed: int = 0):
    """data, or a fixed random sample of `images` of it (a folder's items come
    sorted by class: its first images would all be of one)."""
    if len(data) <= images:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, order[:images].tolist())


def chance_score(data, task: str, ignore_index: int = IGNORE_INDEX) -> float:
    """The score of always predicting data's most frequent class (see the module docstring)."""
    counts = torch.zeros(0, dtype=torch.long)
    for i in range(len(data)):
        _, target = split_batch(data[i])
        if target is None:
            raise ValueError("the validation data has no targets: a teacher cannot be checked without them")
        target = torch.as_tensor(target).reshape(-1)
        target = target[(target >= 0) & (target != ignore_index)]
        found = torch.bincount(target)
        counts = torch.nn.functional.pad(counts, (0, max(0, len(found) - len(counts))))
        counts[:len(found)] += found
    if counts.sum() == 0:
        raise ValueError("the validation data has no labelled images: a teacher cannot be checked on it")
    share = float(counts.max() / counts.sum())
    return share if task == "classification" else share / int((counts > 0).sum())


def train_teacher(model: nn.Module, train_data, val_data, *, task: str = "classification", epochs: int,
                  **distill_options) -> tuple[nn.Module, dict]:
    """model trained on the labels of train_data for `epochs` (cpdfx.distill
    with no teacher) and its last epoch's record (val_top1 / val_miou)."""
    result = distill(model, None, train_data, val_data, task=task, epochs=epochs, **distill_options)
    return result.student.eval(), result.history[-1] if result.history else {}
