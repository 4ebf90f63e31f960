"""Distillation training: the pruned student learns from the unpruned teacher.

`distill` is one loop for classification and segmentation, one process or many
(torchrun, DistributedDataParallel), with or without labels. It checkpoints
every epoch, and on Ctrl-C, so that `resume=True` continues exactly where the
run stopped; and it takes a callback, through which a step-wise pruner reads
gradients and swaps in a smaller student while training goes on.

A callback subclasses `Callback` and overrides what it needs (the base class's
methods do nothing):

    on_backward(student)                        after loss.backward(), before clipping
                                                and the optimizer step: gradients are
                                                there (averaged over ranks under DDP)
    on_batch(student, batch)                    what distill calls there: on_backward with
                                                the `Batch` the loss was computed on
                                                (inputs, target, teacher output, loss);
                                                the base class's calls on_backward(student)
    on_step_end(step, student, optimizer)       after the optimizer step; return a new,
        -> new student or None                  smaller student to train from now on,
                                                having re-bound the optimizer's params
                                                and sliced its state in place
    state_dict() -> dict                        saved in every checkpoint
    load_state_dict(state, student) -> student  on resume, before the student's weights
                                                are loaded: return the student in the
                                                shape the checkpoint was saved in

`student` is always the bare module (never the DDP wrapper), on the training
device, in train mode; `step` counts optimizer steps from 1. The optimizer's
param groups carry `param_names` (names in the student), with weight decay on
the weights (dim >= 2) and none on biases and norms.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .files import atomic_path, write_text
from .losses import IGNORE_INDEX, DistillLoss, logits_of, resize_to, same_resolution
from .ranks import all_reduce, shard

CHECKPOINT = "last.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = "cpdfx-distill/1"
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}
RESUME_MUST_MATCH = ("task", "epochs", "batch_size", "world_size", "seed", "optimizer")


@dataclass
class Batch:
    """A training batch as the loss saw it, for a callback that scores the
    samples themselves (per-sample Fisher): the student's inputs (a tuple),
    the targets (None without labels), the teacher's outputs (None without a
    teacher), and the loss: loss(student output, teacher output, target),
    averaged over the batch, so that loss applied to one sample's slices is
    that sample's own loss."""
    inputs: tuple
    target: torch.Tensor | None
    teacher: object
    loss: nn.Module


class Callback:
    """What `distill` calls on its callback (see the module docstring): this
    base class does nothing; a callback overrides the methods it needs."""

    def on_backward(self, student: nn.Module) -> None:
        pass

    def on_batch(self, student: nn.Module, batch: Batch) -> None:
        self.on_backward(student)

    def on_step_end(self, step: int, student: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, student: nn.Module) -> nn.Module:
        return student


def as_callback(callback) -> Callback:
    """A Callback for what distill was given: None does nothing, and an object
    that does not subclass Callback (written to the protocol alone) keeps its
    own methods, the base class's standing in for those it lacks."""
    if isinstance(callback, Callback):
        return callback
    adapted = Callback()
    for name in ("on_backward", "on_batch", "on_step_end", "state_dict", "load_state_dict"):
        if hasattr(callback, name):
            setattr(adapted, name, getattr(callback, name))
    return adapted


@dataclass
class DistillResult:
    """The trained student (in eval mode) and one record per epoch (what metrics.jsonl holds)."""
    student: nn.Module
    history: list = field(default_factory=list)


# -- processes and devices --------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place in a distributed run (rank 0 of 1 when there is none)."""
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_ranks(device_type: str) -> Ranks:
    """The process group: the one already initialised, or one started here when
    torchrun set WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs)."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size(), owns_group=True)
    return Ranks(dist.get_rank(), dist.get_world_size())


def pick_device(device) -> torch.device:
    """The device asked for, else this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def has_conv(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def shares_storage(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same tensors (cpdfx.capture's graph shares its model's)."""
    ptrs = {t.data_ptr() for t in [*a.parameters(), *a.buffers()] if t.numel()}
    return any(t.data_ptr() in ptrs for t in [*b.parameters(), *b.buffers()] if t.numel())


# -- data -------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, the same on every rank, each
    rank a strided share) that can start part-way through an epoch, for resuming.
    With one process per rank and batch b/world, step i of a distributed run sees
    exactly the samples of step i of a one-process run with batch b."""

    def __init__(self, dataset, ranks: Ranks, seed: int, batch: int):
        super().__init__(dataset, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch, self.skip = batch, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip * self.batch:])

    def __len__(self):
        return self.num_samples - self.skip * self.batch


def split_batch(batch):
    """(inputs, targets or None) from a batch: a tensor of images, an (images,
    targets) pair, or a dict with pixel_values/image and labels/label/mask."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("pixel_values", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("labels", "label", "mask", "masks") if k in batch), None)
        if x is None:
            raise ValueError(f"a dict batch needs the images under 'pixel_values' or 'image'; got keys {list(batch)}")
        return x, y
    return batch[0], (batch[1] if len(batch) > 1 else None)


def to_device(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _loader(dataset, batch: int, sampler, num_workers: int, device, seed: int, drop_last: bool) -> DataLoader:
    """A DataLoader whose worker seeds come from its own generator, not the global RNG."""
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


# -- metrics ----------------------------------------------------------------------------


def miou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes that occur in the targets or the predictions."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, data, *, task: str = "classification", batch_size: int = 64, device=None,
             teacher: nn.Module | None = None, amp: bool = False, channels_last: bool = False,
             ignore_index: int = IGNORE_INDEX, num_workers: int = 0, progress: bool = False) -> dict:
    """Top-1 accuracy (classification) or mIoU (segmentation; dense logits are
    upsampled to the masks, ignore_index pixels skipped) of model on data, in
    eval mode. Data without targets is scored against the teacher's predictions
    (key "top1_vs_teacher" / "miou_vs_teacher"). Under torch.distributed each rank
    scores its share and the counts are summed, so every rank gets the full result."""
    device = pick_device(device if device is not None else next(model.parameters(), torch.empty(0)).device)
    rank, world = shard()
    loader = _loader(data, batch_size, range(rank, len(data), world), num_workers, device, 0, drop_last=False)
    was_training = model.training
    model.eval()
    counts, versus = None, "labels"
    for batch in tqdm(loader, desc="val", leave=False, disable=not (progress and rank == 0)):
        x, y = split_batch(batch)
        x = to_device(x, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(model(x)).float()
            if y is None:
                if teacher is None:
                    raise ValueError("the validation data has no targets: give a teacher to score against")
                y, versus = _teacher_targets(logits, logits_of(teacher(x)).float()), "teacher"
        batch_counts = _counts(logits, y.to(device), task, ignore_index)
        counts = batch_counts if counts is None else counts + batch_counts
    model.train(was_training)
    if counts is None:
        raise ValueError("the validation data is empty")
    counts = all_reduce(counts)
    name = "top1" if task == "classification" else "miou"
    value = float(counts[0] / counts[1]) if task == "classification" else miou(counts)
    return {name if versus == "labels" else f"{name}_vs_teacher": value}


def _teacher_targets(student_logits, teacher_logits):
    return same_resolution(student_logits, teacher_logits)[1].argmax(1)


def _counts(logits: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int) -> torch.Tensor:
    """(correct, total) for classification; the confusion matrix (target x prediction) for segmentation."""
    if task == "classification":
        return torch.stack([(logits.argmax(1) == target).sum(), torch.tensor(target.numel(), device=target.device)])
    classes = logits.shape[1]
    pred = resize_to(logits, target.shape[-2:]).argmax(1)
    valid = (target != ignore_index) & (target >= 0) & (target < classes)
    index = target[valid] * classes + pred[valid]
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


# -- optimisation -----------------------------------------------------------------------


def make_optimizer(student: nn.Module, kind: str, lr: float, weight_decay: float, momentum: float):
    """AdamW or SGD (Nesterov momentum); decay on weights only, param names kept."""
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in params if p.dim() >= 2]
    no_decay = [(n, p) for n, p in params if p.dim() < 2]
    groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "weight_decay": wd}
              for named, wd in ((decay, weight_decay), (no_decay, 0.0)) if named]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {kind!r}")


def warmup_cosine(total: int, warmup: int):
    """lr factor per step: linear warm-up over `warmup` steps, then cosine decay
    towards zero at `total` (the last step still learns a little)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def warmup_steps(warmup, total: int) -> int:
    """warmup as steps (an int) or as a share of all steps (a float below 1)."""
    if isinstance(warmup, float) and 0 <= warmup < 1:
        return int(round(warmup * total))
    if isinstance(warmup, int) and warmup >= 0:
        return warmup
    raise ValueError(f"warmup={warmup!r}: give a number of steps (int >= 0) or a share of all steps (float in [0, 1))")


# -- checkpoints ------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a
    checkpoint, and one during the save (a second Ctrl-C) leaves no temporary file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def fingerprint(model: nn.Module | None, weights: bool = True) -> str | None:
    """A digest of a model's state: the names, shapes and dtypes of its tensors
    and, with weights, their values (not their device or memory format). A
    resumed run compares the teacher's and the student's architecture with the
    interrupted run's: another teacher (a model built again from new random
    weights) would silently make it another run."""
    if model is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if weights:
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_checkpoint(path: Path, config: dict, fingerprints: dict) -> dict:
    # our own file; it holds RNG states and the callback's state, which need full unpickling
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cpdfx distill checkpoint (format {state.get('format')!r})")
    check_same_run(state["config"], config, RESUME_MUST_MATCH)
    saved = state.get("fingerprints") or fingerprints  # checkpoints written before fingerprints were kept
    if saved["teacher"] != fingerprints["teacher"]:
        raise ValueError(f"cannot resume from {path}: the checkpoint was made with another teacher (its weights "
                         f"differ from those of the teacher given now, or one of the two runs had none), so the "
                         f"resumed run would learn from another model. Pass the same teacher, e.g. saved with "
                         f"cpdfx.save and given as its .pt2 file, or give a new out_dir to start afresh.")
    if saved["student"] != fingerprints["student"]:
        raise ValueError(f"cannot resume from {path}: the checkpoint was made from a student of another "
                         f"architecture (the names or shapes of its layers differ from those of the student given "
                         f"now). Pass the student the interrupted run started from, or give a new out_dir to "
                         f"start afresh.")
    return state


def check_same_run(saved: dict, now: dict, keys) -> None:
    """The one check of the settings a resumed run must share with the run that
    wrote the checkpoint (distill's, and a callback's such as compress's):
    with others, resuming would not continue that run."""
    differ = [f"{k}={saved.get(k)!r} there but {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"cannot resume: the checkpoint was written by a run with other settings "
                         f"({', '.join(differ)}). Resume with the settings of that run, or give a new out_dir "
                         f"to start afresh.")


class DeferredInterrupt:
    """Ctrl-C sets a flag that the loop reads between steps, so the checkpoint it
    then saves holds a consistent state; a second Ctrl-C stops at once. (Signals
    reach only the main thread; elsewhere nothing is installed.)"""

    def __init__(self):
        self.requested, self.installed = False, False
        self.previous = signal.default_int_handler

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nCtrl-C: stopping after this step, or after this evaluation, to save a checkpoint (Ctrl-C "
              "again to stop now, without one)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


# -- the loop ---------------------------------------------------------------------------


def distill(student: nn.Module, teacher: nn.Module | None, train_data, val_data=None, *, task: str = "classification",
            epochs: int = 1, batch_size: int = 64, lr: float | None = None, optimizer: str = "adamw",
            weight_decay: float = 0.05, momentum: float = 0.9, warmup=0.05, clip_grad: float | None = 1.0,
            loss: DistillLoss | dict | None = None, labels: bool = True, device=None, amp: bool | None = None,
            channels_last: bool | None = None, out_dir=None, resume: bool = False, seed: int = 0,
            callback: Callback | None = None, progress: bool = True, num_workers: int = 0) -> DistillResult:
    """Train `student` to match `teacher` on train_data and return the trained student.

    student: a cpdfx GraphModule (cpdfx.capture, cpdfx.prune) or any module; it
    is trained in place (train() switches a captured graph's batch norm and
    dropout). teacher: the original model, run in eval mode without gradients; if
    it shares weights with the student, the teacher is copied so that its
    targets stay fixed. teacher=None trains on the labels alone (plain
    supervised training, e.g. of a teacher).
    batch_size is the global batch: each of N ranks takes batch_size / N.
    lr defaults to 1e-3 for AdamW, 0.05 for SGD; the schedule is a per-step
    linear warm-up (`warmup`: steps, or a share of all steps) then cosine decay.
    loss: a DistillLoss, or a dict of its options; labels=False trains on the
    teacher alone and accepts data without targets.
    amp: bf16 autocast, by default on CUDA only; channels_last: by default on
    CUDA for models with convolutions.
    out_dir: where metrics.jsonl and the checkpoint last.pt go (rank 0 only);
    resume=True continues from out_dir/last.pt when there is one, given the
    same settings, teacher and student (as they were before training).
    callback: see the module docstring. Under torchrun (or an initialised
    process group) the student is wrapped in DistributedDataParallel.
    Validation (top-1 or mIoU) runs on val_data after each epoch."""
    config = dict(task=task, epochs=epochs, batch_size=batch_size, optimizer=optimizer, seed=seed,
                  lr=lr or DEFAULT_LR.get(optimizer), weight_decay=weight_decay, momentum=momentum,
                  warmup=warmup, clip_grad=clip_grad)
    run = _Run(student, teacher, train_data, val_data, config, loss=loss, labels=labels, device=device, amp=amp,
               channels_last=channels_last, out_dir=out_dir, callback=callback, progress=progress,
               num_workers=num_workers)
    try:
        run.setup(resume)
        run.train()
    finally:
        run.close()
    return DistillResult(run.student.eval(), run.history)


class _Run:
    """The state of one distillation run; `distill` is its public face."""

    def __init__(self, student, teacher, train_data, val_data, config, *, loss, labels, device, amp,
                 channels_last, out_dir, callback, progress, num_workers):
        if config["task"] not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', not {config['task']!r}")
        if config["lr"] is None:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {config['optimizer']!r}")
        self.config, self.train_data, self.val_data = config, train_data, val_data
        self.device = pick_device(device)
        self.ranks = join_ranks(self.device.type)
        self.config["world_size"] = self.ranks.world
        self.amp = self.device.type == "cuda" if amp is None else amp
        self.channels_last = channels_last
        self.loss = _make_loss(loss, config["task"], labels)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callback, self.progress, self.num_workers = as_callback(callback), progress, num_workers
        self.batch = self._per_rank_batch(config["batch_size"])
        self.student, self.teacher = student, self._freeze(teacher, student)
        self.history, self.replaced = [], []
        self.epoch = self.batch_in_epoch = self.step = 0
        self.running = {}

    # setup

    def _per_rank_batch(self, batch_size: int) -> int:
        if batch_size % self.ranks.world:
            raise ValueError(f"batch_size={batch_size} is the global batch and must divide evenly among the "
                             f"{self.ranks.world} ranks")
        per_rank = batch_size // self.ranks.world
        if len(self.train_data) // self.ranks.world < per_rank:
            raise ValueError(f"the training data has {len(self.train_data)} samples, fewer than one batch of "
                             f"{batch_size}: lower batch_size")
        return per_rank

    def _freeze(self, teacher: nn.Module | None, student: nn.Module) -> nn.Module | None:
        if teacher is None:
            return None
        if shares_storage(teacher, student):
            warnings.warn("the student shares its weights with the teacher, so training it also changes the "
                          "model object passed as teacher; distill trains against a frozen copy of the teacher. "
                          "Pass a copy (cpdfx.capture makes one) if the original must stay unchanged.", stacklevel=4)
            teacher = copy.deepcopy(teacher)
        teacher = teacher.to(self.device).eval()
        return self._memory_format(teacher)

    def _wants_channels_last(self, model: nn.Module) -> bool:
        return self.device.type == "cuda" and has_conv(model) if self.channels_last is None else self.channels_last

    def _memory_format(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self._wants_channels_last(model) else model

    def _prepare(self, student: nn.Module) -> nn.Module:
        """On the device, in the memory format chosen, in train mode; inputs follow its format."""
        self.channels_last_inputs = self._wants_channels_last(student)
        return self._memory_format(student.to(self.device)).train()

    def setup(self, resume: bool) -> None:
        torch.manual_seed(self.config["seed"])
        np.random.seed(self.config["seed"])
        random.seed(self.config["seed"])
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        # of the models as given (the student before a callback re-shapes it); only a checkpoint needs them
        self.fingerprints = None if path is None else {"teacher": fingerprint(self.teacher),
                                                       "student": fingerprint(self.student, weights=False)}
        state = (load_checkpoint(path, self.config, self.fingerprints) if resume and path is not None and path.exists()
                 else None)
        if state is not None and state["callback"] is not None:  # None in checkpoints from before Callback
            self.student = self.callback.load_state_dict(state["callback"], self.student)
        if state is not None:
            self.student.load_state_dict(state["student"])
        self.student = self._prepare(self.student)
        c = self.config
        self.optimizer = make_optimizer(self.student, c["optimizer"], c["lr"], c["weight_decay"], c["momentum"])
        self.steps_per_epoch = (len(self.train_data) // self.ranks.world) // self.batch
        total = self.steps_per_epoch * c["epochs"]
        self.factor = warmup_cosine(total, warmup_steps(c["warmup"], total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.factor)
        if state is not None:
            self._restore(state)
        elif self.out_dir is not None and self.ranks.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_log()  # a log left by an earlier run in out_dir goes
        self.model = self._wrap(self.student)

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch"], state["step"]
        self.running = {k: v.to(self.device) for k, v in state["running"].items()}
        self.history, self.replaced = state["history"], state["replaced"]
        set_rng_state(state["rng"])
        if self.ranks.main:  # the log may hold an epoch logged after the checkpoint was taken
            self._write_log()

    def _write_log(self) -> None:
        """metrics.jsonl as the history has it, one record per epoch; no file
        before the first record, so a run stopped early leaves no empty log."""
        path = self.out_dir / METRICS
        if self.history:
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
        else:
            path.unlink(missing_ok=True)

    def _wrap(self, student: nn.Module) -> nn.Module:
        if self.ranks.world == 1:
            return student
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=ids)

    # training

    def train(self) -> None:
        """Epoch after epoch, each trained, evaluated and checkpointed. Ctrl-C
        stops after the step it lands in, saving a checkpoint there (after an
        epoch's last step too: a run resumed from it finds no batch left and
        ends the epoch), or, landing in an epoch's evaluation, after the epoch's
        checkpoint."""
        with DeferredInterrupt() as interrupt:
            while self.epoch < self.config["epochs"]:
                self._train_epoch(interrupt)
                self._end_epoch()
                self._save()
                if self._stop_requested(interrupt):
                    self._interrupted()

    def _train_epoch(self, interrupt: DeferredInterrupt) -> None:
        data = self.train_data
        if hasattr(data, "set_epoch"):
            data.set_epoch(self.epoch)
        sampler = EpochSampler(data, self.ranks, self.config["seed"], self.batch)
        sampler.set_epoch(self.epoch)
        sampler.skip = self.batch_in_epoch
        loader = _loader(data, self.batch, sampler, self.num_workers, self.device, self.config["seed"] + self.epoch,
                         drop_last=True)
        self.started = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.config['epochs']}",
                   disable=not (self.progress and self.ranks.main))
        with bar:
            for batch in loader:
                terms = self._step(*split_batch(batch))
                self.batch_in_epoch += 1
                bar.update()
                if self.batch_in_epoch % 10 == 0 or self.batch_in_epoch == self.steps_per_epoch:
                    bar.set_postfix(loss=f"{float(sum(terms.values())):.4f}", lr=f"{self.last_lr:.2e}")
                if self._stop_requested(interrupt):
                    self._save()
                    self._interrupted()

    def _step(self, x, y) -> dict:
        x = to_device(x, self.device, self.channels_last_inputs)
        y = None if y is None or not self.loss.labels else y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
            target_out = None if self.teacher is None else self._teach(x)
            terms = self.loss.terms(out, target_out, y)
        self.optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        self.callback.on_batch(self.student, Batch((x,), y, target_out, self.loss))
        if self.config["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config["clip_grad"])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        terms = {k: v.detach() for k, v in terms.items()}
        for k, v in terms.items():
            self.running[k] = self.running.get(k, torch.zeros((), device=self.device)) + v
        new = self.callback.on_step_end(self.step, self.student, self.optimizer)
        if new is not None:
            self._adopt(new)
        return terms

    def _teach(self, x):
        """The teacher's outputs, computed in inference mode (no autograd
        bookkeeping at all: a quarter faster than no_grad on a small ResNet on
        CPU) and cloned out of it, since the loss saves them for its backward."""
        with torch.inference_mode():
            out = self.teacher(x)
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    @property
    def last_lr(self) -> float:
        """The lr of the last optimizer step, from the schedule (the scheduler
        has moved the optimizer's on to the next step's): so a run resumed
        after an epoch's last step logs it as the uninterrupted run did."""
        return self.scheduler.base_lrs[0] * self.factor(self.step - 1)

    def _adopt(self, new: nn.Module) -> None:
        """Train the callback's smaller student from the next step on."""
        self.student = self._prepare(new)
        self.model = self._wrap(self.student)
        self.replaced.append(self.step)

    def _stop_requested(self, interrupt: DeferredInterrupt) -> bool:
        """Whether any rank got Ctrl-C (all ranks must stop at the same step)."""
        if self.ranks.world == 1:
            return interrupt.requested
        flag = torch.tensor([float(interrupt.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _interrupted(self) -> None:
        """Stop, the checkpoint saved; the hint fits the Python API and the CLI alike."""
        if self.ranks.main:
            where = (f"checkpoint saved in {self.out_dir / CHECKPOINT}; resume with --resume (CLI) or resume=True "
                     f"(Python)" if self.out_dir is not None else "no out_dir, so nothing was saved")
            print(f"\ninterrupted at step {self.step}: {where}", file=sys.stderr)
        raise KeyboardInterrupt

    def _sync_buffers(self) -> None:
        """Rank 0's buffers on every rank. DDP sends them before each forward pass,
        which then updates them (batch norm's running statistics) from the rank's
        own batch: without this the ranks would evaluate, and end with, different
        models."""
        if self.ranks.world > 1:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, 0)

    def _end_epoch(self) -> None:
        self._sync_buffers()
        names = sorted(self.running)
        totals = all_reduce(torch.stack([self.running[k] for k in names] +
                                        [torch.tensor(float(self.batch_in_epoch), device=self.device)]))
        means = {k: float(totals[i] / totals[-1]) for i, k in enumerate(names)}
        loss = sum(means.values())
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} in epoch {self.epoch + 1}: lower lr, keep "
                                     f"clip_grad on, or turn amp off; the last checkpoint is from the epoch before")
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.last_lr, "loss": loss,
                  **means, "params": sum(p.numel() for p in self.student.parameters()),
                  "replaced_at": [s for s in self.replaced if s > self.step - self.batch_in_epoch],
                  "seconds": round(time.perf_counter() - self.started, 3)}
        if self.val_data is not None:
            scores = evaluate(self.student, self.val_data, task=self.config["task"], batch_size=self.batch,
                              device=self.device, teacher=self.teacher, amp=self.amp,
                              channels_last=self.channels_last_inputs, ignore_index=self.loss.ignore_index,
                              num_workers=self.num_workers, progress=self.progress)
            record.update({f"val_{k}": v for k, v in scores.items()})
        self.history.append(record)
        self.epoch, self.batch_in_epoch, self.running = self.epoch + 1, 0, {}
        if self.out_dir is not None and self.ranks.main:
            with open(self.out_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _save(self) -> None:
        """The checkpoint, written by rank 0; every rank waits until it is on
        disk, so that none stops (on Ctrl-C) and resumes before it is there."""
        if self.out_dir is not None and self.ranks.main:
            self._write_checkpoint()
        if self.ranks.world > 1:
            dist.barrier()

    def _write_checkpoint(self) -> None:
        state = {"format": CHECKPOINT_FORMAT, "config": self.config, "student": self.student.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": self.epoch, "batch": self.batch_in_epoch, "step": self.step,
                 "running": {k: v.cpu() for k, v in self.running.items()}, "rng": rng_state(),
                 "history": self.history, "replaced": self.replaced, "fingerprints": self.fingerprints,
                 "callback": self.callback.state_dict()}
        save_atomically(state, self.out_dir / CHECKPOINT)

    def close(self) -> None:
        if self.ranks.owns_group:
            dist.destroy_process_group()


def _make_loss(loss, task: str, labels: bool) -> DistillLoss:
    """The DistillLoss to use: the one given (its task and labels must agree), or one built from options."""
    if loss is None or isinstance(loss, dict):
        return DistillLoss(task, labels=labels, **(loss or {}))
    if loss.task != task or loss.labels != labels:
        raise ValueError(f"the loss was built for task={loss.task!r}, labels={loss.labels} but distill runs "
                         f"task={task!r}, labels={labels}: make them agree")
    return loss
