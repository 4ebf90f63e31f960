"""Group Fisher per sample (importance="fisher"): each sample's own mask
gradient, squared and summed, equals a loop over single samples; the batch
form (fisher_batch) squares the batch's mean instead, and differs; compress
scores through the per-sample path on the distillation loss."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpdfx
from cpdfx import passes
from cpdfx.compress import compress
from cpdfx.importance import Fisher, per_sample_mask_gradients
from cpdfx.losses import DistillLoss
from cpdfx.models import ResNetTiny

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 1, 8, 8)


def _tiny():
    torch.manual_seed(0)
    model = ResNetTiny(in_channels=1, widths=(8, 16, 32), blocks=(1, 1, 1))
    with torch.no_grad():  # running statistics away from 0 and 1, so that eval mode is visibly what runs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _naive(gm, comb, x, loss_fn, *args):
    """The squared mask gradient of each sample's own loss, summed: one backward
    pass per sample, in eval mode, read by the batch form (a batch of one)."""
    batch_form = Fisher(per_sample=False)
    gm.eval()
    for i in range(x.shape[0]):
        gm.zero_grad(set_to_none=True)
        loss_fn(gm(x[i:i + 1]), *(None if a is None else a[i:i + 1] for a in args)).backward()
        batch_form.accumulate(gm, comb)
    gm.zero_grad(set_to_none=True)
    return {gid: s * x.shape[0] for gid, s in batch_form.scores(gm, comb).items()}


@pytest.mark.parametrize("vectorise", [True, False])
def test_per_sample_scores_equal_a_loop_over_single_samples(vectorise):
    """On the distillation loss (cross-entropy + KD against each sample's own
    teacher output), with batch norm on running statistics; the graph is left
    in train mode as it was, and no parameter's .grad is touched."""
    gm = cpdfx.capture(_tiny().train(), X)
    comb = passes.comb(gm)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    teacher = torch.randn(12, 10)
    loss = DistillLoss()
    fisher = Fisher(samples=None, chunk=5)  # chunks of 5, 5, 2
    fisher.vectorise = vectorise
    fisher.accumulate_samples(gm, comb, (x,), loss, teacher, y)
    assert gm.training and all(p.grad is None for p in gm.parameters())
    got = fisher.scores(gm, comb)
    expected = _naive(gm, comb, x, loss, teacher, y)
    assert got.keys() == expected.keys() and got
    for gid in got:
        np.testing.assert_allclose(got[gid], expected[gid], rtol=2e-4, atol=1e-12)
    assert any(got[gid].max() > 10 * got[gid].min() for gid in got)  # they tell channels apart


def test_only_the_first_samples_of_a_batch_are_scored():
    gm = cpdfx.capture(_tiny().eval(), X)
    comb = passes.comb(gm)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    fisher = Fisher(samples=4)
    fisher.accumulate_samples(gm, comb, (x,), F.cross_entropy, y)
    expected = _naive(gm, comb, x[:4], F.cross_entropy, y[:4])
    got = fisher.scores(gm, comb)
    assert all(np.allclose(got[gid], expected[gid], rtol=2e-4, atol=1e-12) for gid in got)


def test_calibration_batches_and_their_targets_reach_the_per_sample_loss():
    gm = cpdfx.capture(_tiny().eval(), X)
    comb = passes.comb(gm)
    cal = [(torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))) for _ in range(2)]
    fisher = Fisher()
    cpdfx.importance.calibrate(fisher, gm, comb, cal, 1, F.cross_entropy)
    got = fisher.scores(gm, comb)
    x, y = torch.cat([c[0] for c in cal]), torch.cat([c[1] for c in cal])
    expected = _naive(gm, comb, x, F.cross_entropy, y)  # all 10 samples, one "batch"; calibrate saw two
    assert fisher.batches == 2
    assert all(np.allclose(got[gid] * 2, expected[gid], rtol=2e-4, atol=1e-12) for gid in got)


def test_the_batch_form_squares_the_mean_and_differs():
    """Two samples pulling a channel's mask opposite ways: their mean gradient
    is zero, so the batch form scores nothing; each sample's own gradient is
    not, and per-sample Fisher counts it."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    gm = cpdfx.capture(model.eval(), torch.randn(2, 4))
    comb = passes.comb(gm)
    x = torch.randn(1, 4).expand(2, 4).clone()
    sign = torch.tensor([1.0, -1.0])

    def loss_fn(output, s):
        return (output.sum(1) * s).mean()

    per_sample, batch_form = Fisher(), cpdfx.CRITERIA["fisher_batch"]()
    assert (per_sample.name, batch_form.name) == ("fisher", "fisher_batch")
    per_sample.accumulate_samples(gm, comb, (x,), loss_fn, sign)
    loss_fn(gm(x), sign).backward()
    batch_form.accumulate(gm, comb)
    p, b = per_sample.scores(gm, comb), batch_form.scores(gm, comb)
    hidden = next(g.id for g in comb.prunable)
    assert np.allclose(b[hidden], 0) and (p[hidden] > 0).any()


def test_per_sample_mask_gradients_are_per_sample():
    """The (N, channels) rows: a sample's row does not depend on the others."""
    gm = cpdfx.capture(_tiny().eval(), X)
    comb = passes.comb(gm)
    groups = list(comb.prunable)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    whole = per_sample_mask_gradients(gm, comb, groups, (x,), F.cross_entropy, (y,), chunk=4)
    part = per_sample_mask_gradients(gm, comb, groups, (x[3:],), F.cross_entropy, (y[3:],))
    assert all(whole[g.id].shape == (6, g.size) for g in groups)
    assert all(np.allclose(whole[g.id][3:], part[g.id], rtol=1e-4, atol=1e-10) for g in groups)


def test_the_pruner_asks_fisher_for_the_batch():
    model = _tiny().train()
    pruner = cpdfx.Pruner(model, X, "fisher", macs=0.5, steps=1, loss_fn=F.cross_entropy)
    gm = pruner.gm
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(gm(x), y).backward()
    with pytest.raises(RuntimeError, match="needs the batch"):
        pruner.accumulate(gm)
    pruner.accumulate(gm, (x,), y)
    assert pruner.criterion.batches == 1
    slim = pruner.step()
    assert 0.48 <= cpdfx.cost(slim, X).macs / cpdfx.cost(model, X).macs <= 0.5


def test_compress_scores_fisher_per_sample_on_the_distillation_loss(digits, monkeypatch):
    seen = []
    original = Fisher.accumulate_samples

    def spy(self, gm, comb, inputs, loss_fn, *loss_args):
        teacher, target = loss_args
        seen.append((inputs[0].shape[0], teacher.shape, target.shape, type(loss_fn).__name__))
        return original(self, gm, comb, inputs, loss_fn, *loss_args)

    monkeypatch.setattr(Fisher, "accumulate_samples", spy)
    monkeypatch.setattr(Fisher, "_per_batch", None)  # the batch form is not used: it would fail
    result = compress(_tiny().eval(), X, *digits, macs=0.5, importance="fisher", prune_steps=2, epochs=1,
                      batch_size=32, lr=3e-3, progress=False)
    assert 0.48 <= result.report["achieved"]["macs"] <= 0.5
    assert result.report["criterion"] == "fisher"
    assert len(seen) == result.report["prune_at"][-1]  # every step of the pruning phase
    assert all(s == (32, (32, 10), (32,), "DistillLoss") for s in seen)
