"""compress: CPD's prune-while-distilling schedule on sklearn's digits, exact
resume of a run interrupted between pruning steps (the learned structure's
too; its own tests are in test_learned.py), and a segmenter on Fashion-MNIST
segmentation canvases."""
import os
import signal

import pytest
import torch

import cpdfx
from cpdfx import data
from cpdfx.compress import compress
from cpdfx.cpd import PruneCallback, prune_points
from cpdfx.learned import LearnedCallback
from cpdfx.models import UNetTiny
from helpers import fake_onnxruntime

X = torch.randn(2, 1, 8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(epochs=2, batch_size=32, lr=3e-3, progress=False)  # 42 steps an epoch: pruning in steps 1-42


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prune_points_spread_over_the_first_share():
    assert prune_points(84, 0.5, 3) == [14, 28, 42]
    assert prune_points(100, 1.0, 4) == [25, 50, 75, 100]
    with pytest.raises(ValueError, match="do not fit"):
        prune_points(10, 0.5, 6)
    with pytest.raises(ValueError, match="prune_share"):
        prune_points(10, 0, 1)


def test_cpd_schedule_meets_the_budget_pruning_in_the_first_half(digits, teacher, tmp_path):
    result = compress(teacher, X, *digits, macs=0.5, prune_steps=3, out_dir=tmp_path, **RUN)
    report, slim = result.report, result.model
    assert 0.48 <= report["achieved"]["macs"] <= 0.5
    assert cpdfx.cost(slim, X).macs <= 0.5 * cpdfx.cost(teacher, X).macs and not slim.training
    # the pruner stepped at the planned optimizer steps, the params falling each time
    assert [e["step"] for e in report["pruning"]] == report["prune_at"] == [14, 28, 42]
    shares = [e["params"] for e in report["pruning"]]
    assert shares == sorted(shares, reverse=True) and shares[0] < 1
    assert [h["replaced_at"] for h in result.history] == [[14, 28, 42], []]
    assert result.history[0]["params"] == result.history[1]["params"] == sum(p.numel() for p in slim.parameters())
    assert report["student"]["top1"] > 0.85 and report["teacher"]["top1"] > 0.9, report
    assert slim(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # the checkpoint's optimizer holds the slim parameters, under their names, with sliced moments
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["optimizer"]
    shapes = {n: p.shape for n, p in slim.named_parameters()}
    names = [n for g in saved["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(shapes)
    assert all(saved["state"][i]["exp_avg"].shape == shapes[n] for i, n in enumerate(names))
    assert (tmp_path / "report.json").exists()


def test_plain_fine_tuning_has_no_teacher_term(digits, teacher):
    result = compress(teacher, X, *digits, macs=0.5, prune_steps=2, plain=True, epochs=1, batch_size=32,
                      progress=False)
    assert "kd" not in result.history[0] and result.history[0]["ce"] > 0  # no teacher ran
    assert 0.48 <= result.report["achieved"]["macs"] <= 0.5
    with pytest.raises(ValueError, match="labels=True"):
        compress(teacher, X, *digits, macs=0.5, plain=True, labels=False, progress=False)


def test_a_quiet_latency_budget_times_its_tables_without_a_bar(digits, teacher, monkeypatch, capfd):
    """progress=False reaches the latency tables too (and their own cache=False
    keeps them from being read from an earlier test's cache: they are timed here)."""
    fake_onnxruntime(monkeypatch, [0.66])
    result = compress(teacher, X, *digits, latency=2 / 3, prune_steps=1, epochs=1, batch_size=32,
                      latency_options={"cache": False}, progress=False)
    assert result.report["achieved"]["latency"] == 0.66
    assert "latency tables" not in capfd.readouterr().err


def stop_at(monkeypatch, callback_class, at):
    """Ctrl-C at optimizer step `at` (distill saves a checkpoint there and stops)."""
    original = callback_class.on_step_end

    def on_step_end(self, step, student, optimizer):
        new = original(self, step, student, optimizer)
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return new

    monkeypatch.setattr(callback_class, "on_step_end", on_step_end)


@pytest.mark.parametrize("importance, callback_class, at", [("fisher", PruneCallback, 10),
                                                             ("fisher", PruneCallback, 20),
                                                             ("learned", LearnedCallback, 20)])
def test_resume_between_pruning_steps_gives_the_uninterrupted_weights(digits, teacher, tmp_path, monkeypatch,
                                                                      importance, callback_class, at):
    """Fisher interrupted at step 10 has gathered importance but not pruned yet;
    at step 20 it has pruned once (step 14) and gathered importance for the
    next; learned at step 20 is still training its gates."""
    train = data.digits("train", augment=True)
    options = dict(macs=0.5, prune_steps=3, importance=importance, learned_options={"penalty": 4.0}, **RUN)
    if importance != "learned":
        options.pop("learned_options")
    reference = compress(teacher, X, train, out_dir=tmp_path / "ref", **options)
    with monkeypatch.context() as patch:
        stop_at(patch, callback_class, at)
        with pytest.raises(KeyboardInterrupt):
            compress(teacher, X, train, out_dir=tmp_path / "run", **options)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == at
    resumed = compress(teacher, X, train, out_dir=tmp_path / "run", resume=True, **options)
    a, b = weights(resumed.model), weights(reference.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.report["pruning"] == reference.report["pruning"]
    with pytest.raises(ValueError, match="macs=0.5 there but 0.4 now"):
        compress(teacher, X, train, out_dir=tmp_path / "run", resume=True, **{**options, "macs": 0.4})


def test_segmentation_with_channel_wise_distillation():
    try:
        train = data.FashionSegmentation("train", canvas=32, items=1, length=128)
        val = data.FashionSegmentation("test", canvas=32, items=1, length=32)
    except data.DataError:
        pytest.skip("Fashion-MNIST is not installed")
    x = torch.randn(2, 1, 32, 32)
    result = compress(UNetTiny(num_classes=11, in_channels=1), x, train, val, task="segmentation", macs=0.5,
                      prune_steps=2, epochs=1, batch_size=16, lr=3e-3, progress=False)
    assert 0.48 <= result.report["achieved"]["macs"] <= 0.5
    assert {"ce", "cwd", "val_miou"} <= set(result.history[0]) and "miou" in result.report["teacher"]
    assert result.model(torch.randn(3, 1, 32, 32)).shape == (3, 11, 32, 32)
    assert "kind=cwd, alpha=3.0, temperature=4.0" in result.report["loss"]  # the defaults seg_proof chose
