"""Ctrl-C at every point of a run: the first step, a middle step, an epoch's
last step, between epochs, during an evaluation, during a pruning step. Each
leaves a checkpoint (and nothing half-written) from which the resumed run ends
exactly as the uninterrupted one did; a resume with another teacher or student
is refused."""
import json
import os
import signal

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cpdfx.compress import compress
from cpdfx.distill import Callback, distill
from cpdfx.pruner import Pruner

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(epochs=2, batch_size=8, lr=1e-2, warmup=2, progress=False)  # 32 samples: steps 1-4, 5-8
X = torch.randn(2, 1, 8, 8)


class Trap:
    """Sends Ctrl-C (SIGINT to this process) once, at its point of the run: the
    hooks report (where, count) to it; Trap() never fires."""

    def __init__(self, where=None, at=None):
        self.point, self.fired = (where, at), False

    def hit(self, where, count):
        if (where, count) == self.point and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


class Images(Dataset):
    """Random 8x8 images in 4 classes; noise > 0 adds an augmentation drawn from
    the global RNG (which resume must restore). Reports each read and each
    epoch start (set_epoch, which distill calls) to the trap."""

    def __init__(self, name, n, seed, trap, noise=0.0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
        self.name, self.trap, self.noise, self.reads = name, trap, noise, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        self.trap.hit(f"{self.name} read", self.reads)
        return self.x[i] + self.noise * torch.randn_like(self.x[i]), self.y[i]

    def set_epoch(self, epoch):
        self.trap.hit(f"{self.name} epoch", epoch)


class StepHook(Callback):
    """Reports each optimizer step to the trap."""

    def __init__(self, trap):
        self.trap = trap

    def on_step_end(self, step, student, optimizer):
        self.trap.hit("step", step)


def net(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(width * 64, 4))


def run_distill(out, trap=None, resume=False, teacher_seed=1, width=4):
    trap = trap or Trap()
    return distill(net(width, 0), net(8, teacher_seed).eval(), Images("train", 32, 0, trap, noise=0.1),
                   Images("val", 16, 1, trap), out_dir=out, resume=resume, callback=StepHook(trap), **RUN)


def run_compress(out, resume=False):
    return compress(net(8, 1).eval(), X, Images("train", 32, 0, Trap(), noise=0.1), Images("val", 16, 1, Trap()),
                    macs=0.5, prune_steps=2, out_dir=out, resume=resume, **RUN)  # prunes after steps 2 and 4


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(a, b, out_a, out_b):
    """The same trained weights, the same epoch records (but the time) and metrics.jsonl."""
    wa, wb = (weights(r.model if hasattr(r, "model") else r.student) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    timeless = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.history] for r in (a, b)]
    assert timeless[0] == timeless[1]
    logs = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            for out in (out_a, out_b)]
    assert logs[0] == logs[1] == [h["loss"] for h in b.history]


def assert_only_checkpoint_and_log(out):
    """last.pt, and metrics.jsonl once an epoch was logged: nothing temporary, half-written or empty."""
    log = out / "metrics.jsonl"
    assert sorted(os.listdir(out)) == ["last.pt"] + (["metrics.jsonl"] if log.exists() else [])
    assert not log.exists() or log.read_text().strip()  # no empty log from a run stopped before an epoch ended
    assert log.exists() or not torch.load(out / "last.pt", weights_only=False)["history"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    return run_distill(out), out


# (where, count, the step the checkpoint is taken after); an epoch is steps 1-4, its evaluation reads 16 samples
POINTS = {"first step": ("step", 1, 1), "middle step": ("step", 2, 2), "last step of an epoch": ("step", 4, 4),
          "last step of the run": ("step", 8, 8), "between epochs": ("train epoch", 1, 5),
          "during an evaluation": ("val read", 5, 4), "during the last evaluation": ("val read", 21, 8)}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_anywhere_resumes_to_the_uninterrupted_result(reference, tmp_path, capsys, point):
    """Ctrl-C between epochs is acted on after the next step; during an
    evaluation, after the epoch's checkpoint."""
    where, count, step = POINTS[point]
    trap = Trap(where, count)
    with pytest.raises(KeyboardInterrupt):
        run_distill(tmp_path, trap)
    assert trap.fired and torch.load(tmp_path / "last.pt", weights_only=False)["step"] == step
    assert "resume with --resume (CLI) or resume=True (Python)" in capsys.readouterr().err
    assert_only_checkpoint_and_log(tmp_path)
    assert_same_run(run_distill(tmp_path, resume=True), reference[0], tmp_path, reference[1])


def test_an_interrupted_save_leaves_the_last_checkpoint_whole(reference, tmp_path, monkeypatch):
    """A second Ctrl-C while the epoch's checkpoint is written: the one before stays, and no temporary file."""
    with pytest.raises(KeyboardInterrupt):
        run_distill(tmp_path, Trap("step", 2))

    def half_written(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(torch, "save", half_written)
        run_distill(tmp_path, resume=True)
    assert_only_checkpoint_and_log(tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 2
    assert_same_run(run_distill(tmp_path, resume=True), reference[0], tmp_path, reference[1])


def test_resume_refuses_another_teacher_or_student(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_distill(tmp_path, Trap("step", 2))
    with pytest.raises(ValueError, match="made with another teacher"):
        run_distill(tmp_path, resume=True, teacher_seed=2)  # the same architecture, other weights
    with pytest.raises(ValueError, match="student of another architecture"):
        run_distill(tmp_path, resume=True, width=5)
    assert run_distill(tmp_path, resume=True).history[-1]["step"] == 8


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    return run_compress(out), out


@pytest.mark.parametrize("prune_step", [1, 2], ids=["mid-epoch", "on-an-epochs-last-step"])
def test_ctrl_c_during_a_pruning_step_resumes_to_the_uninterrupted_result(compressed, tmp_path, monkeypatch,
                                                                          prune_step):
    trap, step = Trap("prune", prune_step), Pruner.step

    def trapped(self, optimizer=None):
        trap.hit("prune", self.steps_done + 1)
        return step(self, optimizer)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Pruner, "step", trapped)
        run_compress(tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 2 * prune_step
    assert_only_checkpoint_and_log(tmp_path)
    resumed = run_compress(tmp_path, resume=True)
    reference, out = compressed
    assert_same_run(resumed, reference, tmp_path, out)
    assert resumed.report["pruning"] == reference.report["pruning"]
