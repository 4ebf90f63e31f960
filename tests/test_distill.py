"""The distillation loop on sklearn's digits: label-free learning, exact resume
after a crash or Ctrl-C, the pruning callback, DDP against one process, and
captured / pruned cpdfx graphs as students."""
import copy
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import Dataset, Subset

import cpdfx
from cpdfx import data
from cpdfx.distill import Callback, distill, evaluate
from cpdfx.losses import DistillLoss
from cpdfx.models import VGGTiny

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(hidden=64, dropout=0.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


class ImagesOnly(Dataset):
    """A dataset without targets: what label-free distillation must cope with."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def teacher(digits):
    """An MLP at ~93% on digits, trained on the labels alone (no teacher)."""
    torch.manual_seed(0)
    model = mlp(128)
    distill(model, None, digits[0], epochs=5, batch_size=32, lr=3e-3, progress=False)
    return model.eval()


def test_label_free_distillation_learns_from_the_teacher_alone(digits, teacher):
    train, test = digits
    before = weights(teacher)
    student = mlp(32)
    start = evaluate(student, test, device="cpu")["top1"]
    result = distill(student, teacher, ImagesOnly(train), test, labels=False, epochs=3, batch_size=32, lr=1e-2,
                     progress=False)
    top1 = [h["val_top1"] for h in result.history]
    losses = [h["loss"] for h in result.history]
    assert start < 0.3 and top1[-1] > 0.85 and top1 == sorted(top1), top1
    assert losses == sorted(losses, reverse=True) and set(result.history[0]) >= {"kd", "lr", "step", "params"}
    assert result.student is student and not student.training
    assert_same_weights(weights(teacher), before)  # the teacher only teaches


class Interrupt(Callback):
    """Stops a run at a step: Ctrl-C (SIGINT to this process) or a crash."""

    def __init__(self, at, how):
        self.at, self.how = at, how

    def on_step_end(self, step, student, optimizer):
        if step == self.at and self.how == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)
        if step == self.at and self.how == "crash":
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("how, at", [("ctrl-c", 26), ("crash", 25)], ids=["ctrl-c-mid-epoch", "crash-after-epoch-1"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(digits, teacher, tmp_path, how, at):
    """Dropout and augmentation on, so the RNG states and data order must be restored too.
    With batch 64, epoch 1 is steps 1-21: the crash at 25 resumes from its end-of-epoch
    checkpoint, Ctrl-C at 26 from a checkpoint taken right there."""
    train = data.digits("train", augment=True)
    initial = mlp(32, dropout=0.2)
    options = dict(epochs=2, batch_size=64, lr=5e-3, warmup=3, progress=False)
    reference = distill(copy.deepcopy(initial), teacher, train, digits[1], out_dir=tmp_path / "ref", **options)

    expected = KeyboardInterrupt if how == "ctrl-c" else RuntimeError
    with pytest.raises(expected):
        distill(copy.deepcopy(initial), teacher, train, digits[1], out_dir=tmp_path / "run",
                callback=Interrupt(at, how), **options)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert saved["step"] == (at if how == "ctrl-c" else 21)
    resumed = distill(copy.deepcopy(initial), teacher, train, digits[1], out_dir=tmp_path / "run", resume=True,
                      **options)

    assert_same_weights(weights(resumed.student), weights(reference.student))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]
    assert [h["val_top1"] for h in resumed.history] == [h["val_top1"] for h in reference.history]
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_resume_refuses_other_settings(digits, teacher, tmp_path):
    distill(mlp(16), teacher, Subset(digits[0], range(128)), epochs=1, batch_size=64, out_dir=tmp_path,
            progress=False)
    with pytest.raises(ValueError, match="batch_size=64 there but 32 now"):
        distill(mlp(16), teacher, Subset(digits[0], range(128)), epochs=1, batch_size=32, out_dir=tmp_path,
                resume=True, progress=False)


HIDDEN = 32
SLICES = {"1.weight": lambda t, k: t[:k], "1.bias": lambda t, k: t[:k], "4.weight": lambda t, k: t[:, :k],
          "4.bias": lambda t, k: t}


def halve(student):
    """The student with the first half of its hidden units (a stand-in for the pruner)."""
    k = student[1].out_features // 2
    slim = mlp(k).to(student[1].weight.device)
    with torch.no_grad():
        for name, p in slim.named_parameters():
            p.copy_(SLICES[name](dict(student.named_parameters())[name], k))
    return slim


class HalveHidden(Callback):
    """A fake step-wise pruner: checks gradients in on_backward, swaps in a half-width
    student at step `at`, re-binding and slicing the optimizer's state in place."""

    def __init__(self, at):
        self.at, self.pruned, self.backward_calls, self.at_swap = at, False, 0, None

    def on_backward(self, student):
        assert student.training and all(p.grad is not None for p in student.parameters())
        self.backward_calls += 1

    def on_step_end(self, step, student, optimizer):
        if step != self.at:
            return None
        slim = halve(student)
        k = slim[1].out_features
        new_params = dict(slim.named_parameters())
        for group in optimizer.param_groups:
            for i, name in enumerate(group["param_names"]):
                state = optimizer.state.pop(group["params"][i], {})
                group["params"][i] = new_params[name]
                optimizer.state[new_params[name]] = {
                    key: SLICES[name](v, k) if torch.is_tensor(v) and v.dim() else v for key, v in state.items()}
        self.pruned, self.old, self.at_swap = True, student, weights(slim)
        return slim

    def state_dict(self):
        return {"pruned": self.pruned}

    def load_state_dict(self, state, student):
        self.pruned = state["pruned"]
        return halve(student) if self.pruned else student


def test_callback_swaps_in_a_smaller_student_and_training_goes_on(digits, teacher):
    initial = mlp(HIDDEN)
    callback = HalveHidden(at=5)
    result = distill(copy.deepcopy(initial), teacher, digits[0], digits[1], epochs=3, batch_size=32, lr=1e-2,
                     callback=callback, progress=False)
    assert result.student is not callback.old and result.student[1].out_features == HIDDEN // 2
    assert callback.backward_calls == 3 * (1347 // 32) == result.history[-1]["step"]
    assert [h["replaced_at"] for h in result.history] == [[5], [], []]
    assert result.history[-1]["params"] == sum(p.numel() for p in mlp(HIDDEN // 2).parameters())
    after = weights(result.student)
    assert all(not torch.equal(after[k], callback.at_swap[k]) for k in after)  # the new student trained on
    assert result.history[-1]["val_top1"] > 0.8


def test_resume_re_prunes_through_the_callback_before_loading_weights(digits, teacher, tmp_path):
    initial = mlp(HIDDEN)
    options = dict(epochs=2, batch_size=64, lr=5e-3, progress=False)
    reference = distill(copy.deepcopy(initial), teacher, digits[0], out_dir=tmp_path / "ref",
                        callback=HalveHidden(at=5), **options)

    class PruneThenStop(HalveHidden):
        def on_step_end(self, step, student, optimizer):
            if step == 30:
                os.kill(os.getpid(), signal.SIGINT)
            return super().on_step_end(step, student, optimizer)

    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(initial), teacher, digits[0], out_dir=tmp_path / "run", callback=PruneThenStop(at=5),
                **options)
    resumed = distill(copy.deepcopy(initial), teacher, digits[0], out_dir=tmp_path / "run", resume=True,
                      callback=HalveHidden(at=5), **options)
    assert resumed.student[1].out_features == HIDDEN // 2
    assert_same_weights(weights(resumed.student), weights(reference.student))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, teacher_state, initial_state, out):
    """One torchrun-like rank: distill starts the gloo group itself from the env."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    teacher, student = mlp(128), mlp(HIDDEN)
    teacher.load_state_dict(teacher_state)
    student.load_state_dict(initial_state)
    result = distill(student, teacher, *ddp_data(), **DDP_OPTIONS, callback=HalveHidden(at=3),
                     out_dir=out / "logs" if rank == 0 else None)
    torch.save({"weights": weights(result.student), "history": result.history}, out / f"rank{rank}.pt")


DDP_OPTIONS = dict(epochs=1, batch_size=32, lr=5e-3, warmup=2, progress=False)


def ddp_data():
    return Subset(data.digits("train"), range(256)), Subset(data.digits("test"), range(101))


def test_ddp_two_processes_match_one_on_the_same_global_batch(teacher, tmp_path):
    initial = mlp(HIDDEN)
    mp.spawn(_ddp_worker, args=(_free_port(), teacher.state_dict(), initial.state_dict(), tmp_path), nprocs=2)
    single = distill(copy.deepcopy(initial), teacher, *ddp_data(), **DDP_OPTIONS, callback=HalveHidden(at=3))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # both ranks pruned at step 3, re-wrapped, and agree with one process
        assert_same_weights(rank["weights"], weights(single.student), atol=1e-5)
        assert rank["history"][0]["replaced_at"] == [3] and rank["history"][0]["step"] == 8
        assert rank["history"][0]["val_top1"] == pytest.approx(single.history[0]["val_top1"], abs=0.02)
        assert rank["history"][0]["loss"] == pytest.approx(single.history[0]["loss"], rel=1e-5)
    # each rank scored its share of the 101 validation samples; the counts were summed
    assert ranks[0]["history"][0]["val_top1"] == ranks[1]["history"][0]["val_top1"]
    assert (tmp_path / "logs" / "last.pt").exists()
    assert len((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone wrote


class Spy:
    """Records whether the student was in train mode during the steps (not a
    Callback subclass: distill still takes one written to the protocol alone)."""

    def __init__(self):
        self.modes = set()

    def on_backward(self, student):
        self.modes.add(student.training)


@pytest.fixture(scope="module")
def trained_conv(digits, teacher):
    """A captured VGG-style conv net (batch norm, dropout), trained as a student."""
    torch.manual_seed(0)
    gm = cpdfx.capture(VGGTiny(10, in_channels=1, image_size=8).eval(), torch.randn(2, 1, 8, 8))
    start = evaluate(gm, digits[1], device="cpu")["top1"]
    spy = Spy()
    result = distill(gm, teacher, digits[0], digits[1], epochs=3, batch_size=32, lr=3e-3, callback=spy,
                     progress=False)
    return start, spy, result


def test_a_captured_graph_trains_in_train_mode(trained_conv):
    start, spy, result = trained_conv
    gm = result.student
    assert cpdfx.capture(gm, None) is gm  # still a cpdfx graph
    assert spy.modes == {True} and not gm.training  # train() switched the graph, eval() switched it back
    means = [b for n, b in gm.named_buffers() if n.endswith("running_mean")]
    assert len(means) == 3 and all(m.abs().sum() > 0 for m in means)  # batch norm updated its statistics
    top1 = [h["val_top1"] for h in result.history]
    assert start < 0.3 and top1[-1] > 0.85, (start, top1)


def test_a_pruned_graph_recovers_by_distillation(digits, trained_conv):
    teacher = trained_conv[2].student
    x = torch.randn(2, 1, 8, 8)
    slim = cpdfx.prune(teacher, x, macs=0.3)
    assert cpdfx.cost(slim, x).macs <= 0.3 * cpdfx.cost(teacher, x).macs
    pruned = evaluate(slim, digits[1], device="cpu")["top1"]
    result = distill(slim, teacher, ImagesOnly(digits[0]), digits[1], labels=False, epochs=2, batch_size=32,
                     lr=3e-3, progress=False)
    recovered = result.history[-1]["val_top1"]
    assert recovered > max(pruned + 0.1, 0.8), (pruned, recovered)


def test_a_captured_student_leaves_the_teacher_alone(digits):
    model = mlp(32)
    before = weights(model)
    gm = cpdfx.capture(model, torch.randn(2, 1, 8, 8))  # the graph owns a copy of the weights
    result = distill(gm, model, Subset(digits[0], range(256)), epochs=1, batch_size=64, lr=1e-2, progress=False)
    assert not torch.equal(weights(result.student)["1.weight"], before["1.weight"])
    assert all(torch.equal(w, before[k]) for k, w in weights(model).items())


def test_a_student_sharing_the_teachers_weights_gets_a_frozen_teacher(digits):
    model = mlp(32)
    before = weights(model)
    with pytest.warns(UserWarning, match="shares its weights"):
        result = distill(model, model, Subset(digits[0], range(256)), epochs=1, batch_size=64, lr=1e-2,
                         progress=False)
    assert not torch.equal(weights(result.student)["1.weight"], before["1.weight"])


class MaskAsLogits(nn.Module):
    """A 'model' whose input is already the answer, at half resolution (like SegFormer's H/4)."""

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 2)


def test_evaluate_miou_and_top1():
    masks = torch.zeros(4, 8, 8, dtype=torch.long)
    masks[:, :4] = 1
    masks[:, 4:, :4] = 2
    one_hot = nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    labelled = [(one_hot[i], masks[i]) for i in range(4)]
    assert evaluate(MaskAsLogits(), labelled, task="segmentation", device="cpu") == {"miou": 1.0}
    ignored = [(one_hot[i], torch.where(masks[i] == 2, 255, masks[i])) for i in range(4)]
    blind = [(one_hot[i][[1, 0, 2]] * torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1), masks[i]) for i in range(4)]
    assert evaluate(MaskAsLogits(), ignored, task="segmentation", device="cpu") == {"miou": 1.0}
    # classes swapped 0<->1 and class 2 never predicted: IoU(0) = 0, IoU(1) = 0, IoU(2) = 0
    assert evaluate(MaskAsLogits(), blind, task="segmentation", device="cpu")["miou"] == 0.0
    logits = torch.eye(10)
    half_right = [(logits[i], torch.tensor(i if i % 2 else (i + 1) % 10)) for i in range(10)]
    assert evaluate(nn.Identity(), half_right, device="cpu") == {"top1": 0.5}


class IntensityOracle(nn.Module):
    """A perfect segmentation teacher for test_data.fake_fashion: an item's class is
    its brightness (40 + 20 * class), background is black."""

    def forward(self, x):
        centres = torch.tensor([0.0] + [45.0 + 20 * c for c in range(10)]).view(1, 11, 1, 1)
        return -((x * 255 - centres) / 10) ** 2


def test_segmentation_distillation_with_coarse_student_logits(tmp_path):
    """A SegFormer-like student predicts at H/4: CE is taken against upsampled logits,
    CWD against the teacher at full resolution; mIoU rises above all-background (0.30)."""
    from test_data import fake_fashion

    fake_fashion(tmp_path, n_train=96, n_test=24, classes=(0, 9))
    train = data.FashionSegmentation("train", root=tmp_path, canvas=32, items=1, length=128, augment=True)
    val = data.FashionSegmentation("test", root=tmp_path, canvas=32, items=1)
    assert evaluate(IntensityOracle(), val, task="segmentation", device="cpu") == {"miou": 1.0}
    coarse = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 11, 4, stride=4))
    result = distill(coarse, IntensityOracle(), train, val, task="segmentation", epochs=3, batch_size=32, lr=1e-2,
                     loss={"kind": "cwd", "alpha": 0.5}, progress=False)
    assert set(result.history[0]) >= {"ce", "cwd", "val_miou"}
    losses = [h["loss"] for h in result.history]
    assert losses == sorted(losses, reverse=True) and result.history[-1]["val_miou"] > 0.45, result.history
    free = distill(coarse, IntensityOracle(), ImagesOnly(train), ImagesOnly(val), task="segmentation",
                   labels=False, epochs=1, batch_size=32, progress=False)
    assert set(free.history[0]) >= {"cwd", "val_miou_vs_teacher"} and "ce" not in free.history[0]


def test_bad_settings_are_explained(digits, teacher):
    with pytest.raises(ValueError, match="fewer than one batch"):
        distill(mlp(8), teacher, Subset(digits[0], range(10)), batch_size=64, progress=False)
    with pytest.raises(ValueError, match="optimizer must be"):
        distill(mlp(8), teacher, digits[0], optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="make them agree"):
        distill(mlp(8), teacher, digits[0], loss=DistillLoss(labels=False), progress=False)


def test_without_a_teacher_it_trains_on_the_labels(digits):
    torch.manual_seed(0)
    result = distill(mlp(32), None, digits[0], digits[1], epochs=2, batch_size=64, lr=1e-2, progress=False)
    assert set(result.history[-1]) >= {"ce", "val_top1"} and "kd" not in result.history[-1]
    assert result.history[-1]["val_top1"] > 0.85
    with pytest.raises(ValueError, match="neither labels nor a teacher"):
        distill(mlp(32), None, digits[0], epochs=1, labels=False, progress=False)
